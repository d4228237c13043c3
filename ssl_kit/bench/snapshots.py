"""Time-to-accuracy: snapshots of a network at wall-clock marks of its pretraining, evaluated after
the run (so evaluation never eats into the training budget) by kNN on a fixed bank."""

from __future__ import annotations

import copy
import re
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback, Timer
from torch import nn

SNAPSHOT_NAME = re.compile(r"^t(\d+)ms\.pt$")


class Snapshots(Callback):
    """Saves ``network``'s weights (a plain state dict) to ``folder/t<milliseconds>ms.pt`` each time the
    training time passes another ``every_seconds``, and once at the end (unless the last step was
    just saved: a budget that ends on a mark gives one point, not two). Training time is the
    Trainer's ``Timer`` (``--trainer.max_time``; a resumed run continues it) or, without one, the
    time since training started. Rank zero writes."""

    def __init__(self, folder: str | Path, network: nn.Module, every_seconds: float) -> None:
        if every_seconds <= 0:
            raise ValueError(f"every_seconds must be positive, got {every_seconds}")
        self.folder, self.network, self.every = Path(folder), network, every_seconds
        self._timer: Timer | None = None
        self._start = 0.0
        self._next = every_seconds
        self._saved_step = -1

    def elapsed(self) -> float:
        return self._timer.time_elapsed("train") if self._timer is not None else time.monotonic() - self._start

    def on_train_start(self, trainer, pl_module) -> None:
        self._timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
        self._start = time.monotonic()
        self._next = (int(self.elapsed() // self.every) + 1) * self.every
        self._saved_step = -1

    def on_train_batch_end(self, trainer, *args) -> None:
        if self.elapsed() >= self._next:
            self.save(trainer, self._next)
            self._next += self.every

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step != self._saved_step:
            self.save(trainer, self.elapsed())

    def save(self, trainer, seconds: float) -> None:
        self._saved_step = trainer.global_step
        if trainer.is_global_zero:
            self.folder.mkdir(parents=True, exist_ok=True)
            state = {key: value.detach().cpu().clone() for key, value in self.network.state_dict().items()}
            torch.save(state, self.folder / f"t{int(round(1000 * seconds)):09d}ms.pt")


def saved_snapshots(folder: str | Path) -> list[tuple[float, Path]]:
    """``(seconds, path)`` of the snapshots in ``folder``, in time order."""
    folder = Path(folder)
    found = [(int(m.group(1)) / 1000, path) for path in folder.glob("t*ms.pt") if (m := SNAPSHOT_NAME.match(path.name))]
    return sorted(found)


def snapshot_networks(network: nn.Module, folder: str | Path):
    """``(seconds, network with that snapshot's weights)`` for every snapshot (weights only: never unpickled)."""
    for seconds, path in saved_snapshots(folder):
        copy_ = copy.deepcopy(network)
        copy_.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        yield seconds, copy_
