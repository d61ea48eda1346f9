"""``gradcamo-dask bench-report``: one HTML page of the committed benchmark results."""

from __future__ import annotations

import argparse
import sys


def add_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "bench-report",
        help="one HTML page of plots from the committed benchmark results (benchmarks/results/*.json)",
        description="Build one HTML page with plots from a source checkout's benchmarks/results/*.json "
        "(the same as `python -m benchmarks.report`).",
    )
    parser.add_argument("--results", default=None, help="folder of benchmark JSON files (default: the checkout's)")
    parser.add_argument("--out", default=None, help="HTML file to write (default: RESULTS/report.html)")
    parser.set_defaults(run=_run_bench_report)


def _run_bench_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    checkout = Path(__file__).resolve().parents[2]
    if not (checkout / "benchmarks" / "report.py").exists():
        print(f"gradcamo-dask bench-report: no benchmarks/report.py next to the package in {checkout}; run it from a "
              f"source checkout of gradcamo-dask (pip install -e .)", file=sys.stderr)
        return 1
    sys.path.insert(0, str(checkout))
    from benchmarks.report import build_report

    try:
        print(build_report(Path(args.results) if args.results else checkout / "benchmarks" / "results",
                           Path(args.out) if args.out else None))
    except FileNotFoundError as err:
        print(f"gradcamo-dask bench-report: {err}", file=sys.stderr)
        return 1
    return 0
