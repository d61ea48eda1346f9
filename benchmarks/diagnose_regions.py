"""Where the clean plate's in-cell model puts its map: the cell, the light around it, the crop's border.

``bench_attention --clean-plate alone`` leaves the paper's Grad-CAM at about 3x the uniform map on responders
that stand alone, against about 4x for HiResCAM on the same models (issue #12). This script splits each
held-out responder's map (Grad-CAM and HiResCAM of the same model, upsampled to the crop grid) over regions
of its crop that partition it, and compares each region's share of the mass with its share of the voxels
(what a uniform map puts there):

- ``cell``: the cell's mask;
- ``halo_2px`` / ``halo_2_4px``: background within 2 px / 2-4 px of the mask in y and x, slice by slice (the
  cell's blurred light reaches there);
- ``footprint_other_slices``: background above or below the cell, inside its y-x footprint;
- ``other_cells``: any other labelled cell in the crop;
- ``outside_site``: the part of the window that runs past the site, which the crop fills with zeros
  (cells near the field's edge, flagged ``crop_padded``);
- ``border_4px``: background in the crop's outer 4 px ring (y, x), outside the regions above;
- ``rest``: the remaining background.

It also reports the share of the map and of the mask in each z slice of the crop, and Grad-CAMO with its
uniform-map reference for the crops that run past the site and for those that do not.

Models: ``bench_attention``'s in-cell model on the plate without bystanders (its recipe, plate intensity
scaling, flips), one per seed, two trainings at once on one thread each.

Usage::

    python benchmarks/diagnose_regions.py                          # seeds 0 and 1, grid 6 x 96 x 96, ~6 min
    python benchmarks/diagnose_regions.py --input-shape 12 96 96   # maps with twice the z voxels
    python benchmarks/diagnose_regions.py --quick                  # tiny, runs in a test

Writes ``benchmarks/results/diagnose_regions[_quick][_TAG].json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import bench_attention as ba  # noqa: E402
import diagnose_maps as dm  # noqa: E402

LAYERS = ("_swish", "_blocks.0.0", "_blocks.1.1", "_blocks.1.2")
SETTINGS = {
    "quick": dict(sites_per_well=2, epochs=1, max_train_cells=16, max_test_cells=32, seeds=(0,), draws=2),
    "full": dict(sites_per_well=32, epochs=16, max_train_cells=300, max_test_cells=300, seeds=(0, 1), draws=5),
}
REGIONS = ("cell", "halo_2px", "halo_2_4px", "footprint_other_slices", "other_cells", "outside_site", "border_4px",
           "rest")


def _disk(radius: int) -> np.ndarray:
    yy, xx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    return (yy ** 2 + xx ** 2 <= radius ** 2)[None]  # (1, y, x): slice by slice


def crop_regions(mask: np.ndarray, labels: np.ndarray, inside: np.ndarray | None = None,
                 border: int = 4) -> dict[str, np.ndarray]:
    """The regions of one crop (module docstring) as boolean ``(z, y, x)`` arrays that partition it.
    ``mask``: the cell; ``labels``: every label of the crop (0 = background); ``inside``: the voxels that lie
    in the site (default: all)."""
    from scipy import ndimage as ndi

    mask = mask.astype(bool)
    inside = np.ones(mask.shape, bool) if inside is None else inside.astype(bool)
    outside = ~inside & (labels == 0) & ~mask
    background = (labels == 0) & ~mask & ~outside
    near = ndi.binary_dilation(mask, _disk(2)) & background
    around = ndi.binary_dilation(mask, _disk(4)) & background & ~near
    footprint = mask.any(axis=0, keepdims=True) & background & ~near & ~around
    ring = np.zeros(mask.shape, bool)
    ring[:, :border] = ring[:, -border:] = True
    ring[:, :, :border] = ring[:, :, -border:] = True
    ring &= background & ~near & ~around & ~footprint
    rest = background & ~near & ~around & ~footprint & ~ring
    return {"cell": mask, "halo_2px": near, "halo_2_4px": around, "footprint_other_slices": footprint,
            "other_cells": (labels > 0) & ~mask, "outside_site": outside, "border_4px": ring, "rest": rest}


def region_split(maps: np.ndarray, masks: np.ndarray, labels: np.ndarray, inside: np.ndarray | None = None,
                 regions: list[dict] | None = None) -> dict:
    """Mean over cells of each region's share of the map's mass and of the crop's voxels, and of the map's and
    the mask's share in each z slice; Grad-CAMO and the uniform map of the crops that run past the site
    (``padded``) and of the others. ``maps``, ``masks``, ``labels``, ``inside`` (voxels in the site, default
    all): ``(N, z, y, x)``; ``regions``: each cell's :func:`crop_regions`, when already built for another map;
    cells whose map is all zero are left out (their Grad-CAMO is undefined)."""
    inside = np.ones(masks.shape, bool) if inside is None else inside
    total = maps.sum(axis=(1, 2, 3))
    kept = np.flatnonzero(total > 0)
    mass = {r: [] for r in REGIONS}
    area = {r: [] for r in REGIONS}
    for i in kept:
        cell = regions[i] if regions is not None else crop_regions(masks[i], labels[i], inside[i])
        for name, region in cell.items():
            mass[name].append(maps[i][region].sum() / total[i])
            area[name].append(region.mean())
    score = (maps[kept] * masks[kept]).sum(axis=(1, 2, 3)) / total[kept]
    uniform = masks[kept].mean(axis=(1, 2, 3))
    padded = ~inside[kept].all(axis=(1, 2, 3))
    by_padding = {name: {"cells": int(rows.sum()), "gradcamo": float(score[rows].mean()) if rows.any() else None,
                         "uniform": float(uniform[rows].mean()) if rows.any() else None}
                  for name, rows in (("padded", padded), ("not_padded", ~padded))}
    z_map = maps[kept].sum(axis=(2, 3)) / total[kept, None]
    z_mask = masks[kept].sum(axis=(2, 3)) / np.maximum(masks[kept].sum(axis=(1, 2, 3)), 1)[:, None]
    return {"cells": int(len(kept)), "map": {r: float(np.mean(mass[r])) for r in REGIONS},
            "crop": {r: float(np.mean(area[r])) for r in REGIONS},
            "z_map": z_map.mean(axis=0).round(4).tolist(), "z_mask": z_mask.mean(axis=0).round(4).tolist(),
            "by_padding": by_padding}


def site_voxels(table, crop_size, site_shape) -> np.ndarray:
    """Which voxels of each cell's crop lie in its site ``(N, z, y, x)`` bool, in ``table`` order: the crop
    windows of the cells' centres (``center_z/y/x``) cut from a site of ones, which crop_site's gather fills
    with zeros where a window runs past the site."""
    from gradcamo_dask.crop_geometry import crop_shape, crop_windows, gather_windows

    site_shape = tuple(int(n) for n in site_shape)
    start, _stop = crop_windows(table[["center_z", "center_y", "center_x"]].to_numpy(), crop_size, site_shape)
    return gather_windows(np.ones(site_shape, bool), start, crop_shape(crop_size, site_shape), fill=False)


def audit(c: dict, s: dict, bundle_path: str) -> dict:
    """Region splits of one in-cell model's Grad-CAM and HiResCAM maps on the held-out responders alone
    (``layers``), and its held-out accuracy on crops past the site and on the others (``accuracy``)."""
    import torch

    from gradcamo_dask.engine.bundles import open_bundle
    from gradcamo_dask.normalize import normalize_crops

    bundle = open_bundle(bundle_path)
    plate, truth = ba.mosaic_plate(c, s, bystanders=False)
    table, raw, masks = ba.test_cells(plate, truth, s["max_test_cells"], c["plate_seed"], raw=True,
                                      common={**c, "crop_fill": bundle.config.crop_fill})  # filled as trained
    keep = torch.from_numpy(table["responder"].to_numpy(dtype=bool, copy=True))
    table, raw, masks = table[keep.numpy()].reset_index(drop=True), raw[keep], masks[keep]
    labels = dm.label_crops(plate, table, c["crop_size"]).numpy()
    inside = site_voxels(table, c["crop_size"], plate.labels.shape[-3:])
    masks_np = masks.numpy().astype(bool)
    if not bool((labels[masks_np] > 0).all()):
        raise RuntimeError("label crops do not line up with the cells' masks")
    x = normalize_crops(raw, bundle.config.normalization)
    regions = [crop_regions(masks_np[i], labels[i], inside[i]) for i in range(len(masks_np))]  # once per cell
    out = {}
    for layer in LAYERS:
        gradcam, _ = dm.raw_maps(bundle.model, x, layer, bundle.config.input_shape)
        hires = dm.hires_maps(bundle.model, x, layer, bundle.config.input_shape)
        out[layer] = {name: region_split(m.numpy(), masks_np, labels, inside, regions)
                      for name, m in (("gradcam", gradcam), ("hirescam", hires))}
    return {"layers": out, "accuracy": accuracy_by_padding(bundle, x, table, ~inside.all(axis=(1, 2, 3))),
            "crop_fill": bundle.config.crop_fill}  # of the training crops and of these


def accuracy_by_padding(bundle, x, table, padded: np.ndarray) -> dict:
    """Held-out accuracy of the bundle's model on the crops that run past the site and on the others (with a
    zero fill, a crop past the site carries a step that a model may read)."""
    import torch
    import torch.nn.functional as F

    classes, grid = list(bundle.config.classes), tuple(bundle.config.input_shape)
    truth = table["treatment"].astype(str).map(classes.index).to_numpy()
    with torch.no_grad():  # crops at the crop grid, resampled to the model's as explain does
        predicted = torch.cat([bundle.model(F.interpolate(x[i:i + 32], size=grid, mode="trilinear",
                                                          align_corners=False)).argmax(1)
                               for i in range(0, len(x), 32)]).numpy()
    right = predicted == truth
    return {name: {"cells": int(rows.sum()), "accuracy": float(right[rows].mean()) if rows.any() else None}
            for name, rows in (("all", np.ones(len(right), bool)), ("padded", padded), ("not_padded", ~padded))}


def run(mode: str, c: dict, workers: int) -> dict:
    s = SETTINGS[mode]
    with tempfile.TemporaryDirectory() as tmp, ProcessPoolExecutor(
            max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
        jobs = {seed: pool.submit(ba.train_model, c, s, seed, "in_cell", f"{tmp}/in_cell_{seed}") for seed in s["seeds"]}
        trained = {seed: job.result() for seed, job in jobs.items()}
        return {str(seed): {"train_seconds": t["train_seconds"], **audit(c, s, t["bundle"])}
                for seed, t in trained.items()}


def markdown(report: dict) -> str:
    st = report["settings"]
    lines = [f"# diagnose_regions ({report['mode']})", "",
             f"- date: {report['date']}; wall time {report['total_seconds']} s; machine: "
             f"{report['machine']['platform']}, {report['machine']['cpu_count']} CPUs; load at start "
             f"{report['load_average_start']}, at end {report['load_average_end']}",
             f"- command: `{report['command']}`",
             f"- models: bench_attention's in-cell model on the plate without bystanders, crop {st['crop_size']}, "
             f"grid {st['input_shape']}, {st.get('crop_fill', 'zero')} fill past the site, sites {st['site_shape']}, "
             f"{st['epochs']} epochs x at most {st['max_train_cells']} cells, seeds "
             f"{', '.join(report['seeds'])}; held-out responders, each alone", "",
             "Share of the map's mass in each region, mean over cells; in brackets the region's share of the "
             "crop's voxels (a uniform map's share) and mass / voxels (x uniform).", "",
             "| seed | layer | map | cells | " + " | ".join(REGIONS) + " |",
             "| --- | --- | --- | --- | " + " | ".join("---" for _ in REGIONS) + " |"]
    for seed, r in report["seeds"].items():
        for layer, maps in r["layers"].items():
            for name, v in maps.items():
                cells = " | ".join(f"{v['map'][k]:.3f} ({v['crop'][k]:.3f}, {v['map'][k] / v['crop'][k]:.2f}x)"
                                   if v["crop"][k] else f"{v['map'][k]:.3f}" for k in REGIONS)
                lines.append(f"| {seed} | {layer} | {name} | {v['cells']} | {cells} |")
    lines += ["", "Grad-CAMO (mean over cells) of the crops that run past the site (zero-filled there) and of the others, "
              "with each group's uniform-map reference:", "",
              "| seed | layer | map | padded: cells, Grad-CAMO, uniform, x uniform | not padded: cells, Grad-CAMO, "
              "uniform, x uniform |", "| --- | --- | --- | --- | --- |"]
    for seed, r in report["seeds"].items():
        for layer, maps in r["layers"].items():
            for name, v in maps.items():
                cells = [f"{g['cells']}, {g['gradcamo']:.3f}, {g['uniform']:.3f}, {g['gradcamo'] / g['uniform']:.2f}x"
                         if g["cells"] else "0" for g in (v["by_padding"]["padded"], v["by_padding"]["not_padded"])]
                lines.append(f"| {seed} | {layer} | {name} | {cells[0]} | {cells[1]} |")
    lines += ["", "Held-out accuracy of the same models (chance 0.5) on the crops past the site and on the others:",
              "", "| seed | all | past the site | inside the site |", "| --- | --- | --- | --- |"]
    for seed, r in report["seeds"].items():
        a = r.get("accuracy") or {}
        lines.append(f"| {seed} | " + " | ".join(
            f"{a[k]['accuracy']:.3f} ({a[k]['cells']} cells)" if a.get(k, {}).get("cells") else "-"
            for k in ("all", "padded", "not_padded")) + " |")
    lines += ["", "Share of the map's mass and of the cell's mask in each z slice of the crop (Grad-CAM), mean over "
              "cells:", "", "| seed | layer | map per slice | mask per slice |", "| --- | --- | --- | --- |"]
    for seed, r in report["seeds"].items():
        for layer, maps in r["layers"].items():
            v = maps["gradcam"]
            lines.append(f"| {seed} | {layer} | {' '.join(f'{p:.3f}' for p in v['z_map'])} | "
                         f"{' '.join(f'{p:.3f}' for p in v['z_mask'])} |")
    return "\n".join(lines) + "\n"


def fill_rows(reports: list[dict], layer: str = "_blocks.0.0") -> dict[int, dict[str, dict]]:
    """Per seed and crop fill ("zero", "background"): held-out accuracy (all, past the site, inside it), the
    map's x uniform on the cell (Grad-CAM, HiResCAM), Grad-CAMO / uniform of the crops past the site and of the
    others, and the Grad-CAM mass on the part past the site, at ``layer``, from full diagnose_regions reports."""
    rows: dict[int, dict[str, dict]] = {}
    for report in reports:
        fill = report["settings"].get("crop_fill", "zero")
        for seed, r in report["seeds"].items():
            g, h, a = r["layers"][layer]["gradcam"], r["layers"][layer]["hirescam"], r["accuracy"]
            pad, rest = g["by_padding"]["padded"], g["by_padding"]["not_padded"]
            rows.setdefault(int(seed), {})[fill] = {
                "accuracy": a["all"]["accuracy"], "accuracy_past": a["padded"]["accuracy"],
                "accuracy_inside": a["not_padded"]["accuracy"], "x_uniform": g["map"]["cell"] / g["crop"]["cell"],
                "x_past": pad["gradcamo"] / pad["uniform"], "x_inside": rest["gradcamo"] / rest["uniform"],
                "mass_past": g["map"]["outside_site"], "hirescam_x_uniform": h["map"]["cell"] / h["crop"]["cell"]}
    return rows


def fills_markdown(rows: dict[int, dict[str, dict]], sources: list[str]) -> str:
    """The zero and background fills side by side per seed, their means ± sd and the paired differences."""
    keys = ("accuracy", "accuracy_past", "accuracy_inside", "x_uniform", "x_past", "x_inside", "mass_past",
            "hirescam_x_uniform")
    seeds = [s for s in sorted(rows) if {"zero", "background"} <= set(rows[s])]
    lines = ["# diagnose_regions: zero against background fill of crops past the site", "",
             f"From {', '.join(f'`{s}`' for s in sources)}; the in-cell model on the clean plate, held-out "
             "responders alone, Grad-CAM at `_blocks.0.0` (x uniform: the map's mass on the cell over the cell's "
             "share of the crop); each cell: zero / background. Chance accuracy 0.5.", "",
             "| seed | accuracy | past the site | inside the site | Grad-CAM x uniform | Grad-CAMO / uniform, past "
             "the site | inside the site | Grad-CAM mass on the part past the site | HiResCAM x uniform |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    fmt = {k: ".3f" if k.startswith(("accuracy", "mass")) else ".2f" for k in keys}
    for seed in seeds:
        z, b = rows[seed]["zero"], rows[seed]["background"]
        lines.append(f"| {seed} | " + " | ".join(f"{z[k]:{fmt[k]}} / {b[k]:{fmt[k]}}" for k in keys) + " |")
    if len(seeds) > 1:
        col = {k: {f: np.array([rows[s][f][k] for s in seeds]) for f in ("zero", "background")} for k in keys}
        lines.append("| mean ± sd | " + " | ".join(
            " / ".join(f"{col[k][f].mean():{fmt[k]}} ± {col[k][f].std(ddof=1):{fmt[k]}}" for f in ("zero", "background"))
            for k in keys) + " |")
        lines.append("")
        for k in ("accuracy", "x_uniform"):
            d = col[k]["background"] - col[k]["zero"]
            lines.append(f"- {k}, background - zero over {len(seeds)} seeds: {d.mean():+.3f} ± {d.std(ddof=1):.3f} "
                         f"(sd), higher with the background fill in {int((d > 0).sum())}")
        lines.append(f"- seeds at or above 3x uniform: zero {int((col['x_uniform']['zero'] >= 3).sum())}, background "
                     f"{int((col['x_uniform']['background'] >= 3).sum())} of {len(seeds)}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from machine_info import finish_record, run_record, write_record

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model (runs in a test)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="override the mode's seeds")
    parser.add_argument("--input-shape", type=int, nargs=3, default=(6, 96, 96), help="model grid z y x")
    parser.add_argument("--workers", type=int, default=2, help="trainings at once")
    parser.add_argument("--crop-fill", choices=("zero", "background"), default="zero",
                        help="what fills crop windows past the site, in training and audit (Recipe.crop_fill)")
    parser.add_argument("--site-yx", type=int, nargs=2, default=None, help="site y x, pixels (default 128 128)")
    parser.add_argument("--sites-per-well", type=int, default=None, help="override the mode's sites per well")
    parser.add_argument("--tag", default="", help="suffix of the output file names")
    parser.add_argument("--out", default=str(HERE / "results"), help="folder for the JSON and Markdown")
    parser.add_argument("--compare-fills", nargs="+", default=None, metavar="JSON",
                        help="no run: tabulate these reports' zero and background fills per seed into "
                             "<out>/diagnose_regions_fills<_tag>.md")
    args = parser.parse_args(argv)
    if args.compare_fills:
        text = fills_markdown(fill_rows([json.loads(Path(f).read_text()) for f in args.compare_fills]),
                              [Path(f).name for f in args.compare_fills])
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / f"diagnose_regions_fills{'_' + args.tag if args.tag else ''}.md").write_text(text)
        print(text)
        return 0
    mode = "quick" if args.quick else "full"
    if args.seeds:
        SETTINGS[mode]["seeds"] = tuple(args.seeds)
    if args.sites_per_well:
        SETTINGS[mode]["sites_per_well"] = args.sites_per_well
    c = {**ba.COMMON, "clean_plate": "alone", "input_shape": tuple(args.input_shape), "crop_fill": args.crop_fill,
         "site_shape": (ba.COMMON["site_shape"][0], *(args.site_yx or ba.COMMON["site_shape"][1:]))}
    report = run_record("diagnose_regions.py", argv, mode=mode, settings={**c, **SETTINGS[mode]})
    t0 = time.perf_counter()
    finish_record(report, t0, seeds=run(mode, c, args.workers))
    stem = "diagnose_regions" + ("_quick" if args.quick else "") + (f"_{args.tag}" if args.tag else "")
    write_record(args.out, stem, report, markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
