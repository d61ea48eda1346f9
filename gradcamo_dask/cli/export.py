"""``gradcamo-dask export``: the per-object table of a profiles store, in CellProfiler's naming."""

from __future__ import annotations

import argparse
import sys

from gradcamo_dask.cli.options import check_out


def add_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "export",
        help="write a profiles store's per-object table (Parquet and CSV, CellProfiler naming) for pycytominer",
        description="Write PROFILES (a store written by `gradcamo-dask score`) as one row per cell in CellProfiler's "
        "naming: Metadata_* keys and QC (Metadata_GradCAMO, Metadata_cqc_* flags), Cells_Location_Center_X/Y/Z "
        "(no Z for a 2D plate, as CellProfiler's 2D output), classic features as Cells_<name>, deep features as "
        "Cells_<Model>_<Layer>_<i>. OUT.parquet and OUT.csv are written beside each other.",
    )
    parser.add_argument("profiles", metavar="PROFILES", help="profiles Zarr store (as written by score)")
    parser.add_argument("--out", required=True, help="table path: cells, cells.parquet or cells.csv")
    parser.add_argument("--formats", nargs="+", choices=["parquet", "csv"], default=["parquet", "csv"],
                        help="files to write")
    parser.add_argument("--layer", default=None, help="scored layer whose Grad-CAMO is Metadata_GradCAMO "
                        "(default: the first)")
    parser.add_argument("--cutoff", type=float, default=0.25,
                        help="Grad-CAMO cut-off of the Metadata_cqc_gradcamo_below_cutoff flag")
    parser.set_defaults(run=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from gradcamo_dask.errors import GradcamoError
    from gradcamo_dask.profiles.export import to_cellprofiler_table
    from gradcamo_dask.profiles.store import open_profiles

    try:
        check_out(args.out, profiles=args.profiles)
        profiles = open_profiles(args.profiles)
        paths = to_cellprofiler_table(profiles, args.out, formats=args.formats, layer=args.layer, cutoff=args.cutoff)
    except (GradcamoError, FileNotFoundError) as err:
        print(f"gradcamo-dask export: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    print(f"wrote {', '.join(str(p) for p in paths.values())}: {profiles.sizes.get('cell', 0)} cells")
    return 0
