"""Schedules over a run's real budget: the learning rate (warmup + cosine), EMA momenta and loss
ramps follow ``TrainingBudget``, so runs bounded by ``max_epochs``, ``max_steps`` alone or
``max_time`` (wall-clock) warm up, then decay over their actual length, and a resumed run
continues the same curve."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
from lightning.pytorch.callbacks import Callback

from helpers import REPO, TINY
from ssl_kit.cli import SSLCLI
from ssl_kit.optim import warmup_cosine

BASE_LR = 0.1
# SimCLR on the digits, SGD at lr 0.1, 2 optimizer steps per epoch, one epoch of warmup, no validation.
RUN = [
    "--config", str(REPO / "configs" / "simclr_digits.yaml"), *TINY,
    "--model.optimizer", "sgd", "--model.lr", str(BASE_LR), "--model.warmup_epochs", "1",
    "--trainer.limit_val_batches", "0", "--trainer.logger", "false",
]  # fmt: skip


class FakeClock:
    """Lightning's ``Timer`` reads ``time.monotonic``; here each training step takes one second."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


class Record(Callback):
    """The learning rate each optimizer step uses; optionally stops the run after ``stop_at`` steps
    (the last checkpoint is then written as after any epoch), and ticks the fake clock."""

    def __init__(self, stop_at: int | None = None, clock: FakeClock | None = None) -> None:
        self.lrs: dict[int, float] = {}
        self.stop_at, self.clock = stop_at, clock

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs[trainer.global_step] = trainer.optimizers[0].param_groups[0]["lr"]

    def on_train_batch_end(self, trainer, *args) -> None:
        if self.clock is not None:
            self.clock.now += 1.0
        if self.stop_at is not None and trainer.global_step >= self.stop_at:
            trainer.should_stop = True


def last_checkpoint(root) -> str:
    """The ``last.ckpt`` of a run folder (the CLI's ``last_checkpoint`` callback)."""
    return str(root / "checkpoints" / "last.ckpt")


def run(root, *args: str, record: Record, ckpt_path: str | None = None) -> SSLCLI:
    cli = SSLCLI(args=[*RUN, "--trainer.default_root_dir", str(root), *args], run=False)
    cli.trainer.callbacks.append(record)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
    return cli


@pytest.mark.slow
def test_a_max_steps_only_run_warms_up_then_decays_over_its_steps(tmp_path):
    """``--trainer.max_steps`` alone leaves ``max_epochs`` unset: the warmup is still one epoch (2
    steps), not the whole run, and the cosine ends at the last step."""
    record = Record()
    cli = run(tmp_path, "--trainer.max_epochs", "-1", "--trainer.max_steps", "12", record=record)
    assert cli.trainer.global_step == 12
    expected = [BASE_LR * warmup_cosine(step, 2, 12) for step in range(12)]
    assert list(record.lrs) == list(range(12))
    assert list(record.lrs.values()) == pytest.approx(expected, rel=1e-9)
    assert record.lrs[11] < 0.05 * BASE_LR  # decayed, not stuck at the peak


@pytest.mark.slow
def test_resuming_a_step_budget_continues_the_same_schedule(tmp_path):
    whole = Record()
    run(tmp_path / "whole", "--trainer.max_epochs", "-1", "--trainer.max_steps", "12", record=whole)
    first, second = Record(stop_at=6), Record()
    run(tmp_path / "first", "--trainer.max_epochs", "-1", "--trainer.max_steps", "12", record=first)
    run(tmp_path / "second", "--trainer.max_epochs", "-1", "--trainer.max_steps", "12", record=second, ckpt_path=last_checkpoint(tmp_path / "first"))
    assert list(first.lrs) == list(range(6)) and list(second.lrs) == list(range(6, 12))
    assert [*first.lrs.values(), *second.lrs.values()] == pytest.approx(list(whole.lrs.values()), rel=1e-9)


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    from lightning.pytorch.callbacks import timer

    fake = FakeClock()
    monkeypatch.setattr(timer, "time", fake)
    return fake


@pytest.mark.slow
def test_a_wall_clock_budget_decays_over_the_time_and_resumes_where_it_was(tmp_path, clock):
    """``--trainer.max_epochs -1 --trainer.max_time 10 s`` (once an OverflowError at start): two steps
    of warmup, then the cosine over the share of the 10 s used, one step per (fake) second. The
    rate for step k is set after step k - 1, when k - 1 seconds have passed; warmup ended at 1 s."""
    budget = ["--trainer.max_epochs", "-1", "--trainer.max_time", "00:00:00:10"]
    whole = Record(clock=clock)
    cli = run(tmp_path / "whole", *budget, record=whole)
    steps = cli.trainer.global_step
    assert steps in (10, 11)  # the Timer stopped the run once 10 s had passed
    lrs = list(whole.lrs.values())
    assert lrs[:2] == pytest.approx([0.5 * BASE_LR, BASE_LR])
    for step in range(2, steps):
        progress = ((step - 1) / 10 - 0.1) / 0.9
        assert lrs[step] == pytest.approx(BASE_LR * 0.5 * (1 + math.cos(math.pi * progress)), rel=1e-6), step
    assert lrs[-1] < 0.15 * BASE_LR

    first, second = Record(stop_at=4, clock=clock), Record(clock=clock)
    run(tmp_path / "first", *budget, record=first)
    run(tmp_path / "second", *budget, record=second, ckpt_path=last_checkpoint(tmp_path / "first"))  # the Timer's 4 s come back from it
    assert list(first.lrs) == list(range(4)) and list(second.lrs) == list(range(4, steps))
    assert [*first.lrs.values(), *second.lrs.values()] == pytest.approx(lrs, rel=1e-6)


def test_a_run_without_an_end_is_refused_with_the_options_named():
    from ssl_kit.optim import TrainingBudget

    endless = SimpleNamespace(estimated_stepping_batches=float("inf"), callbacks=[])
    with pytest.raises(ValueError, match="max_epochs.*max_steps.*max_time"):
        TrainingBudget(endless)


@pytest.mark.slow
def test_ema_momentum_follows_a_wall_clock_budget(tmp_path, clock):
    """MoCo v3's momentum goes from its base to 1 over a ``max_time`` run (the EMA schedules once
    converted ``estimated_stepping_batches``, infinite here, to an int). After optimizer step k,
    k + 1 (fake) seconds of the 10 have passed."""
    momenta = []
    cli = SSLCLI(
        args=[
            "--config", str(REPO / "configs" / "moco_v3_digits.yaml"), *TINY, "--trainer.default_root_dir", str(tmp_path),
            "--trainer.max_epochs", "-1", "--trainer.max_time", "00:00:00:10", "--trainer.limit_val_batches", "0",
            "--trainer.logger", "false", "--model.ema_momentum", "0.9",
        ],
        run=False,
    )  # fmt: skip
    cli.trainer.callbacks.append(Record(clock=clock))
    ema, step = cli.model.ema, cli.model.ema.step

    def recorded_step(*args):
        moved = step(*args)
        momenta.append(ema.momentum)
        return moved

    ema.step = recorded_step
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    expected = [1 - 0.1 * (math.cos(math.pi * min(1.0, (k + 1) / 10)) + 1) / 2 for k in range(len(momenta))]
    assert len(momenta) in (10, 11) and momenta == pytest.approx(expected, rel=1e-9)
    assert momenta[-1] == pytest.approx(1.0)


@pytest.mark.parametrize(
    "config",
    [
        "simclr_digits.yaml", "barlow_twins_digits.yaml", "vicreg_digits.yaml", "byol_digits.yaml", "moco_v3_digits.yaml", "dino_digits.yaml",
        "mae_digits.yaml", "msn_digits.yaml", "ijepa_digits.yaml", "data2vec2_digits.yaml", "mean_teacher_digits.yaml",
    ],
)  # fmt: skip
@pytest.mark.slow
def test_every_method_trains_for_a_wall_clock_budget(tmp_path, clock, config):
    """Each method under ``--trainer.max_time`` alone: it stops when the (fake, 1 s per step) clock
    runs out and its learning rate has decayed from the peak to near zero by then."""
    record = Record(clock=clock)
    cli = SSLCLI(
        args=[
            "--config", str(REPO / "configs" / config), *TINY, "--trainer.default_root_dir", str(tmp_path),
            "--trainer.max_epochs", "-1", "--trainer.max_time", "00:00:00:06", "--trainer.limit_val_batches", "0",
            "--trainer.logger", "false", "--model.warmup_epochs", "0", "--data.batch_size", "8",
        ],
        run=False,
    )  # fmt: skip
    cli.trainer.callbacks.append(record)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    lrs = list(record.lrs.values())
    assert cli.trainer.global_step in (6, 7) and lrs[0] == pytest.approx(cli.model.hparams.lr)
    assert all(a > b for a, b in zip(lrs[1:], lrs[2:])) and lrs[-1] < 0.35 * lrs[0]
