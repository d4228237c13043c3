"""SimCLR (Chen et al. 2020): NT-Xent between two views, negatives from every rank."""

from __future__ import annotations

from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead

from ssl_kit.methods.base import SSLMethod


class SimCLR(SSLMethod):
    """lightly's NT-Xent (checked against the formula and a 2-rank run in tests) and projection head."""

    def __init__(
        self,
        *args,
        projection_hidden_dim: int = 2048,
        projection_dim: int = 128,
        temperature: float = 0.5,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.projector = SimCLRProjectionHead(self.feature_dim, projection_hidden_dim, projection_dim)
        self.criterion = NTXentLoss(temperature=temperature, gather_distributed=True)

