"""The Markdown leaderboard."""

from __future__ import annotations

from pathlib import Path

from ssl_kit.bench.report.summary import RULES, column_name, dataset_boards, percent, provenance_of, summarize


def markdown(rows: list[dict], description: str = "", plots: dict[str, Path] | None = None) -> str:
    """The leaderboard: the suite's description, a table per dataset (methods x protocols), the
    plots (``plots``: PNGs in the same folder), then the rules and provenance."""
    lines = ["# Benchmark leaderboard"] + (["", description.strip()] if description.strip() else [])
    for dataset, (columns, ranked) in dataset_boards(summarize(rows)).items():
        seeds = {entry["n"] for _, row in ranked for entry in row.values()}
        lines += [
            "",
            f"## {dataset}",
            "",
            "| method (backbone) | " + " | ".join(map(column_name, columns)) + " |",
            "|---|" + "---:|" * len(columns),
        ]

        def cell(entry: dict | None) -> str:
            # With unequal seed counts the number of seeds moves from the footnote into the cells.
            if entry is None:
                return "–"
            return percent(entry) + (f" (n={entry['n']})" if len(seeds) > 1 else "")

        lines += [f"| {label} | " + " | ".join(cell(row.get(c)) for c in columns) + " |" for label, row in ranked]
        lines += ["", f"Mean ± std over {seeds.pop()} seeds, in %." if len(seeds) == 1 else "Mean ± std over n seeds (in brackets), in %."]
    lines += [line for name, path in (plots or {}).items() for line in ("", f"![{name}]({Path(path).name})")]
    lines += ["", "---", "", RULES, ""]
    lines += [f"- {name}: " + "; ".join(f"`{v}`" for v in values) for name, values in provenance_of(rows).items()]
    return "\n".join(lines) + "\n"
