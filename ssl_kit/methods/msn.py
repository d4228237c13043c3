"""MSN, Masked Siamese Networks (Assran et al. 2022): masked anchor views matched to the
prototype assignment of an unmasked target view from an EMA encoder. ViT backbones only: image
and spectrogram ViTs, or video ViTs on clips (through ``ssl_kit.models.tokens``)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from lightly.models.modules.heads import MSNProjectionHead
from torch import Tensor, nn

from ssl_kit.losses.msn import MSNLoss
from ssl_kit.methods.base import SSLMethod
from ssl_kit.methods.momentum import EMAUpdater, MomentumTargets, frozen_copy
from ssl_kit.models.masking import random_token_mask
from ssl_kit.models.tokens import ImageViTTokens, PatchTokens, patch_tokens


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


class MSN(MomentumTargets, SSLMethod):
    """View 0 is the target (global, never masked) and goes through the EMA target encoder and
    projector; views 1.. are anchors (e.g. the second global view and the local crops of
    ``ImageViews(num_views=2, local_views=K)``). The global anchor views drop ``mask_ratio`` of
    their patch tokens (class token kept) before the online ViT; the local crops are not masked
    (the official code's patch drop; the focal crops are themselves the masking).

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
    * Gradient clipping (``--trainer.gradient_clip_val``, 3.0 in the configs) clips the encoder,
      backbone and projector, and leaves the prototypes alone, as the official code does.
    * The paper's weight-decay ramp 0.04 -> 0.4 is ``--model.weight_decay 0.04 --model.final_weight_decay 0.4``
      (``BackboneModule``); the shipped short-run configs keep it constant.
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
        self.patches: PatchTokens = patch_tokens(self.backbone)
        if isinstance(self.patches, ImageViTTokens):
            self.patches.allow_any_input_size()  # multi-crop: local views are smaller
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        self.projector = MSNProjectionHead(self.feature_dim, projection_hidden_dim, projection_dim)
        self.prototypes = nn.Linear(projection_dim, num_prototypes, bias=False)
        self.criterion = MSNLoss(temperature, sharpen_temperature, sinkhorn_iterations, me_max_weight)
        self.target_backbone = frozen_copy(self.backbone)
        self.target_patches = patch_tokens(self.target_backbone)
        self.target_projector = frozen_copy(self.projector)
        self.ema = EMAUpdater(
            [(self.target_backbone, self.backbone), (self.target_projector, self.projector)],
            base=ema_momentum,
            final=1.0,
            schedule="linear",
            horizon=ema_horizon,
        )

    # -- forward passes ---------------------------------------------------------------------
    @torch.no_grad()
    def target_embeddings(self, view: Tensor) -> Tensor:
        """The target view, all of its tokens, through the EMA encoder and projector."""
        return self.target_projector(self.target_patches.pooled(self.target_patches.tokens(view)))

    def anchor_features(self, views: list[Tensor]) -> Tensor:
        """Pooled online-backbone features of the anchor views, view-major (V * B, F). Only the
        first run of same-size anchors (the global anchor views) drops ``mask_ratio`` of its patch
        tokens, as in the official code: the smaller focal crops are a masking of their own."""
        pooled = []
        for index, run in enumerate(same_size_runs(views)):
            inputs = torch.cat(run)
            keep = None
            if index == 0 and self.hparams.mask_ratio > 0:
                keep = random_token_mask(inputs.shape[0], self.patches.num_tokens(inputs), self.hparams.mask_ratio, inputs.device).keep
            pooled.append(self.patches.pooled(self.patches.tokens(inputs, keep=keep)))
        return torch.cat(pooled)

    def training_loss(self, views: list[Tensor]) -> tuple[Tensor, Tensor]:
        if len(views) < 2:
            raise ValueError("MSN needs a target view and at least one anchor view (e.g. ImageViews(num_views=2))")
        targets = self.target_embeddings(views[0])
        features = self.anchor_features(views[1:])
        anchors = self.projector(features)
        loss = self.criterion(anchors, targets, self.prototypes.weight)
        return loss, features[: views[1].shape[0]]

    # -- optimisation ------------------------------------------------------------------------
    def param_groups(self) -> list[dict]:
        """The base groups, with the prototypes in the group without weight decay."""
        decay, no_decay, *extra = super().param_groups()
        prototypes = self.prototypes.weight
        decay["params"] = [p for p in decay["params"] if p is not prototypes]
        no_decay["params"].append(prototypes)
        return [decay, no_decay, *extra]

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """``--trainer.gradient_clip_val`` clips the encoder (backbone and projector) only, as the
        official code does: the prototypes and the probe keep their gradients."""
        if not gradient_clip_val:
            return
        encoder = [p for module in (self.backbone, self.projector) for p in module.parameters() if p.grad is not None]
        if gradient_clip_algorithm == "value":
            nn.utils.clip_grad_value_(encoder, gradient_clip_val)
        else:
            nn.utils.clip_grad_norm_(encoder, gradient_clip_val)
