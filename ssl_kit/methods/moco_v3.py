"""MoCo v3 (Chen, Xie & He 2021): query encoder with a predictor, momentum key encoder, symmetric InfoNCE."""

from __future__ import annotations

from lightly.models.modules.heads import ProjectionHead
from torch import Tensor, nn

from ssl_kit.losses.moco import InfoNCELoss
from ssl_kit.methods.base import SSLMethod
from ssl_kit.methods.momentum import MomentumEncoder, MomentumSchedule
from ssl_kit.models.tokens import patch_tokens


def moco_v3_mlp(num_layers: int, input_dim: int, hidden_dim: int, output_dim: int, last_bn: bool) -> ProjectionHead:
    """The official MoCo v3 MLP: Linear(no bias)-BN-ReLU blocks, then Linear(no bias) and, with
    ``last_bn``, BatchNorm1d(affine=False).

    The official builder uses it as: ResNet projector 2 layers and predictor 2 layers without the
    last BN; ViT projector 3 layers and predictor 2 layers, both with the last BN. lightly's
    ``MoCoProjectionHead(batch_norm=True)`` has an affine last BN and no predictor variant, so the
    blocks are given to lightly's generic ``ProjectionHead`` directly.
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


class MoCoV3(MomentumEncoder, SSLMethod):
    """Online: backbone -> projector -> predictor gives the queries; a momentum copy of backbone +
    projector (no gradients, in no optimizer group) gives the keys.

    Heads as the official builder: on a ResNet a 2-layer projector and a 2-layer predictor without
    the last BatchNorm; on a ViT a 3-layer projector and a 2-layer predictor, both ending in
    BatchNorm1d(affine=False), and fixed 2-D sin-cos position embeddings (``fixed_pos_embed``,
    frozen, as the official ViT; they stay in the state dict, so exports carry them).

    Loss: ``ctr(q1, k2) + ctr(q2, k1)`` with ``ssl_kit.losses.moco.InfoNCELoss`` (keys gathered
    from every rank, ``2T``-scaled as in the official code). The momentum encoder follows the
    shared ``EMAUpdater``: ``ema_momentum`` -> ``ema_final_momentum`` along ``ema_schedule`` over the
    run, one update per optimizer step (gradient accumulation safe). The keys come from the
    momentum encoder in train mode (BatchNorm on batch statistics), as in the official code; its
    running statistics are copied from the online encoder at each update.

    ``ema_momentum`` is the paper's "m" (``momentum`` is already SSLMethod's SGD/LARS momentum).
    ``freeze_patch_embed`` (ViT only) keeps the random patch projection fixed, the paper's
    stability trick for ViTs.

    The paper's recipes: ViT, AdamW lr 1.5e-4 x batch/256, wd 0.1, T 0.2, m 0.99;
    ResNet-50, LARS lr 0.3 x batch/256 (100 ep: 0.6), wd 1.5e-6, T 1.0, m 0.99; heads 4096 / 256.
    Under DDP on GPUs the BatchNorms are synchronised across ranks, as the official code does
    (``sync_batchnorm``).
    """

    sync_batchnorm = True

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
        fixed_pos_embed: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        vit = hasattr(self.backbone, "patch_embed")
        if freeze_patch_embed:
            if not vit:
                raise ValueError(f"freeze_patch_embed needs a ViT backbone; {type(self.backbone).__name__} has no patch_embed")
            self.backbone.patch_embed.requires_grad_(False)
        if vit and fixed_pos_embed:
            patch_tokens(self.backbone).fix_sincos_pos_embed()
        self.projector = moco_v3_mlp(3 if vit else 2, self.feature_dim, projection_hidden_dim, projection_dim, last_bn=True)
        self.predictor = moco_v3_mlp(2, projection_dim, prediction_hidden_dim, projection_dim, last_bn=vit)
        self.build_momentum_encoder(ema_momentum, ema_final_momentum, ema_schedule)
        self.criterion = InfoNCELoss(temperature=temperature)

    def training_loss(self, views: list[Tensor]) -> tuple[Tensor, Tensor]:
        (q1, q2), (k1, k2), f1 = self.predictions_and_targets(*views[:2])
        return self.criterion.symmetric(q1, q2, k1, k2), f1

