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
from torchmetrics.functional.classification import multilabel_average_precision

from ssl_kit.models.tokens import patch_tokens


@dataclass
class FeatureSet:
    """Frozen features of one split, in the split's order (dataset index i is row i). Labels are
    class indices, or multi-hot rows for multi-label data (``multi_label``), scored by ``metric``.
    Multi-view testing (``views`` > 1): rows ``i * views`` .. ``i * views + views - 1`` are the
    views of sample i, scored by the mean of their outputs (``score``). Features of every layer of a
    network (``BlockFeatures``, for the weighted-layer probe) are ``(rows, layers, D)``."""

    features: Tensor  # (N * views, D) or (N * views, layers, D) float32, CPU
    labels: Tensor  # (N,) int64 class indices, or (N, C) int64 multi-hot
    views: int = 1

    def __post_init__(self) -> None:
        if self.features.ndim not in (2, 3) or len(self.features) != len(self.labels) * self.views:
            raise ValueError(
                f"features {tuple(self.features.shape)} and labels {tuple(self.labels.shape)} do not pair up ({self.views} view(s) per sample)"
            )

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: Sequence[int] | np.ndarray) -> FeatureSet:
        rows = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        view_rows = (rows.unsqueeze(1) * self.views + torch.arange(self.views)).flatten()
        return FeatureSet(self.features[view_rows], self.labels[rows], self.views)

    def score(self, outputs: Tensor) -> float:
        """``score`` of per-row outputs (logits, kNN votes): with several views, of their mean over
        each sample's views (VideoMAE averages its clips' and crops' scores, never their features)."""
        return score(outputs.view(len(self.labels), self.views, *outputs.shape[1:]).mean(1), self.labels)

    def single_view(self, role: str) -> FeatureSet:
        """These features, refused (naming ``role``) when multi-view: a probe trains and a kNN bank
        votes with one row per sample."""
        if self.views != 1:
            raise ValueError(f"{role} features have {self.views} views per sample; multi-view features are for testing only")
        return self

    @property
    def multi_label(self) -> bool:
        return self.labels.ndim == 2

    @property
    def metric(self) -> str:
        """The name of what ``score`` measures on these labels (a store row's ``metric``)."""
        return "mAP" if self.multi_label else "top1"


def top1(logits: Tensor, labels: Tensor) -> float:
    return (logits.argmax(-1) == labels).float().mean().item()


def mean_average_precision(scores: Tensor, targets: Tensor) -> float:
    """Macro mean average precision of class scores against multi-hot ``targets`` (N, C): the
    average precision of each class (area under its precision-recall steps, as scikit-learn's
    ``average_precision_score``), averaged over the classes, as AudioSet results are reported. A
    class without positives counts as 0, as in scikit-learn."""
    return multilabel_average_precision(scores.float(), targets.long(), num_labels=targets.shape[1], average="macro").item()


def score(outputs: Tensor, labels: Tensor) -> float:
    """What the protocols report: top-1 accuracy for class indices, macro mAP for multi-hot labels."""
    return mean_average_precision(outputs, labels) if labels.ndim == 2 else top1(outputs, labels)


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


def per_view(network: nn.Module, inputs: Tensor, views: int) -> Tensor:
    """``network`` on every view of a batch, one view at a time (the network's batch stays the
    loader's): inputs ``(B, views, ...)``, or ``(B, ...)`` for one view, give ``(B, views, ...)``."""
    if views == 1:
        return network(inputs).unsqueeze(1)
    if inputs.shape[1] != views:
        raise ValueError(f"expected batches of {views} views per sample, got inputs {tuple(inputs.shape)}")
    return torch.stack([network(view) for view in inputs.unbind(1)], 1)


class BlockFeatures(nn.Module):
    """Every transformer block's feature of a ViT (image, spectrogram or video; ``patch_tokens``):
    ``(B, blocks, D)`` in block order, each block's tokens through the backbone's final norm and
    pooling, as DINOv2 reads intermediate layers; the last block's is the backbone's own output.
    The input of the weighted-layer probe (``train_linear_heads`` on 3-D features)."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        try:
            self.tokens = patch_tokens(backbone)
        except TypeError as error:
            raise TypeError(f"the weighted-layer probe reads every transformer block: {error}") from error

    def forward(self, inputs: Tensor) -> Tensor:
        blocks = self.tokens.block_outputs(inputs)
        return torch.stack([self.tokens.pooled(self.backbone.norm(block)) for block in blocks], 1)


class FeatureExtractor(L.LightningModule):
    """Runs a frozen backbone over a loader (``trainer.test``) and all-gathers the features; a
    sample of ``views`` > 1 (multi-view testing) is a stack of views, each run alone (``per_view``)."""

    def __init__(self, backbone: nn.Module, views: int = 1) -> None:
        super().__init__()
        self.backbone = backbone
        self.views = views
        self.parts: list[tuple[Tensor, Tensor, Tensor]] = []
        self.result: FeatureSet | None = None

    def on_test_epoch_start(self) -> None:
        self.parts.clear()

    def test_step(self, batch: tuple[Tensor, tuple[Tensor, Tensor]], batch_idx: int) -> None:
        indices, (inputs, labels) = batch
        self.parts.append((indices, per_view(self.backbone, inputs, self.views).float(), labels))

    def on_test_epoch_end(self) -> None:
        indices, features, labels = (torch.cat(part) for part in zip(*self.parts))
        if self.trainer.world_size > 1:
            indices, features, labels = (self.all_gather(t).flatten(0, 1) for t in (indices, features, labels))
        order = indices.argsort(stable=True)
        indices, features, labels = indices[order], features[order], labels[order]
        first = torch.ones_like(indices, dtype=torch.bool)
        first[1:] = indices[1:] != indices[:-1]  # the sampler's padding repeats a few samples
        self.result = FeatureSet(features[first].flatten(0, 1).cpu(), labels[first].cpu(), self.views)
        self.parts.clear()


def extract_datasets(
    backbone: nn.Module, datamodule, datasets: dict[str, Dataset], trainer_kwargs: dict[str, Any], views: dict[str, int] | None = None,
) -> dict[str, FeatureSet]:  # fmt: skip
    """Features of each ``(input, label)`` dataset, through the DataModule's loaders (workers,
    pinning, bad-file collation), complete and in dataset order on every rank. ``views``: the views
    per sample of the multi-view datasets (the test split of ``--data.test_clips`` /
    ``--data.test_crops``), by name; the others have one."""
    extractor = FeatureExtractor(backbone)
    trainer = L.Trainer(
        **trainer_kwargs, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    features = {}
    for name, dataset in datasets.items():
        extractor.views = (views or {}).get(name, 1)
        trainer.test(extractor, datamodule.loader(Indexed(dataset), shuffle=False), verbose=False)
        assert extractor.result is not None
        features[name] = extractor.result
    return features


def extract_splits(backbone: nn.Module, datamodule, splits: list[str], trainer_kwargs: dict[str, Any]) -> dict[str, FeatureSet]:
    """Features of the un-augmented ``splits`` ("train", "val", "test") of an ``SSLDataModule``;
    the test split's with its ``test_views`` per sample (multi-view testing of video DataModules)."""
    datasets = {split: datamodule.labeled_dataset(split) for split in splits}
    return extract_datasets(backbone, datamodule, datasets, trainer_kwargs, views={"test": datamodule.test_views})
