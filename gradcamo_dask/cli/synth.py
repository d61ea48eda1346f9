"""``gradcamo-dask synth``: write a synthetic plate."""

from __future__ import annotations

import argparse
import json
import sys

from gradcamo_dask.cli.options import check_out


def add_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "synth",
        help="write a synthetic 3D (or, with --2d, 2D) Cell Painting plate (OME-Zarr 0.5 HCS) with ground-truth labels",
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
    parser.add_argument("--no-bystanders", dest="bystanders", action="store_false",
                        help="with --mosaic: leave the non-responding cells out, so each responder stands alone (a "
                        "sparsely seeded well) with the geometry it has in the full mosaic plate of the same seed: the "
                        "clean plate, whose crops hold treatment information only in their own cell")
    parser.add_argument("--granules", type=float, default=0.0,
                        help="0..1: brightness of RNA granules (puncta 2-4 px across) in the cytoplasm of responding "
                        "cells, a strong local phenotype that small models learn in a few epochs and attend to inside "
                        "the cell (default 0: none; the demo and bench_attention use 1)")
    parser.add_argument("--compounds", type=int, default=1, metavar="N",
                        help="1-3 compounds, each at every non-zero dose (control shared); they differ only in where "
                        "their granules show: A in RNA, B in AGP, C in Mito, so with --granules and --doses 10 two "
                        "compounds make two classes that both have local evidence (default 1; bench_attention and "
                        "the demo use 2)")
    parser.add_argument("--doses", type=float, nargs="+", default=None, metavar="UM",
                        help="doses in µM, 0 = control (default 0 0.1 0.3 1 3 10)")
    parser.add_argument("--wells-per-treatment", type=int, default=2, help="replicate wells per dose (default 2)")
    parser.add_argument("--sites", type=int, default=4, help="sites (fields) per well (default 4)")
    parser.add_argument("--site-shape", type=int, nargs="+", default=None, metavar="N",
                        help="site size in voxels, Z Y X (default 21 256 256); with --2d, Y X pixels (default 256 256)")
    parser.add_argument("--2d", dest="two_d", action="store_true",
                        help="a 2D plate (z of length 1): every site is rendered in 3D at 8 slices with the same "
                        "phenotype, --mosaic, --granules and --confounder, then the plane just above the coverslip is "
                        "kept (it holds every cell's whole footprint; a maximum projection would smear the off-cell "
                        "confounder into the cells); labels are the same plane of the 3D ground truth")
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
        check_out(args.out, option="OUT")  # no inputs; resolves the real path like every writing command
        site_shape = args.site_shape or ((256, 256) if args.two_d else (21, 256, 256))
        plate = synthetic_plate(
            doses_um=args.doses or DEFAULT_DOSES_UM, wells_per_treatment=args.wells_per_treatment,
            sites_per_well=args.sites, site_shape=tuple(site_shape), seed=args.seed,
            confounder=args.confounder, mosaic=args.mosaic, granules=args.granules, compounds=args.compounds,
            plate=args.plate, spatial_dims=2 if args.two_d else 3, bystanders=args.bystanders,
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
