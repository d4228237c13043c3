"""Losses for pseudo-label self-training: confidence-thresholded pseudo-labels (FixMatch-style)
and the doubly robust loss (Zhu et al. 2023). Targets are class-probability rows, so hard
pseudo-labels (one-hot) and soft, temperature-sharpened ones share one code path."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-sample cross-entropy against probability rows: ``-sum_k t_k log softmax(logits)_k``."""
    return -(targets * F.log_softmax(logits.float(), dim=1)).sum(dim=1)


@dataclass
class PseudoLabels:
    """The teacher's targets for a batch: probability rows, the confident rows, the argmax class,
    and each row's weight in the unlabeled loss (None: 1 on the confident rows, 0 elsewhere;
    SoftMatch weighs every row)."""

    targets: Tensor
    mask: Tensor
    classes: Tensor
    confidence: Tensor
    weights: Tensor | None = None

    def __post_init__(self) -> None:
        if self.weights is None:
            self.weights = self.mask.to(self.targets.dtype)

    def rows(self, index: slice) -> PseudoLabels:
        return PseudoLabels(self.targets[index], self.mask[index], self.classes[index], self.confidence[index], self.weights[index])

    @classmethod
    def given(cls, targets: Tensor) -> PseudoLabels:
        """Targets fixed in advance (a pool a previous model labeled): every row counts."""
        confidence, classes = targets.max(dim=1)
        return cls(targets, torch.ones_like(classes, dtype=torch.bool), classes, confidence)


@torch.no_grad()
def pseudo_labels(teacher_logits: Tensor, threshold: float | Tensor = 0.95, soft: bool = False, temperature: float = 1.0) -> PseudoLabels:
    """Hard (one-hot argmax) or soft (``softmax(logits / temperature)``) targets; ``mask`` marks rows
    whose top class probability, at temperature 1, is at least ``threshold`` (one per row, or one for all)."""
    probs = torch.softmax(teacher_logits.float(), dim=1)
    confidence, classes = probs.max(dim=1)
    if soft:
        targets = torch.softmax(teacher_logits.float() / temperature, dim=1)
    else:
        targets = F.one_hot(classes, probs.shape[1]).to(probs.dtype)
    return PseudoLabels(targets, confidence >= threshold, classes, confidence)


class ThresholdedPseudoLabelLoss(nn.Module):
    """FixMatch's unlabeled loss: ``mean_i 1[conf_i >= tau] * CE(student_i, target_i)``, averaged
    over *all* unlabeled rows (unconfident rows count as zero), so the loss grows as the teacher
    becomes confident on more samples. Rows weigh ``labels.weights`` (the mask, or SoftMatch's weights)."""

    def forward(self, student_logits: Tensor, labels: PseudoLabels) -> Tensor:
        return (soft_cross_entropy(student_logits, labels.targets) * labels.weights).mean()


class DoublyRobustLoss(nn.Module):
    """The doubly robust loss of Zhu et al. (2023) as their released code computes it, with
    pseudo-labels ``yhat`` on all ``n`` labeled and ``m`` unlabeled samples:

    ``(1/(n+m)) sum_all CE(yhat) + w * (1/n) sum_lab [CE(y) - CE(yhat)]``.

    At ``w = 1``: when ``yhat`` carries no information it equals labeled-only training in
    expectation (the two pseudo-label terms cancel), and when ``yhat`` is right it is the loss on
    all the data. ``w`` (``correction_weight``) is the released code's ramp of the correction from
    0 to 1 over training: it starts as pseudo-label training on all the data.

    ``labeled_fraction`` is ``n / (n + m)`` of the *dataset*. Batches oversample the labeled rows,
    so the all-data mean is the batch's labeled and unlabeled means weighted by it; None weights
    them by the batch's own counts (the released code's per-batch form). Each sample must have one
    student output in every term (the same view), or with useless pseudo-labels the terms no
    longer cancel.
    """

    def forward(
        self,
        labeled_logits: Tensor,
        labels: Tensor,
        labeled_targets: Tensor,
        unlabeled_logits: Tensor,
        unlabeled_targets: Tensor,
        correction_weight: float = 1.0,
        labeled_fraction: float | None = None,
    ) -> Tensor:
        labeled_pseudo = soft_cross_entropy(labeled_logits, labeled_targets).mean()
        unlabeled_pseudo = soft_cross_entropy(unlabeled_logits, unlabeled_targets).mean()
        n, m = labeled_logits.shape[0], unlabeled_logits.shape[0]
        share = n / (n + m) if labeled_fraction is None else labeled_fraction
        all_pseudo = share * labeled_pseudo + (1 - share) * unlabeled_pseudo
        correction = F.cross_entropy(labeled_logits.float(), labels) - labeled_pseudo
        return all_pseudo + correction_weight * correction
