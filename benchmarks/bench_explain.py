"""Benchmark: Grad-CAMO in the feature-extraction pass vs the usual compositions.

On the same EfficientNet-B0 3D and the same crops, in one run, with the methods
interleaved and the median of several repeats:

* ``features``: feature extraction alone (one forward pass, no gradients);
* ``explain_last`` / ``explain_stage4``: :func:`gradcamo_dask.engine.explain`, features
  + Grad-CAM + Grad-CAMO in one pass, at the last conv activation (forward-only:
  it is followed only by global average pooling and a linear layer) or a stage-4 block;
* ``explain_last_autograd``: the last layer through autograd (``route="autograd"``), for comparison;
* ``features+captum``: the features pass, then captum ``LayerGradCam`` (what a
  user would compose), its map upsampled to the crop grid and scored;
* ``monai_gradcam``: MONAI's ``GradCAM`` (a second pass with parameter gradients;
  its default normaliser rescales the map, so its score differs: time only);
* ``pytorch_grad_cam``: tried; recorded as unavailable where it does not import.

Two configurations: the paper's (crops 6 x 21 x 128 x 128 resampled to the model
grid 6 x 64 x 224 x 224) and the raw crop grid (6 x 21 x 128 x 128, no resampling).
``--quick`` halves the paper model grid on every axis and uses fewer repeats.
Writes ``benchmarks/results/<prefix>.json`` and ``.md`` with the date and machine.

Run: ``python benchmarks/bench_explain.py --quick`` (CPU, < 3 min on 2 idle cores),
``python benchmarks/bench_explain.py`` (full), ``--device cuda`` on a GPU.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gradcamo_dask import efficientnet3d, explain, gradcamo_score  # noqa: E402
# one home for the weight draw that keeps signals alive: the tests' helper (same draws, seed 0)
from tests.helpers.engine_models import lively as lively_weights

LAST, STAGE4 = "_head_swish", "_blocks.4.10"
TARGETS = {"explain_last": 1.02, "explain_stage4": 1.15, "captum_speedup": 1.8}


def synthetic_cells(n: int, grid: tuple[int, int, int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Normalised-looking crops (n, 6, z, y, x) float32 with a bright central cell, and its masks."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.meshgrid(*(np.linspace(-1, 1, s) for s in grid), indexing="ij")
    crops = np.empty((n, 6, *grid), np.float32)
    masks = np.empty((n, *grid), bool)
    for i in range(n):
        c = rng.uniform(-0.3, 0.3, 3)
        masks[i] = ((zz - c[0]) / 0.8) ** 2 + ((yy - c[1]) / 0.5) ** 2 + ((xx - c[2]) / 0.5) ** 2 < 1
        crops[i] = (0.5 * rng.standard_normal((6, *grid)) + rng.normal(size=(6, 1, 1, 1))
                    + rng.normal(scale=2.0, size=(6, 1, 1, 1)) * masks[i])
    return crops, masks


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def make_methods(model, crops, masks, input_shape, batch_size, device):
    """name -> callable running the method on all cells, returning Grad-CAMO at the last layer (or None)."""
    crop_grid = crops.shape[2:]
    crops_dev = torch.from_numpy(crops).to(device)
    masks_dev = torch.from_numpy(masks).to(device)

    def batches():
        for s in range(0, len(crops), batch_size):
            x = crops_dev[s:s + batch_size]
            if tuple(x.shape[2:]) != tuple(input_shape):
                x = F.interpolate(x, size=input_shape, mode="trilinear", align_corners=False)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last_3d)
            yield s, x

    def features():
        explain(model, crops_dev, layers=[LAST], batch_size=batch_size, cams=False)

    def explain_at(layer, route="auto"):
        def run():
            out = explain(model, crops_dev, masks_dev, layers=[layer], batch_size=batch_size, route=route)
            return out.gradcamo[layer].cpu().numpy()

        return run

    def features_then_captum():
        from captum.attr import LayerAttribution, LayerGradCam

        out = explain(model, crops_dev, layers=[LAST], batch_size=batch_size, cams=False)
        predicted = out.predicted
        gradcam = LayerGradCam(model, model._head_swish)
        scores = []
        for s, x in batches():
            with _autocast(device):
                attribution = gradcam.attribute(x, target=predicted[s:s + batch_size], relu_attributions=True)
            full = LayerAttribution.interpolate(attribution.detach().float(), crop_grid, interpolate_mode="trilinear")
            scores.append(gradcamo_score(full[:, 0].double(), masks_dev[s:s + batch_size])[0])
        return torch.cat(scores).cpu().numpy()

    from monai.visualize import GradCAM as MonaiGradCAM

    monai_cam = MonaiGradCAM(nn_module=copy.deepcopy(model), target_layers=LAST)  # keeps its hooks: own copy

    def monai_gradcam():
        explain(model, crops_dev, layers=[LAST], batch_size=batch_size, cams=False)  # the features pass
        for s, x in batches():
            with _autocast(device):
                heat = monai_cam(x)  # min-max normalised, at the model grid, for the argmax class
            full = F.interpolate(heat.float(), size=crop_grid, mode="trilinear", align_corners=False)
            gradcamo_score(full[:, 0].double(), masks_dev[s:s + batch_size])

    methods = {
        "features": features,
        "explain_last": explain_at(LAST),
        "explain_last_autograd": explain_at(LAST, "autograd"),
        "explain_stage4": explain_at(STAGE4),
        "features+captum": features_then_captum,
        "monai_gradcam": monai_gradcam,
    }
    try:
        import pytorch_grad_cam  # noqa: F401  (pulls torchvision; absent on purpose here)
    except Exception as err:  # noqa: BLE001
        methods["pytorch_grad_cam"] = f"unavailable: {type(err).__name__}: {err}"
    else:
        from pytorch_grad_cam import GradCAM as PgcGradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        pgc_model = copy.deepcopy(model)

        def pytorch_grad_cam_run():
            explain(model, crops_dev, layers=[LAST], batch_size=batch_size, cams=False)
            with PgcGradCAM(model=pgc_model, target_layers=[pgc_model._head_swish]) as cam:
                for _s, x in batches():
                    with torch.no_grad():
                        classes = pgc_model(x).argmax(1).tolist()
                    cam(input_tensor=x, targets=[ClassifierOutputTarget(k) for k in classes])

        methods["pytorch_grad_cam"] = pytorch_grad_cam_run
    return methods


def run_config(name, crop_grid, input_shape, n_cells, batch_size, repeats, device, only=None, clock=time.perf_counter):
    model = lively_weights(efficientnet3d(6, 6, input_shape)).to(device)
    crops, masks = synthetic_cells(n_cells, crop_grid)
    methods = make_methods(model, crops, masks, input_shape, batch_size, device)
    if only:
        methods = {k: v for k, v in methods.items() if k in only}
    runnable = {k: v for k, v in methods.items() if callable(v)}
    times: dict[str, list[float]] = {k: [] for k in runnable}
    errors: dict[str, str] = {k: v for k, v in methods.items() if not callable(v)}
    scores = {}
    for k, fn in list(runnable.items()):  # warm-up, and the scores for the agreement check
        try:
            scores[k] = fn()
        except Exception as err:  # noqa: BLE001 - record, do not hide
            errors[k] = f"failed: {type(err).__name__}: {err}"
            runnable.pop(k)
            times.pop(k)
    for _ in range(repeats):  # interleaved, so that load changes hit every method alike
        for k, fn in runnable.items():
            _sync(device)
            start = clock()
            fn()
            _sync(device)
            times[k].append(clock() - start)
    median = {k: statistics.median(v) for k, v in times.items()}
    base = median.get("features")
    rows = []
    for k in methods:
        if k in median:
            rows.append({"method": k, "median_s": median[k], "cells_per_s": n_cells / median[k],
                         "vs_features": median[k] / base if base else None, "runs_s": times[k]})
        else:
            rows.append({"method": k, "status": errors.get(k, "not run")})
    agree = None
    if "explain_last" in scores and isinstance(scores.get("explain_last_autograd"), np.ndarray):
        same = float(np.nanmax(np.abs(scores["explain_last"] - scores["explain_last_autograd"])))
    else:
        same = None
    if "explain_last" in scores and isinstance(scores.get("features+captum"), np.ndarray):
        a, b = scores["explain_last"], scores["features+captum"]
        agree = float(np.nanmax(np.abs(a - b) / np.maximum(np.abs(b), 1e-12)))
    # Ratios are taken within each round (methods run back to back) and the median over
    # rounds is reported: on a shared machine the load changes between rounds far more
    # than within one.
    def paired(a: str, b: str) -> float | None:
        if a not in times or b not in times:
            return None
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    checks = {}
    for key, (a, b, target, better) in {
        "explain_last_vs_features": ("explain_last", "features", TARGETS["explain_last"], "<="),
        "explain_stage4_vs_features": ("explain_stage4", "features", TARGETS["explain_stage4"], "<="),
        "explain_last_autograd_vs_features": ("explain_last_autograd", "features", None, "<="),
        "speedup_vs_features_plus_captum": ("features+captum", "explain_last", TARGETS["captum_speedup"], ">="),
    }.items():
        ratio = paired(a, b)
        if ratio is not None:
            met = None if target is None else (ratio <= target if better == "<=" else ratio >= target)
            checks[key] = {"ratio": ratio, "target": "none (reference)" if target is None else f"{better} {target}",
                           "met": met,
                           "ratio_of_medians": median[a] / median[b]}
    return {"config": name, "crop_grid": list(crop_grid), "input_shape": list(input_shape), "cells": n_cells,
            "batch_size": batch_size, "repeats": repeats, "rows": rows, "checks": checks,
            "max_rel_diff_explain_vs_captum_score": agree, "max_abs_diff_last_forward_only_vs_autograd": same}


def machine(device: torch.device) -> dict:
    info = {
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }
    if hasattr(os, "getloadavg"):
        info["load_average_1_5_15"] = [round(v, 2) for v in os.getloadavg()]
    return info


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"# bench_explain ({'quick' if report['quick'] else 'full'})", "",
        f"- date (UTC): {m['date_utc']}",
        f"- machine: {m['platform']}, {m['processor']}, {m['cpu_count']} CPUs, torch {m['torch']} "
        f"with {m['torch_threads']} threads, device {m['device']}" + (f" ({m['gpu']})" if m["gpu"] else ""),
        f"- load average at start / end: {m.get('load_average_1_5_15')} / {report.get('load_average_end')}",
        f"- command: `{report['command']}`",
        f"- clock: {report.get('clock', 'wall')} "
        f"({'process CPU seconds' if report.get('clock') == 'cpu' else 'elapsed seconds'})",
        "",
    ]
    for cfg in report["configs"]:
        lines += [f"## {cfg['config']}: crops {tuple(cfg['crop_grid'])} -> model grid {tuple(cfg['input_shape'])}, "
                  f"{cfg['cells']} cells, batch {cfg['batch_size']}, median of {cfg['repeats']}", "",
                  "| method | median s | cells/s | x features |", "| --- | ---: | ---: | ---: |"]
        for r in cfg["rows"]:
            if "median_s" in r:
                lines.append(f"| {r['method']} | {r['median_s']:.2f} | {r['cells_per_s']:.2f} | {r['vs_features']:.3f} |")
            else:
                lines.append(f"| {r['method']} | {r['status']} | | |")
        lines.append("")
        for k, c in cfg["checks"].items():
            lines.append(f"- {k}: {c['ratio']:.3f} (median of per-round ratios; ratio of medians "
                         f"{c['ratio_of_medians']:.3f}; target {c['target']})"
                         + ("" if c["met"] is None else (": met" if c["met"] else ": NOT met")))
        if cfg.get("max_abs_diff_last_forward_only_vs_autograd") is not None:
            lines.append(f"- Grad-CAMO at the last layer, forward-only vs autograd: max absolute difference "
                         f"{cfg['max_abs_diff_last_forward_only_vs_autograd']:.1e}")
        if cfg["max_rel_diff_explain_vs_captum_score"] is not None:
            lines.append(f"- Grad-CAMO, explain vs captum + full-resolution scoring: max relative difference "
                         f"{cfg['max_rel_diff_explain_vs_captum_score']:.1e}")
        lines.append("")
    lines += [
        "Notes:",
        "- Every method includes resampling the crops to the model grid and scoring on the crop grid",
        "  (captum: its map upsampled with `LayerAttribution.interpolate`, then Eq. 5; MONAI: its map is",
        "  min-max normalised by default, so its score is not Eq. 5 and is timed only).",
        "- `explain_last` needs no backward pass: `_head_swish` is followed only by global average",
        "  pooling and a linear layer W, so dY_k/dA_c = W[k, c] / V; `explain_last_autograd` is the same",
        "  layer through autograd.",
        "- `explain_stage4` backpropagates through stages 5-6 and the head. On CPU, PyTorch's depthwise",
        "  conv3d backward is several times slower than its forward on these small grids, which is",
        "  what the stage-4 ratio shows; the last-layer ratio has no such backward.",
        "- Methods are interleaved and each figure is the median of the repeats; the per-run times are",
        "  in the JSON. On a shared machine compare ratios within one run only.",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small model grid and few repeats (< 3 min on 2 CPUs)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--cells", type=int, default=None, help="cells per configuration")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out-prefix", default=None, help="file name stem under benchmarks/results/")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall: elapsed seconds; cpu: this process's CPU seconds (steadier on a loaded machine)")
    parser.add_argument("--methods", default=None,
                        help="comma-separated subset, e.g. features,explain_last,explain_last_autograd")
    parser.add_argument("--2d", dest="two_d", action="store_true",
                        help="EfficientNet-B0 2D instead (bench_explain_variants.py); writes bench_explain_2d*")
    parser.add_argument("--vit", action="store_true",
                        help="MONAI ViT 2D and 3D, its attention maps (bench_explain_variants.py); writes bench_explain_vit*")
    args = parser.parse_args(argv)
    if args.two_d or args.vit:
        return run_variants(args, argv)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    torch.set_num_threads(args.threads)
    gpu = device.type == "cuda"
    paper_grid = (32, 112, 112) if args.quick else (64, 224, 224)
    cells = args.cells or (32 if gpu else 8)
    batch = args.batch_size or (16 if gpu else 8)  # CPU: explain's default micro-batch
    repeats = args.repeats or 5
    prefix = args.out_prefix or ("bench_explain_cuda" if gpu else "bench_explain")
    report = {"quick": args.quick, "clock": args.clock,
              "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
              "machine": machine(device), "targets": TARGETS, "configs": []}
    for name, crop_grid, input_shape in [("paper", (21, 128, 128), paper_grid),
                                         ("raw", (21, 128, 128), (21, 128, 128))]:
        print(f"[bench_explain] {name}: crops {crop_grid} -> {input_shape}, {cells} cells", flush=True)
        only = set(args.methods.split(",")) if args.methods else None
        clock = time.process_time if args.clock == "cpu" else time.perf_counter
        cfg = run_config(name, crop_grid, input_shape, cells, batch, repeats, device, only, clock)
        report["configs"].append(cfg)
        for r in cfg["rows"]:
            if "median_s" in r:
                print(f"  {r['method']:<18} {r['cells_per_s']:8.2f} cells/s  x{r['vs_features']:.3f}", flush=True)
            else:
                print(f"  {r['method']:<18} {r['status']}", flush=True)
    if hasattr(os, "getloadavg"):
        report["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    out = REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{prefix}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{prefix}.md").write_text(markdown(report) + "\n")
    print(f"[bench_explain] wrote {out / prefix}.json and .md")
    return 0


def run_variants(args: argparse.Namespace, argv=None) -> int:
    """``--2d`` / ``--vit``: the variant configurations on the CPU, written to their own report."""
    import bench_explain_variants as variants

    torch.set_num_threads(args.threads)
    cells, batch, repeats = args.cells or 8, args.batch_size or 8, args.repeats or (3 if args.quick else 5)
    plans = ([lambda: variants.methods_2d(args.quick, cells, batch)] if args.two_d else []) + (
        [lambda: variants.methods_vit(2, args.quick, cells, batch), lambda: variants.methods_vit(3, args.quick, cells,
                                                                                                 batch)]
        if args.vit else [])
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    report = {"quick": args.quick, "clock": args.clock, "command": " ".join([Path(sys.argv[0]).name,
                                                                             *(argv or sys.argv[1:])]),
              "machine": machine(torch.device("cpu")), "configs": []}
    for plan in plans:
        methods, config = plan()
        print(f"[bench_explain] {config['config']}: crops {config['crop_grid']} -> {config['input_shape']}", flush=True)
        cfg = variants.time_methods(methods, config, cells, repeats, clock)
        report["configs"].append(cfg)
        for r in cfg["rows"]:
            print(f"  {r['method']:<20} {r['cells_per_s']:8.2f} cells/s  x{r['vs_features']:.3f}", flush=True)
    if hasattr(os, "getloadavg"):
        report["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    prefix = args.out_prefix or ("bench_explain_2d" if args.two_d else "bench_explain_vit") + (
        "_quick" if args.quick else "")
    out = REPO / "benchmarks" / "results"
    (out / f"{prefix}.json").write_text(json.dumps(report, indent=2) + "\n")
    m = report["machine"]
    head = [f"# bench_explain {'--2d' if args.two_d else '--vit'} ({'quick' if args.quick else 'full'})", "",
            f"- date (UTC): {m['date_utc']}", f"- machine: {m['platform']}, {m['processor']}, {m['cpu_count']} CPUs, "
            f"torch {m['torch']} with {m['torch_threads']} threads, device cpu",
            f"- load average at start / end: {m.get('load_average_1_5_15')} / {report.get('load_average_end')}",
            f"- command: `{report['command']}`", f"- clock: {args.clock}", ""]
    (out / f"{prefix}.md").write_text("\n".join(head + variants.markdown(report)) + "\n")
    print(f"[bench_explain] wrote {out / prefix}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
