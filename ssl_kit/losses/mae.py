"""Masked reconstruction loss (MAE, He et al. 2022): MSE on hidden patches only."""

from __future__ import annotations

from torch import Tensor, nn

from ssl_kit.models.patches import normalize_patches


class MaskedReconstructionLoss(nn.Module):
    """Mean over hidden patches of the per-patch mean squared error.

    ``forward(pred, target, mask)``: ``pred`` and ``target`` are ``(B, N, P)`` patch vectors (see
    ``ssl_kit.models.patches.patchify``), ``mask`` is ``(B, N)`` bool, True where the patch was hidden
    from the encoder. Visible patches do not contribute. With ``norm_pix_loss`` (default, as in the
    paper) the target of each patch is standardised by its own mean and unbiased variance:
    ``(t - mean) / sqrt(var + eps)``; with ``norm_channels`` C (VideoMAE) each of the C channels
    of a patch separately, ``(t - mean_c) / (std_c + eps)``, as the official VideoMAE code does.

    Under DDP each rank averages its own hidden patches; with a fixed mask ratio every sample hides
    the same number of patches, so the gradient average over ranks is the global-batch mean.
    """

    def __init__(self, norm_pix_loss: bool = True, eps: float = 1e-6, norm_channels: int | None = None) -> None:
        super().__init__()
        self.norm_pix_loss = norm_pix_loss
        self.eps = eps
        self.norm_channels = norm_channels

    def target(self, patches: Tensor) -> Tensor:
        return normalize_patches(patches, self.eps, self.norm_channels) if self.norm_pix_loss else patches

    def forward(self, pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        if pred.shape != target.shape or mask.shape != pred.shape[:2]:
            raise ValueError(f"shapes disagree: pred {tuple(pred.shape)}, target {tuple(target.shape)}, mask {tuple(mask.shape)}")
        per_patch = (pred - self.target(target)).pow(2).mean(dim=-1)
        weights = mask.to(per_patch.dtype)
        return (per_patch * weights).sum() / weights.sum().clamp(min=1.0)
