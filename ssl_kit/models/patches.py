"""Patch helpers independent of masking and modality: images, spectrograms (``(B, C, H, W)``) and clips (``(B, C, T, H, W)``).

Token order is row-major over the patch grid (``rows x cols``, or ``time x rows x cols``), the
order of timm's ``PatchEmbed`` and of a flattened 3-D convolution; inside a patch the values are
ordered ``(row, col, channel)`` (``(time, row, col, channel)``), channels last, as in the MAE
reference code. ``unpatchify`` is the exact inverse of ``patchify``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

PatchSize = int | tuple[int, ...]


def patch_shape(patch_size: PatchSize, dims: int) -> tuple[int, ...]:
    """A patch size per axis; an int is the same side on every axis."""
    if isinstance(patch_size, int):
        return (patch_size,) * dims
    if len(patch_size) != dims:
        raise ValueError(f"patch size {tuple(patch_size)} has {len(patch_size)} axes, the input {dims}")
    return tuple(int(side) for side in patch_size)


def grid_shape(shape: tuple[int, ...], patch_size: PatchSize) -> tuple[int, ...]:
    """Patches per axis of an input of spatial ``shape``; the patch must tile it exactly."""
    patch = patch_shape(patch_size, len(shape))
    if any(side % step for side, step in zip(shape, patch)):
        raise ValueError(f"patch {'x'.join(map(str, patch))} does not tile a {'x'.join(map(str, shape))} input")
    return tuple(side // step for side, step in zip(shape, patch))


def patchify(inputs: Tensor, patch_size: PatchSize) -> Tensor:
    """``(B, C, *spatial)`` -> ``(B, prod(grid), prod(patch) * C)``; 2-D images, spectrograms, or
    ``(B, C, T, H, W)`` clips cut into tubelets."""
    batch, channels, *shape = inputs.shape
    patch = patch_shape(patch_size, len(shape))
    grid = grid_shape(tuple(shape), patch)
    x = inputs.reshape(batch, channels, *(n for pair in zip(grid, patch) for n in pair))
    dims = len(shape)
    x = x.permute(0, *range(2, 2 + 2 * dims, 2), *range(3, 3 + 2 * dims, 2), 1)  # B, grid..., patch..., C
    return x.reshape(batch, math.prod(grid), math.prod(patch) * channels)


def unpatchify(patches: Tensor, grid: tuple[int, ...], patch_size: PatchSize, channels: int) -> Tensor:
    """``(B, prod(grid), prod(patch) * C)`` -> ``(B, C, *(grid * patch))``; inverse of ``patchify``."""
    patch = patch_shape(patch_size, len(grid))
    batch, tokens, dim = patches.shape
    if tokens != math.prod(grid) or dim != math.prod(patch) * channels:
        raise ValueError(
            f"patches of shape {tuple(patches.shape)} do not match a {'x'.join(map(str, grid))} grid of "
            f"{'x'.join(map(str, patch))}x{channels} patches"
        )
    dims = len(grid)
    x = patches.reshape(batch, *grid, *patch, channels)
    x = x.permute(0, 2 * dims + 1, *(axis for i in range(dims) for axis in (1 + i, 1 + dims + i)))  # B, C, (grid_i, patch_i)...
    return x.reshape(batch, channels, *(cells * side for cells, side in zip(grid, patch)))


def patch_moments(patches: Tensor, eps: float = 1e-6, channels: int | None = None) -> tuple[Tensor, Tensor]:
    """Per-patch mean and standard deviation, broadcastable to ``patches`` (unbiased variance).

    ``channels`` None (MAE): over all values of a patch, std ``sqrt(var + eps)``. ``channels`` C
    (VideoMAE): per channel within the patch (values are channel-last), std ``sqrt(var) + eps``,
    as in the official VideoMAE code."""
    if channels is None:
        return patches.mean(dim=-1, keepdim=True), (patches.var(dim=-1, keepdim=True) + eps).sqrt()
    values = patches.unflatten(-1, (-1, channels))
    mean = values.mean(dim=-2, keepdim=True).expand_as(values).flatten(-2)
    std = (values.var(dim=-2, keepdim=True).sqrt() + eps).expand_as(values).flatten(-2)
    return mean, std


def normalize_patches(patches: Tensor, eps: float = 1e-6, channels: int | None = None) -> Tensor:
    """Each patch standardised by its own moments (``patch_moments``): the ``norm_pix_loss`` target."""
    mean, std = patch_moments(patches, eps, channels)
    return (patches - mean) / std


def sincos_1d(dim: int, positions: Tensor) -> Tensor:
    """``(len(positions), dim)``: sines in the first half, cosines in the second (transformer frequencies)."""
    if dim % 2:
        raise ValueError(f"1-D sin-cos embedding needs an even dimension, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.to(torch.float64).reshape(-1, 1) * omega.reshape(1, -1)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_grid(dim: int, grid: tuple[int, ...]) -> Tensor:
    """Fixed sin-cos position embedding ``(prod(grid), dim)`` in row-major token order.

    Each axis gets its own block of channels (equal, even-sized blocks; the first axis takes any
    remainder), so non-square grids (spectrograms: frequency x time) and video grids (time x
    rows x cols) are embedded without distortion. On a 2-D grid with ``dim`` divisible by 4 this
    is MAE's 2-D embedding: half the channels for the row, half for the column.
    """
    block = 2 * (dim // (2 * len(grid)))
    if dim % 2 or block == 0:
        raise ValueError(f"a sin-cos embedding of a {len(grid)}-axis grid needs an even dimension >= {2 * len(grid)}, got {dim}")
    sizes = [dim - block * (len(grid) - 1)] + [block] * (len(grid) - 1)
    coords = torch.meshgrid(*(torch.arange(cells) for cells in grid), indexing="ij")
    embedding = torch.cat([sincos_1d(size, axis.flatten()) for size, axis in zip(sizes, coords)], dim=1)
    return embedding.float()
