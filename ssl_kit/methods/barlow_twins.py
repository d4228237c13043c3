"""Barlow Twins (Zbontar et al. 2021): cross-correlation towards the identity, DDP-exact."""

from __future__ import annotations

from lightly.models.modules import BarlowTwinsProjectionHead

from ssl_kit.losses import BarlowTwinsLoss
from ssl_kit.methods.base import SSLMethod


class BarlowTwins(SSLMethod):
    """lightly's 3-layer projector; our loss standardises over the global batch (the projector's
    final BatchNorm1d(affine=False) of the paper) and reduces C with autograd-aware collectives.

    As in the official code, biases and norm parameters train at ``bias_lr_scale`` times the
    learning rate (0.0048 / 0.2 = 0.024) and, under DDP on GPUs, BatchNorms are synchronised
    across ranks (``sync_batchnorm``)."""

    sync_batchnorm = True

    def __init__(
        self,
        *args,
        projection_hidden_dim: int = 2048,
        projection_dim: int = 2048,
        lambda_param: float = 5e-3,
        bias_lr_scale: float = 0.024,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.projector = BarlowTwinsProjectionHead(self.feature_dim, projection_hidden_dim, projection_dim)
        self.criterion = BarlowTwinsLoss(lambda_param=lambda_param)

    def param_groups(self) -> list[dict]:
        decay, no_decay, *extra = super().param_groups()
        return [decay, {**no_decay, "lr": self.hparams.lr * self.hparams.bias_lr_scale}, *extra]
