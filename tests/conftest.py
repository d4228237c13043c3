"""Shared fixtures: a tiny, fast configuration of the real CLI on the embedded digits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Small enough for 2 CPU cores: 2 batches per epoch, in-process loading.
TINY_RUN = [
    "--data.num_workers", "0",
    "--trainer.limit_train_batches", "2",
    "--trainer.limit_val_batches", "2",
    "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
    "--trainer.accelerator", "cpu",
]  # fmt: skip
# Images: the digits at 8 px (their native size). Audio and video DataModules derive their sample
# size from the clip and the front end, so they use TINY_RUN alone.
TINY = ["--data.image_size", "8", "--data.batch_size", "32", *TINY_RUN]


@pytest.fixture(autouse=True)
def _single_thread_pairs():
    """Two torch threads: the CI machine has two cores, and tests run one at a time."""
    torch.set_num_threads(2)
    yield


def fit(config: str, root: Path, *overrides: str, base: list[str] = TINY):
    """Runs ``python -m ssl_kit.fit`` in-process and returns the LightningCLI object."""
    from ssl_kit.fit import main

    return main(["--config", str(REPO / "configs" / config), "--trainer.default_root_dir", str(root), *base, *overrides])
