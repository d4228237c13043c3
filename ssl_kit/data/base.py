"""Base DataModule: pretraining views plus un-augmented labeled loaders for evaluation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader, Dataset

from ssl_kit.data.cache import DecodedCache
from ssl_kit.data.datasets import FileImages, RefillingCollate, SkippedFiles, Transformed, WithTargets, labels_of
from ssl_kit.data.samples import Samples
from ssl_kit.data.semi_supervised import FewLabelSplit, PseudoLabeledPool, SemiSupervisedBatch
from ssl_kit.data.splits import TEST_CARVE_SEED, stratified_split, subsample
from ssl_kit.inputs import InputSpec
from ssl_kit.transforms import ImageViews, ViewAugmentation, eval_transform


@dataclass
class Splits:
    """Raw ``(image, label)`` datasets. ``pretrain`` may hold unlabeled samples (label -1)."""

    pretrain: Dataset
    train: Dataset
    val: Dataset
    test: Dataset | None = None


class SSLDataModule(L.LightningDataModule):
    """Serves the pretraining loader (a list of views per sample) and labeled evaluation loaders.

    Subclasses set ``num_classes``, ``mean``, ``std`` and ``default_image_size`` and implement
    ``load_splits``; ``input_spec`` (``describe_input``: images of side ``image_size`` here, clips
    and spectrograms in the video and audio bases) is what the views and the model are built for.
    ``val_fraction`` (None: the dataset's default) is held out of the training set where the dataset
    has no official validation split. The validation loaders are ``[kNN bank, val]``: a seeded
    subset of the labeled training set (un-augmented) and the validation set. Batches are
    ``(inputs, labels)``.

    Semi-supervised mode (``labels_per_class`` or ``label_fraction``): a class-balanced, seeded
    few-label split of the training set (``few_label``, a ``FewLabelSplit``, written to
    ``<log dir>/few_label_split.json``); training batches are ``SemiSupervisedBatch``es with
    ``unlabeled_ratio`` times more unlabeled samples than labeled ones, the labeled loader cycled;
    the kNN bank is the labeled subset. The hidden labels of the unlabeled pool are only for
    monitoring (pseudo-label accuracy). ``set_pseudo_labels`` swaps the pool for one a previous
    model labeled (``pseudo_pool``).

    ``train_subset`` / ``eval_subset``: fixed, stratified subsets of the splits (see ``subsets``).

    ``cache_dir`` (file-based DataModules): decoded samples (images, resampled waveforms, video
    frames) are kept there after their first read and memory-mapped back (``DecodedCache``).

    ``test_fraction`` (folder DataModules): where the data has no test split, that share of every
    class of train becomes the test set (``carve_test``), fixed whatever ``seed`` is.

    Loaders: ``pin_memory`` (used only when CUDA is available) lets batches cross to the GPU
    asynchronously; ``persistent_workers`` keeps worker processes alive between epochs and loaders
    instead of restarting them (and re-pickling the dataset) each time.
    """

    num_classes: int
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    default_image_size: int = 224
    center_crop_ratio: float = 1.0
    default_val_fraction: float = 0.1
    #: Inputs per test sample, scored together (multi-view testing: ``VideoDataModule``'s clips x crops).
    test_views: int = 1

    def __init__(
        self,
        root: str | None = None,
        batch_size: int = 256,
        num_workers: int = 4,
        image_size: int | tuple[int, int] | None = None,
        views: ViewAugmentation | None = None,
        val_fraction: float | None = None,
        seed: int = 0,
        knn_bank_size: int = 10000,
        skip_bad_files: bool = False,
        download: bool = True,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        labels_per_class: int | None = None,
        label_fraction: float | None = None,
        unlabeled_ratio: int = 7,
        train_subset: int | None = None,
        eval_subset: int | None = None,
        test_fraction: float | None = None,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.root = root
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.image_size = image_size
        self.input_spec = self.describe_input()
        self.views = views if views is not None else ImageViews()
        self.configure_views()
        self.val_fraction = self.default_val_fraction if val_fraction is None else val_fraction
        self.seed = seed
        self.knn_bank_size = knn_bank_size
        self.skip_bad_files = skip_bad_files
        self.skipped_files = SkippedFiles() if skip_bad_files else None
        self.download = download
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.labels_per_class = labels_per_class
        self.label_fraction = label_fraction
        self.unlabeled_ratio = unlabeled_ratio
        self.train_subset = train_subset
        self.eval_subset = eval_subset
        if test_fraction is not None and not 0.0 < test_fraction < 1.0:
            raise ValueError(f"--data.test_fraction must be in (0, 1), got {test_fraction}")
        self.test_fraction = test_fraction
        self.decoded_cache = DecodedCache(cache_dir) if cache_dir else None
        self.splits: Splits | None = None
        self.few_label: FewLabelSplit | None = None
        self.pseudo_pool: PseudoLabeledPool | None = None

    @property
    def semi_supervised(self) -> bool:
        return self.labels_per_class is not None or self.label_fraction is not None

    def describe_input(self) -> InputSpec:
        """What one sample is to the model: here an image of side (or ``(height, width)``)
        ``image_size``, by default the dataset's ``default_image_size``."""
        return InputSpec.image(self.image_size or self.default_image_size, self.mean, self.std)

    def configure_views(self) -> None:
        """Gives the views the description of the input."""
        self.views.configure(self.input_spec)

    def load_splits(self) -> Splits:
        """Reads the dataset and returns its raw splits."""
        raise NotImplementedError

    def files(self, samples: Samples) -> Dataset:
        """The dataset that reads a list of ``(file, label)`` samples, with bad-file skipping and the
        decoded cache: images here; the audio and video bases read their own media."""
        return FileImages(samples, self.skipped_files, self.decoded_cache)

    def sample_splits(self, train: Samples, val: Samples | None, test: Samples | None) -> Splits:
        """``Splits`` of sample lists read by ``files``; without ``val`` a seeded, stratified
        ``val_fraction`` of train is held out."""
        train_set = self.files(train)
        if val is None:
            train_set, val_set = self.holdout_val(train_set)
        else:
            val_set = self.files(val)
        return Splits(pretrain=train_set, train=train_set, val=val_set, test=None if test is None else self.files(test))

    def fixed_test_splits(self, make: Callable[[Any, np.ndarray], Dataset], data: Any, labels: np.ndarray, test_seed: int) -> Splits:
        """Splits of an in-memory dataset without official ones (``make(data, labels)`` builds a
        dataset of rows): a fixed 20% of every class is the test set, drawn with the dataset's own
        ``test_seed`` (never ``seed``), then a seeded ``val_fraction`` of the rest is held out."""
        rest, test = stratified_split(labels, 0.2, test_seed)
        train, val = self.holdout_val(make(data[rest], labels[rest]))
        return Splits(pretrain=train, train=train, val=val, test=make(data[test], labels[test]))

    def carve_test(self, train: Samples, test: Samples | None) -> tuple[Samples, Samples | None]:
        """``(train, test)`` sample lists: without a test split and with ``test_fraction``, that
        share of every class of ``train`` becomes the test set, drawn with a constant seed
        (``TEST_CARVE_SEED``, never ``seed``) before the validation holdout, so it is fixed across
        runs and no pretraining, training or model selection sees it."""
        if self.test_fraction is None:
            return train, test
        if test is not None:
            raise ValueError(f"--data.test_fraction carves a test split out of train, but {self.root} has its own test split")
        kept, held = stratified_split(np.array([label for _, label in train]), self.test_fraction, TEST_CARVE_SEED)
        return [train[i] for i in kept], [train[i] for i in held]

    def holdout_val(self, train: Dataset) -> tuple[Dataset, Dataset]:
        """Seeded class-stratified train/val split for datasets without an official val set."""
        kept, held = stratified_split(labels_of(train), self.val_fraction, self.seed)
        if len(held) == 0:
            raise ValueError(f"val_fraction={self.val_fraction} leaves no validation samples")
        return Transformed(train, indices=kept), Transformed(train, indices=held)

    def subsets(self, splits: Splits) -> Splits:
        """Class-stratified subsets of ``train_subset`` training samples and of ``eval_subset``
        validation and test samples each (seeded by ``seed``, so fixed across runs), for quick runs
        and CPU benchmarks. A separate pretraining set (e.g. STL-10's unlabeled images) is cut to
        ``train_subset`` too."""

        def cut(dataset: Dataset | None, size: int | None) -> Dataset | None:
            if dataset is None or size is None or size >= len(dataset):
                return dataset
            labels = labels_of(dataset)
            if (labels < 0).any():
                return Transformed(dataset, indices=subsample(len(dataset), size, self.seed))
            _, chosen = stratified_split(labels, size / len(dataset), self.seed)
            return Transformed(dataset, indices=chosen)

        train = cut(splits.train, self.train_subset)
        pretrain = train if splits.pretrain is splits.train else cut(splits.pretrain, self.train_subset)
        return Splits(pretrain=pretrain, train=train, val=cut(splits.val, self.eval_subset), test=cut(splits.test, self.eval_subset))

    def setup(self, stage: str | None = None) -> None:
        if self.splits is None:
            self.splits = self.subsets(self.load_splits())
        if not self.semi_supervised:
            return
        labels = labels_of(self.splits.train)
        if self.few_label is None:
            self.few_label = FewLabelSplit.draw(labels, self.labels_per_class, self.label_fraction, self.seed)
        if self.trainer is not None and self.trainer.is_global_zero:  # every run that uses the split records it
            self.few_label.save(
                Path(self.trainer.log_dir or self.trainer.default_root_dir) / "few_label_split.json", labels,
                datamodule=type(self).__name__, root=self.root, seed=self.seed,
                labels_per_class=self.labels_per_class, label_fraction=self.label_fraction,
            )  # fmt: skip

    # -- loaders ---------------------------------------------------------------------------
    @property
    def eval_transform(self):
        return eval_transform(self.input_spec.side, self.mean, self.std, self.center_crop_ratio)

    def loader(
        self, dataset: Dataset, shuffle: bool, drop_last: bool = False, batch_size: int | None = None, collate: Callable[[list], Any] | None = None,
    ) -> DataLoader:  # fmt: skip
        """A DataLoader of ``dataset`` with this DataModule's batch size, workers, pinning and bad-file
        collation, around ``collate`` (None: PyTorch's ``default_collate``)."""
        return DataLoader(
            dataset,
            batch_size=batch_size or self.batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.persistent_workers and self.num_workers > 0,
            collate_fn=RefillingCollate(dataset, collate) if self.skipped_files is not None else collate,
        )

    def _require_splits(self) -> Splits:
        if self.splits is None:
            self.setup()
        assert self.splits is not None
        return self.splits

    def train_dataloader(self) -> DataLoader | CombinedLoader:
        """Pretraining loader: ``(list of views, labels)``; unlabeled samples carry label -1.
        In semi-supervised mode: the labeled and unlabeled loaders combined (see the class doc)."""
        splits = self._require_splits()
        if not self.semi_supervised:
            return self.loader(Transformed(splits.pretrain, self.views), shuffle=True, drop_last=True)
        split, pool = self.few_label, self.pseudo_pool
        labeled = Transformed(splits.train, self.views, split.labeled)
        # each unlabeled item carries its pool position, for statistics kept per sample (FlexMatch)
        if pool is None:
            unlabeled = WithTargets(Transformed(splits.train, self.views, split.unlabeled), np.arange(len(split.unlabeled)))
        else:
            unlabeled = WithTargets(Transformed(splits.train, self.views, pool.indices(split)), pool.selected)
            unlabeled = WithTargets(unlabeled, pool.selected_targets())
        loaders = {
            "labeled": self.loader(labeled, shuffle=True, batch_size=min(self.batch_size, len(labeled))),
            "unlabeled": self.loader(
                unlabeled, shuffle=True, drop_last=True, batch_size=min(self.batch_size * self.unlabeled_ratio, len(unlabeled))
            ),
        }
        return CombinedLoader(loaders, mode="max_size_cycle")

    def labeled_dataset(self, split: str) -> Dataset:
        """``(input, label)`` of ``train``, ``val`` or ``test`` with the evaluation transform."""
        dataset = getattr(self._require_splits(), split)
        if dataset is None:
            raise ValueError(f"{type(self).__name__} has no {split} split")
        return Transformed(dataset, self.eval_transform)

    def labeled_dataloader(self, split: str) -> DataLoader:
        """Un-augmented loader over ``train``, ``val`` or ``test``."""
        return self.loader(self.labeled_dataset(split), shuffle=False)

    def unlabeled_pool_dataloader(self) -> DataLoader:
        """Un-augmented loader over the unlabeled pool, in pool order (for a teacher to label it)."""
        if not self.semi_supervised:
            raise ValueError(f"{type(self).__name__} has no unlabeled pool: set labels_per_class or label_fraction")
        return self.loader(Transformed(self._require_splits().train, self.eval_transform, self.few_label.unlabeled), shuffle=False)

    def set_pseudo_labels(self, targets: torch.Tensor, selected: np.ndarray) -> None:
        """Noisy Student: ``targets`` (pool size x classes) from a teacher, and the pool positions
        to train on (``selected``; a position may repeat, for class balancing). Training batches
        then carry them as ``pool_targets``."""
        self._require_splits()
        self.pseudo_pool = PseudoLabeledPool.of(self.few_label, targets, selected)

    def val_dataloader(self) -> list[DataLoader]:
        splits = self._require_splits()
        if self.semi_supervised:
            bank = self.few_label.labeled
        else:
            bank = subsample(len(splits.train), self.knn_bank_size, self.seed)
        return [
            self.loader(Transformed(splits.train, self.eval_transform, bank), shuffle=False),
            self.labeled_dataloader("val"),
        ]

    def test_dataloader(self) -> DataLoader:
        return self.labeled_dataloader("test")

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.trainer is not None and self.trainer.training and batch is not None:
            if isinstance(batch, dict):
                parts = {name: self.on_after_batch_transfer(part, dataloader_idx) for name, part in batch.items()}
                return SemiSupervisedBatch.from_loaders(parts)
            views, *labels = batch
            batch = (self.views.on_device(views), *labels)
        return batch


def unlabeled(count: int) -> np.ndarray:
    """Label array for unlabeled samples."""
    return np.full(count, -1, dtype=np.int64)
