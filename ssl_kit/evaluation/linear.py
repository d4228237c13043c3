"""Linear probes on cached frozen features: every learning-rate x weight-decay setting trained at
once, chosen on the validation split only; and the probe on the few-label split self-training uses.
The test split is evaluated once, with the chosen head."""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ssl_kit.data.splits import few_label_split
from ssl_kit.evaluation.features import FeatureSet, top1
from ssl_kit.optim import warmup_cosine

#: Probe sweep defaults: on standardised features (``batchnorm``) these span under- to over-stepping.
PROBE_LRS = (0.01, 0.03, 0.1, 0.3, 1.0)
PROBE_WEIGHT_DECAYS = (0.0, 1e-4, 1e-3, 1e-2)


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
