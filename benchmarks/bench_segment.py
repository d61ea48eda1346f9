"""Segmentation accuracy and speed against the synthetic plates' ground truth.

Measures, in one run on the same plate:

- average precision at IoU 0.5 (``TP / (TP + FP + FN)``, the Cellpose/StarDist
  definition) and F1 (``2 TP / (2 TP + FP + FN)``) of the 3D labels against the
  ground truth, for the classical watershed baseline and for Cellpose, over all
  cells and over interior cells (not touching the site's y/x border, the cells
  the crop extraction keeps);
- sites per second of the lazy ``segment_plate()`` graph on the default local Dask
  scheduler, on CPU (and on GPU for Cellpose when torch sees one).

Cellpose weights: pass ``--cellpose-weights`` to use weights at hand. Without
them (as here: no pretrained Cellpose weights can be downloaded on this
machine) the script trains a Cellpose 3 network from random initialisation with
Cellpose's own training code on 2D slices of a separate synthetic plate (another
seed: no test site is seen in training) and says so in the report; its figures
measure "Cellpose with a briefly self-trained model", not Cellpose's pretrained
models.

Run unattended::

    python benchmarks/bench_segment.py --quick   # < 3 min on 2 CPU cores
    python benchmarks/bench_segment.py           # full plate (6 doses x 2 wells x 4 sites)

Writes ``benchmarks/results/bench_segment_<mode>.json`` and ``.md`` with the date and machine.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import gradcamo_dask as gd  # noqa: E402

# quick: 2 wells (control and top dose) x 1 site; Cellpose on both. full: the paper's layout.
MODES = {
    "quick": dict(doses_um=(0.0, 10.0), wells_per_treatment=1, sites_per_well=1),
    "full": dict(doses_um=None, wells_per_treatment=2, sites_per_well=4),
}
#: Self-training recipes (steps = epochs x 2 batches of 8 slices). "full" is the one worth reporting;
#: "quick" only exists so that a first --quick run on a bare machine stays short.
TRAINING = {
    "quick": dict(train_sites=2, train_epochs=10, bsize=64),
    "full": dict(train_sites=8, train_epochs=150, bsize=64),
}


def plate_options(mode: str) -> dict:
    """``synthetic_plate`` keyword arguments of a mode (None: the generator's default)."""
    return {k: v for k, v in MODES[mode].items() if v is not None}


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "gradcamo-dask" / "bench_segment"


def cached_weights(recipe: str, seed: int) -> Path:
    return cache_dir() / f"selftrained_{recipe}_seed{seed}"


def self_trained_weights(mode: str, seed: int, retrain: bool) -> dict:
    """Weights trained by this script, from the cache when an earlier run made them.

    A quick run uses the full recipe's weights when they are cached (run the full
    benchmark once to make them), else trains the short quick recipe.
    """
    recipes = ["full"] if mode == "full" else ["full", "quick"]
    if not retrain:
        for recipe in recipes:
            path = cached_weights(recipe, seed)
            meta = path.with_suffix(".json")
            if path.is_file() and meta.is_file():
                info = json.loads(meta.read_text())
                info.update(weights=str(path), cached=True)
                return info
    recipe = recipes[-1]
    cache = cached_weights(recipe, seed)
    cache.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        info = train_cellpose(Path(tmp), plate_options("full"), seed=seed, recipe=recipe, **TRAINING[recipe])
        Path(info.pop("weights")).replace(cache)
    cache.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
    info.update(weights=str(cache), cached=False)
    return info


def machine() -> dict:
    import torch

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        from importlib.metadata import version

        info["cellpose"] = version("cellpose")
    except Exception:  # pragma: no cover
        info["cellpose"] = None
    return info


# ------------------------------------------------------------------ metrics


def match_counts(truth: np.ndarray, labels: np.ndarray, interior: bool = False) -> dict:
    """TP/FP/FN at IoU > 0.5 (one-to-one by construction) between two label volumes.

    With ``interior``, objects touching the y/x border are left out on both sides.
    """
    truth = np.asarray(truth)
    labels = np.asarray(labels)
    t_sizes = np.bincount(truth.ravel())
    p_sizes = np.bincount(labels.ravel())
    t_ids = np.flatnonzero(t_sizes)
    p_ids = np.flatnonzero(p_sizes)
    t_ids, p_ids = t_ids[t_ids != 0], p_ids[p_ids != 0]
    if interior:
        t_ids = np.setdiff1d(t_ids, _border_ids(truth))
        p_ids = np.setdiff1d(p_ids, _border_ids(labels))
    both = (truth > 0) & (labels > 0)
    pairs, shared = np.unique(np.stack([truth[both], labels[both]]), axis=1, return_counts=True)
    iou = shared / (t_sizes[pairs[0]] + p_sizes[pairs[1]] - shared)
    hit = iou > 0.5
    t_hit = np.intersect1d(pairs[0][hit], t_ids)
    p_hit = np.intersect1d(pairs[1][hit], p_ids)
    tp = min(len(t_hit), len(p_hit))
    return {"tp": int(tp), "fp": int(len(p_ids) - tp), "fn": int(len(t_ids) - tp)}


def _border_ids(labels: np.ndarray) -> np.ndarray:
    edges = np.concatenate([labels[:, 0].ravel(), labels[:, -1].ravel(), labels[:, :, 0].ravel(), labels[:, :, -1].ravel()])
    return np.unique(edges[edges != 0])


def scores(counts: list[dict]) -> dict:
    tp = sum(c["tp"] for c in counts)
    fp = sum(c["fp"] for c in counts)
    fn = sum(c["fn"] for c in counts)
    per_site_ap = [c["tp"] / max(1, c["tp"] + c["fp"] + c["fn"]) for c in counts]
    return {
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "ap50": tp / max(1, tp + fp + fn),
        "f1": 2 * tp / max(1, 2 * tp + fp + fn),
        "ap50_site_mean": float(np.mean(per_site_ap)),
        "ap50_site_sd": float(np.std(per_site_ap)),
    }


# ------------------------------------------------------------------ Cellpose weights


def train_cellpose(
    out_dir: Path, plate_kwargs: dict, *, train_sites: int, train_epochs: int, bsize: int, seed: int, recipe: str
) -> dict:
    """Train a Cellpose 3 network from scratch on 2D slices of a separate synthetic plate."""
    import torch
    from cellpose import models, train

    torch.manual_seed(seed)
    training = gd.synthetic_plate(**plate_kwargs, seed=seed)
    images, labels = [], []
    names = [str(c) for c in training.image.coords["c"].values]
    dna, rna = names.index("DNA"), names.index("RNA")
    sizes = training.image.sizes
    sites = [(w, s) for s in range(sizes["site"]) for w in range(sizes["well"])][:train_sites]  # all doses
    for w, s in sites:  # render only the sites used
        image = training.image[w, s].values
        truth = training.labels[w, s].values
        for z in range(image.shape[1]):
            if truth[z].max() > 0:
                images.append(np.stack([image[rna, z], image[dna, z]]).astype(np.float32))
                labels.append(truth[z])
    model = models.CellposeModel(gpu=torch.cuda.is_available(), pretrained_model=False)
    for module in model.net.modules():  # running BatchNorm statistics settle within a short run
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = 0.3
    started = time.perf_counter()
    path, train_losses, _ = train.train_seg(
        model.net,
        train_data=images,
        train_labels=labels,
        normalize=True,
        n_epochs=train_epochs,
        nimg_per_epoch=min(len(images), 16),
        learning_rate=0.01,
        batch_size=8,
        bsize=bsize,
        save_path=str(out_dir),
        model_name="selftrained_synthetic",
        min_train_masks=1,
    )
    seconds = time.perf_counter() - started
    return {
        "weights": str(path),
        "recipe": recipe,
        "trained_from": "random initialisation",
        "training_plate_seed": seed,
        "training_sites": len(sites),
        "training_slices": len(images),
        "epochs": train_epochs,
        "steps": train_epochs * ((min(len(images), 16) + 7) // 8),
        "bsize": bsize,
        "seconds": round(seconds, 1),
        "final_loss": float(train_losses[-1]),
    }


# ------------------------------------------------------------------ runs


def run_method(image, truth, method: str, **options) -> dict:
    """Segment the plate lazily, time the computation, score against the truth."""
    from gradcamo_dask.segment.segmenters import METHODS

    labels = gd.segment_plate(image, METHODS[method](**options))
    started = time.perf_counter()
    values = labels.values
    seconds = time.perf_counter() - started
    n_sites = values.shape[0] * values.shape[1]
    counts_all, counts_interior = [], []
    for w in range(values.shape[0]):
        for s in range(values.shape[1]):
            counts_all.append(match_counts(truth[w, s], values[w, s]))
            counts_interior.append(match_counts(truth[w, s], values[w, s], interior=True))
    return {
        "method": method,
        "options": {k: (str(v) if isinstance(v, os.PathLike) else v) for k, v in options.items()},
        "sites": n_sites,
        "seconds": round(seconds, 2),
        "sites_per_s": n_sites / seconds,
        "all_cells": scores(counts_all),
        "interior_cells": scores(counts_interior),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small plate and a short training (< 3 min)")
    parser.add_argument("--cellpose-weights", default=None, help="Cellpose weights to evaluate (skips training)")
    parser.add_argument("--no-cellpose", action="store_true", help="watershed only")
    parser.add_argument("--retrain", action="store_true", help="train new self-made Cellpose weights even if cached")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else "full"
    plate_kwargs = plate_options(mode)
    started = time.perf_counter()
    plate = gd.synthetic_plate(**plate_kwargs, seed=args.seed)
    image = plate.image.persist()  # rendering is not segmentation: keep it out of the timings
    truth = plate.labels.values
    spacing = image.attrs.get("spacing_zyx_um")
    cells_per_site = float(np.mean([len(np.unique(t)) - 1 for t in truth.reshape(-1, *truth.shape[2:])]))
    report: dict = {
        "benchmark": "bench_segment",
        "mode": mode,
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(),
        "plate": {
            "generator": "gradcamo_dask.synthetic_plate",
            "kwargs": plate_kwargs,
            "seed": args.seed,
            "shape": dict(image.sizes),
            "spacing_zyx_um": spacing,
            "cells_per_site_mean": cells_per_site,
        },
        "results": [],
    }
    print(f"[{mode}] plate {dict(image.sizes)}; watershed ...", flush=True)
    report["results"].append(run_method(image, truth, "watershed"))
    if not args.no_cellpose:
        import torch

        if args.cellpose_weights:
            weights = {"weights": args.cellpose_weights, "trained_from": "given"}
        else:
            print(f"[{mode}] self-trained Cellpose 3 weights (cache {cache_dir()}) ...", flush=True)
            weights = self_trained_weights(mode, args.seed + 1000, args.retrain)
        report["cellpose_weights"] = {k: v for k, v in weights.items() if k != "weights"}
        report["cellpose_weights"]["file"] = Path(weights["weights"]).name
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        corner = dict(well=[0], site=[0], y=slice(0, 64), x=slice(0, 64))
        for device in devices:
            print(f"[{mode}] Cellpose on {device} ...", flush=True)
            # load the model before timing (the per-process cache keeps it), on a small corner
            load_started = time.perf_counter()
            _ = gd.segment_plate(image.isel(**corner), gd.CellposeSegmenter(model=weights["weights"], device=device)).values
            report[f"cellpose_model_load_s_{device}"] = round(time.perf_counter() - load_started, 2)
            report["results"].append(run_method(image, truth, "cellpose", model=weights["weights"], device=device))
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"bench_segment_{mode}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / f"bench_segment_{mode}.md").write_text(markdown(report))
    print(markdown(report))
    return 0


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"# bench_segment ({report['mode']})",
        "",
        f"- date: {report['date']}",
        f"- machine: {m['platform']}, {m['cpu_count']} CPUs, torch {m['torch']} ({m['torch_threads']} threads), "
        f"GPU: {m['gpu'] or 'none'}, cellpose {m.get('cellpose')}",
        f"- plate: `synthetic_plate({', '.join(f'{k}={v}' for k, v in report['plate']['kwargs'].items())}, "
        f"seed={report['plate']['seed']})`, sizes {report['plate']['shape']}, "
        f"{report['plate']['cells_per_site_mean']:.1f} ground-truth cells per site",
        f"- total run time: {report['total_seconds']} s",
        "",
        "| method | device | AP@0.5 all | F1 all | AP@0.5 interior | F1 interior | per-site AP@0.5 (mean ± sd) | sites/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["results"]:
        a, i = r["all_cells"], r["interior_cells"]
        device = r["options"].get("device", "cpu")
        lines.append(
            f"| {r['method']} | {device} | {a['ap50']:.3f} | {a['f1']:.3f} | {i['ap50']:.3f} | {i['f1']:.3f} | "
            f"{a['ap50_site_mean']:.3f} ± {a['ap50_site_sd']:.3f} | {r['sites_per_s']:.3f} |"
        )
    if "cellpose_weights" in report:
        w = report["cellpose_weights"]
        lines += ["", "Cellpose weights: "]
        if w.get("trained_from") == "given":
            lines[-1] += f"given file `{w['file']}`."
        else:
            lines[-1] += (
                f"no pretrained Cellpose weights are available on this machine, so a Cellpose 3 network was "
                f"trained from random initialisation with Cellpose's own `train_seg` ('{w['recipe']}' recipe) on "
                f"{w['training_slices']} 2D slices of {w['training_sites']} sites of a separate synthetic plate "
                f"(seed {w['training_plate_seed']}; no evaluated site was seen), {w['steps']} steps at "
                f"{w['bsize']} px ({w['seconds']} s{', cached from an earlier run' if w.get('cached') else ''}). "
                "These figures describe that briefly trained network, not Cellpose's pretrained models."
            )
        lines.append(f"Cellpose model load (CPU, before timing): {report.get('cellpose_model_load_s_cpu')} s.")
    lines += [
        "",
        "AP@0.5 = TP / (TP + FP + FN) with one-to-one matches at IoU > 0.5 in 3D; F1 = 2TP / (2TP + FP + FN); "
        "pooled over all sites. 'interior' leaves out cells touching the site's y/x border on both sides "
        "(the cells crop extraction keeps). sites/s: wall time of computing the lazy labels of the whole plate "
        "on the default local Dask scheduler (images already in memory, model already loaded).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
