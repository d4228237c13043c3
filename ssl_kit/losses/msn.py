"""Masked Siamese Networks loss (Assran et al. 2022), exact under DDP.

Anchors (masked views through the online encoder) are softly assigned to learnable prototypes;
their target is the assignment of the unmasked target view through the EMA encoder, sharpened
and balanced with Sinkhorn-Knopp. A mean-entropy-maximisation (me-max) term keeps the *average*
anchor assignment spread over all prototypes.

Differences from lightly's ``MSNLoss`` (whose single-process formula is the same; the tests check
that): Sinkhorn and me-max use the *global* batch through ``ssl_kit.distributed`` (lightly's
me-max averages the local batch only), the cross-entropy is the global mean, so every rank
computes the single-process loss of the whole batch; and the prototypes are an argument that
must be the ``nn.Parameter`` itself (lightly's examples pass ``.data``, which cuts their gradient).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_kit.distributed import all_reduce_sum


def full_precision(x: Tensor) -> Tensor:
    """float32 for half-precision inputs (mixed precision), float32 / float64 unchanged."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


@torch.no_grad()
def sinkhorn(probabilities: Tensor, iterations: int = 3) -> Tensor:
    """Sinkhorn-Knopp over the *global* batch: rows (samples) end up summing to 1 and every
    prototype gets (approximately) the same total mass, ``global_batch / num_prototypes``.

    ``probabilities`` is this rank's (B_r, K) block of the global (B, K) matrix; the per-prototype
    sums are all-reduced, the per-sample sums are local, so each rank returns its rows of the
    result one process would compute on the concatenated batch. Runs in float64: after target
    sharpening (logits / 0.025) some entries are ~1e-40, below float32's normal range.
    """
    if iterations <= 0:
        return probabilities
    q = probabilities.double().T  # (K, B_r)
    num_prototypes = q.shape[0]
    q = q / all_reduce_sum(q.sum())
    for _ in range(iterations):
        q = q / all_reduce_sum(q.sum(dim=1, keepdim=True)) / num_prototypes  # each prototype: mass 1/K
        q = q / q.sum(dim=0, keepdim=True)  # each sample: mass 1 (the 1/B scale of the paper cancels)
    return q.T.to(probabilities.dtype)


class MSNLoss(nn.Module):
    """``mean_i H(p+_i, p_i) + me_max_weight * (log K - H(mean_i p_i))``.

    * ``p_i = softmax(<z_i, q> / temperature)`` over the L2-normalised prototypes ``q`` for every
      anchor row ``z_i`` (L2-normalised);
    * ``p+`` = the target's ``softmax(<z+, q> / temperature)`` sharpened with
      ``sharpen_temperature`` (``p ** (1 / T)`` renormalised, computed as one softmax), then
      Sinkhorn-normalised over the global batch, without gradient; the target of anchor row
      ``v * B + b`` is target ``b`` (anchors are view-major: ``cat([view_1, view_2, ...])``);
    * the mean ``mean_i p_i`` runs over every anchor row of every rank (``all_reduce_sum`` of the
      sum and of the count, autograd-aware), and so does the cross-entropy mean.

    The value is the same on every rank (the single-process loss of the global batch). Its
    backward sums over ranks, so each rank's parameter gradient is ``world_size`` times its share;
    DDP's gradient averaging divides by ``world_size``, which makes the parameter gradients those
    of one process on the whole batch (tested on 2 gloo processes).
    """

    def __init__(
        self,
        temperature: float = 0.1,
        sharpen_temperature: float = 0.25,
        sinkhorn_iterations: int = 3,
        me_max_weight: float = 1.0,
    ) -> None:
        super().__init__()
        if temperature <= 0 or sharpen_temperature <= 0:
            raise ValueError(f"temperatures must be positive, got {temperature}, {sharpen_temperature}")
        if sinkhorn_iterations < 0:
            raise ValueError(f"sinkhorn_iterations must be >= 0, got {sinkhorn_iterations}")
        self.temperature = temperature
        self.sharpen_temperature = sharpen_temperature
        self.sinkhorn_iterations = sinkhorn_iterations
        self.me_max_weight = me_max_weight

    @torch.no_grad()
    def target_probabilities(self, targets: Tensor, prototypes: Tensor) -> Tensor:
        """Sharpened, Sinkhorn-balanced prototype assignments of the targets (no gradient)."""
        logits = F.normalize(targets.detach().double(), dim=1) @ F.normalize(prototypes.detach().double(), dim=1).T
        sharpened = torch.softmax(logits / (self.temperature * self.sharpen_temperature), dim=1)
        return sinkhorn(sharpened, self.sinkhorn_iterations)

    def forward(self, anchors: Tensor, targets: Tensor, prototypes: Tensor) -> Tensor:
        """``anchors`` (V * B, D), ``targets`` (B, D), ``prototypes`` (K, D): the Parameter itself."""
        if anchors.shape[0] % targets.shape[0] != 0:
            raise ValueError(f"{anchors.shape[0]} anchor rows are not a multiple of {targets.shape[0]} targets")
        with torch.autocast(anchors.device.type, enabled=False):  # softmax at T=0.025 needs full precision
            return self._loss(anchors, targets, prototypes, anchors.shape[0] // targets.shape[0])

    def _loss(self, anchors: Tensor, targets: Tensor, prototypes: Tensor, num_views: int) -> Tensor:
        anchors, prototypes = full_precision(anchors), full_precision(prototypes)
        logits = F.normalize(anchors, dim=1) @ F.normalize(prototypes, dim=1).T / self.temperature
        log_probs = F.log_softmax(logits, dim=1)
        target_probs = self.target_probabilities(targets, prototypes).to(log_probs.dtype).repeat(num_views, 1)

        count = all_reduce_sum(torch.tensor(float(anchors.shape[0]), dtype=log_probs.dtype, device=anchors.device))
        cross_entropy = all_reduce_sum(-(target_probs * log_probs).sum()) / count
        if self.me_max_weight == 0:
            return cross_entropy
        mean_probs = all_reduce_sum(log_probs.exp().sum(dim=0)) / count
        # log K - H(mean p) >= 0, zero when the average assignment is uniform over the prototypes
        me_max = (mean_probs * torch.log(mean_probs)).sum() + math.log(mean_probs.shape[0])
        return cross_entropy + self.me_max_weight * me_max
