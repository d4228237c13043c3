"""Token-level access to patch backbones, so masked methods (MAE, MSN) are written once for
images, spectrograms and video.

``patch_tokens(backbone)`` wraps a timm ``VisionTransformer`` (images; spectrograms with
``in_chans: 1`` and a non-square ``rows x cols`` grid) or ssl_kit's ``VideoViT`` (tubelets on a
``time x rows x cols`` grid) in the same interface: the patch grid, patchify / unpatchify of the
inputs it covers, encoder tokens from a subset of visible patches, the pooled feature, and the
masking that suits the modality.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from timm.layers import Format
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from ssl_kit.models.masking import TokenMask, gather_tokens, random_token_mask, tube_token_mask
from ssl_kit.models.patches import patchify, sincos_grid, unpatchify
from ssl_kit.models.video import VideoViT


class PatchTokens(ABC):
    """A patch backbone seen as a token sequence: ``grid`` (tokens per axis, row-major order),
    ``patch_size`` per axis, ``num_prefix_tokens`` (class/register tokens, never masked)."""

    backbone: nn.Module
    grid: tuple[int, ...]
    patch_size: tuple[int, ...]
    in_channels: int
    num_prefix_tokens: int
    embed_dim: int
    #: Whether masking can hide the same spatial positions in every time slice (VideoMAE).
    has_time = False

    @property
    def num_patches(self) -> int:
        return math.prod(self.grid)

    @property
    def patch_dim(self) -> int:
        """Values per patch (the prediction size of a pixel decoder)."""
        return math.prod(self.patch_size) * self.in_channels

    def num_tokens(self, inputs: Tensor) -> int:
        """Patch tokens of an input of this shape (multi-crop views differ from the built size)."""
        return math.prod(side // patch for side, patch in zip(inputs.shape[2:], self.patch_size))

    def covered(self, inputs: Tensor) -> Tensor:
        """The part of ``inputs`` the patch grid covers: the patch embedding ignores a remainder
        that does not fill a whole patch (e.g. 101 spectrogram frames with 8-frame patches)."""
        for axis, (cells, patch) in enumerate(zip(self.grid, self.patch_size), start=2):
            inputs = inputs.narrow(axis, 0, cells * patch)
        return inputs

    def patchify(self, inputs: Tensor) -> Tensor:
        return patchify(self.covered(inputs), self.patch_size)

    def unpatchify(self, patches: Tensor) -> Tensor:
        return unpatchify(patches, self.grid, self.patch_size, self.in_channels)

    def random_mask(
        self, batch_size: int, mask_ratio: float, tube: bool, device: torch.device | str = "cpu",
        generator: torch.Generator | None = None,
    ) -> TokenMask:  # fmt: skip
        """Per-sample random masking of the patch tokens; ``tube``: one spatial mask repeated over time."""
        if tube:
            if not self.has_time:
                raise ValueError(f"tube masking needs a video backbone, got {type(self.backbone).__name__}")
            return tube_token_mask(batch_size, self.grid[0], math.prod(self.grid[1:]), mask_ratio, device, generator)
        return random_token_mask(batch_size, self.num_patches, mask_ratio, device, generator)

    @abstractmethod
    def tokens(self, inputs: Tensor, keep: Tensor | None = None) -> Tensor:
        """Encoder output tokens, prefix tokens first; position embeddings are added before
        masking, so with ``keep`` (B, K) only those patch tokens (plus the prefix) enter the blocks."""

    @abstractmethod
    def pooled(self, tokens: Tensor) -> Tensor:
        """The backbone's pooled feature from encoder tokens (as ``backbone(inputs)`` pools)."""

    def block_outputs(self, inputs: Tensor) -> list[Tensor]:
        """Every transformer block's output tokens (prefix first, before the final norm) for the
        full input, in block order: data2vec 2.0's teacher averages the top ones into its targets.
        Read by forward hooks on ``backbone.blocks`` during ``tokens``, so both ViT kinds share it."""
        outputs: list[Tensor] = []
        handles = [block.register_forward_hook(lambda module, args, output: outputs.append(output)) for block in self.backbone.blocks]
        try:
            self.tokens(inputs)
        finally:
            for handle in handles:
                handle.remove()
        return outputs

    def tokens_with_mask_token(self, inputs: Tensor, mask: Tensor, mask_token: Tensor) -> Tensor:
        """Encoder output tokens (prefix first, every patch token kept) with the patch embeddings
        where ``mask`` (B, N) is True replaced by ``mask_token`` (D,) *before* the position
        embeddings are added (BEiT, iBOT): the encoder knows where a patch is hidden, not what it held."""
        raise NotImplementedError(f"{type(self).__name__} has no mask-token forward")

    @abstractmethod
    def fix_sincos_pos_embed(self) -> None:
        """Fixed sin-cos position embeddings (zeros for prefix tokens), frozen, as MAE and VideoMAE
        use; they stay in the state dict, so exports carry them."""


class ImageViTTokens(PatchTokens):
    """A timm ``VisionTransformer`` on images or spectrograms."""

    def __init__(self, vit: VisionTransformer) -> None:
        self.backbone = vit
        self.grid = tuple(vit.patch_embed.grid_size)
        self.patch_size = tuple(vit.patch_embed.patch_size)
        self.in_channels = vit.patch_embed.proj.in_channels
        self.num_prefix_tokens = vit.num_prefix_tokens
        self.embed_dim = vit.embed_dim

    def tokens(self, inputs: Tensor, keep: Tensor | None = None) -> Tensor:
        vit = self.backbone
        tokens = vit._pos_embed(vit.patch_embed(inputs))
        if keep is not None:
            prefix = vit.num_prefix_tokens
            tokens = torch.cat([tokens[:, :prefix], gather_tokens(tokens[:, prefix:], keep)], dim=1)
        return vit.norm(vit.blocks(vit.norm_pre(tokens)))

    def tokens_with_mask_token(self, inputs: Tensor, mask: Tensor, mask_token: Tensor) -> Tensor:
        vit = self.backbone
        tokens = vit._pos_embed(with_mask_token(vit.patch_embed(inputs), mask, mask_token))
        return vit.norm(vit.blocks(vit.norm_pre(tokens)))

    def pooled(self, tokens: Tensor) -> Tensor:
        return self.backbone.forward_head(tokens, pre_logits=True)

    def fix_sincos_pos_embed(self) -> None:
        pos_embed = getattr(self.backbone, "pos_embed", None)
        if pos_embed is None:
            return
        with torch.no_grad():
            pos_embed.zero_()
            pos_embed[:, pos_embed.shape[1] - self.num_patches :] = sincos_grid(pos_embed.shape[-1], self.grid)
        pos_embed.requires_grad_(False)

    def allow_any_input_size(self) -> None:
        """Inputs of other sizes than the built one (multi-crop): timm's ``dynamic_img_size`` and
        ``dynamic_img_pad`` behaviour (a remainder that fills no whole patch is zero-padded, and
        the position embeddings are resampled to the input's grid), switched on after
        construction so parameters and exports stay plain timm."""
        vit = self.backbone
        vit.dynamic_img_size = True
        vit.patch_embed.strict_img_size = False
        vit.patch_embed.dynamic_img_pad = True
        vit.patch_embed.flatten = False
        vit.patch_embed.output_fmt = Format.NHWC


class VideoViTTokens(PatchTokens):
    """ssl_kit's ``VideoViT``: time-major tubelet tokens, no prefix tokens, mean pooling."""

    has_time = True

    def __init__(self, vit: VideoViT) -> None:
        self.backbone = vit
        self.grid = tuple(vit.grid)
        self.patch_size = tuple(vit.patch_embed.kernel_size)
        self.in_channels = vit.patch_embed.in_channels
        self.num_prefix_tokens = 0
        self.embed_dim = vit.embed_dim

    def tokens(self, inputs: Tensor, keep: Tensor | None = None) -> Tensor:
        return self.backbone.tokens(inputs, keep)

    def tokens_with_mask_token(self, inputs: Tensor, mask: Tensor, mask_token: Tensor) -> Tensor:
        vit = self.backbone
        embeddings = vit.patch_embed(inputs).flatten(2).transpose(1, 2)
        return vit.norm(vit.blocks(with_mask_token(embeddings, mask, mask_token) + vit.pos_embed))

    def pooled(self, tokens: Tensor) -> Tensor:
        return self.backbone.forward_head(tokens, pre_logits=True)

    def fix_sincos_pos_embed(self) -> None:
        with torch.no_grad():
            self.backbone.pos_embed.copy_(sincos_grid(self.embed_dim, self.grid).unsqueeze(0))
        self.backbone.pos_embed.requires_grad_(False)


def with_mask_token(embeddings: Tensor, mask: Tensor, mask_token: Tensor) -> Tensor:
    """Patch embeddings (B, N, D), or (B, H, W, D) from a ViT that allows any input size, with
    ``mask_token`` wherever the row-major (B, N) ``mask`` is True."""
    return torch.where(mask.view(*embeddings.shape[:-1], 1), mask_token.to(embeddings.dtype), embeddings)


def patch_tokens(backbone: nn.Module) -> PatchTokens:
    """The token interface of a ViT backbone; other backbones raise ``TypeError``."""
    if isinstance(backbone, VisionTransformer):
        return ImageViTTokens(backbone)
    if isinstance(backbone, VideoViT):
        return VideoViTTokens(backbone)
    raise TypeError(
        f"this method needs a ViT backbone (e.g. vit_tiny_patch16_224, or video_vit_tiny for clips), got {type(backbone).__name__}"
    )
