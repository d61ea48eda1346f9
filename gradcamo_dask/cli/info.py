"""``gradcamo-dask info``: describe a plate or a profiles store."""

from __future__ import annotations

import argparse
import os
import sys


def add_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "info",
        help="describe a plate or a profiles store (wells, sites, channels, cells, layers, done sites)",
        description="Describe STORE: a plate (wells, sites, channels, site shape, voxel size, labels) or a profiles "
        "store written by `gradcamo-dask score` (plate, cells, layers, bundle, and which sites are done).",
    )
    parser.add_argument("store", metavar="STORE", help="a plate or a profiles store")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.set_defaults(run=_run_info)


def _run_info(args: argparse.Namespace) -> int:
    import json

    from gradcamo_dask.errors import GradcamoError

    try:
        info = _describe(args.store)
    except (GradcamoError, FileNotFoundError) as err:
        print(f"gradcamo-dask info: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    for key, value in info.items():
        if isinstance(value, list) and len(value) > 12:
            value = f"{value[:12]} ... ({len(value)})"
        print(f"{key}: {value}")
    return 0


def _describe(path: str) -> dict:
    """A profiles store's description, else the plate's (with whether it has labels)."""
    from gradcamo_dask.errors import GradcamoError
    from gradcamo_dask.io.plate import describe_labels, describe_plate, open_labels, open_plate
    from gradcamo_dask.profiles.store import describe_profiles

    from gradcamo_dask.errors import PlateLayoutError

    if not os.path.exists(path) and "://" not in path:
        raise FileNotFoundError(f"{path} does not exist")
    if os.path.isfile(path) and not path.lower().endswith((".tif", ".tiff")):
        raise PlateLayoutError(f"{path} is a file, neither a plate (OME-Zarr, plain Zarr, TIFF) nor a profiles "
                               "store; give the plate or store folder")
    if os.path.isdir(path) and not os.listdir(path):
        raise PlateLayoutError(f"{path} is an empty folder, neither a plate nor a profiles store")
    labels_info = describe_labels(path)
    if labels_info is not None:
        return labels_info
    info = describe_profiles(path)
    if info is not None:
        return info
    image = open_plate(path)
    try:
        open_labels(path, like=image)
        has_labels = True
    except (GradcamoError, FileNotFoundError):
        has_labels = False
    return {**describe_plate(image), "labels": has_labels}
