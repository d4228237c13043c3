"""MAE (He et al. 2022): a ViT encoder on the visible 25% of patches, a light decoder reconstructs the rest.

The pieces are modality-agnostic: masking (``ssl_kit.models.masking``), patches and position
embeddings (``ssl_kit.models.patches``) and the loss (``ssl_kit.losses.mae``) work on any
``(B, C, H, W)`` input with a ``rows x cols`` patch grid, so spectrogram MAEs reuse them.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from timm.models.vision_transformer import Block
from torch import Tensor, nn
from torchvision.utils import make_grid, save_image

from ssl_kit.losses.mae import MaskedReconstructionLoss
from ssl_kit.methods.base import SSLMethod
from ssl_kit.models.masking import TokenMask, gather_tokens, random_token_mask
from ssl_kit.models.patches import patch_moments, patchify, sincos_2d, unpatchify
from ssl_kit.models.vit import require_vit, vit_pooled, vit_tokens
from ssl_kit.optim import OptimizerName

#: Seed of the fixed mask used for the reconstruction figures (same mask every epoch).
FIGURE_MASK_SEED = 0
#: Tiny images are zoomed (nearest neighbour, integer factor) to about this side in the figures.
FIGURE_MIN_SIDE = 64


class MAEDecoder(nn.Module):
    """Light transformer decoder: encoder tokens -> per-patch pixel predictions.

    The visible tokens (projected to ``dim``) and one shared learnable mask token per hidden
    patch are put back in grid order with ``restore``; fixed 2-D sin-cos position embeddings are
    added to every patch token (fixed, as in the MAE paper: no parameters, any ``rows x cols``
    grid); prefix tokens (class/register) pass through without position embedding, and are
    dropped before the linear prediction of ``patch_dim`` values per patch.
    """

    def __init__(
        self,
        encoder_dim: int,
        grid: tuple[int, int],
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
        self.register_buffer("pos_embed", sincos_2d(dim, self.grid).unsqueeze(0), persistent=False)
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


def freeze_sincos_pos_embed(vit: nn.Module) -> None:
    """Sets a timm ViT's position embeddings to fixed 2-D sin-cos (zeros for prefix tokens) and
    freezes them, as the MAE paper does for its encoder."""
    if getattr(vit, "pos_embed", None) is None:
        return
    grid = tuple(vit.patch_embed.grid_size)
    num_patches = grid[0] * grid[1]
    with torch.no_grad():
        vit.pos_embed.zero_()
        vit.pos_embed[:, vit.pos_embed.shape[1] - num_patches :] = sincos_2d(vit.pos_embed.shape[-1], grid)
    vit.pos_embed.requires_grad_(False)


class MAE(SSLMethod):
    """Masked autoencoder on a timm ViT backbone.

    Each sample hides ``mask_ratio`` of its patches (per-sample random shuffle); the encoder
    (the backbone, position embeddings added before masking) runs on the visible tokens only;
    ``MAEDecoder`` predicts the pixels of every patch; the loss is the MSE on hidden patches,
    against per-patch normalised pixels when ``norm_pix_loss`` (default).

    With ``fixed_pos_embed`` (default) the encoder's position embeddings are fixed 2-D sin-cos and
    frozen, as in the paper (they stay in the backbone's state dict, so exports carry them); on
    short runs this learns clearly faster than timm's learned embeddings, which start near zero
    and leave the encoder blind to where its few visible patches are.

    Only the first view of a batch is used (configs use ``ImageViews`` with ``num_views: 1``).

    Online probe: by default it is trained on the pooled feature of the same masked encoder pass
    (no extra forward pass) and evaluated on masked validation images (a fixed mask per batch),
    so train and evaluation inputs match; MAE's ``val/probe_acc`` therefore measures features of
    25%-visible images and is not comparable with other methods' full-image probe. (Training on
    masked features but evaluating on full images put the probe at chance on the digits.)
    ``probe_full_images: true`` trains it on an extra no-grad pass over the full images instead:
    the standard, comparable probe, at roughly +60-85% step cost. The kNN monitor always uses full
    images. ``probe_lr`` defaults to 1e-2, a learning rate for AdamW (the base's 0.1 suits SGD).

    Each validation epoch, rank zero saves ``<log_dir>/reconstructions/epochNNNN.png`` (and logs
    it to TensorBoard when attached): rows are the first ``num_reconstructions`` images of the
    validation set (second validation loader) under a fixed-seed mask; columns are the original,
    the masked input (hidden patches grey) and the reconstruction with the visible patches pasted
    from the original, as in the paper's figures. With ``norm_pix_loss`` the predictions are in
    per-patch normalised units; for display only they are mapped back with each original patch's
    own mean and standard deviation.

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
        mask_ratio: float = 0.75,
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
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        vit = require_vit(self.backbone)
        if fixed_pos_embed:
            freeze_sincos_pos_embed(vit)
        self.mask_ratio = mask_ratio
        self.patch_size: tuple[int, int] = tuple(vit.patch_embed.patch_size)
        self.grid: tuple[int, int] = tuple(vit.patch_embed.grid_size)
        self.in_channels: int = vit.patch_embed.proj.in_channels
        self.num_patches = self.grid[0] * self.grid[1]
        self.decoder = MAEDecoder(
            encoder_dim=vit.embed_dim,
            grid=self.grid,
            patch_dim=self.patch_size[0] * self.patch_size[1] * self.in_channels,
            num_prefix_tokens=vit.num_prefix_tokens,
            dim=decoder_dim,
            depth=decoder_depth,
            heads=decoder_heads,
            mlp_ratio=decoder_mlp_ratio,
        )
        self.criterion = MaskedReconstructionLoss(norm_pix_loss=norm_pix_loss)
        self._figure_images: Tensor | None = None

    # -- the method ------------------------------------------------------------------------
    def random_mask(self, batch_size: int, generator: torch.Generator | None = None) -> TokenMask:
        if generator is None:
            return random_token_mask(batch_size, self.num_patches, self.mask_ratio, self.device)
        mask = random_token_mask(batch_size, self.num_patches, self.mask_ratio, "cpu", generator)
        return TokenMask(*(t.to(self.device) for t in (mask.keep, mask.restore, mask.mask)))

    def encode(self, images: Tensor, token_mask: TokenMask) -> Tensor:
        """Encoder tokens (prefix first) computed from the visible patches only."""
        return vit_tokens(self.backbone, images, token_mask.keep)

    def patchify(self, images: Tensor) -> Tensor:
        return patchify(images, self.patch_size)

    def unpatchify(self, patches: Tensor) -> Tensor:
        return unpatchify(patches, self.grid, self.patch_size, self.in_channels)

    def training_loss(self, views: list[Tensor]) -> tuple[Tensor, Tensor]:
        images = views[0]
        token_mask = self.random_mask(images.shape[0])
        latent = self.encode(images, token_mask)
        pred = self.decoder(latent, token_mask)
        loss = self.criterion(pred, self.patchify(images), token_mask.mask)
        if self.hparams.probe_full_images:
            with torch.no_grad():
                return loss, self.backbone(images)
        return loss, vit_pooled(self.backbone, latent)

    # -- reconstruction figures ------------------------------------------------------------
    @torch.no_grad()
    def reconstruct(self, images: Tensor, token_mask: TokenMask) -> Tensor:
        """Reconstructed images (input units): hidden patches predicted, visible ones pasted from ``images``."""
        target = self.patchify(images)
        pred = self.decoder(self.encode(images, token_mask), token_mask)
        if self.criterion.norm_pix_loss:
            mean, std = patch_moments(target, self.criterion.eps)
            pred = pred * std + mean
        return self.unpatchify(torch.where(token_mask.mask.unsqueeze(-1), pred, target))

    def _display(self, images: Tensor) -> Tensor:
        """Input units -> [0, 1] with the DataModule's mean/std (identity without them)."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        mean, std = getattr(datamodule, "mean", None), getattr(datamodule, "std", None)
        if mean is not None and std is not None and len(mean) == images.shape[1] == len(std):
            shape = (1, -1, 1, 1)
            images = images * torch.tensor(std, device=images.device).view(shape) + torch.tensor(
                mean, device=images.device
            ).view(shape)
        return images.clamp(0.0, 1.0)

    @torch.no_grad()
    def reconstruction_grid(self, images: Tensor, seed: int = FIGURE_MASK_SEED) -> Tensor:
        """``(3, H', W')`` figure in [0, 1]: one row per image; original | masked | reconstruction."""
        images = images.to(self.device)
        token_mask = self.random_mask(images.shape[0], torch.Generator().manual_seed(seed))
        original = self._display(images)
        recon = self._display(self.reconstruct(images, token_mask))
        grey = torch.full_like(self.patchify(original), 0.5)
        masked = self.unpatchify(torch.where(token_mask.mask.unsqueeze(-1), grey, self.patchify(original)))
        panels = torch.stack([original, masked, recon], dim=1).flatten(0, 1)
        if panels.shape[1] not in (1, 3):
            panels = panels[:, :1]
        zoom = max(1, FIGURE_MIN_SIDE // max(panels.shape[-2:]))
        if zoom > 1:
            panels = F.interpolate(panels, scale_factor=zoom, mode="nearest")
        return make_grid(panels.float().cpu(), nrow=3, padding=2, pad_value=1.0)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        """As ``SSLMethod.validation_step`` (kNN on full images), but the probe is evaluated on the
        input it is trained on: masked images (a fixed mask per batch index) unless ``probe_full_images``."""
        images, labels = batch
        features = self.backbone(images)
        if dataloader_idx == 0:
            self._bank.append((features, labels))
            return
        self._queries.append((features, labels))
        if batch_idx == 0:
            self._figure_images = images[: self.hparams.num_reconstructions].detach().clone()
        if not self.hparams.probe_full_images:
            token_mask = self.random_mask(images.shape[0], torch.Generator().manual_seed(FIGURE_MASK_SEED + batch_idx))
            features = vit_pooled(self.backbone, self.encode(images, token_mask))
        self.probe_accuracy(self.probe(features), labels)
        self.log("val/probe_acc", self.probe_accuracy, prog_bar=True, add_dataloader_idx=False)

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        images, self._figure_images = self._figure_images, None
        if self.trainer.sanity_checking:
            return
        # trainer.log_dir broadcasts from rank zero: every rank must ask for it.
        root = self.trainer.log_dir or self.trainer.default_root_dir
        if images is not None:
            self._save_reconstructions(images, Path(root) / "reconstructions" / f"epoch{self.current_epoch:04d}.png")

    @rank_zero_only
    def _save_reconstructions(self, images: Tensor, path: Path) -> None:
        grid = self.reconstruction_grid(images)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(grid, path)
        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("val/reconstructions", grid, global_step=self.global_step)
