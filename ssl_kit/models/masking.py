"""Random masking of token sequences, independent of modality.

Works on any ``(batch, tokens, dim)`` sequence of patch tokens: image patches, spectrogram
patches, or video tubelets. Grouped masking (one mask shared by several token groups, e.g.
VideoMAE's tube masking over time slices) builds on the same ``TokenMask``.
"""

from __future__ import annotations

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
