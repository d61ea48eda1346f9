"""Cost of the input identity in the profiles fingerprint, against reading the pixels it stands for.

The identity (:func:`gradcamo_dask.io.identity.input_identity`) stats every file of a
plate and reads no pixel. This benchmark writes plain-Zarr plates (6 channels x 9 z,
one chunk per site, random uint16) of 4 and 16 sites at 64 x 64 and 256 x 256 voxels
per slice, and times in one run, per plate: the identity (median of 5) and reading every
pixel once (what a content hash would at least cost). Ratios, not absolute times, are the
result: the identity must not grow with bytes per site, only with the number of files.

Usage: ``python -m benchmarks.bench_identity [--out benchmarks/results]``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

from benchmarks.machine_info import machine
from gradcamo_dask.io.identity import input_identity


def _plate(path: Path, sites: int, xy: int) -> int:
    rng = np.random.default_rng(0)
    group = zarr.open_group(path, mode="w")
    array = group.create_array("image", shape=(1, sites, 6, 9, xy, xy), chunks=(1, 1, 6, 9, xy, xy), dtype="uint16")
    for s in range(sites):
        array[0, s] = rng.integers(0, 4096, (6, 9, xy, xy), dtype=np.uint16)
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for sites in (4, 16):
            for xy in (64, 256):
                path = Path(tmp) / f"p{sites}_{xy}.zarr"
                nbytes = _plate(path, sites, xy)
                files = sum(1 for f in path.rglob("*") if f.is_file())
                identity = _median_seconds(lambda: input_identity(path), 5)
                read = _median_seconds(lambda: np.asarray(zarr.open_group(path, mode="r")["image"][:]).sum(), 1)
                rows.append({"sites": sites, "xy": xy, "files": files, "bytes": nbytes, "identity_s": identity,
                             "read_all_pixels_s": read, "read_over_identity": read / identity})
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine(), "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_identity.json").write_text(json.dumps(result, indent=2) + "\n")
    m = result["machine"]
    lines = ["# Input identity vs reading the pixels", "",
             f"- date: {result['date']}", f"- machine: {m['platform']}, {m['cpu_count']} CPUs (shared, busy)",
             "- command: `python -m benchmarks.bench_identity`", "",
             "| sites | y x | files | MB | identity (ms) | read all pixels (ms) | read / identity |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['sites']} | {r['xy']}x{r['xy']} | {r['files']} | {r['bytes'] / 1e6:.1f} | "
                     f"{r['identity_s'] * 1e3:.2f} | {r['read_all_pixels_s'] * 1e3:.1f} | {r['read_over_identity']:.0f} |")
    (out / "bench_identity.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
