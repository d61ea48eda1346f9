"""``gradcamo-dask score``: score every cell of a plate."""

from __future__ import annotations

import argparse
import sys

from gradcamo_dask.cli.options import add_cluster_options, check_out, connect, positive


def add_command(commands: argparse._SubParsersAction) -> None:
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
    parser.add_argument("--batch-size", type=int, default=32,
                        help="cells per forward pass, a fixed size; batches span the sites of a task (default 32)")
    parser.add_argument("--sites-per-task", type=int, default=1,
                        help="sites scored by one Dask task (default 1): more amortise the scheduler's overhead per "
                        "task (about 25 ms on 2 busy cores) and let the next site be cut while a batch runs; results "
                        "equal one site per task to float rounding")
    parser.add_argument("--chunk-cells", type=int, default=512,
                        help="cells per Zarr chunk and per resumable write task (default 512)")
    parser.add_argument("--any-classes", action="store_true",
                        help="score treatments the bundle was not trained on (default: refuse them)")
    parser.add_argument("--classic", choices=["default", "full"], default=None,
                        help="also measure CellProfiler's 3D features (cp_measure) on the same crops and masks: "
                        "'default' (size/shape, intensity, texture; ~0.26 s per cell on one core) or 'full' "
                        "(+ granularity, more texture scales; ~6.7 s per cell; benchmarks/results/bench_classic.md)")
    parser.add_argument("--cam-method", choices=["gradcam", "hirescam"], default="gradcam",
                        help="the map Grad-CAMO is taken of: 'gradcam' (the paper's, default) or 'hirescam' (gradient "
                        "times activation per voxel, no channel averaging; on the ground-truth benchmark it tells the "
                        "two models apart more clearly, benchmarks/results/bench_attention_grid96_hirescam.md)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it holds other results")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_cluster_options(parser)
    parser.set_defaults(run=_run_score)


def _run_score(args: argparse.Namespace) -> int:
    from gradcamo_dask.errors import GradcamoError
    from gradcamo_dask.profiles.qc import summarize_gradcamo
    from gradcamo_dask.jobs.score import score_plate
    from gradcamo_dask.profiles.store import write_profiles
    from gradcamo_dask.io.plate import open_labels, open_plate

    client = None
    try:
        import functools

        from gradcamo_dask.cli.options import first_worker_wait
        from gradcamo_dask.io.storage import check_writable, normalize_output_url
        from gradcamo_dask.jobs.joining import wait_for_workers
        from gradcamo_dask.jobs.worker_plugins import guard_output_on_join
        from gradcamo_dask.profiles.store import check_output_store

        positive(batch_size=args.batch_size, chunk_cells=args.chunk_cells, sites_per_task=args.sites_per_task)
        check_out(args.out, plate=args.plate, labels=args.labels, bundle=args.model, platemap=args.platemap)
        out = normalize_output_url(args.out)  # absolute: workers do not share this working directory
        check_output_store(out, overwrite=args.overwrite)  # a folder of other files is refused before any work
        from gradcamo_dask.jobs.score import cached_bundle

        cached_bundle(args.model, None, "cpu")  # a broken bundle is named before a cluster starts (and stays cached)
        image = open_plate(args.plate, platemap=args.platemap)
        labels = open_labels(args.labels, name=args.label_name, like=image)
        client = connect(args)
        # every worker can write OUT, before any site work starts (a worker whose lifetime ended since
        # connect() is waited for again, as connect() waits)
        check_writable(out, client, wait_for_first_worker=functools.partial(
            wait_for_workers, timeout=first_worker_wait(args), quiet=args.quiet))
        guard_output_on_join(client, out)  # and every worker that joins later (SLURM jobs replacing ended ones)
        # absolute paths (URLs unchanged) in the provenance: the report reads the plate back from any folder
        ds = score_plate(image, labels, normalize_output_url(args.model), layers=args.layers, client=client,
                         batch_size=args.batch_size, sites_per_task=args.sites_per_task,
                         check_classes=not args.any_classes, cam_method=args.cam_method,
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
