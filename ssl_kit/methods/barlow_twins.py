"""Barlow Twins (Zbontar et al. 2021): cross-correlation towards the identity, DDP-exact."""

from __future__ import annotations

from lightly.models.modules import BarlowTwinsProjectionHead

from ssl_kit.losses import BarlowTwinsLoss
from ssl_kit.methods.base import SSLMethod


class BarlowTwins(SSLMethod):
    """lightly's 3-layer projector; our loss standardises over the global batch (the projector's
    final BatchNorm1d(affine=False) of the paper) and reduces C with autograd-aware collectives."""

    def __init__(
        self,
        *args,
        projection_hidden_dim: int = 2048,
        projection_dim: int = 2048,
        lambda_param: float = 5e-3,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.projector = BarlowTwinsProjectionHead(self.feature_dim, projection_hidden_dim, projection_dim)
        self.criterion = BarlowTwinsLoss(lambda_param=lambda_param)

