"""Mean-teacher pseudo-label self-training: an EMA teacher labels weak views of unlabeled samples,
the student learns them on strong views, alongside the few labeled samples."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from ssl_kit.export import backbone_from_checkpoint
from ssl_kit.losses.self_training import DoublyRobustLoss, PseudoLabels, ThresholdedPseudoLabelLoss, pseudo_labels
from ssl_kit.methods.base import BackboneModule
from ssl_kit.methods.momentum import EMAUpdater, MomentumSchedule, MomentumTargets, frozen_copy
from ssl_kit.models.backbones import build_from_spec

Batch = dict[str, tuple[list[Tensor], Tensor]]


def load_backbone_weights(backbone: nn.Module, spec: dict, path: str | Path) -> None:
    """Loads an ssl_kit checkpoint's backbone (``.ckpt``) or an exported one (``python -m
    ssl_kit.export``: a state dict plus ``.json`` spec) into ``backbone``; a different architecture
    is an error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"init_from: no such file {path}")
    if path.suffix == ".ckpt":
        state, saved_spec = backbone_from_checkpoint(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        spec_file = path.with_suffix(path.suffix + ".json")
        saved_spec = json.loads(spec_file.read_text()) if spec_file.is_file() else {}
    try:
        backbone.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(
            f"init_from {path}: its backbone ({saved_spec.get('name')}, {saved_spec.get('kwargs')}) does not fit "
            f"this model's ({spec['name']}, {spec['kwargs']}); use the same --model.backbone and image size. {error}"
        ) from error


def rampup(progress: float, length: float) -> float:
    """Mean Teacher's sigmoid ramp-up ``exp(-5 (1 - t)^2)`` over the first ``length`` of training."""
    if length <= 0 or progress >= length:
        return 1.0
    return math.exp(-5.0 * (1.0 - progress / length) ** 2)


class MeanTeacher(MomentumTargets, BackboneModule):
    """Student (backbone + linear head) and its EMA teacher, trained on a semi-supervised batch
    ``{"labeled": ([weak, strong], labels), "unlabeled": ([weak, strong], hidden labels)}`` (an
    ``SSLDataModule`` with ``labels_per_class`` or ``label_fraction`` and ``WeakStrongViews``).

    ``loss: fixmatch``: each step the teacher (eval mode, no gradient) labels the weak unlabeled
    views; the student sees the weak labeled and strong unlabeled views in one pass; the loss is
    ``CE(labeled) + w(t) * mean(1[conf >= threshold] * CE(strong, pseudo-label))`` with ``w(t)``
    ``unlabeled_weight`` times the sigmoid ramp-up over the first ``rampup`` of the run.
    ``loss: doubly_robust``: ``DoublyRobustLoss`` (Zhu et al. 2023, as their released code) on the
    weak view of every sample, pseudo-labels on labeled and unlabeled samples alike, no threshold,
    the all-data term weighted by the split's labeled share ``n / (n + m)`` and the correction
    ramped in linearly over the first ``rampup`` of the run (``unlabeled_weight`` is not used).
    Pseudo-labels are hard (argmax) or, with ``soft_targets``, the teacher's softmax at
    ``target_temperature``. The hidden labels of the unlabeled samples are used only to log the
    pseudo-label accuracy.

    The teacher follows the student by the shared ``EMAUpdater`` (``running_average``: the mean of
    all students until ``1 - 1/(t+1)`` reaches ``ema_momentum``). Validation reports the teacher's
    and the student's accuracy; test reports the teacher's. The backbone starts from random init,
    from timm's weights (``pretrained``), or from an ssl_kit checkpoint (``init_from``: a pretraining
    ``.ckpt`` or an exported backbone), which is the pretrain -> self-train pipeline.

    From random init, ResNets keep timm's zero-initialised residual branches (the supervised
    recipe): with them, the digits test's teacher reaches 0.923 (labels alone 0.763), without them
    0.568 (0.533).
    """

    zero_init_last = True

    def __init__(
        self,
        *args,
        loss: Literal["fixmatch", "doubly_robust"] = "fixmatch",
        threshold: float = 0.95,
        soft_targets: bool = False,
        target_temperature: float = 1.0,
        unlabeled_weight: float = 1.0,
        rampup: float = 0.0,
        ema_momentum: float = 0.999,
        ema_schedule: MomentumSchedule = "running_average",
        init_from: str | None = None,
        pretrained: bool = False,
        optimizer: Literal["sgd", "lars", "adamw"] = "sgd",
        lr: float = 0.03,
        weight_decay: float = 5e-4,
        nesterov: bool = True,
        warmup_epochs: float = 0.0,
        **kwargs,
    ) -> None:
        super().__init__(
            *args, optimizer=optimizer, lr=lr, weight_decay=weight_decay, nesterov=nesterov, warmup_epochs=warmup_epochs, **kwargs
        )
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        if pretrained:
            self.backbone = build_from_spec(self.backbone_spec, pretrained=True)
        if init_from is not None:
            load_backbone_weights(self.backbone, self.backbone_spec, init_from)
        num_classes = self.hparams.num_classes
        self.head = nn.Linear(self.feature_dim, num_classes)
        self.teacher_backbone = frozen_copy(self.backbone)
        self.teacher_head = frozen_copy(self.head)
        self.ema = EMAUpdater(
            [(self.teacher_backbone, self.backbone), (self.teacher_head, self.head)],
            base=ema_momentum,
            final=ema_momentum,
            schedule=ema_schedule,
        )
        self.unlabeled_criterion = ThresholdedPseudoLabelLoss()
        self.doubly_robust = DoublyRobustLoss()
        #: n / (n + m) of the few-label split, read from the DataModule when fitting (None: the batch's share)
        self.labeled_fraction: float | None = None
        self.teacher_accuracy = MulticlassAccuracy(num_classes, average="micro")
        self.student_accuracy = MulticlassAccuracy(num_classes, average="micro")
        self.test_accuracy = MulticlassAccuracy(num_classes, average="micro")

    # -- networks ----------------------------------------------------------------------------
    def forward(self, images: Tensor) -> Tensor:
        """Class logits of the teacher, the model this method delivers."""
        return self.teacher_head(self.teacher_backbone(images))

    def student(self, images: Tensor) -> Tensor:
        return self.head(self.backbone(images))

    def train(self, mode: bool = True):
        """The teacher always predicts in eval mode (running BatchNorm statistics, no dropout)."""
        super().train(mode)
        self.teacher_backbone.eval()
        self.teacher_head.eval()
        return self

    def trained_modules(self) -> list[nn.Module]:
        return [self.backbone, self.head]

    # -- training ----------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        super().setup(stage)
        data = getattr(self.trainer, "datamodule", None)
        labeled, unlabeled = getattr(data, "labeled_indices", None), getattr(data, "unlabeled_indices", None)
        if labeled is not None and unlabeled is not None:
            self.labeled_fraction = len(labeled) / (len(labeled) + len(unlabeled))

    def unlabeled_weight_now(self) -> float:
        """FixMatch's weight of the unlabeled loss: ``unlabeled_weight`` times the sigmoid ramp-up."""
        return self.hparams.unlabeled_weight * rampup(self.run_fraction(self.global_step), self.hparams.rampup)

    def correction_weight_now(self) -> float:
        """The doubly robust correction's weight: linear from 0 to 1 over the first ``rampup`` of the run."""
        length = self.hparams.rampup
        return 1.0 if length <= 0 else min(1.0, self.run_fraction(self.global_step) / length)

    def training_losses(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor | float], PseudoLabels]:
        """The loss, its parts (for the log) and the unlabeled samples' pseudo-labels.

        The unlabeled part is ``(views, hidden labels)``, labeled online by the EMA teacher, or
        ``(views, hidden labels, targets)`` for a pool labeled once by a previous model (Noisy Student)."""
        if not isinstance(batch, dict) or set(batch) != {"labeled", "unlabeled"}:
            raise TypeError(
                "MeanTeacher needs labeled and unlabeled batches: give the DataModule "
                "--data.labels_per_class N (or --data.label_fraction F) and WeakStrongViews"
            )
        (labeled_views, labels), (unlabeled_views, _, *fixed_targets) = batch["labeled"], batch["unlabeled"]
        if self.hparams.loss == "doubly_robust":
            if fixed_targets:
                raise ValueError("the doubly robust loss labels the labeled part too; pre-labeled pools need loss: fixmatch")
            return self.doubly_robust_losses(labeled_views, labels, unlabeled_views)
        hp = self.hparams
        weak_labeled, (weak_unlabeled, strong_unlabeled) = labeled_views[0], unlabeled_views[:2]
        logits = self.student(torch.cat([weak_labeled, strong_unlabeled]))
        labeled_logits, unlabeled_logits = logits.split([weak_labeled.shape[0], strong_unlabeled.shape[0]])
        supervised = F.cross_entropy(labeled_logits.float(), labels)
        if fixed_targets:
            targets = fixed_targets[0]
            confidence, classes = targets.max(dim=1)
            pseudo = PseudoLabels(targets, torch.ones_like(classes, dtype=torch.bool), classes, confidence)
        else:
            with torch.no_grad():
                pseudo = pseudo_labels(self(weak_unlabeled), hp.threshold, hp.soft_targets, hp.target_temperature)
        unlabeled = self.unlabeled_criterion(unlabeled_logits, pseudo)
        weight = self.unlabeled_weight_now()
        parts = {"supervised_loss": supervised, "unlabeled_loss": unlabeled, "unlabeled_weight": weight}
        return supervised + weight * unlabeled, parts, pseudo

    def doubly_robust_losses(self, labeled_views: list[Tensor], labels: Tensor, unlabeled_views: list[Tensor]):
        """``DoublyRobustLoss`` on the weak view of every sample: the teacher labels it (no
        threshold) and the student learns on it, one output per sample in every term, as the
        released code trains on one augmented input per sample. (Strong views for the student
        instead, on the digits as in the learning test: val teacher 0.342 vs 0.829.)"""
        hp = self.hparams
        weak_labeled, weak_unlabeled = labeled_views[0], unlabeled_views[0]
        n = weak_labeled.shape[0]
        inputs = torch.cat([weak_labeled, weak_unlabeled])
        logits = self.student(inputs)
        with torch.no_grad():
            targets = pseudo_labels(self(inputs), 0.0, hp.soft_targets, hp.target_temperature)
        pseudo = targets.rows(slice(n, None))
        weight = self.correction_weight_now()
        loss = self.doubly_robust(logits[:n], labels, targets.targets[:n], logits[n:], pseudo.targets, weight, self.labeled_fraction)
        parts = {"supervised_loss": F.cross_entropy(logits[:n].float(), labels), "correction_weight": weight}
        return loss, parts, pseudo

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        loss, parts, pseudo = self.training_losses(batch)
        self.stop_if_not_finite(loss)
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict({f"train/{name}": value for name, value in parts.items()})
        self.log("train/mask_rate", pseudo.mask.float().mean())
        hidden = batch["unlabeled"][1]
        known = pseudo.mask & (hidden >= 0)
        if known.any():
            self.log("train/pseudo_label_acc", (pseudo.classes[known] == hidden[known]).float().mean())
        return loss

    # -- evaluation --------------------------------------------------------------------------
    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        if dataloader_idx == 0:  # the kNN bank of the SSL methods; a classifier does not need it
            return
        images, labels = batch
        self.teacher_accuracy(self(images), labels)
        self.student_accuracy(self.student(images), labels)
        self.log("val/teacher_acc", self.teacher_accuracy, prog_bar=True, add_dataloader_idx=False)
        self.log("val/student_acc", self.student_accuracy, add_dataloader_idx=False)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, labels = batch
        self.test_accuracy(self(images), labels)
        self.log("test/acc", self.test_accuracy)
