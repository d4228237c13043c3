"""MSN, Masked Siamese Networks (Assran et al. 2022): masked anchor views matched to the
prototype assignment of an unmasked target view from an EMA encoder. ViT backbones only."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from lightly.models.modules.heads import MSNProjectionHead
from timm.layers import Format
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from ssl_kit.losses.msn import MSNLoss
from ssl_kit.methods.base import SSLMethod
from ssl_kit.methods.momentum import EMAUpdater, frozen_copy
from ssl_kit.models.masking import random_token_mask
from ssl_kit.models.vit import require_vit, vit_pooled, vit_tokens


def allow_any_image_size(vit: VisionTransformer) -> VisionTransformer:
    """Lets a timm ViT built for one image size take any multiple of its patch size (multi-crop:
    96 px local crops on a 224 px model), resampling the position embeddings as timm's
    ``dynamic_img_size=True`` does. Parameters are unchanged, so exports stay plain timm weights."""
    vit.dynamic_img_size = True
    vit.patch_embed.strict_img_size = False
    vit.patch_embed.flatten = False
    vit.patch_embed.output_fmt = Format.NHWC
    return vit


def same_size_runs(views: list[Tensor]) -> Iterator[list[Tensor]]:
    """Consecutive views of equal shape, so each run goes through the encoder as one batch."""
    run: list[Tensor] = []
    for view in views:
        if run and view.shape[1:] != run[0].shape[1:]:
            yield run
            run = []
        run.append(view)
    if run:
        yield run


class MSN(SSLMethod):
    """View 0 is the target (global, never masked) and goes through the EMA target encoder and
    projector; views 1.. are anchors (e.g. the second global view and the local crops of
    ``ImageViews(num_views=2, local_views=K)``), each with ``mask_ratio`` of its patch tokens
    dropped (class token kept) before the online ViT.

    * Projector: lightly's ``MSNProjectionHead`` (Linear-BN-GELU x 2, Linear to ``projection_dim``),
      applied to all anchors together, so its BatchNorm sees every anchor view.
    * Prototypes: ``self.prototypes.weight`` of a bias-free ``nn.Linear`` (K x D), handed to the
      loss as the Parameter itself, so it is trained; it goes to the optimizer group *without*
      weight decay (as in the paper's code; it is L2-normalised in the loss anyway).
    * Loss: ``ssl_kit.losses.msn.MSNLoss`` -- Sinkhorn, me-max and the cross-entropy mean over the
      global batch, exact under DDP.
    * Target: EMA of backbone and projector, momentum linear from ``ema_momentum`` to 1.0 over
      ``ema_horizon`` x the total optimizer steps (1.25 in the paper), stepped once per optimizer step.
    * Online probe: the online backbone's pooled feature of the first anchor view (masked). It
      costs no extra forward; an unmasked pass of the target view through the online backbone
      would match the evaluation input better but costs a full forward per step.
    * Not included: the paper's weight-decay ramp 0.04 -> 0.4 (weight decay is constant here).
    """

    def __init__(
        self,
        *args,
        projection_hidden_dim: int = 2048,
        projection_dim: int = 256,
        num_prototypes: int = 1024,
        mask_ratio: float = 0.15,
        temperature: float = 0.1,
        sharpen_temperature: float = 0.25,
        sinkhorn_iterations: int = 3,
        me_max_weight: float = 1.0,
        ema_momentum: float = 0.996,
        ema_horizon: float = 1.25,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        allow_any_image_size(require_vit(self.backbone))
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        self.projector = MSNProjectionHead(self.feature_dim, projection_hidden_dim, projection_dim)
        self.prototypes = nn.Linear(projection_dim, num_prototypes, bias=False)
        self.criterion = MSNLoss(temperature, sharpen_temperature, sinkhorn_iterations, me_max_weight)
        self.target_backbone = frozen_copy(self.backbone)
        self.target_projector = frozen_copy(self.projector)
        self.ema = EMAUpdater(
            [(self.target_backbone, self.backbone), (self.target_projector, self.projector)],
            base=ema_momentum,
            final=1.0,
            schedule="linear",
            horizon=ema_horizon,
        )

    # -- forward passes ---------------------------------------------------------------------
    def num_patches(self, images: Tensor) -> int:
        patch_h, patch_w = self.backbone.patch_embed.patch_size
        return (images.shape[-2] // patch_h) * (images.shape[-1] // patch_w)

    @torch.no_grad()
    def target_embeddings(self, view: Tensor) -> Tensor:
        """The target view, all of its tokens, through the EMA encoder and projector."""
        tokens = vit_tokens(self.target_backbone, view)
        return self.target_projector(vit_pooled(self.target_backbone, tokens))

    def anchor_features(self, views: list[Tensor]) -> Tensor:
        """Pooled online-backbone features of the masked anchor views, view-major (V * B, F)."""
        pooled = []
        for run in same_size_runs(views):
            images = torch.cat(run)
            mask = random_token_mask(images.shape[0], self.num_patches(images), self.hparams.mask_ratio, images.device)
            pooled.append(vit_pooled(self.backbone, vit_tokens(self.backbone, images, keep=mask.keep)))
        return torch.cat(pooled)

    def training_loss(self, views: list[Tensor]) -> tuple[Tensor, Tensor]:
        if len(views) < 2:
            raise ValueError("MSN needs a target view and at least one anchor view (e.g. ImageViews(num_views=2))")
        targets = self.target_embeddings(views[0])
        features = self.anchor_features(views[1:])
        anchors = self.projector(features)
        loss = self.criterion(anchors, targets, self.prototypes.weight)
        return loss, features[: views[1].shape[0]]

    # -- EMA target --------------------------------------------------------------------------
    def on_train_start(self) -> None:
        self.ema.start(self.trainer.global_step)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.ema.step(self.trainer.global_step, int(self.trainer.estimated_stepping_batches)):
            self.log("train/ema_momentum", self.ema.momentum)

    # -- optimisation ------------------------------------------------------------------------
    def configure_optimizers(self):
        """The base recipe, with the prototypes moved to the group without weight decay."""
        config = super().configure_optimizers()
        prototypes = self.prototypes.weight
        decay, no_decay = config["optimizer"].param_groups[:2]
        decay["params"] = [p for p in decay["params"] if p is not prototypes]
        no_decay["params"].append(prototypes)
        return config
