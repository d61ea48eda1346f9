"""Plates at real size: open, cell table, planning and memory per site on a virtual 384-well plate.

On :class:`~gradcamo_dask.io.virtual.VirtualPlate` (sites rendered on demand, nothing
written) this measures, in one run:

* **planning** at 384 x 1, 384 x 3 and 384 x 9 sites of 6 x 21 x 2160 x 2160: time to
  open the plate, to build the cell table from the geometry, the ``score_plate`` graph
  (given that table) and the ``write_profiles`` graph (template written, tasks built,
  nothing run: a recording client stands in for the cluster); tasks in each graph and
  per site; client RSS; the graph submitted to a real scheduler process without
  workers: submission time and scheduler RSS. Targets: full plate planned in <= 30 s
  on 2 cores, client memory <= 2 GB, tasks linear in sites.
* **cell table cost**: a real pass (:func:`~gradcamo_dask.site_cells`) over rendered
  label sites, per site, extrapolated to the plate; its rows are checked against the
  geometry table.
* **memory per site**: one real site of 512, 1080 and 2160 pixels wide scored through
  ``score_plate`` + ``write_profiles`` on a fresh one-worker cluster; peak worker RSS
  (the worker's own high-water mark) above its warm baseline, against the site's raw
  bytes (uint16 image + int32 labels). Target: grows no faster than the raw bytes and
  stays <= 3x them.

Usage::

    python -m benchmarks.bench_scale --quick            # small plate and sites, about a minute
    python -m benchmarks.bench_scale                    # full: writes benchmarks/results/bench_scale.*
    python -m benchmarks.bench_scale --part memory --device cuda --crop 128   # GPU machine

Writes ``bench_scale[_<part>][_cuda][_quick].{json,md,png}`` into ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ["PYTHONPATH"] = f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"

from benchmarks.bench_plate import machine as plate_machine  # noqa: E402
from benchmarks.bench_plate import make_bundle  # noqa: E402

MiB = 2**20


def _rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def _max_rss() -> int:
    """This process's resident-memory high-water mark, bytes, since :func:`_reset_peak` (``VmHWM``; without
    /proc, ``ru_maxrss``: since the process started)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:  # pragma: no cover - not Linux
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _reset_peak() -> bool:
    """Start a new high-water mark (Linux: ``5`` into ``/proc/self/clear_refs``); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:  # pragma: no cover - not Linux, or not allowed
        return False


class _Clock:
    """``with clock("x"):`` records wall seconds ``x_s`` and this process's CPU seconds ``x_cpu_s``.

    CPU seconds of single-threaded planning are what it would take on a quiet machine;
    wall seconds also hold the time other processes took the cores.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str) -> _Clock:
        self._name = name
        return self

    def __enter__(self) -> None:
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def __exit__(self, *exc) -> None:
        self.seconds[f"{self._name}_s"] = round(time.perf_counter() - self._wall, 2)
        self.seconds[f"{self._name}_cpu_s"] = round(time.process_time() - self._cpu, 2)


class RecordingClient:
    """Stands in for a cluster client in ``write_profiles``: keeps the tasks, runs nothing."""

    def __init__(self) -> None:
        self.tasks: list = []

    def compute(self, tasks: list, optimize_graph: bool = False) -> list:
        self.tasks = list(tasks)
        return []

    def gather(self, futures: list) -> list:
        return []


def _graph_size(collections: list) -> int:
    from dask.highlevelgraph import HighLevelGraph

    graphs = [c.__dask_graph__() for c in collections]
    return len(HighLevelGraph.merge(*graphs)) if graphs else 0


# ------------------------------------------------------------------ scheduler


def scheduler_load(tasks: list, tmp: Path) -> dict:
    """Submit ``tasks`` to a fresh scheduler process without workers; its RSS once it holds them."""
    import psutil
    from distributed import Client

    file = tmp / "scheduler.json"
    proc = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--scheduler-file", str(file),
                             "--no-dashboard", "--port", "0", "--host", "127.0.0.1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            if file.exists() and file.stat().st_size:
                break
            time.sleep(0.1)
        with Client(scheduler_file=str(file), timeout=60) as client:
            before = psutil.Process(proc.pid).memory_info().rss
            start = time.perf_counter()
            futures = client.compute(tasks, optimize_graph=False)
            held = 0
            for _ in range(6000):
                held = client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks))
                if held >= len(futures) and client.run_on_scheduler(
                        lambda dask_scheduler: len(dask_scheduler.tasks)) == held:
                    break
                time.sleep(0.05)
            seconds = time.perf_counter() - start
            after = psutil.Process(proc.pid).memory_info().rss
            client.cancel(futures)
        return {"submit_s": round(seconds, 2), "scheduler_tasks": int(held),
                "scheduler_rss_mib": round(after / MiB, 1), "scheduler_rss_growth_mib": round((after - before) / MiB, 1)}
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)


# ------------------------------------------------------------------ planning


def plan_plate(vp, bundle: Path, crop, tmp: Path, scheduler: bool) -> dict:
    """Open, cell table (geometry), score_plate graph and write_profiles graph of one virtual plate."""
    from gradcamo_dask.jobs.score import score_plate
    from gradcamo_dask.profiles.store import write_profiles

    sites = vp.n_wells * vp.n_sites
    rss0 = _rss()
    clock = _Clock()
    with clock("open"):
        image, labels = vp.image(), vp.labels()
    _reset_peak()
    with clock("cell_table_geometry"):
        cells = vp.cell_table(size=crop)
    table_peak = _max_rss()
    planning_peak_own = _reset_peak()  # the peak of planning alone, given the table (the table's own is kept)
    with clock("score_graph"):
        ds = score_plate(image, labels, str(bundle), cells=cells, check_classes=False)
    score_tasks = _graph_size([ds[v].data for v in ds.data_vars])
    recorder = RecordingClient()
    out = tmp / f"plan-{sites}.zarr"
    with clock("write_graph"):
        write_profiles(ds, out, client=recorder, check=False)
    write_tasks = _graph_size(recorder.tasks)
    row = {"wells": vp.n_wells, "sites": sites, "cells": int(ds.sizes["cell"]), **clock.seconds,
           "planning_s": round(clock.seconds["score_graph_s"] + clock.seconds["write_graph_s"], 2),
           "planning_cpu_s": round(clock.seconds["score_graph_cpu_s"] + clock.seconds["write_graph_cpu_s"], 2),
           "image_tasks": _graph_size([image.data]), "score_tasks": score_tasks, "write_tasks": write_tasks,
           "write_tasks_per_site": round(write_tasks / sites, 2),
           "client_rss_mib": round(_rss() / MiB, 1), "client_rss_growth_mib": round((_rss() - rss0) / MiB, 1),
           "client_peak_rss_mib": round(max(_max_rss(), table_peak) / MiB, 1),
           "client_peak_table_mib": round(table_peak / MiB, 1),
           **({"client_peak_planning_mib": round(_max_rss() / MiB, 1)} if planning_peak_own else {}),
           "cell_table_mib": round(cells.memory_usage(deep=True).sum() / MiB, 1)}
    if scheduler:
        row.update(scheduler_load(recorder.tasks, tmp))
    shutil.rmtree(out, ignore_errors=True)
    del ds, cells, recorder
    gc.collect()
    return row


def cell_table_cost(vp, crop, n_sites: int) -> dict:
    """Real passes over rendered label sites: CPU seconds per site, checked against the geometry table."""
    import numpy as np

    from gradcamo_dask.cells import site_cells

    render, passes = [], []
    for k in range(n_sites):
        w, s = divmod(k, vp.n_sites)
        t = time.perf_counter()
        labels = vp.site_labels(w, s)
        render.append(time.perf_counter() - t)
        t = time.process_time()
        table = site_cells(labels, size=crop)
        passes.append(time.process_time() - t)
        expected = vp.site_cells(w, s)
        if len(table) != len(expected) or not np.array_equal(table["object_number"], expected["object_number"]):
            raise RuntimeError(f"site {w}/{s}: the pass found {len(table)} cells, the geometry {len(expected)}")
        del labels
    per_site = float(np.median(passes))
    plate_sites = vp.n_wells * vp.n_sites
    return {"sites_measured": n_sites, "clock": "process CPU seconds (pass), wall (render)",
            "render_labels_s_per_site": round(float(np.median(render)), 3),
            "pass_s_per_site": round(per_site, 3), "plate_sites": plate_sites,
            "plate_pass_s_1_core": round(per_site * plate_sites, 1),
            "plate_pass_s_2_cores": round(per_site * plate_sites / 2, 1),
            "label_mib_per_site": round(vp.site_bytes["labels"] / MiB, 1)}


# ------------------------------------------------------------------ memory per site


def _worker_peaks() -> dict:
    """Run on a worker: its RSS now and high-water mark; CUDA peak when on a GPU."""
    out = {"rss": _rss(), "max_rss": _max_rss()}
    try:
        import torch

        if torch.cuda.is_available():
            out["cuda_peak"] = int(torch.cuda.max_memory_allocated())
    except ImportError:
        pass
    return out


def site_memory(width: int, depth: int, bundle: Path, crop, device: str, tmp: Path,
                memory_limit: int | None = None) -> dict:
    """Score one virtual site ``width`` pixels wide on a fresh one-worker cluster; peak worker memory.

    ``memory_limit`` (bytes) overrides the package's default worker size; a worker
    the nanny kills for memory is reported as such (``failed``), not raised.
    """
    from gradcamo_dask.io.virtual import VirtualPlate
    from gradcamo_dask.jobs.cluster import connect
    from gradcamo_dask.jobs.score import score_plate
    from gradcamo_dask.profiles.store import write_profiles

    warm = VirtualPlate(n_wells=1, n_sites=1, shape_zyx=(depth, 160, 160), seed=7)
    vp = VirtualPlate(n_wells=1, n_sites=1, shape_zyx=(depth, width, width), seed=1)
    raw = vp.site_bytes["image"] + vp.site_bytes["labels"]
    cells = vp.cell_table(size=crop)
    n = len(cells)
    c_z = depth if crop[0] is None else crop[0]
    row = {"width": width, "site_zyx": [depth, width, width], "cells": n, "raw_site_mib": round(raw / MiB, 1),
           "float32_crops_mib": round(n * 6 * c_z * crop[1] * crop[2] * 4 / MiB, 1)}
    import dask
    import distributed  # noqa: F401  (loads its config defaults before the override below)

    options = {"memory_limit": memory_limit} if memory_limit else {}
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}), connect(n_workers=1, threads_per_worker=1, device=device, quiet=True, dashboard=False, **options) as client:
        row["worker_memory_limit_mib"] = round(list(client.scheduler_info()["workers"].values())[0]
                                               ["memory_limit"] / MiB, 1)
        for i, plate in enumerate((warm, vp)):
            out = tmp / f"site-{width}-{i}.zarr"
            if i == 1:
                base = list(client.run(_worker_peaks).values())[0]
            t = time.perf_counter()
            try:
                ds = score_plate(plate.image(), plate.labels(), str(bundle), client=client,
                                 cells=plate.cell_table(size=crop), check_classes=False)
                write_profiles(ds, out, client=client, check=False)
            except Exception as err:  # noqa: BLE001 - a worker killed for memory: that is the finding
                row["failed"] = f"{type(err).__name__}: {str(err)[:200]}"
                return row
            finally:
                shutil.rmtree(out, ignore_errors=True)
            seconds = time.perf_counter() - t
        peak = list(client.run(_worker_peaks).values())[0]
    row.update({"seconds": round(seconds, 2), "cells_per_s": round(n / seconds, 1),
                "worker_baseline_mib": round(base["rss"] / MiB, 1), "worker_peak_mib": round(peak["max_rss"] / MiB, 1),
                "site_peak_mib": round((peak["max_rss"] - base["rss"]) / MiB, 1),
                "site_peak_over_raw": round((peak["max_rss"] - base["rss"]) / raw, 2)})
    if "cuda_peak" in peak:
        row["cuda_peak_mib"] = round(peak["cuda_peak"] / MiB, 1)
    return row


# ------------------------------------------------------------------ report


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"# bench_scale ({result['mode']}{', ' + result['code'] if result.get('code') else ''})", "",
             f"{m['date']} on {m['platform']}, {m['cpus']} CPUs, load {m.get('load_average')}, GPU {m.get('gpu', 'none')}."
             " All figures measured.", ""]
    if result.get("planning"):
        lines += ["## Planning a virtual plate (given the cell table)", "",
                  "| wells x sites | cells | open s | table (geometry) s | score graph s | write graph s | planning s (CPU s) "
                  "| tasks (write graph) | tasks/site | client RSS MiB | client peak MiB (table build / planning) | submit s "
                  "| scheduler RSS MiB |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in result["planning"]:
            lines.append(f"| {r['wells']} x {r['sites'] // r['wells']} | {r['cells']} | {r['open_s']} | "
                         f"{r['cell_table_geometry_s']} | {r['score_graph_s']} | {r['write_graph_s']} | "
                         f"{r['planning_s']} ({r['planning_cpu_s']}) | {r['write_tasks']} | {r['write_tasks_per_site']} | "
                         f"{r['client_rss_mib']} | {r['client_peak_rss_mib']} ({r.get('client_peak_table_mib', '-')} / "
                         f"{r.get('client_peak_planning_mib', '-')}) | {r.get('submit_s', '-')} | "
                         f"{r.get('scheduler_rss_mib', '-')} |")
        lines.append("")
    if result.get("cell_table_cost"):
        c = result["cell_table_cost"]
        lines += [f"Cell table, real pass over labels: {c['pass_s_per_site']} s per site (median of "
                  f"{c['sites_measured']}; rendering the labels took {c['render_labels_s_per_site']} s more), "
                  f"{c['plate_pass_s_1_core']} s for the plate's {c['plate_sites']} sites on one core, "
                  f"{c['plate_pass_s_2_cores']} s on 2 (extrapolated).", ""]
    if result.get("memory"):
        lines += ["## Peak worker memory per site", "", f"Crop {result['settings']['crop']}, model grid "
                  f"{result['settings']['input_shape']}, device {result['settings']['device']}.", "",
                  "| site (z, y, x) | cells | raw site MiB | worker baseline MiB | peak MiB | peak above baseline MiB "
                  "| / raw | float32 crops MiB | cells/s |", "|---|---|---|---|---|---|---|---|---|"]
        for r in result["memory"]:
            if "failed" in r:
                lines.append(f"| {tuple(r['site_zyx'])} | {r['cells']} | {r['raw_site_mib']} | - | worker killed "
                             f"(limit {r['worker_memory_limit_mib']} MiB) | - | - | {r['float32_crops_mib']} | - |")
                continue
            lines.append(f"| {tuple(r['site_zyx'])} | {r['cells']} | {r['raw_site_mib']} | {r['worker_baseline_mib']} "
                         f"| {r['worker_peak_mib']} | {r['site_peak_mib']} | {r['site_peak_over_raw']} | "
                         f"{r['float32_crops_mib']} | {r['cells_per_s']} |")
        lines.append("")
    for line in result.get("verdicts", []):
        lines.append(f"- {line}")
    return "\n".join(lines) + "\n"


def verdicts(result: dict) -> list[str]:
    out = []
    plan = result.get("planning") or []
    if plan:
        full = plan[-1]
        out.append(f"planning {full['sites']} sites: {full['planning_s']} s wall, {full['planning_cpu_s']} s CPU "
                   f"(target <= 30 s), client peak RSS "
                   f"{full['client_peak_rss_mib']} MiB (target <= 2048)")
        per_site = [r["write_tasks_per_site"] for r in plan]
        out.append(f"write-graph tasks per site at {[r['sites'] for r in plan]} sites: {per_site} (linear when equal)")
    mem = [r for r in result.get("memory") or [] if "failed" not in r]
    if len(mem) >= 2:
        ratios = [r["site_peak_over_raw"] for r in mem]
        out.append(f"peak above baseline / raw site bytes at widths {[r['width'] for r in mem]}: {ratios} "
                   f"(target <= 3 and not growing)")
    return out


def save(result: dict, out: Path, stem: str) -> None:
    """Write ``stem.{json,md,png}`` into ``out`` (verdicts and end-of-run load average refreshed)."""
    result["verdicts"] = verdicts(result)
    try:
        result["machine"]["load_average_end"] = list(os.getloadavg())
    except OSError:
        pass
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown(result))
    from benchmarks.report import scale_figure

    figure = scale_figure(result, stem)
    if figure is not None:
        figure.savefig(out / f"{stem}.png", dpi=110)
        import matplotlib.pyplot as plt

        plt.close(figure)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small plate and sites (about a minute)")
    parser.add_argument("--part", choices=["all", "plan", "memory"], default="all")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--crop", type=int, default=64, help="crop width and height, voxels (all z kept)")
    parser.add_argument("--widths", default=None, help="site widths for the memory part, comma-separated")
    parser.add_argument("--plates", default=None, help="plates to plan, e.g. 384x1,384x9 (wells x sites)")
    parser.add_argument("--no-scheduler", action="store_true", help="plan only: do not submit to a scheduler process")
    parser.add_argument("--tag", default="", help="suffix of the output file names")
    parser.add_argument("--memory-limit", type=float, default=None,
                        help="worker memory limit for the memory part, GiB (default: the package's worker size)")
    parser.add_argument("--note", default="", help="what code ran, when it is not this checkout as committed")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args(argv)

    from gradcamo_dask.io.virtual import VirtualPlate

    crop = (None, args.crop, args.crop)
    grid = (8, 32, 32)
    if args.quick:
        depth, plan_sizes, scheduler = 5, [(4, 1), (4, 2), (4, 4)], True
        widths = [int(w) for w in (args.widths or "96,192").split(",")]
        site_zyx = (depth, 256, 256)
    else:
        depth, plan_sizes, scheduler = 21, [(384, 1), (384, 3), (384, 9)], True
        widths = [int(w) for w in (args.widths or "512,1080,2160").split(",")]
        site_zyx = (depth, 2160, 2160)
    scheduler = scheduler and not args.no_scheduler
    if args.plates:
        plan_sizes = [tuple(int(n) for n in p.split("x")) for p in args.plates.split(",")]
    info = plate_machine()
    result = {"benchmark": "bench_scale", "mode": "quick" if args.quick else "full", "part": args.part,
              "machine": info, "measured": True, **({"code": args.note} if args.note else {}),
              "settings": {"site_zyx": list(site_zyx), "crop": list(crop), "input_shape": list(grid),
                           "device": args.device, "command": "python -m benchmarks.bench_scale " + " ".join(argv or
                                                                                                         sys.argv[1:])}}
    stem = "bench_scale" + ("" if args.part == "all" else f"_{args.part}") + \
        ("_cuda" if args.device == "cuda" else "") + ("_quick" if args.quick else "") + args.tag
    tmp = Path(tempfile.mkdtemp(prefix="bench_scale_"))
    try:
        bundle = make_bundle(tmp / "bundle", args.device, grid, crop)
        if args.part in ("all", "plan"):
            result["planning"] = []
            plan_plate(VirtualPlate(n_wells=1, n_sites=1, shape_zyx=(depth, 128, 128)), bundle, crop, tmp, False)  # warm-up
            for wells, sites in plan_sizes:
                vp = VirtualPlate(n_wells=wells, n_sites=sites, shape_zyx=site_zyx)
                row = plan_plate(vp, bundle, crop, tmp, scheduler)
                result["planning"].append(row)
                save(result, Path(args.out), stem)  # after every row: a run cut off keeps what it measured
                print(json.dumps(row), flush=True)
            full = VirtualPlate(n_wells=plan_sizes[-1][0], n_sites=plan_sizes[-1][1], shape_zyx=site_zyx)
            result["cell_table_cost"] = cell_table_cost(full, crop, 2 if args.quick else 3)
            print(json.dumps(result["cell_table_cost"]), flush=True)
        if args.part in ("all", "memory"):
            result["memory"] = []
            for width in widths:
                limit = int(args.memory_limit * 2**30) if args.memory_limit else None
                row = site_memory(width, depth, bundle, crop, args.device, tmp, limit)
                result["memory"].append(row)
                save(result, Path(args.out), stem)
                print(json.dumps(row), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    save(result, Path(args.out), stem)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
