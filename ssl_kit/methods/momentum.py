"""Exponential moving averages of networks (momentum encoders, EMA targets, mean teachers).

The momentum follows a schedule of the *optimizer* step (``trainer.global_step``), and the
average moves only when that step advanced, so gradient accumulation does not update the
target more than once per optimizer step.
"""

from __future__ import annotations

import copy
import math
from typing import Literal

import torch
from torch import nn

MomentumSchedule = Literal["cosine", "linear", "constant", "running_average"]


def momentum_at(step: int, total_steps: int, base: float, final: float = 1.0, schedule: MomentumSchedule = "cosine") -> float:
    """Momentum after ``step`` of ``total_steps``: ``base`` at 0, ``final`` at the end (and beyond).

    ``running_average`` (Mean Teacher) is ``min(1 - 1 / (step + 1), base)``: the target is the
    plain average of all online weights so far until that reaches ``base``, so an early teacher is
    not stuck near its random initialisation."""
    progress = min(1.0, step / max(1, total_steps))
    if schedule == "constant":
        return base
    if schedule == "running_average":
        return min(1.0 - 1.0 / (step + 1), base)
    if schedule == "linear":
        return base + (final - base) * progress
    if schedule == "cosine":
        return final - (final - base) * (math.cos(math.pi * progress) + 1) / 2
    raise ValueError(f"unknown momentum schedule {schedule!r}")


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy that receives no gradients: the starting point of an EMA target."""
    target = copy.deepcopy(module)
    target.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """target <- momentum * target + (1 - momentum) * online for parameters; buffers are copied."""
    for t, o in zip(target.parameters(), online.parameters()):
        t.mul_(momentum).add_(o.detach(), alpha=1 - momentum)
    for t, o in zip(target.buffers(), online.buffers()):
        t.copy_(o)


class EMAUpdater:
    """Moves ``pairs`` of (target, online) modules once per optimizer step along a momentum schedule.

    ``horizon`` stretches the schedule (MSN: 1.25 x total steps). Call ``start(global_step)`` from
    ``on_train_start`` (it also marks where a resumed run continues) and ``step(global_step,
    total_steps)`` from ``on_train_batch_end``; calls that see no new optimizer step do nothing.
    """

    def __init__(
        self,
        pairs: list[tuple[nn.Module, nn.Module]],
        base: float,
        final: float = 1.0,
        schedule: MomentumSchedule = "cosine",
        horizon: float = 1.0,
    ) -> None:
        self.pairs = pairs
        self.base, self.final, self.schedule, self.horizon = base, final, schedule, horizon
        self.last_step = 0
        self.momentum = base

    def start(self, global_step: int) -> None:
        self.last_step = global_step

    def step(self, global_step: int, total_steps: int) -> bool:
        """Updates the targets if ``global_step`` advanced since the last update; returns whether it did."""
        if global_step == self.last_step:
            return False
        # global_step already counts the optimizer step just taken; the momentum for it is that of step - 1.
        self.momentum = momentum_at(global_step - 1, int(total_steps * self.horizon), self.base, self.final, self.schedule)
        for target, online in self.pairs:
            ema_update(target, online, self.momentum)
        self.last_step = global_step
        return True
