"""VICReg (Bardes, Ponce & LeCun 2022): invariance, variance and covariance terms on an expander's outputs."""

from __future__ import annotations

from lightly.models.modules.heads import VICRegProjectionHead

from ssl_kit.losses import VICRegLoss
from ssl_kit.methods.base import SSLMethod


class VICReg(SSLMethod):
    """lightly's 3-layer expander (Linear-BN-ReLU twice, then Linear; 8192 wide in the paper) and
    our ``VICRegLoss``, whose variance and covariance are global-batch statistics under DDP.

    The paper's recipe: weights 25 / 25 / 1, LARS, lr 0.2 x batch/256 (biases and norms without
    weight decay or LARS adaptation), wd 1e-6. lightly's expander ends in a Linear with a bias where
    the official one has none; every term of the loss is blind to that bias (the invariance term
    compares two views through the same bias, the others are centred), so it gets no gradient.
    Under DDP on GPUs the BatchNorms are synchronised across ranks (``sync_batchnorm``).
    """

    sync_batchnorm = True

    def __init__(
        self,
        *args,
        projection_hidden_dim: int = 2048,
        projection_dim: int = 2048,
        invariance_weight: float = 25.0,
        variance_weight: float = 25.0,
        covariance_weight: float = 1.0,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.projector = VICRegProjectionHead(self.feature_dim, projection_hidden_dim, projection_dim, num_layers=3)
        self.criterion = VICRegLoss(invariance_weight, variance_weight, covariance_weight)
