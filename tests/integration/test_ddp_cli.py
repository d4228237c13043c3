"""The CLI under Lightning DDP: two CPU processes with gloo, as a user launches it."""

from __future__ import annotations

import sys

import pytest
import torch

from helpers import REPO, TINY, run_command

pytestmark = pytest.mark.slow  # spawned process groups: seconds each


def test_fit_runs_as_two_gloo_processes(tmp_path):
    command = [
        sys.executable, "-m", "ssl_kit.fit", "--config", str(REPO / "configs" / "barlow_twins_digits.yaml"),
        "--trainer.default_root_dir", str(tmp_path), *TINY,
        "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.max_epochs", "1",
    ]  # fmt: skip
    result = run_command(command, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "world_size: 2" in result.stderr or "distributed_backend=gloo" in result.stderr
    assert "val/knn_acc" in result.stdout
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    # Each rank took 2 batches of its own shard: the step count is per optimizer step, not per rank.
    assert checkpoint["global_step"] == 2
