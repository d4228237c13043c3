"""Optimizers, weight-decay parameter groups and the warmup + cosine schedule (stepped per optimizer step)."""

from __future__ import annotations

import math
from typing import Iterable, Literal

import torch
from lightning.pytorch.callbacks import Timer
from torch import nn

OptimizerName = Literal["sgd", "lars", "adamw"]


#: Marks an optimizer group whose weight decay a schedule may change (``final_weight_decay``): the
#: weights'. ``build_optimizer`` drops it, so optimizers and their checkpoints never hold it.
DECAYED = "decayed"


def decay_groups(modules: Iterable[nn.Module], weight_decay: float) -> list[dict]:
    """Two groups: weights with ``weight_decay`` (marked ``DECAYED``); biases and norm weights (1-D
    params) without it.

    lightly's LARS skips its trust-ratio adaptation for groups with zero weight decay, so the
    second group is also excluded from LARS adaptation, as in Barlow Twins / SimCLR."""
    decay, no_decay = [], []
    for module in modules:
        for param in module.parameters():
            if param.requires_grad:
                (no_decay if param.ndim <= 1 else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay, DECAYED: True},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    name: OptimizerName,
    groups: list[dict],
    lr: float,
    momentum: float = 0.9,
    betas: tuple[float, float] = (0.9, 0.999),
    nesterov: bool = False,
    fused: bool = False,
) -> torch.optim.Optimizer:
    """``fused``: torch's single-kernel update for all parameters (SGD, AdamW; CPU and CUDA), fewer
    launches and passes over memory than the default multi-tensor (foreach) one."""
    groups = [{key: value for key, value in group.items() if key != DECAYED} for group in groups]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov, fused=fused)
    if name == "lars":
        if fused:
            raise ValueError("fused_optimizer (--model.fused_optimizer): LARS has no fused version; turn it off or use sgd or adamw")
        from lightly.utils.lars import LARS

        return LARS(groups, lr=lr, momentum=momentum)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)
    raise ValueError(f"unknown optimizer {name!r}; choose sgd, lars or adamw")


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, final_fraction: float = 0.0) -> float:
    """LR multiplier: linear warmup from ~0 to 1 over ``warmup_steps``, then cosine to ``final_fraction``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return cosine_decay(progress, final_fraction)


def cosine_decay(progress: float, final_fraction: float = 0.0) -> float:
    """Half a cosine from 1 at ``progress`` 0 to ``final_fraction`` at 1."""
    return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * min(1.0, max(0.0, progress))))


class TrainingBudget:
    """How far a fit is through its budget, as a fraction in [0, 1]: the larger of the optimizer
    steps taken over the run's total (``max_epochs`` and / or ``max_steps``) and the training time
    used over ``--trainer.max_time``. Every schedule (learning rate, EMA momentum, loss ramps)
    follows it, so a run bounded by epochs, steps or wall-clock decays over its actual length.

    The time part comes from Lightning's ``Timer``, which checkpoints its elapsed time, so a
    resumed run continues where it stopped; under DDP rank zero's clock is broadcast, so every
    rank uses the same learning rate."""

    def __init__(self, trainer) -> None:
        self.trainer = trainer
        self.total_steps = float(trainer.estimated_stepping_batches)
        self.timer = next((c for c in getattr(trainer, "callbacks", ()) if isinstance(c, Timer) and c.time_remaining() is not None), None)
        if math.isinf(self.total_steps) and self.timer is None:
            raise ValueError(
                "the run has no end, so no schedule can span it: set --trainer.max_epochs, --trainer.max_steps "
                "or --trainer.max_time"
            )
        self._time_fraction: tuple[int, float] | None = None  # (step, fraction) read at that step

    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch (after ``limit_train_batches`` and gradient accumulation)."""
        trainer = self.trainer
        if trainer.train_dataloader is None:
            trainer.fit_loop.setup_data()
        batches = trainer.num_training_batches
        if math.isinf(batches):
            raise ValueError("warmup_epochs needs a training loader with a length; give the warmup in steps of a sized dataset")
        return max(1, math.ceil(batches / trainer.accumulate_grad_batches))

    def warmup_steps(self, warmup_epochs: float) -> int:
        steps = int(round(warmup_epochs * self.steps_per_epoch())) if warmup_epochs > 0 else 0
        return steps if math.isinf(self.total_steps) else min(int(self.total_steps), steps)

    def fraction(self, step: int) -> float:
        by_steps = 0.0 if math.isinf(self.total_steps) else step / max(1.0, self.total_steps)
        if self.timer is None:
            return min(1.0, by_steps)
        if self._time_fraction is None or self._time_fraction[0] != step:
            elapsed = self.timer.time_elapsed("train")
            fraction = elapsed / max(1e-9, elapsed + self.timer.time_remaining("train"))
            if getattr(self.trainer, "world_size", 1) > 1:
                fraction = float(self.trainer.strategy.broadcast(fraction))
            self._time_fraction = (step, fraction)
        return min(1.0, max(by_steps, self._time_fraction[1]))


class WarmupCosineLR(torch.optim.lr_scheduler.LRScheduler):
    """Linear warmup over ``warmup_steps`` optimizer steps, then a cosine to ``final_fraction`` of
    the base rate over the rest of the budget (``TrainingBudget``). For a budget of steps this is
    ``warmup_cosine``; for a time budget the cosine runs from the budget fraction at which warmup
    ended (saved in the scheduler's state, so resuming continues the same curve)."""

    def __init__(self, optimizer: torch.optim.Optimizer, budget: TrainingBudget, warmup_steps: int, final_fraction: float = 0.0) -> None:
        self.budget = budget
        self.warmup_steps = warmup_steps
        self.final_fraction = final_fraction
        self.warmup_end: float | None = None
        super().__init__(optimizer)

    def multiplier(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.warmup_end is None:
            self.warmup_end = self.budget.fraction(self.warmup_steps)
        progress = (self.budget.fraction(step) - self.warmup_end) / max(1e-9, 1.0 - self.warmup_end)
        return cosine_decay(progress, self.final_fraction)

    def get_lr(self) -> list[float]:
        scale = self.multiplier(self.last_epoch)
        return [base * scale for base in self.base_lrs]

    def state_dict(self) -> dict:
        return {key: value for key, value in self.__dict__.items() if key not in ("optimizer", "budget")}


def warmup_cosine_config(
    optimizer: torch.optim.Optimizer, trainer, warmup_epochs: float, final_fraction: float = 0.0, budget: TrainingBudget | None = None
) -> dict:
    """Lightning's optimizer config with ``WarmupCosineLR`` stepped per optimizer step over the
    trainer's budget (``warmup_epochs`` converted to optimizer steps of this run's epochs)."""
    budget = budget or TrainingBudget(trainer)
    schedule = WarmupCosineLR(optimizer, budget, budget.warmup_steps(warmup_epochs), final_fraction)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
