"""Reports rendered from the results store: a Markdown leaderboard, a self-contained HTML page
(pivots, sortable table, figures embedded) and a PNG figure per dataset. Every number is mean ±
sample std over seeds, beside its gain over random-init features of the same backbone (or over a
suite's own reference method)."""

from __future__ import annotations

from pathlib import Path

from ssl_kit.bench.report.markdown import markdown
from ssl_kit.bench.report.page import html
from ssl_kit.bench.report.plots import plot_dataset
from ssl_kit.bench.report.summary import CURVE, RANDOM_INIT, curves, dataset_boards, slug, summarize
from ssl_kit.bench.store import ResultStore

__all__ = ["summarize", "write_report"]


def write_report(
    store_path: str | Path, out_dir: str | Path, suite: str | None = None, description: str = "", reference: str = RANDOM_INIT
) -> dict[str, Path]:
    """Writes leaderboard.md, leaderboard.html and a headline figure per dataset
    (``<dataset>.png``: gains over the ``reference`` method, random init by default, and, where the
    store has ``knn_curve`` rows, test kNN against pretraining time); ``description`` (Markdown
    paragraphs: what the suite is, the command that made it) follows the pivots. Returns the paths:
    markdown, html, then one per dataset."""
    store_path, out_dir = Path(store_path), Path(out_dir)
    if not store_path.is_file():
        raise FileNotFoundError(f"no results store at {store_path}")
    every_row = ResultStore(store_path, read_only=True).rows(suite)
    if not every_row:
        raise ValueError(f"the results store {store_path} has no results" + (f" for suite {suite!r}" if suite is not None else ""))
    rows = [row for row in every_row if row["protocol"] != CURVE]
    out_dir.mkdir(parents=True, exist_ok=True)
    during_training = curves(every_row)
    plots = {
        dataset: plot_dataset(dataset, board, during_training.get(dataset, {}), out_dir / f"{slug(dataset)}.png")
        for dataset, board in dataset_boards(summarize(rows, reference)).items()
    }
    markdown_path, html_path = out_dir / "leaderboard.md", out_dir / "leaderboard.html"
    markdown_path.write_text(markdown(rows, description, plots, reference), encoding="utf-8")
    html_path.write_text(html(rows, plots, description, reference), encoding="utf-8")
    return {"markdown": markdown_path, "html": html_path, **plots}
