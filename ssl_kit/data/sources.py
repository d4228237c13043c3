"""Where the samples of a folder DataModule come from: a class-folder tree or a shard index.

``sample_source(root, ...)`` reads ``root/shards.json`` when it exists (a dataset converted with
``python -m ssl_kit.data.shards``) and lists the class folders otherwise; both give the same class
order and the same per-split ``(source, label)`` lists, so a DataModule builds the same datasets,
splits and seeded holdout either way. A sample's source is a path, or a ``ShardMember`` that
readers open with ``open_sample`` (``ssl_kit.data.datasets``).
"""

from __future__ import annotations

import csv
import json
from functools import cached_property
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from ssl_kit.data.datasets import class_names
from ssl_kit.data.samples import Samples, ShardMember

INDEX_NAME = "shards.json"
FORMAT = "ssl_kit.shards"
FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
#: A member holding a tar of a frame-folder video's frames.
FRAMES_SUFFIX = ".frames.tar"


class SampleSource(Protocol):
    """Class names and the ``(source, label)`` samples of each raw split (None: no such split)."""

    classes: list[str]

    def split(self, name: str) -> Samples | None: ...


#: Lists one split folder of a class-folder tree: ``(directory, classes) -> samples or None``.
FolderLister = Callable[[Path, list[str]], list[tuple[str, int]] | None]


class FolderSource:
    """``root/<split>/<class>/...`` listed by the DataModule's own ``lister``."""

    def __init__(self, root: str, kind: str, lister: FolderLister) -> None:
        self.root = Path(root).expanduser()
        self.classes = class_names(root, kind)
        self.lister = lister

    def split(self, name: str) -> list[tuple[str, int]] | None:
        return self.lister(self.root / name, self.classes)


class ShardSource:
    """The samples of a converted dataset, from ``root/shards.json`` (see ``ssl_kit.data.shards``)."""

    def __init__(self, root: str, modality: str) -> None:
        self.root = Path(root).expanduser()
        index_path = self.root / INDEX_NAME
        try:
            index = json.loads(index_path.read_text())
        except (OSError, ValueError) as error:
            raise ValueError(f"cannot read the shard index {index_path}: {error}") from error
        if index.get("format") != FORMAT or index.get("version") != FORMAT_VERSION:
            raise ValueError(f"{index_path} is not an {FORMAT} index of version {FORMAT_VERSION}")
        if index["modality"] != modality:
            raise ValueError(f"{index_path} holds {index['modality']} shards, not {modality}: convert the folder with --modality {modality}")
        for name, size in index["shards"].items():
            path = self.root / name
            if not path.is_file() or path.stat().st_size != size:
                raise FileNotFoundError(f"shard {path} of {index_path} is missing or not {size} bytes: re-run the conversion")
        self.classes: list[str] = index["classes"]
        self.splits: dict[str, list[list]] = index["splits"]

    def split(self, name: str) -> Samples | None:
        rows = self.splits.get(name)
        if rows is None:
            return None
        return [(ShardMember(str(self.root / shard), member, offset, size), label) for shard, offset, size, member, label in rows]


def is_sharded(root: str | None) -> bool:
    """Whether ``root`` holds a complete conversion (the index is written last)."""
    return root is not None and (Path(root).expanduser() / INDEX_NAME).is_file()


def sample_source(root: str, kind: str, modality: str, lister: FolderLister) -> SampleSource:
    """Shards when ``root`` holds ``shards.json``, else the class folders of ``root``."""
    return ShardSource(root, modality) if is_sharded(root) else FolderSource(root, kind, lister)


class ClassFolders:
    """What the folder DataModules share (mixed in before their modality's base): samples from
    ``root/train/<class>/...`` and, optionally, ``root/val/...`` and ``root/test/...``, or the
    shards of such a folder (``sample_source``); the classes read at construction (the model's
    head size is linked to them); a test split carved with ``test_fraction`` where there is none,
    and ``sample_splits`` holding out validation where there is no ``val``. Subclasses name the
    ``folder_kind`` (for messages) and ``modality`` and give ``list_split``."""

    folder_kind: str
    modality: str

    def __init__(self, root: str, *args, **kwargs) -> None:
        super().__init__(root, *args, **kwargs)
        self.classes = self.read_classes()
        self.num_classes = len(self.classes)

    @staticmethod
    def list_split(directory: Path, classes: list[str]) -> list[tuple[str, int]] | None:
        """The samples of one split folder ``directory/<class>/...`` (None: no such folder)."""
        raise NotImplementedError

    @cached_property
    def source(self) -> SampleSource:
        """The class folders or shards of ``root``, read when first needed."""
        return sample_source(self.root, self.folder_kind, self.modality, self.list_split)

    def read_classes(self) -> list[str]:
        return self.source.classes

    def load_splits(self):
        train, test = self.carve_test(self.source.split("train"), self.source.split("test"))
        return self.sample_splits(train, self.source.split("val"), test)


#: Separates the labels of one file in a multi-label CSV (``labels_csv``): ``dog/1-bark.wav,dog;outdoor``.
LABEL_DELIMITER = ";"


class LabelsCSV:
    """Multi-label samples: the files that ``path`` lists, a CSV with the header ``file,labels``
    (``file`` relative to ``root``; a file's labels separated by ``LABEL_DELIMITER``), each with a
    multi-hot label row over ``classes``, the sorted labels the CSV uses. They are the ``train``
    split; test and validation are held out of it (by fold, ``test_fraction``, ``val_fraction``).
    A row naming no file under ``root``, a file twice, or no label is an error naming the CSV and
    its line."""

    def __init__(self, root: str, path: str) -> None:
        self.path = Path(path).expanduser()
        folder = Path(root).expanduser()
        try:
            with self.path.open(newline="") as handle:
                reader = csv.DictReader(handle)
                rows = [(reader.line_num, row) for row in reader]
        except OSError as error:
            raise FileNotFoundError(f"cannot read the labels CSV {self.path}: {error}") from error
        missing = {"file", "labels"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{self.path} lacks the column(s) {', '.join(sorted(missing))}: its header must be file,labels")
        files = [(line, *self.parse(line, row, folder)) for line, row in rows]
        if not files:
            raise ValueError(f"{self.path} lists no files")
        seen: dict[str, int] = {}
        for line, file, _ in files:
            if file in seen:
                raise ValueError(f"{self.path}, line {line}: {file} is listed twice (first on line {seen[file]})")
            seen[file] = line
        self.classes = sorted({name for _, _, names in files for name in names})
        index = {name: i for i, name in enumerate(self.classes)}
        self.samples = []
        for _, file, names in files:
            multi_hot = np.zeros(len(self.classes), dtype=np.int64)
            multi_hot[[index[name] for name in names]] = 1
            self.samples.append((file, multi_hot))

    def parse(self, line: int, row: dict, folder: Path) -> tuple[str, list[str]]:
        """The file and the labels of one row, checked."""
        file = (row["file"] or "").strip()
        names = sorted({name.strip() for name in (row["labels"] or "").split(LABEL_DELIMITER) if name.strip()})
        if not file or not (folder / file).is_file():
            raise FileNotFoundError(f"{self.path}, line {line}: {file!r} is not a file under {folder}")
        if not names:
            raise ValueError(f"{self.path}, line {line} ({file}): no labels (separate a file's labels with {LABEL_DELIMITER!r})")
        return str(folder / file), names

    def split(self, name: str) -> Samples | None:
        return self.samples if name == "train" else None
