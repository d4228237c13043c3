"""LightningCLI for ssl_kit: methods and DataModules chosen by name, checkpoints and logs under one run folder."""

from __future__ import annotations

import sys
from pathlib import Path
from unittest import mock

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins.io import CheckpointIO

import ssl_kit.data  # noqa: F401 - registers DataModules for short class names
import ssl_kit.methods  # noqa: F401 - registers methods for short class names
import ssl_kit.semi  # noqa: F401 - registers self-training methods for short class names
import ssl_kit.transforms  # noqa: F401 - registers view augmentations for short class names
from ssl_kit.checkpoints import AtomicCheckpointIO, RandomStateCheckpoint, RunFolderGuard, resume_checkpoint
from ssl_kit.data import SSLDataModule
from ssl_kit.methods import BackboneModule

DEFAULT_ROOT = "runs/default"
BATCH_LIMITS = ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches")


def warn_on_whole_epoch_limits(args: list[str]) -> None:
    """``--trainer.limit_train_batches 1`` reads as 1.0 on the command line (jsonargparse takes the
    float): the whole epoch, not the one batch it looks like. Say so."""
    for index, arg in enumerate(args):
        key, _, value = arg.partition("=")
        if not value and index + 1 < len(args):
            value = args[index + 1]
        if key.removeprefix("--trainer.") in BATCH_LIMITS and key.startswith("--trainer.") and value.strip() == "1":
            print(f"ssl_kit: warning: {key} 1 is read as 1.0, every batch of the epoch; for a short run give "
                  f"2 or more batches or a fraction such as 0.01", file=sys.stderr, flush=True)  # fmt: skip


class SSLCLI(LightningCLI):
    """``model`` and ``data`` are subclasses of ``BackboneModule`` (every pretraining and
    self-training method) / ``SSLDataModule``; the data's ``num_classes`` and ``input_spec`` (what
    one sample looks like) are linked into the model. Two checkpoint callbacks are always present:
    ``last_checkpoint`` (``last.ckpt`` every epoch, for ``--ckpt_path last``) and
    ``checkpoint`` (kept every ``every_n_epochs``), both in ``<default_root_dir>/checkpoints``,
    written atomically (``AtomicCheckpointIO``) with the random generators' state
    (``RandomStateCheckpoint``); ``--ckpt_path last`` resumes the newest readable one. One run at a
    time per folder, and a fresh run keeps an earlier one's checkpoints (``RunFolderGuard``)."""

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("trainer_defaults", {"default_root_dir": DEFAULT_ROOT})
        # No prefix matching: a mistyped key such as --trainer.max_epoch must fail, not guess.
        kwargs.setdefault("parser_kwargs", {"allow_abbrev": False, "fit": {"allow_abbrev": False}})
        super().__init__(
            BackboneModule, SSLDataModule, subclass_mode_model=True, subclass_mode_data=True, auto_configure_optimizers=False, **kwargs
        )

    def parse_arguments(self, parser, args) -> None:
        # Every ssl_kit entry point passes its whole argument list, sys.argv[1:] included: Lightning's
        # warning against giving both would fire on every command-line run.
        with mock.patch.object(sys, "argv", sys.argv[:1]):
            super().parse_arguments(parser, args)
        warn_on_whole_epoch_limits(args if isinstance(args, list) else [])

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.input_spec", "model.init_args.input_spec", apply_on="instantiate")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.filename": "epoch{epoch:04d}",
                "checkpoint.auto_insert_metric_name": False,
                "checkpoint.save_top_k": -1,
                "checkpoint.every_n_epochs": 10,
                "checkpoint.enable_version_counter": False,
            }
        )
        # Lightning writes save_last only alongside another save, so "last" is its own top-1 file.
        parser.add_lightning_class_args(ModelCheckpoint, "last_checkpoint")
        parser.set_defaults(
            {
                "last_checkpoint.filename": "last",
                "last_checkpoint.save_top_k": 1,
                "last_checkpoint.every_n_epochs": 1,
                "last_checkpoint.enable_version_counter": False,
            }
        )

    def _instantiate_trainer(self, config: dict, callbacks: list) -> Trainer:
        root = Path(config.get("default_root_dir") or DEFAULT_ROOT)
        for callback in callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
                callback.dirpath = str(root / "checkpoints")
        callbacks.extend([RandomStateCheckpoint(), RunFolderGuard()])
        plugins = config.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(isinstance(plugin, CheckpointIO) for plugin in plugins):
            config["plugins"] = [*plugins, AtomicCheckpointIO()]
        if config.get("logger") in (None, True):
            config["logger"] = [CSVLogger(str(root), name="csv"), TensorBoardLogger(str(root), name="tensorboard")]
            callbacks.append(LearningRateMonitor("step"))
        return super()._instantiate_trainer(config, callbacks)

    def before_fit(self) -> None:
        fit = self.config_init[self.subcommand]
        if fit.get("ckpt_path") == "last" and self.trainer.checkpoint_callback is not None:
            fit["ckpt_path"] = resume_checkpoint(self.trainer.checkpoint_callback.dirpath)
            if fit["ckpt_path"] is None:
                print(f"ssl_kit: no checkpoint in {self.trainer.checkpoint_callback.dirpath} to resume; starting from scratch", flush=True)
        skipped = self.datamodule.skipped_files
        if skipped is not None:  # --data.skip_bad_files: list what is skipped in the run folder
            skipped.path = Path(self.trainer.default_root_dir) / "skipped_files.txt"
            if fit.get("ckpt_path") is None and self.trainer.is_global_zero:
                skipped.path.parent.mkdir(parents=True, exist_ok=True)
                skipped.path.write_text("")

    def after_fit(self) -> None:
        trainer = self.trainer
        if not trainer.is_global_zero:
            return
        metrics = trainer.callback_metrics
        lines = ["", "ssl_kit: training finished"]
        for key in ("val/probe_acc", "val/knn_acc", "val/teacher_acc", "train/loss"):
            if key in metrics:
                lines.append(f"  {key:<15} {float(metrics[key]):.4f}")
        if self.datamodule.skipped_files is not None:
            lines.append(f"  bad files       {self.datamodule.skipped_files.summary() or 'none skipped'}")
        if trainer.checkpoint_callback is not None:
            lines.append(f"  checkpoints     {trainer.checkpoint_callback.dirpath}")
        for logger in trainer.loggers:
            lines.append(f"  {type(logger).__name__:<15} {logger.log_dir}")
        print("\n".join(lines), flush=True)

