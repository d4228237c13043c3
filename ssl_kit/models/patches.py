"""Patch helpers independent of masking and modality: images, spectrograms, any ``(B, C, H, W)`` grid.

Token order is row-major over the patch grid (``rows x cols``), the order of timm's ``PatchEmbed``;
inside a patch the values are ordered ``(row, col, channel)``, channels last, as in the MAE
reference code. ``unpatchify`` is the exact inverse of ``patchify``.
"""

from __future__ import annotations

import torch
from torch import Tensor

Size2 = int | tuple[int, int]


def pair(value: Size2) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    first, second = value
    return int(first), int(second)


def grid_shape(height: int, width: int, patch_size: Size2) -> tuple[int, int]:
    """``(rows, cols)`` of the patch grid; the patch must tile the input exactly."""
    ph, pw = pair(patch_size)
    if height % ph or width % pw:
        raise ValueError(f"patch {ph}x{pw} does not tile a {height}x{width} input")
    return height // ph, width // pw


def patchify(inputs: Tensor, patch_size: Size2) -> Tensor:
    """``(B, C, H, W)`` -> ``(B, rows * cols, ph * pw * C)``."""
    batch, channels, height, width = inputs.shape
    ph, pw = pair(patch_size)
    rows, cols = grid_shape(height, width, (ph, pw))
    x = inputs.reshape(batch, channels, rows, ph, cols, pw)
    x = x.permute(0, 2, 4, 3, 5, 1)  # B, rows, cols, ph, pw, C
    return x.reshape(batch, rows * cols, ph * pw * channels)


def unpatchify(patches: Tensor, grid: tuple[int, int], patch_size: Size2, channels: int) -> Tensor:
    """``(B, rows * cols, ph * pw * C)`` -> ``(B, C, rows * ph, cols * pw)``; inverse of ``patchify``."""
    rows, cols = grid
    ph, pw = pair(patch_size)
    batch, tokens, dim = patches.shape
    if tokens != rows * cols or dim != ph * pw * channels:
        raise ValueError(
            f"patches of shape {tuple(patches.shape)} do not match a {rows}x{cols} grid of {ph}x{pw}x{channels} patches"
        )
    x = patches.reshape(batch, rows, cols, ph, pw, channels)
    x = x.permute(0, 5, 1, 3, 2, 4)  # B, C, rows, ph, cols, pw
    return x.reshape(batch, channels, rows * ph, cols * pw)


def patch_moments(patches: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Per-patch mean and ``sqrt(var + eps)`` (unbiased variance, as in the MAE reference code)."""
    mean = patches.mean(dim=-1, keepdim=True)
    std = (patches.var(dim=-1, keepdim=True) + eps).sqrt()
    return mean, std


def normalize_patches(patches: Tensor, eps: float = 1e-6) -> Tensor:
    """Each patch standardised by its own mean and variance (MAE's ``norm_pix_loss`` target)."""
    mean, std = patch_moments(patches, eps)
    return (patches - mean) / std


def sincos_1d(dim: int, positions: Tensor) -> Tensor:
    """``(len(positions), dim)``: sines in the first half, cosines in the second (transformer frequencies)."""
    if dim % 2:
        raise ValueError(f"1-D sin-cos embedding needs an even dimension, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.to(torch.float64).reshape(-1, 1) * omega.reshape(1, -1)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(dim: int, grid: tuple[int, int]) -> Tensor:
    """Fixed 2-D sin-cos position embedding ``(rows * cols, dim)`` in row-major token order.

    Half the channels encode the row, half the column, so non-square grids (spectrograms:
    frequency x time) are embedded without distortion. ``dim`` must be divisible by 4.
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a dimension divisible by 4, got {dim}")
    rows, cols = grid
    row_idx, col_idx = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    embedding = torch.cat([sincos_1d(dim // 2, row_idx.flatten()), sincos_1d(dim // 2, col_idx.flatten())], dim=1)
    return embedding.float()

