"""BYOL (Grill et al. 2020): an online network predicts an EMA target network's projection of the other view."""

from __future__ import annotations

from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
from torch import Tensor

from ssl_kit.methods.base import SSLMethod
from ssl_kit.methods.momentum import MomentumEncoder, MomentumSchedule


class BYOL(MomentumEncoder, SSLMethod):
    """Online: backbone -> projector -> predictor; target: the momentum encoder, an EMA copy of
    backbone + projector (``momentum_backbone``, ``momentum_projector``: no gradients, in no
    optimizer group).

    Loss, as the paper: ``2 - 2 cos(p1, z2') + 2 - 2 cos(p2, z1')``, each term a mean over the batch,
    with ``z'`` the target's projections (lightly's ``NegativeCosineSimilarity`` is the mean of
    ``-cos``; its BYOL example halves the sum of the two orders instead, which scales the gradient
    by 1/4). No batch statistic enters the loss, so DDP's gradient average is the global-batch one.

    Heads: lightly's ``BYOLProjectionHead`` / ``BYOLPredictionHead``, Linear-BN-ReLU-Linear as the
    paper (4096 hidden, 256 out on ImageNet; the official hidden Linear also has a bias, redundant
    before BatchNorm). The target follows ``ema_momentum`` -> ``ema_final_momentum`` along
    ``ema_schedule`` by optimizer step; the paper's cosine form is
    ``tau = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2`` with ``tau_base`` 0.996 on ImageNet (0.99
    is the usual CIFAR value). The target runs in train mode (BatchNorm on batch statistics), as
    lightly's examples and, to our reading, the official code (its target forward passes
    ``is_training=True``) do; its running statistics are copied from the online network at each
    update. Under DDP on GPUs the BatchNorms are synchronised across ranks, as the official code's
    cross-replica BatchNorm.
    """

    sync_batchnorm = True

    def __init__(
        self,
        *args,
        projection_hidden_dim: int = 4096,
        projection_dim: int = 256,
        prediction_hidden_dim: int = 4096,
        ema_momentum: float = 0.99,
        ema_final_momentum: float = 1.0,
        ema_schedule: MomentumSchedule = "cosine",
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.projector = BYOLProjectionHead(self.feature_dim, projection_hidden_dim, projection_dim)
        self.predictor = BYOLPredictionHead(projection_dim, prediction_hidden_dim, projection_dim)
        self.build_momentum_encoder(ema_momentum, ema_final_momentum, ema_schedule)
        self.criterion = NegativeCosineSimilarity()

    def training_loss(self, views: list[Tensor]) -> tuple[Tensor, Tensor]:
        (p1, p2), (z1, z2), f1 = self.predictions_and_targets(*views[:2])
        # mean(2 - 2 cos) = 2 + 2 * mean(-cos), for each order of the views
        return 4 + 2 * (self.criterion(p1, z2) + self.criterion(p2, z1)), f1
