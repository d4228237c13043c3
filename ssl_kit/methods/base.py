"""Shared base for self-supervised methods: backbone, optimisation recipe, online monitors, NaN guard."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from ssl_kit.checkpoints import read_checkpoint, resume_checkpoint, upgrade_hparams
from ssl_kit.evaluation.knn import knn_predict
from ssl_kit.inputs import InputSpec
from ssl_kit.models.backbones import backbone_spec, build_from_spec
from ssl_kit.models.saved import load_backbone_weights
from ssl_kit.optim import DECAYED, OptimizerName, TrainingBudget, build_optimizer, cosine_decay, decay_groups, warmup_cosine_config


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


class BackboneModule(L.LightningModule):
    """What every ssl_kit LightningModule shares: a timm backbone by name (small-image variants,
    ``backbone_kwargs`` such as ``drop_rate`` / ``drop_path_rate`` passed to timm), parameter groups
    without weight decay on biases and norms, SGD / LARS / AdamW, linear warmup + cosine stepped
    per optimizer step, and a guard that stops on a non-finite loss before the optimizer step.

    ``input_spec`` (what one sample looks like: ``ssl_kit.inputs.InputSpec``) and ``num_classes``
    are linked from the DataModule by the CLI.

    The backbone starts from random init, from timm's weights (``pretrained``, downloaded), or from
    an ssl_kit checkpoint (``init_from``: a pretraining or self-training ``.ckpt``, or a backbone
    exported by ``python -m ssl_kit.export``; the same architecture, or an error naming the file).
    Methods build their other networks (EMA targets, teachers) from it afterwards, so those start
    from it too.

    Speed options (off by default: each helps only on some hardware; README "Speed" has the
    measurements), applied when fitting starts so checkpoints stay plain:
    ``channels_last`` stores 2-D conv weights channels-last (inputs follow the weights' format in
    the conv kernels; models without 2-D convs are left as they are), ``compile_backbone`` compiles
    the backbone's forward in place (``nn.Module.compile``: state-dict keys unchanged; MAE's and
    MSN's masked encoders call the backbone's parts directly and stay uncompiled),
    ``fused_optimizer`` uses torch's fused SGD / AdamW.

    ``final_weight_decay``: the weight decay of the decaying groups (those ``param_groups`` marks
    ``DECAYED``: the weights, at every layer-wise learning rate) follows a cosine from
    ``weight_decay`` to it over the run's budget, set before each optimizer step (the official DINO,
    MSN and I-JEPA ViT recipes: 0.04 -> 0.4); ``None`` keeps it constant.
    """

    #: Whether ResNets' residual branches start at zero (see ``backbone_spec``); ``backbone_kwargs`` overrides.
    zero_init_last = False
    #: Whether BatchNorm statistics span every rank under DDP (the official Barlow Twins and MoCo v3
    #: convert their models to SyncBatchNorm). Applied on CUDA, where torch's SyncBatchNorm runs;
    #: ``--trainer.sync_batchnorm true`` does it for any method.
    sync_batchnorm = False

    def __init__(
        self,
        backbone: str = "resnet18",
        input_spec: InputSpec | None = None,
        num_classes: int = 10,
        small_image: bool | None = None,
        backbone_kwargs: dict[str, Any] | None = None,
        optimizer: OptimizerName = "sgd",
        lr: float = 0.1,
        weight_decay: float = 1e-4,
        momentum: float = 0.9,
        nesterov: bool = False,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_epochs: float = 10.0,
        min_lr_fraction: float = 0.0,
        channels_last: bool = False,
        compile_backbone: bool = False,
        fused_optimizer: bool = False,
        final_weight_decay: float | None = None,
        pretrained: bool = False,
        init_from: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["input_spec"])
        self.input_spec = InputSpec.coerce(input_spec)
        self.hparams["input_spec"] = self.input_spec.to_dict()  # plain types: weights-only loading reads it
        self.backbone_spec = backbone_spec(backbone, self.input_spec, small_image, backbone_kwargs, self.zero_init_last)
        self.backbone = build_from_spec(self.backbone_spec, pretrained=pretrained)
        if init_from is not None:
            load_backbone_weights(self.backbone, self.backbone_spec, init_from)
        self.feature_dim: int = self.backbone.num_features
        self._budget: TrainingBudget | None = None
        self.decayed_groups: list[int] = []  # the optimizer's groups that final_weight_decay schedules

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, *args, **kwargs):
        """Lightning's loader, for checkpoints written before a change of their class's path
        (``MOVED_CLASSES``) or of its arguments (``upgrade_hparams``) too. The weights come from the
        checkpoint, so the run's starting point (``init_from``, ``pretrained``) is not read again
        (it may be gone); a keyword argument still overrides."""
        kwargs = {"init_from": None, "pretrained": False, **kwargs}
        checkpoint = read_checkpoint(checkpoint_path, mmap=True)
        hparams = checkpoint.get("hyper_parameters", {})
        upgraded = upgrade_hparams(hparams)
        if upgraded != hparams:  # Lightning builds the model from the file's hparams: hand it upgraded ones
            checkpoint["hyper_parameters"] = upgraded
            checkpoint_path = io.BytesIO()
            torch.save(checkpoint, checkpoint_path)
            checkpoint_path.seek(0)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    def forward(self, images: Tensor) -> Tensor:
        return self.backbone(images)

    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        self._budget = None  # a new fit, a new budget
        trainer = self.trainer
        if self.sync_batchnorm and trainer.world_size > 1 and trainer.strategy.root_device.type == "cuda":
            nn.SyncBatchNorm.convert_sync_batchnorm(self)  # in place: only the BatchNorm leaves are replaced
        if self.hparams.channels_last:
            for module in self.modules():
                if isinstance(module, nn.Conv2d):
                    module.to(memory_format=torch.channels_last)
        if self.hparams.compile_backbone:
            self.backbone.compile()

    def stop_if_not_finite(self, loss: Tensor) -> None:
        finite = bool(torch.isfinite(loss).item())
        if self.trainer.world_size > 1:
            finite = self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        if not finite:
            folder = getattr(self.trainer.checkpoint_callback, "dirpath", None)
            last = resume_checkpoint(folder) if folder and Path(folder).is_dir() else None
            advice = (
                f"The last good checkpoint is {last}: resume from it with --ckpt_path last."
                if last
                else "No checkpoint was written before it: run again (without --ckpt_path)."
            )
            raise NonFiniteLossError(
                f"training loss is {loss.item()} at epoch {self.current_epoch}, global step {self.global_step}; "
                "stopped before the optimizer step. Lower --model.lr, lengthen --model.warmup_epochs or set "
                f"--trainer.gradient_clip_val. {advice}"
            )

    # -- optimisation ----------------------------------------------------------------------
    @property
    def budget(self) -> TrainingBudget:
        """The current fit's budget (steps, epochs or wall-clock), which every schedule follows."""
        if self._budget is None or self._budget.trainer is not self.trainer:
            self._budget = TrainingBudget(self.trainer)
        return self._budget

    def run_fraction(self, step: int) -> float:
        """How far through its budget the run is at optimizer step ``step`` (0 to 1)."""
        return self.budget.fraction(step)

    def weight_decay_at(self, progress: float) -> float:
        """The decaying groups' weight decay ``progress`` (0 to 1) of the way through the run."""
        hp = self.hparams
        if hp.get("final_weight_decay") is None:
            return hp.weight_decay
        return hp.final_weight_decay + (hp.weight_decay - hp.final_weight_decay) * cosine_decay(progress)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        """Sets the decaying groups' weight decay for the coming optimizer step, when it is scheduled."""
        if self.hparams.get("final_weight_decay") is None:
            return
        weight_decay = self.weight_decay_at(self.run_fraction(self.global_step))
        groups = self.trainer.optimizers[0].param_groups
        for index in self.decayed_groups:
            groups[index]["weight_decay"] = weight_decay
        self.log("train/weight_decay", weight_decay)

    def trained_modules(self) -> list[nn.Module]:
        """Modules in the weight-decay / no-decay groups at the base learning rate."""
        return list(self.children())

    def extra_param_groups(self) -> list[dict]:
        """Further optimizer groups with their own settings (e.g. the online probe)."""
        return []

    def param_groups(self) -> list[dict]:
        """The optimizer's groups: ``trained_modules`` with and without weight decay, then the extra
        ones; the groups whose weight decay ``final_weight_decay`` schedules are marked ``DECAYED``."""
        return decay_groups(self.trained_modules(), self.hparams.weight_decay) + self.extra_param_groups()

    def configure_optimizers(self):
        hp = self.hparams
        if hp.optimizer == "lars" and hp.weight_decay == 0:
            raise ValueError(
                "--model.optimizer lars with --model.weight_decay 0: lightly's LARS adapts only parameters with weight "
                "decay, so every step would be plain SGD. Give a weight decay (Barlow Twins: 1.5e-6) or use sgd."
            )
        groups = self.param_groups()
        # by position: the optimizer drops the mark, and a resumed optimizer's groups keep the order
        self.decayed_groups = [index for index, group in enumerate(groups) if group.get(DECAYED)]
        optimizer = build_optimizer(hp.optimizer, groups, hp.lr, hp.momentum, hp.betas, hp.nesterov, hp.fused_optimizer)
        return warmup_cosine_config(optimizer, self.trainer, hp.warmup_epochs, hp.min_lr_fraction, self.budget)


class SSLMethod(BackboneModule):
    """A backbone trained by a method-specific ``training_loss``; subclasses add a head and a loss.

    On top of ``BackboneModule``: an online linear probe on *detached* features of the first view
    (trained on the labeled part of each pretraining batch, evaluated on the validation set) and a
    kNN monitor (bank: the first validation loader).
    """

    def __init__(self, *args, probe_lr: float = 0.1, knn_k: int = 20, knn_temperature: float = 0.1, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # BatchNorm without affine before the linear head (as in MAE's probe) makes the probe
        # insensitive to the feature scale, which drifts during pretraining.
        num_classes = self.hparams.num_classes
        self.probe = nn.Sequential(nn.BatchNorm1d(self.feature_dim, affine=False), nn.Linear(self.feature_dim, num_classes))
        self.probe_accuracy = MulticlassAccuracy(num_classes, average="micro")
        self._bank: list[tuple[Tensor, Tensor]] = []
        self._queries: list[tuple[Tensor, Tensor]] = []

    # -- the part each method writes -------------------------------------------------------
    projector: nn.Module
    criterion: nn.Module

    def training_loss(self, views: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Returns the self-supervised loss and the backbone features of the first view.

        The default suits two-view methods: both views through the backbone and
        ``self.projector``, compared by ``self.criterion``. Methods with other shapes override it.
        """
        features = [self.backbone(view) for view in views[:2]]
        z0, z1 = (self.projector(f) for f in features)
        return self.criterion(z0, z1), features[0]

    # -- training --------------------------------------------------------------------------
    def training_step(self, batch: tuple[list[Tensor], Tensor], batch_idx: int) -> Tensor:
        views, labels = batch
        loss, features = self.training_loss(views)
        self.stop_if_not_finite(loss)
        probe_loss = self.probe_loss(features.detach(), labels)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/probe_loss", probe_loss)
        return loss + probe_loss

    def probe_loss(self, features: Tensor, labels: Tensor) -> Tensor:
        """Cross-entropy of the online probe on labeled samples (label >= 0); zero when there are none."""
        logits = self.probe(features)
        if labels.ndim == 2:  # multi-hot (multi-label data): no online probe; it stays in the graph for DDP
            return 0.0 * logits.sum()
        labeled = (labels >= 0).sum().clamp(min=1)
        return F.cross_entropy(logits, labels, ignore_index=-1, reduction="sum") / labeled

    # -- online monitors -------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._bank.clear()
        self._queries.clear()

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        images, labels = batch
        if labels.ndim == 2:  # multi-hot: no online monitors; the harness scores such data by mAP
            return
        features = self.backbone(images)
        if dataloader_idx == 0:
            self._bank.append((features, labels))
            return
        self._queries.append((features, labels))
        self.probe_accuracy(self.probe(self.probe_features(images, features, batch_idx)), labels)
        self.log("val/probe_acc", self.probe_accuracy, prog_bar=True, add_dataloader_idx=False)

    def probe_features(self, inputs: Tensor, features: Tensor, batch_idx: int) -> Tensor:
        """What the online probe is evaluated on: the backbone's features of the full inputs (the
        kNN monitor's), or, for a method whose probe trains on other features, those (MAE: masked)."""
        return features

    def on_validation_epoch_end(self) -> None:
        if not self._bank or not self._queries:
            return
        bank, bank_labels = (self._gathered(part) for part in zip(*self._bank))
        queries, query_labels = (self._gathered(part) for part in zip(*self._queries))
        scores = knn_predict(
            queries, bank, bank_labels, self.hparams.num_classes, self.hparams.knn_k, self.hparams.knn_temperature
        )
        accuracy = (scores.argmax(1) == query_labels).float().mean()
        self.log("val/knn_acc", accuracy, prog_bar=True, rank_zero_only=True)
        self._bank.clear()
        self._queries.clear()

    def _gathered(self, parts: tuple[Tensor, ...]) -> Tensor:
        local = torch.cat(parts)
        return self.all_gather(local).flatten(0, 1) if self.trainer.world_size > 1 else local

    # -- optimisation ----------------------------------------------------------------------
    def trained_modules(self) -> list[nn.Module]:
        """Modules trained by the self-supervised loss (everything but the probe)."""
        return [module for name, module in self.named_children() if name not in ("probe", "probe_accuracy")]

    def extra_param_groups(self) -> list[dict]:
        return [{"params": list(self.probe.parameters()), "weight_decay": 0.0, "lr": self.hparams.probe_lr}]
