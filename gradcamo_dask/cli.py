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


def _add_synth(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "synth",
        help="write a synthetic 3D Cell Painting plate (OME-Zarr 0.5 HCS) with ground-truth labels",
        description="Write a synthetic 3D Cell Painting plate as an OME-Zarr 0.5 HCS plate (Zarr v3) with the "
        "ground-truth labels in each field's labels/cells group and platemap.csv inside the plate folder. "
        "Deterministic from --seed; every site is rendered by one Dask task.",
    )
    parser.add_argument("out", metavar="OUT", help="the plate folder to write, e.g. synthetic.zarr")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--confounder", type=float, default=0.0,
                        help="0..1: strength of treatment information planted outside cells (default 0)")
    parser.add_argument("--doses", type=float, nargs="+", default=None, metavar="UM",
                        help="doses in µM, 0 = control (default 0 0.1 0.3 1 3 10)")
    parser.add_argument("--wells-per-treatment", type=int, default=2, help="replicate wells per dose (default 2)")
    parser.add_argument("--sites", type=int, default=4, help="sites (fields) per well (default 4)")
    parser.add_argument("--site-shape", type=int, nargs=3, default=(21, 256, 256), metavar=("Z", "Y", "X"),
                        help="site size in voxels (default 21 256 256)")
    parser.add_argument("--plate", default="synthetic", help="plate name (default 'synthetic')")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it is a Zarr store")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=_run_synth)


def _run_synth(args: argparse.Namespace) -> int:
    from gradcamo_dask.errors import GradcamoError
    from gradcamo_dask.plate import describe, write_plate
    from gradcamo_dask.synthetic import DEFAULT_DOSES_UM, synthetic_plate

    try:
        plate = synthetic_plate(
            doses_um=args.doses or DEFAULT_DOSES_UM, wells_per_treatment=args.wells_per_treatment,
            sites_per_well=args.sites, site_shape=tuple(args.site_shape), seed=args.seed,
            confounder=args.confounder, plate=args.plate,
        )
        write_plate(args.out, plate.image, plate.labels, platemap=plate.platemap, overwrite=args.overwrite,
                    progress=not args.quiet)
    except GradcamoError as err:
        print(f"gradcamo-dask synth: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: {describe(plate.image)}")
    print(f"platemap: {args.out}/platemap.csv; labels: <well>/<field>/labels/cells")
    return 0


_COMMANDS.append(_add_synth)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "run", None) is None:
        parser.print_help()
        return 2
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
