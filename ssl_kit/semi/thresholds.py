"""The statistics adaptive self-training keeps about its teacher: FlexMatch's learning status,
FreeMatch's self-adaptive thresholds and fairness term, SoftMatch's truncated-Gaussian weights, and
ReMixMatch's distribution alignment.

Their state is buffers, so a checkpoint carries it and a resumed run continues it. Every update
reads the whole batch of every rank (all-reduced sums, gathered pool positions), so under DDP each
rank holds the values one process computes on the concatenated batch: USB gathers the confidence
statistics too, but FlexMatch's per-sample table stays per rank there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_kit.distributed import all_reduce_sum, gather_cat, global_mean


def ema_(average: Tensor, value: Tensor, momentum: float) -> None:
    """``average <- momentum * average + (1 - momentum) * value``, in place."""
    average.mul_(momentum).add_(value.to(average.dtype), alpha=1.0 - momentum)


class DistributionAlignment(nn.Module):
    """ReMixMatch's distribution alignment to a uniform class marginal (SoftMatch's uniform
    alignment): ``p <- normalise(p / EMA(p))``, where ``EMA(p)`` follows the batch mean of the
    teacher's probabilities. It pulls a teacher that favours some classes back to all of them. Done
    on logits, as ``logits - log EMA(p)``: the softmax of that is the aligned distribution (the
    uniform target's constant cancels), so a temperature then sharpens it as ReMixMatch does. The
    first batch sets the EMA, as in USB; USB adds 1e-6 to both distributions, we do not need to
    (``EMA(p)`` is a mean of softmax outputs, positive). Class-balanced few-label splits have a
    uniform labeled marginal, ReMixMatch's target, so uniform is the only target here."""

    def __init__(self, num_classes: int, momentum: float = 0.999) -> None:
        super().__init__()
        self.momentum = momentum
        self.mean_probs: Tensor
        self.updates: Tensor
        self.register_buffer("mean_probs", torch.full((num_classes,), 1.0 / num_classes))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def forward(self, logits: Tensor) -> Tensor:
        """Updates ``EMA(p)`` with the batch, then returns the aligned logits."""
        logits = logits.to(self.mean_probs.dtype)
        batch_mean, _ = global_mean(logits.softmax(dim=1))
        ema_(self.mean_probs, batch_mean, self.momentum if self.updates > 0 else 0.0)
        self.updates += 1
        return logits - self.mean_probs.log()


def flexmatch_mapping(beta: Tensor) -> Tensor:
    """FlexMatch's convex mapping ``M(x) = x / (2 - x)`` (USB's default): thresholds stay low while
    a class is learned little, and rise quickly as it is learned."""
    return beta / (2.0 - beta)


class LearningStatus(nn.Module):
    """FlexMatch's class-wise thresholds ``tau_c = M(beta_c) * tau`` from the learning status
    ``sigma_c``: the number of unlabeled samples whose last prediction at or above ``tau`` was class ``c``.
    With threshold warmup (FlexMatch's default) ``beta_c = sigma_c / max(max_c sigma, N - sum sigma)``:
    while most of the pool has never been predicted confidently, every threshold stays near 0.

    ``pool_classes`` holds that last confident class per pool sample (-1: none yet), indexed by pool
    position, as the official code does; ``track`` sizes it to the pool. Under DDP the positions and
    classes of every rank are gathered, so each rank's table is the whole run's (in USB each rank
    keeps its own). USB leaves its thresholds unchanged when one class holds the whole pool; here
    that class's threshold becomes ``tau``.
    """

    def __init__(self, num_classes: int, threshold: float) -> None:
        super().__init__()
        self.num_classes, self.threshold = num_classes, threshold
        self.pool_classes: Tensor
        self.register_buffer("pool_classes", torch.empty(0, dtype=torch.long))

    def track(self, pool_size: int) -> None:
        """An empty table for a pool of ``pool_size`` samples (kept as it is when it has that size)."""
        if self.pool_classes.numel() != pool_size:
            self.pool_classes = self.pool_classes.new_full((pool_size,), -1)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        saved = state_dict.get(prefix + "pool_classes")
        if saved is not None:  # loading before (or without) fit's setup: take the saved pool's size
            self.track(saved.numel())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def class_thresholds(self) -> Tensor:
        if self.pool_classes.numel() == 0:
            raise RuntimeError("FlexMatch needs the unlabeled pool's size: fit it with a semi-supervised DataModule")
        counts = torch.bincount(self.pool_classes + 1, minlength=self.num_classes + 1).float()
        unused, sigma = counts[0], counts[1:]  # bin 0: the samples never predicted confidently
        beta = sigma / torch.maximum(sigma.max(), unused)
        return flexmatch_mapping(beta) * self.threshold

    @torch.no_grad()
    def update(self, positions: Tensor, confidence: Tensor, classes: Tensor) -> None:
        """Records the class of every sample (of every rank) predicted with confidence >= ``tau``."""
        confident = torch.where(confidence >= self.threshold, classes, -1)
        positions, confident = gather_cat(positions.to(self.pool_classes.device)), gather_cat(confident)
        kept = confident >= 0
        self.pool_classes[positions[kept]] = confident[kept]


class SelfAdaptiveThresholds(nn.Module):
    """FreeMatch's self-adaptive thresholds: the global ``tau_t``, an EMA of the mean top
    probability, scaled per class by ``MaxNorm(p_t)``, where ``p_t`` is an EMA of the mean
    probability vector: ``tau_t(c) = p_t(c) / max_c' p_t(c') * tau_t``. ``class_histogram``, an EMA of
    the normalised histogram of the predicted classes, is the fairness term's. All start at ``1/C``
    as in the paper and one version of USB's code (another starts ``p_t`` and ``h_t`` at 1, so
    ``tau_t`` at 1, which rejects every sample until ``tau_t`` has decayed: hundreds of steps)."""

    def __init__(self, num_classes: int, momentum: float = 0.999) -> None:
        super().__init__()
        self.momentum = momentum
        self.global_threshold: Tensor
        self.class_probs: Tensor
        self.class_histogram: Tensor
        self.register_buffer("global_threshold", torch.tensor(1.0 / num_classes))
        self.register_buffer("class_probs", torch.full((num_classes,), 1.0 / num_classes))
        self.register_buffer("class_histogram", torch.full((num_classes,), 1.0 / num_classes))

    @torch.no_grad()
    def update(self, probs: Tensor) -> None:
        confidence, classes = probs.max(dim=1)
        rows = torch.cat([confidence[:, None], probs, F.one_hot(classes, probs.shape[1]).to(probs.dtype)], dim=1)
        means, _ = global_mean(rows)
        mean_confidence, mean_probs, histogram = means.split([1, probs.shape[1], probs.shape[1]])
        ema_(self.global_threshold, mean_confidence[0], self.momentum)
        ema_(self.class_probs, mean_probs, self.momentum)
        ema_(self.class_histogram, histogram, self.momentum)

    def class_thresholds(self) -> Tensor:
        return self.class_probs / self.class_probs.max() * self.global_threshold


def fairness_loss(student_logits: Tensor, mask: Tensor, class_probs: Tensor, class_histogram: Tensor) -> Tensor:
    """FreeMatch's self-adaptive fairness ``-H(SumNorm(p_t / h_t), SumNorm(p_bar / h_bar))`` (``H`` the
    cross-entropy, so the value is ``sum_c a_c log b_c``): ``p_t`` and ``h_t`` the EMA of the
    teacher's mean probabilities and class histogram, ``p_bar`` and ``h_bar`` the mean probability
    and normalised argmax histogram of the student's strong-view predictions on the masked rows.
    Classes the masked rows never predict get weight 0 in ``b`` (USB's zero for ``1 / 0``), so the
    term's value holds ``a_c log 1e-12`` for them, without gradient, as USB's does. ``p_bar`` and
    ``h_bar`` span every rank's masked rows (USB takes each rank's own); no masked row anywhere: 0."""
    probs = student_logits.to(class_probs.dtype).softmax(dim=1)
    rows = mask.to(probs.dtype)[:, None]
    totals = all_reduce_sum(torch.cat([(probs * rows).sum(dim=0), rows.sum(dim=0)]))
    mean_probs, count = totals[:-1] / totals[-1].clamp(min=1.0), totals[-1]
    if count == 0:
        return probs.new_zeros(())
    with torch.no_grad():
        histogram = all_reduce_sum((F.one_hot(probs.argmax(dim=1), probs.shape[1]) * rows).sum(dim=0)) / count
        inverse = torch.where(histogram > 0, histogram.reciprocal(), torch.zeros_like(histogram))
    target = class_probs / class_histogram
    target = target / target.sum()
    batch = mean_probs * inverse
    batch = batch / batch.sum()
    return (target * torch.log(batch + 1e-12)).sum()


class TruncatedGaussianWeights(nn.Module):
    """SoftMatch's sample weights: ``exp(-(max p - mu_t)^2 / (2 sigma_t^2 / 4))`` below ``mu_t``, 1 at
    or above it, where ``mu_t`` and ``sigma_t^2`` are EMAs of the mean and the (unbiased) variance
    of the top probability, from ``1/C`` and 1 as in the paper. The paper writes the Gaussian with
    variance ``sigma_t^2``; USB's code, whose results we compare with, divides it by
    ``n_sigma^2 = 4``, which we follow (a narrower Gaussian: low-confidence rows weigh less)."""

    def __init__(self, num_classes: int, momentum: float = 0.999) -> None:
        super().__init__()
        self.momentum = momentum
        self.mean: Tensor
        self.variance: Tensor
        self.register_buffer("mean", torch.tensor(1.0 / num_classes))
        self.register_buffer("variance", torch.tensor(1.0))

    @torch.no_grad()
    def update(self, confidence: Tensor) -> None:
        confidence = confidence.to(self.mean.dtype)[:, None]
        mean, count = global_mean(confidence)
        squares, _ = global_mean((confidence - mean) ** 2)
        ema_(self.mean, mean[0], self.momentum)
        ema_(self.variance, squares[0] * count / (count - 1).clamp(min=1.0), self.momentum)

    def forward(self, confidence: Tensor) -> Tensor:
        below = (confidence.to(self.mean.dtype) - self.mean).clamp(max=0.0)
        return torch.exp(-(below**2) / (2.0 * self.variance / 4.0))
