"""The documented multi-process launches, run as 2 local CPU processes: torchrun, and the SLURM
script under a stand-in ``srun`` that starts the tasks with the variables SLURM sets."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import REPO, TINY, run_command
from ddp import free_port

pytestmark = pytest.mark.slow  # spawned process groups: seconds each

CONFIG = str(REPO / "configs" / "barlow_twins_digits.yaml")
OVERRIDES = [*TINY, "--trainer.max_epochs", "1"]

#: Starts every task of a one-node job locally with SLURM's per-task variables.
FAKE_SRUN = """#!{python}
import os, subprocess, sys
tasks = int(os.environ["SLURM_NTASKS_PER_NODE"])
env = dict(os.environ, SLURM_NTASKS=str(tasks), SLURM_NODEID="0", SLURM_NODELIST="127.0.0.1")
processes = [
    subprocess.Popen(sys.argv[1:], env=dict(env, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank)))
    for rank in range(tasks)
]
sys.exit(max(process.wait() for process in processes))
"""


def assert_two_process_run(result: subprocess.CompletedProcess, root: Path) -> None:
    assert result.returncode == 0, result.stderr[-3000:]
    assert "world_size: 2" in result.stderr or "distributed_backend=gloo" in result.stderr
    checkpoint = torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 2  # 2 batches per rank, each an optimizer step of both ranks


def test_torchrun_launch(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command = [*torchrun, "-m", "ssl_kit.fit", "--config", CONFIG, *OVERRIDES, "--trainer.default_root_dir", str(tmp_path),
               "--trainer.devices", "2", "--trainer.strategy", "ddp"]  # fmt: skip
    result = run_command(command, cwd=REPO, timeout=600)
    assert_two_process_run(result, tmp_path)


def test_slurm_script_launch(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    srun = bin_dir / "srun"
    srun.write_text(FAKE_SRUN.format(python=sys.executable))
    srun.chmod(srun.stat().st_mode | stat.S_IEXEC)
    python = bin_dir / "python"  # the script's `python`: this interpreter, as a venv's bin/ on PATH gives
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(srun.stat().st_mode)
    env = dict(
        os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID="4242", SLURM_JOB_NAME="ssl_kit",
        SLURM_NNODES="1", SLURM_NTASKS_PER_NODE="2", MASTER_PORT=str(free_port()),
    )  # fmt: skip
    command = ["bash", "scripts/slurm_pretrain.sbatch", CONFIG, *OVERRIDES, "--trainer.default_root_dir", str(tmp_path / "run")]
    result = run_command(command, cwd=REPO, env=env, timeout=600)
    assert_two_process_run(result, tmp_path / "run")
    assert result.stderr.count("SLURM auto-requeueing enabled") == 2  # each task found its SLURM environment
