"""The PNG plots: accuracy bars, accuracy against time, test kNN against pretraining wall-clock."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from ssl_kit.bench.report.summary import column_name, columns_of, curves, dataset_boards, row_label, summarize

MARKERS = "osD^v<>P*Xp"


def new_figure(nrows: int, ncols: int) -> tuple[Figure, np.ndarray]:
    """A pyplot-free figure (Agg canvas: no display, no global state) with a grid of axes."""
    figure = Figure(figsize=(1.5 + 4.5 * ncols, 3.8 * nrows), layout="constrained")
    return figure, figure.subplots(nrows, ncols, squeeze=False)


def plot_accuracy(rows: list[dict], path: str | Path) -> Path:
    """Bars of mean accuracy per method with std error bars, a panel per dataset, a bar per
    (protocol, metric)."""
    summary = summarize(rows)
    boards = dataset_boards(summary)
    every_column = columns_of(summary)
    figure, axes = new_figure(1, len(boards))
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
    handles = [Patch(color=f"C{j % 10}", label=column_name(column)) for j, column in enumerate(every_column)]
    figure.legend(handles=handles, loc="outside upper center", ncols=len(handles), fontsize="small")
    figure.savefig(path, dpi=100)
    return Path(path)


def marker_style(index: int) -> dict[str, str]:
    """The index-th method's marker: every filled shape, then the same shapes hollow."""
    return {"marker": MARKERS[index % len(MARKERS)], "fillstyle": "none" if index // len(MARKERS) % 2 else "full"}


def plot_accuracy_vs_time(rows: list[dict], path: str | Path) -> Path:
    """Mean accuracy (std error bars) against mean wall time per cell and, where recorded, against
    pretraining epochs: a marker shape per method, a colour per (protocol, metric)."""
    summary = summarize(rows)
    boards = dataset_boards(summary)
    axes_x = [("wall_time_s", "wall time per cell (s)")] + ([("epochs", "pretraining epochs")] if any(e["epochs"] is not None for e in summary) else [])
    labels = sorted({row_label(entry) for entry in summary})
    columns = columns_of(summary)
    figure, axes = new_figure(len(axes_x), len(boards))
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
                            **marker_style(labels.index(label)),
                        )
            ax.set(title=dataset, xlabel=xlabel, ylabel="accuracy (%)")
    handles = [Line2D([], [], ls="", color="grey", label=label, **marker_style(i)) for i, label in enumerate(labels)]
    handles += [Patch(color=f"C{j % 10}", label=column_name(column)) for j, column in enumerate(columns)]
    figure.legend(handles=handles, loc="outside right upper", fontsize="small")
    figure.savefig(path, dpi=100)
    return Path(path)


def plot_time_to_accuracy(rows: list[dict], path: str | Path) -> Path:
    """Test kNN accuracy against pretraining wall-clock, a line per method (std band over seeds),
    a panel per dataset."""
    by_dataset = curves(rows)
    labels = sorted({label for by_label in by_dataset.values() for label in by_label})
    figure, axes = new_figure(1, len(by_dataset))
    for ax, (dataset, by_label) in zip(axes[0], by_dataset.items()):
        for label, points in by_label.items():
            minutes = np.array([t / 60 for t, _, _ in points])
            mean, std = (np.array([100 * p[i] for p in points]) for i in (1, 2))
            color = f"C{labels.index(label) % 10}"
            ax.plot(minutes, mean, color=color, **marker_style(labels.index(label)), label=label)
            ax.fill_between(minutes, mean - std, mean + std, color=color, alpha=0.15, linewidth=0)
        ax.set(title=dataset, xlabel="pretraining wall-clock (min)", ylabel="test kNN accuracy (%)")
    handles = [Line2D([], [], color=f"C{i % 10}", label=label, **marker_style(i)) for i, label in enumerate(labels)]
    figure.legend(handles=handles, loc="outside right upper", fontsize="small")
    figure.savefig(path, dpi=100)
    return Path(path)
