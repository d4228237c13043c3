"""VICReg's variance-invariance-covariance loss, exact under DDP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_kit.distributed import all_reduce_sum


class VICRegLoss(nn.Module):
    """``invariance_weight * MSE(z_a, z_b) + variance_weight * (v(z_a) + v(z_b)) / 2 +
    covariance_weight * (c(z_a) + c(z_b))`` (Bardes et al. 2022: 25, 25, 1), where
    ``v(z) = mean_j relu(variance_target - sqrt(Var(z_j) + eps))`` and ``c(z)`` is the sum of the
    squared off-diagonal entries of z's covariance, divided by the dimension. Variance and
    covariance are unbiased (N - 1), as the official code.

    Every term is a global-batch statistic: sums over each rank's samples are reduced with
    autograd-aware collectives, so each rank's loss and the DDP gradients are those of one process on
    the concatenated batch, whatever the per-rank batch sizes. lightly's
    ``VICRegLoss(gather_distributed=True)`` (gathered embeddings, local invariance term) gets the
    same DDP gradients for equal per-rank batches, but each rank's loss holds only its own
    invariance term (tests/methods/test_vicreg.py shows both)."""

    def __init__(
        self,
        invariance_weight: float = 25.0,
        variance_weight: float = 25.0,
        covariance_weight: float = 1.0,
        variance_target: float = 1.0,
        eps: float = 1e-4,
    ) -> None:
        super().__init__()
        self.invariance_weight = invariance_weight
        self.variance_weight = variance_weight
        self.covariance_weight = covariance_weight
        self.variance_target = variance_target
        self.eps = eps

    def forward(self, z_a: Tensor, z_b: Tensor) -> Tensor:
        z_a, z_b = z_a.float(), z_b.float()
        count = all_reduce_sum(torch.tensor(float(z_a.shape[0]), device=z_a.device))
        invariance = all_reduce_sum((z_a - z_b).pow(2).sum()) / (count * z_a.shape[1])
        variance, covariance = zip(*(self.variance_and_covariance(z, count) for z in (z_a, z_b)))
        return (
            self.invariance_weight * invariance
            + self.variance_weight * sum(variance) / 2
            + self.covariance_weight * sum(covariance)
        )

    def variance_and_covariance(self, z: Tensor, count: Tensor) -> tuple[Tensor, Tensor]:
        """The hinge on each dimension's standard deviation and the off-diagonal covariance penalty."""
        centred = z - all_reduce_sum(z.sum(0)) / count
        cov = all_reduce_sum(centred.T @ centred) / (count - 1)
        std = torch.sqrt(torch.diagonal(cov) + self.eps)
        off_diagonal = cov.pow(2).sum() - torch.diagonal(cov).pow(2).sum()
        return F.relu(self.variance_target - std).mean(), off_diagonal / z.shape[1]
