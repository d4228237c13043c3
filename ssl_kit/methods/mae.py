"""MAE (He et al. 2022): a ViT encoder on the visible patches, a light decoder reconstructs the rest.

One method for three modalities: the backbone is reached through ``ssl_kit.models.tokens``, so
the same code is image MAE (timm ViT), Audio-MAE (a 1-channel ViT on a non-square spectrogram
grid) and VideoMAE (``video_vit_*`` on tubelets, with tube masking).
"""

from __future__ import annotations

from typing import Literal

import torch
from lightning.pytorch.callbacks import Callback
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from ssl_kit.losses.mae import MaskedReconstructionLoss
from ssl_kit.methods.base import SSLMethod
from ssl_kit.methods.figures import FIGURE_MASK_SEED, ReconstructionFigures
from ssl_kit.models.masking import TokenMask, gather_tokens
from ssl_kit.models.patches import patch_moments, sincos_grid
from ssl_kit.models.tokens import PatchTokens, patch_tokens
from ssl_kit.optim import OptimizerName

#: Default share of hidden patches: MAE's 0.75 for images, VideoMAE's 0.9 with tube masking for
#: video (Audio-MAE's 0.8 is set in the spectrogram configs: spectrograms use image ViTs).
DEFAULT_MASK_RATIO = {"image": 0.75, "video": 0.9}


class MAEDecoder(nn.Module):
    """Light transformer decoder: encoder tokens -> per-patch pixel predictions.

    The visible tokens (projected to ``dim``) and one shared learnable mask token per hidden
    patch are put back in grid order with ``restore``; fixed sin-cos position embeddings are
    added to every patch token (fixed, as in the MAE paper: no parameters, any ``rows x cols`` or
    ``time x rows x cols`` grid); prefix tokens (class/register) pass through without position embedding, and are
    dropped before the linear prediction of ``patch_dim`` values per patch.
    """

    def __init__(
        self,
        encoder_dim: int,
        grid: tuple[int, ...],
        patch_dim: int,
        num_prefix_tokens: int = 1,
        dim: int = 128,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        self.grid = tuple(grid)
        self.num_prefix_tokens = num_prefix_tokens
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_grid(dim, self.grid).unsqueeze(0), persistent=False)
        self.blocks = nn.Sequential(
            *(Block(dim, heads, mlp_ratio, qkv_bias=True, norm_layer=nn.LayerNorm) for _ in range(depth))
        )
        self.norm = nn.LayerNorm(dim)
        self.pred = nn.Linear(dim, patch_dim)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.normal_(self.mask_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, latent: Tensor, token_mask: TokenMask) -> Tensor:
        """``latent``: (B, prefix + K, encoder_dim) encoder output on the visible tokens -> (B, N, patch_dim)."""
        x = self.embed(latent)
        prefix, visible = x[:, : self.num_prefix_tokens], x[:, self.num_prefix_tokens :]
        batch, num_tokens = token_mask.restore.shape
        hidden = self.mask_token.expand(batch, num_tokens - visible.shape[1], -1)
        patches = gather_tokens(torch.cat([visible, hidden], dim=1), token_mask.restore) + self.pos_embed
        x = self.norm(self.blocks(torch.cat([prefix, patches], dim=1)))
        return self.pred(x[:, self.num_prefix_tokens :])


class MAE(SSLMethod):
    """Masked autoencoder on a ViT backbone: images, spectrograms (Audio-MAE) or clips (VideoMAE).

    Each sample hides ``mask_ratio`` of its patches (None: 0.75 for image ViTs, 0.9 for video
    ViTs); the encoder (the backbone, position embeddings added before masking) runs on the
    visible tokens only; ``MAEDecoder`` predicts the values of every patch; the loss is the MSE on
    hidden patches, against per-patch normalised values when ``norm_pix_loss`` (default).

    ``masking``: ``random`` hides patches independently per sample (MAE, Audio-MAE); ``tube``
    hides one random set of spatial positions in every time slice of a clip (VideoMAE: otherwise
    a hidden tubelet is copied from its neighbours in time); ``auto`` is tube for video backbones.

    Spectrograms: the patch grid may leave a remainder of frames or mel bins that fills no whole
    patch (101 frames, 8-frame patches); the patch embedding ignores it, and so do the loss and
    the figures (``PatchTokens.covered``).

    With ``fixed_pos_embed`` (default) the encoder's position embeddings are fixed sin-cos and
    frozen, as in the papers (they stay in the backbone's state dict, so exports carry them); on
    short runs this learns clearly faster than timm's learned embeddings, which start near zero
    and leave the encoder blind to where its few visible patches are.

    Only the first view of a batch is used (configs ask their views for ``num_views: 1``).

    Online probe: by default it is trained on the pooled feature of the same masked encoder pass
    (no extra forward pass) and evaluated on masked validation inputs (a fixed mask per batch),
    so train and evaluation inputs match; MAE's ``val/probe_acc`` therefore measures features of
    partly visible inputs and is not comparable with other methods' full-input probe. (Training on
    masked features but evaluating on full images put the probe at chance on the digits.)
    ``probe_full_images: true`` trains it on an extra no-grad pass over the full inputs instead:
    the standard, comparable probe, at roughly +60-85% step cost. The kNN monitor always uses full
    inputs. ``probe_lr`` defaults to 1e-2, a learning rate for AdamW (the base's 0.1 suits SGD).

    Each validation epoch (``ReconstructionFigures``, off with ``num_reconstructions: 0``), rank zero saves ``<log_dir>/reconstructions/epochNNNN.png`` (and logs
    it to TensorBoard when attached) for the first ``num_reconstructions`` samples of the
    validation set (second validation loader) under a fixed-seed mask: the original, the masked
    input (hidden patches grey) and the reconstruction with the visible patches pasted from the
    original, as in the paper's figures. Images and spectrograms give one row per sample (the
    three side by side); clips give three frame strips per sample. With ``norm_pix_loss`` the
    predictions are in per-patch normalised units; for display only they are mapped back with
    each original patch's own mean and standard deviation.

    Defaults follow the paper's recipe (AdamW, betas (0.9, 0.95), weight decay 0.05, base lr
    1.5e-4 per 256 samples, 40 warmup epochs) with a small decoder (128-d, 4 blocks, 4 heads)
    for small images; the paper's 224 px decoder is ``decoder_dim 512, decoder_depth 8,
    decoder_heads 16``. Decoder depth matters for the encoder's features (paper, Table 1a): on
    the digits 4 blocks gave clearly better kNN accuracy than 2 at little extra cost.
    """

    def __init__(
        self,
        backbone: str = "vit_tiny_patch16_224",
        optimizer: OptimizerName = "adamw",
        lr: float = 1.5e-4,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_epochs: float = 40.0,
        mask_ratio: float | None = None,
        masking: Literal["auto", "random", "tube"] = "auto",
        decoder_dim: int = 128,
        decoder_depth: int = 4,
        decoder_heads: int = 4,
        decoder_mlp_ratio: float = 4.0,
        norm_pix_loss: bool = True,
        fixed_pos_embed: bool = True,
        probe_full_images: bool = False,
        probe_lr: float = 0.01,
        num_reconstructions: int = 8,
        **kwargs,
    ) -> None:
        super().__init__(
            backbone=backbone,
            optimizer=optimizer,
            lr=lr,
            weight_decay=weight_decay,
            betas=betas,
            warmup_epochs=warmup_epochs,
            probe_lr=probe_lr,
            **kwargs,
        )
        self.patches: PatchTokens = patch_tokens(self.backbone)
        modality = "video" if self.patches.has_time else "image"
        self.mask_ratio = DEFAULT_MASK_RATIO[modality] if mask_ratio is None else mask_ratio
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        self.tube = masking == "tube" or (masking == "auto" and self.patches.has_time)
        if self.tube and not self.patches.has_time:
            raise ValueError(f"masking: tube needs a video backbone (video_vit_*), got {backbone}")
        if fixed_pos_embed:
            self.patches.fix_sincos_pos_embed()
        self.decoder = MAEDecoder(
            encoder_dim=self.patches.embed_dim,
            grid=self.patches.grid,
            patch_dim=self.patches.patch_dim,
            num_prefix_tokens=self.patches.num_prefix_tokens,
            dim=decoder_dim,
            depth=decoder_depth,
            heads=decoder_heads,
            mlp_ratio=decoder_mlp_ratio,
        )
        # VideoMAE standardises each channel of a tubelet; image and spectrogram MAE the whole patch
        norm_channels = self.patches.in_channels if self.patches.has_time else None
        self.criterion = MaskedReconstructionLoss(norm_pix_loss=norm_pix_loss, norm_channels=norm_channels)

    # -- the method ------------------------------------------------------------------------
    def random_mask(self, batch_size: int, generator: torch.Generator | None = None) -> TokenMask:
        if generator is None:
            return self.patches.random_mask(batch_size, self.mask_ratio, self.tube, self.device)
        mask = self.patches.random_mask(batch_size, self.mask_ratio, self.tube, "cpu", generator)
        return TokenMask(*(t.to(self.device) for t in (mask.keep, mask.restore, mask.mask)))

    def encode(self, inputs: Tensor, token_mask: TokenMask) -> Tensor:
        """Encoder tokens (prefix first) computed from the visible patches only."""
        return self.patches.tokens(inputs, token_mask.keep)

    def training_loss(self, views: list[Tensor]) -> tuple[Tensor, Tensor]:
        inputs = views[0]
        token_mask = self.random_mask(inputs.shape[0])
        latent = self.encode(inputs, token_mask)
        pred = self.decoder(latent, token_mask)
        loss = self.criterion(pred, self.patches.patchify(inputs), token_mask.mask)
        if self.hparams.probe_full_images:
            with torch.no_grad():
                return loss, self.backbone(inputs)
        return loss, self.patches.pooled(latent)

    # -- reconstructions and the probe ----------------------------------------------------
    @torch.no_grad()
    def reconstruct(self, inputs: Tensor, token_mask: TokenMask) -> Tensor:
        """Reconstructed inputs (input units, the covered part): hidden patches predicted, visible ones pasted."""
        target = self.patches.patchify(inputs)
        pred = self.decoder(self.encode(inputs, token_mask), token_mask)
        if self.criterion.norm_pix_loss:
            mean, std = patch_moments(target, self.criterion.eps, self.criterion.norm_channels)
            pred = pred * std + mean
        return self.patches.unpatchify(torch.where(token_mask.mask.unsqueeze(-1), pred, target))

    def probe_features(self, inputs: Tensor, features: Tensor, batch_idx: int) -> Tensor:
        """The probe is evaluated on the input it is trained on: masked inputs (a fixed mask per
        batch index) unless ``probe_full_images``; the kNN monitor keeps the full-input features."""
        if self.hparams.probe_full_images:
            return features
        token_mask = self.random_mask(inputs.shape[0], torch.Generator().manual_seed(FIGURE_MASK_SEED + batch_idx))
        return self.patches.pooled(self.encode(inputs, token_mask))

    def configure_callbacks(self) -> list[Callback]:
        return [ReconstructionFigures(self.hparams.num_reconstructions)] if self.hparams.num_reconstructions > 0 else []
