"""I-JEPA (Assran et al. 2023): from one large context block, a narrow predictor ViT predicts the
EMA target encoder's latents of several target blocks. No hand-made augmentations. One method for
images, spectrograms (A-JEPA-like) and clips (tube blocks, V-JEPA-like) through
``ssl_kit.models.tokens``."""

from __future__ import annotations

import math
from functools import partial

import torch
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from ssl_kit.losses.ijepa import LatentLoss, LatentPredictionLoss
from ssl_kit.methods.base import SSLMethod
from ssl_kit.methods.momentum import EMAUpdater, MomentumTargets, frozen_copy
from ssl_kit.models.masking import MultiBlockMasks, gather_tokens, multi_block_masks
from ssl_kit.models.patches import sincos_grid
from ssl_kit.models.tokens import PatchTokens, patch_tokens
from ssl_kit.optim import OptimizerName


class JEPAPredictor(nn.Module):
    """Narrow ViT: context tokens (encoder width) -> predicted target tokens (encoder width).

    The context tokens are projected to ``dim`` and get the fixed sin-cos position embedding of
    their grid positions; each target token is a shared learnable mask token plus its position's
    embedding. Each target block is predicted in its own sequence (context + that block's mask
    tokens), so blocks do not see each other. Weights as in the official predictor: truncated
    normal (std 0.02), each block's output projections scaled by 1 / sqrt(2 * layer)."""

    def __init__(self, encoder_dim: int, grid: tuple[int, ...], dim: int, depth: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.register_buffer("pos_embed", sincos_grid(dim, tuple(grid)), persistent=False)
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_ratio, qkv_bias=True, norm_layer=norm) for _ in range(depth)))
        self.norm = norm(dim)
        self.proj = nn.Linear(dim, encoder_dim)
        self._init_weights()

    def _init_weights(self) -> None:
        trunc_normal_(self.mask_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        with torch.no_grad():
            for layer, block in enumerate(self.blocks, start=1):
                block.attn.proj.weight.div_(math.sqrt(2.0 * layer))
                block.mlp.fc2.weight.div_(math.sqrt(2.0 * layer))

    def forward(self, context: Tensor, context_index: Tensor, target_index: Tensor) -> Tensor:
        """``context``: (B, K, encoder_dim) encoder output at ``context_index`` (B, K);
        ``target_index``: (B, T, M) -> predictions (B, T, M, encoder_dim)."""
        batch, num_targets, _ = target_index.shape
        x = self.embed(context) + self.pos_embed[context_index]
        queries = self.mask_token + self.pos_embed[target_index]
        x = torch.cat([x.unsqueeze(1).expand(-1, num_targets, -1, -1), queries], dim=2).flatten(0, 1)
        x = self.norm(self.blocks(x))[:, context.shape[1] :]
        return self.proj(x).unflatten(0, (batch, num_targets))


class IJEPA(MomentumTargets, SSLMethod):
    """I-JEPA on a ViT backbone: images, spectrograms or clips (``video_vit_*``).

    Each step takes the first view of the batch (configs ask for ``num_views: 1``; a random
    resized crop is the only augmentation, as in the paper) and draws ``multi_block_masks``:
    ``num_targets`` target blocks of ``target_scale`` of the grid with aspect ratio (rows / cols)
    in ``target_aspect_ratio``, and one square context block of ``context_scale`` without any
    target token, at least ``min_context`` tokens (video: blocks over space, repeated in every
    time slice).

    * Context encoder: the online backbone on the context tokens only (position embeddings added
      before the tokens are dropped).
    * Target encoder: an EMA copy of the backbone on the full input; its output tokens are
      layer-normalised over features (no affine) and the target blocks' tokens gathered. Momentum
      linear from ``ema_momentum`` (0.996) to 1.0 over the run, once per optimizer step, as the
      official schedule (``ema: [0.996, 1.0]``, ``ipe_scale: 1.0``).
    * Predictor: ``JEPAPredictor``, ``predictor_embed_dim`` wide, ``predictor_depth`` blocks,
      ``predictor_num_heads`` heads (None: the backbone's, as the official code). The paper's is
      384 wide, 6 deep for ViT-B, 12 for ViT-L/H; the defaults (96 wide, 4 deep) suit ViT-Tiny.
    * Loss: ``LatentPredictionLoss``, smooth L1 (official) or ``l2``, averaged over target tokens
      and blocks.
    * Prefix tokens: a timm ViT's class (and register) tokens go through the context encoder but
      are neither targets nor predictor inputs, so nothing trains them. The pooled feature is the
      backbone's own pooling (evaluation stays ``backbone(x)``): the configs build the ViT as the
      official encoder, without a class token and with average pooling (``backbone_kwargs:
      class_token: false, global_pool: avg``; "pretrained without a [cls] token", paper appendix);
      with timm's default class-token pooling the feature would be a token no loss reads.
    * ``fixed_pos_embed`` (default): fixed sin-cos position embeddings in the encoder, as in the
      official ViT.
    * Online probe: by default trained on the pooled context-encoder output (no extra forward;
      the context is 0.85-1.0 of the grid less the targets) and evaluated, with the kNN monitor,
      on ``backbone(x)`` of full inputs; ``probe_full_inputs`` trains it on a no-grad pass of the
      online backbone over the full inputs instead (the same input as its evaluation, one more
      forward per step). The paper evaluates the average-pooled target encoder; here the online
      backbone is what is evaluated and exported, as for the other methods.
    * The official weight-decay ramp 0.04 -> 0.4 is ``--model.final_weight_decay 0.4``
      (``BackboneModule``). Not included: the official warmup's start at 0.2 x the peak learning
      rate (ssl_kit's warmup starts near 0).
    """

    def __init__(
        self,
        backbone: str = "vit_tiny_patch16_224",
        optimizer: OptimizerName = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 0.04,
        warmup_epochs: float = 40.0,
        predictor_embed_dim: int = 96,
        predictor_depth: int = 4,
        predictor_num_heads: int | None = None,
        num_targets: int = 4,
        target_scale: tuple[float, float] = (0.15, 0.2),
        target_aspect_ratio: tuple[float, float] = (0.75, 1.5),
        context_scale: tuple[float, float] = (0.85, 1.0),
        min_context: int = 10,
        loss: LatentLoss = "smooth_l1",
        ema_momentum: float = 0.996,
        fixed_pos_embed: bool = True,
        probe_full_inputs: bool = False,
        probe_lr: float = 0.01,
        **kwargs,
    ) -> None:
        super().__init__(
            backbone=backbone,
            optimizer=optimizer,
            lr=lr,
            weight_decay=weight_decay,
            warmup_epochs=warmup_epochs,
            probe_lr=probe_lr,
            **kwargs,
        )
        self.patches: PatchTokens = patch_tokens(self.backbone)
        if fixed_pos_embed:
            self.patches.fix_sincos_pos_embed()
        heads = predictor_num_heads or self.backbone.blocks[0].attn.num_heads
        if predictor_embed_dim % heads:
            raise ValueError(f"predictor_embed_dim {predictor_embed_dim} is not divisible into {heads} heads: set predictor_num_heads")
        self.predictor = JEPAPredictor(self.patches.embed_dim, self.patches.grid, predictor_embed_dim, predictor_depth, heads)
        self.criterion = LatentPredictionLoss(loss)
        self.target_backbone = frozen_copy(self.backbone)
        self.target_patches = patch_tokens(self.target_backbone)
        self.ema = EMAUpdater([(self.target_backbone, self.backbone)], base=ema_momentum, final=1.0, schedule="linear")

    def block_masks(self, batch_size: int, generator: torch.Generator | None = None) -> MultiBlockMasks:
        hp = self.hparams
        return multi_block_masks(
            batch_size, self.patches.grid, hp.num_targets, tuple(hp.target_scale), tuple(hp.target_aspect_ratio),
            tuple(hp.context_scale), hp.min_context, self.device, generator,
        )  # fmt: skip

    @torch.no_grad()
    def target_tokens(self, inputs: Tensor, masks: MultiBlockMasks) -> Tensor:
        """The target encoder's patch tokens of the full inputs at each target block: (B, T, M, D)."""
        tokens = self.target_patches.tokens(inputs)[:, self.target_patches.num_prefix_tokens :]
        return gather_tokens(tokens, masks.targets.flatten(1)).view(*masks.targets.shape, -1)

    def predict(self, inputs: Tensor, masks: MultiBlockMasks) -> tuple[Tensor, Tensor]:
        """Predicted target tokens (B, T, M, D) from the context tokens alone, and the context
        encoder's output tokens (prefix first)."""
        latent = self.patches.tokens(inputs, keep=masks.context)
        context = latent[:, self.patches.num_prefix_tokens :]
        return self.predictor(context, masks.context, masks.targets), latent

    def training_loss(self, views: list[Tensor]) -> tuple[Tensor, Tensor]:
        inputs = views[0]
        masks = self.block_masks(inputs.shape[0])
        predictions, latent = self.predict(inputs, masks)
        loss = self.criterion(predictions, self.target_tokens(inputs, masks))
        if self.hparams.probe_full_inputs:
            with torch.no_grad():
                return loss, self.backbone(inputs)
        return loss, self.patches.pooled(latent)
