"""What limits Grad-CAMO on ground truth: the map's floor, the negative evidence ReLU hides, where the rest goes.

Three questions left by ``bench_attention`` and ``bench_regularizer`` (issue #12), answered on held-out cells:

1. Why does the in-cell model reach only ~2x the uniform map when its layer's grid allows ~6.5x? Measured:
   the *floor* of each upsampled map (its minimum, times the crop's voxels, as a share of the map's sum),
   and the score of the map minus its floor. The latter is a diagnostic only: DESIGN §2 forbids rescaling
   a map before scoring, and Grad-CAMO here never does.
2. Why does the regulariser raise Grad-CAMO while accuracy on the cell alone falls? Grad-CAMO scores
   ``ReLU(sum_c w_c A_c)``; evidence *against* the class (negative terms) is clipped, wherever it lies.
   Measured on the map before the ReLU: the share of its negative mass that lies outside the cell, and the
   share of all its mass (|map|) that is negative outside.
3. Where does the map's mass outside the cell go? The share of each map's mass on the cell, on the other cells
   of the crop and on the background (no cell), beside each region's share of the crop (what a uniform map
   puts there), for the paper's Grad-CAM and for HiResCAM on the same model (gradient kept per voxel).

Models (seed 0, torch on one thread each, two at once): ``bench_attention``'s in-cell and off-cell models on
the mosaic plate at the demo's size (32 sites per well, at most 300 cells x 16 epochs), and
``bench_regularizer``'s plain model on the non-mosaic plate (12 sites per well, 300 cells x 16 epochs),
fine-tuned 8 epochs at Adam 3e-4 with λ 0 (the control) and λ 3 at ``_blocks.1.1``.

Usage::

    python benchmarks/diagnose_maps.py            # ~8 min on 2 idle cores
    python benchmarks/diagnose_maps.py --quick    # tiny, runs in a test

Writes ``benchmarks/results/diagnose_maps[_quick].json`` and ``.md``.
"""

from __future__ import annotations

import argparse
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
import bench_regularizer as br  # noqa: E402

LAYERS = ("_blocks.0.0", "_blocks.1.1")
SETTINGS = {
    "quick": dict(sites_per_well=2, epochs=1, max_train_cells=16, max_test_cells=32, seeds=(0,),
                  fine_tune_epochs=1, lam=3.0),
    "full": dict(sites_per_well=32, epochs=16, max_train_cells=300, max_test_cells=300, seeds=(0,),
                 fine_tune_epochs=8, lam=3.0),
}
REGULARISED_SITES = {"quick": 2, "full": 12}  # bench_regularizer_warm's plate


def raw_maps(model, x, layer: str, input_shape, batch: int = 16):
    """Grad-CAM of the predicted class at ``layer``, upsampled trilinearly to the crop grid: the map
    ``G = up(ReLU(P))`` as the engine scores it, and ``up(P)`` with ``P = (1/C') sum_c w_c A_c`` before its
    ReLU; each ``(N, z, y, x)`` float64."""
    import torch
    import torch.nn.functional as F

    module = model.get_submodule(layer)
    maps, pres = [], []
    for i in range(0, len(x), batch):
        kept = {}
        hook = module.register_forward_hook(lambda _m, _i, o: kept.__setitem__("a", o))
        try:
            xin = F.interpolate(x[i:i + batch], size=tuple(input_shape), mode="trilinear", align_corners=False)
            logits = model(xin)
        finally:
            hook.remove()
        a = kept["a"]
        selected = logits.gather(1, logits.argmax(1, keepdim=True)).sum()
        (grad,) = torch.autograd.grad(selected, [a])
        w = grad.mean(dim=(2, 3, 4), keepdim=True)
        coarse = (w * a).mean(1, keepdim=True).detach()
        for kept_maps, values in ((maps, coarse.clamp(min=0)), (pres, coarse)):
            kept_maps.append(F.interpolate(values, size=tuple(x.shape[2:]), mode="trilinear", align_corners=False)[:, 0])
    return torch.cat(maps).double(), torch.cat(pres).double()


def map_figures(g, pre, masks) -> dict:
    """Per-cell figures of Grad-CAM maps ``g``, their values before the ReLU ``pre``, and masks: means over cells."""
    import torch

    m = masks.double()
    dims = (1, 2, 3)
    total = g.sum(dims)
    score = (g * m).sum(dims) / total
    floor = g.amin(dims)
    free = g - floor[:, None, None, None]
    neg = (-pre).clamp(min=0)
    with np.errstate(invalid="ignore"):
        out = {"gradcamo": score, "uniform": m.mean(dims), "floor_share": floor * g[0].numel() / total,
               "floor_free_gradcamo": (free * m).sum(dims) / free.sum(dims),
               "negative_outside_share_of_negative": (neg * (1 - m)).sum(dims) / neg.sum(dims),
               "negative_outside_share_of_all": (neg * (1 - m)).sum(dims) / pre.abs().sum(dims)}
    return {k: float(torch.nanmean(v)) for k, v in out.items()}


def mass_split(g, masks, labels) -> dict:
    """Mean share of each map's mass (maps ``g`` ``(N, z, y, x)`` at the crop grid) on the cell (``masks``), on
    the other cells (``labels`` > 0 outside the mask) and on the background (``labels`` == 0); with the same
    shares of the crop's voxels (a uniform map's split). Cells whose map is all zero are left out."""
    import torch

    own = masks.double()
    regions = {"cell": own, "other_cells": (labels > 0).double() * (1 - own), "background": (labels == 0).double()}
    total = g.sum(dim=(1, 2, 3))
    ok = total > 0
    out = {}
    for name, region in regions.items():
        out[f"map_on_{name}"] = float(((g * region).sum(dim=(1, 2, 3))[ok] / total[ok]).mean())
        out[f"crop_on_{name}"] = float(region[ok].mean(dim=(1, 2, 3)).mean())
    out["cells_with_a_map"] = int(ok.sum())
    return out


def label_crops(plate, table, crop_size) -> "torch.Tensor":
    """Every label of each held-out cell's crop ``(N, z, y, x)`` int, in ``table`` order (crop_site with the
    labels as a one-channel image: the same window the image crops use)."""
    import torch

    from gradcamo_dask.cells import crop_site

    wells, sites = list(plate.image["well"].values), list(plate.image["site"].values)
    out = None
    for (well, site), rows in table.groupby(["well", "site"]):
        site_labels = np.asarray(plate.labels.data[wells.index(well), sites.index(site)].compute())
        crops, _ = crop_site(site_labels[None].astype(np.float32), site_labels, rows, crop_size)
        if out is None:
            out = np.zeros((len(table), *crops.shape[2:]), np.int64)
        out[rows.index.to_numpy()] = np.rint(crops[:, 0]).astype(np.int64)
    return torch.from_numpy(out)


def hires_maps(model, x, layer: str, input_shape) -> "torch.Tensor":
    """HiResCAM maps of the predicted class at ``layer`` (engine), upsampled to the crop grid ``(N, z, y, x)``."""
    import torch

    from gradcamo_dask.engine.explain import explain
    from gradcamo_dask.engine.gradcamo import upsample_cam

    res = explain(model, x, None, layers=layer, input_shape=tuple(input_shape), method="hirescam", batch_size=16)
    return upsample_cam(torch.as_tensor(np.asarray(res.cams[layer])), tuple(x.shape[2:])).double()


def train_all(mode: str, tmp: str, workers: int) -> dict:
    """The four models, two at a time; returns bundle paths by name."""
    s = SETTINGS[mode]
    c = dict(ba.COMMON)
    rs = {**s, "sites_per_well": REGULARISED_SITES[mode]}
    rc = br.sweep_settings("plate", {"layer": "_blocks.1.1"})
    warm = {"epochs": s["fine_tune_epochs"], "learning_rate": 3e-4}
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
        jobs = {name: pool.submit(ba.train_model, c, s, 0, name, f"{tmp}/{name}") for name in ba.MODELS}
        jobs["start"] = pool.submit(br.train_job, rc, rs, 0, 0.0, f"{tmp}/start")
        start = jobs["start"].result()["bundle"]
        for lam in (0.0, s["lam"]):
            jobs[f"lambda_{lam:g}"] = pool.submit(br.train_job, rc, rs, 0, lam, f"{tmp}/lam{lam:g}", start, warm)
        return {name: job.result()["bundle"] for name, job in jobs.items()}


def audit_all(mode: str, bundles: dict) -> dict:
    """Map figures of every model on its held-out cells, at every layer."""
    import torch

    from gradcamo_dask.engine.bundles import open_bundle
    from gradcamo_dask.normalize import normalize_crops

    s = SETTINGS[mode]
    plate, truth = ba.mosaic_plate(dict(ba.COMMON), s)
    mosaic = ba.test_cells(plate, truth, s["max_test_cells"], ba.COMMON["plate_seed"], raw=True)
    mosaic_labels = label_crops(plate, mosaic[0], ba.COMMON["crop_size"])
    if not bool((mosaic_labels[mosaic[2]] > 0).all()):  # each cell's mask must lie on labelled voxels
        raise RuntimeError("label crops do not line up with the cells' masks")
    rc = br.sweep_settings("plate", {"layer": "_blocks.1.1"})
    plate, truth = ba.mosaic_plate(rc, {**s, "sites_per_well": REGULARISED_SITES[mode]})
    every = ba.test_cells(plate, truth.assign(responder=True), s["max_test_cells"], rc["plate_seed"], raw=True)
    out = {}
    for name, path in bundles.items():
        table, raw, masks = mosaic if name in ba.MODELS else every
        labels = None
        if name in ba.MODELS:  # each population model on its own population
            keep = torch.from_numpy((table["responder"] == ba.MODELS[name]).to_numpy(dtype=bool, copy=True))
            raw, masks, labels = raw[keep], masks[keep], mosaic_labels[keep]
        bundle = open_bundle(path)
        x = normalize_crops(raw, bundle.config.normalization)
        out[name] = {}
        for layer in LAYERS:
            g, pre = raw_maps(bundle.model, x, layer, bundle.config.input_shape)
            out[name][layer] = {**map_figures(g, pre, masks), "cells": int(len(masks))}
            if labels is not None:  # where the mass goes, for both maps of the same model
                out[name][layer]["split"] = {
                    "gradcam": mass_split(g, masks, labels),
                    "hirescam": mass_split(hires_maps(bundle.model, x, layer, bundle.config.input_shape), masks,
                                           labels)}
    return out


def markdown(report: dict) -> str:
    keys = ["gradcamo", "uniform", "floor_share", "floor_free_gradcamo", "negative_outside_share_of_negative",
            "negative_outside_share_of_all"]
    lines = [f"# diagnose_maps ({report['mode']})", "",
             f"- date: {report['date']}; wall time {report['total_seconds']} s; machine: "
             f"{report['machine']['platform']}, {report['machine']['cpu_count']} CPUs; load at start "
             f"{report['load_average_start']}, at end {report['load_average_end']}",
             f"- command: `{report['command']}`",
             "- models (seed 0): `in_cell` / `off_cell` on the mosaic plate (each audited on its own population); "
             "`lambda_0` / `lambda_3` fine-tuned from `start` on the non-mosaic plate (all cells)",
             "- floor share: the map's minimum x voxels / its sum; floor-free Grad-CAMO: the score of the map minus "
             "that minimum (a diagnostic only, never the score); negative: the map before its ReLU", "",
             "| model | layer | cells | Grad-CAMO | uniform | x uniform | floor share | floor-free Grad-CAMO | "
             "floor-free x uniform | negative mass outside the cell (of negative) | negative outside (of all) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, layers in report["models"].items():
        for layer, f in layers.items():
            v = [f[k] for k in keys]
            lines.append(f"| {name} | {layer} | {f['cells']} | {v[0]:.3f} | {v[1]:.3f} | {v[0] / v[1]:.2f} | "
                         f"{v[2]:.3f} | {v[3]:.3f} | {v[3] / v[1]:.2f} | {v[4]:.3f} | {v[5]:.3f} |")
    lines += ["", "## Where the map's mass goes (mosaic models, each on its own population)", "",
              "Share of each map's mass on the cell / on the other cells of the crop / on the background, mean over "
              "cells; *crop*: the same regions' share of the crop's voxels (where a uniform map puts its mass). "
              "HiResCAM: the same model's map with the gradient kept per voxel (not the paper's).", "",
              "| model | layer | map | on the cell | on other cells | on background |", "| --- | --- | --- | --- | --- | --- |"]
    for name, layers in report["models"].items():
        for layer, f in layers.items():
            if "split" not in f:
                continue
            crop = f["split"]["gradcam"]
            lines.append(f"| {name} | {layer} | crop (uniform map) | {crop['crop_on_cell']:.3f} | "
                         f"{crop['crop_on_other_cells']:.3f} | {crop['crop_on_background']:.3f} |")
            for method, v in f["split"].items():
                lines.append(f"| {name} | {layer} | {method} | {v['map_on_cell']:.3f} | {v['map_on_other_cells']:.3f} "
                             f"| {v['map_on_background']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from machine_info import finish_record, run_record, write_record

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models (runs in a test)")
    parser.add_argument("--workers", type=int, default=2, help="trainings at once")
    parser.add_argument("--out", default=str(HERE / "results"), help="folder for the JSON and Markdown")
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else "full"
    report = run_record("diagnose_maps.py", argv, mode=mode)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        finish_record(report, t0, models=audit_all(mode, train_all(mode, tmp, args.workers)))
    write_record(args.out, "diagnose_maps" + ("_quick" if args.quick else ""), report, markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
