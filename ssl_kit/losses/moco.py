"""InfoNCE with keys from every rank, as in MoCo v3 (Chen, Xie & He 2021)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_kit.distributed import gather_cat, rank


class InfoNCELoss(nn.Module):
    """``ctr(q, k) = CrossEntropy(q @ gather(k).T / T, arange(N) + rank * N) * 2T``.

    Queries ``q`` (local, ``N`` rows) and keys ``k`` are L2-normalised; the keys of every rank are
    concatenated (rank order), so query ``i`` of rank ``r`` has its positive at column
    ``r * N + i`` and every other key of the global batch as a negative. Keys are detached: they
    come from the momentum encoder and carry no gradient. Queries stay local, so each rank's loss
    is the mean over its own queries; with DDP averaging gradients over ranks this is exactly the
    gradient of the global-batch loss (tests/methods/test_moco_v3.py checks it on 2 gloo processes).

    The ``2T`` factor is the official implementation's: it cancels the ``1/T`` of the logits in
    the gradient's scale, so the learning rate does not have to change with the temperature. The
    logged value is therefore ``2T`` times the cross-entropy: about ``2T * log(global batch)`` per
    term at chance. ``scale_by_temperature=False`` gives the plain cross-entropy.

    Every rank must pass the same ``N`` (Lightning's DistributedSampler pads to equal sizes).
    """

    def __init__(self, temperature: float = 0.2, scale_by_temperature: bool = True) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = temperature
        self.scale_by_temperature = scale_by_temperature

    def forward(self, query: Tensor, key: Tensor) -> Tensor:
        query = F.normalize(query.float(), dim=1)
        key = F.normalize(key.detach().float(), dim=1)
        keys = gather_cat(key)  # detached: nothing flows back through the gather
        logits = query @ keys.T / self.temperature
        n = query.shape[0]
        labels = torch.arange(n, device=query.device) + rank() * n
        loss = F.cross_entropy(logits, labels)
        return loss * (2 * self.temperature) if self.scale_by_temperature else loss

    def symmetric(self, q1: Tensor, q2: Tensor, k1: Tensor, k2: Tensor) -> Tensor:
        """MoCo v3's total: ``ctr(q1, k2) + ctr(q2, k1)`` (each view's query against the other's key)."""
        return self(q1, k2) + self(q2, k1)
