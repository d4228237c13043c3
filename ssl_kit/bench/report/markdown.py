"""The Markdown leaderboard."""

from __future__ import annotations

from pathlib import Path

from ssl_kit.bench.report.summary import RANDOM_INIT, RULES, at_a_glance, board_note, best_means, budget_text, column_name, dataset_boards, gain_label, percent, provenance_of, seed_counts, summarize


def markdown(rows: list[dict], description: str = "", plots: dict[str, Path] | None = None, reference: str = RANDOM_INIT) -> str:
    """The leaderboard: a sentence per dataset on what beats the ``reference`` method (random init),
    a pivot per dataset (methods x protocols, gain over the reference, budget) with its figure
    (``plots``: dataset -> PNG in the same folder), then the suite's description, the rules and provenance."""
    boards = dataset_boards(summarize(rows, reference))
    lines = ["# Benchmark leaderboard", "", "## At a glance", ""] + [f"- {at_a_glance(dataset, board)}" for dataset, board in boards.items()]
    for dataset, (columns, ranked) in boards.items():
        show_n = len(seed_counts(ranked)) > 1
        best = best_means(columns, ranked)
        lines += [
            "",
            f"## {dataset}",
            "",
            "| method (backbone) | " + " | ".join(map(column_name, columns)) + " | budget |",
            "|---|" + "---:|" * len(columns) + "---|",
        ]

        def cell(entry: dict | None) -> str:
            # With unequal seed counts the number of seeds moves from the footnote into the cells.
            if entry is None:
                return "–"
            value = percent(entry) + (f" (n={entry['n']})" if show_n else "")
            value = f"**{value}**" if entry["mean"] == best[(entry["protocol"], entry["metric"])] else value
            gain = gain_label(entry)
            return f"{value}, {gain}" if gain else value

        lines += [f"| {label} | " + " | ".join(cell(row.get(c)) for c in columns) + f" | {budget_text(row)} |" for label, row in ranked]
        lines += ["", board_note(ranked)]
        if plots and dataset in plots:
            lines += ["", f"![{dataset}]({Path(plots[dataset]).name})"]
    if description.strip():
        lines += ["", "## About this suite", "", description.strip()]
    lines += ["", "---", "", RULES, ""]
    lines += [f"- {name}: " + "; ".join(f"`{v}`" for v in values) for name, values in provenance_of(rows).items()]
    return "\n".join(lines) + "\n"
