"""Cross-validation in the harness: an entry's ``folds`` make a cell per fold, each passing
``--data.fold K`` to the real CLI and DataModule, so each fold is the test split once and never
pretrained or trained on; rows are stored per fold and the report's mean ± std is over the folds.
Stores written before the ``fold`` column load and summarise as before."""

from __future__ import annotations

import shutil
import sqlite3
from collections import defaultdict
from contextlib import closing
from pathlib import Path
from statistics import fmean, stdev

import pytest
import yaml

from helpers import REPO, TINY_RUN, files_of, write_fold_audio_folder, write_tagged_clips
from ssl_kit.bench.report import summarize
from ssl_kit.bench.report.markdown import markdown
from ssl_kit.bench.report.summary import KEY
from ssl_kit.bench.runner import Cell, Entry, cell_key, run_suite
from ssl_kit.bench.store import Result, ResultStore

PROTOCOLS = {"linear": {"epochs": 5}, "knn": {"k": 3}}
TONES = ["--data.sample_rate", "8000", "--data.clip_seconds", "0.1", "--data.n_mels", "16", "--data.n_fft", "256",
         "--data.batch_size", "2", "--data.val_fraction", "0.25", "--trainer.max_epochs", "1", "--model.warmup_epochs", "0"]  # fmt: skip


def test_a_fold_is_part_of_its_cell_and_passed_to_the_run(tmp_path):
    entry = Entry(method="SimCLR", dataset="Tones", config="c.yaml", args=["--data.root", "x"])
    folded = Entry(**{**vars(entry), "folds": [1, 2]})
    # the list of folds is not part of a key (adding a fold keeps the others'); each cell's own fold is
    assert cell_key("s", folded, 0, PROTOCOLS) == cell_key("s", entry, 0, PROTOCOLS)
    assert len({cell_key("s", folded, 0, PROTOCOLS, fold) for fold in (None, 1, 2)}) == 3
    cell = Cell("s", folded, 0, PROTOCOLS, tmp_path, 2)
    assert cell.fit_args()[:5] == ["--config", "c.yaml", "--data.root", "x", "--data.fold"] and cell.fit_args()[5] == "2"
    speakers = Cell("s", Entry(**{**vars(entry), "folds": ["theo"], "fold_arg": "--data.test_speaker"}), 0, PROTOCOLS, tmp_path, "theo")
    assert ["--data.test_speaker", "theo"] == speakers.fit_args()[4:6] and str(speakers) == "SimCLR on Tones, seed 0, fold theo"


def test_cell_keys_of_entries_without_folds_are_unchanged():
    """The key of a fold-less entry is the one computed before folds existed (a stored cell of the
    committed leaderboard is found again, so a re-run skips it)."""
    rows = ResultStore(REPO / "benchmarks" / "results" / "leaderboard_cpu.sqlite", read_only=True).rows()
    row = next(r for r in rows if r["method"] == "SimCLR" and r["dataset"] == "FSDD")
    suite = yaml.safe_load((REPO / "benchmarks" / "leaderboard_cpu.yaml").read_text())
    raw = next(e for e in suite["entries"] if e["method"] == "SimCLR" and e["dataset"] == "FSDD")
    entry = Entry(**{**raw, "args": [*suite["dataset_args"]["FSDD"], *raw.get("args", [])]})
    assert cell_key(suite["name"], entry, row["seed"], suite["protocols"]) == row["cell"]


def test_stores_without_the_fold_column_load_summarise_as_before_and_take_fold_rows(tmp_path):
    """Rows without a fold (every committed row but the cross-validated ones) summarise per seed
    as before; a store written before the fold column existed reads (fold None) and, opened for
    writing, gains the column and takes fold rows without touching its old rows."""
    for committed in sorted((REPO / "benchmarks" / "results").glob("*.sqlite")):
        rows = [row for row in ResultStore(committed, read_only=True).rows() if row["fold"] is None]
        assert rows
        groups = defaultdict(list)
        for row in rows:
            groups[tuple(row[k] for k in KEY)].append(row["value"])
        for entry in summarize(rows):
            values = groups[tuple(entry[k] for k in KEY)]
            assert entry["folds"] == [] and entry["n"] == len(values) and entry["mean"] == fmean(values)
            assert entry["std"] == (stdev(values) if len(values) > 1 else 0.0)
    old = tmp_path / "old.sqlite"
    shutil.copy(REPO / "benchmarks" / "results" / "leaderboard_cifar10_cpu.sqlite", old)
    with closing(sqlite3.connect(old)) as connection, connection:
        if "fold" in {column[1] for column in connection.execute("PRAGMA table_info(results)")}:
            connection.execute("ALTER TABLE results DROP COLUMN fold")  # the schema before cross-validation
    before = ResultStore(old, read_only=True).rows()
    assert before and all(row["fold"] is None for row in before)
    store = ResultStore(old)  # opened for writing: the column is added
    row = dict(suite="cv", cell="c", method="m", dataset="d", backbone="b", protocol="linear", metric="top1", value=0.5, seed=0, config={}, wall_time_s=1.0)
    assert store.add([Result(**row, fold="3")])
    assert store.rows("cv")[0]["fold"] == "3" and store.rows()[: len(before)] == before


def test_summary_is_over_folds_each_the_mean_of_its_seeds():
    def row(fold, seed, value):
        return dict(dataset="d", protocol="linear", method="m", backbone="b", metric="top1", value=value, seed=seed, fold=fold,
                    wall_time_s=1.0, epochs=1.0, throughput=None)  # fmt: skip

    rows = [row("1", 0, 0.5), row("1", 1, 0.7), row("2", 0, 0.8), row("2", 1, 0.8), row("10", 0, 0.2), row("10", 1, 0.4)]
    (entry,) = summarize(rows)
    assert entry["folds"] == ["1", "2", "10"] and entry["n"] == 2 and entry["seeds"] == [0, 1]
    assert entry["mean"] == pytest.approx(fmean([0.6, 0.8, 0.3])) and entry["std"] == pytest.approx(stdev([0.6, 0.8, 0.3]))
    with pytest.raises(ValueError, match="mix cross-validation folds and a fixed split"):
        summarize([*rows, row(None, 0, 0.5)])


@pytest.mark.slow
def test_cross_validated_entry_tests_each_fold_once_and_reports_the_mean_over_folds(tmp_path, monkeypatch):
    paths = write_fold_audio_folder(tmp_path / "audio")
    seen: dict[str, dict[str, list[str]]] = {}
    evaluate = Cell.evaluate

    def recording(self, cli, network, trainer_kwargs):
        data = cli.datamodule
        seen[str(self.fold)] = {
            "pretrain": files_of(data.train_dataloader().dataset),  # what pretraining was fed
            **{split: files_of(getattr(data.splits, split)) for split in ("train", "val", "test")},
        }
        return evaluate(self, cli, network, trainer_kwargs)

    monkeypatch.setattr(Cell, "evaluate", recording)
    suite = dict(
        name="cv", seeds=[0], protocols=PROTOCOLS, store=str(tmp_path / "store.sqlite"), workdir=str(tmp_path / "runs"),
        entries=[Entry(method="SimCLR", dataset="Tones (3 folds)", config=str(REPO / "configs" / "simclr_audiofolder.yaml"),
                       args=["--data.root", str(tmp_path / "audio"), *TINY_RUN, *TONES], folds=[1, 2, 3])],
    )  # fmt: skip
    assert run_suite(**suite) == 3
    tested = [file for fold in seen.values() for file in fold["test"]]
    assert sorted(tested) == sorted(paths)  # every sample in exactly one test fold
    for fold, splits in seen.items():
        assert all(Path(file).name.startswith(f"{fold}-") for file in splits["test"])
        trained = set(splits["pretrain"]) | set(splits["train"]) | set(splits["val"])
        assert not trained & set(splits["test"]) and trained | set(splits["test"]) == set(paths)
    rows = ResultStore(suite["store"]).rows("cv")
    assert sorted((r["protocol"], r["fold"]) for r in rows) == [(p, f) for p in ("knn", "linear") for f in ("1", "2", "3")]
    assert all(r["config"]["fit"]["data"]["init_args"]["fold"] == int(r["fold"]) for r in rows)
    for entry in summarize(rows):
        values = [r["value"] for r in rows if r["protocol"] == entry["protocol"]]
        assert entry["folds"] == ["1", "2", "3"] and entry["mean"] == pytest.approx(fmean(values))
        assert entry["std"] == pytest.approx(stdev(values))
    text = markdown(rows)
    assert "Mean ± std over 3 folds (each the test split once) of 1 seed, in %." in text
    assert run_suite(**suite) == 0  # finished folds are skipped


@pytest.mark.slow
def test_a_multi_label_entry_is_scored_by_map(tmp_path):
    """A ``--data.labels_csv`` entry pretrains on the multi-hot audio and its frozen-feature rows are
    macro mAP (metric ``mAP``), here on fold 2 of the tagged clips."""
    csv = write_tagged_clips(tmp_path / "audio")
    suite = dict(
        name="tags", seeds=[0], protocols=PROTOCOLS, store=str(tmp_path / "store.sqlite"), workdir=str(tmp_path / "runs"),
        entries=[Entry(method="SimCLR", dataset="Tags", config=str(REPO / "configs" / "simclr_audiofolder.yaml"),
                       args=["--data.root", str(tmp_path / "audio"), "--data.labels_csv", str(csv), *TINY_RUN, *TONES], folds=[2])],
    )  # fmt: skip
    assert run_suite(**suite) == 1
    rows = ResultStore(suite["store"]).rows("tags")
    assert sorted((r["protocol"], r["metric"], r["fold"]) for r in rows) == [("knn", "mAP", "2"), ("linear", "mAP", "2")]
    assert all(0.0 < r["value"] <= 1.0 for r in rows)
