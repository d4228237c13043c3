"""The PNG figures: one headline figure per dataset, with the gain over random init (or a suite's reference) of every
method and protocol and, where the store has them, test kNN curves against pretraining time."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ssl_kit.bench.report.summary import Board, board_reference_words, column_name

#: Okabe and Ito's colour-blind-safe palette, the faint yellow last.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#000000", "#F0E442")
MARKERS = "os^DvP*X"
#: Prefix of the rows trained by lightly's pipeline of a method: drawn dashed, in the method's colour.
LIGHTLY = "lightly "


def plot_dataset(dataset: str, board: Board, curves: dict[str, list[tuple[float, float, float]]], path: str | Path) -> Path:
    """The headline figure of one dataset: gain over the reference (bars, error bars combining both
    stds) per method and protocol and, when ``curves`` (row label -> (seconds, mean, std)) is not
    empty, test kNN against pretraining wall-clock, a line per method."""
    columns, ranked = board
    rows = [(label, row) for label, row in ranked if any(entry["gain"] is not None for entry in row.values())]
    height = max(3.5, 1.6 + 0.16 * len(rows) * len(columns))
    figure = Figure(figsize=(18 if curves else 10, height), layout="constrained")
    axes = figure.subplots(1, 2 if curves else 1, squeeze=False)[0]
    figure.suptitle(dataset, fontweight="bold")
    plot_gains(axes[0], columns, rows, board_reference_words(ranked)[0])
    if curves:
        plot_curves(axes[1], curves)
    figure.savefig(path, dpi=100, bbox_inches="tight")  # long method labels must not push the axes out
    return Path(path)


def plot_gains(ax, columns, rows, reference: str) -> None:
    """Horizontal bars, a group per method (best first) and a colour per protocol; ``reference``
    as the texts name it (``random init``). Columns without a gain (diagnostics) are left out."""
    columns = [column for column in columns if any(column in row and row[column]["gain"] is not None for _, row in rows)] or columns
    width = 0.8 / len(columns)
    for j, column in enumerate(columns):
        placed = [(i, row[column]) for i, (_, row) in enumerate(rows) if column in row and row[column]["gain"] is not None]
        ax.barh(
            [i + (j - (len(columns) - 1) / 2) * width for i, _ in placed],
            [100 * entry["gain"] for _, entry in placed],
            width,
            xerr=[100 * entry["gain_std"] for _, entry in placed],
            capsize=2,
            color=PALETTE[j % len(PALETTE)],
            label=column_name(column),
        )
    ax.axvline(0, color="grey", linewidth=1)
    ax.set_yticks(range(len(rows)), [label for label, _ in rows])
    ax.invert_yaxis()
    ax.set(xlabel=f"points over {reference} of the same backbone", title=f"gain over {reference}")
    if rows:
        ax.legend(loc="best", fontsize="small")
    else:
        ax.text(0.5, 0.5, f"no {reference} rows to compare with", ha="center", transform=ax.transAxes)


def plot_curves(ax, curves: dict[str, list[tuple[float, float, float]]]) -> None:
    """A colour per method; lightly's pipeline of a method dashed in the method's colour."""
    methods = sorted({label.removeprefix(LIGHTLY) for label in curves})
    for label, points in curves.items():
        i = methods.index(label.removeprefix(LIGHTLY))
        minutes = np.array([t / 60 for t, _, _ in points])
        mean, std = (np.array([100 * p[k] for p in points]) for k in (1, 2))
        style = method_style(i, len(methods))
        ax.plot(minutes, mean, **style, linestyle="--" if label.startswith(LIGHTLY) else "-")
        ax.fill_between(minutes, mean - std, mean + std, color=style["color"], alpha=0.15, linewidth=0)
    ax.set(title="test kNN during pretraining", xlabel="pretraining wall-clock (min)", ylabel="test kNN accuracy (%)")
    handles = [Line2D([], [], **method_style(i, len(methods)), label=method) for i, method in enumerate(methods)]
    if any(label.startswith(LIGHTLY) for label in curves):
        handles += [Line2D([], [], color="grey", label="ssl_kit"), Line2D([], [], color="grey", linestyle="--", label="lightly's pipeline")]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small")  # beside the panel: inside it would hide lines


def method_style(index: int, count: int) -> dict:
    """The index-th of ``count`` methods: a palette colour, and markers only once colours repeat."""
    marker = MARKERS[index // len(PALETTE) % len(MARKERS)] if count > len(PALETTE) else None
    return {"color": PALETTE[index % len(PALETTE)], "marker": marker}
