"""Reports rendered from the results store: a Markdown leaderboard, a self-contained HTML page
(sortable table, plots embedded) and PNG plots. Every number is mean ± sample std over seeds."""

from __future__ import annotations

from pathlib import Path

from ssl_kit.bench.report.markdown import markdown
from ssl_kit.bench.report.page import html
from ssl_kit.bench.report.plots import plot_accuracy, plot_accuracy_vs_time, plot_time_to_accuracy
from ssl_kit.bench.report.summary import CURVE, summarize
from ssl_kit.bench.store import ResultStore

__all__ = ["summarize", "write_report"]


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
