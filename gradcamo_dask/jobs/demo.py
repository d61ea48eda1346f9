"""The README's main job, end to end in a few minutes on 2 CPU cores: two models, one
that reads its own cell and one that reads the neighbours, and the Grad-CAMO that
tells them apart.

A mosaic synthetic plate (OME-Zarr; only a maximal independent set of cells responds
to the compound, see :func:`gradcamo_dask.synthetic_plate`) -> labels (ground truth,
or the watershed baseline matched to the truth) -> two small EfficientNet-B0 3D
trained on the training wells with :func:`gradcamo_dask.jobs.train`:

- ``own_cell``: trained on the *responders*, whose treatment shows in their own cell
  only (their neighbours look like controls);
- ``neighbours``: trained on the *bystanders*, whose own cell looks like a control:
  the treatment shows only in their responding neighbours.

Each model's held-out cells are scored with :func:`~gradcamo_dask.jobs.score.score_plate`
on a Dask cluster at a layer whose map is at least 3 x 3 in y and x, and the table
prints both models' Grad-CAMO beside what a uniform map scores (the cell's share of
its crop). A report per model shows its maps in a gallery.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["DEMO", "MODELS", "complete_bundle", "format_comparison", "format_summary", "run_demo"]

#: Small enough for a few minutes on 2 CPU cores (measured: see README). Crop 48 x 48 px around cells of
#: radius 12 px (a cell is half the crop's width; the crop reaches the ring of neighbours), model grid
#: 12 x 48 x 48 (no resampling in y and x, so the 2-4 px RNA granules of responding cells survive). Layers: the
#: two bench_attention ranks best for the in-cell model among those that localise, the stem `_swish`
#: (6 x 24 x 24) and `_blocks.2.4` (1 x 3 x 3); `_blocks.3.x` and deeper are 1 x 2 x 2 or coarser and cannot
#: localise a cell. Without granules, or at a 12 x 32 x 32 grid, the models barely learned and their
#: maps were noise (benchmarks/results/bench_attention_diagnosis.md).
DEMO = dict(
    doses_um=(0.0, 10.0),
    wells_per_treatment=2,
    sites_per_well=8,
    site_shape=(12, 128, 128),
    cell_radius=12.0,
    granules=1.0,
    crop_shape=(None, 48, 48),
    input_shape=(12, 48, 48),
    layers=("_swish", "_blocks.2.4"),
    epochs=5,
    batch_size=8,
    learning_rate=1e-3,  # paper 3e-4; a few hundred steps need a faster rate (bench_attention)
    max_train_cells=150,
    # few cells and epochs: the paper's augmentations (p = 0.5 each) slow learning more than they help here
    augmentation=False,
)
#: Model name -> trained on responders (True) or on bystanders (False).
MODELS = {"own_cell": True, "neighbours": False}


def _truth_for(labels: Any, truth_labels: Any, truth: pd.DataFrame) -> pd.DataFrame:
    """Roles of segmented cells: each takes the role of the true cell it overlaps most."""
    rows = []
    for wi, w in enumerate(labels["well"].values):
        for si, s in enumerate(labels["site"].values):
            seg = np.asarray(labels.data[wi, si].compute()).ravel()
            true = np.asarray(truth_labels.data[wi, si].compute()).ravel()
            both = (seg > 0) & (true > 0)
            if not both.any():
                continue
            pairs = pd.DataFrame({"seg": seg[both], "true": true[both]}).value_counts().reset_index()
            best = pairs.sort_values("count", ascending=False).drop_duplicates("seg")
            rows.append(pd.DataFrame({"well": str(w), "site": int(s), "object_number": best["seg"].to_numpy(),
                                      "true_object": best["true"].to_numpy()}))
    table = pd.concat(rows, ignore_index=True)
    roles = truth.rename(columns={"object_number": "true_object"})
    return table.merge(roles, on=["well", "site", "true_object"], how="left").dropna(subset=["responder"])


def _plate(out: Path, cfg: dict, seed: int, overwrite: bool, labels_method: str, log: Any):
    from gradcamo_dask.io.plate import open_labels, open_plate, write_plate
    from gradcamo_dask.io.synthetic import cell_truth, synthetic_plate

    plate_path = out / "plate.zarr"
    truth_path = plate_path / "cell_truth.csv"
    if not (plate_path / "zarr.json").is_file() or not truth_path.is_file() or overwrite:
        plate = synthetic_plate(doses_um=cfg["doses_um"], wells_per_treatment=cfg["wells_per_treatment"],
                                sites_per_well=cfg["sites_per_well"], site_shape=cfg["site_shape"],
                                cell_radius=cfg["cell_radius"], seed=seed, mosaic=True,
                                granules=cfg.get("granules", 0.0), plate="demo")
        write_plate(plate_path, plate.image, plate.labels, overwrite=True)
        cell_truth(plate).to_csv(truth_path, index=False)
    image = open_plate(plate_path)
    truth_labels = open_labels(plate_path, like=image)
    truth = pd.read_csv(truth_path, dtype={"well": str})
    if labels_method == "truth":
        labels = truth_labels
    elif labels_method == "watershed":
        from gradcamo_dask.segment.plate import segment_plate

        labels = segment_plate(image, "watershed").persist()
        truth = _truth_for(labels, truth_labels, truth)
    else:
        from gradcamo_dask.errors import InputError

        raise InputError(f"labels must be 'truth' or 'watershed', got {labels_method!r}")
    log(f"plate {plate_path}: {image.sizes['well']} wells x {image.sizes['site']} sites, "
        f"{image.sizes['z']}x{image.sizes['y']}x{image.sizes['x']} voxels, mosaic wells "
        f"({truth['responder'].mean():.0%} of cells respond), labels: {labels_method}")
    return plate_path, image, labels, truth


def run_demo(
    out: str | Path = "demo-output",
    *,
    labels_method: str = "truth",
    scheduler: str | None = None,
    n_workers: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    settings: dict | None = None,
    log: Any = print,
) -> dict:
    """Run the demo; returns paths, timings, the comparison and the summary tables.

    A rerun with the same ``out`` and settings resumes: the plate, every complete
    model bundle and every finished profiles chunk are reused, not remade.

    Parameters
    ----------
    out : path
        Output folder: ``plate.zarr`` (with ``cell_truth.csv``), ``model_<name>/``,
        ``profiles_<name>.zarr``, ``report_<name>/``, ``comparison.csv``, ``summary.csv``,
        ``demo_settings.json`` (what a rerun must match to resume).
    labels_method : "truth" or "watershed"
        Ground-truth labels of the synthetic plate, or the classical segmenter (each
        segmented cell takes the role of the true cell it overlaps most).
    scheduler : str, optional
        Address of a running Dask scheduler (default: a local cluster).
    overwrite : bool
        Remake everything in ``out`` instead of resuming.
    """
    cfg = {**DEMO, **(settings or {})}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _check_settings(out, cfg, seed, labels_method, overwrite)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    plate_path, image, labels, truth = _plate(out, cfg, seed, overwrite, labels_method, log)
    timings["plate"] = time.perf_counter() - t0

    wells, rows = [str(w) for w in image["well"].values], [str(r) for r in image["row"].values]
    test_wells = [w for w, r in zip(wells, rows) if r != rows[0]]
    t1 = time.perf_counter()
    bundles, fresh = _train_models(out, cfg, image, labels, truth, test_wells, seed, overwrite, progress, log)
    timings["train"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    _score_models(out, image, labels, truth, bundles, test_wells, plate_path, labels_method,
                  dict(scheduler=scheduler, n_workers=n_workers), {n: overwrite or n in fresh for n in MODELS},
                  progress, log, layers=tuple(cfg["layers"]))
    timings["score"] = time.perf_counter() - t2

    t3 = time.perf_counter()
    crop_voxels = image.sizes["z"] * int(np.prod(cfg["crop_shape"][1:]))
    table, summary, reports, n_cells = _tables_and_reports(out, cfg, crop_voxels, plate_path, labels_method)
    timings["report"] = time.perf_counter() - t3
    timings["total"] = time.perf_counter() - t0
    (out / "demo.json").write_text(json.dumps({"timings_s": timings, "comparison": table.to_dict("records"),
                                               "retrained": sorted(fresh)}, indent=2))
    return {"profiles": {n: out / f"profiles_{n}.zarr" for n in MODELS}, "reports": reports, "bundles": bundles,
            "comparison": table, "summary": summary, "timings": timings, "n_cells": n_cells,
            "retrained": sorted(fresh)}


def _check_settings(out: Path, cfg: dict, seed: int, labels_method: str, overwrite: bool) -> None:
    """Record the run's settings in ``out``; refuse to resume a folder made with other settings."""
    from gradcamo_dask.errors import InputError

    wanted = json.loads(json.dumps({"settings": cfg, "seed": seed, "labels": labels_method}))
    file = out / "demo_settings.json"
    if file.is_file() and not overwrite:
        found = json.loads(file.read_text())
        if found != wanted:
            changed = sorted(k for k in {**found.get("settings", {}), **wanted["settings"]}
                             if found.get("settings", {}).get(k) != wanted["settings"].get(k))
            changed += [k for k in ("seed", "labels") if found.get(k) != wanted[k]]
            raise InputError(f"{out} holds a demo run with other settings ({', '.join(changed)}); pass --overwrite "
                             "to remake it, or choose another --out")
    file.write_text(json.dumps(wanted, indent=2) + "\n")


def _recipe(cfg: dict, seed: int, test_wells: list[str]) -> Any:
    from gradcamo_dask.engine.augment import Augmentation
    from gradcamo_dask.jobs.recipe import Recipe, Split

    return Recipe(crop_size=cfg["crop_shape"], input_shape=cfg["input_shape"], epochs=cfg["epochs"],
                  batch_size=cfg["batch_size"], learning_rate=cfg["learning_rate"], seed=seed,
                  split=Split(test_wells=test_wells, max_train_cells=cfg["max_train_cells"]),
                  layers=list(cfg["layers"]), patience=None,
                  augmentation=Augmentation() if cfg["augmentation"] else None)


def complete_bundle(path: Path, recipe: Any) -> bool:
    """True when ``path`` holds a bundle that opens (weights match their hash), lists its cells and was
    trained with ``recipe``'s grids, epochs, seed and rate: a rerun can reuse it instead of retraining."""
    from gradcamo_dask.engine.bundles import open_bundle
    from gradcamo_dask.errors import GradcamoError

    if not (path / "cells.csv").is_file():  # train() writes it after the bundle: its presence means finished
        return False
    try:
        prov = open_bundle(path).config.provenance
    except (GradcamoError, OSError):
        return False
    return (prov.get("input_shape") == list(recipe.input_shape) and prov.get("epochs") == recipe.epochs
            and prov.get("seed") == recipe.seed and prov.get("learning_rate") == recipe.learning_rate
            and prov.get("crop_size") == list(recipe.crop_size))


def _train_models(out: Path, cfg: dict, image: Any, labels: Any, truth: pd.DataFrame, test_wells: list[str],
                  seed: int, overwrite: bool, progress: bool, log: Any) -> tuple[dict, set]:
    """Train (or reuse) each model's bundle; returns the bundle paths and the names trained now."""
    from gradcamo_dask.io.synthetic import population_labels
    from gradcamo_dask.jobs.train import train

    recipe = _recipe(cfg, seed, test_wells)
    bundles, fresh = {}, set()
    for name, responder in MODELS.items():
        path = out / f"model_{name}"
        if not overwrite and complete_bundle(path, recipe):
            log(f"model '{name}': reusing the complete bundle {path}")
            bundles[name] = path
            continue
        log(f"training model '{name}' on the {'responders' if responder else 'bystanders'} outside wells "
            f"{', '.join(test_wells)} (input grid {cfg['input_shape']}, {cfg['epochs']} epochs)")
        bundles[name] = train(image, population_labels(labels, truth, responder), recipe, out=path,
                              progress=progress, resume=not overwrite)
        fresh.add(name)
    return bundles, fresh


def _score_models(out: Path, image: Any, labels: Any, truth: pd.DataFrame, bundles: dict, test_wells: list[str],
                  plate_path: Path, labels_method: str, cluster: dict, remake: dict, progress: bool,
                  log: Any, layers: tuple = DEMO["layers"]) -> None:
    """Score each model's held-out cells into ``profiles_<name>.zarr`` (finished chunks are kept)."""
    from gradcamo_dask.io.synthetic import population_labels
    from gradcamo_dask.jobs.cluster import connect
    from gradcamo_dask.jobs.score import score_plate
    from gradcamo_dask.profiles.store import write_profiles

    client = connect(cluster["scheduler"], n_workers=cluster["n_workers"])
    try:
        for name, responder in MODELS.items():
            own = population_labels(labels, truth, responder).sel(well=test_wells)
            ds = score_plate(image.sel(well=test_wells), own, bundles[name], layers=list(layers), client=client,
                             plate_path=str(plate_path), labels_path=str(plate_path) if labels_method == "truth" else "")
            log(f"scoring model '{name}' on {ds.sizes['cell']} held-out cells of wells {', '.join(test_wells)}")
            done = write_profiles(ds, out / f"profiles_{name}.zarr", client=client, overwrite=remake[name],
                                  progress=progress, chunk_cells=64)
            if done.get("skipped"):
                log(f"  {done['skipped']} of {done['chunks']} chunks were already written: kept")
    finally:
        client.close()


def _tables_and_reports(out: Path, cfg: dict, crop_voxels: int, plate_path: Path,
                        labels_method: str) -> tuple[pd.DataFrame, pd.DataFrame, dict, int]:
    """The comparison and summary tables (also as CSV) and one report per model."""
    from gradcamo_dask.profiles.qc import summarize_gradcamo
    from gradcamo_dask.profiles.report import write_report
    from gradcamo_dask.profiles.store import open_profiles

    comparison, summaries, reports, n_cells = [], [], {}, 0
    for name in MODELS:
        profiles = open_profiles(out / f"profiles_{name}.zarr")
        comparison += _compare(name, profiles, crop_voxels)
        frame = profiles[["gradcamo"]].to_dataframe().reset_index()
        summaries.append(summarize_gradcamo(frame, by=["layer", "treatment"]).assign(model=name))
        n_cells += int(profiles.sizes["cell"])
        reports[name] = write_report(out / f"profiles_{name}.zarr", out / f"report_{name}", layer=cfg["layers"][0],
                                     plate=plate_path, labels=plate_path if labels_method == "truth" else None)
    table = pd.DataFrame(comparison)
    summary = pd.concat(summaries, ignore_index=True)
    summary = summary[["model"] + [c for c in summary.columns if c != "model"]]
    table.to_csv(out / "comparison.csv", index=False)
    summary.to_csv(out / "summary.csv", index=False)
    return table, summary, reports, n_cells


def _compare(name: str, profiles: Any, crop_voxels: int) -> list[dict]:
    """One row per scored layer: accuracy, Grad-CAMO (all cells, treated cells), share >= 0.25 and the
    uniform-map reference."""
    from gradcamo_dask.profiles.qc import DEFAULT_CUTOFF, scored_layers, scores_of

    classes = [str(c) for c in profiles["class"].values]
    treatments = [str(t) for t in profiles["treatment"].values]
    truth = np.asarray([classes.index(t) for t in treatments])
    treated = np.asarray([t != "control" for t in treatments], dtype=bool)
    accuracy = float((profiles["predicted"].values == truth).mean()) if len(truth) else float("nan")
    uniform = profiles["volume_voxels"].values.astype(float) / crop_voxels
    reference = float(uniform.mean()) if len(uniform) else float("nan")
    rows = []
    for layer in scored_layers(profiles):
        s = scores_of(profiles, layer)
        ok, ok_treated = s[np.isfinite(s)], s[np.isfinite(s) & treated]
        mean = float(ok.mean()) if len(ok) else float("nan")
        rows.append({"model": name, "layer": layer, "cells": int(len(s)), "accuracy": accuracy,
                     "gradcamo_mean": mean, "gradcamo_sd": float(ok.std()) if len(ok) else float("nan"),
                     "share_on_target": float((ok >= DEFAULT_CUTOFF).mean()) if len(ok) else float("nan"),
                     "gradcamo_treated": float(ok_treated.mean()) if len(ok_treated) else float("nan"),
                     "uniform_reference": reference, "times_uniform": mean / reference if len(uniform) else float("nan"),
                     "treated_times_uniform": float(ok_treated.mean() / uniform[treated].mean())
                     if len(ok_treated) else float("nan")})
    return rows


def format_comparison(table: pd.DataFrame) -> str:
    """Both models side by side: Grad-CAMO (all held-out cells, and the treated ones, whose class has
    local evidence) against the uniform-map reference, per layer."""
    lines = [f"{'model':<11} {'layer':<12} {'cells':>5} {'accuracy':>8}  {'Grad-CAMO mean ± sd':<20} "
             f"{'>= 0.25':>7} {'uniform map':>11} {'x uniform':>9} {'treated':>7} {'x uniform':>9}"]
    for _, r in table.iterrows():
        lines.append(f"{r['model']:<11} {r['layer']:<12} {int(r['cells']):>5} {r['accuracy']:>8.2f}  "
                     f"{r['gradcamo_mean']:.3f} ± {r['gradcamo_sd']:<12.3f} {r['share_on_target']:>7.2f} "
                     f"{r['uniform_reference']:>11.3f} {r['times_uniform']:>9.2f} {r['gradcamo_treated']:>7.3f} "
                     f"{r['treated_times_uniform']:>9.2f}")
    return "\n".join(lines)


def format_summary(summary: pd.DataFrame) -> str:
    """The summary as aligned text: mean ± sd, share >= 0.25, NaN count per model, layer and treatment."""
    lines = [f"{'model':<11} {'layer':<12} {'treatment':<16} {'cells':>5}  {'Grad-CAMO mean ± sd':<20} "
             f"{'>= 0.25':>7} {'NaN':>4}"]
    for _, r in summary.iterrows():
        sd = "nan" if pd.isna(r["sd"]) else f"{r['sd']:.3f}"
        lines.append(f"{str(r.get('model', '')):<11} {str(r['layer']):<12} {str(r['treatment']):<16} "
                     f"{int(r['n']):>5}  {r['mean']:.3f} ± {sd:<12} {r['share_on_target']:>7.2f} "
                     f"{int(r['n_undefined']):>4}")
    return "\n".join(lines)
