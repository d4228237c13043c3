"""Frozen features: one extraction path for every evaluation. ``extract`` runs a network over a
loader in one process; ``extract_datasets`` runs it through a Lightning Trainer, so it uses the
devices, strategy and nodes of the pretraining (DDP included) and every rank ends with the same
complete feature set."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import lightning as L
import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset


@dataclass
class FeatureSet:
    """Frozen features of one split, in the split's order (dataset index i is row i)."""

    features: Tensor  # (N, D) float32, CPU
    labels: Tensor  # (N,) int64

    def __post_init__(self) -> None:
        if self.features.ndim != 2 or len(self.features) != len(self.labels):
            raise ValueError(f"features {tuple(self.features.shape)} and labels {tuple(self.labels.shape)} do not pair up")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: Sequence[int] | np.ndarray) -> FeatureSet:
        rows = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        return FeatureSet(self.features[rows], self.labels[rows])


def top1(logits: Tensor, labels: Tensor) -> float:
    return (logits.argmax(-1) == labels).float().mean().item()


@torch.no_grad()
def extract(backbone: nn.Module, loader) -> FeatureSet:
    """Outputs and labels of every batch of an un-shuffled, un-augmented loader, with the network
    in eval mode on its device (restored after), in one process; ``extract_datasets`` does the
    same across DDP ranks. Used by the online monitors' tests, the harness and Noisy Student."""
    was_training = backbone.training
    backbone.eval()
    device = next(backbone.parameters()).device
    features, labels = [], []
    for images, targets in loader:
        features.append(backbone(images.to(device)).float().cpu())
        labels.append(targets)
    backbone.train(was_training)
    return FeatureSet(torch.cat(features), torch.cat(labels).long())


class Indexed(Dataset):
    """``(index, sample)``: under a ``DistributedSampler`` each rank sees a padded shard, and the
    indices let the gathered features be put back in dataset order without the padding."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, Any] | None:
        item = self.dataset[index]
        return None if item is None else (index, item)  # None: a skipped bad file (skip_bad_files)


class FeatureExtractor(L.LightningModule):
    """Runs a frozen backbone over a loader (``trainer.test``) and all-gathers the features."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.parts: list[tuple[Tensor, Tensor, Tensor]] = []
        self.result: FeatureSet | None = None

    def on_test_epoch_start(self) -> None:
        self.parts.clear()

    def test_step(self, batch: tuple[Tensor, tuple[Tensor, Tensor]], batch_idx: int) -> None:
        indices, (inputs, labels) = batch
        self.parts.append((indices, self.backbone(inputs).float(), labels))

    def on_test_epoch_end(self) -> None:
        indices, features, labels = (torch.cat(part) for part in zip(*self.parts))
        if self.trainer.world_size > 1:
            indices, features, labels = (self.all_gather(t).flatten(0, 1) for t in (indices, features, labels))
        order = indices.argsort(stable=True)
        indices, features, labels = indices[order], features[order], labels[order]
        first = torch.ones_like(indices, dtype=torch.bool)
        first[1:] = indices[1:] != indices[:-1]  # the sampler's padding repeats a few samples
        self.result = FeatureSet(features[first].cpu(), labels[first].cpu())
        self.parts.clear()


def extract_datasets(
    backbone: nn.Module, datamodule, datasets: dict[str, Dataset], trainer_kwargs: dict[str, Any]
) -> dict[str, FeatureSet]:
    """Features of each ``(input, label)`` dataset, through the DataModule's loaders (workers,
    pinning, bad-file collation), complete and in dataset order on every rank."""
    extractor = FeatureExtractor(backbone)
    trainer = L.Trainer(
        **trainer_kwargs, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    features = {}
    for name, dataset in datasets.items():
        trainer.test(extractor, datamodule.loader(Indexed(dataset), shuffle=False), verbose=False)
        assert extractor.result is not None
        features[name] = extractor.result
    return features


def extract_splits(backbone: nn.Module, datamodule, splits: list[str], trainer_kwargs: dict[str, Any]) -> dict[str, FeatureSet]:
    """Features of the un-augmented ``splits`` ("train", "val", "test") of an ``SSLDataModule``."""
    return extract_datasets(backbone, datamodule, {split: datamodule.labeled_dataset(split) for split in splits}, trainer_kwargs)
