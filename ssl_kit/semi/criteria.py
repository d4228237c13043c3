"""Self-training criteria: how a step turns a ``SemiSupervisedBatch``, the student and the teacher
into a loss. One small module per criterion, chosen by name (``--model.loss``), so a new one
(an adaptive threshold, say) is a class here plus an entry in ``CRITERIA``."""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_kit.data.semi_supervised import SemiSupervisedBatch
from ssl_kit.semi.losses import DoublyRobustLoss, PseudoLabels, ThresholdedPseudoLabelLoss, pseudo_labels

Network = Callable[[Tensor], Tensor]


class SelfTrainingLoss(NamedTuple):
    """The loss, its parts for the log, and the pseudo-labels of the unlabeled rows."""

    loss: Tensor
    parts: dict[str, Tensor | float]
    pseudo: PseudoLabels


def rampup(progress: float, length: float) -> float:
    """Mean Teacher's sigmoid ramp-up ``exp(-5 (1 - t)^2)`` over the first ``length`` of training."""
    if length <= 0 or progress >= length:
        return 1.0
    return math.exp(-5.0 * (1.0 - progress / length) ** 2)


class FixMatchCriterion(nn.Module):
    """``CE(weak labeled) + w(t) * mean(1[conf >= threshold] * CE(strong unlabeled, pseudo-label))``.

    The teacher (no gradient) labels the weak unlabeled views; the student sees the weak labeled
    and strong unlabeled views in one pass. ``w(t)`` is ``unlabeled_weight`` times the sigmoid
    ramp-up over the first ``rampup`` of the run. A pool labeled in advance (Noisy Student) brings
    its own targets, which the threshold does not filter again."""

    def __init__(
        self, threshold: float = 0.95, soft_targets: bool = False, target_temperature: float = 1.0,
        unlabeled_weight: float = 1.0, rampup: float = 0.0,
    ) -> None:  # fmt: skip
        super().__init__()
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        self.threshold, self.soft_targets, self.target_temperature = threshold, soft_targets, target_temperature
        self.unlabeled_weight, self.rampup = unlabeled_weight, rampup
        self.unlabeled_loss = ThresholdedPseudoLabelLoss()

    def weight(self, progress: float) -> float:
        return self.unlabeled_weight * rampup(progress, self.rampup)

    def forward(self, batch: SemiSupervisedBatch, student: Network, teacher: Network, progress: float) -> SelfTrainingLoss:
        weak_labeled, (weak_unlabeled, strong_unlabeled) = batch.labeled_views[0], batch.unlabeled_views[:2]
        logits = student(torch.cat([weak_labeled, strong_unlabeled]))
        labeled_logits, unlabeled_logits = logits.split([weak_labeled.shape[0], strong_unlabeled.shape[0]])
        supervised = F.cross_entropy(labeled_logits.float(), batch.labels)
        if batch.pool_targets is not None:
            pseudo = PseudoLabels.given(batch.pool_targets)
        else:
            with torch.no_grad():
                pseudo = pseudo_labels(teacher(weak_unlabeled), self.threshold, self.soft_targets, self.target_temperature)
        unlabeled = self.unlabeled_loss(unlabeled_logits, pseudo)
        weight = self.weight(progress)
        parts = {"supervised_loss": supervised, "unlabeled_loss": unlabeled, "unlabeled_weight": weight}
        return SelfTrainingLoss(supervised + weight * unlabeled, parts, pseudo)


class DoublyRobustCriterion(nn.Module):
    """``DoublyRobustLoss`` (Zhu et al. 2023, as their released code) on the weak view of every
    sample: the teacher labels it (no threshold) and the student learns on it, one output per sample
    in every term, as the released code trains on one augmented input per sample. (Strong views for
    the student instead, on the digits as in the learning test: val teacher 0.342 vs 0.829.) The
    all-data term is weighted by the split's labeled share ``labeled_fraction`` (set from the
    DataModule; None: the batch's share) and the correction ramps in linearly over the first
    ``rampup`` of the run."""

    def __init__(self, soft_targets: bool = False, target_temperature: float = 1.0, rampup: float = 0.0) -> None:
        super().__init__()
        self.soft_targets, self.target_temperature, self.rampup = soft_targets, target_temperature, rampup
        self.labeled_fraction: float | None = None
        self.loss = DoublyRobustLoss()

    def weight(self, progress: float) -> float:
        return 1.0 if self.rampup <= 0 else min(1.0, progress / self.rampup)

    def forward(self, batch: SemiSupervisedBatch, student: Network, teacher: Network, progress: float) -> SelfTrainingLoss:
        if batch.pool_targets is not None:
            raise ValueError("the doubly robust loss labels the labeled part too; pre-labeled pools need loss: fixmatch")
        weak_labeled, weak_unlabeled = batch.labeled_views[0], batch.unlabeled_views[0]
        n = weak_labeled.shape[0]
        inputs = torch.cat([weak_labeled, weak_unlabeled])
        logits = student(inputs)
        with torch.no_grad():
            targets = pseudo_labels(teacher(inputs), 0.0, self.soft_targets, self.target_temperature)
        weight = self.weight(progress)
        pseudo = targets.rows(slice(n, None))
        loss = self.loss(logits[:n], batch.labels, targets.targets[:n], logits[n:], pseudo.targets, weight, self.labeled_fraction)
        parts = {"supervised_loss": F.cross_entropy(logits[:n].float(), batch.labels), "correction_weight": weight}
        return SelfTrainingLoss(loss, parts, pseudo)


#: ``--model.loss`` name -> criterion; each takes the ``MeanTeacher`` hyper-parameters it names.
CRITERIA: dict[str, type[nn.Module]] = {"fixmatch": FixMatchCriterion, "doubly_robust": DoublyRobustCriterion}
