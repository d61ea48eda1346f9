"""Classic-feature cost per cell: what each cp_measure measurement costs on the paper's crops.

What it measures (one run, same cells, same machine): seconds per cell of
:func:`gradcamo_dask.profiles.classic.site_classic_features` for each measurement alone
(size/shape once per cell; intensity, texture at scale 3 and granularity on one channel,
then times the channel count) and for the two sets, ``"default"`` (size/shape,
intensity and texture at scale 3 on all 6 channels) and ``"full"`` (plus granularity,
texture at scales 3, 5 and 10). The alternative it compares with is the same
measurements on the untrimmed 21 x 128 x 128 crop (what calling cp_measure on the crop
directly costs), to show what trimming each crop to the cell's box saves.

Cells: crops of a synthetic plate (21 x 256 x 256 sites, cell radius 28 px, as the
synthetic default), 128 x 128 x all-z crops, as the model sees them.

Usage::

    python benchmarks/bench_classic.py --quick   # 6 cells, < 3 min
    python benchmarks/bench_classic.py           # 32 cells

Writes ``benchmarks/results/bench_classic.json`` and ``.md`` (date and machine included).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path
from machine_info import machine  # benchmarks/ is on sys.path when a script runs

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

SPACING = (1.1115, 0.65, 0.65)

def _cells(n_cells: int):
    import numpy as np

    from gradcamo_dask import cell_table, synthetic_plate
    from gradcamo_dask.cells import crop_site

    plate = synthetic_plate(doses_um=(0, 10), wells_per_treatment=1, sites_per_well=2)
    cells = cell_table(plate.labels, plate.platemap)
    crops, masks = [], []
    for (well, site), rows in cells.groupby(["well", "site"], sort=False):
        image = plate.image.sel(well=well, site=site).values
        labels = plate.labels.sel(well=well, site=site).values
        c, m = crop_site(image, labels, rows, (None, 128, 128))
        crops.append(c)
        masks.append(m)
        if sum(len(x) for x in crops) >= n_cells:
            break
    crops, masks = np.concatenate(crops)[:n_cells], np.concatenate(masks)[:n_cells]
    return crops, masks, [str(c) for c in plate.image["c"].values]


def _time(fn, repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def run(n_cells: int) -> dict:
    from gradcamo_dask.profiles.classic import site_classic_features

    crops, masks, channels = _cells(n_cells)
    n = len(crops)
    site_classic_features(crops[:1], masks[:1], channels, SPACING, measurements="full")  # warm-up (imports)
    one = channels[:1]
    rows = []
    for name, kwargs, per_channel in (
        ("sizeshape", {"measurements": ["sizeshape"]}, False),
        ("intensity", {"measurements": ["intensity"]}, True),
        ("texture (scale 3)", {"measurements": ["texture"], "texture_scales": (3,)}, True),
        ("granularity", {"measurements": ["granularity"]}, True),
    ):
        sub, chans = crops[:, :1], one  # one channel; per-channel costs scale with the channel count
        trimmed = _time(lambda: site_classic_features(sub, masks, chans, SPACING, **kwargs)) / n
        untrimmed = _time(lambda: site_classic_features(sub, masks, chans, SPACING, margin=10_000, **kwargs)) / n
        names, _ = site_classic_features(sub[:1], masks[:1], chans, SPACING, **kwargs)
        rows.append({"measurement": name, "per_channel": per_channel, "features": len(names),
                     "s_per_cell": trimmed, "s_per_cell_untrimmed": untrimmed,
                     "s_per_cell_6_channels": trimmed * (len(channels) if per_channel else 1)})
    sets = []
    for name in ("default", "full"):
        seconds = _time(lambda: site_classic_features(crops, masks, channels, SPACING, measurements=name)) / n
        names, values = site_classic_features(crops[:1], masks[:1], channels, SPACING, measurements=name)
        sets.append({"set": name, "features": len(names), "s_per_cell": seconds})
    return {"cells": n, "crop": [int(s) for s in crops.shape[2:]], "channels": channels,
            "mean_cell_voxels": float(masks.reshape(n, -1).sum(1).mean()), "measurements": rows, "sets": sets}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="6 cells (< 3 min)")
    parser.add_argument("--out", default=str(HERE / "results"), help="results folder")
    args = parser.parse_args()
    n_cells = 6 if args.quick else 32
    result = {"benchmark": "bench_classic", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "mode": "quick" if args.quick else "full", "machine": machine(), **run(n_cells)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_classic.json").write_text(json.dumps(result, indent=2) + "\n")
    m = result["machine"]
    lines = [
        "# bench_classic: classic (cp_measure) features per cell",
        "",
        f"- date: {result['date']}; mode: {result['mode']}",
        f"- machine: {m['platform']}, {m['cpu_count']} CPUs, torch threads {m['torch_threads']}, GPU {m['gpu']}",
        f"- cells: {result['cells']} synthetic cells, crops {result['crop']} (z, y, x), mean cell "
        f"{result['mean_cell_voxels']:.0f} voxels, {len(result['channels'])} channels; one process, one thread",
        "",
        "| measurement | features (1 channel) | s / cell / channel, trimmed | untrimmed crop | s / cell, 6 channels |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in result["measurements"]:
        per = "per channel" if r["per_channel"] else "once per cell"
        lines.append(f"| {r['measurement']} ({per}) | {r['features']} | {r['s_per_cell']:.4f} | "
                     f"{r['s_per_cell_untrimmed']:.4f} | {r['s_per_cell_6_channels']:.3f} |")
    lines += ["", "| set | features (6 channels) | s / cell |", "| --- | --- | --- |"]
    for s in result["sets"]:
        lines.append(f"| {s['set']} | {s['features']} | {s['s_per_cell']:.3f} |")
    lines += ["", "Trimmed: the crop cut to the cell's bounding box plus 4 voxels (what site_classic_features does); "
              "untrimmed: the whole crop. Timings are noisy on shared machines; compare ratios within one run."]
    (out / "bench_classic.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
