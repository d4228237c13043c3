"""Linear probes on cached frozen features: every learning-rate x weight-decay setting trained at
once, chosen on the validation split only (or by cross-validation on the training labels); the
weighted-layer probe on every block's features; and the probe on the few-label split self-training
uses. The test split is evaluated once, with the chosen head."""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_kit.data.splits import few_label_split, stratified_folds
from ssl_kit.evaluation.features import FeatureSet
from ssl_kit.optim import warmup_cosine

#: Probe sweep defaults: on standardised features (``batchnorm``) these span under- to over-stepping.
PROBE_LRS = (0.01, 0.03, 0.1, 0.3, 1.0)
PROBE_WEIGHT_DECAYS = (0.0, 1e-4, 1e-3, 1e-2)


@dataclass
class ProbeResult:
    """Test accuracy of the head chosen on validation, that head's validation accuracy, the
    chosen ``lr`` / ``weight_decay`` and the validation accuracy of every setting tried. On
    multi-label data the accuracies are macro mAP instead (``metric``; see ``features.score``)."""

    test_top1: float
    val_top1: float
    chosen: dict[str, Any]  # lr, weight_decay; the learned layer_weights of a weighted-layer probe
    num_train: int
    wall_time_s: float
    val_grid: list[tuple[float, float, float]] = field(default_factory=list)  # (lr, weight_decay, val_top1)
    metric: str = "top1"  # or "mAP" (multi-hot labels)


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
    layer_weights: Sequence[float] | None = None,
) -> list[nn.Sequential]:
    """One linear classifier per ``(lr, weight_decay)`` in ``settings``, all trained at once on the
    same seeded mini-batches of the cached features: cross-entropy, SGD with momentum 0.9, cosine
    lr per step, zero init, weight decay on the weights only (not the biases). The gradient of a
    linear softmax classifier is written out, so every setting costs one batched matmul per step.

    ``batchnorm``: ``BatchNorm1d(affine=False)`` before the head, as in MAE's probe, with the
    statistics of the whole training set (on fixed features, batch statistics only add noise) and an
    epsilon relative to the mean variance, so the probe does not depend on the features' scale: a
    fixed 1e-5 would flatten features whose variance is below it (a random-init ResNet's are ~1e-7).

    Multi-hot labels ``(N, num_classes)`` (multi-label data) train sigmoid heads instead: binary
    cross-entropy summed over the classes, averaged over samples, whose gradient has the same form
    (sigmoid in place of softmax), so each class is an L2-regularised logistic regression.

    Features of every layer ``(N, layers, D)`` (``BlockFeatures``) make the weighted-layer probe
    (SUPERB's weighted sum of layers): each layer is standardised on its own, and each head sees
    the sum of the layers weighted by a softmax over per-layer logits, learned with it by the same
    SGD (gradient written out too, no weight decay) from uniform weights; or by the fixed
    ``layer_weights`` (one-hot: the probe of that one layer)."""
    x, y = train.single_view("probe training").features.to(device), train.labels.to(device)
    layered = x.ndim == 3
    if layer_weights is not None and (not layered or len(layer_weights) != x.shape[1]):
        raise ValueError(f"layer_weights has {len(layer_weights)} weights for features {tuple(x.shape)} (rows, layers, D)")
    standardize = standardizer if batchnorm else (lambda features: nn.Identity())
    norm = PerLayer([standardize(layer) for layer in x.unbind(1)]) if layered else standardize(x)
    x = norm(x)
    lr, weight_decay = torch.tensor(settings, dtype=torch.float32, device=device).T.reshape(2, -1, 1, 1)
    weight = torch.zeros(len(settings), num_classes, x.shape[-1], device=device)
    bias = torch.zeros(len(settings), num_classes, device=device)
    weight_velocity, bias_velocity = torch.zeros_like(weight), torch.zeros_like(bias)
    multi_label = y.ndim == 2
    targets = y.float() if multi_label else F.one_hot(y, num_classes).float()
    if layered:
        fixed = None if layer_weights is None else torch.tensor(layer_weights, dtype=torch.float32, device=device).expand(len(settings), -1)
        layer_logits = torch.zeros(len(settings), x.shape[1], device=device)  # uniform softmax weights at start
        layer_velocity = torch.zeros_like(layer_logits)
    row_axes = "hnd" if layered else "nd"  # layered: each head has its own mix of the rows' layers
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(x) / batch_size)
    total = epochs * steps_per_epoch
    for step in range(total):
        if step % steps_per_epoch == 0:
            order = torch.randperm(len(x), generator=generator).to(device)
        rows = order[(step % steps_per_epoch) * batch_size :][:batch_size]
        inputs = x[rows]
        if layered:
            layers = inputs
            mixing = layer_logits.softmax(-1) if fixed is None else fixed  # (heads, layers)
            inputs = torch.einsum("hl,nld->hnd", mixing, layers)
        logits = torch.einsum(f"{row_axes},hcd->hnc", inputs, weight) + bias[:, None]
        predicted = logits.sigmoid() if multi_label else logits.softmax(-1)
        residual = (predicted - targets[rows]) / len(rows)  # d(mean cross-entropy) / d(logits)
        scale = lr * warmup_cosine(step, 0, total)
        if layered and fixed is None:  # d(loss) / d(mixing), then through the softmax to the logits
            mixing_grad = torch.einsum("hnc,hcd,nld->hl", residual, weight, layers)
            layer_velocity.mul_(0.9).add_(mixing * (mixing_grad - (mixing * mixing_grad).sum(-1, keepdim=True)))
            layer_logits.sub_(scale.view(-1, 1) * layer_velocity)
        weight_velocity.mul_(0.9).add_(torch.einsum(f"hnc,{row_axes}->hcd", residual, inputs) + weight_decay * weight)
        bias_velocity.mul_(0.9).add_(residual.sum(1))
        weight.sub_(scale * weight_velocity)
        bias.sub_(scale.view(-1, 1) * bias_velocity)
    mixings = (layer_logits.softmax(-1) if fixed is None else fixed).cpu() if layered else [None] * len(settings)
    heads = []
    for w, b, mixing in zip(weight.cpu(), bias.cpu(), mixings):
        linear = nn.utils.skip_init(nn.Linear, x.shape[-1], num_classes)  # no random init: leaves the global RNG alone
        linear.weight, linear.bias = nn.Parameter(w.clone()), nn.Parameter(b.clone())
        mix = [] if mixing is None else [LayerMix(mixing.clone())]
        heads.append(nn.Sequential(copy.deepcopy(norm).cpu(), *mix, linear).eval())
    return heads


def standardizer(x: Tensor) -> nn.BatchNorm1d:
    """``BatchNorm1d(affine=False)`` in eval mode with the statistics of all of ``x`` (N, D) and an
    epsilon relative to their mean variance (why: ``train_linear_heads``)."""
    variance = x.var(0, unbiased=False)
    epsilon = 1e-5 * float(variance.mean()) or 1e-5  # constant features: any epsilon
    norm = nn.BatchNorm1d(x.shape[1], eps=epsilon, affine=False, device=x.device).eval()
    norm.running_mean, norm.running_var = x.mean(0), variance
    return norm


class PerLayer(nn.Module):
    """Every-layer features ``(N, layers, D)``, each layer through its own module (its standardisation)."""

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(modules)

    def forward(self, x: Tensor) -> Tensor:
        return torch.stack([module(layer) for module, layer in zip(self.layers, x.unbind(1))], 1)


class LayerMix(nn.Module):
    """A weighted-layer probe's sum of its layers, ``(N, layers, D) -> (N, D)``, by its (learned) weights."""

    def __init__(self, weights: Tensor) -> None:
        super().__init__()
        self.register_buffer("weights", weights)

    def forward(self, x: Tensor) -> Tensor:
        return torch.einsum("l,nld->nd", self.weights, x)


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
    layer_weights: Sequence[float] | None = None,
) -> ProbeResult:
    """Linear probe on cached features (no data loading, no augmentation): every ``lrs`` x
    ``weight_decays`` setting is trained on ``train`` (``train_linear_heads``); the setting with
    the best ``val`` accuracy (the first one on ties) is chosen, and that same head, trained on
    ``train`` only, is evaluated once on ``test``. ``test`` plays no part in the choice. Multi-hot
    labels give sigmoid heads, chosen and evaluated by macro mAP (``features.score``). Features of
    every layer ``(N, layers, D)`` make it the weighted-layer probe (``train_linear_heads``); a
    multi-view ``test`` is scored by the mean of its views' logits (``FeatureSet.score``)."""
    start = time.perf_counter()
    settings = probe_grid(lrs, weight_decays)
    heads = train_linear_heads(
        train, num_classes, settings, epochs=epochs, batch_size=batch_size, batchnorm=batchnorm, seed=seed, device=device,
        layer_weights=layer_weights,
    )  # fmt: skip
    return best_head(heads, settings, [val.score(head(val.features)) for head in heads], test, len(train), start)


def probe_grid(lrs: Sequence[float], weight_decays: Sequence[float]) -> list[tuple[float, float]]:
    return [(float(lr), float(wd)) for lr in lrs for wd in weight_decays]


def best_head(
    heads: list[nn.Sequential], settings: list[tuple[float, float]], val_scores: list[float], test: FeatureSet, num_train: int, start: float
) -> ProbeResult:
    """The result of the setting with the best validation score (the first on ties): its head,
    evaluated once on ``test``, and the weights over the layers it learned, if it mixes layers."""
    best = int(np.argmax(val_scores))
    chosen: dict[str, Any] = {"lr": settings[best][0], "weight_decay": settings[best][1]}
    for part in heads[best]:
        if isinstance(part, LayerMix):  # a weighted-layer probe: the weights it learned, for the row
            chosen["layer_weights"] = [round(w, 4) for w in part.weights.tolist()]
    return ProbeResult(
        test_top1=test.score(heads[best](test.features)),
        val_top1=val_scores[best],
        chosen=chosen,
        num_train=num_train,
        wall_time_s=time.perf_counter() - start,
        val_grid=[(lr, wd, acc) for (lr, wd), acc in zip(settings, val_scores)],
        metric=test.metric,
    )


@torch.no_grad()
def cross_validated_probe(
    train: FeatureSet,
    test: FeatureSet,
    num_classes: int,
    *,
    folds: int = 5,
    lrs: Sequence[float] = PROBE_LRS,
    weight_decays: Sequence[float] = PROBE_WEIGHT_DECAYS,
    seed: int = 0,
    **training: Any,
) -> ProbeResult:
    """The linear probe with its setting chosen by stratified ``folds``-fold cross-validation on
    ``train`` (``stratified_folds`` seeded by ``seed``; the mean held-out score of each setting), so
    no validation split is read; the chosen setting's head, trained on all of ``train``, is
    evaluated once on ``test``. ``training``: ``train_linear_heads``' other settings (epochs,
    batch_size, batchnorm, device, layer_weights)."""
    start = time.perf_counter()
    settings = probe_grid(lrs, weight_decays)
    fold_scores = []
    for held in stratified_folds(train.labels.numpy(), folds, seed):
        kept, held_out = train.subset(np.setdiff1d(np.arange(len(train)), held)), train.subset(held)
        heads = train_linear_heads(kept, num_classes, settings, seed=seed, **training)
        fold_scores.append([held_out.score(head(held_out.features)) for head in heads])
    heads = train_linear_heads(train, num_classes, settings, seed=seed, **training)
    return best_head(heads, settings, np.mean(fold_scores, 0).tolist(), test, len(train), start)


#: How ``few_label`` chooses its probe's setting (see there).
FewLabelSelection = Literal["val", "few_val", "cross_val"]


def few_label(
    train: FeatureSet,
    val: FeatureSet,
    test: FeatureSet,
    num_classes: int,
    *,
    labels_per_class: int | None = None,
    label_fraction: float | None = None,
    selection: FewLabelSelection = "val",
    folds: int = 5,
    seed: int = 0,
    **probe_settings: Any,
) -> ProbeResult:
    """The linear probe trained on the class-balanced few-label subset of ``train`` that
    ``few_label_split`` (the split of self-training DataModules) gives for ``seed``: with
    ``train`` extracted in dataset order and the DataModule's seed, the same labeled samples a
    ``MeanTeacher`` run sees. Its setting is chosen by ``selection``, which ``chosen`` records:

    - ``"val"``: on the whole ``val`` split, as every row stored before this was a setting was:
      optimistic, since whoever has N labels per class has no such validation set;
    - ``"few_val"``: on the same few-label draw from ``val`` (``few_label_split`` of its labels:
      the same N per class, or fraction of each class, and seed), never more labels than that;
    - ``"cross_val"``: by ``folds``-fold cross-validation on the labeled few
      (``cross_validated_probe``), reading no validation label at all."""
    labeled, _ = few_label_split(train.labels.numpy(), labels_per_class, label_fraction, seed)
    few = train.subset(labeled)
    if selection == "cross_val":
        result = cross_validated_probe(few, test, num_classes, folds=folds, seed=seed, **probe_settings)
    elif selection == "few_val":
        try:
            drawn, _ = few_label_split(val.labels.numpy(), labels_per_class, label_fraction, seed)
        except ValueError as error:
            raise ValueError(f"few_label selection 'few_val' draws as many labels per class from the validation split: {error}") from error
        result = linear_probe(few, val.subset(drawn), test, num_classes, seed=seed, **probe_settings)
    elif selection == "val":
        result = linear_probe(few, val, test, num_classes, seed=seed, **probe_settings)
    else:
        raise ValueError(f"few_label selection must be 'val', 'few_val' or 'cross_val', got {selection!r}")
    result.chosen["selection"] = selection
    return result
