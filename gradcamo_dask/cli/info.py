"""``gradcamo-dask info``: describe a plate, a profiles store or a model bundle."""

from __future__ import annotations

import argparse
import os
import sys


def add_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "info",
        help="describe a plate, a profiles store or a model bundle (wells, sites, channels, cells, layers, done "
        "sites; a bundle's classes, grids, crop fill and training)",
        description="Describe STORE: a plate (wells, sites, channels, site shape, voxel size, labels), a profiles "
        "store written by `gradcamo-dask score` (plate, cells, layers, bundle, and which sites are done) or a model "
        "bundle written by `gradcamo-dask train` (channels, classes, crop and model grids, crop fill, intensity "
        "scaling, Grad-CAM layers with their map grids, training summary; its weights are checked).",
    )
    parser.add_argument("store", metavar="STORE", help="a plate, a profiles store or a model bundle folder")
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
        if isinstance(value, dict):  # a bundle's layers and training summary: one line per entry
            print(f"{key}:")
            for name, item in value.items():
                print(f"  {name}: {item}")
            continue
        if isinstance(value, list) and len(value) > 12:
            value = f"{value[:12]} ... ({len(value)})"
        print(f"{key}: {value}")
    return 0


def _describe(path: str) -> dict:
    """A bundle's or a profiles store's description, else the plate's (with whether it has labels)."""
    from gradcamo_dask.engine.bundles import describe_bundle
    from gradcamo_dask.errors import GradcamoError
    from gradcamo_dask.io.plate import describe_labels, describe_plate, open_labels, open_plate
    from gradcamo_dask.profiles.store import describe_profiles

    from gradcamo_dask.errors import PlateLayoutError

    if not os.path.exists(path) and "://" not in path:
        raise FileNotFoundError(f"{path} does not exist")
    if os.path.isfile(path) and not path.lower().endswith((".tif", ".tiff")):
        raise PlateLayoutError(f"{path} is a file, not a plate (OME-Zarr, plain Zarr, TIFF), a profiles store or a "
                               "model bundle; give the plate, store or bundle folder")
    if os.path.isdir(path) and not os.listdir(path):
        raise PlateLayoutError(f"{path} is an empty folder, not a plate, a profiles store or a model bundle")
    bundle_info = describe_bundle(path) if os.path.isdir(path) else None
    if bundle_info is not None:
        return bundle_info
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
