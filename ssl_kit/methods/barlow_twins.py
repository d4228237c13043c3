"""Barlow Twins (Zbontar et al. 2021): cross-correlation towards the identity, DDP-exact; optionally
Mixed Barlow Twins (Bandara et al. 2023)."""

from __future__ import annotations

import torch
from lightly.models.modules import BarlowTwinsProjectionHead
from torch import Tensor

from ssl_kit.distributed import from_first_rank
from ssl_kit.losses import BarlowTwinsLoss
from ssl_kit.methods.base import SSLMethod


class BarlowTwins(SSLMethod):
    """lightly's 3-layer projector; our loss standardises over the global batch (the projector's
    final BatchNorm1d(affine=False) of the paper) and reduces C with autograd-aware collectives.

    As in the official code, biases and norm parameters train at ``bias_lr_scale`` times the
    learning rate (0.0048 / 0.2 = 0.024) and, under DDP on GPUs, BatchNorms are synchronised
    across ranks (``sync_batchnorm``).

    ``mixup_weight`` > 0 turns on Mixed Barlow Twins' regulariser against overfitting (a third
    forward pass, of a mixup of the two views: ``BarlowTwinsLoss``), weighted in units of
    ``lambda_param`` as the official code (CIFAR-10, ResNet-18: 4 with lambda 1/128 and a
    1024-d projector). 0 is plain Barlow Twins: the same loss, parameters and checkpoints.
    """

    sync_batchnorm = True

    def __init__(
        self,
        *args,
        projection_hidden_dim: int = 2048,
        projection_dim: int = 2048,
        lambda_param: float = 5e-3,
        bias_lr_scale: float = 0.024,
        mixup_weight: float = 0.0,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.projector = BarlowTwinsProjectionHead(self.feature_dim, projection_hidden_dim, projection_dim)
        self.criterion = BarlowTwinsLoss(lambda_param=lambda_param, mixup_weight=mixup_weight)

    def param_groups(self) -> list[dict]:
        decay, no_decay, *extra = super().param_groups()
        return [decay, {**no_decay, "lr": self.hparams.lr * self.hparams.bias_lr_scale}, *extra]

    def training_loss(self, views: list[Tensor]) -> tuple[Tensor, Tensor]:
        if self.criterion.mixup_weight == 0:
            return super().training_loss(views)
        x_a, x_b = views[:2]
        x_mixed, mix, partner = self.mixup(x_a, x_b)
        features = [self.backbone(x) for x in (x_a, x_b, x_mixed)]
        z_a, z_b, z_mixed = (self.projector(f) for f in features)
        return self.criterion(z_a, z_b, z_mixed, mix, partner), features[0]

    @staticmethod
    def mixup(x_a: Tensor, x_b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``mix * x_a + (1 - mix) * x_b[partner]``, ``mix`` ~ Beta(1, 1) (uniform) drawn once for the
        whole global batch, ``partner`` a permutation of this rank's samples; returns all three."""
        mix = from_first_rank(torch.rand((), device=x_a.device))
        partner = torch.randperm(x_a.shape[0], device=x_a.device)
        return mix * x_a + (1 - mix) * x_b[partner], mix, partner
