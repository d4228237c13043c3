"""The store's rows aggregated for the reports: mean ± sample std over seeds per cell, the
per-dataset boards (methods x protocols), the time-to-accuracy curves and the provenance."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from statistics import fmean, stdev

KEY = ("dataset", "protocol", "method", "backbone", "metric")
#: Test kNN of snapshots during pretraining (metric ``top1@<seconds>s``): plotted against time, not tabled.
CURVE = "knn_curve"
PROTOCOL_ORDER = ("linear", "knn", "fine_tune", "few_label")
RULES = (
    "Every number comes from the final checkpoint of its run (no early stopping, no checkpoint picking), "
    "evaluated on fixed splits; choices (hyper-parameters, epochs) are made on validation data, never on "
    "the test set. Cells are the mean ± sample standard deviation (ddof=1, 0 for one seed) over seeds, in %."
)

Column = tuple[str, str]  # (protocol, metric)
Board = tuple[list[Column], list[tuple[str, dict[Column, dict]]]]  # columns, ranked (label, cells)


def summarize(rows: Iterable[dict]) -> list[dict]:
    """One entry per (dataset, protocol, method, backbone, metric), aggregated over seeds."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[tuple(row[k] for k in KEY)].append(row)
    summary = []
    for key in sorted(groups, key=lambda key: (key[0], protocol_rank(key[1]), *key[1:])):
        group = groups[key]
        values = [row["value"] for row in group]
        summary.append(
            {
                **dict(zip(KEY, key)),
                "mean": fmean(values),
                "std": stdev(values) if len(values) > 1 else 0.0,
                "n": len(values),
                "seeds": sorted(row["seed"] for row in group),
                **{field: mean_known(row[field] for row in group) for field in ("wall_time_s", "epochs", "throughput")},
            }
        )
    return summary


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
