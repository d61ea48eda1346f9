"""``gradcamo-dask demo``: the main job on a synthetic mosaic plate."""

from __future__ import annotations

import argparse
import sys

from gradcamo_dask.cli.options import add_cluster_options, tls_requested


def add_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "demo",
        help="the main job: two models on a mosaic synthetic plate, one reading its own cell, one reading the "
        "neighbours, and the Grad-CAMO that tells them apart",
        description="Write a small mosaic synthetic 3D Cell Painting plate (OME-Zarr; only some cells respond to "
        "one of two compounds), take its ground-truth labels (or segment it with the watershed baseline), train two "
        "small EfficientNet-B0 3D at once (two processes, one torch thread each) on the wells of the first row: "
        "'own_cell' on the responding cells (the treatment shows in the cell itself) and 'neighbours' on the non-responding ones (it shows only in their neighbours). Score "
        "each model's held-out cells on a Dask cluster into OUT/profiles_<model>.zarr and print both models' "
        "Grad-CAMO side by side with what a uniform map scores, then write a report per model. A few minutes on 2 "
        "CPU cores. Rerunning with the same OUT resumes: complete model bundles and finished profile chunks are "
        "reused, not remade (a folder made with other settings is refused; --overwrite remakes it).",
    )
    parser.add_argument("--out", default="demo-output", help="output folder (default demo-output)")
    parser.add_argument("--labels", choices=["truth", "watershed"], default="truth",
                        help="ground-truth labels of the synthetic plate (default) or the watershed segmenter")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the plate and the training (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="remake the plate, models and profiles in OUT instead of resuming")
    parser.add_argument("--2d", dest="two_d", action="store_true",
                        help="the same demo on a 2D plate (synth --2d: the focal plane of the same mosaic sites) with "
                        "efficientnet2d at a 48 x 48 grid (the 3D demo's settings without z)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_cluster_options(parser)
    parser.set_defaults(run=_run_demo)


def settings_2d(settings: dict | None = None) -> dict:
    """The demo's settings for a 2D plate: the 3D demo's (``DEMO`` updated with ``settings``) without z
    (sites, crops and model grid in y and x)."""
    from gradcamo_dask.jobs.demo import DEMO

    base = {**DEMO, **(settings or {})}
    return {**base, "spatial_dims": 2, "site_shape": tuple(base["site_shape"][-2:]),
            "crop_shape": tuple(base["crop_shape"][-2:]), "input_shape": tuple(base["input_shape"][-2:])}


def _run_demo(args: argparse.Namespace) -> int:
    from gradcamo_dask.jobs.demo import format_comparison, format_summary, run_demo
    from gradcamo_dask.errors import GradcamoError

    if args.cluster == "slurm" or tls_requested(args):
        print("gradcamo-dask demo: use --scheduler for remote clusters; the demo starts local ones only",
              file=sys.stderr)
        return 2
    try:
        result = run_demo(args.out, labels_method=args.labels, scheduler=args.scheduler, n_workers=args.workers,
                          seed=args.seed, overwrite=args.overwrite, progress=not args.quiet,
                          settings=settings_2d() if args.two_d else None)
    except GradcamoError as err:
        print(f"gradcamo-dask demo: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    print()
    print(f"Grad-CAMO of {result['n_cells']} held-out cells: the share of each cell's Grad-CAM attention inside its "
          "own mask. 'uniform map' is what attention spread evenly over the crop scores (the cell's share of its "
          "crop); a model whose Grad-CAMO is near it ('x uniform map' ~ 1) is not looking at the cell it describes. "
          "Trust the model that learned (accuracy well above chance) and whose attention sits on its cell "
          "(the higher 'x uniform map', marked *). HiResCAM-O: the same score of the same models' maps with the "
          "gradient kept per voxel (not the paper's map; it credits each voxel's own contribution).")
    print(format_comparison(result["comparison"]))
    print(f"\nBy treatment ({args.out}/summary.csv; cut-off 0.25; NaN = all-zero Grad-CAM map):")
    print(format_summary(result["summary"]))
    t = result["timings"]
    print(f"\nreports: {', '.join(str(p) for p in result['reports'].values())}")
    print("time: " + ", ".join(f"{k} {v:.0f} s" for k, v in t.items()))
    return 0
