"""Weighted kNN (Wu et al. 2018) on features: the online monitor's and the harness's protocol."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ssl_kit.evaluation.features import FeatureSet


@torch.no_grad()
def knn_predict(
    query: Tensor, bank: Tensor, bank_labels: Tensor, num_classes: int, k: int = 20, temperature: float = 0.1
) -> Tensor:
    """Weighted kNN (Wu et al. 2018): cosine similarity, top-k neighbours voting with exp(sim / T).

    Returns class scores ``(len(query), num_classes)``; queries are processed in chunks. Multi-hot
    ``bank_labels`` (multi-label data) vote for each of their classes.
    """
    bank = F.normalize(bank.float(), dim=1)
    k = min(k, len(bank))
    scores = []
    for chunk in F.normalize(query.float(), dim=1).split(1024):
        sim, idx = (chunk @ bank.T).topk(k, dim=1)
        weights = (sim / temperature).exp()
        neighbours = bank_labels[idx]
        votes = (neighbours.float() if bank_labels.ndim == 2 else F.one_hot(neighbours, num_classes).float()) * weights.unsqueeze(-1)
        scores.append(votes.sum(dim=1))
    return torch.cat(scores)


def knn(train: FeatureSet, test: FeatureSet, num_classes: int, k: int = 20, temperature: float = 0.07) -> float:
    """Top-1 (multi-label: macro mAP) of the weighted kNN classifier (``knn_predict``), with ``train`` as the bank;
    a multi-view ``test`` sample's views vote, and their votes are averaged (``FeatureSet.score``)."""
    bank = train.single_view("kNN bank")
    return test.score(knn_predict(test.features, bank.features, bank.labels, num_classes, k, temperature))
