"""Evaluation protocols: a linear probe and kNN on cached frozen features, the linear probe on the
few-label split self-training uses, and end-to-end fine-tuning with optional layer-wise lr decay.

Choices are made on the validation split only; the test split is evaluated once, with the final
(or chosen) model."""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from ssl_kit.data.base import SSLDataModule
from ssl_kit.data.datasets import Transformed
from ssl_kit.data.splits import few_label_split
from ssl_kit.evaluation import extract_features, knn_predict
from ssl_kit.optim import OptimizerName, build_optimizer, decay_groups, warmup_cosine, warmup_cosine_config
from ssl_kit.transforms import ViewAugmentation

#: Probe sweep defaults: on standardised features (``batchnorm``) these span under- to over-stepping.
PROBE_LRS = (0.01, 0.03, 0.1, 0.3, 1.0)
PROBE_WEIGHT_DECAYS = (0.0, 1e-4, 1e-3, 1e-2)


@dataclass
class FeatureSet:
    """Frozen features of one split, in the split's order (dataset index i is row i)."""

    features: Tensor  # (N, D) float32, CPU
    labels: Tensor  # (N,) int64

    def __post_init__(self) -> None:
        if self.features.ndim != 2 or len(self.features) != len(self.labels):
            raise ValueError(f"features {tuple(self.features.shape)} and labels {tuple(self.labels.shape)} do not pair up")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: Sequence[int] | np.ndarray) -> FeatureSet:
        rows = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        return FeatureSet(self.features[rows], self.labels[rows])


def extract(backbone: nn.Module, loader) -> FeatureSet:
    """Features of an un-shuffled, un-augmented loader on the backbone's device (eval mode, no
    grad), in one process; ``ssl_kit.bench.features`` does the same across DDP ranks."""
    features, labels = extract_features(backbone, loader)
    return FeatureSet(features.float(), labels.long())


def top1(logits: Tensor, labels: Tensor) -> float:
    return (logits.argmax(-1) == labels).float().mean().item()


# -- linear probe ------------------------------------------------------------------------------
@dataclass
class ProbeResult:
    """Test accuracy of the head chosen on validation, that head's validation accuracy, the
    chosen ``lr`` / ``weight_decay`` and the validation accuracy of every setting tried."""

    test_top1: float
    val_top1: float
    chosen: dict[str, float]
    num_train: int
    wall_time_s: float
    val_grid: list[tuple[float, float, float]] = field(default_factory=list)  # (lr, weight_decay, val_top1)


def train_linear_heads(
    train: FeatureSet,
    num_classes: int,
    settings: Sequence[tuple[float, float]],
    *,
    epochs: int = 100,
    batch_size: int = 256,
    batchnorm: bool = True,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> list[nn.Sequential]:
    """One linear classifier per ``(lr, weight_decay)`` in ``settings``, all trained at once on the
    same seeded mini-batches of the cached features: cross-entropy, SGD with momentum 0.9, cosine
    lr per step, zero init, weight decay on the weights only (not the biases). The gradient of a
    linear softmax classifier is written out, so every setting costs one batched matmul per step.

    ``batchnorm``: ``BatchNorm1d(affine=False)`` before the head, as in MAE's probe, with the
    statistics of the whole training set (on fixed features, batch statistics only add noise) and an
    epsilon relative to the mean variance, so the probe does not depend on the features' scale: a
    fixed 1e-5 would flatten features whose variance is below it (a random-init ResNet's are ~1e-7)."""
    x, y = train.features.to(device), train.labels.to(device)
    norm: nn.Module = nn.Identity()
    if batchnorm:
        variance = x.var(0, unbiased=False)
        epsilon = 1e-5 * float(variance.mean()) or 1e-5  # constant features: any epsilon
        norm = nn.BatchNorm1d(x.shape[1], eps=epsilon, affine=False, device=device).eval()
        norm.running_mean, norm.running_var = x.mean(0), variance
        x = norm(x)
    lr, weight_decay = torch.tensor(settings, dtype=torch.float32, device=device).T.reshape(2, -1, 1, 1)
    weight = torch.zeros(len(settings), num_classes, x.shape[1], device=device)
    bias = torch.zeros(len(settings), num_classes, device=device)
    weight_velocity, bias_velocity = torch.zeros_like(weight), torch.zeros_like(bias)
    targets = F.one_hot(y, num_classes).float()
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(x) / batch_size)
    total = epochs * steps_per_epoch
    for step in range(total):
        if step % steps_per_epoch == 0:
            order = torch.randperm(len(x), generator=generator).to(device)
        rows = order[(step % steps_per_epoch) * batch_size :][:batch_size]
        inputs = x[rows]
        logits = torch.einsum("nd,hcd->hnc", inputs, weight) + bias[:, None]
        residual = (logits.softmax(-1) - targets[rows]) / len(rows)  # d(mean cross-entropy) / d(logits)
        weight_velocity.mul_(0.9).add_(torch.einsum("hnc,nd->hcd", residual, inputs) + weight_decay * weight)
        bias_velocity.mul_(0.9).add_(residual.sum(1))
        scale = lr * warmup_cosine(step, 0, total)
        weight.sub_(scale * weight_velocity)
        bias.sub_(scale.view(-1, 1) * bias_velocity)
    heads = []
    for w, b in zip(weight.cpu(), bias.cpu()):
        linear = nn.utils.skip_init(nn.Linear, x.shape[1], num_classes)  # no random init: leaves the global RNG alone
        linear.weight, linear.bias = nn.Parameter(w.clone()), nn.Parameter(b.clone())
        heads.append(nn.Sequential(copy.deepcopy(norm).cpu(), linear).eval())
    return heads


@torch.no_grad()
def linear_probe(
    train: FeatureSet,
    val: FeatureSet,
    test: FeatureSet,
    num_classes: int,
    *,
    epochs: int = 100,
    batch_size: int = 256,
    lrs: Sequence[float] = PROBE_LRS,
    weight_decays: Sequence[float] = PROBE_WEIGHT_DECAYS,
    batchnorm: bool = True,
    seed: int = 0,
    device: str = "cpu",
) -> ProbeResult:
    """Linear probe on cached features (no data loading, no augmentation): every ``lrs`` x
    ``weight_decays`` setting is trained on ``train`` (``train_linear_heads``); the setting with
    the best ``val`` accuracy (the first one on ties) is chosen, and that same head, trained on
    ``train`` only, is evaluated once on ``test``. ``test`` plays no part in the choice."""
    start = time.perf_counter()
    settings = [(float(lr), float(wd)) for lr in lrs for wd in weight_decays]
    heads = train_linear_heads(
        train, num_classes, settings, epochs=epochs, batch_size=batch_size, batchnorm=batchnorm, seed=seed, device=device
    )
    val_top1 = [top1(head(val.features), val.labels) for head in heads]
    best = int(np.argmax(val_top1))
    return ProbeResult(
        test_top1=top1(heads[best](test.features), test.labels),
        val_top1=val_top1[best],
        chosen={"lr": settings[best][0], "weight_decay": settings[best][1]},
        num_train=len(train),
        wall_time_s=time.perf_counter() - start,
        val_grid=[(lr, wd, acc) for (lr, wd), acc in zip(settings, val_top1)],
    )


def few_label(
    train: FeatureSet,
    val: FeatureSet,
    test: FeatureSet,
    num_classes: int,
    *,
    labels_per_class: int | None = None,
    label_fraction: float | None = None,
    seed: int = 0,
    **probe_settings: Any,
) -> ProbeResult:
    """The linear probe trained on the class-balanced few-label subset of ``train`` that
    ``few_label_split`` (the split of self-training DataModules) gives for ``seed``: with
    ``train`` extracted in dataset order and the DataModule's seed, the same labeled samples a
    ``MeanTeacher`` run sees. Hyper-parameters are still chosen on the full ``val`` split."""
    labeled, _ = few_label_split(train.labels.numpy(), labels_per_class, label_fraction, seed)
    return linear_probe(train.subset(labeled), val, test, num_classes, seed=seed, **probe_settings)


def knn(train: FeatureSet, test: FeatureSet, num_classes: int, k: int = 20, temperature: float = 0.07) -> float:
    """Top-1 of the weighted kNN classifier (``knn_predict``), with ``train`` as the bank."""
    return top1(knn_predict(test.features, train.features, train.labels, num_classes, k, temperature), test.labels)


# -- fine-tuning -------------------------------------------------------------------------------
def stage_prefixes(backbone: nn.Module) -> list[str]:
    """Parameter-name prefixes of the backbone's stages in depth order: the transformer blocks of
    timm ViTs and ``VideoViT`` (``blocks.N.``), or ResNet's ``layer1.`` .. ``layer4.``."""
    blocks = getattr(backbone, "blocks", None)
    if isinstance(blocks, (nn.Sequential, nn.ModuleList)):
        return [f"blocks.{i}." for i in range(len(blocks))]
    layers = [f"layer{i}." for i in range(1, 5) if hasattr(backbone, f"layer{i}")]
    if layers:
        return layers
    raise ValueError(f"layer-wise lr decay knows ViT blocks and ResNet layer1..4, not {type(backbone).__name__}")


def layer_ids(backbone: nn.Module) -> tuple[dict[str, int], int]:
    """Each backbone parameter's layer (BEiT / MAE numbering) and the top layer's number: stage i
    is layer i + 1; parameters before the first stage (patch / position embeddings, class token,
    the ResNet stem) are layer 0, those after the last (final norm) the top layer, as is the head."""
    prefixes = stage_prefixes(backbone)
    top = len(prefixes) + 1
    ids, after = {}, 0
    for name, _ in backbone.named_parameters():
        stage = next((i + 1 for i, prefix in enumerate(prefixes) if name.startswith(prefix)), None)
        if stage is not None:
            after = top
        ids[name] = after if stage is None else stage
    return ids, top


def fine_tune_param_groups(
    backbone: nn.Module, head: nn.Module, lr: float, weight_decay: float, layer_decay: float | None = None
) -> list[dict]:
    """Optimizer groups: weight decay on weights, not on biases and norms (``decay_groups``); with
    ``layer_decay``, layer ``i`` of ``L`` (``layer_ids``) trains at ``lr * layer_decay ** (L - i)``."""
    if layer_decay is None:
        return [{**group, "lr": lr} for group in decay_groups([backbone, head], weight_decay)]
    ids, top = layer_ids(backbone)
    named = [(ids[name], param) for name, param in backbone.named_parameters()] + [(top, p) for p in head.parameters()]
    groups: dict[tuple[int, bool], dict] = {}
    for layer, param in named:
        if not param.requires_grad:
            continue
        decayed = param.ndim > 1  # decay_groups' rule: no decay on biases and norm weights
        group = groups.setdefault(
            (layer, decayed), {"params": [], "lr": lr * layer_decay ** (top - layer), "weight_decay": weight_decay if decayed else 0.0}
        )
        group["params"].append(param)
    return [groups[key] for key in sorted(groups)]


class FineTuner(L.LightningModule):
    """Backbone + linear head trained end to end with cross-entropy; warmup + cosine per step."""

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        lr: float,
        weight_decay: float,
        optimizer: OptimizerName = "adamw",
        layer_decay: float | None = None,
        warmup_epochs: float = 0.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["backbone"])
        self.backbone = backbone
        self.head = nn.Linear(backbone.num_features, num_classes)
        self.test_accuracy = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, inputs: Tensor) -> Tensor:
        return self.head(self.backbone(inputs))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        inputs, labels = batch
        loss = F.cross_entropy(self(inputs), labels)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        inputs, labels = batch
        self.test_accuracy(self(inputs), labels)
        self.log("test/acc", self.test_accuracy)

    def configure_optimizers(self):
        hp = self.hparams
        groups = fine_tune_param_groups(self.backbone, self.head, hp.lr, hp.weight_decay, hp.layer_decay)
        return warmup_cosine_config(build_optimizer(hp.optimizer, groups, hp.lr), self.trainer, hp.warmup_epochs)


class FirstView:
    """The first view of a ``ViewAugmentation`` as a single-sample transform (picklable for workers)."""

    def __init__(self, views: ViewAugmentation) -> None:
        self.views = views

    def __call__(self, sample: Any) -> Tensor:
        return self.views(sample)[0]


def fine_tune(
    backbone: nn.Module,
    datamodule: SSLDataModule,
    num_classes: int,
    *,
    epochs: int,
    lr: float,
    weight_decay: float,
    optimizer: OptimizerName = "adamw",
    layer_decay: float | None = None,
    warmup_epochs: float = 0.0,
    augment: bool = False,
    trainer_kwargs: dict[str, Any] | None = None,
    seed: int = 0,
) -> float:
    """Test top-1 of a copy of ``backbone`` + a linear head fine-tuned for ``epochs`` on the
    DataModule's labeled training split (only its labeled part in few-label mode), evaluated with
    the final weights; ``backbone`` itself is left untouched. Runs through a Lightning Trainer
    (``trainer_kwargs``: devices, strategy, precision..., so DDP works). Inputs get the evaluation
    transform, or with ``augment`` the first view of the DataModule's ``views`` (the weak view of
    ``WeakStrongViews`` / ``PairedViews``). Hyper-parameters are given, not searched."""
    L.seed_everything(seed, verbose=False)
    datamodule.setup("fit")
    transform = FirstView(datamodule.views) if augment else datamodule.eval_transform
    train = Transformed(datamodule.splits.train, transform, datamodule.few_label.labeled)
    batch_size = min(datamodule.batch_size, len(train))
    # The DataModule's loader settings (workers, pinning, bad-file collation); full batches only,
    # so BatchNorm never sees a batch of one.
    loader = datamodule.loader(train, shuffle=True, drop_last=len(train) > batch_size, batch_size=batch_size)
    model = FineTuner(copy.deepcopy(backbone), num_classes, lr, weight_decay, optimizer, layer_decay, warmup_epochs)
    settings = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False}
    trainer = L.Trainer(**{**settings, **(trainer_kwargs or {}), "max_epochs": epochs})
    trainer.fit(model, train_dataloaders=loader)
    (metrics,) = trainer.test(model, dataloaders=datamodule.test_dataloader(), verbose=False)
    return float(metrics["test/acc"])
