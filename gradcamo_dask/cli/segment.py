"""``gradcamo-dask segment``: segment a plate into 3D cells."""

from __future__ import annotations

import os
import sys

from gradcamo_dask.cli.options import check_out


def add_command(commands) -> None:
    """``gradcamo-dask segment PLATE --out LABELS``: 3D cell labels for every site of a plate."""
    parser = commands.add_parser(
        "segment",
        help="segment every site of a plate into 3D cells (Cellpose or the watershed baseline)",
        description=(
            "Segment every site of a plate into 3D cell labels, one Dask task per site (or per tile of a "
            "large site), and write them as a plain-Zarr store with an int32 array 'labels' (well, site, z, y, x) "
            "that gradcamo_dask.open_labels(OUT, like=open_plate(PLATE)) reads. "
            "Cellpose weights: --model takes a file or a model name found in CELLPOSE_LOCAL_MODELS_PATH or "
            "~/.cellpose/models; nothing is downloaded unless --allow-download is given."
        ),
    )
    parser.add_argument("plate", help="plate to segment (OME-Zarr HCS plate, Zarr or TIFF; see open_plate)")
    parser.add_argument("--out", required=True, help="output Zarr store for the labels (must not exist)")
    parser.add_argument("--method", choices=["cellpose", "watershed"], default="cellpose",
                        help="Cellpose (the paper's) or the watershed baseline, which needs no weights")
    parser.add_argument("--model", default=None, help="Cellpose weights file or model name (default: cyto3, or cpsam on Cellpose 4)")
    parser.add_argument("--nucleus-channel", default="DNA", help="name of the nucleus channel (default DNA)")
    parser.add_argument("--cytoplasm-channel", default="RNA", help="name of the cytoplasm channel (default RNA); 'none' for nucleus only")
    parser.add_argument("--diameter", type=float, default=None, help="Cellpose cell diameter in xy voxels (default: the model's)")
    parser.add_argument("--stitch-threshold", type=float, default=0.05,
                        help="Cellpose: IoU above which masks of neighbouring z-slices are joined into one cell")
    parser.add_argument("--flow-threshold", type=float, default=0.75,
                        help="Cellpose: largest flow error of a kept mask (higher keeps more cells)")
    parser.add_argument("--cellprob-threshold", type=float, default=0.0,
                        help="Cellpose: cell probability above which a pixel belongs to a cell (lower: larger cells)")
    parser.add_argument("--anisotropy", type=float, default=None, help="z step over xy pixel size (default: from the plate, else 1.71)")
    parser.add_argument("--min-size", type=int, default=30, help="smallest cell in voxels (default 30)")
    parser.add_argument("--do-3d", action="store_true", help="Cellpose 3D mode instead of per-slice 2D plus stitching")
    parser.add_argument("--device", default="auto", help="auto (GPU when a worker has one), cpu, cuda, cuda:1, ...")
    parser.add_argument("--tile-size", type=int, default=2048, help="largest tile core in y and x, voxels; 0: never tile")
    parser.add_argument("--tile-overlap", type=int, default=128, help="context around each tile, voxels (>= largest cell diameter)")
    parser.add_argument("--allow-download", action="store_true", help="let Cellpose download a missing built-in model")
    parser.add_argument("--scheduler", default=None,
                        help="address of a running Dask scheduler (default: none, the threads of this machine)")
    parser.set_defaults(run=_run_segment)


def _segmenter(args):
    """The one segmenter object the options describe (weights checked now, for Cellpose)."""
    from gradcamo_dask.segment.segmenters import CellposeSegmenter, WatershedSegmenter

    if args.method == "watershed":
        return WatershedSegmenter(anisotropy=args.anisotropy, min_size=args.min_size)
    return CellposeSegmenter(
        model=args.model, diameter=args.diameter, stitch_threshold=args.stitch_threshold,
        flow_threshold=args.flow_threshold, cellprob_threshold=args.cellprob_threshold, anisotropy=args.anisotropy,
        min_size=args.min_size, do_3D=args.do_3d, device=args.device, allow_download=args.allow_download,
    )


def _compute_labels(store, scheduler: str | None) -> None:
    import dask

    if scheduler:
        from distributed import progress

        from gradcamo_dask.jobs.client import open_client

        with open_client(scheduler) as client:
            print(f"Dask dashboard: {client.dashboard_link}")
            future = client.compute(store)
            progress(future)
            future.result()
    else:
        from dask.diagnostics import ProgressBar

        with ProgressBar():
            dask.compute(store)


def _run_segment(args) -> int:
    import gradcamo_dask
    from gradcamo_dask.errors import GradcamoError, OutputStoreError
    from gradcamo_dask.io.layout import select_channels

    cytoplasm = None if args.cytoplasm_channel.lower() == "none" else args.cytoplasm_channel
    try:
        check_out(args.out, plate=args.plate)
        if os.path.exists(args.out):
            raise OutputStoreError(f"{args.out} exists; choose a new --out (labels are never written over)")
        image = gradcamo_dask.open_plate(args.plate)
        select_channels(image, [c for c in (args.nucleus_channel, cytoplasm) if c])  # before any weights lookup
        labels = gradcamo_dask.segment_plate(
            image,
            _segmenter(args),
            nucleus_channel=args.nucleus_channel,
            cytoplasm_channel=cytoplasm,
            tile_shape=None if args.tile_size <= 0 else (args.tile_size, args.tile_size),
            tile_overlap=args.tile_overlap,
        )
    except GradcamoError as error:
        print(f"gradcamo-dask segment: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    n_sites = labels.sizes["well"] * labels.sizes["site"]
    print(f"segmenting {n_sites} site(s) of plate {labels.attrs.get('plate', args.plate)!r} with {args.method}")
    from gradcamo_dask.io.plate import write_labels

    _compute_labels(write_labels(args.out, labels, compute=False), args.scheduler)
    print(f"labels written to {args.out}")
    return 0
