"""The suite runner: cells pretrain through the real CLI and write one row per protocol; a re-run
skips finished cells; a killed suite resumes (finished cells kept, the interrupted one from its
last.ckpt); feature extraction under 2 gloo processes equals the single-process features."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import yaml
from PIL import Image

from helpers import REPO, TINY, run_command
from ssl_kit.bench.runner import SELF_TRAINING_DIAGNOSTICS, Cell, late_means
from ssl_kit.bench.store import ResultStore

# The digits at 8 px, 2 batches per epoch: each cell takes a few seconds.
TINY_ARGS = [*TINY, "--trainer.max_epochs", "1", "--model.warmup_epochs", "0"]


def suite_file(tmp_path, seeds, epochs: int = 1, protocols=None) -> tuple:
    suite = {
        "name": "tiny",
        "seeds": seeds,
        "store": str(tmp_path / "store.sqlite"),
        "workdir": str(tmp_path / "runs"),
        "protocols": protocols or {"linear": {"epochs": 20}, "knn": {"k": 5}, "few_label": {"labels_per_class": 5, "epochs": 20}},
        "dataset_args": {"Digits": [*TINY_ARGS, "--trainer.max_epochs", str(epochs)]},
        "entries": [
            {"method": "SimCLR", "dataset": "Digits", "config": str(REPO / "configs" / "simclr_digits.yaml")},
            {"method": "MeanTeacher", "dataset": "Digits", "config": str(REPO / "configs" / "mean_teacher_digits.yaml"),
             "protocols": ["few_label"], "args": ["--data.batch_size", "8", "--data.unlabeled_ratio", "2", "--trainer.log_every_n_steps", "1"]},
        ],
    }  # fmt: skip
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    return path, suite


def run_main(*args: str) -> None:
    from ssl_kit.bench.__main__ import main

    main(list(args))


@pytest.mark.slow
def test_suite_writes_one_row_per_protocol_and_skips_finished_cells(tmp_path, monkeypatch):
    path, suite = suite_file(tmp_path, seeds=[0])
    run_main("--config", str(path), "--report", str(tmp_path / "report"))
    assert "SimCLR" in (tmp_path / "report" / "leaderboard.md").read_text()
    store = ResultStore(suite["store"])
    rows = store.rows("tiny")
    # SimCLR: linear, knn, few_label; MeanTeacher: few_label (its teacher's test accuracy) and its
    # criterion's late mask rate and pseudo-label accuracy, from its run's CSV log
    assert sorted((r["method"], r["protocol"], r["metric"]) for r in rows) == [
        ("MeanTeacher", "few_label", "top1"), ("MeanTeacher", "self_training", "mask_rate"),
        ("MeanTeacher", "self_training", "pseudo_label_acc"),
        ("SimCLR", "few_label", "top1"), ("SimCLR", "knn", "top1"), ("SimCLR", "linear", "top1"),
    ]  # fmt: skip
    (teacher_cell,) = {r["cell"] for r in rows if r["method"] == "MeanTeacher"}
    diagnostics = {r["metric"]: r["value"] for r in rows if r["protocol"] == "self_training"}
    assert diagnostics == late_means(tmp_path / "runs" / "tiny" / teacher_cell / "csv", SELF_TRAINING_DIAGNOSTICS)
    rows = [r for r in rows if r["protocol"] != "self_training"]
    for row in rows:
        assert 0.0 <= row["value"] <= 1.0 and row["metric"] == "top1" and row["wall_time_s"] > 0 and row["seed"] == 0
        assert row["config"]["fit"]["seed_everything"] == 0 and row["config"]["fit"]["trainer"]["max_epochs"] == 1
        assert row["backbone"] == "resnet18" and row["epochs"] == 1.0
    linear = next(r for r in rows if r["protocol"] == "linear")
    assert {"lr", "weight_decay", "epochs"} <= set(linear["config"]["protocol"])  # settings and the choice made on val
    # Fixed splits: the few_label probe draws its labeled samples with the DataModule's seed, so they
    # are the ones the MeanTeacher cell trained on (recorded by the run).
    from ssl_kit.data import DigitsDataModule
    from ssl_kit.data.datasets import labels_of
    from ssl_kit.data.splits import few_label_split

    (recorded,) = (tmp_path / "runs" / "tiny").rglob("few_label_split.json")
    data = DigitsDataModule(image_size=8)
    data.setup()
    labeled, _ = few_label_split(labels_of(data.splits.train), 5, None, data.seed)
    assert json.loads(recorded.read_text())["labeled_indices"] == labeled.tolist()

    # an entry with a checkpoint is evaluated without pretraining: the same backbone, the same numbers
    simclr = next(r for r in rows if r["method"] == "SimCLR" and r["protocol"] == "knn")
    checkpoint = tmp_path / "runs" / "tiny" / simclr["cell"] / "checkpoints" / "last.ckpt"
    entry = {**suite["entries"][0], "checkpoint": str(checkpoint)}
    run_main("--config", str(path), "--name", "loaded", "--entries", json.dumps([entry]), "--protocols", '{"knn": {"k": 5}}')
    (loaded,) = store.rows("loaded")
    assert loaded["value"] == simclr["value"] and loaded["epochs"] is None and loaded["throughput"] is None

    # a re-run does nothing; another seed runs only its cells
    ran = []
    original = Cell.run
    monkeypatch.setattr(Cell, "run", lambda self: ran.append(self.seed) or original(self))
    run_main("--config", str(path))
    assert ran == [] and len(store.rows("tiny")) == 6
    run_main("--config", str(path), "--seeds", "[0, 1]")
    assert ran == [1, 1] and len(store.rows("tiny")) == 12


def test_late_means_average_the_last_fifth_of_logged_steps_across_resumed_versions(tmp_path):
    """A resumed run logs into a new CSV version: its rows replace the first run's at the same
    steps; the mean is over the steps in the last 20% of training, per column, skipping blanks."""
    columns = {"mask_rate": "train/mask_rate", "pseudo_label_acc": "train/pseudo_label_acc"}

    def write(version: int, rows: list[tuple]) -> None:
        folder = tmp_path / f"version_{version}"
        folder.mkdir()
        lines = ["epoch,step,train/mask_rate,train/pseudo_label_acc,lr-SGD"] + [",".join(map(str, row)) for row in rows]
        (folder / "metrics.csv").write_text("\n".join(lines) + "\n")

    # steps 0..90 by 10; the first run stopped after step 90 and its steps 80, 90 were redone
    write(0, [(0, step, 0.1, 0.5, "") for step in range(0, 100, 10)] + [(0, 90, "", "", 0.03)])
    write(1, [(1, 80, 0.4, 0.7, ""), (1, 90, 0.6, "", "")] + [(1, step, 0.8, 0.9, "") for step in (100, 110)])
    means = late_means(tmp_path, columns)
    # last step 110: steps >= 88 are late, i.e. 90 (0.6, no accuracy logged), 100 and 110
    assert means["mask_rate"] == pytest.approx((0.6 + 0.8 + 0.8) / 3)
    assert means["pseudo_label_acc"] == pytest.approx(0.9)
    assert late_means(tmp_path, columns, fraction=1.0)["mask_rate"] == pytest.approx((0.1 * 8 + 0.4 + 0.6 + 1.6) / 12)
    assert late_means(tmp_path / "absent", columns) == {}


def same_weights(path_a, path_b) -> bool:
    a, b = (torch.load(path, weights_only=True) for path in (path_a, path_b))
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


@pytest.mark.slow
def test_init_from_entry_self_trains_from_the_pretrained_cells_backbone(tmp_path):
    """Pretrain -> self-train in one suite: an ``init_from`` entry starts from the named entry's
    final backbone of the same seed (its cell's ``backbone.pt``). With no self-training steps the
    teacher it delivers is that backbone exactly. Where the pretraining cell has not run yet, the
    self-training cell pretrains it first in its own folder, with the same seed."""
    path, suite = suite_file(tmp_path, seeds=[0], protocols={"knn": {"k": 5}, "few_label": {"labels_per_class": 5, "epochs": 5}})
    simclr, teacher = suite["entries"]
    teacher = {**teacher, "method": "MeanTeacher from SimCLR", "init_from": "SimCLR", "args": [*teacher["args"], "--trainer.max_epochs", "0"]}
    # the pretraining's own config, untrained: the few-label probe of the backbone the teacher starts from
    probe = {**simclr, "method": "Probe on SimCLR", "init_from": "SimCLR", "protocols": ["few_label"], "args": ["--trainer.max_epochs", "0"]}
    suite["entries"] = [simclr, teacher, probe]
    path.write_text(yaml.safe_dump(suite))
    run_main("--config", str(path))
    rows = ResultStore(suite["store"]).rows("tiny")
    cells = {row["method"]: row["cell"] for row in rows}
    runs = tmp_path / "runs" / "tiny"
    pretrained = runs / cells["SimCLR"] / "backbone.pt"
    (self_trained,) = [row for row in rows if row["method"] == "MeanTeacher from SimCLR"]
    assert self_trained["protocol"] == "few_label"
    assert self_trained["config"]["fit"]["model"]["init_args"]["init_from"] == str(pretrained)
    assert same_weights(runs / cells["MeanTeacher from SimCLR"] / "backbone.pt", pretrained)
    assert not (runs / cells["MeanTeacher from SimCLR"] / "init").exists()  # the SimCLR cell's run was reused
    assert [row["protocol"] for row in rows if row["method"] == "Probe on SimCLR"] == ["few_label"]
    assert same_weights(runs / cells["Probe on SimCLR"] / "backbone.pt", pretrained)

    # the self-training cell first: it pretrains SimCLR under its own folder, seed 0 as the cell
    suite |= {"name": "first", "entries": [teacher, simclr], "workdir": str(tmp_path / "other")}
    path.write_text(yaml.safe_dump(suite))
    run_main("--config", str(path))
    (row,) = [row for row in ResultStore(suite["store"]).rows("first") if row["method"] == "MeanTeacher from SimCLR"]
    own = tmp_path / "other" / "first" / row["cell"]
    assert (own / "init" / "backbone.pt").is_file() and (own / "init" / "checkpoints" / "last.ckpt").is_file()
    assert same_weights(own / "backbone.pt", own / "init" / "backbone.pt")

    # the pretraining entry shapes the self-training cell's key; a name that fits no entry is an error
    from ssl_kit.bench.runner import Entry, init_entry

    entries = [Entry(**simclr), Entry(**teacher)]
    changed = Entry(**{**simclr, "args": ["--model.lr", "0.1"]})
    key = Cell("s", entries[1], 0, {}, tmp_path, init=init_entry(entries[1], entries)).key
    assert Cell("s", entries[1], 0, {}, tmp_path, init=changed).key != key
    loaded = Entry(**{**simclr, "checkpoint": str(pretrained)})  # a checkpoint entry: its file, nothing trained
    assert Cell("s", entries[1], 0, {}, tmp_path, init=loaded).initial_backbone() == pretrained
    with pytest.raises(ValueError, match=r"init_from 'MoCoV3' must name exactly one entry of dataset 'Digits'.*\['SimCLR'\]"):
        init_entry(Entry(**{**teacher, "init_from": "MoCoV3"}), entries)


def test_init_dataset_starts_self_training_from_another_datasets_pretraining(tmp_path):
    """One pretraining feeds every label count: with ``init_dataset`` an entry starts from the named
    method's cell on that dataset (same seed), so its key is that cell's; without it, the stored keys
    are unchanged, and an ``init_dataset`` that names no entry of the method, or comes without
    ``init_from``, is an error that names it."""
    from ssl_kit.bench.runner import Entry, cell_key, init_entry

    config = str(REPO / "configs" / "mean_teacher_digits.yaml")
    simclr = Entry("SimCLR", "Digits (4 labels)", str(REPO / "configs" / "simclr_digits.yaml"))
    few = Entry("FixMatch from SimCLR", "Digits (4 labels)", config, init_from="SimCLR")
    more = Entry("FixMatch from SimCLR", "Digits (25 labels)", config, ["--data.labels_per_class", "25"], init_from="SimCLR", init_dataset="Digits (4 labels)")
    entries = [simclr, few, more]
    assert init_entry(more, entries) is simclr and init_entry(few, entries) is simclr
    pretraining = Cell("s", simclr, 1, {}, tmp_path)
    assert Cell("s", more, 1, {}, tmp_path, init=init_entry(more, entries)).init.key == pretraining.key
    assert Cell("s", more, 1, {}, tmp_path, init=init_entry(more, entries)).init.root == pretraining.root
    # the field stays out of the keys of entries that do not set it: this key was computed before it existed
    stored = Entry("FixMatch from SimCLR", "Digits (4 labels)", "configs/mean_teacher_digits.yaml", init_from="SimCLR")
    assert cell_key("s", stored, 0, {}, init_key="0123456789abcdef") == "ff6f441c65e319fd"
    with pytest.raises(ValueError, match=r"init_from 'SimCLR' must name exactly one entry of dataset 'Digits \(400 labels\)'"):
        init_entry(Entry(**{**vars(more), "init_dataset": "Digits (400 labels)"}), entries)
    with pytest.raises(ValueError, match=r"init_dataset 'Digits \(4 labels\)' needs an init_from"):
        init_entry(Entry(**{**vars(more), "init_from": None}), entries)


def test_data_seed_arg_draws_a_labeled_set_per_seed(tmp_path):
    """USB's seeds draw new labeled sets: with ``data_seed_arg`` each cell's seed reaches the
    DataModule, so seeds 0 and 1 train on different labeled images (seed 0's the same as the
    fixed split's); without it every seed shares the fixed split, and stored keys are unchanged."""
    from ssl_kit.bench.runner import Entry, cell_key
    from ssl_kit.cli import SSLCLI

    config = str(REPO / "configs" / "mean_teacher_digits.yaml")
    fixed = Entry("FixMatch", "Digits (4 labels)", config, ["--data.labels_per_class", "4"])
    drawn = Entry(**{**vars(fixed), "data_seed_arg": "--data.seed"})

    def labeled(entry: Entry, seed: int) -> list[int]:
        cli = SSLCLI(args=Cell("s", entry, seed, {}, tmp_path).fit_args(), run=False)
        cli.datamodule.setup("fit")
        return cli.datamodule.few_label.labeled.tolist()

    drawn_on_seed_1 = labeled(drawn, 1)
    assert labeled(fixed, 0) == labeled(fixed, 1) == labeled(drawn, 0) != drawn_on_seed_1
    assert len(drawn_on_seed_1) == 4 * 10
    stored = Entry("FixMatch", "Digits (4 labels)", "configs/mean_teacher_digits.yaml")
    assert cell_key("s", stored, 0, {}) == "af6f41a08752a1fc"  # computed before the field existed
    assert cell_key("s", drawn, 0, {}) != cell_key("s", fixed, 0, {})


def wait_for(condition, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise TimeoutError("condition not met in time")


@pytest.mark.slow
def test_killed_suite_resumes_without_redoing_finished_cells(tmp_path):
    path, suite = suite_file(tmp_path, seeds=[0, 1], epochs=3, protocols={"knn": {"k": 5}})
    suite["entries"] = suite["entries"][:1]  # SimCLR, 2 seeds: 2 cells of 3 epochs
    path.write_text(yaml.safe_dump(suite))
    store = ResultStore(suite["store"])
    command = [sys.executable, "-m", "ssl_kit.bench", "--config", str(path)]
    # The log goes to a file, not a pipe: nobody reads a pipe while the suite runs, and a full one
    # would block the suite's next write for ever (and this test's wait on it with it).
    log = tmp_path / "killed_run.log"
    with log.open("w") as stderr:
        process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr, text=True)
    try:
        wait_for(lambda: len(store.finished_cells("tiny")) == 1, 300)
        finished = store.finished_cells("tiny")
        # kill during the second cell, once it has saved an epoch
        wait_for(lambda: any((tmp_path / "runs" / "tiny").glob("*/checkpoints/last.ckpt")) and len(
            [p for p in (tmp_path / "runs" / "tiny").glob("*/checkpoints/last.ckpt") if p.parts[-3] not in finished]) == 1, 300)
    except TimeoutError:
        raise AssertionError(f"the suite did not reach the kill point; its log ends:\n{log.read_text()[-3000:]}") from None
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    first_rows = store.rows("tiny")
    assert len(first_rows) == 1
    result = run_command(command, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 finished, 1 to run" in result.stderr and "resuming from" in result.stderr
    rows = store.rows("tiny")
    assert len(rows) == 2 and rows[0]["created_at"] == first_rows[0]["created_at"]  # the finished cell was not redone
    second = next(r for r in rows if r["cell"] not in finished)
    checkpoint = torch.load(tmp_path / "runs" / "tiny" / second["cell"] / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["epoch"] == 2 and checkpoint["global_step"] == 6  # 3 epochs of 2 batches, not more


@pytest.mark.slow
def test_two_processes_on_one_suite_run_and_store_each_cell_once(tmp_path):
    """Two suite processes started together on one store share the cells out through claims:
    each cell runs once and has one row, so the report's seed counts stay true."""
    path, suite = suite_file(tmp_path, seeds=[0, 1, 2], protocols={"knn": {"k": 5}})
    suite["entries"] = suite["entries"][:1]
    path.write_text(yaml.safe_dump(suite))
    command = [sys.executable, "-m", "ssl_kit.bench", "--config", str(path)]
    # logs to files: while one process's log is read, the other's must not fill a pipe and stall it
    paths = [tmp_path / f"process{i}.log" for i in range(2)]
    processes = []
    for log in paths:
        with log.open("w") as stderr:
            processes.append(subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr, text=True))
    try:
        for process in processes:
            process.wait(timeout=600)
    finally:
        for process in processes:
            process.kill()  # no-op for a process that has ended
    logs = [log.read_text() for log in paths]
    assert all(process.returncode == 0 for process in processes), logs[0][-2000:] + logs[1][-2000:]
    rows = ResultStore(suite["store"]).rows("tiny")
    assert sorted(row["seed"] for row in rows) == [0, 1, 2]
    started = [line for text in logs for line in text.splitlines() if ": SimCLR on Digits, seed" in line]
    assert len(started) == 3, started  # no cell ran twice
    assert any("skipped, " in text for text in logs)


DDP_EXTRACT = textwrap.dedent(
    """
    import os, sys, torch
    from ssl_kit.evaluation import extract_splits
    from ssl_kit.data import DigitsDataModule
    from ssl_kit.inputs import InputSpec
    from ssl_kit.models.backbones import create_backbone

    torch.manual_seed(0)
    backbone = create_backbone("resnet18", InputSpec.image(8))
    data = DigitsDataModule(image_size=8, batch_size=16, num_workers=0)
    data.setup()
    devices = int(sys.argv[2])
    strategy = "ddp" if devices > 1 else "auto"
    features = extract_splits(backbone, data, ["val", "test"], {"accelerator": "cpu", "devices": devices, "strategy": strategy})
    rank = int(os.environ.get("LOCAL_RANK", 0))
    torch.save(features, os.path.join(sys.argv[1], f"devices{devices}_rank{rank}.pt"))
    """
)


@pytest.mark.slow
def test_feature_extraction_on_two_gloo_processes_equals_one_process(tmp_path):
    script = tmp_path / "extract.py"
    script.write_text(DDP_EXTRACT)
    for devices in (1, 2):
        result = run_command([sys.executable, str(script), str(tmp_path), str(devices)], cwd=REPO, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    single = torch.load(tmp_path / "devices1_rank0.pt", weights_only=False)
    for rank in (0, 1):
        ranked = torch.load(tmp_path / f"devices2_rank{rank}.pt", weights_only=False)
        for split in ("val", "test"):
            assert len(ranked[split].labels) == len(single[split].labels)  # 287 and 359: odd, so the sampler pads; the padding is dropped
            assert torch.equal(ranked[split].labels, single[split].labels)
            assert torch.allclose(ranked[split].features, single[split].features, atol=1e-5)


@pytest.mark.slow
def test_lightly_reference_entry_and_time_to_accuracy_curve(tmp_path):
    """A ``pipeline: lightly`` entry trains lightly's documented SimCLR on the config's backbone and
    data and is evaluated by the same protocols; ``knn_curve`` evaluates the snapshots taken during
    pretraining (test kNN against a training bank), and the report plots them against time."""
    from ssl_kit.bench.snapshots import saved_snapshots

    suite = {
        "name": "curve", "seeds": [0], "store": str(tmp_path / "store.sqlite"), "workdir": str(tmp_path / "runs"),
        "protocols": {"knn": {"k": 5}, "knn_curve": {"every_seconds": 0.001, "bank": 100, "k": 5}},
        "dataset_args": {"Digits": TINY_ARGS},
        "entries": [
            {"method": "SimCLR", "dataset": "Digits", "config": str(REPO / "configs" / "simclr_digits.yaml")},
            {"method": "lightly SimCLR", "dataset": "Digits", "config": str(REPO / "configs" / "simclr_digits.yaml"),
             "pipeline": "lightly", "reference": "SimCLR", "seeds": [3]},
        ],
    }  # fmt: skip
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    run_main("--config", str(path), "--report", str(tmp_path / "report"))
    rows = ResultStore(suite["store"]).rows("curve")
    by_method = {m: [r for r in rows if r["method"] == m] for m in ("SimCLR", "lightly SimCLR")}
    assert {r["seed"] for r in by_method["lightly SimCLR"]} == {3} and {r["seed"] for r in by_method["SimCLR"]} == {0}
    for method, method_rows in by_method.items():
        curve = [r for r in method_rows if r["protocol"] == "knn_curve"]
        cell = method_rows[0]["cell"]
        snapshots = saved_snapshots(tmp_path / "runs" / "curve" / cell / "snapshots")
        assert len(curve) == len(snapshots) >= 2, method  # one point per snapshot: after each step, and at the end
        assert {r["metric"] for r in curve} == {f"top1@{seconds:g}s" for seconds, _ in snapshots}
        assert all(0.0 <= r["value"] <= 1.0 for r in curve)
    lightly_row = next(r for r in by_method["lightly SimCLR"] if r["protocol"] == "knn")
    assert lightly_row["config"]["pipeline"] == "lightly" and lightly_row["backbone"] == "resnet18"
    # lightly's network really trained: its final snapshot differs from its first
    cell = lightly_row["cell"]
    (_, first), *_, (_, last) = saved_snapshots(tmp_path / "runs" / "curve" / cell / "snapshots")
    first, last = torch.load(first, weights_only=True), torch.load(last, weights_only=True)
    assert any(not torch.equal(first[k], last[k]) for k in first if first[k].is_floating_point())
    report = (tmp_path / "report" / "leaderboard.md").read_text()
    assert "lightly SimCLR" in report and "![Digits](digits.png)" in report
    with Image.open(tmp_path / "report" / "digits.png") as figure:
        assert figure.width >= 1200  # two panels: the gains and the curves beside them
    assert "knn_curve" not in report  # the curve is plotted, not tabled


@pytest.mark.slow
def test_gpu_reference_script_runs_in_smoke_mode_and_reports_every_run(tmp_path):
    """benchmarks/gpu_reference.sh --smoke: the GPU check's four runs (ssl_kit and lightly, SimCLR and
    Barlow Twins) on a generated JPEG folder on the CPU, and its table of pairs/s and kNN."""
    result = run_command(
        ["bash", str(REPO / "benchmarks" / "gpu_reference.sh"), "--smoke"], timeout=900, env={**__import__("os").environ, "PYTHON": sys.executable}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    table = [line for line in result.stdout.splitlines() if line.startswith("| ") and not line.startswith("| run")]
    assert sorted(line.split(" | ")[0].strip("| ") for line in table) == ["BarlowTwins", "SimCLR", "lightly BarlowTwins", "lightly SimCLR"]
    for line in table:
        pairs, knn = (float(cell) for cell in line.split(" | ")[1:3])
        assert pairs > 0 and 0.0 <= knn <= 100.0


@pytest.mark.slow
def test_a_resumed_cell_counts_only_its_own_steps_in_its_throughput(tmp_path):
    """Pretraining throughput is this process's steps over this process's time: a cell resumed from
    a finished run trains no more steps, so it has no throughput (it divided all 4 steps by the
    resumed run's second before)."""
    from ssl_kit.bench.runner import Entry

    entry = Entry(method="SimCLR", dataset="Digits", config=str(REPO / "configs" / "simclr_digits.yaml"), args=[*TINY_ARGS, "--trainer.max_epochs", "2"])
    cell = Cell("tiny", entry, 0, {"knn": {"k": 5}}, tmp_path)
    first = cell.pretrain()[2]
    assert first is not None and first > 0
    assert cell.pretrain()[2] is None


@pytest.mark.parametrize(
    "method, backbone",
    [("BYOL", "resnet18"), ("VICReg", "resnet18"), ("DINO", "resnet18"), ("DINO", "vit_tiny_patch16_224"), ("IJEPA", "vit_tiny_patch16_224")],
)
def test_lightly_reference_pipelines_train_a_step_on_the_given_backbone(method, backbone):
    """Each lightly pipeline takes the cell's backbone and its own transform's views (DINO: two global
    crops and smaller local ones, through a ViT too; I-JEPA: one view, batched by lightly's mask
    collator) and trains it: a finite loss whose gradient reaches the backbone, and the network it
    hands back for evaluation is that backbone."""
    from ssl_kit.bench.lightly_reference import reference_pipeline
    from ssl_kit.inputs import InputSpec
    from ssl_kit.models.backbones import backbone_spec, build_from_spec

    torch.manual_seed(0)
    kwargs = {"patch_size": 4, "depth": 1} if backbone.startswith("vit") else None
    network = build_from_spec(backbone_spec(backbone, InputSpec.image(16), None, kwargs, False))
    module, transform, evaluated = reference_pipeline(method, network, 16)
    assert evaluated is network
    images = [Image.fromarray((torch.rand(16, 16, 3) * 255).byte().numpy()) for _ in range(4)]
    per_image = [transform(image) for image in images]
    if hasattr(module, "collate"):  # I-JEPA: (images, labels), context blocks, target blocks
        batch = module.collate([(sample, 0) for sample in per_image])
        (batched, _), context, targets = batch
        assert batched.shape == (4, 3, 16, 16) and len(context) == 1 and len(targets) == 2
    else:
        views = [torch.stack([sample[i] for sample in per_image]) for i in range(len(per_image[0]))]
        batch = (views, torch.zeros(4))
        if method == "DINO":
            assert len(views) == 8 and views[2].shape[-1] < views[0].shape[-1]
    module.trainer = None  # no Trainer: training_step's self.log and current_epoch stay quiet
    loss = module.training_step(batch, 0)
    loss.backward()
    assert torch.isfinite(loss)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in network.parameters())
    if method == "IJEPA":
        assert all(p.grad is None for p in module.target_encoder.parameters())
