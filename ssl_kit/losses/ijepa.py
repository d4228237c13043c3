"""I-JEPA's latent prediction loss (Assran et al. 2023)."""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

LatentLoss = Literal["smooth_l1", "l2"]


class LatentPredictionLoss(nn.Module):
    """Predicted target tokens against the target encoder's tokens, each layer-normalised over its
    features without affine parameters (a per-token standardisation, so the scale of the EMA
    encoder's output cannot shrink the loss); ``smooth_l1`` (Huber with beta 1, the official loss)
    or ``l2`` (squared error), averaged over every feature of every token of every target block.

    ``predictions`` and ``targets``: (..., tokens, dim) of the same shape; only ``predictions``
    carry a gradient."""

    def __init__(self, loss: LatentLoss = "smooth_l1") -> None:
        super().__init__()
        if loss not in ("smooth_l1", "l2"):
            raise ValueError(f"loss must be 'smooth_l1' or 'l2', got {loss!r}")
        self.loss = loss

    def forward(self, predictions: Tensor, targets: Tensor) -> Tensor:
        targets = F.layer_norm(targets.detach(), targets.shape[-1:])
        if self.loss == "smooth_l1":
            return F.smooth_l1_loss(predictions, targets)
        return F.mse_loss(predictions, targets)
