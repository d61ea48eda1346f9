"""The ``gradcamo-dask`` parser: one subcommand per module of this package, ``--help`` everywhere.

Each command module has ``add_command(commands)``, which adds its parser and sets
``run=<function(args) -> exit code>``; heavy imports happen inside the run functions so
that ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from gradcamo_dask import __version__
from gradcamo_dask.cli.bench_report import add_command as add_bench_report
from gradcamo_dask.cli.compare import add_command as add_compare
from gradcamo_dask.cli.demo import add_command as add_demo
from gradcamo_dask.cli.export import add_command as add_export
from gradcamo_dask.cli.info import add_command as add_info
from gradcamo_dask.cli.report import add_command as add_report
from gradcamo_dask.cli.score import add_command as add_score
from gradcamo_dask.cli.segment import add_command as add_segment
from gradcamo_dask.cli.synth import add_command as add_synth
from gradcamo_dask.cli.train import add_command as add_train

# workflow order, as `gradcamo-dask --help` lists them
COMMANDS = (add_synth, add_segment, add_train, add_score, add_export, add_compare, add_report, add_info, add_demo,
            add_bench_report)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every option's default, unless its help text already names it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text.lower() or action.default is argparse.SUPPRESS or not action.option_strings
                or action.required):
            return text
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return f"{text} (default: {'on' if action.default else 'off'})"
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="gradcamo-dask",
        description="Grad-CAMO audits of deep single-cell profiles at plate scale on Dask. Workflow: synth (or your "
        "own plate) -> segment -> train -> score -> report; info describes any store; demo runs it all.",
    )
    parser.add_argument("--version", action="version", version=f"gradcamo-dask {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for add_command in COMMANDS:
        add_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "run", None) is None:
        parser.print_help()
        return 2
    return int(args.run(args) or 0)
