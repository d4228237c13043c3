"""The CLI as a user drives it: parse, override, unknown keys, resume, NaN stop, export."""

from __future__ import annotations


import pytest
import timm
import torch
import yaml

from helpers import REPO, fit
from ssl_kit.cli import SSLCLI
from ssl_kit.export import main as export_main
from ssl_kit.fit import main as fit_main
from ssl_kit.methods import SimCLR
from ssl_kit.models import load_exported_backbone
from ssl_kit.methods.base import NonFiniteLossError


def print_config(capsys, *args: str) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        SSLCLI(args=["fit", "--config", str(REPO / "configs" / "quickstart.yaml"), *args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_config_parses_and_overrides_apply(capsys):
    config = print_config(capsys, "--model.lr", "0.05", "--data.batch_size", "64", "--trainer.max_epochs", "3")
    assert config["model"]["class_path"] == "ssl_kit.methods.SimCLR"
    assert config["model"]["init_args"]["lr"] == 0.05
    assert config["data"]["class_path"] == "ssl_kit.data.DigitsDataModule"
    assert config["data"]["init_args"]["batch_size"] == 64
    assert config["trainer"]["max_epochs"] == 3


def test_command_line_run_parses_sys_argv_without_lightning_warning(monkeypatch, capsys, recwarn):
    """``python -m ssl_kit.fit`` hands sys.argv[1:] to LightningCLI as args, which Lightning warns about."""
    argv = ["--config", str(REPO / "configs" / "quickstart.yaml"), "--model.lr", "0.07", "--print_config"]
    monkeypatch.setattr("sys.argv", ["ssl_kit.fit", *argv])
    with pytest.raises(SystemExit):
        fit_main()
    assert yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["lr"] == 0.07
    assert not [w for w in recwarn if "args parameter" in str(w.message)]


def test_model_and_data_chosen_by_short_name_or_class_path(capsys):
    config = print_config(
        capsys, "--model", "BarlowTwins", "--data", "ssl_kit.data.MNISTDataModule", "--data.root", "/nowhere"
    )
    assert config["model"]["class_path"] == "ssl_kit.methods.BarlowTwins"
    assert config["model"]["init_args"]["lambda_param"] == pytest.approx(5e-3)
    assert config["data"]["class_path"] == "ssl_kit.data.MNISTDataModule"


@pytest.mark.parametrize("key", ["--model.init_args.learning_rate", "--data.batchsize", "--trainer.max_epoch"])
def test_unknown_key_fails_naming_it(capsys, key):
    with pytest.raises(SystemExit) as exit_info:
        SSLCLI(args=["fit", "--config", str(REPO / "configs" / "quickstart.yaml"), key, "1"])
    assert exit_info.value.code != 0
    assert key.split(".")[-1] in capsys.readouterr().err


def test_unknown_key_in_config_file_fails_naming_it(tmp_path, capsys):
    config = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    config["model"]["init_args"]["temprature"] = 0.2
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit):
        SSLCLI(args=["fit", "--config", str(path)])
    assert "temprature" in capsys.readouterr().err


@pytest.mark.slow
def test_resume_from_last_continues_step_count_and_optimizer(tmp_path):
    first = fit("quickstart.yaml", tmp_path, "--trainer.max_epochs", "1")
    assert first.trainer.global_step == 2
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert last.is_file()
    saved = torch.load(last, map_location="cpu", weights_only=False)
    assert saved["global_step"] == 2
    momentum = saved["optimizer_states"][0]["state"]
    assert momentum, "optimizer state (momentum buffers) must be checkpointed"

    second = fit("quickstart.yaml", tmp_path, "--trainer.max_epochs", "2", "--ckpt_path", "last")
    assert second.trainer.current_epoch == 2
    assert second.trainer.global_step == 4
    # The schedule continued from step 2 rather than restarting at step 0.
    assert second.trainer.lr_scheduler_configs[0].scheduler.last_epoch == 4


@pytest.mark.slow
def test_training_writes_csv_and_tensorboard_logs_and_prints_summary(tmp_path, capsys):
    fit("quickstart.yaml", tmp_path, "--trainer.max_epochs", "1", "--trainer.log_every_n_steps", "1")
    out = capsys.readouterr().out
    assert "val/probe_acc" in out and "val/knn_acc" in out
    assert str(tmp_path / "checkpoints") in out
    metrics = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text()
    assert "val/knn_acc" in metrics and "train/loss" in metrics
    assert list((tmp_path / "tensorboard" / "version_0").glob("events.out.tfevents.*"))


class ExplodingSimCLR(SimCLR):
    """SimCLR whose loss becomes NaN from the third optimizer step on."""

    explode_at = 2

    def training_loss(self, views):
        loss, features = super().training_loss(views)
        if self.global_step >= self.explode_at:
            loss = loss * float("nan")
        return loss, features


class ExplodingAtOnceSimCLR(ExplodingSimCLR):
    explode_at = 0


@pytest.mark.slow
def test_nan_loss_stops_with_clear_message_and_keeps_last_good_checkpoint(tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"training loss is nan at epoch 1, global step 2.*The last good checkpoint is .*last.ckpt"):
        fit("quickstart.yaml", tmp_path, "--trainer.max_epochs", "3", "--model", f"{__name__}.ExplodingSimCLR")
    with pytest.raises(NonFiniteLossError, match=r"No checkpoint was written before it: run again \(without --ckpt_path\)"):
        fit("quickstart.yaml", tmp_path / "at_once", "--trainer.max_epochs", "3", "--model", f"{__name__}.ExplodingAtOnceSimCLR")
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values() if v.is_floating_point())


@pytest.mark.slow
def test_export_loads_into_plain_timm_model(tmp_path):
    fit("quickstart.yaml", tmp_path, "--trainer.max_epochs", "1", "--model.small_image", "false")
    out = export_main([str(tmp_path / "checkpoints" / "last.ckpt"), str(tmp_path / "backbone.pt")])
    model = timm.create_model("resnet18", num_classes=0)
    model.load_state_dict(torch.load(out, weights_only=True))
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert torch.equal(model.conv1.weight, checkpoint["state_dict"]["backbone.conv1.weight"])
    assert model.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 512)
    # Loading for evaluation needs only the checkpoint: weights and hyper-parameters, no trainer.
    restored = SimCLR.load_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu")
    assert torch.equal(restored.backbone.conv1.weight, model.conv1.weight)


def test_export_rebuilds_small_image_variant(tmp_path, capsys):
    fit("quickstart.yaml", tmp_path, "--trainer.max_epochs", "1")
    out = export_main([str(tmp_path / "checkpoints" / "last.ckpt"), str(tmp_path / "backbone.pt")])
    assert "load it with ssl_kit.models.load_exported_backbone(" in capsys.readouterr().out  # plain timm cannot
    model = load_exported_backbone(out)
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert model.conv1.kernel_size == (3, 3)
    assert torch.equal(model.conv1.weight, checkpoint["state_dict"]["backbone.conv1.weight"])


def test_any_method_starts_from_a_checkpoint_or_an_export_and_reloads_without_it(tmp_path):
    fit("quickstart.yaml", tmp_path / "simclr", "--trainer.max_epochs", "1")
    checkpoint = tmp_path / "simclr" / "checkpoints" / "last.ckpt"
    export = export_main([str(checkpoint), str(tmp_path / "backbone.pt")])
    pretrained = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]["backbone.conv1.weight"]
    for start in (checkpoint, export):  # BYOL on quickstart's backbone: its EMA target starts from the weights too
        cli = fit("byol_digits.yaml", tmp_path / "byol", "--model.init_from", str(start), "--trainer.max_steps", "0")
        assert torch.equal(cli.model.backbone.conv1.weight, pretrained)
        assert torch.equal(cli.model.momentum_backbone.conv1.weight, pretrained)
    # a checkpoint holds its weights: reloading it does not read the starting point, which may be gone
    cli = fit("byol_digits.yaml", tmp_path / "byol_trained", "--model.init_from", str(export), "--trainer.max_steps", "1")
    export.unlink()
    reloaded = type(cli.model).load_from_checkpoint(tmp_path / "byol_trained" / "checkpoints" / "last.ckpt", map_location="cpu")
    assert torch.equal(reloaded.backbone.conv1.weight, cli.model.backbone.conv1.weight)
    with pytest.raises(ValueError, match="last.ckpt.*does not fit"):
        fit("byol_digits.yaml", tmp_path / "other", "--model.backbone", "resnet34", "--model.init_from", str(checkpoint), "--trainer.max_steps", "0")
