"""``gradcamo-dask train``: train the 3D feature extractor."""

from __future__ import annotations

import argparse
import json
import sys

from gradcamo_dask.cli.options import check_out, positive


def _add_well_selection(parser: argparse.ArgumentParser, role: str, noun: str, default: str,
                        examples: dict[str, str]) -> None:
    """``--ROLE-wells``, ``--ROLE-columns`` and ``--ROLE-rows``: one side of the leave-wells-out split,
    by well names, plate column numbers or row letters."""
    parser.add_argument(f"--{role}-wells", nargs="+", default=None, metavar="WELL",
                        help=f"{noun} wells{examples.get('wells', '')} ({default})")
    for kind, metavar, type_ in (("columns", "COLUMN", int), ("rows", "ROW", None)):
        parser.add_argument(f"--{role}-{kind}", type=type_, nargs="+", default=None, metavar=metavar,
                            help=f"{noun} {kind}{examples.get(kind, '')} (instead of --{role}-wells)")


def add_command(commands) -> None:
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
    parser.add_argument("--input-shape", type=int, nargs="+", default=[64, 224, 224], metavar="N",
                        help="model input grid Z Y X, voxels (default 64 224 224; e.g. 16 48 48 on a CPU); on a 2D "
                        "plate (one z slice) Y X (default 224 224), and efficientnet2d is trained")
    parser.add_argument("--epochs", type=int, default=50, help="most epochs (early stopping may end sooner)")
    parser.add_argument("--batch-size", type=int, default=8, help="cells per training step (paper: 8)")
    parser.add_argument("--lr", type=float, default=3e-4, help="Adam learning rate (default 3e-4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, shuffling, augmentations and weights")
    _add_well_selection(parser, "test", "held-out test", "default: each treatment's last well",
                        {"wells": ", e.g. C02 C03", "columns": ", e.g. 3", "rows": ", e.g. C"})
    _add_well_selection(parser, "train", "training", "default: every well not held out", {})
    parser.add_argument("--val-fraction", type=float, default=0.1,
                        help="share of training cells set aside for early stopping")
    parser.add_argument("--max-train-cells", type=int, default=None,
                        help="train on at most this many cells (a seeded subset; default: all)")
    parser.add_argument("--patience", type=int, default=5, help="early-stopping patience in epochs; 0: none")
    parser.add_argument("--no-augment", action="store_true", help="switch the augmentations off")
    parser.add_argument("--regularizer", type=float, default=0.0, metavar="LAMBDA",
                        help="weight of the Grad-CAMO regulariser (default 0: plain cross-entropy)")
    parser.add_argument("--regularizer-layer", default=None, help="its Grad-CAM layer (default: the model's)")
    parser.add_argument("--regularizer-evidence", choices=("positive", "both"), default="positive",
                        help="map the regulariser scores: Grad-CAM (positive, the paper's) or |map| before its ReLU "
                        "(both: evidence against the class must lie in the cell too)")
    parser.add_argument("--regularizer-cam", choices=("gradcam", "hirescam"), default="gradcam",
                        help="map the regulariser scores: Grad-CAM (the paper's) or HiResCAM (gradient times "
                        "activation per voxel)")
    parser.add_argument("--layers", nargs="+", default=None, help="default Grad-CAM layers stored in the bundle")
    parser.add_argument("--intensity-scaling", choices=("crop", "plate"), default="crop",
                        help="crop (default, the paper's): min-max of each crop's channels; plate: one fixed range "
                        "per channel fitted on the training sites, so a neighbour's bright phenotype cannot change "
                        "the cell's own intensities")
    parser.add_argument("--crop-fill", choices=("zero", "background"), default="zero",
                        help="what fills crop windows past the site: zero (default) or the site's background level "
                        "per channel (the zero step draws Grad-CAM mass; stored in the bundle for scoring)")
    parser.add_argument("--init-from", default=None, metavar="BUNDLE",
                        help="start from this bundle's weights and normalisation (fine-tuning, e.g. --regularizer "
                        "on a plain run's bundle); same channels, classes and --intensity-scaling; only read")
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
    if len(args.input_shape) not in (2, 3):
        raise InputError(f"--input-shape takes Z Y X (or Y X for a 2D plate), got {args.input_shape}")
    split = Split(test_wells=args.test_wells, test_columns=args.test_columns, test_rows=args.test_rows,
                  train_wells=args.train_wells, train_columns=args.train_columns, train_rows=args.train_rows,
                  val_fraction=args.val_fraction, max_train_cells=args.max_train_cells)
    return Recipe(crop_size=(None, *crop) if len(crop) == 2 else tuple(crop), input_shape=tuple(args.input_shape),
                  epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr, seed=args.seed, split=split,
                  patience=args.patience or None, augmentation=None if args.no_augment else Augmentation(),
                  regularizer=args.regularizer, regularizer_layer=args.regularizer_layer, layers=args.layers,
                  regularizer_evidence=args.regularizer_evidence, regularizer_cam=args.regularizer_cam,
                  intensity_scaling=args.intensity_scaling, crop_fill=args.crop_fill,
                  init_from=args.init_from)


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
        check_out(args.out, plate=args.plate, labels=args.labels, platemap=args.platemap, bundle=args.init_from)
        from gradcamo_dask.io.safety import check_output_folder

        # a bundle, its checkpoint and cell list only: never mixed into (or over) a user's own files
        check_output_folder(args.out, {"config.json", "model.safetensors", "cells.csv", "checkpoint"},
                            what="a gradcamo-dask training output")
        positive(batch_size=args.batch_size, epochs=args.epochs)
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
