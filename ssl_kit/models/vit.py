"""Token-level access to timm Vision Transformers, so methods can mask patches before the encoder."""

from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

from ssl_kit.models.masking import gather_tokens


def require_vit(backbone: torch.nn.Module) -> VisionTransformer:
    if not isinstance(backbone, VisionTransformer):
        raise TypeError(f"this method needs a ViT backbone (e.g. vit_tiny_patch16_224), got {type(backbone).__name__}")
    return backbone


def vit_tokens(vit: VisionTransformer, images: Tensor, keep: Tensor | None = None) -> Tensor:
    """Encoder output tokens, prefix (class/register) tokens first.

    Position embeddings are added before masking, so with ``keep`` (B, K) only those patch
    tokens, plus the prefix tokens, enter the transformer blocks.
    """
    tokens = vit._pos_embed(vit.patch_embed(images))
    if keep is not None:
        prefix = vit.num_prefix_tokens
        tokens = torch.cat([tokens[:, :prefix], gather_tokens(tokens[:, prefix:], keep)], dim=1)
    tokens = vit.blocks(vit.norm_pre(tokens))
    return vit.norm(tokens)


def vit_pooled(vit: VisionTransformer, tokens: Tensor) -> Tensor:
    """The backbone's pooled feature (class token or mean, as configured) from encoder tokens."""
    return vit.forward_head(tokens, pre_logits=True)
