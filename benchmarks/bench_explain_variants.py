"""bench_explain --2d and --vit: one-pass overhead over the forward pass, and vs captum, for 2D CNNs and ViTs.

On the same model and the same crops, in one run, methods interleaved, median of the repeats:

* ``--2d``: EfficientNet-B0 2D (MONAI) on crops 6 x 128 x 128 resampled to 224 x 224
  (quick: 112 x 112): ``features`` (forward only), ``explain_last`` (``_head_swish``,
  forward-only Grad-CAM), ``explain_stage4`` (``_blocks.4.10``, one backward pass),
  ``features+captum`` (the features pass, then captum ``LayerGradCam`` on ``_head_swish``,
  its map upsampled bilinearly to the crop grid and scored).
* ``--vit``: MONAI ViT (patch 16, 192 wide, 6 blocks, 3 heads) in 2D (crops 6 x 128 x 128
  -> 224 x 224; quick 112 x 112) and 3D (6 x 21 x 128 x 128 -> 32 x 224 x 224, patch
  8 x 16 x 16; quick 16 x 112 x 112): ``features`` (forward only), each attention source
  (``cls_attention``, ``rollout``: forward only; ``gradcam_tokens``: a backward pass
  through the last block), ``explain_patch_conv`` (Grad-CAM on the patch embedding, a
  backward pass through every block) and ``features+captum`` (captum ``LayerGradCam`` on
  the same patch embedding, after a features pass).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from gradcamo_dask import explain, gradcamo_score

PATCH_CONV = "vit.patch_embedding.patch_embeddings"


def cells(n: int, grid: tuple[int, ...], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Normalised-looking crops (n, 6, *grid) float32 with a bright central cell (an ellipse), and its masks."""
    rng = np.random.default_rng(seed)
    axes = np.meshgrid(*(np.linspace(-1, 1, s) for s in grid), indexing="ij")
    crops, masks = np.empty((n, 6, *grid), np.float32), np.empty((n, *grid), bool)
    radii = (0.8, 0.5, 0.5)[-len(grid):]
    for i in range(n):
        centre = rng.uniform(-0.3, 0.3, len(grid))
        masks[i] = sum(((a - c) / r) ** 2 for a, c, r in zip(axes, centre, radii)) < 1
        shape = (6,) + (1,) * len(grid)
        crops[i] = (0.5 * rng.standard_normal((6, *grid)) + rng.normal(size=shape)
                    + rng.normal(scale=2.0, size=shape) * masks[i])
    return crops, masks


def _captum(model: torch.nn.Module, layer: torch.nn.Module, crops: torch.Tensor, masks: torch.Tensor,
            input_shape: tuple[int, ...], batch_size: int) -> Callable[[], np.ndarray]:
    """The features pass, then captum's LayerGradCam on ``layer``, upsampled to the crop grid and scored."""
    from captum.attr import LayerAttribution, LayerGradCam

    mode = "bilinear" if len(input_shape) == 2 else "trilinear"
    spatial = len(input_shape)

    def run() -> np.ndarray:
        out = explain(model, crops, batch_size=batch_size, cams=False)
        gradcam, scores = LayerGradCam(model, layer), []
        for s in range(0, len(crops), batch_size):
            x = F.interpolate(crops[s:s + batch_size], size=input_shape, mode=mode, align_corners=False)
            attribution = gradcam.attribute(x, target=out.predicted[s:s + batch_size], relu_attributions=True)
            full = LayerAttribution.interpolate(attribution.detach().float(), tuple(crops.shape[2:]),
                                                interpolate_mode=mode)
            scores.append(gradcamo_score(full[:, 0].double(), masks[s:s + batch_size], spatial_dims=spatial)[0])
        return torch.cat(scores).numpy()

    return run


def _explain(model, crops, masks, layer: str, batch_size: int) -> Callable[[], np.ndarray]:
    def run() -> np.ndarray:
        return explain(model, crops, masks, layers=[layer], batch_size=batch_size).gradcamo[layer].numpy()

    return run


def methods_2d(quick: bool, n_cells: int, batch_size: int) -> tuple[dict, dict]:
    """EfficientNet-B0 2D methods and the configuration they run."""
    from bench_explain import lively_weights

    from gradcamo_dask.engine.models2d import efficientnet2d

    grid = (112, 112) if quick else (224, 224)
    model = lively_weights(efficientnet2d(6, 6, grid))
    for m in model.modules():  # lively_weights re-draws 3D convolutions only: the 2D ones here
        if isinstance(m, torch.nn.Conv2d):
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.weight.shape) * (3.0 / m.weight[0].numel()) ** 0.5)
    crops, masks = (torch.from_numpy(a) for a in cells(n_cells, (128, 128)))
    methods = {
        "features": lambda: explain(model, crops, batch_size=batch_size, cams=False),
        "explain_last": _explain(model, crops, masks, "_head_swish", batch_size),
        "explain_stage4": _explain(model, crops, masks, "_blocks.4.10", batch_size),
        "features+captum": _captum(model, model._head_swish, crops, masks, grid, batch_size),
    }
    return methods, {"config": "efficientnet2d", "crop_grid": [128, 128], "input_shape": list(grid),
                     "agree": ("explain_last", "features+captum")}


def methods_vit(spatial: int, quick: bool, n_cells: int, batch_size: int) -> tuple[dict, dict]:
    """ViT methods (2D or 3D) and the configuration they run."""
    from gradcamo_dask.engine.vit import vit

    if spatial == 2:
        crop, grid, patch = (128, 128), ((112, 112) if quick else (224, 224)), (16, 16)
    else:
        crop, grid, patch = (21, 128, 128), ((16, 112, 112) if quick else (32, 224, 224)), (8, 16, 16)
    torch.manual_seed(0)
    model = vit(6, 6, grid, patch_size=patch).eval()
    crops, masks = (torch.from_numpy(a) for a in cells(n_cells, crop))
    methods = {"features": lambda: explain(model, crops, batch_size=batch_size, cams=False)}
    for source in ("cls_attention", "rollout", "gradcam_tokens", PATCH_CONV):
        methods["explain_patch_conv" if source == PATCH_CONV else source] = _explain(model, crops, masks, source,
                                                                                      batch_size)
    conv = dict(model.named_modules())[PATCH_CONV]
    methods["features+captum"] = _captum(model, conv, crops, masks, grid, batch_size)
    return methods, {"config": f"vit{spatial}d", "crop_grid": list(crop), "input_shape": list(grid),
                     "patch_size": list(patch), "agree": ("explain_patch_conv", "features+captum")}


def time_methods(methods: dict, config: dict, n_cells: int, repeats: int,
                 clock: Callable[[], float] = time.perf_counter) -> dict:
    """Warm up (keeping the scores), then time the methods interleaved; medians and paired ratios to features."""
    scores = {k: fn() for k, fn in methods.items()}
    times: dict[str, list[float]] = {k: [] for k in methods}
    for _ in range(repeats):
        for k, fn in methods.items():
            start = clock()
            fn()
            times[k].append(clock() - start)
    rows = []
    for k, runs in times.items():
        ratio = statistics.median(t / f for t, f in zip(runs, times["features"]))
        rows.append({"method": k, "median_s": statistics.median(runs), "cells_per_s": n_cells / statistics.median(runs),
                     "vs_features": ratio, "runs_s": runs})
    a, b = config["agree"]
    diff = float(np.nanmax(np.abs(scores[a] - scores[b]) / np.maximum(np.abs(scores[b]), 1e-12)))
    captum = statistics.median(c / e for c, e in zip(times[b], times[a]))
    return {**config, "cells": n_cells, "repeats": repeats, "rows": rows,
            "max_rel_diff_explain_vs_captum_score": diff, "captum_time_over_explain": captum}


def markdown(report: dict) -> list[str]:
    """Markdown lines of the variant configurations."""
    lines = []
    for cfg in report["configs"]:
        lines += [f"## {cfg['config']}: crops {tuple(cfg['crop_grid'])} -> model grid {tuple(cfg['input_shape'])}"
                  + (f", patch {tuple(cfg['patch_size'])}" if "patch_size" in cfg else "")
                  + f", {cfg['cells']} cells, median of {cfg['repeats']}", "",
                  "| method | median s | cells/s | x features (median of per-round ratios) |",
                  "| --- | ---: | ---: | ---: |"]
        lines += [f"| {r['method']} | {r['median_s']:.2f} | {r['cells_per_s']:.2f} | {r['vs_features']:.3f} |"
                  for r in cfg["rows"]]
        a, b = cfg["agree"]
        lines += ["", f"- {b} / {a} time: {cfg['captum_time_over_explain']:.2f} (median of per-round ratios)",
                  f"- Grad-CAMO, {a} vs {b} (full-resolution scoring): max relative difference "
                  f"{cfg['max_rel_diff_explain_vs_captum_score']:.1e}", ""]
    return lines
