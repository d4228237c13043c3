"""Image DataModules: embedded digits, MNIST, CIFAR-10/100, STL-10 and ImageFolder."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np

from ssl_kit.data.base import Splits, SSLDataModule, unlabeled
from ssl_kit.data.datasets import IMAGE_EXTENSIONS, ArrayImages, Concatenated, class_folder_samples
from ssl_kit.data.download import obtain
from ssl_kit.data.sources import ClassFolders

#: Fixed seed for carving a test set out of datasets that have none, so it never moves with ``seed``.
TEST_SPLIT_SEED = 12345


def _require_root(root: str | None, name: str) -> Path:
    if root is None:
        raise ValueError(f"{name} needs --data.root pointing at the dataset directory")
    return Path(root).expanduser()


class DigitsDataModule(SSLDataModule):
    """scikit-learn's 1,797 real 8x8 handwritten digits, shipped offline: the default dataset.

    Split (seeded, stratified): 20% test (fixed), then ``val_fraction`` of the rest as val.
    """

    num_classes = 10
    mean = (0.3049,) * 3
    std = (0.3822,) * 3
    default_image_size = 32

    default_val_fraction = 0.2

    def load_splits(self) -> Splits:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = np.clip(digits.images * 16, 0, 255).astype(np.uint8)
        return self.fixed_test_splits(ArrayImages, images, digits.target, TEST_SPLIT_SEED)


def read_idx(path: Path) -> np.ndarray:
    """Reads an MNIST idx file (optionally gzipped): big-endian header, then raw uint8."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (EOFError, gzip.BadGzipFile) as error:
        raise ValueError(f"{path} is truncated or not a valid gzip file: {error}") from error
    if len(data) < 8 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an idx file of unsigned bytes (bad magic number)")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise ValueError(f"{path} is truncated: {len(data)} bytes is shorter than its {ndim}-d header")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: header says {shape}, found {body.size} bytes of data")
    return body.reshape(shape)


class MNISTDataModule(SSLDataModule):
    """MNIST from the original idx files (``.gz`` or not) in ``root`` or ``root/MNIST/raw``.

    Pretraining and the labeled train set use the training file minus a seeded, stratified
    ``val_fraction``; ``test`` is the official t10k set.
    """

    num_classes = 10
    mean = (0.1307,) * 3
    std = (0.3081,) * 3
    default_image_size = 28
    files = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

    def _locate(self, root: Path, name: str) -> Path | None:
        for folder in (root, root / "MNIST" / "raw"):
            for candidate in (folder / name, folder / f"{name}.gz"):
                if candidate.is_file():
                    return candidate
        return None

    def load_splits(self) -> Splits:
        root = _require_root(self.root, "MNIST")

        def download() -> None:
            from torchvision.datasets import MNIST

            MNIST(str(root), download=True)

        obtain(
            lambda: all(self._locate(root, name) for name in self.files),
            download,
            self.download,
            f"MNIST files not found in {root}: expected {', '.join(self.files)} (optionally .gz) there or in "
            f"{root / 'MNIST' / 'raw'}. Download them (torchvision.datasets.MNIST(root, download=True) does) "
            "and put them in that directory.",
        )
        train_x, train_y, test_x, test_y = (read_idx(self._locate(root, name)) for name in self.files)
        train, val = self.holdout_val(ArrayImages(train_x, train_y))
        return Splits(pretrain=train, train=train, val=val, test=ArrayImages(test_x, test_y))


class _CIFARBatchUnpickler(pickle.Unpickler):
    """CIFAR's python batches are pickles of a dict of lists, strings and one uint8 array. Only numpy's
    array and dtype constructors may be looked up, so a crafted batch file cannot run code (a plain
    ``pickle.load``, as torchvision's reader does, runs whatever the file names)."""

    ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),  # protocols 2-4
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),  # protocol 5
        ("_codecs", "encode"),  # bytes in a protocol-2 pickle written by Python 3
    }  # fmt: skip

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR batch holds only lists, strings and a numpy array")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as handle:
            entry = _CIFARBatchUnpickler(handle, encoding="latin1").load()
        images = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        return np.ascontiguousarray(images), np.asarray(entry[label_key], dtype=np.int64)
    except (OSError, pickle.UnpicklingError, KeyError, ValueError, EOFError) as error:
        raise ValueError(f"cannot read CIFAR batch file {path}: {error}") from error


class CIFAR10DataModule(SSLDataModule):
    """CIFAR-10 from its python pickle batches in ``root/cifar-10-batches-py``; test is the official test batch."""

    num_classes = 10
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)
    default_image_size = 32
    folder = "cifar-10-batches-py"
    train_files = tuple(f"data_batch_{i}" for i in range(1, 6))
    test_files = ("test_batch",)
    label_key = "labels"

    def _download(self, root: Path) -> None:
        from torchvision.datasets import CIFAR10

        CIFAR10(str(root), download=True)

    def _read(self, folder: Path, names: tuple[str, ...]) -> ArrayImages:
        parts = [_read_cifar_batch(folder / name, self.label_key) for name in names]
        return ArrayImages(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))

    def load_splits(self) -> Splits:
        root = _require_root(self.root, type(self).__name__)
        folder = root / self.folder
        names = self.train_files + self.test_files
        obtain(
            lambda: all((folder / name).is_file() for name in names),
            lambda: self._download(root),
            self.download,
            f"{self.folder} not found under {root}: expected {folder}/{{{', '.join(names)}}}. Download the "
            f"python version of the dataset (torchvision.datasets.{type(self).__name__[:-10]}(root, "
            "download=True) does) and extract it there.",
        )
        train, val = self.holdout_val(self._read(folder, self.train_files))
        return Splits(pretrain=train, train=train, val=val, test=self._read(folder, self.test_files))


class CIFAR100DataModule(CIFAR10DataModule):
    """CIFAR-100 (fine labels) from ``root/cifar-100-python``."""

    num_classes = 100
    mean = (0.5071, 0.4865, 0.4409)
    std = (0.2673, 0.2564, 0.2762)
    folder = "cifar-100-python"
    train_files = ("train",)
    test_files = ("test",)
    label_key = "fine_labels"

    def _download(self, root: Path) -> None:
        from torchvision.datasets import CIFAR100

        CIFAR100(str(root), download=True)


def read_stl10_images(path: Path) -> np.ndarray:
    """STL-10 binary images: uint8, column-major 3x96x96 each; memory-mapped, returned as (N, 96, 96, 3)."""
    size = path.stat().st_size
    if size == 0 or size % (3 * 96 * 96):
        raise ValueError(f"{path} is empty or truncated: {size} bytes is not a whole number of 3x96x96 images")
    return np.memmap(path, dtype=np.uint8, mode="r").reshape(-1, 3, 96, 96).transpose(0, 3, 2, 1)


class STL10DataModule(SSLDataModule):
    """STL-10 from ``root/stl10_binary``; pretraining uses the unlabeled split (plus train by default)."""

    num_classes = 10
    mean = (0.4467, 0.4398, 0.4066)
    std = (0.2603, 0.2566, 0.2713)
    default_image_size = 96
    files = ("train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin", "unlabeled_X.bin")

    def __init__(self, *args, pretrain_with_train: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pretrain_with_train = pretrain_with_train

    def _labeled(self, folder: Path, split: str) -> ArrayImages:
        images = read_stl10_images(folder / f"{split}_X.bin")
        labels = np.fromfile(folder / f"{split}_y.bin", dtype=np.uint8).astype(np.int64) - 1
        return ArrayImages(images, labels)

    def load_splits(self) -> Splits:
        root = _require_root(self.root, "STL10")
        folder = root / "stl10_binary"

        def download() -> None:
            from torchvision.datasets import STL10

            STL10(str(root), split="unlabeled", download=True)

        obtain(
            lambda: all((folder / name).is_file() for name in self.files),
            download,
            self.download,
            f"STL-10 not found: expected {folder}/{{{', '.join(self.files)}}}. Download the binary version "
            "(torchvision.datasets.STL10(root, download=True) does) and extract it there.",
        )
        labeled = self._labeled(folder, "train")
        unlabeled_images = read_stl10_images(folder / "unlabeled_X.bin")
        pool = ArrayImages(unlabeled_images, unlabeled(len(unlabeled_images)))
        train, val = self.holdout_val(labeled)
        pretrain = Concatenated([train, pool]) if self.pretrain_with_train else pool
        return Splits(pretrain=pretrain, train=train, val=val, test=self._labeled(folder, "test"))


def list_images(directory: Path, classes: list[str]) -> list[tuple[str, int]] | None:
    """The image files of one split folder ``directory/<class>/**`` (None: no such folder)."""
    return class_folder_samples(directory, classes, IMAGE_EXTENSIONS)


class ImageFolderDataModule(ClassFolders, SSLDataModule):
    """ImageNet / Imagenette layout: ``root/train/<class>/*`` and, optionally, ``root/val/<class>/*``
    and ``root/test/<class>/*``. Without ``val`` a seeded stratified ``val_fraction`` of train is held out.
    ``root`` may also be shards of such a folder (``python -m ssl_kit.data.shards``)."""

    default_image_size = 224
    center_crop_ratio = 0.875
    folder_kind = "ImageFolder"
    modality = "image"
    list_split = staticmethod(list_images)
