"""MoCo v3 (Chen, Xie & He 2021): query encoder with a predictor, momentum key encoder, symmetric InfoNCE."""

from __future__ import annotations

import torch
from lightly.models.modules.heads import ProjectionHead
from torch import Tensor, nn

from ssl_kit.losses.moco import InfoNCELoss
from ssl_kit.methods.base import SSLMethod
from ssl_kit.methods.momentum import EMAUpdater, MomentumSchedule, frozen_copy


def moco_v3_mlp(num_layers: int, input_dim: int, hidden_dim: int, output_dim: int, last_bn: bool) -> ProjectionHead:
    """The official MoCo v3 MLP: Linear(no bias)-BN-ReLU blocks, then Linear(no bias) and, with
    ``last_bn``, BatchNorm1d(affine=False) (projector yes, predictor no).

    lightly's ``MoCoProjectionHead(num_layers=3, batch_norm=True)`` has the same shape but an
    affine last BN and no predictor variant, so the blocks are given to lightly's generic
    ``ProjectionHead`` directly.
    """
    blocks = []
    dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        last = i == num_layers - 1
        if not last:
            blocks.append((d_in, d_out, nn.BatchNorm1d(d_out), nn.ReLU(), False))
        else:
            blocks.append((d_in, d_out, nn.BatchNorm1d(d_out, affine=False) if last_bn else None, None, False))
    return ProjectionHead(blocks)


class MoCoV3(SSLMethod):
    """Online: backbone -> projector (3 layers) -> predictor (2 layers) gives the queries; a
    momentum copy of backbone + projector (no gradients, in no optimizer group) gives the keys.

    Loss: ``ctr(q1, k2) + ctr(q2, k1)`` with ``ssl_kit.losses.moco.InfoNCELoss`` (keys gathered
    from every rank, ``2T``-scaled as in the official code). The momentum encoder follows the
    shared ``EMAUpdater``: ``ema_momentum`` -> ``ema_final_momentum`` along ``ema_schedule`` over the
    optimizer steps of the run, one update per optimizer step (gradient accumulation safe).

    ``ema_momentum`` is the paper's "m" (``momentum`` is already SSLMethod's SGD/LARS momentum).
    ``freeze_patch_embed`` (ViT only) keeps the random patch projection fixed, the paper's
    stability trick for ViTs.

    The paper's recipes: ViT, AdamW lr 1.5e-4 x batch/256, wd 0.1, T 0.2, m 0.99;
    ResNet-50, LARS lr 0.3 x batch/256 (100 ep: 0.6), wd 1.5e-6, T 1.0, m 0.99; heads 4096 / 256.
    """

    def __init__(
        self,
        *args,
        projection_hidden_dim: int = 4096,
        projection_dim: int = 256,
        prediction_hidden_dim: int = 4096,
        temperature: float = 0.2,
        ema_momentum: float = 0.99,
        ema_final_momentum: float = 1.0,
        ema_schedule: MomentumSchedule = "cosine",
        freeze_patch_embed: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        if freeze_patch_embed:
            patch_embed = getattr(self.backbone, "patch_embed", None)
            if patch_embed is None:
                raise ValueError(f"freeze_patch_embed needs a ViT backbone; {type(self.backbone).__name__} has no patch_embed")
            patch_embed.requires_grad_(False)
        self.projector = moco_v3_mlp(3, self.feature_dim, projection_hidden_dim, projection_dim, last_bn=True)
        self.predictor = moco_v3_mlp(2, projection_dim, prediction_hidden_dim, projection_dim, last_bn=False)
        self.momentum_backbone = frozen_copy(self.backbone)
        self.momentum_projector = frozen_copy(self.projector)
        self.criterion = InfoNCELoss(temperature=temperature)
        self.ema = EMAUpdater(
            [(self.momentum_backbone, self.backbone), (self.momentum_projector, self.projector)],
            base=ema_momentum,
            final=ema_final_momentum,
            schedule=ema_schedule,
        )

    def training_loss(self, views: list[Tensor]) -> tuple[Tensor, Tensor]:
        x1, x2 = views[:2]
        f1, f2 = self.backbone(x1), self.backbone(x2)
        q1, q2 = self.predictor(self.projector(f1)), self.predictor(self.projector(f2))
        with torch.no_grad():
            k1 = self.momentum_projector(self.momentum_backbone(x1))
            k2 = self.momentum_projector(self.momentum_backbone(x2))
        return self.criterion.symmetric(q1, q2, k1, k2), f1

    # The keys come from the momentum encoder in train mode (BatchNorm on batch statistics), as in
    # the official code; its running statistics are copied from the online encoder at each update.
    def on_train_start(self) -> None:
        self.ema.start(self.trainer.global_step)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.ema.step(self.trainer.global_step, int(self.trainer.estimated_stepping_batches)):
            self.log("train/ema_momentum", self.ema.momentum)
