"""Reports rendered from the results store: a Markdown leaderboard, a self-contained HTML page
(sortable table, plots embedded) and PNG plots. Every number is mean ± sample std over seeds."""

from __future__ import annotations

import base64
import html as html_lib
import json
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from statistics import fmean, stdev

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from ssl_kit.bench.store import ResultStore

KEY = ("dataset", "protocol", "method", "backbone", "metric")
#: Test kNN of snapshots during pretraining (metric ``top1@<seconds>s``): plotted against time, not tabled.
CURVE = "knn_curve"
PROTOCOL_ORDER = ("linear", "knn", "fine_tune", "few_label")
MARKERS = "osD^v<>P*Xp"
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
    for key in sorted(groups, key=lambda key: (key[0], _protocol_rank(key[1]), *key[1:])):
        group = groups[key]
        values = [row["value"] for row in group]
        summary.append(
            {
                **dict(zip(KEY, key)),
                "mean": fmean(values),
                "std": stdev(values) if len(values) > 1 else 0.0,
                "n": len(values),
                "seeds": sorted(row["seed"] for row in group),
                **{field: _mean_known(row[field] for row in group) for field in ("wall_time_s", "epochs", "throughput")},
            }
        )
    return summary


def _protocol_rank(protocol: str) -> tuple[int, str]:
    """The usual protocols first, in the order of the issue; others after them by name."""
    return (PROTOCOL_ORDER.index(protocol) if protocol in PROTOCOL_ORDER else len(PROTOCOL_ORDER), protocol)


def _mean_known(values: Iterable[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return fmean(known) if known else None


def _label(entry: dict) -> str:
    return f"{entry['method']} ({entry['backbone']})"


def _column(entry: dict) -> Column:
    return entry["protocol"], entry["metric"]


def _column_name(column: Column) -> str:
    return " ".join(column)


def _columns(entries: Iterable[dict]) -> list[Column]:
    return sorted({_column(e) for e in entries}, key=lambda column: (_protocol_rank(column[0]), column[1]))


def _boards(summary: list[dict]) -> dict[str, Board]:
    """Per dataset: the (protocol, metric) columns and the method rows, ranked by the first
    column's mean (methods without it last)."""
    cells: dict[str, dict[str, dict[Column, dict]]] = defaultdict(lambda: defaultdict(dict))
    for entry in summary:
        cells[entry["dataset"]][_label(entry)][_column(entry)] = entry
    boards = {}
    for dataset, by_label in cells.items():
        columns = _columns(e for row in by_label.values() for e in row.values())

        def rank(item: tuple[str, dict[Column, dict]]) -> tuple:
            label, row = item
            first = row.get(columns[0])
            return (first is None, -first["mean"] if first else 0.0, label)

        boards[dataset] = (columns, sorted(by_label.items(), key=rank))
    return boards


def _percent(entry: dict) -> str:
    return f"{100 * entry['mean']:.1f} ± {100 * entry['std']:.1f}"


def _provenance(rows: list[dict]) -> dict[str, list[str]]:
    """Where the numbers came from: each distinct suite, commit, machine and package set."""

    def distinct(describe: Callable[[dict], str]) -> list[str]:
        return sorted({describe(row) for row in rows})

    return {
        "Suites": distinct(lambda row: row["suite"]),
        "Git commits": distinct(lambda row: row["git_commit"] or "not a git checkout"),
        "Hardware": distinct(lambda row: row["hardware"] or "unknown"),
        "Versions": distinct(lambda row: ", ".join(f"{k} {v}" for k, v in (row["versions"] or {}).items() if v)),
    }


def markdown(rows: list[dict], description: str = "", plots: dict[str, Path] | None = None) -> str:
    """The leaderboard: the suite's description, a table per dataset (methods x protocols), the
    plots (``plots``: PNGs in the same folder), then the rules and provenance."""
    lines = ["# Benchmark leaderboard"] + (["", description.strip()] if description.strip() else [])
    for dataset, (columns, ranked) in _boards(summarize(rows)).items():
        seeds = {entry["n"] for _, row in ranked for entry in row.values()}
        lines += [
            "",
            f"## {dataset}",
            "",
            "| method (backbone) | " + " | ".join(map(_column_name, columns)) + " |",
            "|---|" + "---:|" * len(columns),
        ]

        def cell(entry: dict | None) -> str:
            # With unequal seed counts the number of seeds moves from the footnote into the cells.
            if entry is None:
                return "–"
            return _percent(entry) + (f" (n={entry['n']})" if len(seeds) > 1 else "")

        lines += [f"| {label} | " + " | ".join(cell(row.get(c)) for c in columns) + " |" for label, row in ranked]
        lines += ["", f"Mean ± std over {seeds.pop()} seeds, in %." if len(seeds) == 1 else "Mean ± std over n seeds (in brackets), in %."]
    lines += [line for name, path in (plots or {}).items() for line in ("", f"![{name}]({Path(path).name})")]
    lines += ["", "---", "", RULES, ""]
    lines += [f"- {name}: " + "; ".join(f"`{v}`" for v in values) for name, values in _provenance(rows).items()]
    return "\n".join(lines) + "\n"


def _figure(nrows: int, ncols: int) -> tuple[Figure, np.ndarray]:
    """A pyplot-free figure (Agg canvas: no display, no global state) with a grid of axes."""
    figure = Figure(figsize=(1.5 + 4.5 * ncols, 3.8 * nrows), layout="constrained")
    return figure, figure.subplots(nrows, ncols, squeeze=False)


def plot_accuracy(rows: list[dict], path: str | Path) -> Path:
    """Bars of mean accuracy per method with std error bars, a panel per dataset, a bar per
    (protocol, metric)."""
    summary = summarize(rows)
    boards = _boards(summary)
    every_column = _columns(summary)
    figure, axes = _figure(1, len(boards))
    for ax, (dataset, (columns, ranked)) in zip(axes[0], boards.items()):
        width = 0.8 / len(columns)
        for j, column in enumerate(columns):
            placed = [(i, row[column]) for i, (_, row) in enumerate(ranked) if column in row]
            ax.bar(
                [i + (j - (len(columns) - 1) / 2) * width for i, _ in placed],
                [100 * entry["mean"] for _, entry in placed],
                width,
                yerr=[100 * entry["std"] for _, entry in placed],
                capsize=3,
                color=f"C{every_column.index(column) % 10}",
            )
        ax.set_xticks(range(len(ranked)), [label for label, _ in ranked], rotation=30, ha="right")
        ax.set(title=dataset, ylabel="accuracy (%)")
    # One legend above the panels: inside an axis it would hide bars.
    handles = [Patch(color=f"C{j % 10}", label=_column_name(column)) for j, column in enumerate(every_column)]
    figure.legend(handles=handles, loc="outside upper center", ncols=len(handles), fontsize="small")
    figure.savefig(path, dpi=100)
    return Path(path)


def _marker(index: int) -> dict[str, str]:
    """The index-th method's marker: every filled shape, then the same shapes hollow."""
    return {"marker": MARKERS[index % len(MARKERS)], "fillstyle": "none" if index // len(MARKERS) % 2 else "full"}


def plot_accuracy_vs_time(rows: list[dict], path: str | Path) -> Path:
    """Mean accuracy (std error bars) against mean wall time per cell and, where recorded, against
    pretraining epochs: a marker shape per method, a colour per (protocol, metric)."""
    summary = summarize(rows)
    boards = _boards(summary)
    axes_x = [("wall_time_s", "wall time per cell (s)")] + ([("epochs", "pretraining epochs")] if any(e["epochs"] is not None for e in summary) else [])
    labels = sorted({_label(entry) for entry in summary})
    columns = _columns(summary)
    figure, axes = _figure(len(axes_x), len(boards))
    for (field, xlabel), axes_row in zip(axes_x, axes):
        for ax, (dataset, (_, ranked)) in zip(axes_row, boards.items()):
            for label, row in ranked:
                for column, entry in row.items():
                    if entry[field] is not None:
                        ax.errorbar(
                            entry[field],
                            100 * entry["mean"],
                            yerr=100 * entry["std"],
                            linestyle="",
                            color=f"C{columns.index(column) % 10}",
                            capsize=3,
                            **_marker(labels.index(label)),
                        )
            ax.set(title=dataset, xlabel=xlabel, ylabel="accuracy (%)")
    handles = [Line2D([], [], ls="", color="grey", label=label, **_marker(i)) for i, label in enumerate(labels)]
    handles += [Patch(color=f"C{j % 10}", label=_column_name(column)) for j, column in enumerate(columns)]
    figure.legend(handles=handles, loc="outside right upper", fontsize="small")
    figure.savefig(path, dpi=100)
    return Path(path)


def curves(rows: Iterable[dict]) -> dict[str, dict[str, list[tuple[float, float, float]]]]:
    """Per dataset and method: ``(seconds, mean, std)`` of the ``knn_curve`` points over seeds."""
    points: dict[str, dict[str, dict[float, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for row in rows:
        if row["protocol"] == CURVE:
            seconds = float(row["metric"].removeprefix("top1@").removesuffix("s"))
            points[row["dataset"]][_label(row)][seconds].append(row["value"])
    return {
        dataset: {
            label: [(t, fmean(v), stdev(v) if len(v) > 1 else 0.0) for t, v in sorted(by_time.items())]
            for label, by_time in sorted(by_label.items())
        }
        for dataset, by_label in sorted(points.items())
    }


def plot_time_to_accuracy(rows: list[dict], path: str | Path) -> Path:
    """Test kNN accuracy against pretraining wall-clock, a line per method (std band over seeds),
    a panel per dataset."""
    by_dataset = curves(rows)
    labels = sorted({label for by_label in by_dataset.values() for label in by_label})
    figure, axes = _figure(1, len(by_dataset))
    for ax, (dataset, by_label) in zip(axes[0], by_dataset.items()):
        for label, points in by_label.items():
            minutes = np.array([t / 60 for t, _, _ in points])
            mean, std = (np.array([100 * p[i] for p in points]) for i in (1, 2))
            color = f"C{labels.index(label) % 10}"
            ax.plot(minutes, mean, color=color, **_marker(labels.index(label)), label=label)
            ax.fill_between(minutes, mean - std, mean + std, color=color, alpha=0.15, linewidth=0)
        ax.set(title=dataset, xlabel="pretraining wall-clock (min)", ylabel="test kNN accuracy (%)")
    handles = [Line2D([], [], color=f"C{i % 10}", label=label, **_marker(i)) for i, label in enumerate(labels)]
    figure.legend(handles=handles, loc="outside right upper", fontsize="small")
    figure.savefig(path, dpi=100)
    return Path(path)


# The HTML table's columns: (summary field, header, format). Text columns (no format) sort by
# their text, numeric ones by the field's value in ``data-v``.
HTML_COLUMNS: list[tuple[str, str, Callable[[dict], str] | None]] = [
    ("dataset", "Dataset", None),
    ("protocol", "Protocol", None),
    ("metric", "Metric", None),
    ("method", "Method", None),
    ("backbone", "Backbone", None),
    ("mean", "Mean ± std (%)", _percent),
    ("n", "Seeds", lambda e: str(e["n"])),
    ("wall_time_s", "Wall time (s)", lambda e: f"{e['wall_time_s']:.1f}"),
    ("epochs", "Epochs", lambda e: f"{e['epochs']:g}"),
    ("throughput", "Samples/s", lambda e: f"{e['throughput']:.1f}"),
]

STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 75em; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { padding: .3em .7em; border-bottom: 1px solid #ddd; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
th { cursor: pointer; user-select: none; background: #f3f3f3; text-align: left; }
th[aria-sort=ascending]::after { content: " \\25B2"; }
th[aria-sort=descending]::after { content: " \\25BC"; }
tbody tr:hover { background: #f7f9ff; }
figure { margin: 1em 0; } img { max-width: 100%; }
dt { font-weight: 600; margin-top: .5em; } code { font-size: 90%; }
"""

# Sorting lives in the URL hash (#sort=KEY:asc|desc): a click sets it, so a sorted view is a link.
SCRIPT = """
const table = document.getElementById("leaderboard");
const headers = [...table.tHead.rows[0].cells];
function sortBy(key, dir) {
  const i = headers.findIndex(th => th.dataset.key === key);
  if (i < 0) return;
  const numeric = headers[i].dataset.numeric === "true";
  const sign = dir === "desc" ? -1 : 1;
  const value = row => numeric ? parseFloat(row.cells[i].dataset.v) : row.cells[i].textContent;
  const body = table.tBodies[0];
  body.append(...[...body.rows].sort((a, b) => {
    const x = value(a), y = value(b);
    if (!numeric) return sign * x.localeCompare(y, undefined, {numeric: true});
    if (isNaN(x) || isNaN(y)) return isNaN(x) - isNaN(y);  // missing values last either way
    return sign * (x - y);
  }));
  headers.forEach(th => th.removeAttribute("aria-sort"));
  headers[i].setAttribute("aria-sort", dir === "desc" ? "descending" : "ascending");
}
function sortFromHash() {
  const match = location.hash.match(/^#sort=(\\w+):(asc|desc)$/);
  if (match) sortBy(match[1], match[2]);
}
headers.forEach(th => th.addEventListener("click", () => {
  const sorted = th.getAttribute("aria-sort");
  const dir = sorted ? (sorted === "ascending" ? "desc" : "asc") : (th.dataset.numeric === "true" ? "desc" : "asc");
  location.hash = `sort=${th.dataset.key}:${dir}`;
}));
window.addEventListener("hashchange", sortFromHash);
sortFromHash();
"""


def _html_cell(entry: dict, field: str, show: Callable[[dict], str] | None) -> str:
    if show is None:
        return f"<td>{html_lib.escape(str(entry[field]))}</td>"
    if entry[field] is None:
        return '<td class="num" data-v="">–</td>'
    return f'<td class="num" data-v="{json.dumps(entry[field])}">{show(entry)}</td>'


def html(rows: list[dict], plots: dict[str, Path], description: str = "") -> str:
    """A self-contained page (inline CSS and JS, PNGs as data: URIs, no network): the sortable
    leaderboard, the plots and the provenance of the rows."""
    escape = html_lib.escape
    header = "".join(f'<th data-key="{field}" data-numeric="{str(show is not None).lower()}">{escape(title)}</th>' for field, title, show in HTML_COLUMNS)
    body = "\n".join("<tr>" + "".join(_html_cell(entry, field, show) for field, _, show in HTML_COLUMNS) + "</tr>" for entry in summarize(rows))
    figures = "\n".join(
        f'<figure><img alt="{escape(name)}" src="data:image/png;base64,{base64.b64encode(Path(path).read_bytes()).decode()}">'
        f"<figcaption>{escape(name)}</figcaption></figure>"
        for name, path in plots.items()
    )
    provenance = "\n".join(
        f"<dt>{escape(name)}</dt>" + "".join(f"<dd><code>{escape(v)}</code></dd>" for v in values) for name, values in _provenance(rows).items()
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>ssl_kit benchmark leaderboard</title><style>{STYLE}</style></head>
<body>
<h1>Benchmark leaderboard</h1>
{"".join(f"<p>{escape(paragraph)}</p>" for paragraph in description.split(chr(10) * 2) if paragraph.strip())}
<p>{escape(RULES)} Click a column header to sort.</p>
<table id="leaderboard">
<thead><tr>{header}</tr></thead>
<tbody>
{body}
</tbody>
</table>
<h2>Plots</h2>
{figures}
<h2>Provenance</h2>
<dl>
{provenance}
</dl>
<script>{SCRIPT}</script>
</body>
</html>
"""


def write_report(store_path: str | Path, out_dir: str | Path, suite: str | None = None, description: str = "") -> dict[str, Path]:
    """Writes leaderboard.md, leaderboard.html, accuracy.png, accuracy_vs_time.png and, where the
    store has ``knn_curve`` rows, time_to_accuracy.png; ``description`` (Markdown paragraphs: what
    the suite is, the command that made it) goes under the title."""
    store_path, out_dir = Path(store_path), Path(out_dir)
    if not store_path.is_file():
        raise FileNotFoundError(f"no results store at {store_path}")
    every_row = ResultStore(store_path, read_only=True).rows(suite)
    if not every_row:
        raise ValueError(f"the results store {store_path} has no results" + (f" for suite {suite!r}" if suite is not None else ""))
    rows = [row for row in every_row if row["protocol"] != CURVE]
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = {
        "accuracy": plot_accuracy(rows, out_dir / "accuracy.png"),
        "accuracy_vs_time": plot_accuracy_vs_time(rows, out_dir / "accuracy_vs_time.png"),
    }
    if len(rows) < len(every_row):
        plots["time_to_accuracy"] = plot_time_to_accuracy(every_row, out_dir / "time_to_accuracy.png")
    markdown_path, html_path = out_dir / "leaderboard.md", out_dir / "leaderboard.html"
    markdown_path.write_text(markdown(rows, description, plots), encoding="utf-8")
    html_path.write_text(html(rows, plots, description), encoding="utf-8")
    return {"markdown": markdown_path, "html": html_path, **plots}
