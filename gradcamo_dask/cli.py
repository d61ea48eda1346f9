"""The ``gradcamo-dask`` command: one subcommand per job, ``--help`` everywhere."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from gradcamo_dask import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradcamo-dask",
        description="Grad-CAMO audits of deep single-cell profiles at plate scale on Dask.",
    )
    parser.add_argument("--version", action="version", version=f"gradcamo-dask {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add_command in _COMMANDS:
        add_command(commands)
    return parser


# Each subcommand is one ``_add_<name>(commands)`` function below that adds its
# parser and sets ``run=<function(args) -> exit code>``; heavy imports happen
# inside the run function so that ``--help`` stays fast.
_COMMANDS: list = []


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "run", None) is None:
        parser.print_help()
        return 2
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
