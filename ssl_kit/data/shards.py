"""Converts an ImageFolder / AudioFolder / VideoFolder tree into tar shards:

    python -m ssl_kit.data.shards SOURCE OUT --modality image|audio|video [--shard-size-mb 256] [--overwrite]

``OUT/<split>-000000.tar, ...`` are plain uncompressed POSIX tars (tar and WebDataset tools open
them) whose members ``<class>/<file>`` hold each sample file's bytes unchanged; a frame-folder
video becomes one member ``<class>/<folder>.frames.tar``, a tar of its files. ``OUT/shards.json``
(written last, atomically: without it the folder is not a dataset) lists the classes and, per
split, every sample's shard, data offset, size, member name and label, in the folder
DataModule's own listing order. ``--data.root OUT`` then reads the shards with random access
(``ssl_kit.data.sources``), so samplers, splits, seeds and augmentations are those of the folder.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import sys
import tarfile
from pathlib import Path

from ssl_kit.data.audio import list_audio
from ssl_kit.data.image import list_images
from ssl_kit.data.sources import FORMAT, FORMAT_VERSION, FRAMES_SUFFIX, INDEX_NAME, SPLITS, FolderLister, FolderSource
from ssl_kit.data.video import list_videos

#: modality -> (the folder DataModule's kind, its file listing)
MODALITIES: dict[str, tuple[str, FolderLister]] = {
    "image": ("ImageFolder", list_images),
    "audio": ("AudioFolder", list_audio),
    "video": ("VideoFolder", list_videos),
}
SHARD_NAME = re.compile(r"^(train|val|test)-\d{6}\.tar$")
BLOCK = tarfile.BLOCKSIZE


def frames_tar(folder: Path) -> bytes:
    """An uncompressed tar of the files of a frame folder (names only, as ``read_video`` lists them)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(p for p in folder.iterdir() if p.is_file()):
            tar.addfile(tar_info(path.name, path.stat().st_size, int(path.stat().st_mtime)), path.open("rb"))
    return buffer.getvalue()


def tar_info(name: str, size: int, mtime: int) -> tarfile.TarInfo:
    """A regular-file member with neutral ownership, so shards do not depend on who converted them."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, mtime, 0o644
    return info


class ShardWriter:
    """Writes ``<out>/<split>-NNNNNN.tar`` shards of at most ``limit`` bytes of members (a sample
    larger than that gets a shard of its own) and records where each sample's data lies."""

    def __init__(self, out: Path, split: str, limit: int) -> None:
        self.out, self.split, self.limit = out, split, limit
        self.shards: dict[str, int] = {}
        self.rows: list[list] = []
        self.tar: tarfile.TarFile | None = None
        self.name = ""  # of the shard being written

    def add(self, path: Path, member: str, label: int) -> None:
        """Appends the file (or frame folder) ``path`` as ``member``, in a new shard when it would overflow."""
        if path.is_dir():
            data = frames_tar(path)
            member, size, handle = member + FRAMES_SUFFIX, len(data), io.BytesIO(data)
        else:
            size, handle = path.stat().st_size, path.open("rb")
        padded = -(-size // BLOCK) * BLOCK  # tar pads member data to whole blocks
        if self.tar is None or (self.tar.offset + 3 * BLOCK + padded > self.limit and self.tar.offset > 0):  # 3 blocks: header, pax for long names
            self.close()
            self.name = f"{self.split}-{len(self.shards):06d}.tar"
            self.tar = tarfile.open(self.out / self.name, mode="w", format=tarfile.PAX_FORMAT)
        with handle:
            self.tar.addfile(tar_info(member, size, int(path.stat().st_mtime)), handle)
        self.rows.append([self.name, self.tar.offset - padded, size, member, label])  # the data ends the member

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()
            self.shards[self.name] = (self.out / self.name).stat().st_size
            self.tar = None


def prepare_output(out: Path, overwrite: bool) -> None:
    """A non-empty ``out`` is refused unless ``overwrite``; then its index goes first (so an
    interrupted rewrite is never taken for a dataset) and its old shards after it."""
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"output folder {out} is not empty: choose another or pass --overwrite")
        (out / INDEX_NAME).unlink(missing_ok=True)
        for path in out.iterdir():
            if SHARD_NAME.match(path.name):
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def convert(source: str, out: str, modality: str, shard_size_mb: float = 256, overwrite: bool = False) -> dict:
    """Writes the shards and the index of the class-folder tree ``source``; returns the index."""
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {', '.join(MODALITIES)}, got {modality!r}")
    if shard_size_mb <= 0:
        raise ValueError(f"--shard-size-mb must be positive, got {shard_size_mb}")
    kind, lister = MODALITIES[modality]
    folders = FolderSource(source, kind, lister)  # the DataModule's discovery: same files, classes, splits
    listed = {split: folders.split(split) for split in SPLITS}
    out_dir = Path(out).expanduser()
    prepare_output(out_dir, overwrite)
    index = {"format": FORMAT, "version": FORMAT_VERSION, "modality": modality, "classes": folders.classes, "shards": {}, "splits": {}}
    for split, samples in listed.items():
        if samples is None:
            continue
        writer = ShardWriter(out_dir, split, int(shard_size_mb * 2**20))
        split_dir = folders.root / split
        for path, label in samples:
            writer.add(Path(path), Path(path).relative_to(split_dir).as_posix(), label)
        writer.close()
        index["shards"].update(writer.shards)
        index["splits"][split] = writer.rows
    temporary = out_dir / f".{INDEX_NAME}.tmp"
    temporary.write_text(json.dumps(index))
    os.replace(temporary, out_dir / INDEX_NAME)
    return index


def summary(index: dict, out: str) -> str:
    """What was written: samples, shards and bytes per split."""
    lines = [f"wrote {out}/{INDEX_NAME}: {index['modality']}, {len(index['classes'])} classes"]
    for split, rows in index["splits"].items():
        shards = {row[0] for row in rows}
        size = sum(index["shards"][name] for name in shards)
        lines.append(f"  {split:5s} {len(rows)} samples in {len(shards)} shard(s), {size:,} bytes")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ssl_kit.data.shards", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="class-folder root: SOURCE/train/<class>/* (val/, test/ optional)")
    parser.add_argument("out", help="output folder for <split>-NNNNNN.tar and shards.json")
    parser.add_argument("--modality", required=True, choices=sorted(MODALITIES))
    parser.add_argument("--shard-size-mb", type=float, default=256, help="cut a new shard beyond this many MiB (default 256)")
    parser.add_argument("--overwrite", action="store_true", help="replace the shards of a non-empty output folder")
    args = parser.parse_args(argv)
    try:
        index = convert(args.source, args.out, args.modality, args.shard_size_mb, args.overwrite)
    except (OSError, ValueError) as error:
        sys.exit(f"error: {error}")
    print(summary(index, args.out))


if __name__ == "__main__":
    main()
