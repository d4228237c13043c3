"""Map-style datasets returning ``(PIL image, label)``; transforms are applied by ``Transformed``.
File-backed datasets read each sample from a path or from a member of a shard (``ShardMember``,
opened with ``open_sample``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError
from torch.utils.data import ConcatDataset, Dataset, default_collate

from ssl_kit.data.cache import DecodedCache
from ssl_kit.data.samples import Source, UnreadableFileError, open_sample

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


class ArrayImages(Dataset):
    """Images held as a uint8 array ``(N, H, W)`` or ``(N, H, W, 3)`` (memory-mapped arrays work too)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        image = Image.fromarray(np.asarray(self.images[index]))
        return image.convert("RGB"), int(self.labels[index])


class TensorSamples(Dataset):
    """Samples held in one tensor, ``(N, ...)``, with their labels (embedded audio and video)."""

    def __init__(self, samples: Any, labels: np.ndarray) -> None:
        if len(samples) != len(labels):
            raise ValueError(f"{len(samples)} samples but {len(labels)} labels")
        self.samples = samples
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return self.samples[index], int(self.labels[index])


class SkippedFiles:
    """What ``skip_bad_files`` skipped: a warning per skip and, once ``path`` is set (the CLI sets
    ``<run>/skipped_files.txt``), a line per skip appended there by every loader worker (short
    appends are atomic), so a run ends with a count and a listing instead of lines scattered over
    epochs."""

    def __init__(self) -> None:
        self.path: Path | None = None

    def record(self, source: Source, error: Exception) -> None:
        log.warning("skipping %s", error)
        if self.path is not None:
            with open(self.path, "a") as listing:
                listing.write(f"{source}\n")

    def summary(self) -> str | None:
        """One line: how many distinct files were skipped and where they are listed; None if none."""
        if self.path is None or not self.path.is_file():
            return None
        skipped = set(self.path.read_text().splitlines())
        return f"skipped {len(skipped)} unreadable file(s) (--data.skip_bad_files), listed in {self.path}" if skipped else None


class LabeledFiles(Dataset):
    """``(sample, label)`` read from files; a bad file raises ``UnreadableFileError`` naming it, or,
    with a ``skipped`` recorder (``--data.skip_bad_files``), is recorded there and yields ``None``
    (``RefillingCollate`` then replaces it). Subclasses implement ``decode`` (the file's decoded
    array) and ``finish`` (the sample made from it); with a ``cache``
    (``ssl_kit.data.cache.DecodedCache``) each file is decoded once and read back memory-mapped."""

    def __init__(self, samples: Sequence[tuple[Source, int]], skipped: SkippedFiles | None = None, cache: DecodedCache | None = None) -> None:
        self.samples = list(samples)
        self.labels = np.array([label for _, label in self.samples], dtype=np.int64)
        self.skipped = skipped
        self.cache = cache

    def variant(self) -> str:
        """What decoding depends on besides the file (a cache entry per variant)."""
        return type(self).__name__

    def decode(self, path: Source) -> np.ndarray:
        """The decoded file; raises ``UnreadableFileError`` (naming ``path``) when it cannot."""
        raise NotImplementedError

    def finish(self, array: np.ndarray) -> Any:
        """The sample made from a decoded (maybe memory-mapped, read-only) array."""
        return array

    def read(self, path: Source) -> Any:
        if self.cache is None:
            return self.finish(self.checked(path))
        return self.finish(self.cache.get(path, self.variant(), lambda: self.checked(path)))

    def checked(self, path: Source) -> np.ndarray:
        """The decoded file, refused (naming it) when it holds NaN or infinite values, which would
        otherwise surface later as a non-finite loss blamed on the learning rate."""
        array = self.decode(path)
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            raise UnreadableFileError(f"{path} holds NaN or infinite values")
        return array

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int] | None:
        path, label = self.samples[index]
        try:
            return self.read(path), label
        except UnreadableFileError as error:
            if self.skipped is not None:
                self.skipped.record(path, error)
                return None
            raise UnreadableFileError(f"{error}. Fix or remove it, or pass --data.skip_bad_files true to skip unreadable files.") from error


class FileImages(LabeledFiles):
    """Images read from files (any format PIL decodes), as RGB."""

    def decode(self, path: Source) -> np.ndarray:
        try:
            with Image.open(open_sample(path)) as image:
                return np.asarray(image.convert("RGB"))
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            raise UnreadableFileError(f"cannot read image file {path}: {error}") from error

    def finish(self, array: np.ndarray) -> Image.Image:
        return Image.fromarray(np.asarray(array))


class Transformed(Dataset):
    """The samples of ``base`` at ``indices`` (all when None), with ``transform`` applied when given."""

    def __init__(
        self, base: Dataset, transform: Callable[[Any], Any] | None = None, indices: Sequence[int] | None = None
    ) -> None:
        self.base = base
        self.transform = transform
        self.indices = np.arange(len(base)) if indices is None else np.asarray(indices, dtype=np.int64)

    @property
    def labels(self) -> np.ndarray:
        return labels_of(self.base)[self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Any, int] | None:
        item = self.base[int(self.indices[index])]
        if item is None or self.transform is None:
            return item
        sample, label = item
        return self.transform(sample), label


class WithTargets(Dataset):
    """``(sample, label)`` items of ``base`` extended to ``(sample, label, targets[index])``."""

    def __init__(self, base: Dataset, targets: Any) -> None:
        if len(base) != len(targets):
            raise ValueError(f"{len(base)} samples but {len(targets)} targets")
        self.base = base
        self.targets = targets

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[Any, int, Any] | None:
        item = self.base[index]
        return None if item is None else (*item, self.targets[index])


class Concatenated(ConcatDataset):
    """``ConcatDataset`` that keeps the labels of its parts."""

    @property
    def labels(self) -> np.ndarray:
        return np.concatenate([labels_of(part) for part in self.datasets])


class RefillingCollate:
    """Collation under ``skip_bad_files``: samples that could not be read (None) are replaced by
    copies of readable ones of the same batch (or, for a batch with none, of the dataset's first
    readable sample), so every batch keeps its size. DDP ranks then stay in step (their collectives
    need equal batches on every rank), BatchNorm never sees a batch of one, and no step or
    validation sees an empty batch. Feature extraction is unaffected: a copy carries its source's
    index, and ``FeatureExtractor`` keeps one row per index. The full batch then goes to
    ``collate`` (None: ``default_collate``)."""

    def __init__(self, dataset: Dataset, collate: Callable[[list], Any] | None = None) -> None:
        self.dataset = dataset
        self.collate = collate or default_collate
        self.spare: list = []

    def __call__(self, batch: list) -> Any:
        kept = [item for item in batch if item is not None]
        if len(kept) < len(batch):
            log.warning("replaced %d unreadable file(s) in a batch of %d by copies of readable ones", len(batch) - len(kept), len(batch))
        self.spare = kept or self.spare or [self.first_readable()]
        return self.collate([item if item is not None else self.spare[i % len(self.spare)] for i, item in enumerate(batch)])

    def first_readable(self) -> Any:
        for index in range(len(self.dataset)):
            item = self.dataset[index]
            if item is not None:
                return item
        raise UnreadableFileError(f"no file of the dataset ({len(self.dataset)} samples) could be read")


def labels_of(dataset: Dataset) -> np.ndarray:
    """Labels of a dataset built here, without decoding images."""
    labels = getattr(dataset, "labels", None)
    if labels is None:
        raise TypeError(f"{type(dataset).__name__} does not expose labels")
    return np.asarray(labels)


def find_class_files(directory: Path, extensions: tuple[str, ...], kind: str = "image") -> tuple[list[tuple[str, int]], list[str]]:
    """``directory/<class>/**/<file>`` samples with one of ``extensions``, and the sorted class names."""
    classes = sorted(p.name for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise FileNotFoundError(f"no class sub-folders in {directory}; expected {directory}/<class>/<{kind} files>")
    samples = [
        (str(path), label)
        for label, name in enumerate(classes)
        for path in sorted((directory / name).rglob("*"))
        if path.suffix.lower() in extensions and path.is_file()
    ]
    if not samples:
        raise FileNotFoundError(f"no {kind} files ({', '.join(extensions)}) under {directory}")
    return samples, classes


def class_folder_samples(
    directory: Path, train_classes: list[str], extensions: tuple[str, ...], kind: str = "image"
) -> list[tuple[str, int]] | None:
    """The samples of one split folder labeled by the train split's class order; None when the
    folder does not exist; an error naming the folder when it has classes train/ lacks."""
    if not directory.is_dir():
        return None
    samples, classes = find_class_files(directory, extensions, kind)
    unknown = sorted(set(classes) - set(train_classes))
    if unknown:
        raise ValueError(f"{directory} has classes not in train/: {', '.join(unknown)}")
    index = {name: i for i, name in enumerate(train_classes)}
    return [(path, index[classes[label]]) for path, label in samples]


def class_names(root: str, kind: str) -> list[str]:
    """Class sub-folders of ``root/train``; a missing train/ is an error naming the expected path."""
    train_dir = Path(root).expanduser() / "train"
    if not train_dir.is_dir():
        raise FileNotFoundError(f"{kind} folder root {root} has no train/ directory: expected {train_dir}/<class>/*")
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"{train_dir} has no class folders: put each class's files in {train_dir}/<class>/")
    if len(classes) == 1:
        raise ValueError(
            f"{train_dir} has one class folder ({classes[0]}): the online monitors (linear probe, kNN) and the "
            f"benchmark protocols need at least 2 classes. For unlabeled files, split them into 2 or more folders "
            f"(any grouping pretrains the same; only the monitors read the labels)."
        )
    return classes
