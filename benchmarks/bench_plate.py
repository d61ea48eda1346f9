"""Plate-scale scoring benchmark: cells/s end to end from Zarr and peak worker memory.

For synthetic plates of 1, 4 and 16 sites written as OME-Zarr, time ``score_plate`` +
``write_profiles`` (cell table, crops on the workers, explain, Zarr writes) on a
local cluster, sample every worker's resident memory while it runs, and report:

* cells/s and peak worker RSS per plate size (target: peak growth 16 vs 1 site within 1.3x:
  memory must not grow with the plate, only with a site);
* throughput with 1 and 2 workers on the largest plate;
* ``--device cuda``: one worker per GPU (LocalCUDACluster), the paper's crop (all z x 128 x
  128) and input grid (64 x 224 x 224), features + Grad-CAMO, crops read from Zarr; cells/s
  per GPU (target >= 1,000 on one H100).

Usage::

    python benchmarks/bench_plate.py --quick          # < 3 min on 2 CPU cores
    python benchmarks/bench_plate.py                  # full CPU mode
    python benchmarks/bench_plate.py --device cuda    # GPU machine (benchmarks/gpu_check.sh runs it)

Writes ``benchmarks/results/bench_plate[_cuda][_quick].{json,md}`` with date and machine.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ["PYTHONPATH"] = f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"


def _rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


class PeakMemory:
    """Polls every worker's RSS (bytes) while a run goes on; ``peak`` is the largest seen."""

    def __init__(self, client, every_s: float = 0.25) -> None:
        self.client, self.every, self.peak = client, every_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, *self.client.run(_rss).values())
            except Exception:  # noqa: BLE001 - a worker restarting
                pass
            self._stop.wait(self.every)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def machine() -> dict:
    import torch

    info = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "platform": platform.platform(),
            "python": platform.python_version(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads()}
    try:
        info["load_average"] = list(os.getloadavg())
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def make_bundle(path: Path, device: str, input_shape, crop_shape, seed: int = 0) -> Path:
    import torch

    from gradcamo_dask.engine.bundles import save_bundle
    from gradcamo_dask.engine.models import efficientnet3d

    torch.manual_seed(seed)
    model = efficientnet3d(6, 2, input_shape)
    return save_bundle(path, model.eval(), channels=["DNA", "ER", "RNA", "AGP", "Actin", "Mito"],
                       classes=["control", "compound_10uM"], crop_shape=crop_shape, input_shape=input_shape,
                       normalization={"mean": [0.3] * 6, "std": [0.2] * 6}, layers=["_head_swish"])


def make_plate(path: Path, n_sites: int, site_shape, cell_radius: float) -> Path:
    from gradcamo_dask.io.plate import write_plate
    from gradcamo_dask.io.synthetic import synthetic_plate

    # 2 doses x wells per treatment = wells; wells x sites per well = sites
    per_treatment, per_well = {1: (1, 1), 4: (1, 2), 16: (2, 4)}[n_sites]
    plate = synthetic_plate(doses_um=(0.0, 10.0), wells_per_treatment=per_treatment, sites_per_well=per_well,
                            site_shape=site_shape, cell_radius=cell_radius, seed=1)
    image, labels = plate.image, plate.labels
    if n_sites == 1:
        image, labels = image.isel(well=[0]), labels.isel(well=[0])
    write_plate(path, image, labels)
    return path


def run_once(client, plate: Path, bundle: Path, out: Path, chunk_cells: int) -> dict:
    from gradcamo_dask.jobs.score import score_plate
    from gradcamo_dask.profiles.store import write_profiles
    from gradcamo_dask.io.plate import open_labels, open_plate

    shutil.rmtree(out, ignore_errors=True)
    image = open_plate(plate)
    labels = open_labels(plate, like=image)
    start = time.perf_counter()
    with PeakMemory(client) as memory:
        ds = score_plate(image, labels, bundle, client=client, check_classes=False)
        write_profiles(ds, out, client=client, chunk_cells=chunk_cells)
    seconds = time.perf_counter() - start
    n = int(ds.sizes["cell"])
    return {"sites": int(image.sizes["well"] * image.sizes["site"]), "cells": n, "seconds": round(seconds, 2),
            "cells_per_s": round(n / seconds, 2), "peak_worker_rss_mib": round(memory.peak / 2**20, 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sites and grid (< 3 min on 2 CPU cores)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args(argv)

    from gradcamo_dask.jobs.cluster import connect

    if args.device == "cuda":
        site, radius, crop, grid, sizes = (21, 256, 256), 28.0, (None, 128, 128), (64, 224, 224), (1, 4, 16)
    elif args.quick:
        site, radius, crop, grid, sizes = (9, 96, 96), 12.0, (None, 48, 48), (8, 32, 32), (1, 4, 16)
    else:
        site, radius, crop, grid, sizes = (21, 128, 128), 14.0, (None, 64, 64), (16, 64, 64), (1, 4, 16)
    tmp = Path(tempfile.mkdtemp(prefix="bench_plate_"))
    result = {"benchmark": "bench_plate", "mode": "cuda" if args.device == "cuda" else
              ("quick" if args.quick else "full"), "machine": machine(),
              "settings": {"site_shape": site, "cell_radius": radius, "crop_shape": crop, "input_shape": grid},
              "by_plate_size": [], "by_workers": []}
    try:
        bundle = make_bundle(tmp / "bundle", args.device, grid, crop)
        plates = {n: make_plate(tmp / f"plate{n}.zarr", n, site, radius) for n in sizes}
        workers = [None] if args.device == "cuda" else [2, 1]
        for n_workers in workers:
            with connect(n_workers=n_workers, device=args.device, quiet=True) as client:
                n_now = len(client.scheduler_info()["workers"])
                run_once(client, plates[sizes[0]], bundle, tmp / "warm.zarr", 64)  # model loaded, imports done
                for n in (sizes if n_workers in (2, None) else sizes[-1:]):
                    row = {"workers": n_now, **run_once(client, plates[n], bundle, tmp / f"out{n}.zarr", 64)}
                    (result["by_plate_size"] if n_workers in (2, None) else result["by_workers"]).append(row)
                    print(json.dumps(row), flush=True)
        big = [r for r in result["by_plate_size"] if r["sites"] == sizes[-1]]
        result["by_workers"] = big + result["by_workers"]
        small, large = result["by_plate_size"][0], result["by_plate_size"][-1]
        result["peak_memory_growth_16_vs_1"] = round(large["peak_worker_rss_mib"] / small["peak_worker_rss_mib"], 3)
        if len(result["by_workers"]) == 2:
            two, one = result["by_workers"]
            result["speedup_2_vs_1_workers"] = round(two["cells_per_s"] / one["cells_per_s"], 2)
        if args.device == "cuda":
            result["cells_per_s_per_gpu"] = round(large["cells_per_s"] / max(1, large["workers"]), 1)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "bench_plate" + ("_cuda" if args.device == "cuda" else "") + ("_quick" if args.quick else "")
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# bench_plate ({result['mode']})", "", f"{result['machine']['date']} on {result['machine']['platform']}, "
             f"{result['machine']['cpus']} CPUs, load {result['machine'].get('load_average')}, "
             f"GPU {result['machine'].get('gpu', 'none')}", "",
             f"Sites {site} voxels, crops {crop}, model grid {grid}, EfficientNet-B0 3D, layer _head_swish, "
             "features + Grad-CAMO, end to end from OME-Zarr to a profiles Zarr store.", "",
             "| workers | sites | cells | seconds | cells/s | peak worker RSS (MiB) |", "|---|---|---|---|---|---|"]
    for r in result["by_plate_size"] + result["by_workers"][1:]:
        lines.append(f"| {r['workers']} | {r['sites']} | {r['cells']} | {r['seconds']} | {r['cells_per_s']} | "
                     f"{r['peak_worker_rss_mib']} |")
    lines += ["", f"Peak worker memory, 16 vs 1 site: {result['peak_memory_growth_16_vs_1']}x (target <= 1.3x)."]
    if "speedup_2_vs_1_workers" in result:
        lines.append(f"Throughput 2 vs 1 workers: {result['speedup_2_vs_1_workers']}x.")
    if "cells_per_s_per_gpu" in result:
        lines.append(f"Cells/s per GPU: {result['cells_per_s_per_gpu']} (target >= 1,000 on one H100).")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
