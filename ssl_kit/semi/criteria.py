"""Self-training criteria: how a step turns a ``SemiSupervisedBatch``, the student and the teacher
into a loss. One small module per criterion, chosen by name (``--model.loss``): FixMatch's fixed
threshold, the adaptive ones (FlexMatch, FreeMatch, SoftMatch; their statistics in
``semi/thresholds.py``) and the doubly robust loss; a new one is a class here plus an entry in
``CRITERIA``."""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_kit.data.semi_supervised import FewLabelSplit, SemiSupervisedBatch
from ssl_kit.semi.losses import DoublyRobustLoss, PseudoLabels, ThresholdedPseudoLabelLoss, pseudo_labels
from ssl_kit.semi.thresholds import (
    DistributionAlignment, LearningStatus, SelfAdaptiveThresholds, TruncatedGaussianWeights, fairness_loss,
)  # fmt: skip

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


class PseudoLabelCriterion(nn.Module):
    """``CE(weak labeled) + w(t) * (mean_i weight_i * CE(strong unlabeled_i, pseudo-label_i) + extra terms)``.

    The teacher (no gradient) labels the weak unlabeled views; the student sees the weak labeled
    and strong unlabeled views in one pass. ``w(t)`` is ``unlabeled_weight`` times the sigmoid
    ramp-up over the first ``rampup`` of the run. Subclasses say which rows count and how much
    (``pseudo_labels``). ``distribution_alignment`` aligns the teacher's probabilities to a uniform
    class marginal first (``DistributionAlignment``, EMA momentum ``statistics_momentum``; None:
    the criterion's default, on for SoftMatch only). A pool labeled in advance (Noisy Student)
    brings its own targets, which only FixMatch takes, unfiltered."""

    aligns_by_default = False
    takes_labeled_pools = False

    def __init__(
        self, num_classes: int = 10, soft_targets: bool = False, target_temperature: float = 1.0, unlabeled_weight: float = 1.0,
        rampup: float = 0.0, distribution_alignment: bool | None = None, statistics_momentum: float = 0.999,
    ) -> None:  # fmt: skip
        super().__init__()
        self.num_classes, self.soft_targets, self.target_temperature = num_classes, soft_targets, target_temperature
        self.unlabeled_weight, self.rampup, self.statistics_momentum = unlabeled_weight, rampup, statistics_momentum
        self.unlabeled_loss = ThresholdedPseudoLabelLoss()
        align = self.aligns_by_default if distribution_alignment is None else distribution_alignment
        self.alignment = DistributionAlignment(num_classes, statistics_momentum) if align else None

    def weight(self, progress: float) -> float:
        return self.unlabeled_weight * rampup(progress, self.rampup)

    def align(self, teacher_logits: Tensor) -> Tensor:
        return teacher_logits if self.alignment is None else self.alignment(teacher_logits)

    def pseudo_labels(self, teacher_logits: Tensor, batch: SemiSupervisedBatch) -> PseudoLabels:
        raise NotImplementedError

    def unlabeled_terms(self, student_logits: Tensor, pseudo: PseudoLabels) -> dict[str, Tensor]:
        """The terms ``w(t)`` weighs, by name (for the log): the weighted pseudo-label cross-entropy."""
        return {"unlabeled_loss": self.unlabeled_loss(student_logits, pseudo)}

    def forward(self, batch: SemiSupervisedBatch, student: Network, teacher: Network, progress: float) -> SelfTrainingLoss:
        weak_labeled, (weak_unlabeled, strong_unlabeled) = batch.labeled_views[0], batch.unlabeled_views[:2]
        logits = student(torch.cat([weak_labeled, strong_unlabeled]))
        labeled_logits, unlabeled_logits = logits.split([weak_labeled.shape[0], strong_unlabeled.shape[0]])
        supervised = F.cross_entropy(labeled_logits.float(), batch.labels)
        if batch.pool_targets is not None:
            if not self.takes_labeled_pools:
                raise ValueError(f"{type(self).__name__} keeps statistics of a teacher labeling online; pre-labeled pools need loss: fixmatch")
            pseudo = PseudoLabels.given(batch.pool_targets)
        else:
            with torch.no_grad():
                pseudo = self.pseudo_labels(teacher(weak_unlabeled), batch)
        terms = self.unlabeled_terms(unlabeled_logits, pseudo)
        weight = self.weight(progress)
        parts = {"supervised_loss": supervised, **terms, "unlabeled_weight": weight}
        return SelfTrainingLoss(supervised + weight * sum(terms.values()), parts, pseudo)


class FixMatchCriterion(PseudoLabelCriterion):
    """FixMatch: a row counts when the teacher's top probability is at least ``threshold``."""

    takes_labeled_pools = True

    def __init__(self, threshold: float = 0.95, **settings) -> None:
        super().__init__(**settings)
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        self.threshold = threshold

    def pseudo_labels(self, teacher_logits: Tensor, batch: SemiSupervisedBatch) -> PseudoLabels:
        return pseudo_labels(self.align(teacher_logits), self.threshold, self.soft_targets, self.target_temperature)


class FlexMatchCriterion(FixMatchCriterion):
    """FlexMatch (Zhang et al. 2021): class-wise thresholds ``M(beta_c) * threshold`` from each
    class's learning status, with threshold warmup (``LearningStatus``). As in USB, a batch is
    masked with the thresholds before it, then its confident predictions (``>= threshold``) update
    the status. Batches must carry their pool positions (``SSLDataModule``'s do)."""

    takes_labeled_pools = False

    def __init__(self, **settings) -> None:
        super().__init__(**settings)
        self.status = LearningStatus(self.num_classes, self.threshold)

    def use_split(self, split: FewLabelSplit) -> None:
        self.status.track(len(split.unlabeled))

    def pseudo_labels(self, teacher_logits: Tensor, batch: SemiSupervisedBatch) -> PseudoLabels:
        if batch.unlabeled_positions is None:
            raise ValueError("FlexMatch tracks every unlabeled sample: its batches must carry their pool positions")
        logits = self.align(teacher_logits)
        thresholds = self.status.class_thresholds()[logits.argmax(dim=1)]
        labels = pseudo_labels(logits, thresholds, self.soft_targets, self.target_temperature)
        self.status.update(batch.unlabeled_positions, labels.confidence, labels.classes)
        return labels


class FreeMatchCriterion(PseudoLabelCriterion):
    """FreeMatch (Wang et al. 2023): the self-adaptive class thresholds ``MaxNorm(p_t(c)) * tau_t``
    (``SelfAdaptiveThresholds``, updated with the batch before it is masked, as in USB), plus the
    self-adaptive fairness term (``fairness_loss``) on the student's strong views of the masked
    rows, weighted by ``fairness_weight`` (USB's CIFAR-10 configs: 0.001). Both unlabeled terms are
    weighed by ``w(t)`` (USB: ``lambda_u = 1``), so ``unlabeled_weight 0`` is the labels-only run."""

    def __init__(self, fairness_weight: float = 0.001, **settings) -> None:
        super().__init__(**settings)
        self.fairness_weight = fairness_weight
        self.thresholds = SelfAdaptiveThresholds(self.num_classes, self.statistics_momentum)

    def pseudo_labels(self, teacher_logits: Tensor, batch: SemiSupervisedBatch) -> PseudoLabels:
        logits = self.align(teacher_logits)
        self.thresholds.update(logits.float().softmax(dim=1))
        thresholds = self.thresholds.class_thresholds()[logits.argmax(dim=1)]
        return pseudo_labels(logits, thresholds, self.soft_targets, self.target_temperature)

    def unlabeled_terms(self, student_logits: Tensor, pseudo: PseudoLabels) -> dict[str, Tensor]:
        fairness = fairness_loss(student_logits, pseudo.mask, self.thresholds.class_probs, self.thresholds.class_histogram)
        return {**super().unlabeled_terms(student_logits, pseudo), "fairness_loss": self.fairness_weight * fairness}


class SoftMatchCriterion(PseudoLabelCriterion):
    """SoftMatch (Chen et al. 2023): every row counts, weighted by the truncated Gaussian of its
    top probability (``TruncatedGaussianWeights``, updated with the batch first, as in USB) after
    uniform alignment (on by default). As in USB, the alignment sets the weights only: the
    pseudo-labels are the teacher's own. ``mask`` (for the log) marks the rows at full weight."""

    aligns_by_default = True

    def __init__(self, **settings) -> None:
        super().__init__(**settings)
        self.gaussian = TruncatedGaussianWeights(self.num_classes, self.statistics_momentum)

    def pseudo_labels(self, teacher_logits: Tensor, batch: SemiSupervisedBatch) -> PseudoLabels:
        confidence = self.align(teacher_logits).float().softmax(dim=1).amax(dim=1)
        self.gaussian.update(confidence)
        weights = self.gaussian(confidence)
        labels = pseudo_labels(teacher_logits, 0.0, self.soft_targets, self.target_temperature)
        return dataclasses.replace(labels, mask=weights >= 1.0, weights=weights.to(labels.targets.dtype))


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

    def use_split(self, split: FewLabelSplit) -> None:
        self.labeled_fraction = split.labeled_fraction

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
CRITERIA: dict[str, type[nn.Module]] = {
    "fixmatch": FixMatchCriterion, "flexmatch": FlexMatchCriterion, "freematch": FreeMatchCriterion,
    "softmatch": SoftMatchCriterion, "doubly_robust": DoublyRobustCriterion,
}  # fmt: skip


def criterion_arguments(criterion: type[nn.Module]) -> list[str]:
    """The keyword arguments ``criterion`` takes, its bases' included (subclasses pass ``**settings`` on)."""
    names: list[str] = []
    for cls in criterion.__mro__[: criterion.__mro__.index(nn.Module)]:
        if "__init__" not in vars(cls):
            continue
        for name, parameter in list(inspect.signature(cls.__init__).parameters.items())[1:]:  # after self
            if parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY) and name not in names:
                names.append(name)
    return names
