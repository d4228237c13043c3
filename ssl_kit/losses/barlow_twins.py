"""Barlow Twins redundancy-reduction loss, with Mixed Barlow Twins' regulariser, exact under DDP."""

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

    Mixed Barlow Twins (Bandara et al. 2023), when ``forward`` is given ``z_mixed``, the embeddings
    of ``x_m = mix * x_a + (1 - mix) * x_b[partner]``: the regulariser asks the mixed batch's
    cross-correlation with each view to be the mixture of the views' own,
    ``C(z_m, z) ~ mix * C(z_a, z) + (1 - mix) * C(z_b[partner], z)`` for z in {z_a, z_b}, and adds
    ``mixup_weight * lambda * sum of the squared differences`` (the official CIFAR code's
    ``mixup_loss_scale``, 4 for ResNet-18 on CIFAR-10; gradients reach both sides, as there). The
    official code standardises with the unbiased std and no eps; here every embedding is
    standardised as in the main loss. Its ImageNet script mixes ``C(z_b, z_b)`` instead of
    ``C(z_a, z_b)`` into the second target, against the paper; this follows the paper.
    """

    def __init__(self, lambda_param: float = 5e-3, eps: float = 1e-5, mixup_weight: float = 0.0) -> None:
        super().__init__()
        self.lambda_param = lambda_param
        self.eps = eps
        self.mixup_weight = mixup_weight

    def forward(
        self, z_a: Tensor, z_b: Tensor, z_mixed: Tensor | None = None, mix: float | Tensor = 1.0, partner: Tensor | None = None
    ) -> Tensor:
        count = all_reduce_sum(torch.tensor(float(z_a.shape[0]), device=z_a.device))
        z_a = batch_standardize(z_a.float(), count, self.eps)
        z_b = batch_standardize(z_b.float(), count, self.eps)
        c = all_reduce_sum(z_a.T @ z_b) / count
        on_diag = (torch.diagonal(c) - 1).pow(2).sum()
        off_diag = c.pow(2).sum() - torch.diagonal(c).pow(2).sum()
        loss = on_diag + self.lambda_param * off_diag
        if z_mixed is None or self.mixup_weight == 0:
            return loss
        # C(z_m, z) - the mixture of C(z_a, z) and C(z_b[partner], z) is C of the residual below
        residual = batch_standardize(z_mixed.float(), count, self.eps) - (mix * z_a + (1 - mix) * z_b[partner])
        mismatch = sum((all_reduce_sum(residual.T @ z) / count).pow(2).sum() for z in (z_a, z_b))
        return loss + self.mixup_weight * self.lambda_param * mismatch
