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


def fresh_copy(model):
    """The same method and hyper-parameters at random init (seeded like the trained runs)."""
    import lightning as L

    L.seed_everything(0)
    return type(model)(**{k: v for k, v in model.hparams.items() if not k.startswith("_")})


def knn_against_random_init(cli, label: str) -> tuple[float, float]:
    """kNN accuracy (bank -> validation set) of a trained run's backbone and of the same method
    at random init, printed, so "learns" is measured against the random-features baseline."""
    from ssl_kit.evaluation import knn_accuracy

    bank, val = cli.datamodule.val_dataloader()
    classes = cli.datamodule.num_classes
    trained = knn_accuracy(cli.model.backbone, bank, val, num_classes=classes)
    random_init = knn_accuracy(fresh_copy(cli.model).backbone, bank, val, num_classes=classes)
    print(f"{label}: kNN trained {trained:.3f} vs random init {random_init:.3f} after {cli.trainer.global_step} steps")
    return trained, random_init
