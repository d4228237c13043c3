"""The self-contained HTML page: what beats random init (or a suite's reference) at a glance, a pivot and a figure per
dataset, the suite's description, the full sortable table, provenance."""

from __future__ import annotations

import base64
import html as html_lib
import json
from collections.abc import Callable
from pathlib import Path

from ssl_kit.bench.report.summary import RANDOM_INIT, RULES, at_a_glance, best_means, board_note, budget_text, column_name, dataset_boards, gain_label, gain_text, is_reference, percent, provenance_of, seed_counts, summarize

# The HTML table's columns: (summary field, header, format). Text columns (no format) sort by
# their text, numeric ones by the field's value in ``data-v``.
HTML_COLUMNS: list[tuple[str, str, Callable[[dict], str] | None]] = [
    ("dataset", "Dataset", None),
    ("protocol", "Protocol", None),
    ("metric", "Metric", None),
    ("method", "Method", None),
    ("backbone", "Backbone", None),
    ("mean", "Mean ± std (%)", percent),
    ("gain", "Gain over {reference} (points)", gain_text),
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
table.pivot th { cursor: default; } table.pivot td.num, table.pivot td:last-child { white-space: nowrap; } table.pivot td.best { font-weight: 700; }
.gain { font-size: 85%; margin-left: .4em; } .gain.up { color: #1a7f37; } .gain.down { color: #cf222e; } .gain.none { color: #777; }
tr.reference td { font-style: italic; color: #555; } p.note { font-size: 90%; color: #555; }
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


def html_cell(entry: dict, field: str, show: Callable[[dict], str] | None) -> str:
    if show is None:
        return f"<td>{html_lib.escape(str(entry[field]))}</td>"
    if entry[field] is None:
        return '<td class="num" data-v="">–</td>'
    return f'<td class="num" data-v="{json.dumps(entry[field])}">{show(entry)}</td>'


def pivot_cell(entry: dict | None, best: float, show_n: bool) -> str:
    """Mean ± std (and the seed count where counts differ), bold where best in its column, with
    the gain over the reference coloured by sign."""
    if entry is None:
        return '<td class="num">–</td>'
    gain = gain_label(entry)
    kind = "none" if entry["gain"] is None else ("up" if entry["gain"] > 0 else "down")
    span = f' <span class="gain {kind}">{html_lib.escape(gain)}</span>' if gain else ""
    seeds = f" (n={entry['n']})" if show_n else ""
    return f'<td class="num{" best" if entry["mean"] == best else ""}">{percent(entry)}{seeds}{span}</td>'


def pivot(dataset: str, columns, ranked, figure: Path | None) -> str:
    """One dataset's section: methods x protocols, the budget column, the headline figure."""
    escape = html_lib.escape
    best = best_means(columns, ranked)
    show_n = len(seed_counts(ranked)) > 1
    head = "".join(f"<th>{escape(column_name(c))}</th>" for c in columns)
    body = "\n".join(
        f'<tr{" class=reference" if is_reference(next(iter(row.values()))) else ""}><td>{escape(label)}</td>'
        + "".join(pivot_cell(row.get(c), best[c], show_n) for c in columns)
        + f"<td>{escape(budget_text(row))}</td></tr>"
        for label, row in ranked
    )
    image = f'<figure><img alt="{escape(dataset)}" src="data:image/png;base64,{base64.b64encode(figure.read_bytes()).decode()}"></figure>' if figure else ""
    return (
        f'<h2>{escape(dataset)}</h2>\n<table class="pivot"><thead><tr><th>Method (backbone)</th>{head}<th>Budget</th></tr></thead>\n'
        f'<tbody>\n{body}\n</tbody></table>\n<p class="note">{escape(board_note(ranked))}</p>\n{image}'
    )


def html(rows: list[dict], plots: dict[str, Path], description: str = "", reference: str = RANDOM_INIT) -> str:
    """A self-contained page (inline CSS and JS, PNGs as data: URIs, no network): at a glance, a
    pivot and figure per dataset (``plots``: dataset -> PNG), the description, the sortable
    leaderboard of every cell and the provenance of the rows; gains are over ``reference``."""
    escape = html_lib.escape
    summary = summarize(rows, reference)
    boards = dataset_boards(summary)
    glance = "".join(f"<li>{escape(at_a_glance(dataset, board))}</li>" for dataset, board in boards.items())
    pivots = "\n".join(pivot(dataset, *board, Path(plots[dataset]) if dataset in plots else None) for dataset, board in boards.items())
    header = "".join(
        f'<th data-key="{field}" data-numeric="{str(show is not None).lower()}">{escape(title.format(reference=reference.lower()))}</th>'
        for field, title, show in HTML_COLUMNS
    )
    body = "\n".join("<tr>" + "".join(html_cell(entry, field, show) for field, _, show in HTML_COLUMNS) + "</tr>" for entry in summary)
    provenance = "\n".join(
        f"<dt>{escape(name)}</dt>" + "".join(f"<dd><code>{escape(v)}</code></dd>" for v in values) for name, values in provenance_of(rows).items()
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>ssl_kit benchmark leaderboard</title><style>{STYLE}</style></head>
<body>
<h1>Benchmark leaderboard</h1>
<h2>At a glance</h2>
<ul>{glance}</ul>
{pivots}
<h2>About this suite</h2>
{"".join(f"<p>{escape(paragraph)}</p>" for paragraph in description.split(chr(10) * 2) if paragraph.strip())}
<p>{escape(RULES)}</p>
<h2>Every cell</h2>
<p>Click a column header to sort.</p>
<table id="leaderboard">
<thead><tr>{header}</tr></thead>
<tbody>
{body}
</tbody>
</table>
<h2>Provenance</h2>
<dl>
{provenance}
</dl>
<script>{SCRIPT}</script>
</body>
</html>
"""
