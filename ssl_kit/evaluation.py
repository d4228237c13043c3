"""Feature-space evaluation shared by the online monitors and the benchmark harness."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.no_grad()
def knn_predict(
    query: Tensor, bank: Tensor, bank_labels: Tensor, num_classes: int, k: int = 20, temperature: float = 0.1
) -> Tensor:
    """Weighted kNN (Wu et al. 2018): cosine similarity, top-k neighbours voting with exp(sim / T).

    Returns class scores ``(len(query), num_classes)``; queries are processed in chunks.
    """
    bank = F.normalize(bank.float(), dim=1)
    k = min(k, len(bank))
    scores = []
    for chunk in F.normalize(query.float(), dim=1).split(1024):
        sim, idx = (chunk @ bank.T).topk(k, dim=1)
        weights = (sim / temperature).exp()
        votes = F.one_hot(bank_labels[idx], num_classes).float() * weights.unsqueeze(-1)
        scores.append(votes.sum(dim=1))
    return torch.cat(scores)


@torch.no_grad()
def extract_features(backbone: torch.nn.Module, loader) -> tuple[Tensor, Tensor]:
    """Features and labels of every batch of ``loader``, with the backbone in eval mode on its device."""
    was_training = backbone.training
    backbone.eval()
    device = next(backbone.parameters()).device
    features, labels = [], []
    for batch in loader:
        images, targets = batch
        features.append(backbone(images.to(device)).cpu())
        labels.append(targets)
    backbone.train(was_training)
    return torch.cat(features), torch.cat(labels)
