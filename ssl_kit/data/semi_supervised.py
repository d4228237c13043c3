"""What a semi-supervised DataModule holds and serves: the few-label split, a pool labeled once by
a previous model (Noisy Student), and the typed batch that self-training methods read."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from ssl_kit.data.splits import few_label_split


@dataclass(frozen=True)
class FewLabelSplit:
    """Training-set indices that keep their labels (``labeled``) and the unlabeled pool, disjoint and sorted."""

    labeled: np.ndarray
    unlabeled: np.ndarray

    @classmethod
    def draw(cls, labels: np.ndarray, labels_per_class: int | None, label_fraction: float | None, seed: int) -> FewLabelSplit:
        """The class-balanced, seeded split of ``few_label_split``; an empty pool is an error."""
        labeled, unlabeled = few_label_split(labels, labels_per_class, label_fraction, seed)
        if len(unlabeled) == 0:
            raise ValueError("the few-label split leaves no unlabeled samples")
        return cls(labeled, unlabeled)

    @property
    def labeled_fraction(self) -> float:
        """``n / (n + m)``: the labeled share of the training set."""
        return len(self.labeled) / (len(self.labeled) + len(self.unlabeled))

    def save(self, path: Path, labels: np.ndarray, **provenance: Any) -> Path:
        """Writes the labeled indices, the per-class counts and ``provenance`` (how the split was
        drawn) as JSON, to reproduce or audit the run; ``labels`` are the training set's."""
        chosen = np.asarray(labels)[self.labeled]
        record = {
            **provenance,
            "train_size": int(len(labels)),
            "labeled_per_class": {int(c): int((chosen == c).sum()) for c in np.unique(chosen)},
            "labeled_indices": self.labeled.tolist(),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1))
        return path


@dataclass(frozen=True)
class PseudoLabeledPool:
    """A teacher's targets for the whole unlabeled pool (rows in pool order) and the pool positions
    to train on (``selected``; a position may repeat, for class balancing)."""

    targets: Tensor
    selected: np.ndarray

    @classmethod
    def of(cls, split: FewLabelSplit, targets: Tensor, selected: np.ndarray) -> PseudoLabeledPool:
        if targets.shape[0] != len(split.unlabeled):
            raise ValueError(f"{targets.shape[0]} pseudo-label rows for an unlabeled pool of {len(split.unlabeled)}")
        return cls(targets.float().cpu(), np.asarray(selected, dtype=np.int64))

    def indices(self, split: FewLabelSplit) -> np.ndarray:
        """Training-set indices of the selected samples, in training order."""
        return split.unlabeled[self.selected]

    def selected_targets(self) -> Tensor:
        return self.targets[self.selected]


@dataclass
class SemiSupervisedBatch:
    """One self-training step's data: views of labeled samples and their labels, views of unlabeled
    ones with their hidden labels (-1 where unknown; only for monitoring), for a pre-labeled pool
    the targets it was given (None: a teacher labels the unlabeled views online), and the unlabeled
    samples' positions in the pool (``FewLabelSplit.unlabeled`` order), which statistics kept per
    sample (FlexMatch's learning status) are indexed by."""

    labeled_views: list[Tensor]
    labels: Tensor
    unlabeled_views: list[Tensor]
    hidden_labels: Tensor
    pool_targets: Tensor | None = None
    unlabeled_positions: Tensor | None = None

    @classmethod
    def from_loaders(cls, parts: dict[str, tuple]) -> SemiSupervisedBatch:
        """From the combined loader's ``{"labeled": (views, labels), "unlabeled": (views, hidden
        labels, pool positions[, pool targets])}``."""
        (labeled_views, labels), (unlabeled_views, hidden, positions, *targets) = parts["labeled"], parts["unlabeled"]
        return cls(labeled_views, labels, unlabeled_views, hidden, targets[0] if targets else None, positions)
