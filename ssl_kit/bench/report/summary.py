"""The store's rows aggregated for the reports: mean ± sample std over seeds per cell, the gain
over the reference row of the same backbone (random-init features, or a suite's own baseline such
as supervised-only), the per-dataset boards (methods x protocols), the time-to-accuracy curves and
the provenance."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from statistics import fmean, stdev

KEY = ("dataset", "protocol", "method", "backbone", "metric")
#: Test kNN of snapshots during pretraining (metric ``top1@<seconds>s``): plotted against time, not tabled.
CURVE = "knn_curve"
#: The method name of suite entries that evaluate a backbone without pretraining: the yardstick
#: every other row of the same backbone is measured against, unless a suite names another
#: (``reference``: a self-training suite's "Supervised only").
RANDOM_INIT = "Random init"
#: Rows that explain a self-training result (mask rate, pseudo-label accuracy), not scores: no gain.
DIAGNOSTIC = "self_training"
PROTOCOL_ORDER = ("linear", "knn", "fine_tune", "few_label")
RULES = (
    "Every number comes from the final checkpoint of its run (no early stopping, no checkpoint picking), "
    "evaluated on fixed splits; choices (hyper-parameters, epochs) are made on validation data, never on "
    "the test set. Cells are the mean ± sample standard deviation (ddof=1, 0 for one seed) over seeds, in %."
)

Column = tuple[str, str]  # (protocol, metric)
Board = tuple[list[Column], list[tuple[str, dict[Column, dict]]]]  # columns, ranked (label, cells)


def summarize(rows: Iterable[dict], reference: str = RANDOM_INIT) -> list[dict]:
    """One entry per (dataset, protocol, method, backbone, metric), aggregated over seeds (or
    cross-validation folds: ``spread``), with its gain over the ``reference`` method (``add_gains``)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[tuple(row[k] for k in KEY)].append(row)
    summary = []
    for key in sorted(groups, key=lambda key: (key[0], protocol_rank(key[1]), *key[1:])):
        group = groups[key]
        summary.append(
            {
                **dict(zip(KEY, key)),
                **spread(group, key),
                **{field: mean_known(row[field] for row in group) for field in ("wall_time_s", "epochs", "throughput")},
            }
        )
    add_gains(summary, reference)
    return summary


def spread(group: list[dict], key: tuple) -> dict:
    """``mean``, ``std``, ``n`` (seeds), ``seeds``, ``folds`` and ``values`` of one group's rows:
    the mean ± sample std over seeds or, for cross-validation rows (``fold`` set), over folds, a
    fold's value being the mean over its seeds (one test fold is one estimate, however many seeds
    ran on it); ``values`` maps each seed (fold) to its value (the mean of a seed's rows, were there
    several), which ``add_gains`` pairs."""
    by_fold: dict[str | None, list[float]] = defaultdict(list)
    by_seed: dict[int, list[float]] = defaultdict(list)
    for row in group:
        by_fold[row.get("fold")].append(row["value"])
        by_seed[row["seed"]].append(row["value"])
    if None in by_fold and len(by_fold) > 1:
        raise ValueError(f"the rows of {key} mix cross-validation folds and a fixed split: give the cross-validated entry its own dataset name")
    folds = sorted((fold for fold in by_fold if fold is not None), key=fold_order)
    values = [fmean(by_fold[fold]) for fold in folds] if folds else by_fold[None]
    paired = dict(zip(folds, values)) if folds else {seed: fmean(seed_values) for seed, seed_values in by_seed.items()}
    seeds = sorted({row["seed"] for row in group}) if folds else sorted(row["seed"] for row in group)
    return {"mean": fmean(values), "std": stdev(values) if len(values) > 1 else 0.0, "n": len(seeds), "seeds": seeds, "folds": folds, "values": paired}


def fold_order(fold: str) -> tuple:
    """Numbered folds in numeric order (2 before 10), then named ones (speakers) by name."""
    return (not fold.isdigit(), int(fold) if fold.isdigit() else 0, fold)


def add_gains(summary: list[dict], reference: str = RANDOM_INIT) -> None:
    """Sets ``reference`` (the method name), ``gain`` and ``gain_std`` (the mean and sample std of
    the entry's value minus the reference's of the same dataset, protocol, metric and backbone,
    seed by seed, over the seeds (folds) both ran: a row of one seed is not measured against a
    three-seed mean) and ``gain_seeds`` (those seeds) on every entry. ``gain`` is None on the
    reference's entries, where the backbone has no reference row (``has_reference`` tells these
    apart; ``dataset_has_reference``: any backbone has one) and where the two share no seed."""
    references = {reference_key(e): e for e in summary if e["method"] == reference}
    datasets_with_reference = {key[0] for key in references}
    for entry in summary:
        found = references.get(reference_key(entry))
        entry["reference"] = reference
        entry["has_reference"] = found is not None
        entry["dataset_has_reference"] = entry["dataset"] in datasets_with_reference
        known = found is not None and not is_reference(entry) and entry["protocol"] != DIAGNOSTIC
        shared = sorted(set(entry["values"]) & set(found["values"])) if known else []  # one type: seeds or folds
        gains = [entry["values"][seed] - found["values"][seed] for seed in shared]
        entry["gain_seeds"] = shared
        entry["gain"] = fmean(gains) if gains else None
        entry["gain_std"] = (stdev(gains) if len(gains) > 1 else 0.0) if gains else None


def is_reference(entry: dict) -> bool:
    return entry["method"] == entry["reference"]


def reference_words(entry: dict) -> tuple[str, str]:
    """How the texts name an entry's reference: ``random init`` and ``random-init`` (``supervised
    only`` and ``supervised-only``)."""
    noun = entry["reference"].lower()
    return noun, noun.replace(" ", "-")


def board_reference_words(ranked: list[tuple[str, dict[Column, dict]]]) -> tuple[str, str]:
    """``reference_words`` of a board (every entry of a summary has the same reference)."""
    return reference_words(next(iter(ranked[0][1].values())))


def reference_key(entry: dict) -> tuple:
    return entry["dataset"], entry["protocol"], entry["metric"], entry["backbone"]


def gain_text(entry: dict) -> str:
    """The gain in points, signed with a true minus (−); empty on the reference's entries and on diagnostics."""
    if is_reference(entry) or entry["protocol"] == DIAGNOSTIC:
        return ""
    if entry["gain"] is None:
        where = "on the same seeds" if entry["has_reference"] else "for this backbone"
        return f"no {reference_words(entry)[1]} row {where}"
    return f"{100 * entry['gain']:+.1f}".replace("-", "−")


def gain_label(entry: dict) -> str:
    """The gain as the pivots show it beside a cell: ``Δ +17.4``; nothing on a dataset without any
    reference row, where the at-a-glance line says so once."""
    if entry["gain"] is not None:
        return f"Δ {gain_text(entry)}"
    return gain_text(entry) if entry["dataset_has_reference"] else ""


def protocol_rank(protocol: str) -> tuple[int, str]:
    """The usual protocols first, in the order of the issue; others after them by name."""
    return (PROTOCOL_ORDER.index(protocol) if protocol in PROTOCOL_ORDER else len(PROTOCOL_ORDER), protocol)


def mean_known(values: Iterable[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return fmean(known) if known else None


def row_label(entry: dict) -> str:
    return f"{entry['method']} ({entry['backbone']})"


def column_of(entry: dict) -> Column:
    return entry["protocol"], entry["metric"]


def column_name(column: Column) -> str:
    return " ".join(column)


def columns_of(entries: Iterable[dict]) -> list[Column]:
    return sorted({column_of(e) for e in entries}, key=lambda column: (protocol_rank(column[0]), column[1]))


def dataset_boards(summary: list[dict]) -> dict[str, Board]:
    """Per dataset: the (protocol, metric) columns and the method rows, ranked by the first
    column's mean (methods without it last)."""
    cells: dict[str, dict[str, dict[Column, dict]]] = defaultdict(lambda: defaultdict(dict))
    for entry in summary:
        cells[entry["dataset"]][row_label(entry)][column_of(entry)] = entry
    boards = {}
    for dataset, by_label in cells.items():
        columns = columns_of(e for row in by_label.values() for e in row.values())

        def rank(item: tuple[str, dict[Column, dict]]) -> tuple:
            label, row = item
            first = row.get(columns[0])
            return (first is None, -first["mean"] if first else 0.0, label)

        boards[dataset] = (columns, sorted(by_label.items(), key=rank))
    return boards


def percent(entry: dict) -> str:
    return f"{100 * entry['mean']:.1f} ± {100 * entry['std']:.1f}"


def provenance_of(rows: list[dict]) -> dict[str, list[str]]:
    """Where the numbers came from: each distinct suite, commit, machine and package set."""

    def distinct(describe: Callable[[dict], str]) -> list[str]:
        return sorted({describe(row) for row in rows})

    return {
        "Suites": distinct(lambda row: row["suite"]),
        "Git commits": distinct(lambda row: row["git_commit"] or "not a git checkout"),
        "Hardware": distinct(lambda row: row["hardware"] or "unknown"),
        "Versions": distinct(lambda row: ", ".join(f"{k} {v}" for k, v in (row["versions"] or {}).items() if v)),
    }


def curves(rows: Iterable[dict]) -> dict[str, dict[str, list[tuple[float, float, float]]]]:
    """Per dataset and method: ``(seconds, mean, std)`` of the ``knn_curve`` points over seeds."""
    points: dict[str, dict[str, dict[float, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for row in rows:
        if row["protocol"] == CURVE:
            seconds = float(row["metric"].removeprefix("top1@").removesuffix("s"))
            points[row["dataset"]][row_label(row)][seconds].append(row["value"])
    return {
        dataset: {
            label: [(t, fmean(v), stdev(v) if len(v) > 1 else 0.0) for t, v in sorted(by_time.items())]
            for label, by_time in sorted(by_label.items())
        }
        for dataset, by_label in sorted(points.items())
    }


def best_means(columns: list[Column], ranked: list[tuple[str, dict[Column, dict]]]) -> dict[Column, float]:
    """The highest mean of each column (the cell a report marks as best)."""
    return {column: max(row[column]["mean"] for _, row in ranked if column in row) for column in columns}


def budget_text(row: dict[Column, dict]) -> str:
    """The cost of a board row: mean wall time per cell (pretraining and evaluation) and epochs."""
    wall_time = mean_known(entry["wall_time_s"] for entry in row.values())
    epochs = mean_known(entry["epochs"] for entry in row.values())
    parts = ([f"{wall_time / 60:.1f} min"] if wall_time is not None else []) + ([plural(round(epochs, 1), "epoch")] if epochs is not None else [])
    return ", ".join(parts) or "–"


def at_a_glance(dataset: str, board: Board) -> str:
    """One sentence per dataset that answers "which methods beat the reference (random init), by how
    much": rows above it on every protocol with their smallest gain, rows below it on some protocol
    with the worst, rows without a reference row of their backbone."""
    columns, ranked = board
    noun, adjective = board_reference_words(ranked)
    above, below, unknown = [], [], []
    for label, row in ranked:
        entries = [row[c] for c in columns if c in row and not is_reference(row[c]) and c[0] != DIAGNOSTIC]
        if not entries:
            continue
        gains = [(e["gain"], column_name(column_of(e))) for e in entries if e["gain"] is not None]
        if not gains:
            unknown.append(label)
            continue
        worst, where = min(gains)
        text = f"{100 * worst:+.1f}".replace("-", "−")
        (above if worst > 0 else below).append(f"{label} {text}" if worst > 0 else f"{label} ({where} {text})")
    parts = [f"above {noun} on every protocol (smallest gain, points): {', '.join(above)}"] if above else []
    parts += [f"at or below it on some protocol: {', '.join(below)}"] if below else []
    parts += [f"no {adjective} row to compare with: {', '.join(unknown)}"] if unknown else []
    return f"{dataset}: " + ("; ".join(parts) if parts else "no rows to compare") + "."


def slug(dataset: str) -> str:
    """A file-name-safe form of a dataset name (``CIFAR10 (60 min)`` -> ``cifar10_60_min``)."""
    return "_".join("".join(c if c.isalnum() else " " for c in dataset.lower()).split()) or "dataset"


def plural(count: float, noun: str) -> str:
    return f"{count:g} {noun}" + ("" if count == 1 else "s")


def seed_counts(ranked: list[tuple[str, dict[Column, dict]]]) -> set[int]:
    """The distinct seed counts of a pivot's cells: more than one puts each cell's count in the cell."""
    return {entry["n"] for _, row in ranked for entry in row.values()}


def board_note(ranked: list[tuple[str, dict[Column, dict]]]) -> str:
    """The footnote of a dataset's pivot (Markdown and HTML say the same)."""
    seeds = seed_counts(ranked)
    over = plural(seeds.pop(), "seed") if len(seeds) == 1 else "n seeds (in brackets)"
    folds = {len(entry["folds"]) for _, row in ranked for entry in row.values()}
    if folds != {0}:  # cross-validation: a fold's value is the mean over its seeds
        over = (plural(folds.pop(), "fold") if len(folds) == 1 else "the folds") + f" (each the test split once) of {over}"
    return (
        f"Mean ± std over {over}, in %. Δ: the gain over the {board_reference_words(ranked)[1]} row of the same backbone, seed by seed on the seeds both ran, in points; "
        "best per column in bold. Budget: wall time per cell (pretraining and evaluation) and pretraining epochs."
    )
