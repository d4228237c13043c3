"""The suite runner: every entry (a method's ``ssl_kit.fit`` config on one dataset) x seed is a
cell; a cell pretrains (or loads a checkpoint), extracts frozen features once and runs the
protocols on them, then writes its rows to the results store in one transaction.

Rules that make the numbers trustworthy: the final checkpoint is evaluated (never the best on
test); the data splits are fixed (the DataModule's own seed is not varied, only the run's
``seed_everything``); hyper-parameters of the probes are chosen on the validation split; every
cell records its resolved config. Resumable: finished cells (in the store) are skipped, and a
cell interrupted during pretraining resumes from its ``last.ckpt``. Several processes may run one
suite on one store: each claims a cell in the store before running it (``ResultStore.claim``), so
they share the cells out and no cell runs or is stored twice.

Under DDP (``--trainer.strategy ddp`` in an entry's args, or torchrun / SLURM) every rank runs
the same cells in the same order; pretraining and feature extraction use all ranks, and rank
zero writes the store.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from statistics import fmean
from typing import Any, Literal

import lightning as L
from lightning.pytorch.utilities import rank_zero_only
from torch import nn
from torch.utils.data import DataLoader

from ssl_kit import evaluation as P
from ssl_kit.evaluation import extract_datasets, extract_splits
from ssl_kit.bench.lightly_reference import reference_pipeline
from ssl_kit.bench.report import write_report
from ssl_kit.bench.report.summary import DIAGNOSTIC, RANDOM_INIT
from ssl_kit.bench.snapshots import Snapshots, snapshot_networks
from ssl_kit.bench.store import CLAIM_LEASE_S, Result, ResultStore
from ssl_kit.cli import SSLCLI
from ssl_kit.data.datasets import Transformed, labels_of
from ssl_kit.checkpoints import read_checkpoint, resume_checkpoint
from ssl_kit.data.splits import stratified_split
from ssl_kit.models.saved import export_backbone
from ssl_kit.semi import MeanTeacher

log = logging.getLogger(__name__)

DEFAULT_STORE = "benchmarks/results/bench.sqlite"
#: Trainer settings that feature extraction and fine-tuning share with the pretraining run.
SHARED_TRAINER_KEYS = ("accelerator", "devices", "num_nodes", "strategy", "precision")
#: The network a trained cell delivers, in its folder (``export_backbone``'s state dict and spec).
BACKBONE_FILE = "backbone.pt"
#: What a self-training cell stores beside its accuracy, from its run's CSV log (``metric`` ->
#: logged column): the share of the unlabeled batch its criterion kept (SoftMatch: the mean weight)
#: and how often those pseudo-labels were right (against the pool's hidden labels, never test's),
#: averaged over the last ``LATE_FRACTION`` of training: why a criterion helps or does not.
SELF_TRAINING_DIAGNOSTICS = {"mask_rate": "train/mask_rate", "pseudo_label_acc": "train/pseudo_label_acc"}
LATE_FRACTION = 0.2


@dataclass
class Entry:
    """One row group of the leaderboard: ``method`` on ``dataset``, pretrained by ``python -m
    ssl_kit.fit --config <config> <args...>`` (or loaded from ``checkpoint``, an ssl_kit
    ``.ckpt`` of the same config). ``protocols`` narrows the suite's protocols for this entry,
    ``seeds`` its seeds. ``pipeline: lightly`` trains lightly's documented pipeline of ``reference``
    (a method name; see ``ssl_kit.bench.lightly_reference``) instead, on the config's backbone,
    data and Trainer budget.

    ``folds``: cross-validation. The entry runs once per fold and seed, with ``<fold_arg> <fold>``
    after its args (``--data.fold K``: ESC-50 and fold-numbered AudioFolders; FSDD's speakers:
    ``fold_arg: --data.test_speaker`` with ``--data.split speaker``), so that fold is the test split
    of its DataModule and pretraining and probes train on the others; each fold's rows carry it, and
    the report gives the mean ± std over folds.

    ``init_from``: pretrain -> self-train. The method of another entry on the same dataset whose
    pretrained backbone (same seed and fold) starts this entry's run (``--model.init_from``; a
    ``MeanTeacher`` entry's student and teacher; with ``--trainer.max_epochs 0``, the entry scores
    that backbone's features as they are). That entry's cell leaves its final backbone in its
    folder (``BACKBONE_FILE``); where it has not run on this machine, this cell runs its pretraining
    first, in a folder of its own. ``init_dataset``: the named entry's dataset, where it is not this
    entry's (one pretraining feeds the self-training of every label count: the label count does not
    change a self-supervised run).

    ``data_seed_arg``: an argument (``--data.seed``) that gets the cell's seed too, so each seed
    also draws its own DataModule splits: a self-training entry's labeled set, as USB's seeds do.
    Unset, the splits are the DataModule's fixed ones and the seed varies only the initialisation,
    the batches and the augmentations."""

    method: str
    dataset: str
    config: str
    args: list[str] = field(default_factory=list)
    checkpoint: str | None = None
    protocols: list[str] | None = None
    seeds: list[int] | None = None
    pipeline: Literal["ssl_kit", "lightly"] = "ssl_kit"
    reference: str | None = None
    folds: list[int | str] | None = None
    fold_arg: str = "--data.fold"
    init_from: str | None = None
    init_dataset: str | None = None
    data_seed_arg: str | None = None


#: Entry fields added after stores were written: at these values they stay out of a cell's key, so
#: stored cells keep theirs (``seeds`` and ``folds`` never enter: the cell's own seed and fold do).
LATER_FIELDS = {"pipeline": "ssl_kit", "reference": None, "fold_arg": "--data.fold", "init_from": None, "init_dataset": None, "data_seed_arg": None}
#: Protocol settings added after stores were written, at the value every earlier row had: written
#: out in a suite, they stay out of its cells' keys too (``few_label``'s choice on the whole val split).
LATER_PROTOCOL_SETTINGS = {"few_label": {"selection": "val"}}


def cell_key(
    suite: str, entry: Entry, seed: int, protocols: dict[str, dict[str, Any]], fold: int | str | None = None, init_key: str | None = None
) -> str:
    """Stable id of a cell: changes whenever anything that shapes its numbers changes (for an
    ``init_from`` entry, ``init_key``: the key of the cell it starts from)."""
    fields_ = {k: v for k, v in asdict(entry).items() if k not in ("seeds", "folds") and not (k in LATER_FIELDS and v == LATER_FIELDS[k])}
    keyed = {
        name: {k: v for k, v in settings.items() if (k, v) not in LATER_PROTOCOL_SETTINGS.get(name, {}).items()}
        for name, settings in protocols.items()
    }
    cell = {"suite": suite, "entry": fields_, "seed": seed, "protocols": keyed} | ({"fold": fold} if fold is not None else {})
    cell |= {"init": init_key} if init_key is not None else {}
    payload = json.dumps(cell, sort_keys=True)
    return hashlib.sha1(payload.encode()).hexdigest()[:16]


def backbone_label(name: str, kwargs: dict[str, Any] | None) -> str:
    """The backbone as the report shows it: timm's name and the keyword arguments that change the
    network (``vit_tiny_patch16_224 depth=4 patch_size=4``), so two variants never pool as seeds."""
    return " ".join([name, *(f"{key}={json.dumps(value).replace(' ', '')}" for key, value in sorted((kwargs or {}).items()))])


def jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


class Cell:
    """One entry x seed (x fold): pretrain (or load), extract, evaluate; returns the store rows."""

    def __init__(
        self, suite: str, entry: Entry, seed: int, protocols: dict[str, dict[str, Any]], root: Path, fold: int | str | None = None,
        init: Entry | None = None,
    ) -> None:  # fmt: skip
        self.suite, self.entry, self.seed, self.protocols, self.fold = suite, entry, seed, protocols, fold
        # the init_from entry's cell of the same seed and fold, whose backbone this one starts from
        self.init = Cell(suite, init, seed, protocols, root, fold) if init is not None else None
        self.key = cell_key(suite, entry, seed, protocols, fold, self.init.key if self.init is not None else None)
        self.root = root / suite / self.key

    def __str__(self) -> str:
        return f"{self.entry.method} on {self.entry.dataset}, seed {self.seed}" + (f", fold {self.fold}" if self.fold is not None else "")

    def fit_args(self, init_from: Path | None = None) -> list[str]:
        return [
            "--config", self.entry.config, *self.entry.args, *([self.entry.fold_arg, str(self.fold)] if self.fold is not None else []),
            *(["--model.init_from", str(init_from)] if init_from is not None else []),
            *([self.entry.data_seed_arg, str(self.seed)] if self.entry.data_seed_arg is not None else []),
            "--seed_everything", str(self.seed), "--trainer.default_root_dir", str(self.root),
        ]  # fmt: skip

    def initial_backbone(self) -> Path:
        """The ``init_from`` entry's final backbone: its checkpoint, its cell's, or pretrained now
        under this cell."""
        if self.init.entry.checkpoint is not None:
            return Path(self.init.entry.checkpoint)
        finished = self.init.root / BACKBONE_FILE
        if finished.is_file():
            return finished
        own = Cell(self.suite, self.init.entry, self.seed, {}, self.root, self.fold)  # {}: no snapshots; its folder is set next
        own.root = self.root / "init"
        log.warning("cell %s (%s): pretraining %s first, in %s", self.key, self, own.entry.method, own.root)
        own.pretrain()
        return own.root / BACKBONE_FILE

    def pretrain(self) -> tuple[SSLCLI, nn.Module, float | None]:
        """The run (its DataModule, model and config), the trained network to evaluate (also left in
        the cell's folder as ``BACKBONE_FILE``), and its pretraining samples/s (None: no training
        steps, e.g. random init)."""
        cli = SSLCLI(args=self.fit_args(self.initial_backbone() if self.init is not None else None), run=False)
        if self.entry.checkpoint is not None:
            state = read_checkpoint(self.entry.checkpoint)["state_dict"]
            cli.model.load_state_dict(state)
            return cli, evaluated_network(cli.model), None
        module, network, loader = self.training_run(cli)
        if "knn_curve" in self.wanted():
            every = self.protocols["knn_curve"].get("every_seconds", 60)
            cli.trainer.callbacks.append(Snapshots(self.root / "snapshots", network, every))
        last = resume_checkpoint(self.root / "checkpoints")
        done_before = read_checkpoint(last)["global_step"] if last is not None else 0
        if last is not None:
            log.warning("cell %s (%s): resuming from %s", self.key, self, last)
        start = time.perf_counter()
        data = cli.datamodule if loader is None else None
        cli.trainer.fit(module, datamodule=data, train_dataloaders=loader, ckpt_path=last)
        seconds = time.perf_counter() - start
        if cli.trainer.interrupted:
            raise RuntimeError(f"cell {self.key}: pretraining was interrupted; re-run the suite to resume from {self.root / 'checkpoints'}")
        if cli.trainer.is_global_zero:
            export_backbone(network.state_dict(), cli.model.backbone_spec, self.root / BACKBONE_FILE)  # whole, or not there
        cli.trainer.strategy.barrier("backbone saved")  # a self-training cell on every rank reads it next
        samples = (cli.trainer.global_step - done_before) * cli.datamodule.batch_size * cli.trainer.world_size  # this process's steps
        return cli, network, samples / seconds if samples and seconds > 0 else None

    def training_run(self, cli: SSLCLI) -> tuple[L.LightningModule, nn.Module, DataLoader | None]:
        """What to fit, the network it trains, and its own loader (None: the DataModule's)."""
        if self.entry.pipeline == "ssl_kit":
            return cli.model, evaluated_network(cli.model), None
        data = cli.datamodule
        data.setup("fit")
        module, transform, network = reference_pipeline(self.entry.reference or self.entry.method, cli.model.backbone, data.input_spec.side)
        dataset = Transformed(data.splits.pretrain, transform)
        return module, network, data.loader(dataset, shuffle=True, drop_last=True, collate=getattr(module, "collate", None))

    def wanted(self) -> list[str]:
        wanted = self.entry.protocols or list(self.protocols)
        unknown = sorted(set(wanted) - KNOWN_PROTOCOLS)
        if unknown:
            raise ValueError(f"unknown protocol(s) {unknown} in suite {self.suite}; known: {sorted(KNOWN_PROTOCOLS)}")
        return wanted

    def run(self) -> list[Result]:
        start = time.perf_counter()
        cli, network, throughput = self.pretrain()
        config = cli.config["fit"] if "fit" in cli.config else cli.config  # the fit subcommand's, or run=False's
        trainer_kwargs = {key: config["trainer"][key] for key in SHARED_TRAINER_KEYS if config["trainer"].get(key) is not None}
        values, chosen = self.evaluate(cli, network, trainer_kwargs)
        resolved = jsonable(config.as_dict())
        model, wall_time = cli.model, time.perf_counter() - start
        epochs = None if self.entry.checkpoint else float(cli.trainer.current_epoch)
        return [
            Result(
                suite=self.suite, cell=self.key, method=self.entry.method, dataset=self.entry.dataset,
                backbone=backbone_label(model.hparams.backbone, model.hparams.get("backbone_kwargs")), protocol=protocol, metric=metric, value=value, seed=self.seed,
                config={"fit": resolved, "pipeline": self.entry.pipeline, "protocol": {**self.protocols.get(protocol, {}), **chosen.get(protocol, {})}},
                wall_time_s=wall_time, throughput=throughput, epochs=epochs, fold=None if self.fold is None else str(self.fold),
            )  # fmt: skip
            for (protocol, metric), value in values.items()
        ]

    def evaluate(self, cli: SSLCLI, network: nn.Module, trainer_kwargs: dict[str, Any]) -> tuple[dict[tuple[str, str], float], dict[str, dict]]:
        """``(protocol, metric) -> value``, and the hyper-parameters each probe chose on validation."""
        model, data = cli.model, cli.datamodule
        wanted = self.wanted()
        self_training = isinstance(model, MeanTeacher)
        values: dict[tuple[str, str], float] = {}
        chosen: dict[str, dict] = {}
        if self_training and "few_label" in wanted:
            # Self-training is itself the few-label protocol: the teacher's test accuracy, trained
            # on the DataModule's class-balanced split (the split few_label probes use).
            (metrics,) = cli.trainer.test(model, datamodule=data, verbose=False)
            values["few_label", "top1"] = float(metrics["test/acc"])
            late = late_means(self.root / "csv", SELF_TRAINING_DIAGNOSTICS)
            values |= {(DIAGNOSTIC, metric): value for metric, value in late.items()}
        frozen = [p for p in wanted if p in FROZEN_FEATURE_PROTOCOLS and not (self_training and p == "few_label")]
        extracted: dict[Any, dict[str, P.FeatureSet]] = {}  # by what reads them: the network itself (None), or PROTOCOL_FEATURES'
        for protocol in frozen:
            reader = PROTOCOL_FEATURES.get(protocol)
            if reader not in extracted:
                extracted[reader] = extract_splits(network if reader is None else reader(network), data, ["train", "val", "test"], trainer_kwargs)
            features = extracted[reader]
            value, choice = FROZEN_FEATURE_PROTOCOLS[protocol](features, data, self.seed, **self.protocols.get(protocol, {}))
            values[protocol, features["test"].metric], chosen[protocol] = value, choice  # top1, or mAP on multi-label data
        if "fine_tune" in wanted:
            values["fine_tune", "top1"] = P.fine_tune(
                network, data, data.num_classes, seed=self.seed, trainer_kwargs=trainer_kwargs, **self.protocols.get("fine_tune", {})
            )
        if "knn_curve" in wanted:
            for seconds, value in knn_curve(network, data, self.root / "snapshots", trainer_kwargs, **self.protocols["knn_curve"]).items():
                values["knn_curve", f"top1@{seconds:g}s"] = value
        if "segmentation" in wanted:
            result = P.linear_segmentation(network, data.input_spec, seed=self.seed, **self.protocols.get("segmentation", {}))
            values["segmentation", "miou"], chosen["segmentation"] = result.test_miou, result.chosen
        return values, chosen


def late_means(log_root: Path, columns: dict[str, str], fraction: float = LATE_FRACTION) -> dict[str, float]:
    """``name -> mean`` of each logged ``columns[name]`` over the steps in the last ``fraction``
    of the last logged step, from a run's CSV logs under ``log_root`` (``version_*/metrics.csv``: a
    resumed run logs into a new version, whose rows replace the older ones' of the same step).
    Columns the run never logged are left out (a run without the CSV logger gives ``{}``)."""
    by_step: dict[int, dict[str, float]] = {}
    versions = sorted(log_root.glob("version_*/metrics.csv"), key=lambda path: int(path.parent.name.removeprefix("version_")))
    for path in versions:
        in_version: dict[int, dict[str, float]] = {}
        with path.open(newline="") as file:
            for row in csv.DictReader(file):
                logged = {name: float(row[column]) for name, column in columns.items() if row.get(column)}
                if logged:
                    in_version.setdefault(int(row["step"]), {}).update(logged)
        by_step |= in_version
    if not by_step:
        return {}
    start = max(by_step) * (1 - fraction)
    late = [values for step, values in by_step.items() if step >= start]
    return {name: fmean(v[name] for v in late if name in v) for name in columns if any(name in v for v in late)}


def evaluated_network(model: L.LightningModule) -> nn.Module:
    """The network a method delivers: a self-training run's teacher, a pretraining run's backbone."""
    return model.teacher_backbone if isinstance(model, MeanTeacher) else model.backbone


def knn_curve(
    network: nn.Module, data, folder: Path, trainer_kwargs: dict[str, Any], every_seconds: float = 60,
    bank: int = 5000, k: int = 20, temperature: float = 0.07,
) -> dict[float, float]:  # fmt: skip
    """Test kNN top-1 of every snapshot (``Snapshots``) against a fixed, stratified bank of
    ``bank`` training samples (seeded by the DataModule's seed): accuracy against training time."""
    train = data.labeled_dataset("train")
    labels = labels_of(train)
    indices = stratified_split(labels, bank / len(labels), data.seed)[1] if bank < len(labels) else None
    datasets = {"bank": Transformed(train, indices=indices), "test": data.labeled_dataset("test")}
    curve = {}
    for seconds, snapshot in snapshot_networks(network, folder):
        features = extract_datasets(snapshot, data, datasets, trainer_kwargs, views={"test": data.test_views})
        curve[seconds] = P.knn(features["bank"], features["test"], data.num_classes, k, temperature)
    return curve


def _linear(features, data, seed: int, **settings) -> tuple[float, dict]:
    result = P.linear_probe(features["train"], features["val"], features["test"], data.num_classes, seed=seed, **settings)
    return result.test_top1, result.chosen


def _knn(features, data, seed: int, **settings) -> tuple[float, dict]:
    return P.knn(features["train"], features["test"], data.num_classes, **settings), {}


def _few_label(features, data, seed: int, **settings) -> tuple[float, dict]:
    """The split is drawn with the DataModule's seed, not the run's: fixed across seeds, and the
    very split a ``MeanTeacher`` run on the same data trains on."""
    result = P.few_label(features["train"], features["val"], features["test"], data.num_classes, seed=data.seed, **settings)
    return result.test_top1, result.chosen


FROZEN_FEATURE_PROTOCOLS = {"linear": _linear, "knn": _knn, "few_label": _few_label, "layer_weighted_linear": _linear}
#: Protocols on other features than the network's output: the wrapper that reads them (the linear
#: probe on every block's features is the weighted-layer probe).
PROTOCOL_FEATURES = {"layer_weighted_linear": P.BlockFeatures}
KNOWN_PROTOCOLS = {*FROZEN_FEATURE_PROTOCOLS, "fine_tune", "knn_curve", "segmentation"}


def run_suite(
    name: str,
    entries: list[Entry],
    seeds: list[int] = [0, 1, 2],
    protocols: dict[str, dict[str, Any]] = {"linear": {}, "knn": {}},
    dataset_args: dict[str, list[str]] = {},
    store: str = DEFAULT_STORE,
    workdir: str = "runs/bench",
    report: str | None = None,
    description: str = "",
    reference: str = RANDOM_INIT,
) -> int:
    """Runs every unfinished cell of the suite (entries x seeds) that no other process is running;
    returns how many this process ran.

    Args:
        name: the suite's name in the store (finished cells are looked up under it).
        entries: method x dataset runs (``Entry``: method, dataset, config, args, checkpoint, protocols).
        seeds: a cell per seed (``seed_everything``; an entry's ``seeds`` win); the data splits stay fixed.
            An entry with ``folds`` has a cell per seed and fold (cross-validation; see ``Entry``).
        protocols: protocol name -> settings: ``linear``, ``knn``, ``few_label`` (``selection``:
            ``val``, ``few_val`` or ``cross_val``, see ``evaluation.few_label``) on frozen features,
            ``layer_weighted_linear`` (the linear probe on every transformer block's features with
            learned softmax layer weights), ``fine_tune`` with training (see ``ssl_kit.evaluation``), ``knn_curve``
            (test kNN of snapshots every ``every_seconds`` of pretraining, ``knn_curve``),
            ``segmentation`` (mIoU of a linear probe on the spatial features of image backbones,
            on the embedded digit scenes; ``evaluation.segmentation.linear_segmentation``).
        dataset_args: ``ssl_kit.fit`` overrides shared by every entry of a dataset (its root,
            subsets, budget), placed before the entry's own ``args``.
        store: the SQLite results store.
        workdir: where each cell's pretraining run (checkpoints, logs) goes.
        report: a folder where the suite's leaderboard (Markdown, HTML, PNG) is rendered at the end.
        description: Markdown shown under the report's title: the budget, the command that made it.
        reference: the method whose rows the report's gains are measured against, per dataset,
            protocol and backbone: random-init features, or a self-training suite's "Supervised only".
    """
    if not re.fullmatch(r"[\w.()+ -]+", name) or name.strip(".") == "":
        raise ValueError(f"suite name {name!r} cannot name a folder under {workdir}: use letters, digits, spaces and . _ - ( ) +")
    results = ResultStore(store)
    finished = results.finished_cells(name)
    entries = [replace(entry, args=[*dataset_args.get(entry.dataset, []), *entry.args]) for entry in entries]
    cells = [
        Cell(name, entry, seed, protocols, Path(workdir), fold, init_entry(entry, entries))
        for entry in entries for seed in (entry.seeds or seeds) for fold in (entry.folds or [None])
    ]  # fmt: skip
    todo = [cell for cell in cells if cell.key not in finished]
    log.warning("suite %s: %d cells, %d finished, %d to run; store %s", name, len(cells), len(cells) - len(todo), len(todo), store)
    ran = 0
    for number, cell in enumerate(todo, 1):
        holder = results.claim(name, cell.key)
        if holder is not None:
            log.warning("cell %d/%d %s: skipped, %s", number, len(todo), cell.key, "finished meanwhile" if holder == "finished" else f"being run by {holder}")
            continue
        log.warning("cell %d/%d %s: %s", number, len(todo), cell.key, cell)
        with _lease(results, name, cell.key):
            rows = cell.run()
        _write(results, rows)
        ran += 1
    if report is not None:
        _render(store, report, name, description, reference)
    return ran


def init_entry(entry: Entry, entries: list[Entry]) -> Entry | None:
    """The entry that ``entry.init_from`` names: the one of that method on ``entry.init_dataset``
    (by default the entry's own dataset)."""
    if entry.init_from is None:
        if entry.init_dataset is not None:
            raise ValueError(f"entry {entry.method} on {entry.dataset}: init_dataset {entry.init_dataset!r} needs an init_from")
        return None
    dataset = entry.init_dataset or entry.dataset
    named = [other for other in entries if other.method == entry.init_from and other.dataset == dataset]
    if len(named) != 1:
        methods = sorted({other.method for other in entries if other.dataset == dataset and other.method != entry.method})
        raise ValueError(
            f"entry {entry.method} on {entry.dataset}: init_from {entry.init_from!r} must name exactly one entry of dataset "
            f"{dataset!r} (found {len(named)}); its methods: {methods}"
        )
    return named[0]


@contextmanager
def _lease(store: ResultStore, suite: str, cell: str) -> Iterator[None]:
    """Renews this process's claim on the cell while it runs; gives it up if the run fails."""
    done = threading.Event()

    def renew() -> None:
        while not done.wait(CLAIM_LEASE_S / 4):
            store.renew(suite, cell)

    renewer = threading.Thread(target=renew, daemon=True)
    renewer.start()
    try:
        yield
    except BaseException:
        store.release(suite, cell)
        raise
    finally:
        done.set()
        renewer.join()


@rank_zero_only
def _render(store: str, out: str, suite: str, description: str, reference: str) -> None:
    for kind, path in write_report(store, out, suite, description, reference).items():
        log.warning("%s: %s", kind, path)


@rank_zero_only
def _write(store: ResultStore, rows: list[Result]) -> None:
    if not store.add(rows):
        log.warning("cell %s: another process stored it first; this run's rows are dropped", rows[0].cell if rows else "?")
