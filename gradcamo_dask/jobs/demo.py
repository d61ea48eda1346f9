"""The README's main job, end to end in a few minutes on 2 CPU cores: two models, one
that reads its own cell and one that reads the neighbours, and the Grad-CAMO that
tells them apart.

A mosaic synthetic plate with two compounds (OME-Zarr; only a maximal independent set
of cells responds, compound A with granules in RNA, compound B in AGP, see
:func:`gradcamo_dask.synthetic_plate`) -> labels (ground truth, or the watershed
baseline matched to the truth) -> two small EfficientNet-B0 3D trained at once, in two
processes of one torch thread each (:func:`~gradcamo_dask.jobs.train_processes.train_at_once`),
on the training wells, with one fixed intensity range per channel (``Recipe(intensity_scaling="plate")``:
the per-crop min-max would let a responding neighbour's bright granules rescale the
cell's own intensities):

- ``own_cell``: trained on the *responders*, whose compound shows in their own cell
  only (their neighbours are bystanders);
- ``neighbours``: trained on the *bystanders*, whose own cell shows nothing: the
  compound shows only in their responding neighbours.

Each model's held-out cells are scored with :func:`~gradcamo_dask.jobs.score.score_plate`
on a Dask cluster at layers whose maps are at least 3 x 3 in y and x, and the table
prints both models side by side: accuracy (chance 0.5), Grad-CAMO and what a uniform
map scores (the cell's share of its crop). A report per model shows its maps in a
gallery (high, middle and low Grad-CAMO cells, the cell outlined).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["DEMO", "MODELS", "TRAINED_ON", "complete_bundle", "format_comparison", "format_summary", "run_demo"]

#: Small enough for a few minutes on 2 CPU cores (measured: see README). bench_attention's plate knobs (mosaic,
#: granules, two compounds at 10 µM whose granules show in RNA and AGP, so both classes have local evidence and
#: chance is 0.5) and recipe at a smaller budget: crop 6 x 48 x 48 voxels centred on cells of radius 12 px (a cell
#: is half the crop's width; the crop reaches the ring of neighbours), model grid 6 x 48 x 48 (no resampling, so
#: the 2-4 px granules survive), a fixed intensity range per channel, x/y flips. Layers: the ones bench_attention's
#: full run ranks best among those that localise (benchmarks/results/bench_attention.md); `_blocks.3.x` and deeper
#: are 1 x 2 x 2 or coarser and cannot localise a cell. Without granules, at a 12 x 32 x 32 grid, or with a few
#: epochs on loaded cores, the models barely learned and their maps were noise
#: (benchmarks/results/bench_attention_diagnosis.md).
DEMO = dict(
    doses_um=(10.0,),
    compounds=2,  # bench_attention's plate: both classes have local evidence (no control class)
    wells_per_treatment=2,
    sites_per_well=32,  # ~300 responders to train on (16 sites left ~150: held-out accuracy 0.61)
    scored_sites=8,  # sites of each held-out well that are scored
    site_shape=(12, 128, 128),
    cell_radius=12.0,
    granules=1.0,
    responder_growth=False,  # responders keep the bystanders' size: Grad-CAMO cannot differ by cell size
    crop_shape=(6, 48, 48),  # 6 slices centred on the cell: the cells fill slices 2-7 of 12
    input_shape=(6, 48, 48),
    layers=("_blocks.0.0", "_blocks.1.1"),
    epochs=16,
    batch_size=8,
    learning_rate=1e-3,  # paper 3e-4; a few hundred steps need a faster rate (bench_attention)
    max_train_cells=300,
    augmentation="flips",  # x/y flips only: brightness/gamma would undo the fixed intensity range
    intensity_scaling="plate",
    train_workers=2,  # the two models train at once, one process and one torch thread each
)
#: Model name -> trained on responders (True) or on bystanders (False).
MODELS = {"own_cell": True, "neighbours": False}
#: What each model was trained on, as the table says it.
TRAINED_ON = {"own_cell": "responders (own cell)", "neighbours": "bystanders (neighbours)"}
#: Maps each model is scored with: the paper's Grad-CAM (profiles_<name>.zarr, reports) and HiResCAM beside it
#: (profiles_<name>_hirescam.zarr): the same models, the gradient kept per voxel.
MAPS = {"gradcam": "", "hirescam": "_hirescam"}


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
                                granules=cfg.get("granules", 0.0), plate="demo", compounds=cfg.get("compounds", 1),
                                spatial_dims=cfg.get("spatial_dims", 3),
                                responder_growth=cfg.get("responder_growth", True))
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
        ``profiles_<name>.zarr`` (and ``profiles_<name>_hirescam.zarr``, HiResCAM maps), ``report_<name>/``, ``comparison.csv``, ``summary.csv``,
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
    scored = image.isel(site=slice(0, int(cfg.get("scored_sites", image.sizes["site"]))))
    _score_models(out, scored, labels, truth, bundles, test_wells, plate_path, labels_method,
                  dict(scheduler=scheduler, n_workers=n_workers), {n: overwrite or n in fresh for n in MODELS},
                  progress, log, layers=tuple(cfg["layers"]))
    timings["score"] = time.perf_counter() - t2

    t3 = time.perf_counter()
    crop_z = cfg["crop_shape"][0] if len(cfg["crop_shape"]) == 3 and cfg["crop_shape"][0] else image.sizes["z"]
    crop_voxels = min(int(crop_z), image.sizes["z"]) * int(np.prod(cfg["crop_shape"][-2:]))
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


def _recipe(cfg: dict, seed: int, test_wells: list[str], image: Any) -> Any:
    """The demo's training recipe as it applies to ``image`` (2D plates: crops and grid in y and x)."""
    from gradcamo_dask.engine.augment import named_augmentation
    from gradcamo_dask.jobs.dimensionality import plate_recipe
    from gradcamo_dask.jobs.recipe import Recipe, Split

    recipe = Recipe(crop_size=cfg["crop_shape"], input_shape=cfg["input_shape"], epochs=cfg["epochs"],
                    batch_size=cfg["batch_size"], learning_rate=cfg["learning_rate"], seed=seed,
                    split=Split(test_wells=test_wells, max_train_cells=cfg["max_train_cells"]),
                    layers=list(cfg["layers"]), patience=None,
                    augmentation=named_augmentation(cfg["augmentation"]),
                    intensity_scaling=cfg.get("intensity_scaling", "crop"))
    return plate_recipe(recipe, image)


def complete_bundle(path: Path, recipe: Any) -> bool:
    """True when ``path`` holds a bundle that opens (weights match their hash), lists its cells and was
    trained with ``recipe``'s grids, epochs, seed, rate and intensity scaling: a rerun can reuse it
    instead of retraining."""
    from gradcamo_dask.engine.bundles import open_bundle
    from gradcamo_dask.errors import GradcamoError

    if not (path / "cells.csv").is_file():  # train() writes it after the bundle: its presence means finished
        return False
    try:
        config = open_bundle(path).config
    except (GradcamoError, OSError):
        return False
    prov, plate_range = config.provenance, "low" in (config.normalization or {})
    return (prov.get("input_shape") == list(recipe.input_shape) and prov.get("epochs") == recipe.epochs
            and prov.get("seed") == recipe.seed and prov.get("learning_rate") == recipe.learning_rate
            and prov.get("crop_size") == list(recipe.crop_size)
            and plate_range == (recipe.intensity_scaling == "plate"))


def _train_models(out: Path, cfg: dict, image: Any, labels: Any, truth: pd.DataFrame, test_wells: list[str],
                  seed: int, overwrite: bool, progress: bool, log: Any) -> tuple[dict, set]:
    """Train (or reuse) each model's bundle, the missing ones at once in ``cfg["train_workers"]`` processes;
    returns the bundle paths and the names trained now."""
    from gradcamo_dask.io.synthetic import population_labels
    from gradcamo_dask.jobs.train_processes import train_at_once

    recipe = _recipe(cfg, seed, test_wells, image)
    # train() also scores its own test split; the demo scores the held-out wells itself, so train() sees only
    # the first site of each test well (a cheap provenance figure) besides every training-well cell
    first_site = int(image["site"].values[0])
    seen = truth[~truth["well"].astype(str).isin(test_wells) | (truth["site"] == first_site)]
    bundles, jobs = {}, {}
    workers = int(cfg.get("train_workers", 1))
    for name, responder in MODELS.items():
        path = out / f"model_{name}"
        if not overwrite and complete_bundle(path, recipe):
            log(f"model '{name}': reusing the complete bundle {path}")
            bundles[name] = path
            continue
        log(f"training model '{name}' on the {'responders' if responder else 'bystanders'} outside wells "
            f"{', '.join(test_wells)} (input grid {tuple(recipe.input_shape)}, {cfg['epochs']} epochs)")
        jobs[name] = dict(image=image, labels=population_labels(labels, seen, responder), recipe=recipe, out=path,
                          progress=progress and (workers <= 1 or len(MODELS) == 1), resume=not overwrite)
    if len(jobs) > 1 and workers > 1:
        log(f"  {len(jobs)} models train at once in {min(workers, len(jobs))} processes, one torch thread each")
    bundles.update(train_at_once(jobs, workers=workers))
    return bundles, set(jobs)


def _score_models(out: Path, image: Any, labels: Any, truth: pd.DataFrame, bundles: dict, test_wells: list[str],
                  plate_path: Path, labels_method: str, cluster: dict, remake: dict, progress: bool,
                  log: Any, layers: tuple = DEMO["layers"]) -> None:
    """Score each model's held-out cells (of ``image``'s sites) into ``profiles_<name>.zarr`` and, with HiResCAM
    maps, ``profiles_<name>_hirescam.zarr`` (finished chunks are kept)."""
    from gradcamo_dask.io.synthetic import population_labels
    from gradcamo_dask.jobs.cluster import connect
    from gradcamo_dask.jobs.score import score_plate
    from gradcamo_dask.profiles.store import write_profiles

    client = connect(cluster["scheduler"], n_workers=cluster["n_workers"])
    try:
        for name, responder in MODELS.items():
            own = population_labels(labels, truth, responder).sel(well=test_wells, site=image["site"].values)
            for method, suffix in MAPS.items():  # the same cells, once per kind of map
                ds = score_plate(image.sel(well=test_wells), own, bundles[name], layers=list(layers), client=client,
                                 plate_path=str(plate_path),
                                 labels_path=str(plate_path) if labels_method == "truth" else "", cam_method=method)
                log(f"scoring model '{name}' ({method} maps) on {ds.sizes['cell']} held-out cells of wells "
                    f"{', '.join(test_wells)}")
                done = write_profiles(ds, out / f"profiles_{name}{suffix}.zarr", client=client,
                                      overwrite=remake[name], progress=progress, chunk_cells=64)
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
        for method, suffix in MAPS.items():
            scored = profiles if not suffix else open_profiles(out / f"profiles_{name}{suffix}.zarr")
            comparison += [{**row, "map": method} for row in _compare(name, scored, crop_voxels)]
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
    chance = 1.0 / len(classes)
    uniform = profiles["volume_voxels"].values.astype(float) / crop_voxels  # exact when the cell lies in its crop
    reference = float(uniform.mean()) if len(uniform) else float("nan")
    rows = []
    for layer in scored_layers(profiles):
        s = scores_of(profiles, layer)
        ok, ok_treated = s[np.isfinite(s)], s[np.isfinite(s) & treated]
        mean = float(ok.mean()) if len(ok) else float("nan")
        rows.append({"model": name, "layer": layer, "cells": int(len(s)), "accuracy": accuracy, "chance": chance,
                     "gradcamo_mean": mean, "gradcamo_sd": float(ok.std()) if len(ok) else float("nan"),
                     "share_on_target": float((ok >= DEFAULT_CUTOFF).mean()) if len(ok) else float("nan"),
                     "gradcamo_treated": float(ok_treated.mean()) if len(ok_treated) else float("nan"),
                     "uniform_reference": reference, "times_uniform": mean / reference if len(uniform) else float("nan"),
                     "treated_times_uniform": float(ok_treated.mean() / uniform[treated].mean())
                     if len(ok_treated) else float("nan")})
    return rows


def format_comparison(table: pd.DataFrame) -> str:
    """Both models side by side (one column each): held-out cells, accuracy against chance, the uniform-map
    reference and, per layer, Grad-CAMO mean ± sd, its ratio to the uniform map (``*``: the higher of the
    two) and the share >= 0.25."""
    models = list(dict.fromkeys(table["model"]))
    first = {m: table[table["model"] == m].iloc[0] for m in models}
    width = 22

    def row(label: str, values: list[str]) -> str:
        return f"{label:<30}" + "".join(f"{v:<{width}}" for v in values)

    chance = float(first[models[0]].get("chance", 0.5))
    lines = [row("", models),
             row("trained on", [TRAINED_ON.get(m, "") for m in models]),
             row("held-out cells", [str(int(first[m]["cells"])) for m in models]),
             row(f"accuracy (chance {chance:.2f})", [f"{first[m]['accuracy']:.2f}" for m in models]),
             row("uniform map (cell / crop)", [f"{first[m]['uniform_reference']:.3f}" for m in models])]
    for method, layer in dict.fromkeys(zip(table["map"], table["layer"])):
        at = {m: table[(table["model"] == m) & (table["layer"] == layer) & (table["map"] == method)].iloc[0]
              for m in models}
        best = max(models, key=lambda m: np.nan_to_num(at[m]["times_uniform"], nan=-1))
        score = "Grad-CAMO" if method == "gradcam" else "HiResCAM-O"
        lines += [row(f"{score} at {layer}", [f"{at[m]['gradcamo_mean']:.3f} ± {at[m]['gradcamo_sd']:.3f}"
                                              for m in models]),
                  row("  x uniform map", [f"{at[m]['times_uniform']:.2f}" + (" *" if m == best else "")
                                          for m in models]),
                  row("  share >= 0.25", [f"{at[m]['share_on_target']:.2f}" for m in models])]
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
