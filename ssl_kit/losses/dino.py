"""Self-distillation losses: DINO's cross-view loss on the pooled outputs (Caron et al. 2021) and
iBOT's masked patch loss (Zhou et al. 2022), both between a teacher's centred and sharpened
distribution and the student's.

The teacher's distribution is ``softmax((t - center) / T_teacher)``: the center (a buffer, so
checkpoints carry it) is an EMA of the *global* batch mean of the teacher outputs (sums and counts
all-reduced over ranks, as the official code), and ``T_teacher`` warms up linearly from
``warmup_teacher_temp`` to ``teacher_temp`` over the first ``warmup_fraction`` of the run, read from
the run's progress so epoch, step and wall-clock budgets all work. The student's is
``log_softmax(s / student_temp)``.

``centering="sinkhorn_knopp"`` is DINOv2's alternative: the teacher's targets are
``exp(t / T_teacher)`` balanced by Sinkhorn-Knopp over the global batch (every teacher view's
rows together; for iBOT, every masked token's), so each prototype gets the same share of the
batch from the first step and none can take over; no center is kept. (Sharpening, not balancing,
keeps the targets from the uniform distribution, which satisfies the balance too.)

lightly's ``DINOLoss`` computes the same value and center update on one process and under DDP
with equal per-rank batches (``tests/methods/test_dino.py`` checks both); it is not used because
its temperature warmup counts epochs and it has no same-view pairing (the Random-Teacher recipe)
or patch term. lightly's ``IBOTPatchLoss`` (DINOv2's) centres on the *masked* teacher tokens and
averages the per-rank means, which is not the global mean when ranks mask different counts; iBOT
centres on every patch token of the global batch, as here.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_kit.distributed import all_reduce_max, global_mean
from ssl_kit.losses.msn import full_precision, sinkhorn

Centering = Literal["ema", "sinkhorn_knopp"]


@torch.no_grad()
def sinkhorn_knopp_targets(teacher: Tensor, temperature: float, iterations: int) -> Tensor:
    """DINOv2's teacher targets: ``exp(t / T)`` over the rows of every rank, Sinkhorn-balanced so
    each row sums to 1 and each prototype gets the same mass. Shifted by the global maximum first
    (a constant factor, which the normalisation removes) so the exponential cannot overflow."""
    logits = teacher.double() / temperature
    top = logits.max() if logits.numel() else logits.new_tensor(float("-inf"))
    return sinkhorn(torch.exp(logits - all_reduce_max(top)), iterations).to(full_precision(teacher).dtype)


def teacher_temperature(progress: float, warmup_temp: float, final_temp: float, warmup_fraction: float) -> float:
    """Linear from ``warmup_temp`` at progress 0 to ``final_temp`` at ``warmup_fraction``, then constant."""
    if warmup_fraction <= 0 or progress >= warmup_fraction:
        return final_temp
    return warmup_temp + (final_temp - warmup_temp) * max(0.0, progress) / warmup_fraction


class CenteredSharpening(nn.Module):
    """What DINO's and iBOT's losses share: the teacher's centred, sharpened targets with their
    center EMA (or, with ``centering="sinkhorn_knopp"``, balanced by ``sinkhorn_iterations`` of
    Sinkhorn-Knopp), and the student's tempered log-probabilities. ``center_momentum`` 1.0 keeps
    the center at zero (no centering, the Random-Teacher recipe)."""

    def __init__(
        self,
        output_dim: int,
        student_temp: float = 0.1,
        teacher_temp: float = 0.04,
        warmup_teacher_temp: float = 0.04,
        warmup_fraction: float = 0.0,
        center_momentum: float = 0.9,
        centering: Centering = "ema",
        sinkhorn_iterations: int = 3,
    ) -> None:
        super().__init__()
        if min(student_temp, teacher_temp, warmup_teacher_temp) <= 0:
            raise ValueError(f"temperatures must be positive, got {student_temp}, {teacher_temp}, {warmup_teacher_temp}")
        if not 0.0 <= center_momentum <= 1.0:
            raise ValueError(f"center_momentum must be in [0, 1], got {center_momentum}")
        if centering not in ("ema", "sinkhorn_knopp"):
            raise ValueError(f"centering must be 'ema' or 'sinkhorn_knopp', got {centering!r}")
        if sinkhorn_iterations < 1:
            raise ValueError(f"sinkhorn_iterations must be at least 1, got {sinkhorn_iterations}")
        self.student_temp = student_temp
        self.teacher_temp = teacher_temp
        self.warmup_teacher_temp = warmup_teacher_temp
        self.warmup_fraction = warmup_fraction
        self.center_momentum = center_momentum
        self.centering = centering
        self.sinkhorn_iterations = sinkhorn_iterations
        self.center: Tensor
        self.register_buffer("center", torch.zeros(1, output_dim))

    def temperature(self, progress: float) -> float:
        return teacher_temperature(progress, self.warmup_teacher_temp, self.teacher_temp, self.warmup_fraction)

    @torch.no_grad()
    def targets(self, teacher: Tensor, progress: float) -> Tensor:
        """Target distributions of the teacher's rows (..., K); under Sinkhorn-Knopp the rows of
        every rank are balanced together, so pass all of a step's rows in one call."""
        if self.centering == "sinkhorn_knopp":
            rows = teacher.detach().reshape(-1, teacher.shape[-1])
            return sinkhorn_knopp_targets(rows, self.temperature(progress), self.sinkhorn_iterations).reshape(teacher.shape)
        return F.softmax((full_precision(teacher.detach()) - self.center) / self.temperature(progress), dim=-1)

    def log_probs(self, student: Tensor) -> Tensor:
        return F.log_softmax(full_precision(student) / self.student_temp, dim=-1)

    @torch.no_grad()
    def update_center(self, teacher: Tensor) -> None:
        """center <- m * center + (1 - m) * mean of every teacher output row of every rank (no
        center under Sinkhorn-Knopp)."""
        if self.centering == "sinkhorn_knopp":
            return
        mean, _ = global_mean(full_precision(teacher.detach()).reshape(-1, teacher.shape[-1]))
        self.center.mul_(self.center_momentum).add_(mean, alpha=1.0 - self.center_momentum)


class DINOLoss(CenteredSharpening):
    """Mean over view pairs of ``mean_b H(teacher_i[b], student_j[b])``: every teacher view ``i``
    (the global crops) against every student view ``j != i`` (global then local crops), or, with
    ``same_view``, only ``j == i`` (the Random-Teacher recipe: both networks see one view).
    The center is updated with the teacher outputs after the loss is computed."""

    def __init__(self, *args, same_view: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.same_view = same_view

    def pairs(self, teacher_views: int, student_views: int) -> list[tuple[int, int]]:
        if self.same_view:
            return [(i, i) for i in range(min(teacher_views, student_views))]
        return [(i, j) for i in range(teacher_views) for j in range(student_views) if j != i]

    def forward(self, teacher: list[Tensor], student: list[Tensor], progress: float) -> Tensor:
        """``teacher``: V_t tensors (B, K); ``student``: V_s tensors (B, K), in the same view order."""
        pairs = self.pairs(len(teacher), len(student))
        if not pairs:
            raise ValueError(f"no view pairs from {len(teacher)} teacher and {len(student)} student views")
        with torch.autocast(student[0].device.type, enabled=False):  # softmax at T=0.04 needs full precision
            targets = self.targets(torch.cat(teacher), progress).chunk(len(teacher))
            log_probs = [self.log_probs(s) for s in student]
            loss = sum(-(targets[i] * log_probs[j]).sum(dim=-1).mean() for i, j in pairs) / len(pairs)
        self.update_center(torch.cat(teacher))
        return loss


class IBOTPatchLoss(CenteredSharpening):
    """iBOT's masked-image-modelling term: for each global view, the teacher's patch distributions
    (unmasked view) against the student's (masked view) at the masked positions only, averaged
    over an image's masked tokens, then over the images of the batch (an image without masked
    tokens counts as zero, as in the official code), then over the views. Its center, separate
    from the class token's, is the mean over every teacher patch token."""

    @torch.no_grad()
    def masked_targets(self, teacher: list[Tensor], masks: list[Tensor], progress: float) -> list[Tensor]:
        """Per view, (B, N, K) targets, meaningful at the masked positions; under Sinkhorn-Knopp
        they are balanced over the masked tokens of every view and rank (DINOv2), zero elsewhere."""
        if self.centering != "sinkhorn_knopp":
            return [self.targets(t, progress) for t in teacher]
        balanced = self.targets(torch.cat([t[mask] for t, mask in zip(teacher, masks, strict=True)]), progress)
        targets = [balanced.new_zeros(t.shape) for t in teacher]
        for q, mask, part in zip(targets, masks, balanced.split([int(mask.sum()) for mask in masks]), strict=True):
            q[mask] = part
        return targets

    def forward(self, teacher: list[Tensor], student: list[Tensor], masks: list[Tensor], progress: float) -> Tensor:
        """``teacher`` / ``student``: one (B, N, K) tensor of patch outputs per global view;
        ``masks``: one (B, N) bool tensor per view, True where the student saw the mask token."""
        with torch.autocast(student[0].device.type, enabled=False):
            total = 0.0
            for s, mask, q in zip(student, masks, self.masked_targets(teacher, masks, progress), strict=True):
                cross_entropy = -(q * self.log_probs(s)).sum(dim=-1)  # (B, N)
                mask = mask.to(cross_entropy.dtype)
                total = total + ((cross_entropy * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)).mean()
            loss = total / len(teacher)
        self.update_center(torch.cat(teacher))
        return loss
