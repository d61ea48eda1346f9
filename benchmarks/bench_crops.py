"""Crop extraction benchmark: cells/s at the paper's crop size from a Zarr plate, and peak
memory for plates of 1, 4 and 16 sites.

What it measures (one run, same data, same machine):

* **cells/s**: open the plate (metadata only), build the cell table (one pass over
  each site's labels) and extract 128 x 128 x all-z crops plus central masks with
  :func:`gradcamo_dask.extract_crops` on Dask's threaded scheduler; each site's
  crops are reduced to small per-cell numbers (as a scoring task would return), so
  memory is bounded by the sites in flight, not by the plate.
* **the alternative**: the same crops read cell by cell straight from Zarr (one
  region read of image and labels per cell), what a per-cell data loader does.
* **peak memory**: peak RSS of a fresh subprocess per plate size (1, 4, 16 sites);
  the target is growth within 1.3x from 1 to 16 sites, since work is per site. The
  target is checked with one scheduler thread, so that the 1-site plate has as many
  sites in flight as the 16-site one; the runs with ``--threads`` (default 2) give
  throughput and show the memory of two sites in flight.

Usage::

    python benchmarks/bench_crops.py --quick   # 21 x 256 x 256 sites, < 3 min
    python benchmarks/bench_crops.py           # 21 x 512 x 512 sites

Writes ``benchmarks/results/bench_crops.json`` and ``.md`` (date and machine included).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
import numpy as np

try:
    from machine_info import machine  # benchmarks/ is on sys.path when a script runs
except ImportError:  # imported as benchmarks.bench_crops (tests)
    from benchmarks.machine_info import machine

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SIZES = (1, 4, 16)
CROP = (None, 128, 128)


def _peak_rss_mib() -> float:
    """Peak resident memory of this process, MiB.

    ``VmHWM`` from /proc is reset by exec; ``ru_maxrss`` (the fallback) can carry the
    forking parent's peak into a fresh child on Linux.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0  # kB
    except OSError:  # pragma: no cover - not Linux
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _select_sites(image, n: int):
    """The first ``n`` sites in (well, site) order, as whole wells of 4 sites where possible."""
    per_well = image.sizes["site"]
    wells = max(1, n // per_well)
    return image.isel(well=slice(0, wells), site=slice(0, min(n, per_well)))


def worker(plate_path: str, n_sites: int, threads: int, naive: bool) -> dict:
    """Runs in a fresh subprocess: open, table, crops on the threaded scheduler."""
    import dask
    import numpy as np
    import zarr

    from gradcamo_dask import cell_table, extract_crops, open_labels, open_plate
    from gradcamo_dask.cells import crop_windows

    dask.config.set(scheduler="threads", num_workers=threads)
    baseline = _peak_rss_mib()
    start = time.perf_counter()
    image = _select_sites(open_plate(plate_path), n_sites)
    labels = _select_sites(open_labels(plate_path), n_sites)
    t_open = time.perf_counter() - start

    start = time.perf_counter()
    cells = cell_table(labels, size=CROP)
    t_table = time.perf_counter() - start
    start = time.perf_counter()
    crops, masks = extract_crops(image, labels, cells, size=CROP)
    per_cell_mean, per_cell_volume = dask.compute(crops.mean(axis=(1, 2, 3, 4)), masks.sum(axis=(1, 2, 3)))
    t_crops = time.perf_counter() - start
    assert len(per_cell_mean) == len(cells) and (per_cell_volume > 0).all()
    out = {
        "sites": int(image.sizes["well"] * image.sizes["site"]), "cells": int(len(cells)),
        "open_s": t_open, "table_s": t_table, "crops_s": t_crops,
        "cells_per_s": len(cells) / (t_table + t_crops), "crop_cells_per_s": len(cells) / t_crops,
        "rss_after_imports_mib": baseline, "peak_rss_mib": _peak_rss_mib(),
    }
    if naive:
        # The alternative: one Zarr region read of image and labels per cell.
        root = zarr.open_group(plate_path, mode="r")
        wells = [str(w) for w in image["well"].values]
        shape = tuple(image.sizes[d] for d in "zyx")
        start = time.perf_counter()
        checksum = 0.0
        for row in cells.itertuples():
            r, c = row.well[0], int(row.well[1:])
            field = root[f"{r}/{c}/{row.site}"]
            lo, hi = crop_windows(np.array([[row.center_z, row.center_y, row.center_x]]), CROP, shape)
            a, b = np.maximum(lo[0], 0), np.minimum(hi[0], shape)
            img = field["0"][:, :, a[1]:b[1], a[2]:b[2]].astype(np.float32)
            lab = field["labels/cells/0"][0, :, a[1]:b[1], a[2]:b[2]] == row.object_number
            checksum += float(img.mean()) + float(lab.sum())
        t_naive = time.perf_counter() - start
        out.update(naive_cells_per_s=len(cells) / t_naive, naive_s=t_naive, wells=len(wells))
    return out

def per_cell_crops(image, labels, cells, size):
    """Crops and masks cut as before the batched gather (one slice copy per cell, gradcamo-dask 8879fac).

    Kept as the reference that ``crop_site`` must equal bit for bit (tests/test_crop_gather.py) and as the
    "before" of ``--host``.
    """
    from gradcamo_dask.crop_geometry import crop_shape, crop_windows

    ids = np.asarray(cells["object_number"], dtype=np.int64)
    centers = np.stack([np.asarray(cells[f"center_{a}"], dtype=float) for a in "zyx"], axis=1)
    shape = tuple(labels.shape)
    dz, dy, dx = crop_shape(size, shape)
    crops = np.zeros((len(ids), image.shape[0], dz, dy, dx), dtype=np.float32)
    masks = np.zeros((len(ids), dz, dy, dx), dtype=bool)
    start, stop = crop_windows(centers, size, shape)
    lo, hi = np.maximum(start, 0), np.minimum(stop, shape)
    for i in range(len(ids)):
        src = tuple(slice(a, b) for a, b in zip(lo[i], hi[i]))
        dst = tuple(slice(a - s, b - s) for a, b, s in zip(lo[i], hi[i], start[i]))
        crops[(i, slice(None), *dst)] = image[(slice(None), *src)]
        masks[(i, *dst)] = labels[src] == int(ids[i])
    return crops, masks


def normalize_crops_before(crops, normalization):
    """Normalisation as before the in-place micro-batch version (gradcamo-dask 3343d85): one temporary per step.

    Kept as the reference that ``normalize_crops`` must equal (tests/test_normalize.py) and as the "before"
    of ``--host``.
    """
    x = crops.astype(np.float32)
    lo = x.min(axis=(2, 3, 4), keepdims=True)
    span = x.max(axis=(2, 3, 4), keepdims=True) - lo
    span = span + (span == 0)
    m = np.asarray(normalization["mean"], dtype=np.float32).reshape(1, -1, 1, 1, 1)
    s = np.asarray(normalization["std"], dtype=np.float32).reshape(1, -1, 1, 1, 1)
    return ((x - lo) / span - m) / s


def host_cost(site_shape: tuple[int, int, int], sizes: list, batch: int = 32, repeats: int = 5) -> dict:
    """Host ms per cell of cutting crops (per-cell slicing vs batched gather) and normalising them, one thread.

    One in-memory synthetic site (6 channels uint16); cells cut in batches of ``batch`` as the feeder does;
    median of ``repeats`` runs of the whole site.
    """
    import dask
    import torch

    from gradcamo_dask import synthetic_plate
    from gradcamo_dask.cells import crop_site, site_cells
    from gradcamo_dask.normalize import normalize_crops

    torch.set_num_threads(1)
    plate = synthetic_plate(doses_um=(0.0,), wells_per_treatment=1, sites_per_well=1, site_shape=site_shape, seed=0)
    image, labels = dask.compute(plate.image.data[0, 0], plate.labels.data[0, 0])
    rows = []
    for size in sizes:
        cells = site_cells(labels, size=size, drop_border=False)
        parts = [cells.iloc[i:i + batch].reset_index(drop=True) for i in range(0, len(cells), batch)]
        norm = {"mean": [0.0] * image.shape[0], "std": [1.0] * image.shape[0]}
        timing = {}
        for name, cut in (("per_cell_slicing", lambda p: per_cell_crops(image, labels, p, size)),
                          ("batched_gather", lambda p: crop_site(image, labels, p, size))):
            runs = []
            for _ in range(repeats):
                start = time.perf_counter()
                for p in parts:
                    cut(p)
                runs.append(time.perf_counter() - start)
            timing[name] = 1000 * float(np.median(runs)) / len(cells)
        crops = crop_site(image, labels, parts[0], size)[0]
        for name, scale in (("normalize_before", lambda c: normalize_crops_before(c, norm)),
                            ("normalize", lambda c: normalize_crops(c, norm)),
                            ("normalize_in_place", lambda c: normalize_crops(c, norm, overwrite=True))):
            runs = []
            for _ in range(repeats):
                fresh = crops.copy()  # a fresh micro-batch each run, as the feeder cuts one
                start = time.perf_counter()
                scale(fresh)
                runs.append(time.perf_counter() - start)
            timing[name] = 1000 * float(np.median(runs)) / len(parts[0])
        rows.append({"crop": ["all z" if n is None else n for n in size], "cells": int(len(cells)),
                     "padded_cells": int(cells["crop_padded"].sum()), **{f"{k}_ms_per_cell": v for k, v in timing.items()},
                     "speedup": timing["per_cell_slicing"] / timing["batched_gather"],
                     "normalize_speedup": timing["normalize_before"] / timing["normalize_in_place"]})
        print(rows[-1], flush=True)
    import gradcamo_dask

    return {"site_shape_zyx": list(site_shape), "channels": int(image.shape[0]), "batch": batch, "rows": rows,
            "package_version": gradcamo_dask.__version__}  # a version, never this machine's path


def _host_markdown(result: dict) -> str:
    h, m = result["host"], result["machine"]
    lines = ["# bench_crops --host: host ms per cell of cutting and normalising crops", "",
             f"- date: {result['date']}; load before/after {result['load_before']} / {result['load_after']}",
             f"- machine: {m['platform']}, {m['cpu_count']} CPUs, torch threads 1, GPU {m['gpu']}",
             f"- one in-memory synthetic site of {h['site_shape_zyx']} voxels x {h['channels']} channels uint16; "
             f"cells cut {h['batch']} at a time (as the feeder does), border cells kept (padded windows included); "
             "median of 5 runs. Normalise: one micro-batch of 32 crops, float32; before = one temporary per step "
             "(3343d85), copy = the vectorised version leaving the crops as they are, in place = what the feeder "
             "runs on the batch it just cut. All figures measured.", "",
             "| crop (z, y, x) | cells (padded) | per-cell slicing ms/cell | batched gather ms/cell | speed-up | "
             "normalise before ms/cell | normalise (copy) ms/cell | normalise in place ms/cell | speed-up |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in h["rows"]:
        lines.append(f"| {r['crop']} | {r['cells']} ({r['padded_cells']}) | {r['per_cell_slicing_ms_per_cell']:.3f} | "
                     f"{r['batched_gather_ms_per_cell']:.3f} | {r['speedup']:.2f}x | {r['normalize_before_ms_per_cell']:.3f} | "
                     f"{r['normalize_ms_per_cell']:.3f} | {r['normalize_in_place_ms_per_cell']:.3f} | "
                     f"{r['normalize_speedup']:.2f}x |")
    return "\n".join(lines) + "\n"


def _write_plate(path: Path, site_shape: tuple[int, int, int]) -> dict:
    from gradcamo_dask import synthetic_plate, write_plate

    plate = synthetic_plate(doses_um=(0.0, 10.0), wells_per_treatment=2, sites_per_well=4, site_shape=site_shape,
                            seed=0)
    start = time.perf_counter()
    write_plate(path, plate.image, plate.labels)
    return {"site_shape_zyx": list(site_shape), "sites": 16, "write_s": time.perf_counter() - start,
            "bytes_per_site": int(plate.image.nbytes // 16)}


def _markdown(result: dict) -> str:
    m, p = result["machine"], result["plate"]
    lines = [
        "# bench_crops: crop extraction from a Zarr plate", "",
        f"- date: {result['date']}; mode: {result['mode']}",
        f"- machine: {m['platform']}, {m['cpu_count']} CPUs, torch threads {m['torch_threads']}, GPU {m['gpu']}",
        f"- plate: synthetic OME-Zarr 0.5, 16 sites of {p['site_shape_zyx']} voxels x 6 channels uint16 "
        f"({p['bytes_per_site'] / 2**20:.0f} MiB per site); crops 128 x 128 x all z, float32, with central "
        f"masks; threaded scheduler; one fresh subprocess per row",
        "",
        "| threads | sites | cells | table s | crops s | cells/s (table + crops) | per-cell Zarr reads cells/s "
        "| speed-up | RSS after imports MiB | peak RSS MiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["runs"]:
        naive = r.get("naive_cells_per_s")
        naive_text = f"{naive:.1f}" if naive else "-"
        speedup = f"{r['cells_per_s'] / naive:.1f}x" if naive else "-"
        lines.append(
            f"| {r['threads']} | {r['sites']} | {r['cells']} | {r['table_s']:.2f} | {r['crops_s']:.2f} | {r['cells_per_s']:.1f} | "
            f"{naive_text} | {speedup} | {r['rss_after_imports_mib']:.0f} | {r['peak_rss_mib']:.0f} |")
    g = result["peak_memory_growth_1_to_16"]
    t = result["threads"]
    lines += [
        "",
        f"Peak memory growth from 1 to 16 sites, one thread: **{g:.2f}x** (target <= 1.3x: "
        f"{'met' if g <= 1.3 else 'NOT met'}). With {t} threads: "
        f"{result['peak_memory_growth_1_to_16_at_threads']:.2f}x from 1 to 16 sites (a 1-site plate keeps only one "
        f"thread busy) and {result['peak_memory_growth_4_to_16_at_threads']:.2f}x from 4 to 16 sites.",
        "",
        "Timings are noisy on shared machines; compare ratios within one run.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="21 x 256 x 256 sites (< 3 min)")
    parser.add_argument("--threads", type=int, default=2, help="threads of the threaded scheduler (default 2)")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="folder for the JSON and Markdown")
    parser.add_argument("--worker", nargs=2, metavar=("PLATE", "SITES"), help=argparse.SUPPRESS)
    parser.add_argument("--naive", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--host", action="store_true",
                        help="only the host ms per cell of cutting crops (before/after the batched gather)")
    args = parser.parse_args(argv)
    if args.host:
        load = os.getloadavg()
        host = host_cost((21, 512, 512), [(None, 128, 128), (None, 48, 48)])
        result = {"benchmark": "bench_crops_host", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                  "machine": machine(), "load_before": [round(v, 2) for v in load],
                  "load_after": [round(v, 2) for v in os.getloadavg()], "host": host}
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_crops_host.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out / "bench_crops_host.md").write_text(_host_markdown(result))
        print(_host_markdown(result))
        return 0
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.threads, args.naive)))
        return 0

    site_shape = (21, 256, 256) if args.quick else (21, 512, 512)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory(prefix="bench_crops-") as tmp:
        plate_path = Path(tmp) / "plate.zarr"
        print(f"writing a 16-site plate of {site_shape} to {plate_path} ...", flush=True)
        plate = _write_plate(plate_path, site_shape)
        runs = {}
        for threads in sorted({1, args.threads}):
            runs[threads] = []
            for n in SIZES:
                cmd = [sys.executable, __file__, "--worker", str(plate_path), str(n), "--threads", str(threads)]
                if n == 4 and threads == args.threads:
                    cmd.append("--naive")
                done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
                if done.returncode != 0:
                    print(done.stderr, file=sys.stderr)
                    return 1
                r = json.loads(done.stdout.strip().splitlines()[-1])
                r["threads"] = threads
                runs[threads].append(r)
                print(f"{threads} thread(s), {n:>2} sites: {r['cells']} cells, {r['cells_per_s']:.1f} cells/s, "
                      f"peak RSS {r['peak_rss_mib']:.0f} MiB", flush=True)
    result = {
        "benchmark": "bench_crops", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "mode": "quick" if args.quick else "full", "machine": machine(), "threads": args.threads,
        "crop_size": ["all z", 128, 128], "plate": plate, "runs": runs[1] + (runs[args.threads] if args.threads != 1 else []),
        "peak_memory_growth_1_to_16": runs[1][-1]["peak_rss_mib"] / runs[1][0]["peak_rss_mib"],
        "peak_memory_growth_1_to_16_at_threads": runs[args.threads][-1]["peak_rss_mib"] / runs[args.threads][0]["peak_rss_mib"],
        "peak_memory_growth_4_to_16_at_threads": runs[args.threads][-1]["peak_rss_mib"] / runs[args.threads][1]["peak_rss_mib"],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_crops.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "bench_crops.md").write_text(_markdown(result))
    print(_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
