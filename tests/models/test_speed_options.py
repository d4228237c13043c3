"""Speed options (channels_last, fused optimizer, compiled backbone) change speed, not results;
persistent_workers reaches the loaders."""

from __future__ import annotations

import shutil

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from ssl_kit.data import DigitsDataModule
from ssl_kit.inputs import InputSpec
from ssl_kit.methods import BarlowTwins, MAE

BATCH, SIZE = 8, 16


class LossRecorder(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def views_loader(steps: int = 2) -> DataLoader:
    """The same two random views and labels every step (whole batches: ``batch_size=None``)."""
    generator = torch.Generator().manual_seed(0)
    batch = ([torch.randn(BATCH, 3, SIZE, SIZE, generator=generator) for _ in range(2)], torch.randint(0, 10, (BATCH,), generator=generator))
    return DataLoader([batch] * steps, batch_size=None)


def model(**options) -> BarlowTwins:
    L.seed_everything(0, verbose=False)
    return BarlowTwins(
        backbone="resnet10t", input_spec=InputSpec.image(SIZE), projection_hidden_dim=64, projection_dim=64, warmup_epochs=0, **options
    )


def fit(module: L.LightningModule, steps: int = 2) -> list[float]:
    """Training losses of ``steps`` steps: the second one shows the first update's effect."""
    recorder = LossRecorder()
    trainer = L.Trainer(
        accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, callbacks=[recorder],
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=views_loader(steps))
    return recorder.losses


@pytest.fixture(scope="module")
def reference() -> list[float]:
    return fit(model())


@pytest.mark.parametrize("option", ["channels_last", "fused_optimizer"])
def test_option_gives_the_same_losses(option, reference):
    module = model(**{option: True})
    assert fit(module) == pytest.approx(reference, rel=1e-4)
    if option == "channels_last":
        conv = next(m for m in module.backbone.modules() if isinstance(m, torch.nn.Conv2d))
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_fused_adamw_gives_the_same_losses():
    options = dict(optimizer="adamw", lr=1e-3)
    assert fit(model(fused_optimizer=True, **options)) == pytest.approx(fit(model(**options)), rel=1e-4)


def test_channels_last_on_a_vit_trains_as_before():
    """A ViT has one 2-D conv (the patch embedding): only it changes format; a 2-block ViT keeps it quick."""
    options = dict(
        backbone="vit_tiny_patch16_224", backbone_kwargs={"depth": 2}, input_spec=InputSpec.image(SIZE), mask_ratio=0.5,
        decoder_dim=32, decoder_depth=1, decoder_heads=2,
    )
    L.seed_everything(0, verbose=False)
    plain = fit(MAE(**options))
    L.seed_everything(0, verbose=False)
    assert fit(MAE(**options, channels_last=True)) == pytest.approx(plain, rel=1e-4)


def test_lars_with_fused_optimizer_names_the_key():
    with pytest.raises(ValueError, match="fused_optimizer"):
        fit(model(optimizer="lars", fused_optimizer=True), steps=1)


@pytest.mark.skipif(shutil.which("cc") is None, reason="torch.compile (inductor, CPU) needs a C compiler")
@pytest.mark.slow
def test_compiled_backbone_same_losses_and_interchangeable_checkpoints(reference, tmp_path):
    """Checkpoints load both ways, strictly (same keys)."""
    compiled = model(compile_backbone=True)
    assert fit(compiled) == pytest.approx(reference, rel=1e-3)
    plain = model()
    torch.save(compiled.state_dict(), tmp_path / "compiled.pt")
    plain.load_state_dict(torch.load(tmp_path / "compiled.pt"))
    compiled.load_state_dict(model().state_dict())


@pytest.mark.parametrize("persistent", [True, False])
def test_persistent_workers_reach_the_loaders(persistent):
    data = DigitsDataModule(batch_size=32, num_workers=1, persistent_workers=persistent)
    assert data.train_dataloader().persistent_workers is persistent
    assert DigitsDataModule(batch_size=32, num_workers=0).train_dataloader().persistent_workers is False
