"""Base DataModule: pretraining views plus un-augmented labeled loaders for evaluation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ssl_kit.data.datasets import Transformed, collate_skipping_bad, labels_of
from ssl_kit.data.splits import stratified_split, subsample
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
    ``load_splits``. ``val_fraction`` (None: the dataset's default) is held out of the training set
    where the dataset has no official validation split. The validation loaders are ``[kNN bank, val]``: a seeded subset of the
    labeled training set (un-augmented) and the validation set. Batches are ``(inputs, labels)``.
    """

    num_classes: int
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    default_image_size: int = 224
    center_crop_ratio: float = 1.0
    default_val_fraction: float = 0.1

    def __init__(
        self,
        root: str | None = None,
        batch_size: int = 256,
        num_workers: int = 4,
        image_size: int | None = None,
        views: ViewAugmentation | None = None,
        val_fraction: float | None = None,
        seed: int = 0,
        knn_bank_size: int = 10000,
        skip_bad_files: bool = False,
        download: bool = True,
        pin_memory: bool = True,
    ) -> None:
        super().__init__()
        self.root = root
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.image_size = image_size or self.default_image_size
        self.views = views if views is not None else ImageViews()
        self.views.configure(self.image_size, self.mean, self.std)
        self.val_fraction = self.default_val_fraction if val_fraction is None else val_fraction
        self.seed = seed
        self.knn_bank_size = knn_bank_size
        self.skip_bad_files = skip_bad_files
        self.download = download
        self.pin_memory = pin_memory
        self.splits: Splits | None = None

    def load_splits(self) -> Splits:
        """Reads the dataset and returns its raw splits."""
        raise NotImplementedError

    def holdout_val(self, train: Dataset) -> tuple[Dataset, Dataset]:
        """Seeded class-stratified train/val split for datasets without an official val set."""
        kept, held = stratified_split(labels_of(train), self.val_fraction, self.seed)
        if len(held) == 0:
            raise ValueError(f"val_fraction={self.val_fraction} leaves no validation samples")
        return Transformed(train, indices=kept), Transformed(train, indices=held)

    def setup(self, stage: str | None = None) -> None:
        if self.splits is None:
            self.splits = self.load_splits()

    # -- loaders ---------------------------------------------------------------------------
    @property
    def eval_transform(self):
        return eval_transform(self.image_size, self.mean, self.std, self.center_crop_ratio)

    def _loader(self, dataset: Dataset, shuffle: bool, drop_last: bool = False) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
            collate_fn=collate_skipping_bad if self.skip_bad_files else None,
        )

    def _require_splits(self) -> Splits:
        if self.splits is None:
            self.setup()
        assert self.splits is not None
        return self.splits

    def train_dataloader(self) -> DataLoader:
        """Pretraining loader: ``(list of views, labels)``; unlabeled samples carry label -1."""
        return self._loader(Transformed(self._require_splits().pretrain, self.views), shuffle=True, drop_last=True)

    def labeled_dataloader(self, split: str) -> DataLoader:
        """Un-augmented loader over ``train``, ``val`` or ``test``."""
        dataset = getattr(self._require_splits(), split)
        if dataset is None:
            raise ValueError(f"{type(self).__name__} has no {split} split")
        return self._loader(Transformed(dataset, self.eval_transform), shuffle=False)

    def val_dataloader(self) -> list[DataLoader]:
        splits = self._require_splits()
        bank = subsample(len(splits.train), self.knn_bank_size, self.seed)
        return [
            self._loader(Transformed(splits.train, self.eval_transform, bank), shuffle=False),
            self.labeled_dataloader("val"),
        ]

    def test_dataloader(self) -> DataLoader:
        return self.labeled_dataloader("test")

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.trainer is not None and self.trainer.training and batch is not None:
            views, labels = batch
            batch = (self.views.on_device(views), labels)
        return batch


def unlabeled(count: int) -> np.ndarray:
    """Label array for unlabeled samples."""
    return np.full(count, -1, dtype=np.int64)
