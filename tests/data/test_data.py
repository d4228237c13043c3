"""Tests of the image DataModules against small fixture files in the real on-disk formats."""

from __future__ import annotations

import gzip
import logging
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import SHARED_DATA
from ssl_kit.data import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    DigitsDataModule,
    ImageFolderDataModule,
    MNISTDataModule,
    STL10DataModule,
)
from ssl_kit.data.datasets import labels_of
from ssl_kit.data.samples import UnreadableFileError
from ssl_kit.data.image import TEST_SPLIT_SEED, read_idx
from ssl_kit.data.splits import stratified_split

REAL_MNIST = SHARED_DATA / "mnist"


def pixels(item) -> np.ndarray:
    """The uint8 pixels of a raw ``(PIL image, label)`` sample."""
    image, _ = item
    assert isinstance(image, Image.Image) and image.mode == "RGB"
    return np.asarray(image)


def pattern(height: int, width: int, offset: int = 0) -> np.ndarray:
    """An RGB image whose channels encode row, column and both, so any transpose or flip shows."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([(x * 7 + offset) % 256, (y * 3 + 1) % 256, (x + 2 * y) % 256], axis=-1).astype(np.uint8)


def normalized(rgb, mean, std) -> torch.Tensor:
    return (torch.tensor(rgb, dtype=torch.float32) / 255 - torch.tensor(mean)) / torch.tensor(std)


def split_of(dataset, index: int):
    """The sample at position ``index`` of the raw labeled data, fetched through a holdout subset."""
    position = np.flatnonzero(dataset.indices == index)
    assert len(position) == 1
    return dataset[int(position[0])]


# -- stratified_split -------------------------------------------------------------------------------


def test_stratified_split_exact_per_class_counts_disjoint_and_deterministic():
    labels = np.random.default_rng(3).permutation(np.repeat([0, 1, 2, 7], [10, 20, 5, 1]))
    kept, held = stratified_split(labels, 0.2, seed=11)
    assert {c: int((labels[held] == c).sum()) for c in (0, 1, 2, 7)} == {0: 2, 1: 4, 2: 1, 7: 0}
    assert {c: int((labels[kept] == c).sum()) for c in (0, 1, 2, 7)} == {0: 8, 1: 16, 2: 4, 7: 1}
    assert len(np.intersect1d(kept, held)) == 0
    np.testing.assert_array_equal(np.union1d(kept, held), np.arange(len(labels)))
    assert np.all(np.diff(kept) > 0) and np.all(np.diff(held) > 0)
    again_kept, again_held = stratified_split(labels.copy(), 0.2, seed=11)
    np.testing.assert_array_equal(again_kept, kept)
    np.testing.assert_array_equal(again_held, held)
    assert any(not np.array_equal(stratified_split(labels, 0.2, seed=s)[1], held) for s in range(12, 16))
    kept0, held0 = stratified_split(labels, 0.0, seed=0)
    assert len(held0) == 0 and len(kept0) == len(labels)
    with pytest.raises(ValueError, match=r"\[0, 1\).*1\.0"):
        stratified_split(labels, 1.0, seed=0)


# -- embedded digits ----------------------------------------------------------------------------------


def _digits(seed: int) -> DigitsDataModule:
    dm = DigitsDataModule(seed=seed, batch_size=8, num_workers=0)
    dm.setup()
    return dm


def test_digits_splits_sizes_disjoint_deterministic_and_fixed_test():
    from sklearn.datasets import load_digits

    digits = load_digits()
    rest, test_idx = stratified_split(digits.target, 0.2, TEST_SPLIT_SEED)
    a, a_again, b = _digits(0), _digits(0), _digits(1)
    s = a.splits
    assert a.num_classes == 10
    assert len(s.train) + len(s.val) + len(s.test) == 1797
    assert len(s.test) == sum(round(0.2 * n) for n in np.bincount(digits.target)) == 359
    assert len(s.val) == sum(round(0.2 * n) for n in np.bincount(digits.target[rest]))
    assert s.pretrain is s.train
    # Map train/val back to indices of the 1797 digits: they index the non-test part.
    images = np.clip(digits.images * 16, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(s.test.images, images[test_idx])
    np.testing.assert_array_equal(s.train.base.images, images[rest])
    train_idx, val_idx = rest[s.train.indices], rest[s.val.indices]
    assert len(np.intersect1d(train_idx, val_idx)) == 0
    assert len(np.intersect1d(train_idx, test_idx)) == 0 and len(np.intersect1d(val_idx, test_idx)) == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train_idx, val_idx, test_idx])), np.arange(1797))
    np.testing.assert_array_equal(labels_of(s.val), digits.target[val_idx])
    # A sample comes out as the digit's pixels (grey, replicated to RGB).
    first = pixels(s.val[0])
    np.testing.assert_array_equal(first, np.repeat(images[val_idx[0]][:, :, None], 3, axis=2))
    assert s.val[0][1] == digits.target[val_idx[0]]
    # Same seed: same split; other seed: same test set, different val set.
    np.testing.assert_array_equal(a_again.splits.val.indices, s.val.indices)
    np.testing.assert_array_equal(a_again.splits.train.indices, s.train.indices)
    np.testing.assert_array_equal(b.splits.test.images, s.test.images)
    np.testing.assert_array_equal(b.splits.test.labels, s.test.labels)
    assert not np.array_equal(b.splits.val.indices, s.val.indices)
    assert len(b.splits.val) == len(s.val)


def test_digits_loaders_shapes():
    dm = _digits(0)
    views, labels = next(iter(dm.train_dataloader()))
    assert len(views) == 2 and all(v.shape == (8, 3, 32, 32) and v.dtype == torch.float32 for v in views)
    assert labels.shape == (8,) and labels.dtype == torch.int64 and 0 <= labels.min() and labels.max() <= 9
    bank, val = dm.val_dataloader()
    assert len(bank.dataset) == len(dm.splits.train) and len(val.dataset) == len(dm.splits.val)
    images, labels = next(iter(val))
    assert images.shape == (8, 3, 32, 32)
    np.testing.assert_array_equal(labels.numpy(), labels_of(dm.splits.val)[:8])


# -- CIFAR --------------------------------------------------------------------------------------------


def write_cifar(path: Path, images: np.ndarray, labels, label_key: str, protocol: int = 2, **extra) -> None:
    """One python-pickle CIFAR batch: 'data' is uint8 (N, 3072), channel-major rows of 32x32; ``extra``
    entries are added to its dict."""
    entry = {
        "batch_label": path.name,
        "data": images.transpose(0, 3, 1, 2).reshape(len(images), 3072),
        label_key: [int(v) for v in labels],
        "filenames": [f"{path.name}_{i}.png" for i in range(len(images))],
    }
    if label_key == "fine_labels":
        entry["coarse_labels"] = [int(v) // 5 for v in labels]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        pickle.dump(entry | extra, handle, protocol=protocol)


def test_cifar10_pixels_labels_splits_and_loaders(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    train_images, train_labels = [], []
    for b in range(1, 6):
        images = rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
        labels = (np.arange(20) + b) % 10
        if b == 3:
            images[7] = pattern(32, 32)
        write_cifar(folder / f"data_batch_{b}", images, labels, "labels")
        train_images.append(images)
        train_labels.append(labels)
    train_images, train_labels = np.concatenate(train_images), np.concatenate(train_labels)
    test_images = rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    test_images[4] = pattern(32, 32, offset=5)
    test_labels = np.array([3, 1, 4, 1, 5, 9, 2, 6, 5, 3])
    write_cifar(folder / "test_batch", test_images, test_labels, "labels")

    dm = CIFAR10DataModule(root=str(tmp_path), val_fraction=0.2, batch_size=10, num_workers=0, download=False)
    dm.setup()
    s = dm.splits
    assert dm.num_classes == 10 and dm.input_spec.shape == (32, 32)
    assert (len(s.train), len(s.val), len(s.test)) == (80, 20, 10)
    assert np.bincount(labels_of(s.val), minlength=10).tolist() == [2] * 10
    raw = s.train.base
    assert raw is s.val.base and len(raw) == 100
    np.testing.assert_array_equal(np.union1d(s.train.indices, s.val.indices), np.arange(100))
    np.testing.assert_array_equal(raw.labels, train_labels)
    # The pattern image written as batch 3, row 7 comes back identical, with its label.
    index = 2 * 20 + 7
    np.testing.assert_array_equal(pixels(raw[index]), pattern(32, 32))
    holder = s.train if index in s.train.indices else s.val
    image, label = split_of(holder, index)
    np.testing.assert_array_equal(np.asarray(image), pattern(32, 32))
    assert label == train_labels[index] == (7 + 3) % 10
    for i in range(10):
        np.testing.assert_array_equal(pixels(s.test[i]), test_images[i])
        assert s.test[i][1] == test_labels[i]
    # Evaluation loader: un-augmented, normalized tensors of the same pixels.
    images, labels = next(iter(dm.test_dataloader()))
    assert images.shape == (10, 3, 32, 32)
    np.testing.assert_array_equal(labels.numpy(), test_labels)
    expected = normalized(test_images[4], dm.mean, dm.std).permute(2, 0, 1)
    torch.testing.assert_close(images[4], expected, atol=1e-5, rtol=0)
    views, labels = next(iter(dm.train_dataloader()))
    assert len(views) == 2 and all(v.shape == (10, 3, 32, 32) for v in views) and labels.shape == (10,)


@pytest.mark.parametrize("protocol", [2, 5])
def test_a_crafted_cifar_batch_is_refused_without_running_its_code(tmp_path, protocol):
    """CIFAR's batches are pickles: the reader looks up numpy's array constructors and nothing else,
    so a batch whose pickle calls a function fails, naming the file, and the function never runs.
    Real batches (protocol 2, as the official files) and protocol 5 (numpy's out-of-band arrays) read."""
    from ssl_kit.data.image import _read_cifar_batch

    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    write_cifar(tmp_path / "data_batch_1", images, [1, 2, 3], "labels", protocol)
    read, labels = _read_cifar_batch(tmp_path / "data_batch_1", "labels")
    np.testing.assert_array_equal(read, images)
    assert labels.tolist() == [1, 2, 3]

    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    write_cifar(tmp_path / "data_batch_2", images, [1, 2, 3], "labels", protocol, batch_label=Payload())
    with pytest.raises(ValueError, match=r"cannot read CIFAR batch file .*data_batch_2: refusing to load "):
        _read_cifar_batch(tmp_path / "data_batch_2", "labels")
    assert not marker.exists()
    pickle.loads((tmp_path / "data_batch_2").read_bytes())  # the payload is real: a plain unpickling runs it
    assert marker.exists()


def test_cifar100_fine_labels(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-100-python"
    labels = np.repeat([0, 5, 42, 99], 5)
    images = rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    images[13] = pattern(32, 32, offset=9)
    write_cifar(folder / "train", images, labels, "fine_labels")
    test_labels = np.array([99, 0, 17, 42, 5, 63])
    test_images = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    write_cifar(folder / "test", test_images, test_labels, "fine_labels")

    dm = CIFAR100DataModule(root=str(tmp_path), val_fraction=0.2, num_workers=0, download=False)
    dm.setup()
    s = dm.splits
    assert dm.num_classes == 100
    assert (len(s.train), len(s.val), len(s.test)) == (16, 4, 6)
    assert sorted(labels_of(s.val).tolist()) == [0, 5, 42, 99]
    np.testing.assert_array_equal(s.train.base.labels, labels)
    np.testing.assert_array_equal(pixels(s.train.base[13]), pattern(32, 32, offset=9))
    assert s.train.base[13][1] == 42
    np.testing.assert_array_equal(s.test.labels, test_labels)
    np.testing.assert_array_equal(pixels(s.test[2]), test_images[2])


def test_cifar_corrupt_batch_names_file(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    images = np.zeros((10, 32, 32, 3), dtype=np.uint8)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        write_cifar(folder / name, images, np.arange(10), "labels")
    bad = folder / "data_batch_4"
    bad.write_bytes(bad.read_bytes()[:500])
    dm = CIFAR10DataModule(root=str(tmp_path), num_workers=0, download=False)
    with pytest.raises(ValueError, match=re.escape(str(bad))):
        dm.setup()


# -- MNIST (idx files) ----------------------------------------------------------------------------


def idx_bytes(array: np.ndarray) -> bytes:
    """An idx file: magic 0x0000 0x08 ndim (2051 for images, 2049 for labels), big-endian dims, data."""
    magic = 0x0800 | array.ndim
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_mnist(folder: Path, gz: bool, train_count: int = 50) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(2)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (train_count, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(train_count) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (10, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": np.array([7, 2, 1, 0, 4, 1, 4, 9, 5, 9], dtype=np.uint8),
    }
    arrays["train-images-idx3-ubyte"][23] = pattern(28, 28)[:, :, 0]
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        data = idx_bytes(array)
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    return arrays


def test_idx_header_magic_numbers():
    assert int.from_bytes(idx_bytes(np.zeros((2, 28, 28)))[:4], "big") == 2051
    assert int.from_bytes(idx_bytes(np.zeros(2))[:4], "big") == 2049


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
@pytest.mark.parametrize("layout", ["root", "MNIST/raw"])
def test_mnist_idx_round_trip(tmp_path, gz, layout):
    folder = tmp_path if layout == "root" else tmp_path / "MNIST" / "raw"
    arrays = write_mnist(folder, gz)
    dm = MNISTDataModule(root=str(tmp_path), val_fraction=0.2, num_workers=0, download=False)
    dm.setup()
    s = dm.splits
    assert dm.num_classes == 10 and dm.input_spec.shape == (28, 28)
    assert (len(s.train), len(s.val), len(s.test)) == (40, 10, 10)
    assert s.pretrain is s.train
    assert sorted(labels_of(s.val).tolist()) == list(range(10))
    raw = s.train.base
    np.testing.assert_array_equal(raw.images, arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(raw.labels, arrays["train-labels-idx1-ubyte"])
    grey = pattern(28, 28)[:, :, 0]
    np.testing.assert_array_equal(pixels(raw[23]), np.repeat(grey[:, :, None], 3, axis=2))
    holder = s.train if 23 in s.train.indices else s.val
    image, label = split_of(holder, 23)
    np.testing.assert_array_equal(np.asarray(image)[:, :, 1], grey)
    assert label == 3
    for i in (0, 7):
        np.testing.assert_array_equal(pixels(s.test[i])[:, :, 2], arrays["t10k-images-idx3-ubyte"][i])
    np.testing.assert_array_equal(s.test.labels, [7, 2, 1, 0, 4, 1, 4, 9, 5, 9])


@pytest.mark.parametrize("damage", ["body", "header", "gzip"])
def test_mnist_truncated_idx_names_file(tmp_path, damage):
    write_mnist(tmp_path, gz=damage == "gzip")
    name = "train-images-idx3-ubyte" + (".gz" if damage == "gzip" else "")
    path = tmp_path / name
    data = path.read_bytes()
    cut = {"body": len(data) - 784, "header": 10, "gzip": len(data) // 2}[damage]
    path.write_bytes(data[:cut])
    with pytest.raises(ValueError, match=re.escape(str(path))) as caught:
        read_idx(path)
    assert "truncated" in str(caught.value)
    dm = MNISTDataModule(root=str(tmp_path), num_workers=0, download=False)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        dm.setup()


def test_mnist_missing_files_without_download(tmp_path):
    (tmp_path / "train-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros((1, 28, 28))))
    dm = MNISTDataModule(root=str(tmp_path), num_workers=0, download=False)
    with pytest.raises(FileNotFoundError) as caught:
        dm.setup()
    message = str(caught.value)
    assert str(tmp_path) in message and str(tmp_path / "MNIST" / "raw") in message
    for name in MNISTDataModule.files:
        assert name in message


def test_mnist_real_dataset():
    if not (REAL_MNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"real MNIST idx files not found in {REAL_MNIST}")
    dm = MNISTDataModule(root=str(REAL_MNIST), num_workers=0, download=False)
    dm.setup()
    s = dm.splits
    train_labels = s.train.base.labels
    assert len(s.train.base) == 60000 and len(s.test) == 10000
    expected_val = sum(round(0.1 * n) for n in np.bincount(train_labels))
    assert len(s.val) == expected_val and abs(expected_val - 6000) <= 10
    assert len(s.train) == 60000 - expected_val
    assert np.bincount(s.test.labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert train_labels[0] == 5 and s.test.labels[0] == 7
    images = s.train.base.images
    assert images.shape == (60000, 28, 28) and images.dtype == np.uint8
    mean = images.mean(dtype=np.float64)
    assert mean == pytest.approx(33.318, abs=0.01)
    assert mean / 255 == pytest.approx(0.1307, abs=1e-4)
    assert images[s.train.indices].mean(dtype=np.float64) == pytest.approx(mean, abs=0.2)


# -- STL-10 ---------------------------------------------------------------------------------------


def stl_bytes(images: np.ndarray) -> bytes:
    """STL-10 binary: each image is 3x96x96 uint8, channel after channel, each channel column-major."""
    return np.ascontiguousarray(images.transpose(0, 3, 2, 1)).tobytes()


def write_stl10(root: Path) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(4)
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    train = rng.integers(0, 256, (20, 96, 96, 3), dtype=np.uint8)
    train[6] = pattern(96, 96)
    train_y = (np.arange(20) % 10 + 1).astype(np.uint8)
    test = rng.integers(0, 256, (5, 96, 96, 3), dtype=np.uint8)
    test_y = np.array([10, 1, 5, 3, 10], dtype=np.uint8)
    pool = rng.integers(0, 256, (7, 96, 96, 3), dtype=np.uint8)
    pool[2] = pattern(96, 96, offset=100)
    (folder / "train_X.bin").write_bytes(stl_bytes(train))
    (folder / "train_y.bin").write_bytes(train_y.tobytes())
    (folder / "test_X.bin").write_bytes(stl_bytes(test))
    (folder / "test_y.bin").write_bytes(test_y.tobytes())
    (folder / "unlabeled_X.bin").write_bytes(stl_bytes(pool))
    return {"train": train, "train_y": train_y, "test": test, "test_y": test_y, "pool": pool}


def test_stl10_orientation_labels_and_unlabeled_pretrain(tmp_path):
    data = write_stl10(tmp_path)
    dm = STL10DataModule(root=str(tmp_path), val_fraction=0.5, image_size=32, batch_size=17, num_workers=0, download=False)
    dm.setup()
    s = dm.splits
    assert dm.num_classes == 10
    assert (len(s.train), len(s.val), len(s.test), len(s.pretrain)) == (10, 10, 5, 17)
    raw = s.train.base
    np.testing.assert_array_equal(raw.labels, data["train_y"].astype(np.int64) - 1)
    np.testing.assert_array_equal(pixels(raw[6]), pattern(96, 96))  # not transposed or flipped
    assert raw[6][1] == 6
    np.testing.assert_array_equal(s.test.labels, [9, 0, 4, 2, 9])
    np.testing.assert_array_equal(pixels(s.test[3]), data["test"][3])
    assert sorted(labels_of(s.train).tolist()) == list(range(10))
    # pretrain = kept labeled train samples, then every unlabeled sample with label -1.
    pretrain_labels = labels_of(s.pretrain)
    np.testing.assert_array_equal(pretrain_labels[:10], labels_of(s.train))
    np.testing.assert_array_equal(pretrain_labels[10:], [-1] * 7)
    image, label = s.pretrain[10 + 2]
    assert label == -1
    np.testing.assert_array_equal(np.asarray(image), pattern(96, 96, offset=100))
    views, labels = next(iter(dm.train_dataloader()))
    assert len(views) == 2 and all(v.shape == (17, 3, 32, 32) for v in views)
    assert sorted(labels.tolist()) == sorted(pretrain_labels.tolist())
    assert (labels == -1).sum() == 7

    only_pool = STL10DataModule(
        root=str(tmp_path), val_fraction=0.5, pretrain_with_train=False, num_workers=0, download=False
    )
    only_pool.setup()
    assert len(only_pool.splits.pretrain) == 7
    assert labels_of(only_pool.splits.pretrain).tolist() == [-1] * 7


@pytest.mark.parametrize("size", [0, 3 * 96 * 96 + 5])
def test_stl10_truncated_file_names_file(tmp_path, size):
    write_stl10(tmp_path)
    bad = tmp_path / "stl10_binary" / "unlabeled_X.bin"
    bad.write_bytes(bad.read_bytes()[:size])
    dm = STL10DataModule(root=str(tmp_path), num_workers=0, download=False)
    with pytest.raises(ValueError, match=re.escape(str(bad)) + ".*truncated"):
        dm.setup()


# -- download failures ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("module", "torchvision_name", "expected"),
    [
        (CIFAR10DataModule, "CIFAR10", "cifar-10-batches-py"),
        (CIFAR100DataModule, "CIFAR100", "cifar-100-python"),
        (MNISTDataModule, "MNIST", "train-images-idx3-ubyte"),
        (STL10DataModule, "STL10", "stl10_binary"),
    ],
)
def test_failed_download_says_what_and_where(tmp_path, monkeypatch, caplog, module, torchvision_name, expected):
    import torchvision.datasets

    calls = []

    def offline(root, *args, **kwargs):
        calls.append((root, kwargs))
        raise RuntimeError("network is unreachable")

    monkeypatch.setattr(torchvision.datasets, torchvision_name, offline)
    dm = module(root=str(tmp_path), num_workers=0, download=True)
    with caplog.at_level(logging.WARNING), pytest.raises(FileNotFoundError) as caught:
        dm.setup()
    assert len(calls) == 1 and calls[0][0] == str(tmp_path) and calls[0][1].get("download") is True
    message = str(caught.value)
    assert f"torchvision.datasets.{torchvision_name}(root, download=True)" in message
    assert str(tmp_path) in message and expected in message
    assert any("download failed" in r.getMessage() and "network is unreachable" in r.getMessage() for r in caplog.records)


# -- ImageFolder ----------------------------------------------------------------------------------

COLORS = {"bird": (200, 30, 60), "cat": (10, 250, 120), "dog": (90, 90, 255)}


def write_folder(directory: Path, per_class: int, size=(24, 20)) -> list[Path]:
    paths = []
    for name, color in COLORS.items():
        (directory / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            path = directory / name / f"{name}_{i}.png"
            Image.new("RGB", size, color).save(path)
            paths.append(path)
    return paths


def solid(color, size: int, dm) -> torch.Tensor:
    return normalized(color, dm.mean, dm.std).view(3, 1, 1).expand(3, size, size)


def test_imagefolder_without_val_holds_out_val(tmp_path):
    write_folder(tmp_path / "train", per_class=4)
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "train" / ".cache").mkdir()
    dm = ImageFolderDataModule(
        str(tmp_path), image_size=16, val_fraction=0.25, batch_size=4, num_workers=0, knn_bank_size=5
    )
    assert dm.classes == ["bird", "cat", "dog"] and dm.num_classes == 3
    dm.setup()
    s = dm.splits
    assert (len(s.train), len(s.val)) == (9, 3) and s.test is None
    assert sorted(labels_of(s.val).tolist()) == [0, 1, 2]
    assert np.bincount(labels_of(s.train)).tolist() == [3, 3, 3]
    for i in range(len(s.train)):
        image, label = s.train[i]
        assert image.size == (24, 20)
        assert np.asarray(image)[0, 0].tolist() == list(COLORS[dm.classes[label]])

    views, labels = next(iter(dm.train_dataloader()))
    assert isinstance(views, list) and len(views) == 2
    assert all(v.shape == (4, 3, 16, 16) and v.dtype == torch.float32 for v in views)
    assert labels.shape == (4,) and set(labels.tolist()) <= {0, 1, 2}

    bank, val = dm.val_dataloader()
    assert len(bank.dataset) == 5 and len(val.dataset) == 3
    bank_images, bank_labels = next(iter(bank))
    assert bank_images.shape == (4, 3, 16, 16) and bank_labels.shape == (4,)
    images, labels = next(iter(val))
    assert images.shape == (3, 3, 16, 16)
    assert sorted(labels.tolist()) == [0, 1, 2]
    for image, label in zip(images, labels):
        torch.testing.assert_close(image, solid(COLORS[dm.classes[label]], 16, dm), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="no test split"):
        dm.test_dataloader()


def test_imagefolder_with_val_and_test(tmp_path):
    write_folder(tmp_path / "train", per_class=3)
    write_folder(tmp_path / "val", per_class=2)
    (tmp_path / "test" / "dog").mkdir(parents=True)
    Image.new("RGB", (30, 30), COLORS["dog"]).save(tmp_path / "test" / "dog" / "d.png")
    dm = ImageFolderDataModule(str(tmp_path), image_size=16, batch_size=6, num_workers=0)
    dm.setup()
    s = dm.splits
    assert dm.num_classes == 3
    assert (len(s.train), len(s.val), len(s.test)) == (9, 6, 1)
    assert s.pretrain is s.train
    assert labels_of(s.val).tolist() == [0, 0, 1, 1, 2, 2]
    assert labels_of(s.test).tolist() == [2]  # remapped to train's class index, not test's own
    bank, val = dm.val_dataloader()
    images, labels = next(iter(val))
    assert images.shape == (6, 3, 16, 16) and labels.tolist() == [0, 0, 1, 1, 2, 2]
    images, labels = next(iter(dm.test_dataloader()))
    assert images.shape == (1, 3, 16, 16) and labels.tolist() == [2]
    torch.testing.assert_close(images[0], solid(COLORS["dog"], 16, dm), atol=1e-4, rtol=0)


def test_imagefolder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "train"))):
        ImageFolderDataModule(str(tmp_path), num_workers=0)
    write_folder(tmp_path / "train", per_class=2)
    (tmp_path / "val" / "zebra").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "val" / "zebra" / "z.png")
    dm = ImageFolderDataModule(str(tmp_path), num_workers=0)
    with pytest.raises(ValueError, match="classes not in train/: zebra"):
        dm.setup()


def sources_of(dataset) -> list:
    """The file behind every sample of a split (through ``Transformed`` index views)."""
    if hasattr(dataset, "samples"):
        return [source for source, _ in dataset.samples]
    base = sources_of(dataset.base)
    return [base[i] for i in dataset.indices]


def test_test_fraction_carves_a_fixed_stratified_test_split_out_of_train(tmp_path):
    """A folder without test/: ``test_fraction`` of every class becomes the test set, the same
    for every ``--data.seed`` (only the validation holdout moves), disjoint from pretraining,
    training and validation; a folder with its own test/ refuses the option."""
    write_folder(tmp_path / "train", per_class=10)

    def splits(seed: int):
        dm = ImageFolderDataModule(str(tmp_path), image_size=16, num_workers=0, test_fraction=0.2, val_fraction=0.25, seed=seed)
        dm.setup()
        return dm.splits

    first, second = splits(0), splits(1)
    assert np.bincount(labels_of(first.test)).tolist() == [2, 2, 2]
    assert (len(first.train), len(first.val)) == (18, 6)  # 30 - 6 test, then a quarter of the rest
    assert sources_of(first.test) == sources_of(second.test)
    assert sources_of(first.val) != sources_of(second.val)
    for s in (first, second):
        test = set(sources_of(s.test))
        assert not test & (set(sources_of(s.pretrain)) | set(sources_of(s.train)) | set(sources_of(s.val)))
        assert len(test | set(sources_of(s.train)) | set(sources_of(s.val))) == 30
    write_folder(tmp_path / "test", per_class=1)
    with pytest.raises(ValueError, match="has its own test split"):
        splits(0)
    with pytest.raises(ValueError, match="test_fraction must be in"):
        ImageFolderDataModule(str(tmp_path), num_workers=0, test_fraction=1.0)


@pytest.mark.parametrize("damage", ["random-bytes", "truncated-png"])
def test_imagefolder_bad_file(tmp_path, caplog, damage):
    write_folder(tmp_path / "train", per_class=3)
    write_folder(tmp_path / "val", per_class=1)
    bad = tmp_path / "train" / "cat" / "cat_1.png"
    if damage == "random-bytes":
        bad.write_bytes(np.random.default_rng(5).bytes(400))
    else:
        Image.fromarray(np.random.default_rng(5).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(bad)
        bad.write_bytes(bad.read_bytes()[:1500])

    strict = ImageFolderDataModule(str(tmp_path), image_size=16, batch_size=9, num_workers=0)
    with pytest.raises(UnreadableFileError, match=re.escape(str(bad))) as caught:
        next(iter(strict.labeled_dataloader("train")))
    assert "skip_bad_files" in str(caught.value)
    with pytest.raises(UnreadableFileError, match=re.escape(str(bad))):
        next(iter(strict.train_dataloader()))

    lenient = ImageFolderDataModule(str(tmp_path), image_size=16, batch_size=9, num_workers=0, skip_bad_files=True)
    with caplog.at_level(logging.WARNING, logger="ssl_kit"):
        images, labels = next(iter(lenient.labeled_dataloader("train")))
    # the batch keeps its size (DDP ranks stay in step): the cat at position 4 is replaced by a
    # copy of the 5th readable sample of the batch, the second cat
    assert images.shape == (9, 3, 16, 16)
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert torch.equal(images[4], images[5])
    assert any(str(bad) in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ssl_kit"):
        views, labels = next(iter(lenient.train_dataloader()))
    assert len(views) == 2 and all(v.shape == (9, 3, 16, 16) for v in views)
    assert sorted(labels.tolist()) in ([0, 0, 0, 1, 1, 1, 2, 2, 2], [0, 0, 0, 0, 1, 1, 2, 2, 2], [0, 0, 0, 1, 1, 2, 2, 2, 2])
    assert any(str(bad) in r.getMessage() for r in caplog.records)


def test_a_batch_of_only_unreadable_files_is_filled_from_the_first_readable_one(tmp_path):
    """With skip_bad_files, a loader whose first batch has no readable file still yields a full
    batch (copies of the dataset's first readable sample), so no step ever sees an empty batch; a
    dataset with no readable file at all says so."""
    write_folder(tmp_path / "train", per_class=2)
    write_folder(tmp_path / "val", per_class=1)
    data = ImageFolderDataModule(str(tmp_path), image_size=16, batch_size=2, num_workers=0, skip_bad_files=True)
    data.setup()
    files = [Path(source) for source in sources_of(data.splits.train)]
    for path in files[:2]:  # the whole first batch
        path.write_bytes(b"not an image")
    images, labels = next(iter(data.labeled_dataloader("train")))
    assert images.shape == (2, 3, 16, 16) and torch.equal(images[0], images[1])
    # a loader's own collate (lightly's I-JEPA mask collator) gets the refilled, full batch
    seen = []
    loader = data.loader(data.labeled_dataset("train"), shuffle=False, collate=lambda batch: seen.append(len(batch)) or len(batch))
    assert next(iter(loader)) == 2 and seen == [2]
    for path in files[2:]:
        path.write_bytes(b"not an image")
    with pytest.raises(UnreadableFileError, match="no file of the dataset"):
        next(iter(data.labeled_dataloader("train")))


def test_train_and_eval_subsets_are_fixed_and_stratified():
    from ssl_kit.data.datasets import labels_of

    def sizes_and_labels(**kwargs):
        data = DigitsDataModule(image_size=8, train_subset=300, eval_subset=100, **kwargs)
        data.setup()
        splits = data.splits
        return [len(s) for s in (splits.pretrain, splits.train, splits.val, splits.test)], [labels_of(s) for s in (splits.train, splits.test)]

    sizes, (train, test) = sizes_and_labels()
    assert sizes[0] == sizes[1] and abs(sizes[1] - 300) <= 10 and abs(sizes[2] - 100) <= 10 and abs(sizes[3] - 100) <= 10
    assert np.bincount(train).min() >= 25 and np.bincount(test).min() >= 8  # every class, in proportion
    again_sizes, (again_train, again_test) = sizes_and_labels()
    assert again_sizes == sizes and np.array_equal(again_train, train) and np.array_equal(again_test, test)
