"""data2vec 2.0 (Baevski et al. 2022, "Efficient Self-supervised Learning with Contextualized Target
Representations for Vision, Speech and Language"): a student ViT sees a few visible blocks of the
input and a light convolutional decoder regresses an EMA teacher's layer-averaged representations
of the whole input at the hidden positions. One method for images, spectrograms and video through
``ssl_kit.models.tokens``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_kit.losses.data2vec2 import LatentRegressionLoss, TargetNorm, layer_averaged_targets
from ssl_kit.methods.base import SSLMethod
from ssl_kit.methods.momentum import EMAUpdater, MomentumTargets, frozen_copy
from ssl_kit.models.masking import TokenMask, gather_tokens, inverse_block_token_mask
from ssl_kit.models.tokens import PatchTokens, patch_tokens
from ssl_kit.optim import OptimizerName


class ConvTokenDecoder(nn.Module):
    """data2vec 2.0's light decoder (the official ``Decoder2d``) on the patch grid.

    The student's visible patch tokens and a learnable mask token at every hidden position are put
    back in grid order; ``layers`` blocks of (grouped convolution, LayerNorm over the channels
    without affine, GELU) follow, each with a residual connection where its input has its width
    (not the first when ``dim`` differs from the encoder's); a linear layer maps back to the
    encoder width. The convolution is 2-D on image and spectrogram grids (rows x cols) and 3-D on
    video grids (time x rows x cols), so a hidden tubelet also sees its neighbours in time. No
    position embedding: the convolutions see where each token lies on the grid.

    The official code fills the hidden positions with fresh N(0, 0.01) noise instead of a learned
    token; here the mask token is learned (initialised N(0, 0.02)), as MAE's.
    """

    def __init__(
        self, encoder_dim: int, grid: tuple[int, ...], dim: int = 192, layers: int = 3, kernel_size: int = 3, groups: int = 16
    ) -> None:
        super().__init__()
        if len(grid) not in (2, 3):
            raise ValueError(f"the convolutional decoder needs a 2-D or 3-D patch grid, got {tuple(grid)}")
        if encoder_dim % groups or dim % groups:
            raise ValueError(f"decoder_groups {groups} must divide the encoder width {encoder_dim} and decoder_dim {dim}")
        if kernel_size % 2 == 0:
            raise ValueError(f"decoder_kernel must be odd (the grid keeps its size), got {kernel_size}")
        if layers < 1:
            raise ValueError(f"decoder_layers must be at least 1, got {layers}")
        self.grid = tuple(grid)
        self.dim = dim
        conv = nn.Conv2d if len(grid) == 2 else nn.Conv3d
        self.mask_token = nn.Parameter(torch.zeros(1, 1, encoder_dim))
        nn.init.normal_(self.mask_token, std=0.02)
        self.convs = nn.ModuleList(
            conv(encoder_dim if i == 0 else dim, dim, kernel_size, padding=kernel_size // 2, groups=groups) for i in range(layers)
        )
        self.proj = nn.Linear(dim, encoder_dim)

    def forward(self, visible: Tensor, token_mask: TokenMask) -> Tensor:
        """``visible``: (B, K, D) student tokens of the visible patches (no prefix tokens), in
        ``token_mask.keep`` order -> (B, N, D) predictions for every patch, in grid order."""
        batch, num_tokens = token_mask.restore.shape
        hidden = self.mask_token.expand(batch, num_tokens - visible.shape[1], -1)
        x = gather_tokens(torch.cat([visible, hidden], dim=1), token_mask.restore)
        x = x.transpose(1, 2).reshape(batch, -1, *self.grid)
        for conv in self.convs:
            y = F.gelu(F.layer_norm(conv(x).movedim(1, -1), (self.dim,)).movedim(-1, 1))
            x = x + y if x.shape == y.shape else y
        return self.proj(x.flatten(2).transpose(1, 2))


class Data2Vec2(MomentumTargets, SSLMethod):
    """data2vec 2.0 on a ViT backbone: images, spectrograms (1-channel ViT, non-square grid) or clips
    (``video_vit_*``).

    * Student: the backbone on the visible tokens only (position embeddings added before masking),
      ``masks_per_sample`` different inverse block masks per sample (the official ``clone_batch``,
      16 for images and 8 for speech in the paper), so the teacher's one forward pass over the
      batch serves them all. Masks: ``inverse_block_token_mask`` (blocks of ``mask_block_size``
      kept, ``mask_ratio`` hidden, ``mask_ratio_adjust`` for the blocks' overlap; tubes on video).
    * Teacher: an EMA copy of the backbone (``frozen_copy``; no gradient, in no optimizer group,
      always in eval mode, as the official teacher) on the full, unmasked input. Momentum linear
      from ``ema_momentum`` to ``ema_final_momentum`` over the first ``ema_horizon`` of the run,
      then constant, once per optimizer step (official image config: 0.9998 -> 0.99999 over the
      first 100k of 375k updates; short runs want a lower start).
    * Targets (``layer_averaged_targets``): the top ``average_top_k_layers`` block outputs,
      prefix tokens dropped, each instance-normalised over the tokens, averaged, then
      ``target_norm`` (``layer``: the official image default). The official targets are each
      post-LN block's feed-forward output before its residual; here, on timm's pre-LN blocks,
      they are the blocks' outputs (the residual stream; the official ``end_of_block_targets``).
    * Decoder: ``ConvTokenDecoder`` (``decoder_dim``, ``decoder_layers``, ``decoder_kernel``,
      ``decoder_groups``; official image: 768, 6, 3, 16).
    * Loss (``LatentRegressionLoss``): squared error x 1/sqrt(D) at the hidden positions only,
      plus ``cls_loss`` x the error of the student's pooled feature (the backbone's own pooling:
      class token or mean) against the mean target (0 switches it off; see the loss for how
      the official 0.01 maps to 2.56 here).
    * ``fixed_pos_embed``: fixed, frozen sin-cos position embeddings, as the official image
      encoder.
    * Online probe: trained on the online backbone's pooled feature of the *full* inputs (an extra
      no-grad forward pass), so it reads the features evaluation reads (``backbone(x)``): MAE's
      probe, trained on features of masked inputs, was at chance on full ones.

    Defaults follow the official image recipe where it fits small ViTs (AdamW lr 1e-3, betas
    (0.9, 0.95), weight decay 0.05, mask ratio 0.8 with 3 x 3 blocks, 0.07 adjustment, top 10
    layers); ``masks_per_sample`` 4 and a 192-d, 3-layer decoder keep CPU steps affordable, though
    a step still costs several MAE steps: the student runs ``masks_per_sample`` x the visible
    tokens with gradients, the teacher and the probe a full pass each (ViT-Tiny, 16 px digits,
    batch 128, one core: 3.7 s against MAE's 0.7 s). Only the first view of a batch is used
    (configs ask for ``num_views: 1``). Not included: the paper's
    gradient clipping at 4 (``--trainer.gradient_clip_val 4`` does it, the probe's gradient
    included).
    """

    def __init__(
        self,
        backbone: str = "vit_tiny_patch16_224",
        optimizer: OptimizerName = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.95),
        mask_ratio: float = 0.8,
        mask_block_size: int = 3,
        mask_ratio_adjust: float = 0.07,
        masks_per_sample: int = 4,
        average_top_k_layers: int = 10,
        target_norm: TargetNorm = "layer",
        decoder_dim: int = 192,
        decoder_layers: int = 3,
        decoder_kernel: int = 3,
        decoder_groups: int = 16,
        cls_loss: float = 2.56,
        ema_momentum: float = 0.9998,
        ema_final_momentum: float = 0.99999,
        ema_horizon: float = 0.27,
        fixed_pos_embed: bool = True,
        probe_lr: float = 0.01,
        **kwargs,
    ) -> None:
        super().__init__(
            backbone=backbone, optimizer=optimizer, lr=lr, weight_decay=weight_decay, betas=betas, probe_lr=probe_lr, **kwargs
        )
        if masks_per_sample < 1:
            raise ValueError(f"masks_per_sample must be at least 1, got {masks_per_sample}")
        self.patches: PatchTokens = patch_tokens(self.backbone)
        depth = len(self.backbone.blocks)
        if not 1 <= average_top_k_layers <= depth:
            raise ValueError(f"average_top_k_layers must be between 1 and the backbone's {depth} blocks, got {average_top_k_layers}")
        if fixed_pos_embed:
            self.patches.fix_sincos_pos_embed()
        inverse_block_token_mask(1, self.patches.grid, mask_ratio, mask_block_size, mask_ratio_adjust)  # bad mask arguments fail here
        self.decoder = ConvTokenDecoder(
            self.patches.embed_dim, self.patches.grid, decoder_dim, decoder_layers, decoder_kernel, decoder_groups
        )
        self.criterion = LatentRegressionLoss(cls_loss)
        self.target_backbone = frozen_copy(self.backbone)
        self.target_patches = patch_tokens(self.target_backbone)
        self.ema = EMAUpdater(
            [(self.target_backbone, self.backbone)],
            base=ema_momentum,
            final=ema_final_momentum,
            schedule="linear",
            horizon=ema_horizon,
        )

    def train(self, mode: bool = True):
        """The teacher stays in eval mode (no dropout or drop-path), as the official teacher."""
        super().train(mode)
        self.target_backbone.eval()
        return self

    # -- the method ------------------------------------------------------------------------
    def token_mask(self, batch_size: int) -> TokenMask:
        hp = self.hparams
        return inverse_block_token_mask(
            batch_size, self.patches.grid, hp.mask_ratio, hp.mask_block_size, hp.mask_ratio_adjust, self.device
        )

    @torch.no_grad()
    def targets(self, inputs: Tensor) -> Tensor:
        """The teacher's targets ``(B, N, D)`` for every patch of the full inputs: one forward pass."""
        outputs = self.target_patches.block_outputs(inputs)
        hp = self.hparams
        return layer_averaged_targets(outputs, hp.average_top_k_layers, self.target_patches.num_prefix_tokens, hp.target_norm)

    def training_loss(self, views: list[Tensor]) -> tuple[Tensor, Tensor]:
        inputs = views[0]
        clones = self.hparams.masks_per_sample
        targets = self.targets(inputs).repeat_interleave(clones, dim=0)  # rows b * clones + i: sample b, mask i
        token_mask = self.token_mask(targets.shape[0])
        tokens = self.patches.tokens(inputs.repeat_interleave(clones, dim=0), token_mask.keep)
        pred = self.decoder(tokens[:, self.patches.num_prefix_tokens :], token_mask)
        loss = self.criterion(pred, targets, token_mask.mask, self.patches.pooled(tokens))
        with torch.no_grad():
            features = self.backbone(inputs)
        return loss, features
