"""Optimizers, weight-decay parameter groups and the warmup + cosine schedule (stepped per optimizer step)."""

from __future__ import annotations

import math
from typing import Iterable, Literal

import torch
from torch import nn

OptimizerName = Literal["sgd", "lars", "adamw"]


def decay_groups(modules: Iterable[nn.Module], weight_decay: float) -> list[dict]:
    """Two groups: weights with ``weight_decay``; biases and norm weights (1-D params) without it.

    lightly's LARS skips its trust-ratio adaptation for groups with zero weight decay, so the
    second group is also excluded from LARS adaptation, as in Barlow Twins / SimCLR."""
    decay, no_decay = [], []
    for module in modules:
        for param in module.parameters():
            if param.requires_grad:
                (no_decay if param.ndim <= 1 else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
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
    return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_cosine_config(optimizer: torch.optim.Optimizer, trainer, warmup_epochs: float, final_fraction: float = 0.0) -> dict:
    """Lightning's optimizer config with a per-step warmup + cosine schedule over the trainer's
    total optimizer steps (``warmup_epochs`` converted to steps)."""
    total = int(trainer.estimated_stepping_batches)
    epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else 1
    warmup = min(total, int(round(warmup_epochs * total / epochs)))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, warmup, total, final_fraction))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
