"""Mean-teacher pseudo-label self-training: an EMA teacher labels weak views of unlabeled samples,
the student learns them on strong views, alongside the few labeled samples."""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from ssl_kit.data.semi_supervised import SemiSupervisedBatch
from ssl_kit.evaluation.features import per_view
from ssl_kit.evaluation.fine_tune import classifier_head, fine_tune_param_groups
from ssl_kit.methods.base import BackboneModule
from ssl_kit.methods.momentum import EMAUpdater, MomentumSchedule, MomentumTargets, frozen_copy
from ssl_kit.semi.criteria import CRITERIA, SelfTrainingLoss, criterion_arguments


class MeanTeacher(MomentumTargets, BackboneModule):
    """Student (backbone + linear head) and its EMA teacher, trained on a semi-supervised batch
    ``SemiSupervisedBatch`` (an ``SSLDataModule`` with ``labels_per_class`` or ``label_fraction``
    and ``WeakStrongViews``). The loss is a criterion of ``ssl_kit.semi.criteria`` chosen by
    ``loss``, given the hyper-parameters it names: ``fixmatch`` (``FixMatchCriterion``: threshold,
    ``unlabeled_weight``, sigmoid ``rampup``), the adaptive ``flexmatch`` (class thresholds below
    ``threshold`` from learning status), ``freematch`` (self-adaptive thresholds, ``fairness_weight``)
    and ``softmatch`` (truncated-Gaussian weights), whose confidence statistics follow an EMA of
    momentum ``statistics_momentum``, or ``doubly_robust`` (``DoublyRobustCriterion``: no
    threshold, the correction ramped in linearly over ``rampup``). ``distribution_alignment``
    aligns the teacher's class marginal to uniform (None: on for ``softmatch`` only). The teacher
    (eval mode, no gradient) labels online, unless the batch brings a pool's targets (Noisy Student).
    Pseudo-labels are hard (argmax) or, with ``soft_targets``, the teacher's softmax at
    ``target_temperature``. The hidden labels of the unlabeled samples are used only to log the
    pseudo-label accuracy.

    The teacher follows the student by the shared ``EMAUpdater`` (``running_average``: the mean of
    all students until ``1 - 1/(t+1)`` reaches ``ema_momentum``). Validation reports the teacher's
    and the student's accuracy; test reports the teacher's. The backbone (student and teacher)
    starts from random init, timm's weights (``pretrained``) or an ssl_kit checkpoint
    (``init_from``, see ``BackboneModule``), which is the pretrain -> self-train pipeline. With a
    pretrained start, ``layer_decay`` trains backbone stage ``i`` of ``L`` at ``lr * layer_decay **
    (L - i)`` and the new head at ``lr`` (the fine-tuning protocol's ``fine_tune_param_groups``), so
    early steps, when the head and pseudo-labels are still poor, move the pretrained features less;
    ``frozen_backbone_fraction`` goes further: over that first fraction of the run the head trains
    alone on the backbone's features (their gradients are dropped before each step: no update, no
    weight decay), then everything trains: LP-FT (Kumar et al. 2022, "Fine-Tuning can Distort
    Pretrained Features"), whose head already fits the features when their training starts. On
    the CIFAR-10 self-training suite (1,000 steps, seed 2) it scored below plain FixMatch from
    SimCLR (the backbone then trains at the full learning rate), and layer decay above both.
    ``head_init_std`` starts the new head near zero (``classifier_head``, whose docstring says why):
    a default head on a pretrained backbone's large features is confidently wrong from the first
    step, and FixMatch's threshold admits its random pseudo-labels (60-minute SimCLR start on
    CIFAR-10, seed 0: 87% kept, 19% right by step 20); a near-zero head predicts uniformly until
    the labeled samples train it.

    From random init, ResNets keep timm's zero-initialised residual branches (the supervised
    recipe): with them, the digits test's teacher reaches 0.923 (labels alone 0.763), without them
    0.568 (0.533).
    """

    zero_init_last = True

    def __init__(
        self,
        *args,
        loss: Literal["fixmatch", "flexmatch", "freematch", "softmatch", "doubly_robust"] = "fixmatch",
        threshold: float = 0.95,
        soft_targets: bool = False,
        target_temperature: float = 1.0,
        unlabeled_weight: float = 1.0,
        rampup: float = 0.0,
        distribution_alignment: bool | None = None,
        statistics_momentum: float = 0.999,
        fairness_weight: float = 0.001,
        ema_momentum: float = 0.999,
        ema_schedule: MomentumSchedule = "running_average",
        optimizer: Literal["sgd", "lars", "adamw"] = "sgd",
        lr: float = 0.03,
        weight_decay: float = 5e-4,
        nesterov: bool = True,
        warmup_epochs: float = 0.0,
        layer_decay: float | None = None,
        frozen_backbone_fraction: float = 0.0,
        head_init_std: float | None = None,
        **kwargs,
    ) -> None:
        if layer_decay is not None and not 0 < layer_decay <= 1:
            raise ValueError(f"--model.layer_decay must be in (0, 1], got {layer_decay}")
        if not 0 <= frozen_backbone_fraction < 1:
            raise ValueError(f"--model.frozen_backbone_fraction must be in [0, 1), got {frozen_backbone_fraction}")
        super().__init__(
            *args, optimizer=optimizer, lr=lr, weight_decay=weight_decay, nesterov=nesterov, warmup_epochs=warmup_epochs, **kwargs
        )
        num_classes = self.hparams.num_classes
        self.head = classifier_head(self.feature_dim, num_classes, head_init_std)
        self.teacher_backbone = frozen_copy(self.backbone)
        self.teacher_head = frozen_copy(self.head)
        self.ema = EMAUpdater(
            [(self.teacher_backbone, self.backbone), (self.teacher_head, self.head)],
            base=ema_momentum,
            final=ema_momentum,
            schedule=ema_schedule,
        )
        criterion = CRITERIA[loss]
        self.criterion = criterion(**{name: self.hparams[name] for name in criterion_arguments(criterion)})
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

    def param_groups(self) -> list[dict]:
        hp = self.hparams
        if hp.layer_decay is None:
            return super().param_groups()
        return fine_tune_param_groups(self.backbone, self.head, hp.lr, hp.weight_decay, hp.layer_decay)

    def backbone_frozen(self, progress: float) -> bool:
        return progress < self.hparams.frozen_backbone_fraction

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """While the backbone is frozen its gradients are dropped (DDP has already averaged them, so
        every rank agrees), then ``--trainer.gradient_clip_val`` clips what is left."""
        if self.backbone_frozen(self.run_fraction(self.global_step)):
            for param in self.backbone.parameters():
                param.grad = None
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # -- training ----------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        super().setup(stage)
        split = getattr(getattr(self.trainer, "datamodule", None), "few_label", None)
        if split is not None and hasattr(self.criterion, "use_split"):  # the split's labeled share, the pool's size
            self.criterion.use_split(split)

    def training_losses(self, batch: SemiSupervisedBatch) -> SelfTrainingLoss:
        """The loss, its parts (for the log) and the unlabeled samples' pseudo-labels."""
        if not isinstance(batch, SemiSupervisedBatch):
            raise TypeError(
                "MeanTeacher needs labeled and unlabeled batches: give the DataModule "
                "--data.labels_per_class N (or --data.label_fraction F) and WeakStrongViews"
            )
        return self.criterion(batch, self.student, self, self.run_fraction(self.global_step))

    def training_step(self, batch: SemiSupervisedBatch, batch_idx: int) -> Tensor:
        loss, parts, pseudo = self.training_losses(batch)
        self.stop_if_not_finite(loss)
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict({f"train/{name}": value for name, value in parts.items()})
        self.log("train/mask_rate", pseudo.weights.mean())  # SoftMatch: the mean weight
        hidden = batch.hidden_labels
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
        views = getattr(self.trainer.datamodule, "test_views", 1)  # multi-view testing: the views' mean logits
        self.test_accuracy(per_view(self, images, views).mean(1), labels)
        self.log("test/acc", self.test_accuracy)
