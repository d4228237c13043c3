"""Videos in class folders (your own, or Kinetics in its downloaders' layouts, with or without the
official annotations)."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from ssl_kit.data.base import Splits
from ssl_kit.data.sources import ClassFolders, is_sharded
from ssl_kit.data.video.base import VideoDataModule
from ssl_kit.data.video.files import VIDEO_EXTENSIONS, list_videos

log = logging.getLogger(__name__)


class VideoFolderDataModule(ClassFolders, VideoDataModule):
    """Your own videos: ``root/train/<class>/<video file or folder of frames>`` and, optionally,
    ``root/val/...`` and ``root/test/...``. Training clips start at a random frame, evaluation
    clips in the middle. Without ``val`` a seeded stratified ``val_fraction`` of train is held out.
    ``root`` may also be shards of such a folder (``python -m ssl_kit.data.shards``)."""

    folder_kind = "VideoFolder"
    modality = "video"
    list_split = staticmethod(list_videos)


KINETICS_COLUMNS = ("label", "youtube_id", "time_start", "time_end")
KINETICS_FOLDERS = {"train": ("train",), "validate": ("val", "validate"), "test": ("test",)}


class KineticsDataModule(VideoFolderDataModule):
    """Kinetics-400/600/700: the official ``root/annotations/{train,validate,test}.csv`` (columns
    label, youtube_id, time_start, time_end, ...); the clip of a row is
    ``<youtube_id>_<time_start:06d>_<time_end:06d>.mp4`` (any video extension) anywhere under
    ``root/train``, ``root/val`` (or ``validate``) or ``root/test``: in ``<label>/`` folders or
    flat, as the common downloaders write them. Rows whose clip is absent (Kinetics always has dead
    YouTube links) are skipped and counted in one warning per split. A val or test CSV without
    labels (withheld in some releases) gives no such split. Classes are the sorted train labels;
    without validate.csv a seeded stratified ``val_fraction`` of train is held out. Without
    annotations: class folders ``root/train/<class>/*`` (or their shards) exactly as ``VideoFolderDataModule``."""

    def _csv(self, split: str) -> Path:
        return Path(self.root).expanduser() / "annotations" / f"{split}.csv"

    def read_classes(self) -> list[str]:
        if self._csv("train").is_file():
            return sorted({row["label"] for row in self._rows("train")})
        train = Path(self.root).expanduser() / "train"
        if not train.is_dir() and not is_sharded(self.root):
            raise FileNotFoundError(
                f"Kinetics not found in {self.root}: expected the official annotations {self._csv('train')} "
                f"(clips under {train}/) or class folders {train}/<class>/*"
            )
        return super().read_classes()

    def _rows(self, split: str) -> list[dict[str, str]] | None:
        path = self._csv(split)
        if not path.is_file():
            return None
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            missing = [column for column in KINETICS_COLUMNS if column not in (reader.fieldnames or ())]
            if missing == ["label"] and split != "train":
                log.warning("%s has no labels (withheld in this release): no %s split", path, split)
                return None
            if missing:
                raise ValueError(f"{path} lacks the column(s) {', '.join(missing)}")
            return list(reader)

    def _csv_samples(self, split: str) -> list[tuple[str, int]] | None:
        """The clips of ``<split>.csv`` found on disk; absent ones are skipped and counted."""
        rows, path = self._rows(split), self._csv(split)
        if rows is None:
            return None
        root = Path(self.root).expanduser()
        folders = [root / name for name in KINETICS_FOLDERS[split]]
        on_disk = {
            file.stem: file
            for folder in folders
            if folder.is_dir()
            for file in folder.rglob("*")
            if file.suffix.lower() in VIDEO_EXTENSIONS
        }
        index = {name: i for i, name in enumerate(self.classes)}
        samples = []
        for row in rows:
            if row["label"] not in index:
                raise ValueError(f"{path}: label {row['label']!r} is not in {self._csv('train')}")
            clip = on_disk.get(f"{row['youtube_id']}_{int(float(row['time_start'])):06d}_{int(float(row['time_end'])):06d}")
            if clip is not None:
                samples.append((str(clip), index[row["label"]]))
        where = " or ".join(f"{folder}/" for folder in folders)
        if not samples:
            raise FileNotFoundError(
                f"none of the {len(rows)} clips of {path} is under {where} "
                "(expected <label>/<youtube_id>_<time_start:06d>_<time_end:06d>.mp4)"
            )
        if len(samples) < len(rows):
            absent = len(rows) - len(samples)
            log.warning("Kinetics %s: %d of the %d clips of %s are absent under %s; skipped", split, absent, len(rows), path, where)
        return samples

    def load_splits(self) -> Splits:
        if not self._csv("train").is_file():
            return super().load_splits()
        return self.sample_splits(*(self._csv_samples(split) for split in ("train", "validate", "test")))
