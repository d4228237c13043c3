"""Random masking of token sequences, independent of modality.

Works on any ``(batch, tokens, dim)`` sequence of patch tokens: image patches, spectrogram
patches, or video tubelets. Grouped masking (one mask shared by several token groups, e.g.
VideoMAE's tube masking over time slices) builds on the same ``TokenMask``.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class TokenMask:
    """``keep``: (B, K) indices of visible tokens; ``restore``: (B, N) permutation that puts the
    sequence ``[visible tokens, masked tokens]`` back in original order; ``mask``: (B, N) bool,
    True where a token is hidden from the encoder."""

    keep: Tensor
    restore: Tensor
    mask: Tensor


def random_token_mask(
    batch_size: int, num_tokens: int, mask_ratio: float, device: torch.device | str = "cpu", generator: torch.Generator | None = None
) -> TokenMask:
    """Per-sample random masking by shuffling (MAE): every sample hides exactly
    ``round(num_tokens * mask_ratio)`` tokens, chosen uniformly at random."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    num_keep = num_tokens - int(round(num_tokens * mask_ratio))
    noise = torch.rand(batch_size, num_tokens, device=device, generator=generator)
    shuffle = noise.argsort(dim=1)
    restore = shuffle.argsort(dim=1)
    mask = torch.ones(batch_size, num_tokens, dtype=torch.bool, device=device)
    mask[:, :num_keep] = False
    return TokenMask(keep=shuffle[:, :num_keep], restore=restore, mask=mask.gather(1, restore))


def gather_tokens(tokens: Tensor, index: Tensor) -> Tensor:
    """``tokens[b, index[b]]`` for a (B, N, D) sequence and (B, K) indices."""
    return tokens.gather(1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def tube_token_mask(
    batch_size: int, time_slices: int, spatial_tokens: int, mask_ratio: float,
    device: torch.device | str = "cpu", generator: torch.Generator | None = None,
) -> TokenMask:  # fmt: skip
    """VideoMAE's tube masking for time-major tokens (token ``t * S + s``): one random spatial
    mask per sample, the same in every time slice, so a hidden patch cannot be copied from its
    neighbours in time."""
    spatial = random_token_mask(batch_size, spatial_tokens, mask_ratio, device, generator)
    offsets = torch.arange(time_slices, device=device).view(1, -1, 1) * spatial_tokens

    def over_time(index: Tensor) -> Tensor:
        return (offsets + index.unsqueeze(1)).flatten(1)

    hidden = spatial.restore.argsort(dim=1)[:, spatial.keep.shape[1] :]  # the masked spatial positions
    shuffle = torch.cat([over_time(spatial.keep), over_time(hidden)], dim=1)
    return TokenMask(keep=over_time(spatial.keep), restore=shuffle.argsort(dim=1), mask=spatial.mask.repeat(1, time_slices))


@dataclass
class MultiBlockMasks:
    """I-JEPA's masks for a batch: ``context`` (B, K) sorted indices of the tokens the context
    encoder sees; ``targets`` (B, num_targets, M) sorted indices of each target block's tokens.
    K and M are the same for every sample, so the indices stack."""

    context: Tensor
    targets: Tensor


def multi_block_shape(rows: int, cols: int, scale: float, aspect_ratio: float) -> tuple[int, int]:
    """(height, width) in tokens of a block covering ``scale`` of a ``rows x cols`` grid with
    height / width ``aspect_ratio``, each side rounded, at least 1. A side longer than the grid is
    cut to it and the other side grows to keep the area where the grid allows, so a square context
    block on a non-square spectrogram grid still covers about ``scale`` of it."""
    area = scale * rows * cols
    height = max(1, round((area * aspect_ratio) ** 0.5))
    width = max(1, round((area / aspect_ratio) ** 0.5))
    if height > rows:
        height, width = rows, min(cols, max(1, round(area / rows)))
    elif width > cols:
        height, width = min(rows, max(1, round(area / cols))), cols
    return height, width


def _multi_block_rectangles(
    height: int, width: int, rows: int, cols: int, shape: tuple[int, ...], generator: torch.Generator | None
) -> Tensor:
    """``(*shape, rows, cols)`` bool: a ``height x width`` block at a uniformly random position each."""
    top = torch.randint(0, rows - height + 1, shape, generator=generator).unsqueeze(-1)
    left = torch.randint(0, cols - width + 1, shape, generator=generator).unsqueeze(-1)
    row, col = torch.arange(rows), torch.arange(cols)
    in_rows = (row >= top) & (row < top + height)
    in_cols = (col >= left) & (col < left + width)
    return in_rows.unsqueeze(-1) & in_cols.unsqueeze(-2)


def multi_block_masks(
    batch_size: int,
    grid: tuple[int, ...],
    num_targets: int = 4,
    target_scale: tuple[float, float] = (0.15, 0.2),
    target_aspect_ratio: tuple[float, float] = (0.75, 1.5),
    context_scale: tuple[float, float] = (0.85, 1.0),
    min_context: int = 10,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
    max_attempts: int = 1000,
) -> MultiBlockMasks:
    """I-JEPA's multi-block masking on a ``(rows, cols)`` token grid, or a ``(time, rows, cols)``
    grid of time-major video tokens, where each block is drawn over rows x cols and spans every
    time slice (a tube: a target is not copied from its neighbours in time).

    Per batch, as in the official collator, one target block shape (scale and aspect ratio
    uniform in their ranges) and one square context block shape (scale in ``context_scale``);
    per sample, ``num_targets`` target blocks and one context block at uniformly random
    positions (they may overlap each other), and the context loses every target token. A sample
    whose context keeps fewer than ``min_context`` tokens draws all its blocks again. Contexts
    are then cut to the smallest count in the batch by dropping random tokens, so the indices
    stack (every target block has the same size already).

    Differences from the official sampler, on purpose: scale and aspect ratio are independent
    draws (the official code reuses one random number for both); blocks may touch the last row
    and column and span the whole grid (the official code never places them there); a too-small
    context is drawn again instead of being allowed to overlap targets, so the context never
    contains a target token; contexts are cut by random tokens, not by their last rows.
    """
    if len(grid) not in (2, 3):
        raise ValueError(f"multi-block masking needs a (rows, cols) or (time, rows, cols) grid, got {tuple(grid)}")
    *time, rows, cols = grid
    time_slices = time[0] if time else 1

    def uniform(bounds: tuple[float, float]) -> float:
        low, high = bounds
        return low + (high - low) * torch.rand((), generator=generator).item()

    target_shape = multi_block_shape(rows, cols, uniform(target_scale), uniform(target_aspect_ratio))
    context_shape = multi_block_shape(rows, cols, uniform(context_scale), 1.0)
    min_positions = -(-min_context // time_slices)  # spatial positions, each a token in every time slice
    targets = torch.zeros(batch_size, num_targets, rows, cols, dtype=torch.bool)
    context = torch.zeros(batch_size, rows, cols, dtype=torch.bool)
    pending = torch.arange(batch_size)
    for _ in range(max_attempts):
        drawn = _multi_block_rectangles(*target_shape, rows, cols, (len(pending), num_targets), generator)
        visible = _multi_block_rectangles(*context_shape, rows, cols, (len(pending),), generator) & ~drawn.any(dim=1)
        done = visible.flatten(1).sum(dim=1) >= min_positions
        targets[pending[done]], context[pending[done]] = drawn[done], visible[done]
        pending = pending[~done]
        if len(pending) == 0:
            break
    else:
        raise ValueError(
            f"multi-block masking: no context of at least {min_context} tokens outside {num_targets} target blocks of "
            f"{target_shape[0]}x{target_shape[1]} on a {'x'.join(map(str, grid))} grid in {max_attempts} attempts; "
            "lower min_context or num_targets, or use smaller patches"
        )
    spatial = rows * cols
    target_index = targets.flatten(2).nonzero()[:, 2].view(batch_size, num_targets, -1)  # row-major: sorted per block
    context = context.flatten(1)
    keep = int(context.sum(dim=1).min())
    scores = torch.rand(batch_size, spatial, generator=generator).masked_fill(~context, 2.0)  # context tokens first
    context_index = scores.argsort(dim=1)[:, :keep].sort(dim=1).values

    def over_time(index: Tensor) -> Tensor:
        offsets = torch.arange(time_slices).unsqueeze(-1) * spatial
        return (offsets + index.unsqueeze(-2)).flatten(-2)

    return MultiBlockMasks(context=over_time(context_index).to(device), targets=over_time(target_index).to(device))


def token_mask_from_hidden(hidden: Tensor) -> TokenMask:
    """The ``TokenMask`` of a (B, N) bool mask (True: hidden) that hides the same number of tokens
    in every sample; visible and hidden tokens each stay in grid order."""
    counts = hidden.sum(dim=1)
    if bool((counts != counts[0]).any()):
        raise ValueError(f"every sample must hide the same number of tokens, got {counts.tolist()}")
    shuffle = hidden.to(torch.uint8).argsort(dim=1, stable=True)  # visible (0) first
    return TokenMask(keep=shuffle[:, : hidden.shape[1] - int(counts[0])], restore=shuffle.argsort(dim=1), mask=hidden)


def inverse_block_token_mask(
    batch_size: int,
    grid: tuple[int, ...],
    mask_ratio: float = 0.8,
    block_size: int = 3,
    ratio_adjust: float = 0.07,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> TokenMask:
    """data2vec 2.0's inverse block masking: square blocks of the ``rows x cols`` grid are *kept*
    visible and everything else is hidden, so the encoder sees a few contiguous regions and must
    predict the rest from them. A ``(time, rows, cols)`` grid of time-major video tokens gets one
    spatial mask repeated in every time slice (tubes).

    As in the official sampler: ``int(S * (1 - mask_ratio + ratio_adjust) / block_size**2)`` block
    centres (at least one here; S spatial tokens) uniform with replacement, each keeping the
    ``block_size`` square around it (cut at the grid's edges); ``ratio_adjust`` makes up for the
    overlap of blocks, so they cover about the visible share. Then every sample is brought to
    exactly ``int(S * (1 - mask_ratio))`` visible positions (at least one): random kept tokens are
    hidden again, or random hidden ones shown, so counts are equal and the tensors stack.
    """
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
    if block_size < 1:
        raise ValueError(f"block_size must be at least 1, got {block_size}")
    if len(grid) not in (2, 3):
        raise ValueError(f"inverse block masking needs a (rows, cols) or (time, rows, cols) grid, got {tuple(grid)}")
    *time, rows, cols = grid
    spatial = rows * cols
    visible_share = 1.0 - mask_ratio
    num_visible = max(1, int(spatial * visible_share + 1e-9))  # 1e-9: 10 * (1 - 0.8) is 1.9999999999999996 in floats
    num_centres = max(1, int(spatial * (visible_share + ratio_adjust) / block_size**2 + 1e-9))
    centres = torch.randint(0, spatial, (batch_size, num_centres, 1, 1), generator=generator)
    offsets = torch.arange(block_size) - block_size // 2
    block_rows = (centres // cols + offsets.view(-1, 1)).clamp(0, rows - 1)
    block_cols = (centres % cols + offsets.view(1, -1)).clamp(0, cols - 1)
    kept = torch.zeros(batch_size, spatial, dtype=torch.bool)
    kept.scatter_(1, (block_rows * cols + block_cols).flatten(1), True)
    # kept tokens first, each group in random order: the first num_visible trim or top up the blocks
    order = (kept.float() + torch.rand(batch_size, spatial, generator=generator)).argsort(dim=1, descending=True)
    hidden = torch.ones(batch_size, spatial, dtype=torch.bool).scatter_(1, order[:, :num_visible], False)
    return token_mask_from_hidden(hidden.repeat(1, time[0] if time else 1).to(device))


def beit_block_token_masks(
    batch_size: int,
    grid: tuple[int, ...],
    ratio_range: tuple[float, float] = (0.1, 0.5),
    mask_probability: float = 0.5,
    aspect_ratio: tuple[float, float] = (0.3, 1 / 0.3),
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> Tensor:
    """iBOT's masks (BEiT's blockwise masking): (B, N) bool, True where a token is replaced by the
    mask token. Each sample is masked with probability ``mask_probability`` (iBOT: 0.5), at a ratio
    uniform in ``ratio_range`` (iBOT: 0.3 +- 0.2). Rectangles of random area (at least
    ``(min(rows, cols) // 3) ** 2`` tokens) and log-uniform height / width ``aspect_ratio`` are added
    until the ratio is reached; each must add new tokens without overshooting, with 10 tries per
    rectangle, as the official generator. A ``(time, rows, cols)`` grid of time-major video tokens
    gets one spatial mask repeated in every time slice (tubes)."""
    *time, rows, cols = grid
    rng = random.Random(int(torch.randint(0, 2**62, (), generator=generator)))
    min_area = (min(rows, cols) // 3) ** 2
    log_aspect = (math.log(aspect_ratio[0]), math.log(aspect_ratio[1]))

    def add_block(cells: list[list[bool]], budget: float) -> int:
        for _ in range(10):
            area = rng.uniform(min_area, budget)
            aspect = math.exp(rng.uniform(*log_aspect))
            height, width = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if height < rows and width < cols:
                top, left = rng.randint(0, rows - height), rng.randint(0, cols - width)
                block = [(r, c) for r in range(top, top + height) for c in range(left, left + width)]
                new = sum(not cells[r][c] for r, c in block)
                if 0 < new <= budget:
                    for r, c in block:
                        cells[r][c] = True
                    return new
        return 0

    masks = []
    for _ in range(batch_size):
        cells = [[False] * cols for _ in range(rows)]
        if rng.random() < mask_probability:
            target, count = rng.uniform(*ratio_range) * rows * cols, 0
            while count < target and (added := add_block(cells, target - count)):
                count += added
        masks.append(cells)
    return torch.tensor(masks, dtype=torch.bool).flatten(1).repeat(1, time[0] if time else 1).to(device)
