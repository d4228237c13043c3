"""``Snapshots``: one weights file per wall-clock mark of pretraining, and one at the end."""

from __future__ import annotations

from types import SimpleNamespace

from torch import nn

from ssl_kit.bench.snapshots import Snapshots, saved_snapshots


def run(tmp_path, marks_at_steps: list[float], end: float) -> list[float]:
    """Steps 1..n whose training time is ``marks_at_steps``; training ends at ``end`` seconds."""
    callback = Snapshots(tmp_path, nn.Linear(2, 2), every_seconds=10)
    trainer = SimpleNamespace(callbacks=[], is_global_zero=True, global_step=0)
    clock = iter([0.0, *marks_at_steps, end])
    callback.elapsed = lambda: next(clock)
    callback.on_train_start(trainer, None)
    for step in range(1, len(marks_at_steps) + 1):
        trainer.global_step = step
        callback.on_train_batch_end(trainer)
    callback.on_train_end(trainer, None)
    return [seconds for seconds, _ in saved_snapshots(tmp_path)]


def test_a_snapshot_per_mark_and_one_at_the_end(tmp_path):
    assert run(tmp_path, [4.0, 11.0, 15.0], end=15.2) == [10.0, 15.2]


def test_a_budget_ending_on_a_mark_is_saved_once(tmp_path):
    # the time limit stops training right after the step that passed the 20 s mark
    assert run(tmp_path, [11.0, 20.1], end=20.16) == [10.0, 20.0]
