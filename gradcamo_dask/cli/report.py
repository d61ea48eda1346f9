"""``gradcamo-dask report``: write the Grad-CAMO report of a profiles store."""

from __future__ import annotations

import argparse
import sys

from gradcamo_dask.engine.gradcamo import DEFAULT_CUTOFF
from gradcamo_dask.cli.options import check_out


def add_command(commands: argparse._SubParsersAction) -> None:
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
        check_out(args.out, profiles=args.profiles, plate=args.plate, labels=args.labels)
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
