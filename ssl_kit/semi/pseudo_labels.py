"""Noisy Student's pseudo-labels (Xie et al. 2020): a teacher's predictions on the unlabeled pool,
filtered by confidence and class-balanced. ``python -m ssl_kit.noisy_student`` runs the rounds."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ssl_kit.evaluation import extract


def predict(model: torch.nn.Module, loader) -> Tensor:
    """Softmax outputs of ``model`` (eval mode) over a loader of ``(images, labels)``."""
    return torch.softmax(extract(model, loader).features, dim=1)


def select_pseudo_labels(
    probs: Tensor, threshold: float = 0.0, balance: bool = True, per_class: int | None = None
) -> np.ndarray:
    """Pool positions to train the student on.

    Keeps rows whose top probability is at least ``threshold``. With ``balance``, every predicted
    class contributes ``per_class`` positions (default: the largest kept class count, so no
    confident sample is dropped): the most confident ones when it has more, its kept positions
    repeated in turn when it has fewer. Classes with no confident sample stay empty.
    """
    confidence, classes = probs.max(dim=1)
    kept = torch.nonzero(confidence >= threshold).flatten()
    if not balance or kept.numel() == 0:
        return kept.numpy()
    by_class = {int(c): kept[classes[kept] == c] for c in classes[kept].unique()}
    target = per_class or max(len(members) for members in by_class.values())
    chosen = []
    for members in by_class.values():
        ordered = members[confidence[members].argsort(descending=True)]
        chosen.append(ordered[torch.arange(target) % len(ordered)] if len(ordered) < target else ordered[:target])
    return torch.cat(chosen).sort().values.numpy()
