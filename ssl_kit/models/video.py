"""Video ViT on tubelet tokens (VideoMAE-style), built from timm's transformer blocks and
registered with timm, so ``backbone: video_vit_tiny`` works like any timm name."""

from __future__ import annotations

import torch
from timm.layers import trunc_normal_
from timm.models import register_model
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from ssl_kit.models.masking import gather_tokens
from ssl_kit.models.registry import architecture_kwargs


class VideoViT(nn.Module):
    """Clips ``(B, C, T, H, W)`` cut into ``tubelet_size x patch_size x patch_size`` tubelets
    (a 3-D convolution), learnable position embeddings, timm ``Block``s, and the mean of the
    output tokens as the feature (VideoMAE's pooling). Tokens are time-major: token ``t * S + s``
    is spatial position ``s`` of time slice ``t``, which tube masking relies on."""

    def __init__(
        self,
        img_size: int = 224,
        num_frames: int = 16,
        patch_size: int = 16,
        tubelet_size: int = 2,
        in_chans: int = 3,
        embed_dim: int = 192,
        depth: int = 12,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        num_classes: int = 0,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if img_size % patch_size or num_frames % tubelet_size:
            raise ValueError(
                f"a {num_frames} x {img_size} x {img_size} clip does not tile into {tubelet_size} x {patch_size} x {patch_size} tubelets"
            )
        self.grid = (num_frames // tubelet_size, img_size // patch_size, img_size // patch_size)
        self.num_features = self.embed_dim = embed_dim
        self.patch_embed = nn.Conv3d(in_chans, embed_dim, (tubelet_size, patch_size, patch_size), (tubelet_size, patch_size, patch_size))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1] * self.grid[2], embed_dim))
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.Sequential(*[Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, drop_path=rate) for rate in rates])
        self.norm = nn.LayerNorm(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes else nn.Identity()
        trunc_normal_(self.pos_embed, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    @property
    def spatial_tokens(self) -> int:
        return self.grid[1] * self.grid[2]

    def tokens(self, clips: Tensor, keep: Tensor | None = None) -> Tensor:
        """Encoder output tokens; with ``keep`` (B, K) only those tubelets enter the blocks."""
        x = self.patch_embed(clips).flatten(2).transpose(1, 2) + self.pos_embed
        if keep is not None:
            x = gather_tokens(x, keep)
        return self.norm(self.blocks(x))

    def forward_head(self, tokens: Tensor, pre_logits: bool = False) -> Tensor:
        pooled = self.head_drop(tokens.mean(dim=1))
        return pooled if pre_logits else self.head(pooled)

    def forward(self, clips: Tensor) -> Tensor:
        return self.forward_head(self.tokens(clips))


def _video_vit(pretrained: bool, **kwargs) -> VideoViT:
    return VideoViT(**architecture_kwargs("video ViTs", pretrained, kwargs))


@register_model
def video_vit_tiny(pretrained: bool = False, **kwargs) -> VideoViT:
    """ViT-Tiny widths (192-d, 12 blocks, 3 heads) on tubelets."""
    return _video_vit(pretrained, **{"embed_dim": 192, "depth": 12, "num_heads": 3, **kwargs})


@register_model
def video_vit_small(pretrained: bool = False, **kwargs) -> VideoViT:
    """ViT-Small widths (384-d, 12 blocks, 6 heads) on tubelets."""
    return _video_vit(pretrained, **{"embed_dim": 384, "depth": 12, "num_heads": 6, **kwargs})
