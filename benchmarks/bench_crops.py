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
from machine_info import machine  # benchmarks/ is on sys.path when a script runs

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
    args = parser.parse_args(argv)
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
