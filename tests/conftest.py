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


def fresh_copy(model, **overrides):
    """The same method and hyper-parameters (or ``overrides``) at random init, seeded like the trained runs."""
    import lightning as L

    L.seed_everything(0)
    hparams = {k: v for k, v in model.hparams.items() if not k.startswith("_")}
    return type(model)(**{**hparams, **overrides})


def random_inits(model) -> dict:
    """The baselines "learns" is measured against: the method's own random init and, for ResNets,
    the init with residual branches on (timm zero-initialises each block's last BatchNorm, which
    leaves a random ResNet seeing little more than its strided shortcuts: a weaker baseline)."""
    copies = {"own init": fresh_copy(model)}
    if model.hparams.backbone.startswith("resnet"):
        kwargs = {**(model.hparams.backbone_kwargs or {}), "zero_init_last": False}
        copies["residual branches on"] = fresh_copy(model, backbone_kwargs=kwargs)
    return copies


def knn_against_random_init(cli, label: str) -> tuple[float, float]:
    """kNN accuracy (bank -> validation set) of a trained run's backbone and of the best of the
    same method's random inits (``random_inits``), printed, so "learns" is measured against the
    strongest random-features baseline."""
    from ssl_kit.evaluation import knn_accuracy

    bank, val = cli.datamodule.val_dataloader()
    classes = cli.datamodule.num_classes
    trained = knn_accuracy(cli.model.backbone, bank, val, num_classes=classes)
    baselines = {name: knn_accuracy(copy.backbone, bank, val, num_classes=classes) for name, copy in random_inits(cli.model).items()}
    random_init = max(baselines.values())
    shown = ", ".join(f"{name} {value:.3f}" for name, value in baselines.items())
    print(f"{label}: kNN trained {trained:.3f} vs random init {random_init:.3f} ({shown}) after {cli.trainer.global_step} steps")
    return trained, random_init
