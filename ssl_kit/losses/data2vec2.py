"""data2vec 2.0 (Baevski et al. 2022): the teacher's layer-averaged targets and the latent
regression loss of the student's decoder on the masked tokens."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: What follows the average of the instance-normalised layers: ``layer`` (every token standardised
#: over its channels: the official image config's ``layer_norm_targets``), ``instance`` (every
#: channel over the tokens again: ``instance_norm_targets``) or ``none`` (its speech config).
TargetNorm = Literal["layer", "instance", "none"]


def instance_norm_tokens(tokens: Tensor) -> Tensor:
    """Each channel of each sample standardised over its tokens (biased variance, eps 1e-5, no
    affine): ``F.instance_norm`` on ``(B, N, D)`` tokens."""
    return F.instance_norm(tokens.transpose(1, 2)).transpose(1, 2)


@torch.no_grad()
def layer_averaged_targets(
    block_outputs: list[Tensor], top_k: int, num_prefix_tokens: int = 0, final_norm: TargetNorm = "layer"
) -> Tensor:
    """The regression targets ``(B, N, D)`` from the teacher's block outputs ``[(B, P + N, D), ...]``:
    the top ``top_k`` blocks, prefix (class/register) tokens dropped, each instance-normalised
    (so every layer weighs the same whatever the scale of its residual stream), averaged, then
    ``final_norm``. Half precision is lifted to float32 first, as the official code does."""
    if not 1 <= top_k <= len(block_outputs):
        raise ValueError(f"average_top_k_layers must be between 1 and the {len(block_outputs)} blocks, got {top_k}")
    layers = [out[:, num_prefix_tokens:] for out in block_outputs[-top_k:]]
    layers = [instance_norm_tokens(x.to(torch.promote_types(x.dtype, torch.float32))) for x in layers]
    targets = torch.stack(layers).mean(dim=0)
    if final_norm == "layer":
        return F.layer_norm(targets, targets.shape[-1:])
    if final_norm == "instance":
        return instance_norm_tokens(targets)
    if final_norm == "none":
        return targets
    raise ValueError(f"unknown target norm {final_norm!r}; use layer, instance or none")


class LatentRegressionLoss(nn.Module):
    """data2vec 2.0's loss: the squared error summed over the D channels and scaled by
    ``1 / sqrt(D)`` (the official default ``loss_scale``), averaged over the masked tokens only;
    plus, with ``cls_weight`` > 0, the same error of the student's pooled feature against the
    mean of its sample's targets over the tokens, averaged over the samples.

    ``cls_weight`` is per sample: the official code sums the pooled term over the (cloned)
    samples on each GPU, so its ``cls_loss`` 0.01 with 16 images x 16 masks per GPU is 2.56 here.

    Every sample hides the same number of tokens, so under DDP the average of the ranks' losses
    (DDP's gradient average) is the loss of the global batch: no statistic crosses samples.
    """

    def __init__(self, cls_weight: float = 0.0) -> None:
        super().__init__()
        self.cls_weight = cls_weight

    def forward(self, pred: Tensor, target: Tensor, mask: Tensor, pooled: Tensor | None = None) -> Tensor:
        """``pred``, ``target``: ``(B, N, D)`` in grid order; ``mask``: ``(B, N)`` bool, True where the
        token was hidden from the student; ``pooled``: ``(B, D)``, needed when ``cls_weight`` > 0."""
        if pred.shape != target.shape or mask.shape != pred.shape[:2]:
            raise ValueError(f"shapes disagree: pred {tuple(pred.shape)}, target {tuple(target.shape)}, mask {tuple(mask.shape)}")
        scale = target.shape[-1] ** -0.5
        loss = (pred[mask] - target[mask]).pow(2).sum(dim=-1).mean() * scale
        if self.cls_weight > 0:
            if pooled is None:
                raise ValueError("cls_weight > 0 needs the student's pooled feature")
            loss = loss + self.cls_weight * (pooled - target.mean(dim=1)).pow(2).sum(dim=-1).mean() * scale
        return loss
