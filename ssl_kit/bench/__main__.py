"""``python -m ssl_kit.bench --config benchmarks/<suite>.yaml [--seeds [0]] [--store X]`` runs a
suite (resumable; see ``ssl_kit.bench.runner``); ``python -m ssl_kit.bench report [--store X]
[--out DIR] [--suite NAME]`` renders the leaderboard (Markdown, HTML, PNG) from the store."""

from __future__ import annotations

import logging
import sys

from jsonargparse import ArgumentParser, CLI

from ssl_kit.bench.report import write_report
from ssl_kit.bench.report.summary import RANDOM_INIT
from ssl_kit.bench.runner import DEFAULT_STORE, run_suite


def report(argv: list[str]) -> None:
    parser = ArgumentParser(prog="python -m ssl_kit.bench report", description="Leaderboard from a results store.")
    parser.add_argument("--store", default=DEFAULT_STORE, help="SQLite results store")
    parser.add_argument("--out", default="benchmarks/results/leaderboard", help="folder for leaderboard.md/.html and the plots")
    parser.add_argument("--suite", default=None, help="only this suite's results")
    parser.add_argument("--reference", default=RANDOM_INIT, help="the method the gains are measured against")
    args = parser.parse_args(argv)
    for kind, path in write_report(args.store, args.out, args.suite, reference=args.reference).items():
        print(f"{kind}: {path}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.WARNING, format="ssl_kit.bench: %(message)s")
    if argv[:1] == ["report"]:
        report(argv[1:])
    else:
        CLI(run_suite, args=argv, as_positional=False)


if __name__ == "__main__":
    main()
