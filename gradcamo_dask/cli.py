"""The ``gradcamo-dask`` command: one subcommand per job, ``--help`` everywhere."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from gradcamo_dask import __version__
from gradcamo_dask.engine.gradcamo import DEFAULT_CUTOFF


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
        "ground-truth labels in each field's labels/cells group, platemap.csv and cell_truth.csv (each cell's "
        "role: responder or not, its response, its responding neighbours) inside the plate folder. "
        "Deterministic from --seed; every site is rendered by one Dask task.",
    )
    parser.add_argument("out", metavar="OUT", help="the plate folder to write, e.g. synthetic.zarr")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--confounder", type=float, default=0.0,
                        help="0..1: strength of treatment information planted outside cells (default 0)")
    parser.add_argument("--mosaic", action="store_true",
                        help="mosaic wells: only a maximal independent set of cells (about 30 %%) responds, the same "
                        "cells in every well, density independent of dose; responders carry the treatment in their own "
                        "cell only, bystanders only through responding neighbours (cell_truth.csv says who is who)")
    parser.add_argument("--doses", type=float, nargs="+", default=None, metavar="UM",
                        help="doses in µM, 0 = control (default 0 0.1 0.3 1 3 10)")
    parser.add_argument("--wells-per-treatment", type=int, default=2, help="replicate wells per dose (default 2)")
    parser.add_argument("--sites", type=int, default=4, help="sites (fields) per well (default 4)")
    parser.add_argument("--site-shape", type=int, nargs=3, default=(21, 256, 256), metavar=("Z", "Y", "X"),
                        help="site size in voxels (default 21 256 256)")
    parser.add_argument("--cell-radius", type=float, default=None, metavar="VOXELS",
                        help="typical radius of a control cell in y and x, voxels (default: synthetic_plate's, 28 "
                        "= 18 µm); on small sites use a smaller radius, e.g. 14 at 16 x 128 x 128, to get more cells")
    parser.add_argument("--plate", default="synthetic", help="plate name (default 'synthetic')")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it is a Zarr store")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=_run_synth)


def _run_synth(args: argparse.Namespace) -> int:
    from gradcamo_dask.errors import GradcamoError
    from gradcamo_dask.io.plate import describe_plate, write_plate
    from gradcamo_dask.io.synthetic import DEFAULT_DOSES_UM, cell_truth, synthetic_plate

    try:
        _check_out(args.out, option="OUT")  # no inputs; resolves the real path like every writing command
        plate = synthetic_plate(
            doses_um=args.doses or DEFAULT_DOSES_UM, wells_per_treatment=args.wells_per_treatment,
            sites_per_well=args.sites, site_shape=tuple(args.site_shape), seed=args.seed,
            confounder=args.confounder, mosaic=args.mosaic, plate=args.plate,
            **({"cell_radius": args.cell_radius} if args.cell_radius is not None else {}),
        )
        write_plate(args.out, plate.image, plate.labels, platemap=plate.platemap, overwrite=args.overwrite,
                    progress=not args.quiet)
        cell_truth(plate).to_csv(f"{args.out}/cell_truth.csv", index=False)
    except GradcamoError as err:
        print(f"gradcamo-dask synth: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    summary = {k: v for k, v in describe_plate(plate.image).items() if k not in ("kind", "treatments")}
    print(f"wrote {args.out}: {json.dumps(summary)}")
    print(f"platemap: {args.out}/platemap.csv; cell roles: {args.out}/cell_truth.csv; "
          "labels: <well>/<field>/labels/cells")
    return 0




def _add_report(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "report",
        help="write the Grad-CAMO report (HTML, figures, JSON summary) of a profiles store",
        description="Write DIR/index.html, DIR/summary.json and DIR/figures/: Grad-CAMO summaries by treatment, dose, "
        "well and site; Grad-CAMO distributions by treatment and site; UMAP of whitened deep features coloured by "
        "treatment and site, before and after Grad-CAMO filtering; a gallery of example cells with their Grad-CAM "
        "maps (crops read back from the plate named in the provenance). Parts that cannot be made are listed with "
        "the reason instead of failing.",
    )
    parser.add_argument("profiles", metavar="PROFILES", help="profiles Zarr store (as written by score)")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder to write the report into")
    parser.add_argument("--cutoff", type=float, default=DEFAULT_CUTOFF, help="Grad-CAMO cut-off for 'on target' (default %(default)s)")
    parser.add_argument("--layer", default=None, help="scored layer to report (default: the first)")
    parser.add_argument("--whitening", default="ZCA", choices=["ZCA", "PCA", "ZCA-cor", "PCA-cor"],
                        help="whitening fit on control cells before UMAP (default ZCA)")
    parser.add_argument("--gallery", type=int, default=4, metavar="N",
                        help="example cells per score bin: high, middle, low (default 4)")
    parser.add_argument("--channel", default=None, help="channel shown in the gallery (default DNA)")
    parser.add_argument("--plate", default=None, help="plate to read gallery crops from (default: from provenance)")
    parser.add_argument("--labels", default=None, help="labels of that plate (default: from provenance)")
    parser.add_argument("--max-umap-cells", type=int, default=20000, help="UMAP at most this many cells (default 20000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the UMAP and its subset (default 0)")
    parser.set_defaults(run=_run_report)


def _run_report(args: argparse.Namespace) -> int:
    import json

    from gradcamo_dask.errors import GradcamoError
    from gradcamo_dask.profiles.report import write_report

    try:
        _check_out(args.out, profiles=args.profiles, plate=args.plate, labels=args.labels)
        path = write_report(args.profiles, args.out, cutoff=args.cutoff, layer=args.layer, whitening=args.whitening,
                            gallery_per_bin=args.gallery, channel=args.channel, max_umap_cells=args.max_umap_cells,
                            seed=args.seed, plate=args.plate, labels=args.labels)
    except GradcamoError as err:
        print(f"gradcamo-dask report: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    summary = json.loads((path.parent / "summary.json").read_text())
    print(f"wrote {path} ({len(summary['figures'])} figures) and {path.parent / 'summary.json'}")
    for part, reason in summary["missing"].items():
        print(f"missing {part}: {reason}")
    return 0




def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "run", None) is None:
        parser.print_help()
        return 2
    return int(args.run(args) or 0)


def _add_segment(commands) -> None:
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
        from distributed import Client, progress

        with Client(scheduler) as client:
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
        _check_out(args.out, plate=args.plate)
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


def _add_train(commands) -> None:
    """``gradcamo-dask train PLATE --out BUNDLE``: train the 3D feature extractor on a plate (issue #6)."""
    parser = commands.add_parser(
        "train",
        help="train EfficientNet-B0 3D to predict each cell's treatment (the paper's recipe), write a model bundle",
        description=(
            "Train EfficientNet-B0 3D on single-cell crops of a plate to predict the treatment of each cell, with "
            "the paper's recipe as defaults (leave-wells-out split, early stopping on a validation subset of "
            "training cells, flips/brightness/gamma augmentations with p=0.5, Adam 3e-4, batch 8, cross-entropy), "
            "optionally with the Grad-CAMO regulariser (loss = CE - lambda * mean Grad-CAMO). Crops are read one "
            "site at a time. Writes a model bundle (model.safetensors + config.json + cells.csv) and a checkpoint "
            "each epoch under OUT/checkpoint; --resume continues from it."
        ),
    )
    parser.add_argument("plate", help="plate (OME-Zarr HCS plate, Zarr or TIFF; see open_plate)")
    parser.add_argument("--out", required=True, help="bundle directory to write")
    parser.add_argument("--labels", default=None,
                        help="labels (default: the labels stored in the plate, e.g. from 'gradcamo-dask synth')")
    parser.add_argument("--platemap", default=None, help="platemap CSV (default: PLATE/platemap.csv)")
    parser.add_argument("--crop-size", type=int, nargs="+", default=[128, 128], metavar="N",
                        help="crop size: Y X (all z-slices) or Z Y X, voxels (default 128 128)")
    parser.add_argument("--input-shape", type=int, nargs=3, default=[64, 224, 224], metavar=("Z", "Y", "X"),
                        help="model input grid, voxels (default 64 224 224; e.g. 16 48 48 on a CPU)")
    parser.add_argument("--epochs", type=int, default=50, help="most epochs (early stopping may end sooner)")
    parser.add_argument("--batch-size", type=int, default=8, help="cells per training step (paper: 8)")
    parser.add_argument("--lr", type=float, default=3e-4, help="Adam learning rate (default 3e-4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, shuffling, augmentations and weights")
    parser.add_argument("--test-wells", nargs="+", default=None, metavar="WELL",
                        help="held-out test wells, e.g. C02 C03 (default: each treatment's last well)")
    parser.add_argument("--test-columns", type=int, nargs="+", default=None, metavar="COLUMN",
                        help="held-out test columns, e.g. 3 (instead of --test-wells)")
    parser.add_argument("--test-rows", nargs="+", default=None, metavar="ROW",
                        help="held-out test rows, e.g. C (instead of --test-wells)")
    parser.add_argument("--train-wells", nargs="+", default=None, metavar="WELL",
                        help="training wells (default: every well not held out)")
    parser.add_argument("--train-columns", type=int, nargs="+", default=None, metavar="COLUMN",
                        help="training columns (instead of --train-wells)")
    parser.add_argument("--train-rows", nargs="+", default=None, metavar="ROW",
                        help="training rows (instead of --train-wells)")
    parser.add_argument("--val-fraction", type=float, default=0.1,
                        help="share of training cells set aside for early stopping")
    parser.add_argument("--max-train-cells", type=int, default=None,
                        help="train on at most this many cells (a seeded subset; default: all)")
    parser.add_argument("--patience", type=int, default=5, help="early-stopping patience in epochs; 0: none")
    parser.add_argument("--no-augment", action="store_true", help="switch the augmentations off")
    parser.add_argument("--regularizer", type=float, default=0.0, metavar="LAMBDA",
                        help="weight of the Grad-CAMO regulariser (default 0: plain cross-entropy)")
    parser.add_argument("--regularizer-layer", default=None, help="its Grad-CAM layer (default: the model's)")
    parser.add_argument("--layers", nargs="+", default=None, help="default Grad-CAM layers stored in the bundle")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=_run_train)


def _recipe(args):
    """The one training recipe the options describe."""
    from gradcamo_dask.engine.augment import Augmentation
    from gradcamo_dask.errors import InputError
    from gradcamo_dask.jobs.recipe import Recipe, Split

    crop = args.crop_size
    if len(crop) not in (2, 3):
        raise InputError(f"--crop-size takes Y X or Z Y X, got {crop}")
    split = Split(test_wells=args.test_wells, test_columns=args.test_columns, test_rows=args.test_rows,
                  train_wells=args.train_wells, train_columns=args.train_columns, train_rows=args.train_rows,
                  val_fraction=args.val_fraction, max_train_cells=args.max_train_cells)
    return Recipe(crop_size=(None, *crop) if len(crop) == 2 else tuple(crop), input_shape=tuple(args.input_shape),
                  epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr, seed=args.seed, split=split,
                  patience=args.patience or None, augmentation=None if args.no_augment else Augmentation(),
                  regularizer=args.regularizer, regularizer_layer=args.regularizer_layer, layers=args.layers)


def _print_training(out) -> None:
    prov = json.loads((out / "config.json").read_text())["provenance"]
    test = prov.get("test") or {}
    print(f"wrote {out}: {prov['epochs_run']} epochs (best {prov['best_epoch']}, {prov['stopped_by']}), "
          f"cells {prov['cells']}")
    if test:
        print(f"test accuracy {test['accuracy']:.3f}, Grad-CAMO {test['gradcamo_mean']:.3f} "
              f"+- {test['gradcamo_sd']:.3f} at {test['layer']}")


def _run_train(args) -> int:
    import gradcamo_dask
    from gradcamo_dask.errors import GradcamoError

    try:
        _check_out(args.out, plate=args.plate, labels=args.labels, platemap=args.platemap)
        _positive(batch_size=args.batch_size, epochs=args.epochs)
        recipe = _recipe(args)
        image = gradcamo_dask.open_plate(args.plate, platemap=args.platemap)
        labels = gradcamo_dask.open_labels(args.labels or args.plate, like=image)
        out = gradcamo_dask.train(image, labels, recipe, out=args.out, resume=args.resume, device=args.device,
                                  progress=not args.quiet)
    except GradcamoError as err:
        print(f"gradcamo-dask train: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    _print_training(out)
    return 0


# ------------------------------------------------------------------ demo, score, info (issue #4)


def _positive(**options: int | None) -> None:
    """Refuse option values below 1 (``--batch-size 0``) before anything is read or written."""
    from gradcamo_dask.errors import InputError

    for name, value in options.items():
        if value is not None and value < 1:
            flag = "--" + name.replace("_", "-")
            raise InputError(f"{flag} must be a whole number >= 1, got {value}; nothing was read or written")


def _check_out(out: str, option: str = "--out", **inputs: str | None) -> str:
    """Refuse an output that is, contains or lies inside one of ``inputs`` (real paths, links followed)."""
    from gradcamo_dask.io.safety import check_output_path

    return check_output_path(out, inputs, option=option)


def _add_cluster_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Dask cluster (default: a local cluster sized to this machine, "
                                      "one worker per GPU when CUDA GPUs are present)")
    group.add_argument("--scheduler", default=None, metavar="ADDRESS",
                       help="join a running Dask scheduler (tcp://host:port, tls://host:port or a scheduler JSON file)")
    group.add_argument("--timeout", type=float, default=20.0, metavar="SECONDS",
                       help="give up on a --scheduler that does not answer as a Dask scheduler after this long "
                       "(default 20)")
    group.add_argument("--worker-timeout", type=float, default=600.0, metavar="SECONDS",
                       help="how long to wait, saying so, for a first worker of a --scheduler that has none "
                       "(default 600)")
    group.add_argument("--cluster", choices=["local", "slurm"], default=None,
                       help="cluster to start when no --scheduler is given (default local)")
    group.add_argument("--cluster-config", default=None, metavar="PATH", help="settings of the SLURM cluster (YAML)")
    group.add_argument("--workers", type=int, default=None, help="worker processes of a local CPU cluster")
    group.add_argument("--tls-ca-file", default=None, help="TLS: CA certificate (PEM) of the cluster")
    group.add_argument("--tls-cert", default=None, help="TLS: client certificate (PEM)")
    group.add_argument("--tls-key", default=None, help="TLS: client private key (PEM)")


def _tls_requested(args: argparse.Namespace) -> bool:
    return bool(args.tls_ca_file or args.tls_cert or args.tls_key)


def _security(args: argparse.Namespace):
    """The TLS settings of the --tls-* options (None without them); ClusterError names a missing option or file."""
    if not _tls_requested(args):
        return None
    from gradcamo_dask.errors import ClusterError
    from gradcamo_dask.jobs.tls import tls_security

    if not (args.tls_ca_file and args.tls_cert):
        raise ClusterError("TLS needs both --tls-ca-file and --tls-cert (and --tls-key unless the certificate file "
                           "holds the key)")
    return tls_security(args.tls_ca_file, args.tls_cert, args.tls_key)


def _connect(args: argparse.Namespace):
    from gradcamo_dask.errors import ClusterError, InputError
    from gradcamo_dask.jobs.cluster import connect

    security = _security(args)
    address = str(args.scheduler or "")
    if security is not None and "://" in address and not address.startswith("tls://"):
        raise ClusterError(f"--scheduler {address} is not a TLS address but --tls-* options require encryption; "
                           f"use tls://{address.split('://', 1)[1]} (a scheduler started with --protocol tls) or "
                           "drop the --tls-* options")
    for flag, value in (("--timeout", args.timeout), ("--worker-timeout", args.worker_timeout)):
        if not value >= 0:
            raise InputError(f"{flag} must be a number of seconds >= 0, got {value}")
    return connect(args.scheduler, cluster=args.cluster, cluster_config=args.cluster_config, n_workers=args.workers,
                   security=security, timeout=args.timeout, worker_timeout=args.worker_timeout)


def _add_demo(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "demo",
        help="the main job: two models on a mosaic synthetic plate, one reading its own cell, one reading the "
        "neighbours, and the Grad-CAMO that tells them apart",
        description="Write a small mosaic synthetic 3D Cell Painting plate (OME-Zarr; only some cells respond to "
        "the compound), take its ground-truth labels (or segment it with the watershed baseline), train two small "
        "EfficientNet-B0 3D on the wells of the first row: 'own_cell' on the responding cells (the treatment shows "
        "in the cell itself) and 'neighbours' on the non-responding ones (it shows only in their neighbours). Score "
        "each model's held-out cells on a Dask cluster into OUT/profiles_<model>.zarr and print both models' "
        "Grad-CAMO side by side with what a uniform map scores, then write a report per model. A few minutes on 2 "
        "CPU cores. Rerunning resumes finished work.",
    )
    parser.add_argument("--out", default="demo-output", help="output folder (default demo-output)")
    parser.add_argument("--labels", choices=["truth", "watershed"], default="truth",
                        help="ground-truth labels of the synthetic plate (default) or the watershed segmenter")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the plate and the training (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="rebuild the plate and profiles in OUT")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_cluster_options(parser)
    parser.set_defaults(run=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from gradcamo_dask.jobs.demo import format_comparison, format_summary, run_demo
    from gradcamo_dask.errors import GradcamoError

    if args.cluster == "slurm" or _tls_requested(args):
        print("gradcamo-dask demo: use --scheduler for remote clusters; the demo starts local ones only",
              file=sys.stderr)
        return 2
    try:
        result = run_demo(args.out, labels_method=args.labels, scheduler=args.scheduler, n_workers=args.workers,
                          seed=args.seed, overwrite=args.overwrite, progress=not args.quiet)
    except GradcamoError as err:
        print(f"gradcamo-dask demo: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    print()
    print(f"Grad-CAMO of {result['n_cells']} held-out cells: the share of each cell's Grad-CAM attention inside its "
          "own mask. 'uniform map' is what attention spread evenly over the crop scores; a model whose Grad-CAMO is "
          "near it (x uniform ~ 1) is not looking at the cell it describes.")
    print(format_comparison(result["comparison"]))
    print(f"\nBy treatment ({args.out}/summary.csv; cut-off 0.25; NaN = all-zero Grad-CAM map):")
    print(format_summary(result["summary"]))
    t = result["timings"]
    print(f"\nreports: {', '.join(str(p) for p in result['reports'].values())}")
    print("time: " + ", ".join(f"{k} {v:.0f} s" for k, v in t.items()))
    return 0


def _add_score(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "score",
        help="score every cell of a plate: deep features, logits, Grad-CAM and Grad-CAMO into a Zarr store",
        description="Score every cell of a plate with a model bundle, one Dask task per site (crops are built on the "
        "workers, the model is loaded once per worker), and write the profiles resumably to OUT (Zarr): an "
        "interrupted run, rerun with the same arguments, skips the finished sites. OUT holding another plate's or "
        "bundle's results is refused unless --overwrite.",
    )
    parser.add_argument("plate", metavar="PLATE", help="the plate (OME-Zarr HCS, plain Zarr or TIFF; see open_plate)")
    parser.add_argument("--labels", required=True, metavar="LABELS",
                        help="cell labels: a labels store (gradcamo-dask segment), or the plate itself when its fields "
                        "hold labels/ groups")
    parser.add_argument("--model", required=True, metavar="BUNDLE", help="model bundle directory")
    parser.add_argument("--out", required=True, metavar="OUT", help="output Zarr store (path or fsspec URL)")
    parser.add_argument("--layers", nargs="+", default=None, metavar="LAYER",
                        help="Grad-CAM / feature layers (default: the bundle's), e.g. _head_swish _blocks.4.10")
    parser.add_argument("--platemap", default=None, help="platemap CSV (default: the plate's platemap.csv)")
    parser.add_argument("--label-name", default=None, help="which NGFF labels image (default: the first)")
    parser.add_argument("--batch-size", type=int, default=8, help="cells per forward pass (default 8)")
    parser.add_argument("--chunk-cells", type=int, default=512,
                        help="cells per Zarr chunk and per resumable write task (default 512)")
    parser.add_argument("--any-classes", action="store_true",
                        help="score treatments the bundle was not trained on (default: refuse them)")
    parser.add_argument("--classic", choices=["default", "full"], default=None,
                        help="also measure CellProfiler's 3D features (cp_measure) on the same crops and masks: "
                        "'default' (size/shape, intensity, texture; ~0.26 s per cell on one core) or 'full' "
                        "(+ granularity, more texture scales; ~6.7 s per cell; benchmarks/results/bench_classic.md)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it holds other results")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_cluster_options(parser)
    parser.set_defaults(run=_run_score)


def _run_score(args: argparse.Namespace) -> int:
    from gradcamo_dask.errors import GradcamoError
    from gradcamo_dask.profiles.qc import summarize_gradcamo
    from gradcamo_dask.jobs.score import score_plate
    from gradcamo_dask.profiles.store import write_profiles
    from gradcamo_dask.io.plate import open_labels, open_plate

    client = None
    try:
        from gradcamo_dask.io.storage import check_writable, normalize_output_url
        from gradcamo_dask.profiles.store import check_output_store

        _positive(batch_size=args.batch_size, chunk_cells=args.chunk_cells)
        _check_out(args.out, plate=args.plate, labels=args.labels, bundle=args.model, platemap=args.platemap)
        out = normalize_output_url(args.out)  # absolute: workers do not share this working directory
        check_output_store(out, overwrite=args.overwrite)  # a folder of other files is refused before any work
        from gradcamo_dask.jobs.score import cached_bundle

        cached_bundle(args.model, None, "cpu")  # a broken bundle is named before a cluster starts (and stays cached)
        image = open_plate(args.plate, platemap=args.platemap)
        labels = open_labels(args.labels, name=args.label_name, like=image)
        client = _connect(args)
        check_writable(out, client)  # every worker can write OUT, before any site work starts
        # absolute paths (URLs unchanged) in the provenance: the report reads the plate back from any folder
        ds = score_plate(image, labels, normalize_output_url(args.model), layers=args.layers, client=client,
                         batch_size=args.batch_size, check_classes=not args.any_classes,
                         plate_path=normalize_output_url(args.plate), labels_path=normalize_output_url(args.labels),
                         classic={"measurements": args.classic} if args.classic else False)
        print(f"scoring {ds.sizes['cell']} cells of plate {ds.attrs['plate']!r} "
              f"({image.sizes['well']} wells x {image.sizes['site']} sites), layers {', '.join(ds['layer'].values)}")
        report = write_profiles(ds, out, client=client, check=False, overwrite=args.overwrite, chunk_cells=args.chunk_cells,
                                progress=not args.quiet)
    except GradcamoError as err:
        print(f"gradcamo-dask score: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    except FileNotFoundError as err:
        print(f"gradcamo-dask score: {err}", file=sys.stderr)
        return 1
    finally:
        if client is not None:
            client.close()
    print(f"wrote {args.out}: {report['n_cells']} cells in {report['chunks']} chunks "
          f"({report['written']} written now, {report['skipped']} already done) in {report['seconds']:.1f} s")
    if report["n_cells"]:
        from gradcamo_dask.profiles.store import open_profiles

        profiles = open_profiles(out)
        _warn_blank_sites(profiles)
        summary = summarize_gradcamo(profiles)
        print(summary.to_string(index=False))
    return 0


def _warn_blank_sites(profiles) -> None:
    """Say which sites had an all-zero image (their cells carry ``blank_site``; their scores mean nothing)."""
    if "blank_site" not in profiles:
        return
    blank = profiles["blank_site"].values.astype(bool)
    if blank.any():
        sites = sorted({f"{w}/{s}" for w, s in zip(profiles["well"].values[blank], profiles["site"].values[blank])})
        print(f"gradcamo-dask score: warning: {len(sites)} site(s) have a blank (all-zero) image: {', '.join(sites)}; "
              f"their {int(blank.sum())} cells are flagged blank_site = True (filter them out; check the "
              "acquisition)", file=sys.stderr)


def _add_info(commands: argparse._SubParsersAction) -> None:
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


def _add_bench_report(commands: argparse._SubParsersAction) -> None:
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

    checkout = Path(__file__).resolve().parents[1]
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


# workflow order, as `gradcamo-dask --help` lists them
_COMMANDS.extend([_add_synth, _add_segment, _add_train, _add_score, _add_report, _add_info, _add_demo,
                  _add_bench_report])


if __name__ == "__main__":
    sys.exit(main())
