"""Helpers for 2-process gloo tests: a two-view linear model, process-group set-up, one spawn."""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn


class TwoViewLinear(nn.Module):
    """Both views through one linear map in a single forward, as Lightning's DDP wrapper does."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)

    def forward(self, x_a: Tensor, x_b: Tensor) -> tuple[Tensor, Tensor]:
        return self.linear(x_a), self.linear(x_b)


def seeded_two_view_linear(in_dim: int, out_dim: int, seed: int) -> TwoViewLinear:
    """The same float64 initialisation on every rank and in the single-process reference."""
    torch.manual_seed(seed)
    return TwoViewLinear(in_dim, out_dim).double()


def two_view_batch(global_batch: int, in_dim: int, seed: int) -> tuple[Tensor, Tensor]:
    """Two float64 views of one seeded batch whose second half is scaled and shifted, so each
    rank's half has other statistics than the whole batch (local and global statistics differ)."""
    gen = torch.Generator().manual_seed(seed)
    x_a = torch.randn(global_batch, in_dim, generator=gen, dtype=torch.float64)
    x_b = x_a + 0.3 * torch.randn(global_batch, in_dim, generator=gen, dtype=torch.float64)
    x_a[global_batch // 2 :] = 2.0 * x_a[global_batch // 2 :] + 1.0
    x_b[global_batch // 2 :] = 2.0 * x_b[global_batch // 2 :] + 1.0
    return x_a, x_b


@contextlib.contextmanager
def gloo_group(rank: int, world_size: int, port: int) -> Iterator[None]:
    """A gloo process group on the loopback for the body of the ``with`` (one torch thread)."""
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=60))
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(worker: Callable, out_dir: Path, world_size: int = 2) -> list[dict]:
    """Runs ``worker(rank, world_size, port, out_dir)`` in ``world_size`` processes; each saves
    ``out_dir/rank{r}.pt``, returned here in rank order."""
    mp.spawn(worker, args=(world_size, free_port(), str(out_dir)), nprocs=world_size, join=True)
    return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
