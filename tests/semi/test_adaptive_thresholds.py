"""Adaptive-threshold self-training (FlexMatch, FreeMatch, SoftMatch) and distribution alignment:
each statistic and criterion against its paper's formula written out on small tensors, the EMA
statistics after a few updates, 2 gloo ranks equal to one process on the whole batch, checkpoints
that carry the statistics through a reload and a resume. Their learning check (SoftMatch beyond the
labels alone) is beside the mean teacher's in test_mean_teacher.py, sharing its baseline run."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ddp import gloo_group, spawn_ranks
from helpers import fit
from ssl_kit.data.semi_supervised import FewLabelSplit, SemiSupervisedBatch
from ssl_kit.semi import MeanTeacher
from ssl_kit.semi.criteria import CRITERIA, FixMatchCriterion, FlexMatchCriterion, FreeMatchCriterion, SoftMatchCriterion
from ssl_kit.semi.thresholds import (
    DistributionAlignment, LearningStatus, SelfAdaptiveThresholds, TruncatedGaussianWeights, fairness_loss,
)  # fmt: skip

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES, DIM, POOL = 3, 5, 20
ADAPTIVE = ["flexmatch", "freematch", "softmatch"]


def toy_batch(seed: int, labeled: int = 4, unlabeled: int = 12) -> SemiSupervisedBatch:
    """Flat float64 views (the criteria only pass them to the networks); the second half of the
    unlabeled rows is shifted, so a half batch has other statistics than the whole; unlabeled rows
    sit at distinct seeded positions of a pool of ``POOL``."""
    gen = torch.Generator().manual_seed(seed)
    views = lambda rows: torch.randn(rows, DIM, generator=gen, dtype=torch.float64)  # noqa: E731
    weak_unlabeled = views(unlabeled)
    weak_unlabeled[unlabeled // 2 :] += 1.5
    return SemiSupervisedBatch(
        [views(labeled), views(labeled)], torch.randint(0, CLASSES, (labeled,), generator=gen),
        [weak_unlabeled, weak_unlabeled + 0.3 * views(unlabeled)], torch.full((unlabeled,), -1),
        unlabeled_positions=torch.randperm(POOL, generator=gen)[:unlabeled],
    )  # fmt: skip


def rank_rows(batch: SemiSupervisedBatch, rank: int, world_size: int) -> SemiSupervisedBatch:
    """Rank ``rank``'s contiguous share of every part of the batch."""
    def share(x: Tensor) -> Tensor:
        size = len(x) // world_size
        return x[rank * size : (rank + 1) * size]

    return SemiSupervisedBatch(
        [share(v) for v in batch.labeled_views], share(batch.labels), [share(v) for v in batch.unlabeled_views],
        share(batch.hidden_labels), unlabeled_positions=share(batch.unlabeled_positions),
    )  # fmt: skip


def toy_networks() -> tuple[nn.Linear, nn.Linear]:
    """A linear student and a frozen, sharper linear teacher (confidences spread over (1/3, 1))."""
    torch.manual_seed(0)
    student, teacher = nn.Linear(DIM, CLASSES).double(), nn.Linear(DIM, CLASSES).double().requires_grad_(False)
    teacher.weight.mul_(3.0)
    return student, teacher


def pool_split() -> FewLabelSplit:
    return FewLabelSplit(labeled=np.arange(POOL, POOL + 4), unlabeled=np.arange(POOL))


def teacher_probs(teacher: nn.Module, batch: SemiSupervisedBatch) -> Tensor:
    return teacher(batch.unlabeled_views[0]).float().softmax(1)


def fixmatch_loss(student: nn.Module, batch: SemiSupervisedBatch, weights: Tensor, classes: Tensor) -> Tensor:
    """``CE(weak labeled) + mean_i weight_i CE(strong unlabeled_i, class_i)``, written out."""
    supervised = F.cross_entropy(student(batch.labeled_views[0]), batch.labels)
    unlabeled = F.cross_entropy(student(batch.unlabeled_views[1]), classes, reduction="none")
    return supervised + (weights.double() * unlabeled).mean()


def ema(average: float | Tensor, value: float | Tensor, momentum: float) -> float | Tensor:
    return momentum * average + (1 - momentum) * value


#: ``1/C`` as the float32 buffers start (the float64 tests convert them from there).
START = float(torch.tensor(1 / CLASSES))


# --------------------------------------------------------------------------------------------
# distribution alignment
# --------------------------------------------------------------------------------------------
def test_distribution_alignment_is_normalised_p_over_the_ema_of_p():
    """ReMixMatch's ``normalise(p * target / EMA(p))`` with a uniform target; the first batch sets
    the EMA (USB), later ones move it by ``1 - momentum``; the aligned marginal is nearer uniform."""
    gen = torch.Generator().manual_seed(0)
    first, second = torch.randn(6, 4, generator=gen, dtype=torch.float64), torch.randn(6, 4, generator=gen, dtype=torch.float64)
    first[:, 0] += 2.0  # the teacher favours class 0
    second[:, 0] += 2.0
    align = DistributionAlignment(4, momentum=0.9).double()
    align(first)
    assert torch.allclose(align.mean_probs, first.softmax(1).mean(0)) and align.updates == 1
    aligned = align(second).softmax(1)
    expected_ema = 0.9 * first.softmax(1).mean(0) + 0.1 * second.softmax(1).mean(0)
    assert torch.allclose(align.mean_probs, expected_ema, atol=1e-12)
    p = second.softmax(1)
    by_hand = p * 0.25 / expected_ema
    assert torch.allclose(aligned, by_hand / by_hand.sum(1, keepdim=True), atol=1e-12)
    uniform = torch.full((4,), 0.25, dtype=torch.float64)
    assert (aligned.mean(0) - uniform).abs().sum() < (p.mean(0) - uniform).abs().sum() / 2


def test_fixmatch_with_distribution_alignment_thresholds_and_labels_the_aligned_probabilities():
    student, teacher = toy_networks()
    batch = toy_batch(1)
    criterion = FixMatchCriterion(num_classes=CLASSES, threshold=0.6, distribution_alignment=True)
    _, _, pseudo = criterion(batch, student, teacher, 1.0)
    p = teacher_probs(teacher, batch)
    aligned = p / p.mean(0)  # the first batch's EMA is its mean
    confidence, classes = (aligned / aligned.sum(1, keepdim=True)).max(1)
    assert torch.equal(pseudo.classes, classes) and torch.equal(pseudo.mask, confidence >= 0.6)
    assert not torch.equal(classes, p.argmax(1)) or not torch.equal(pseudo.mask, p.max(1).values >= 0.6)  # alignment changed something
    assert FixMatchCriterion(num_classes=CLASSES).alignment is None and SoftMatchCriterion(num_classes=CLASSES).alignment is not None


# --------------------------------------------------------------------------------------------
# FlexMatch
# --------------------------------------------------------------------------------------------
def flexmatch_thresholds(sigma: list[int], pool: int, tau: float) -> Tensor:
    """``tau_c = M(beta_c) tau``, ``beta_c = sigma_c / max(max sigma, N - sum sigma)``, ``M(x) = x / (2 - x)``."""
    beta = [s / max(max(sigma), pool - sum(sigma)) for s in sigma]
    return torch.tensor([b / (2 - b) * tau for b in beta])


def test_flexmatch_learning_status_thresholds_with_warmup_and_the_last_confident_class():
    status = LearningStatus(CLASSES, threshold=0.9)
    status.track(10)
    assert torch.equal(status.class_thresholds(), torch.zeros(CLASSES))  # nothing learned: every threshold 0
    status.update(torch.tensor([0, 1, 2, 3]), torch.tensor([0.95, 0.91, 0.5, 0.99]), torch.tensor([0, 0, 1, 2]))
    assert status.pool_classes.tolist() == [0, 0, -1, 2] + [-1] * 6  # 0.5 < tau: position 2 stays unused
    assert torch.allclose(status.class_thresholds(), flexmatch_thresholds([2, 0, 1], 10, 0.9))  # the 7 unused dominate
    status.update(torch.arange(4, 10), torch.full((6,), 0.97), torch.zeros(6, dtype=torch.long))
    assert torch.allclose(status.class_thresholds(), flexmatch_thresholds([8, 0, 1], 10, 0.9))  # max sigma = 8 > 1 unused
    assert status.class_thresholds()[0] == pytest.approx(0.9)
    status.update(torch.tensor([0, 1]), torch.tensor([0.5, 0.93]), torch.tensor([1, 2]))
    assert status.pool_classes[:2].tolist() == [0, 2]  # an unconfident prediction keeps the last confident class


def test_flexmatch_masks_with_the_status_before_the_batch_then_records_it():
    student, teacher = toy_networks()
    batch = toy_batch(2)
    criterion = FlexMatchCriterion(num_classes=CLASSES, threshold=0.8)
    criterion.use_split(pool_split())
    recorded = torch.tensor([0] * 8 + [1] * 2 + [2] * 6 + [-1] * (POOL - 16))
    criterion.status.pool_classes.copy_(recorded)
    before = flexmatch_thresholds([8, 2, 6], POOL, 0.8)  # max sigma 8 > 4 unused: 0.8, 0.11, 0.48
    loss, parts, pseudo = criterion(batch, student, teacher, 1.0)
    confidence, classes = teacher_probs(teacher, batch).max(1)
    expected_mask = confidence >= before[classes]
    assert torch.equal(pseudo.mask, expected_mask) and 0 < expected_mask.sum() < len(expected_mask)
    assert (confidence < 0.8).any() and (confidence >= 0.8).any()
    table = recorded.clone()
    table[batch.unlabeled_positions[confidence >= 0.8]] = classes[confidence >= 0.8]
    assert torch.equal(criterion.status.pool_classes, table)
    assert loss.item() == pytest.approx(fixmatch_loss(student, batch, expected_mask, classes).item(), rel=1e-6)


def test_flexmatch_needs_pool_positions_and_a_pool_size():
    student, teacher = toy_networks()
    criterion = FlexMatchCriterion(num_classes=CLASSES)
    with pytest.raises(RuntimeError, match="pool's size"):
        criterion(toy_batch(0), student, teacher, 1.0)
    criterion.use_split(pool_split())
    batch = toy_batch(0)
    batch.unlabeled_positions = None
    with pytest.raises(ValueError, match="pool positions"):
        criterion(batch, student, teacher, 1.0)


# --------------------------------------------------------------------------------------------
# FreeMatch
# --------------------------------------------------------------------------------------------
def free_match_statistics(batches: list[Tensor], momentum: float) -> tuple[float, Tensor, Tensor]:
    """``tau_t``, ``p_t`` and ``h_t`` after EMA updates from ``1/C``, written out per batch."""
    tau, p, h = START, torch.full((CLASSES,), START, dtype=torch.float64), torch.full((CLASSES,), START, dtype=torch.float64)
    for probs in batches:
        tau = ema(tau, probs.max(1).values.mean().item(), momentum)
        p = ema(p, probs.mean(0), momentum)
        h = ema(h, torch.bincount(probs.argmax(1), minlength=CLASSES).double() / len(probs), momentum)
    return tau, p, h


def test_freematch_self_adaptive_thresholds_after_a_few_updates():
    gen = torch.Generator().manual_seed(3)
    batches = [torch.randn(8, CLASSES, generator=gen, dtype=torch.float64).mul(2).softmax(1) for _ in range(3)]
    thresholds = SelfAdaptiveThresholds(CLASSES, momentum=0.9).double()
    assert torch.allclose(thresholds.class_thresholds(), torch.full((CLASSES,), 1 / CLASSES, dtype=torch.float64))
    for probs in batches:
        thresholds.update(probs)
    tau, p, h = free_match_statistics(batches, 0.9)
    assert thresholds.global_threshold.item() == pytest.approx(tau, rel=1e-12)
    assert torch.allclose(thresholds.class_probs, p, atol=1e-12) and torch.allclose(thresholds.class_histogram, h, atol=1e-12)
    assert torch.allclose(thresholds.class_thresholds(), p / p.max() * tau, atol=1e-12)


def fairness_by_hand(student_logits: Tensor, mask: Tensor, p: Tensor, h: Tensor) -> float:
    """``sum_c a_c log(b_c + 1e-12)``: ``a = SumNorm(p / h)``, ``b = SumNorm(p_bar / h_bar)`` on the masked rows (``1/0 -> 0``)."""
    rows = [student_logits[i].softmax(0) for i in range(len(mask)) if mask[i]]
    p_bar = sum(rows) / len(rows)
    h_bar = [sum(int(r.argmax()) == c for r in rows) / len(rows) for c in range(CLASSES)]
    a = [(p[c] / h[c]).item() for c in range(CLASSES)]
    b = [p_bar[c].item() / h_bar[c] if h_bar[c] > 0 else 0.0 for c in range(CLASSES)]
    return sum(a[c] / sum(a) * math.log(b[c] / sum(b) + 1e-12) for c in range(CLASSES))


def test_fairness_term_is_minus_the_cross_entropy_of_the_normalised_marginals():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(10, CLASSES, generator=gen, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([True, False, True, True, False, True, True, False, True, True])
    p, h = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64), torch.tensor([0.6, 0.25, 0.15], dtype=torch.float64)
    value = fairness_loss(logits, mask, p, h)
    assert value.item() == pytest.approx(fairness_by_hand(logits.detach(), mask, p, h), rel=1e-10)
    value.backward()
    assert logits.grad[~mask].abs().sum() == 0 and logits.grad[mask].abs().sum() > 0  # masked rows only
    one_class = logits.detach().clone()
    one_class[:, 0] += 20.0  # every masked row predicts class 0: the others get b = 0, as USB's 1/0 -> 0
    assert fairness_loss(one_class, mask, p, h).item() == pytest.approx(fairness_by_hand(one_class, mask, p, h), rel=1e-10)
    assert fairness_loss(logits, torch.zeros(10, dtype=torch.bool), p, h).item() == 0.0


def test_freematch_updates_before_masking_and_adds_the_weighted_fairness_term():
    student, teacher = toy_networks()
    criterion = FreeMatchCriterion(num_classes=CLASSES, statistics_momentum=0.5, fairness_weight=0.5)
    batches = [toy_batch(5), toy_batch(6)]
    for batch in batches:
        loss, parts, pseudo = criterion(batch, student, teacher, 1.0)
    tau, p, h = free_match_statistics([teacher_probs(teacher, b).double() for b in batches], 0.5)
    confidence, classes = teacher_probs(teacher, batches[-1]).max(1)
    expected_mask = confidence >= (p / p.max() * tau)[classes].float()
    assert torch.equal(pseudo.mask, expected_mask) and 0 < expected_mask.sum() < len(expected_mask)
    fairness = fairness_by_hand(student(batches[-1].unlabeled_views[1]).detach(), expected_mask, p, h)
    assert parts["fairness_loss"].item() == pytest.approx(0.5 * fairness, rel=1e-5)
    by_hand = fixmatch_loss(student, batches[-1], expected_mask, classes).item() + 0.5 * fairness
    assert loss.item() == pytest.approx(by_hand, rel=1e-5)


# --------------------------------------------------------------------------------------------
# SoftMatch
# --------------------------------------------------------------------------------------------
def test_softmatch_truncated_gaussian_after_a_few_updates():
    gen = torch.Generator().manual_seed(7)
    batches = [torch.rand(9, generator=gen, dtype=torch.float64) * 0.6 + 0.35 for _ in range(3)]
    gaussian = TruncatedGaussianWeights(CLASSES, momentum=0.9).double()
    mu, var = START, 1.0
    for confidence in batches:
        gaussian.update(confidence)
        mu, var = ema(mu, confidence.mean().item(), 0.9), ema(var, confidence.var(unbiased=True).item(), 0.9)
    assert gaussian.mean.item() == pytest.approx(mu, rel=1e-12) and gaussian.variance.item() == pytest.approx(var, rel=1e-12)
    confidence = torch.tensor([0.2, 0.4, mu, 0.9], dtype=torch.float64)
    expected = [math.exp(-((c - mu) ** 2) / (2 * var / 4)) if c < mu else 1.0 for c in confidence.tolist()]
    assert torch.allclose(gaussian(confidence), torch.tensor(expected, dtype=torch.float64), atol=1e-12)


def test_softmatch_weights_the_aligned_confidence_and_labels_with_the_teachers_own_classes():
    student, teacher = toy_networks()
    criterion = SoftMatchCriterion(num_classes=CLASSES, statistics_momentum=0.5)
    batches = [toy_batch(8), toy_batch(9)]
    for batch in batches:
        loss, parts, pseudo = criterion(batch, student, teacher, 1.0)
    probs = [teacher_probs(teacher, b).double() for b in batches]
    ema_probs, mu, var = probs[0].mean(0), START, 1.0  # the first batch sets the alignment's EMA
    for step, p in enumerate(probs):
        ema_probs = ema_probs if step == 0 else ema(ema_probs, p.mean(0), 0.5)
        aligned = p / ema_probs
        confidence = (aligned / aligned.sum(1, keepdim=True)).max(1).values
        mu, var = ema(mu, confidence.mean().item(), 0.5), ema(var, confidence.var(unbiased=True).item(), 0.5)
    weights = torch.where(confidence < mu, torch.exp(-((confidence - mu) ** 2) / (2 * var / 4)), torch.ones_like(confidence))
    assert torch.allclose(pseudo.weights.double(), weights, atol=1e-6) and (weights < 1).any() and (weights == 1).any()
    assert torch.equal(pseudo.classes, probs[-1].argmax(1)) and torch.equal(pseudo.mask, weights >= 1)
    assert loss.item() == pytest.approx(fixmatch_loss(student, batches[-1], weights, probs[-1].argmax(1)).item(), rel=1e-5)


def test_adaptive_criteria_refuse_a_pre_labeled_pool():
    student, teacher = toy_networks()
    batch = toy_batch(0)
    batch.pool_targets = F.one_hot(torch.zeros(12, dtype=torch.long), CLASSES).double()
    for name in ADAPTIVE:
        with pytest.raises(ValueError, match="pre-labeled pools need loss: fixmatch"):
            CRITERIA[name](num_classes=CLASSES)(batch, student, teacher, 1.0)


def test_mean_teacher_passes_each_criterion_the_settings_it_names():
    from ssl_kit.inputs import InputSpec

    def built(**kwargs):
        return MeanTeacher(backbone="resnet18", input_spec=InputSpec.image(8), num_classes=7, **kwargs).criterion

    free = built(loss="freematch", fairness_weight=0.3, statistics_momentum=0.99)
    assert isinstance(free, FreeMatchCriterion) and free.fairness_weight == 0.3 and free.thresholds.momentum == 0.99
    assert free.thresholds.class_probs.shape == (7,)
    flex = built(loss="flexmatch", threshold=0.7)
    assert flex.status.threshold == 0.7 and flex.alignment is None
    assert built(loss="softmatch", distribution_alignment=False).alignment is None


# --------------------------------------------------------------------------------------------
# 2 gloo processes == 1 process on the whole batch
# --------------------------------------------------------------------------------------------
WORLD_SIZE = 2


class ToySelfTraining(nn.Module):
    """Toy networks and a criterion, the loss inside forward as Lightning's DDP wrapper runs it."""

    def __init__(self, loss: str) -> None:
        super().__init__()
        self.student, self.teacher = toy_networks()
        settings = {"threshold": 0.8} if loss == "flexmatch" else {"fairness_weight": 0.5} if loss == "freematch" else {}
        self.criterion = CRITERIA[loss](num_classes=CLASSES, statistics_momentum=0.5, **settings)
        if loss == "flexmatch":
            self.criterion.use_split(pool_split())

    def forward(self, batch: SemiSupervisedBatch) -> Tensor:
        return self.criterion(batch, self.student, self.teacher, 1.0).loss


def run_steps(loss: str, rank: int, world_size: int) -> dict[str, Tensor]:
    model = ToySelfTraining(loss)
    wrapped = nn.parallel.DistributedDataParallel(model) if dist.is_initialized() else model
    for seed in (10, 11):  # the second step masks with the statistics of the first
        model.zero_grad()
        value = wrapped(rank_rows(toy_batch(seed, labeled=8, unlabeled=16), rank, world_size))
        value.backward()
    return {"loss": value.detach(), "grad": model.student.weight.grad.clone(), **model.criterion.state_dict()}


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    with gloo_group(rank, world_size, port):
        torch.save({loss: run_steps(loss, rank, world_size) for loss in ADAPTIVE}, Path(out_dir) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return spawn_ranks(_worker, tmp_path_factory.mktemp("adaptive_ddp"), WORLD_SIZE)


@pytest.mark.parametrize("loss", ADAPTIVE)
def test_two_ranks_update_the_statistics_as_one_process_on_the_whole_batch(ranks, loss):
    """Every rank ends with the statistics one process computes on the concatenated batches (rank
    0's half alone gives others), and DDP's averaged gradient is the one-process gradient,
    FreeMatch's fairness term on every rank's masked rows included."""
    reference = run_steps(loss, 0, 1)
    local = run_steps(loss, 0, 2)
    statistics = [key for key in reference if key not in ("loss", "grad", "alignment.updates")]
    assert any(not torch.allclose(local[key].double(), reference[key].double(), atol=1e-4) for key in statistics)
    for r in ranks:
        for key in statistics:
            assert torch.allclose(r[loss][key].double(), reference[key].double(), atol=1e-6), key
        assert torch.allclose(r[loss]["grad"], reference["grad"], atol=1e-6)
    assert sum(r[loss]["loss"] for r in ranks).item() / WORLD_SIZE == pytest.approx(reference["loss"].item(), rel=1e-5)


# --------------------------------------------------------------------------------------------
# the CLI: a tiny run per criterion, its checkpoint reloaded and resumed
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss", ADAPTIVE)
def test_cli_run_saves_the_statistics_and_a_resume_restores_them(tmp_path, loss, monkeypatch):
    args = ["--data.batch_size", "4", "--model.loss", loss, "--model.threshold", "0.0", "--trainer.num_sanity_val_steps", "0"]
    cli = fit("mean_teacher_digits.yaml", tmp_path, "--trainer.max_epochs", "1", *args)
    assert cli.trainer.global_step == 2 and torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    checkpoint = tmp_path / "checkpoints" / "last.ckpt"
    saved = {k: v for k, v in torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"].items() if k.startswith("criterion.")}
    fresh = {f"criterion.{k}": v for k, v in CRITERIA[loss](num_classes=10).state_dict().items()}
    assert saved.keys() == fresh.keys() and saved  # every statistic is in the checkpoint ...
    moved = [k for k in saved if saved[k].shape != fresh[k].shape or not torch.equal(saved[k], fresh[k])]
    assert moved  # ... and has moved from its start
    if loss == "flexmatch":
        assert saved["criterion.status.pool_classes"].numel() == len(cli.datamodule.few_label.unlabeled)
        assert (saved["criterion.status.pool_classes"] >= 0).sum() == 2 * 12  # threshold 0: every sample seen is recorded
    reloaded = MeanTeacher.load_from_checkpoint(checkpoint).criterion.state_dict()
    assert all(torch.equal(reloaded[k.removeprefix("criterion.")], v) for k, v in saved.items())

    seen = []
    real = MeanTeacher.training_losses

    def spy(self, batch):
        if not seen:  # the first resumed step starts from the saved statistics
            seen.append({k: v.detach().cpu().clone() for k, v in self.criterion.state_dict().items()})
        return real(self, batch)

    monkeypatch.setattr(MeanTeacher, "training_losses", spy)
    resumed = fit("mean_teacher_digits.yaml", tmp_path, "--trainer.max_epochs", "2", *args, "--ckpt_path", "last")
    assert resumed.trainer.global_step == 4
    assert all(torch.equal(seen[0][k.removeprefix("criterion.")], v) for k, v in saved.items())
