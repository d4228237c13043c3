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
    """The teacher's targets for a batch: probability rows, the confident rows, the argmax class."""

    targets: Tensor
    mask: Tensor
    classes: Tensor
    confidence: Tensor

    def rows(self, index: slice) -> PseudoLabels:
        return PseudoLabels(self.targets[index], self.mask[index], self.classes[index], self.confidence[index])


@torch.no_grad()
def pseudo_labels(teacher_logits: Tensor, threshold: float = 0.95, soft: bool = False, temperature: float = 1.0) -> PseudoLabels:
    """Hard (one-hot argmax) or soft (``softmax(logits / temperature)``) targets; ``mask`` marks rows
    whose top class probability, at temperature 1, is at least ``threshold``."""
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
    becomes confident on more samples."""

    def forward(self, student_logits: Tensor, labels: PseudoLabels) -> Tensor:
        return (soft_cross_entropy(student_logits, labels.targets) * labels.mask).mean()


class DoublyRobustLoss(nn.Module):
    """``CE_lab(y) + weight * [ (1/(n+m)) sum_all CE(yhat) - (1/n) sum_lab CE(yhat) ]``.

    At ``weight = 1`` this is the doubly robust loss of Zhu et al. (2023) with pseudo-labels ``yhat``
    on all ``n`` labeled and ``m`` unlabeled samples: when ``yhat`` carries no information it equals
    labeled-only training in expectation (the two pseudo-label terms cancel), and when ``yhat`` is
    right it is the loss on all the data. ``weight`` < 1 is the progress ramp of the released code:
    it trusts the pseudo-labels gradually, starting from the labeled-only loss.
    """

    def forward(
        self,
        labeled_logits: Tensor,
        labels: Tensor,
        labeled_targets: Tensor,
        unlabeled_logits: Tensor,
        unlabeled_targets: Tensor,
        weight: float = 1.0,
    ) -> Tensor:
        supervised = F.cross_entropy(labeled_logits.float(), labels)
        return supervised + weight * self.pseudo_label_term(labeled_logits, labeled_targets, unlabeled_logits, unlabeled_targets)

    @staticmethod
    def pseudo_label_term(labeled_logits: Tensor, labeled_targets: Tensor, unlabeled_logits: Tensor, unlabeled_targets: Tensor) -> Tensor:
        """``(1/(n+m)) sum_all CE(yhat) - (1/n) sum_lab CE(yhat)``: the part the ramp weights."""
        labeled_pseudo = soft_cross_entropy(labeled_logits, labeled_targets)
        unlabeled_pseudo = soft_cross_entropy(unlabeled_logits, unlabeled_targets)
        all_pseudo = (labeled_pseudo.sum() + unlabeled_pseudo.sum()) / (labeled_pseudo.numel() + unlabeled_pseudo.numel())
        return all_pseudo - labeled_pseudo.mean()
