"""Autograd-aware collectives: gradients flow back to every rank's own inputs.

A raw ``torch.distributed.all_reduce`` is invisible to autograd, so a loss built on it
back-propagates only through the local term (the lightly Barlow Twins bug). These wrappers
use ``torch.distributed.nn`` whose backward passes sum the incoming gradients across ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import nn as dist_nn


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum over ranks, differentiable (identity on one process)."""
    if world_size() == 1:
        return tensor
    return dist_nn.all_reduce(tensor, op=dist.ReduceOp.SUM)


def all_reduce_max(tensor: Tensor) -> Tensor:
    """Elementwise maximum over ranks, in place and not differentiable (identity on one process)."""
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def global_mean(rows: Tensor) -> tuple[Tensor, Tensor]:
    """Mean over dim 0 of every rank's rows, and their number (one all-reduce; unequal batches are exact)."""
    totals = all_reduce_sum(torch.cat([rows.sum(dim=0), rows.new_tensor([rows.shape[0]])]))
    return totals[:-1] / totals[-1], totals[-1]


def gather_cat(tensor: Tensor) -> Tensor:
    """Concatenation of every rank's tensor along dim 0, differentiable (identity on one process)."""
    if world_size() == 1:
        return tensor
    return torch.cat(dist_nn.all_gather(tensor), dim=0)


def from_first_rank(tensor: Tensor) -> Tensor:
    """Rank 0's value on every rank (not differentiable): one random draw shared by the whole batch."""
    if world_size() > 1:
        dist.broadcast(tensor, src=0)
    return tensor
