"""``gradcamo-dask compare``: rank model bundles and layers by Grad-CAMO on the same held-out cells."""

from __future__ import annotations

import argparse
import sys

from gradcamo_dask.cli.options import check_out, positive
from gradcamo_dask.engine.gradcamo import DEFAULT_CUTOFF


def add_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "compare",
        help="rank several model bundles and layers by Grad-CAMO on the same held-out cells",
        description="Score the same cells (the test wells every bundle names in its training provenance, else all "
        "cells) with each bundle, one pass per model over all its layers, and rank (model, layer) by mean "
        "Grad-CAMO: mean ± sd, share at or above the cut-off, accuracy and copairs mAP, each beside its reference "
        "(uniform map, chance). Prints the ranking and writes OUT/compare.csv, compare.md and compare.html.",
    )
    parser.add_argument("plate", metavar="PLATE", help="the plate (OME-Zarr HCS, plain Zarr or TIFF; see open_plate)")
    parser.add_argument("--labels", default=None, metavar="LABELS",
                        help="cell labels (default: the plate itself, when its fields hold labels/ groups)")
    parser.add_argument("--models", nargs="+", required=True, metavar="BUNDLE", help="model bundle directories")
    parser.add_argument("--layers", nargs="+", default=None, metavar="LAYER",
                        help="layers or ViT attention sources (cls_attention, rollout, gradcam_tokens), each used by "
                        "the models that have it (default: each bundle's own layers)")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for compare.csv, compare.md, compare.html")
    parser.add_argument("--platemap", default=None, help="platemap CSV (default: the plate's platemap.csv)")
    parser.add_argument("--cutoff", type=float, default=DEFAULT_CUTOFF, help="Grad-CAMO cut-off (default %(default)s)")
    parser.add_argument("--max-cells", type=int, default=2000, help="cells drawn at random when more are held out "
                        "(default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="cells per forward pass (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the cell draw (default 0)")
    parser.set_defaults(run=_run_compare)


def _run_compare(args: argparse.Namespace) -> int:
    from gradcamo_dask.errors import GradcamoError
    from gradcamo_dask.io.plate import open_labels, open_plate
    from gradcamo_dask.jobs.compare import compare_models, write_comparison

    try:
        positive(batch_size=args.batch_size, max_cells=args.max_cells)
        check_out(args.out, plate=args.plate, labels=args.labels, platemap=args.platemap,
                  **{f"model {i + 1}": m for i, m in enumerate(args.models)})
        image = open_plate(args.plate, platemap=args.platemap)
        labels = open_labels(args.labels or args.plate, like=image)
        table = compare_models(image, labels, args.models, args.layers, cutoff=args.cutoff,
                               max_cells=args.max_cells, batch_size=args.batch_size, seed=args.seed)
        paths = write_comparison(table, args.out, plate=str(image.attrs.get("plate", "plate")))
    except GradcamoError as err:
        print(f"gradcamo-dask compare: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    except FileNotFoundError as err:
        print(f"gradcamo-dask compare: {err}", file=sys.stderr)
        return 1
    print(table.round(3).to_string(index=False))
    print(f"wrote {paths['csv']}, {paths['markdown']} and {paths['html']}")
    return 0
