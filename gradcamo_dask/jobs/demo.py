"""The README's main job, end to end in a few minutes on 2 CPU cores.

synthetic plate (OME-Zarr) -> labels (ground truth, or the watershed baseline) ->
a small EfficientNet-B0 3D trained quickly on the training wells (or a given
bundle) -> :func:`~gradcamo_dask.jobs.score.score_plate` on the held-out wells on a
Dask cluster -> ``profiles.zarr`` -> Grad-CAMO summary by treatment and site.

Training is :func:`gradcamo_dask.jobs.train` (the paper's recipe: Adam, lr 3e-4, batch 8,
cross-entropy, leave-wells-out) at a small input grid for a few epochs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["DemoSettings", "run_demo"]

#: Small enough for 5 minutes on 2 CPU cores (measured: see README), big enough to learn the dose.
DEMO = dict(
    doses_um=(0.0, 1.0, 10.0),
    wells_per_treatment=2,
    sites_per_well=2,
    site_shape=(21, 128, 128),
    cell_radius=14.0,
    crop_shape=(None, 64, 64),
    input_shape=(16, 48, 48),
    # At this small grid the last conv map is 1 x 2 x 2: for a cell centred in its crop every one of the
    # four map voxels covers the mask alike, so its Grad-CAMO is the same for any model (about the mask's
    # share of the crop). A stage-4 block (1 x 3 x 3 here) has a centre voxel and can tell. The paper's
    # grid gives the last map 1 x 4 x 4.
    layers=("_blocks.4.10", "_head_swish"),
    epochs=6,
    batch_size=8,
    learning_rate=3e-4,
    # ~60 training cells and 6 epochs: the paper's augmentations (p = 0.5 each) slow learning more than
    # they help here (measured: held-out accuracy 0.45 with them, 0.58 without; chance 0.33).
    augmentation=False,
)


class DemoSettings(dict):
    """The demo's settings (:data:`DEMO` with overrides)."""


def run_demo(
    out: str | Path = "demo-output",
    *,
    labels_method: str = "truth",
    model: str | Path | None = None,
    scheduler: str | None = None,
    n_workers: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    settings: dict | None = None,
    log: Any = print,
) -> dict:
    """Run the demo; returns paths, timings and the summary table.

    Parameters
    ----------
    out : path
        Output folder: ``plate.zarr``, ``model/`` (unless ``model`` is given),
        ``profiles.zarr``, ``summary.csv``.
    labels_method : "truth" or "watershed"
        Ground-truth labels of the synthetic plate, or the classical segmenter.
    model : path, optional
        A bundle to use instead of training one.
    scheduler : str, optional
        Address of a running Dask scheduler (default: a local cluster).
    """
    from gradcamo_dask.engine.bundles import load_bundle
    from gradcamo_dask.jobs.cluster import connect
    from gradcamo_dask.profiles.qc import summarize_gradcamo
    from gradcamo_dask.jobs.score import score_plate
    from gradcamo_dask.profiles.store import open_profiles, write_profiles
    from gradcamo_dask.io.plate import open_labels, open_plate, write_plate
    from gradcamo_dask.io.synthetic import synthetic_plate

    cfg = {**DEMO, **(settings or {})}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    plate_path = out / "plate.zarr"
    if not (plate_path / "zarr.json").is_file() or overwrite:
        plate = synthetic_plate(doses_um=cfg["doses_um"], wells_per_treatment=cfg["wells_per_treatment"],
                                sites_per_well=cfg["sites_per_well"], site_shape=cfg["site_shape"],
                                cell_radius=cfg["cell_radius"], seed=seed, plate="demo")
        write_plate(plate_path, plate.image, plate.labels, overwrite=True)
    image = open_plate(plate_path)
    if labels_method == "truth":
        labels = open_labels(plate_path, like=image)
    elif labels_method == "watershed":
        from gradcamo_dask.segment.plate import segment_plate

        labels = segment_plate(image, "watershed")
    else:
        from gradcamo_dask.errors import InputError

        raise InputError(f"labels must be 'truth' or 'watershed', got {labels_method!r}")
    timings["plate"] = time.perf_counter() - t0
    log(f"plate {plate_path}: {image.sizes['well']} wells x {image.sizes['site']} sites, "
        f"{image.sizes['z']}x{image.sizes['y']}x{image.sizes['x']} voxels, labels: {labels_method}")

    wells = [str(w) for w in image["well"].values]
    rows = [str(r) for r in image["row"].values]
    train_wells = [w for w, r in zip(wells, rows) if r == rows[0]]
    test_wells = [w for w in wells if w not in train_wells]

    if model is None:
        from gradcamo_dask.jobs.train import Augmentation, train

        t1 = time.perf_counter()
        log(f"training a small EfficientNet-B0 3D on wells {', '.join(train_wells)} "
            f"(input grid {cfg['input_shape']}, {cfg['epochs']} epochs)")
        model = train(image, labels, out=out / "model", crop_size=cfg["crop_shape"], input_shape=cfg["input_shape"],
                      epochs=cfg["epochs"], batch_size=cfg["batch_size"], learning_rate=cfg["learning_rate"],
                      seed=seed, test_wells=test_wells, layers=list(cfg["layers"]), patience=None,
                      augmentation=None if not cfg["augmentation"] else Augmentation(), progress=progress)
        timings["train"] = time.perf_counter() - t1
    bundle = load_bundle(model)

    t2 = time.perf_counter()
    client = connect(scheduler, n_workers=n_workers)
    try:
        ds = score_plate(image.sel(well=test_wells), labels.sel(well=test_wells), bundle, client=client,
                         plate_path=str(plate_path), labels_path=str(plate_path) if labels_method == "truth" else "")
        log(f"scoring {ds.sizes['cell']} cells of held-out wells {', '.join(test_wells)} "
            f"(layers {', '.join(map(str, ds['layer'].values))})")
        write_profiles(ds, out / "profiles.zarr", client=client, overwrite=overwrite, progress=progress,
                       chunk_cells=64)
    finally:
        client.close()
    timings["score"] = time.perf_counter() - t2
    profiles = open_profiles(out / "profiles.zarr")
    frame = profiles[["gradcamo"]].to_dataframe().reset_index()
    summary = summarize_gradcamo(frame, by=["layer", "treatment", "site"])
    summary.to_csv(out / "summary.csv", index=False)
    accuracy = float((profiles["predicted"].values == np.asarray(
        [list(map(str, profiles["class"].values)).index(str(t)) for t in profiles["treatment"].values])).mean()) \
        if profiles.sizes["cell"] else float("nan")
    t3 = time.perf_counter()
    from gradcamo_dask.profiles.report import write_report

    report = write_report(out / "profiles.zarr", out / "report", plate=plate_path,
                          labels=plate_path if labels_method == "truth" else None)
    timings["report"] = time.perf_counter() - t3
    timings["total"] = time.perf_counter() - t0
    (out / "demo.json").write_text(json.dumps({"timings_s": timings, "test_accuracy": accuracy}, indent=2))
    return {"profiles": out / "profiles.zarr", "report": report, "bundle": Path(model), "summary": summary, "timings": timings,
            "accuracy": accuracy, "n_cells": int(profiles.sizes["cell"])}


def format_summary(summary: pd.DataFrame) -> str:
    """The summary as aligned text: mean ± sd, share >= 0.25, NaN count per layer, treatment and site."""
    lines = [f"{'layer':<14} {'treatment':<16} {'site':>4} {'cells':>5}  {'Grad-CAMO mean ± sd':<20} "
             f"{'>= 0.25':>7} {'NaN':>4}"]
    for _, r in summary.iterrows():
        sd = "nan" if pd.isna(r["sd"]) else f"{r['sd']:.3f}"
        lines.append(f"{str(r['layer']):<14} {str(r['treatment']):<16} {int(r['site']):>4} {int(r['n']):>5}  "
                     f"{r['mean']:.3f} ± {sd:<12} {r['share_on_target']:>7.2f} {int(r['n_undefined']):>4}")
    return "\n".join(lines)
