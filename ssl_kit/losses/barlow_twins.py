"""Barlow Twins redundancy-reduction loss, exact under DDP."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ssl_kit.distributed import all_reduce_sum


def batch_standardize(z: Tensor, count: Tensor, eps: float) -> Tensor:
    """BatchNorm without affine over the *global* batch of ``count`` samples (sums over ranks)."""
    mean = all_reduce_sum(z.sum(0)) / count
    var = all_reduce_sum(((z - mean) ** 2).sum(0)) / count
    return (z - mean) / torch.sqrt(var + eps)


class BarlowTwinsLoss(nn.Module):
    """sum_i (1 - C_ii)^2 + lambda * sum_{i != j} C_ij^2, with C the cross-correlation of the
    batch-standardised embeddings divided by the global batch size.

    lightly's ``BarlowTwinsLoss(gather_distributed=True)`` standardises with local statistics and
    sums C with a raw ``all_reduce``, so its DDP gradients are wrong; here both the statistics and
    C are reduced with autograd-aware collectives (tests/integration/test_distributed.py shows the difference).
    """

    def __init__(self, lambda_param: float = 5e-3, eps: float = 1e-5) -> None:
        super().__init__()
        self.lambda_param = lambda_param
        self.eps = eps

    def forward(self, z_a: Tensor, z_b: Tensor) -> Tensor:
        count = all_reduce_sum(torch.tensor(float(z_a.shape[0]), device=z_a.device))
        z_a = batch_standardize(z_a.float(), count, self.eps)
        z_b = batch_standardize(z_b.float(), count, self.eps)
        c = all_reduce_sum(z_a.T @ z_b) / count
        on_diag = (torch.diagonal(c) - 1).pow(2).sum()
        off_diag = c.pow(2).sum() - torch.diagonal(c).pow(2).sum()
        return on_diag + self.lambda_param * off_diag
