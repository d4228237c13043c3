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
from ssl_kit.methods.momentum import EMAUpdater, MomentumSchedule, frozen_copy
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


class MeanTeacher(BackboneModule):
    """Student (backbone + linear head) and its EMA teacher, trained on a semi-supervised batch
    ``{"labeled": ([weak, strong], labels), "unlabeled": ([weak, strong], hidden labels)}`` (an
    ``SSLDataModule`` with ``labels_per_class`` or ``label_fraction`` and ``WeakStrongViews``).

    Each step: the teacher (eval mode, no gradient) labels the weak unlabeled views; the student
    sees the weak labeled and strong unlabeled views in one pass. ``loss: fixmatch`` is
    ``CE(labeled) + w(t) * mean(1[conf >= threshold] * CE(strong, pseudo-label))``;
    ``loss: doubly_robust`` is ``DoublyRobustLoss`` with pseudo-labels on both parts and no threshold.
    Pseudo-labels are hard (argmax) or, with ``soft_targets``, the teacher's softmax at
    ``target_temperature``. ``w(t)`` is ``unlabeled_weight`` times the sigmoid ramp-up over the
    first ``rampup`` fraction of the optimizer steps. The hidden labels of the unlabeled samples
    are used only to log the pseudo-label accuracy.

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
    def unlabeled_weight_now(self) -> float:
        total = max(1, int(self.trainer.estimated_stepping_batches))
        return self.hparams.unlabeled_weight * rampup(self.global_step / total, self.hparams.rampup)

    def loss_terms(self, batch: Batch) -> tuple[Tensor, Tensor, PseudoLabels]:
        """Supervised loss, unlabeled loss (before the ramp weight) and the unlabeled pseudo-labels.

        The unlabeled part is ``(views, hidden labels)``, labeled online by the EMA teacher, or
        ``(views, hidden labels, targets)`` for a pool labeled once by a previous model (Noisy Student)."""
        if not isinstance(batch, dict) or set(batch) != {"labeled", "unlabeled"}:
            raise TypeError(
                "MeanTeacher needs labeled and unlabeled batches: give the DataModule "
                "--data.labels_per_class N (or --data.label_fraction F) and WeakStrongViews"
            )
        (labeled_views, labels), (unlabeled_views, _, *fixed_targets) = batch["labeled"], batch["unlabeled"]
        weak_labeled, (weak_unlabeled, strong_unlabeled) = labeled_views[0], unlabeled_views[:2]
        hp = self.hparams
        logits = self.student(torch.cat([weak_labeled, strong_unlabeled]))
        labeled_logits, unlabeled_logits = logits.split([weak_labeled.shape[0], strong_unlabeled.shape[0]])
        supervised = F.cross_entropy(labeled_logits.float(), labels)

        if hp.loss == "doubly_robust":  # pseudo-labels on both parts, no threshold
            if fixed_targets:
                raise ValueError("the doubly robust loss labels the labeled part too; pre-labeled pools need loss: fixmatch")
            with torch.no_grad():
                targets = pseudo_labels(self(torch.cat([weak_labeled, weak_unlabeled])), 0.0, hp.soft_targets, hp.target_temperature)
            n = weak_labeled.shape[0]
            unlabeled = targets.rows(slice(n, None))
            term = DoublyRobustLoss.pseudo_label_term(labeled_logits, targets.targets[:n], unlabeled_logits, unlabeled.targets)
            return supervised, term, unlabeled

        if fixed_targets:
            targets = fixed_targets[0]
            confidence, classes = targets.max(dim=1)
            unlabeled = PseudoLabels(targets, torch.ones_like(classes, dtype=torch.bool), classes, confidence)
        else:
            with torch.no_grad():
                unlabeled = pseudo_labels(self(weak_unlabeled), hp.threshold, hp.soft_targets, hp.target_temperature)
        return supervised, self.unlabeled_criterion(unlabeled_logits, unlabeled), unlabeled

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        supervised, unlabeled_loss, pseudo = self.loss_terms(batch)
        weight = self.unlabeled_weight_now()
        loss = supervised + weight * unlabeled_loss
        self.stop_if_not_finite(loss)
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict(
            {
                "train/supervised_loss": supervised,
                "train/unlabeled_loss": unlabeled_loss,
                "train/unlabeled_weight": weight,
                "train/mask_rate": pseudo.mask.float().mean(),
            }
        )
        hidden = batch["unlabeled"][1]
        known = pseudo.mask & (hidden >= 0)
        if known.any():
            self.log("train/pseudo_label_acc", (pseudo.classes[known] == hidden[known]).float().mean())
        return loss

    def on_train_start(self) -> None:
        self.ema.start(self.trainer.global_step)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.ema.step(self.trainer.global_step, int(self.trainer.estimated_stepping_batches)):
            self.log("train/ema_momentum", self.ema.momentum)

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
