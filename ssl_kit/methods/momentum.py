"""Exponential moving averages of networks (momentum encoders, EMA targets, mean teachers).

The momentum follows the run's progress through its budget (optimizer steps, epochs or
wall-clock: ``BackboneModule.run_fraction``), read at the *optimizer* step
(``trainer.global_step``), and the average moves only when that step advanced, so gradient
accumulation does not update the target more than once per optimizer step.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

MomentumSchedule = Literal["cosine", "linear", "constant", "running_average"]


def momentum_at(step: int, progress: float, base: float, final: float = 1.0, schedule: MomentumSchedule = "cosine") -> float:
    """Momentum after optimizer ``step``, ``progress`` (0 to 1) of the way through the schedule:
    ``base`` at 0, ``final`` at 1 (and beyond).

    ``running_average`` (Mean Teacher) is ``min(1 - 1 / (step + 1), base)``: the target is the
    plain average of all online weights so far until that reaches ``base``, so an early teacher is
    not stuck near its random initialisation."""
    progress = min(1.0, max(0.0, progress))
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

    ``horizon`` stretches the schedule (MSN: 1.25 x the run). Call ``start(global_step)`` from
    ``on_train_start`` (it also marks where a resumed run continues) and ``step(global_step,
    run_fraction)`` from ``on_train_batch_end`` (``MomentumTargets`` does both); calls that see no
    new optimizer step do nothing.
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

    def step(self, global_step: int, run_fraction: Callable[[int], float]) -> bool:
        """Updates the targets if ``global_step`` advanced since the last update; returns whether it
        did. ``run_fraction(step)`` is how far through its budget the run is at ``step``."""
        if global_step == self.last_step:
            return False
        # global_step already counts the optimizer step just taken; the momentum for it is that of step - 1.
        step = global_step - 1
        self.momentum = momentum_at(step, run_fraction(step) / self.horizon, self.base, self.final, self.schedule)
        for target, online in self.pairs:
            ema_update(target, online, self.momentum)
        self.last_step = global_step
        return True


class MomentumTargets:
    """LightningModule mixin for methods with EMA targets in ``self.ema`` (an ``EMAUpdater``): starts
    it when training starts and moves it after each optimizer step, logging the momentum."""

    ema: EMAUpdater

    def on_train_start(self) -> None:
        self.ema.start(self.trainer.global_step)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.ema.step(self.trainer.global_step, self.run_fraction):
            self.log("train/ema_momentum", self.ema.momentum)


class MomentumEncoder(MomentumTargets):
    """Mixin for methods in which an online backbone -> projector -> predictor predicts, for two
    views, the projections of a momentum encoder: EMA copies of backbone and projector, without
    gradients and in no optimizer group (MoCo v3's keys, BYOL's targets). The momentum encoder runs
    in the module's mode (train mode: BatchNorm on batch statistics), as both official codes do."""

    backbone: nn.Module
    projector: nn.Module
    predictor: nn.Module

    def build_momentum_encoder(self, base: float, final: float = 1.0, schedule: MomentumSchedule = "cosine") -> None:
        """``momentum_backbone`` and ``momentum_projector``, moved by ``self.ema`` from ``base`` to ``final``."""
        self.momentum_backbone = frozen_copy(self.backbone)
        self.momentum_projector = frozen_copy(self.projector)
        self.ema = EMAUpdater(
            [(self.momentum_backbone, self.backbone), (self.momentum_projector, self.projector)], base, final, schedule
        )

    def predictions_and_targets(
        self, x1: torch.Tensor, x2: torch.Tensor
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        """``(p1, p2), (z1, z2), f1``: the online predictions of both views, the momentum encoder's
        projections of both (no gradients), and the first view's backbone features."""
        f1, f2 = self.backbone(x1), self.backbone(x2)
        predictions = self.predictor(self.projector(f1)), self.predictor(self.projector(f2))
        with torch.no_grad():
            targets = self.momentum_projector(self.momentum_backbone(x1)), self.momentum_projector(self.momentum_backbone(x2))
        return predictions, targets, f1
