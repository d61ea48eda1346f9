"""Ground-truth attention benchmark: does Grad-CAMO tell a model that reads its own cell
from one that reads the neighbours?

One mosaic plate (``synthetic_plate(mosaic=True)``: only a maximal independent set of
cells responds to the compound, the same cells in every well, density independent of
dose; two compounds at 10 µM whose granules show in RNA and AGP) holds both cases, on the same images:

- **in-cell** model: EfficientNet-B0 3D trained on the *responders* only. Their
  neighbours are bystanders, which look like controls: the treatment is readable only
  inside the cell of interest (a "clean" plate from this model's point of view).
- **off-cell** model: the same network and recipe trained on the *bystanders* only.
  Their own cell looks like a control: the treatment is readable only through the
  responding neighbours in the crop (the paper's failure mode).

With ``--clean-plate alone`` the in-cell model trains and is audited on the same plate drawn without its
bystanders (``synthetic_plate(bystanders=False)``: the same responders, each alone, a sparsely seeded well),
so its crops hold no other cell for a map to credit; the off-cell model keeps the full mosaic.

Each model is trained with several seeds and audited on the held-out wells (row C):

- Grad-CAMO of the predicted class at every spatial layer (one explain pass), ranked
  with the layer sweep's ranking (:func:`gradcamo_dask.rank_layers`), mean ± sd, share
  >= 0.25 and the uniform-map reference (the cell's share of its crop);
- test accuracy, and accuracy when one location is blanked (set to the training mean,
  i.e. 0 after standardisation): *cell only* (everything outside the cell's mask,
  grown by 2 px, blanked) and *surround only* (the grown cell blanked), which shows
  what each model really uses;
- Cohen's d between the two models' Grad-CAMO on their held-out cells, per layer, also of each score
  divided by its cell's uniform share (size-free), and the ceiling per layer (the best any map on its grid
  can score for the cell, :func:`gradcamo_dask.gradcamo_ceiling`);
- profile quality (copairs mAP of treatment retrieval, :mod:`gradcamo_dask.profiles.quality`)
  of every held-out cell (both populations) with each model's ``_head_swish`` features:
  all cells, cells with Grad-CAMO >= 0.25 at the best layer, the same number kept at
  random (5 draws).

Usage::

    python benchmarks/bench_attention.py --quick   # 1 seed, tiny, plus a 3D ViT row (attention_vit.py); a test
    python benchmarks/bench_attention.py --workers 2   # 3 seeds, the committed figures (~25 min on 2 cores)

Writes ``benchmarks/results/bench_attention[_quick].json`` and ``.md`` (date, machine, load).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

from gradcamo_dask.engine.augment import AUGMENTATION_NAMES  # noqa: E402  (after the path setup above)

SETTINGS = {
    "quick": dict(sites_per_well=2, epochs=1, max_train_cells=16, max_test_cells=32, seeds=(0,), draws=2),
    "full": dict(sites_per_well=48, epochs=24, max_train_cells=600, max_test_cells=300, seeds=(0, 1, 2), draws=5),
}
# Full mode: 48 sites per well (about 540 responders and 600 bystanders to train on), 24 epochs, x/y flips. On a
# quiet machine (load ~1-2) one seed took 294 s at 16 epochs without flips (held-out accuracy 0.76 / 0.88, d 1.00
# at _blocks.0.0) and 528 s at 24 epochs with flips (0.90 / 0.91, d 1.57 at _blocks.1.1), beside two helpers'
# tests (results/bench_attention_diagnosis.md, third part). Earlier full runs (24 sites, 8 epochs) left models at
# 0.49-0.69 when the cores were loaded ~20: training is cheap on idle cores (16 epochs of 268 cells: 124 s) and
# ~8x slower at that load.
# Sized for <= 25 min on 2 shared cores. torch runs on ONE thread: with other engineers' jobs on the machine
# (load average ~10), a forward + backward pass of 8 cells took 10.5 s on 2 threads and 0.92 s on 1.
# Learning rate 1e-3 (paper: 3e-4): a first full run at 3e-4, model grid 12 x 48 x 48 and 4 epochs left the
# in-cell model at chance (0.525 held-out accuracy, 240 s); the smaller grid buys steps, the rate speed.
# Augmentation: x/y flips only (the paper's brightness/gamma would rescale the fixed intensity range the plate
# scaling gives; with ~300 cells x 6 epochs they slowed learning); flips lifted held-out accuracy from 0.76 to 0.90
# together with 24 instead of 16 epochs.
# Crop 48 x 48 px around cells of radius 12 px (a control cell is ~24 px across, half the crop's width; a crop
# reaches the ring of neighbours, whose centres sit ~22 px away), model grid 12 x 48 x 48 (no resampling in y, x)
# and granules=1 (bright RNA puncta inside responders): the diagnosis (results/bench_attention_diagnosis.md) found
# that without granules, or at a 12 x 32 x 32 grid that blurs the 2-4 px puncta, the models barely learn (held-out
# accuracy 0.61-0.73 and 0.66), and a barely-learned model's Grad-CAM is noise. Maps at 12 x 48 x 48: 6 x 24 x 24
# (stem _swish), 3 x 12 x 12 (_blocks.0.0), 2 x 6 x 6 (_blocks.1.x), 1 x 3 x 3 (_blocks.2.4); _blocks.3.7 is
# 1 x 2 x 2 and _head_swish 1 x 1 x 1: they cannot localise a cell (reported, marked).
# Intensity scaling "plate" (one fixed range per channel, fitted on the training sites; the bundle carries it and
# the audit, blanking included, applies it): the paper's per-crop min-max ("crop") leaked the treatment to every voxel
# of a responder's crop, so both models read both locations (results/bench_attention_crop.md, the last crop run).
# responder_growth=False: responders keep the bystanders' size, so a difference in Grad-CAMO cannot come from size.
# Crop z 6 slices centred on the cell (model grid 6 x 48 x 48): cells fill z 2-7 of the 12 slices, and maps with 1-3
# voxels in z put most of their mass in the empty slices above them when the crop keeps all 12; 8 epochs: with the
# plate scaling a model must find the puncta themselves (no crop-wide intensity shift), and a 1-seed diagnosis at
# 5 epochs was still learning (train accuracy 0.72-0.75; results/bench_attention_diagnosis.md).
COMMON = dict(doses_um=(10.0,), compounds=2, wells_per_treatment=2, site_shape=(12, 128, 128), cell_radius=12.0,
              granules=1.0, crop_size=(6, 48, 48), input_shape=(6, 48, 48), learning_rate=1e-3, plate_seed=0,
              test_rows=("C",), cutoff=0.25, feature_layer="_head_swish", target="predicted",
              intensity_scaling="plate", responder_growth=False, augmentation="flips", clean_plate="mosaic")
#: The reference that shows the per-crop leak: the last full run with intensity_scaling="crop" (committed as is).
CROP_REFERENCE = HERE / "results" / "bench_attention_crop.json"
TARGETS = ("predicted", "true")  # Grad-CAM of the predicted class, and of the true label (DESIGN allows both)
LAYERS = ("_swish", "_blocks.0.0", "_blocks.1.1", "_blocks.1.2", "_blocks.2.4", "_blocks.3.7", "_head_swish")
MODELS = {"in_cell": True, "off_cell": False}  # trained on responders / on bystanders
#: Maps audited: the paper's Grad-CAM, and HiResCAM on the same models (a reference, not the paper's score)
METHODS = ("gradcam", "hirescam")




def cohens_d(a: np.ndarray, b: np.ndarray) -> float:
    """(mean a - mean b) / pooled sd (NaNs dropped)."""
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    pooled = np.sqrt(((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)) / (len(a) + len(b) - 2))
    return float((a.mean() - b.mean()) / pooled) if pooled > 0 else float("nan")


def test_cells(plate, truth, max_cells: int, seed: int, raw: bool = False, common: dict | None = None):
    """Held-out cells (row C) of both populations: table, crops at the crop grid (rescaled per crop to [0, 1],
    or with ``raw`` the raw intensities as float32, for :func:`audit` to normalise as each bundle says) and masks.
    ``common``: the run's settings (crop size, test rows, and ``crop_fill``, what fills windows past the site as
    the audited models were trained; default COMMON)."""
    import torch

    from gradcamo_dask.cells import cell_table
    from gradcamo_dask.jobs.trainset import SiteReader

    c = common or COMMON
    table = cell_table(plate.labels, plate.platemap, size=c["crop_size"])
    table = table[~table["touches_border"]] if "touches_border" in table else table
    table = table.merge(truth[["well", "site", "object_number", "responder", "responding_neighbours"]],
                        on=["well", "site", "object_number"], validate="one_to_one")
    table = table[table["well"].str[0].isin(c["test_rows"])].reset_index(drop=True)
    if len(table) > max_cells:  # a seeded subset, balanced between the populations as far as possible
        rng = np.random.default_rng(seed)
        picks = []
        for _r, group in table.groupby("responder"):
            picks.append(rng.choice(group.index.to_numpy(), size=min(len(group), max_cells // 2), replace=False))
        table = table.loc[np.sort(np.concatenate(picks))].reset_index(drop=True)
    table["split"] = "test"
    crop_grid = (c["crop_size"][0] or plate.image.sizes["z"], *c["crop_size"][1:])  # explain resamples
    reader = SiteReader(plate.image, plate.labels, table, c["crop_size"], crop_grid, cache=False,
                        outside=c.get("crop_fill", "zero"))
    if raw:  # the identity range: raw intensities as float32
        reader.intensity_range = {"low": [0.0] * plate.image.sizes["c"], "high": [1.0] * plate.image.sizes["c"]}
    try:
        xs, ms, rows = [], [], []
        for _key, data in reader.stream(reader.sites(["test"])):
            xs.append(data.inputs)
            ms.append(data.masks)
            rows.append(data.rows)
    finally:
        reader.close()
    order = np.concatenate(rows)
    return table.iloc[order].reset_index(drop=True), torch.cat(xs), torch.cat(ms)


def blanked(x, masks, keep_cell: bool):
    """Standardised crops (crop grid) with the cell (its mask grown by 2 px in y and x) or everything else
    set to 0."""
    import torch
    from scipy import ndimage as ndi

    grown = ndi.binary_dilation(masks.numpy(), structure=np.ones((1, 1, 5, 5), bool))
    region = torch.from_numpy(grown)[:, None]
    return torch.where(region if keep_cell else ~region, x, torch.zeros_like(x))


def audit(bundle_path: Path, table, x01, masks, layers: tuple = LAYERS, raw: bool = False) -> dict:
    """Grad-CAMO at every layer, features, accuracy and blanked accuracies of one bundle. ``x01``: crops
    rescaled per crop, or with ``raw`` raw crops normalised here as the bundle says (its fixed range with
    intensity_scaling="plate"), so blanking sees the model's own normalisation."""
    import torch
    import torch.nn.functional as F

    from gradcamo_dask.engine.bundles import open_bundle
    from gradcamo_dask.engine.explain import explain
    from gradcamo_dask.normalize import normalize_crops

    bundle = open_bundle(bundle_path)
    cfg = bundle.config
    if raw:
        x = normalize_crops(x01, cfg.normalization)
    elif "low" in cfg.normalization:
        raise ValueError(f"{bundle_path} rescales with a fixed range (intensity_scaling='plate'): audit it on raw "
                         "crops (test_cells(raw=True), audit(raw=True))")
    else:
        x = normalize_crops(x01, cfg.normalization, rescaled=True)
    y = np.array([cfg.classes.index(str(t)) for t in table["treatment"]])
    out = {"y": y, "by_target": {}}
    for target in TARGETS:
        res = explain(bundle.model, x, masks, layers=list(layers), target="predicted" if target == "predicted"
                      else [int(v) for v in y], batch_size=16, input_shape=tuple(cfg.input_shape))
        out["by_target"][target] = {k: np.asarray(v, dtype=np.float64) for k, v in res.gradcamo.items()}
        if target == "predicted":
            out.update(predicted=np.asarray(res.predicted), grids={k: list(v) for k, v in res.grids.items()},
                       features=np.asarray(res.features[COMMON["feature_layer"]], dtype=np.float64))
    out["gradcamo"] = out["by_target"][COMMON["target"]]
    # the same models and cells with HiResCAM maps (gradient kept per voxel): is the model or the map the limit?
    res = explain(bundle.model, x, masks, layers=list(layers), target=COMMON["target"], batch_size=16,
                  input_shape=tuple(cfg.input_shape), method="hirescam")
    out["by_method"] = {"gradcam": out["gradcamo"],
                        "hirescam": {k: np.asarray(v, dtype=np.float64) for k, v in res.gradcamo.items()}}
    with torch.no_grad():
        for name, keep_cell in (("cell_only", True), ("surround_only", False)):
            xb = blanked(x, masks, keep_cell)
            out[name] = torch.cat([
                bundle.model(F.interpolate(xb[i:i + 32], size=tuple(cfg.input_shape), mode="trilinear",
                                           align_corners=False)).argmax(1)
                for i in range(0, len(xb), 32)]).numpy()
    return out


def accuracy(pred, y, sel) -> dict:
    p, t = pred[sel], y[sel]
    recalls = [float((p[t == k] == k).mean()) for k in np.unique(t)]
    return {"accuracy": float((p == t).mean()), "balanced_accuracy": float(np.mean(recalls)), "n": int(sel.sum())}


def summarise(scores: np.ndarray, cutoff: float) -> dict:
    ok = scores[np.isfinite(scores)]
    return {"n": int(len(scores)), "mean": float(ok.mean()) if len(ok) else float("nan"),
            "sd": float(ok.std()) if len(ok) else float("nan"),
            "share_on_target": float((ok >= cutoff).mean()) if len(ok) else float("nan"),
            "n_undefined": int((~np.isfinite(scores)).sum())}


def ranking(scores_by_layer: dict, grids: dict, cutoff: float) -> list[dict]:
    """The layer sweep's ranking (rank_layers) of pooled per-cell scores."""
    import xarray as xr

    from gradcamo_dask.profiles.qc import rank_layers

    layers = list(scores_by_layer)
    data = np.stack([scores_by_layer[k] for k in layers], axis=1)
    ds = xr.Dataset({"gradcamo": (("cell", "layer"), data)}, coords={"layer": layers})
    table = rank_layers(ds, cutoff=cutoff)
    table["grid"] = [grids[k] for k in table["layer"]]
    table["localises"] = [g[1] >= 3 and g[2] >= 3 for g in table["grid"]]
    return json.loads(table.to_json(orient="records"))


def mosaic_plate(c: dict, s: dict, bystanders: bool = True):
    """The benchmark's mosaic plate, rendered once into memory (a few hundred MB), and its cell truth;
    ``bystanders=False``: the same plate without its non-responding cells (every responder alone)."""
    import dask.array as da

    from gradcamo_dask.io.synthetic import cell_truth, synthetic_plate

    plate = synthetic_plate(doses_um=c["doses_um"], wells_per_treatment=c["wells_per_treatment"],
                            sites_per_well=s["sites_per_well"], site_shape=c["site_shape"],
                            cell_radius=c["cell_radius"], seed=c["plate_seed"], mosaic=c.get("mosaic", True),
                            granules=c["granules"], compounds=c["compounds"], plate="mosaic",
                            responder_growth=c.get("responder_growth", True), bystanders=bystanders)
    plate = plate._replace(**{k: getattr(plate, k).copy(data=da.from_array(getattr(plate, k).data.compute(),
                                                                           chunks=getattr(plate, k).data.chunks))
                              for k in ("image", "labels")})
    return plate, cell_truth(plate)


def train_model(c: dict, s: dict, seed: int, name: str, out: str, recipe_options: dict | None = None) -> dict:
    """Train one model (a process of its own when run in parallel: torch on 1 thread); returns its bundle
    path, training seconds and provenance. ``name``: a key of MODELS (one population) or ``"all_cells"``;
    ``recipe_options``: extra Recipe fields (e.g. the regulariser's)."""
    import torch

    from gradcamo_dask.engine.augment import named_augmentation
    from gradcamo_dask.io.synthetic import population_labels
    from gradcamo_dask.jobs.recipe import Recipe, Split
    from gradcamo_dask.jobs.train import train

    torch.set_num_threads(1)
    plate, truth = mosaic_plate(c, s, bystanders=not alone(c, name))
    # train() also scores its own test split; the audit is the benchmark's, so train() only gets the first site
    # of each test well (a cheap, honest provenance figure) and every training-well cell
    test_site = int(plate.image["site"].values[0])
    train_truth = truth[~truth["well"].str[0].isin(c["test_rows"]) | (truth["site"] == test_site)]
    if name not in MODELS:  # every cell: one "population" that holds them all
        train_truth = train_truth.assign(responder=True)
    t0 = time.perf_counter()
    recipe = Recipe(crop_size=c["crop_size"], input_shape=c["input_shape"], epochs=s["epochs"], seed=seed,
                    learning_rate=c["learning_rate"], patience=None, layers=["_blocks.1.2"],
                    augmentation=named_augmentation(c.get("augmentation", "none")),
                    split=Split(test_rows=c["test_rows"], max_train_cells=s["max_train_cells"]),
                    **({"intensity_scaling": c.get("intensity_scaling", "crop"),
                        "crop_fill": c.get("crop_fill", "zero")} | dict(recipe_options or {})))
    bundle = train(plate.image, population_labels(plate.labels, train_truth, MODELS.get(name, True)), recipe,
                   out=out, platemap=plate.platemap, progress=False)
    prov = json.loads((bundle / "config.json").read_text())["provenance"]
    return {"bundle": str(bundle), "train_seconds": round(time.perf_counter() - t0, 1),
            "train_cells": prov["cells"]["train"], "epochs": prov["epochs_run"], "history": prov["history"]}


def alone(c: dict, name: str) -> bool:
    """Whether model ``name`` trains and is audited on the plate without bystanders (``clean_plate="alone"``:
    the in-cell model's crops then hold treatment information in their own cell only)."""
    return name == "in_cell" and c.get("clean_plate", "mosaic") == "alone"


def with_alone_responders(c: dict, s: dict, table, raw, masks):
    """The held-out cells with the responders taken from the plate without bystanders (same cells, same
    geometry, each alone) and the bystanders kept from the mosaic plate."""
    import torch

    plate, truth = mosaic_plate(c, s, bystanders=False)
    key = ["well", "site", "object_number"]
    chosen = truth.merge(table.loc[table["responder"], key], on=key)  # the mosaic's held-out responders, no new draw
    t_alone, raw_alone, masks_alone = test_cells(plate, chosen, len(chosen), c["plate_seed"], raw=True)
    keep = ~table["responder"].to_numpy()
    return (pd.concat([t_alone, table[keep]], ignore_index=True), torch.cat([raw_alone, raw[torch.from_numpy(keep)]]),
            torch.cat([masks_alone, masks[torch.from_numpy(keep)]]))


def trained_models(c: dict, s: dict, tmp: str, workers: int):
    """Yield ``(seed, {name: train_model result})`` seed by seed; with ``workers`` > 1 the models train in
    that many processes at once (one core each), so later seeds train while earlier ones are audited."""
    jobs = [(seed, name) for seed in s["seeds"] for name in MODELS]
    if workers <= 1:
        for seed in s["seeds"]:
            yield seed, {name: train_model(c, s, seed, name, f"{tmp}/{name}-{seed}") for name in MODELS}
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
        futures = {job: pool.submit(train_model, c, s, job[0], job[1], f"{tmp}/{job[1]}-{job[0]}") for job in jobs}
        for seed in s["seeds"]:
            yield seed, {name: futures[(seed, name)].result() for name in MODELS}


def run(mode: str, on_seed, workers: int = 1) -> dict:
    """Train and audit every model and seed; ``on_seed(report)`` gets the report over the seeds done so far
    after each seed (an interrupted run keeps its finished seeds). Returns the final report."""
    s, c = SETTINGS[mode], COMMON
    plate, truth = mosaic_plate(c, s)
    table, raw, masks = test_cells(plate, truth, s["max_test_cells"], c["plate_seed"], raw=True)
    del plate
    if alone(c, "in_cell"):
        table, raw, masks = with_alone_responders(c, s, table, raw, masks)
    uniform = masks.float().mean(dim=tuple(range(1, masks.ndim))).numpy().astype(np.float64)
    pops = {name: (table["responder"] == flag).to_numpy() for name, flag in MODELS.items()}
    per_seed, audits, report = [], {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed, models in trained_models(c, s, tmp, workers):
            record = {"seed": seed, "models": {}}
            for name, trained in models.items():
                t1 = time.perf_counter()
                a = audits[(seed, name)] = audit(Path(trained["bundle"]), table, raw, masks, raw=True)
                own = pops[name]
                v = record["models"][name] = {
                    "train_cells": trained["train_cells"], "epochs": trained["epochs"],
                    "train_seconds": trained["train_seconds"], "audit_seconds": round(time.perf_counter() - t1, 1),
                    "test": accuracy(a["predicted"], a["y"], own),
                    "cell_only": accuracy(a["cell_only"], a["y"], own),
                    "surround_only": accuracy(a["surround_only"], a["y"], own),
                    "gradcamo": {k: summarise(a["gradcamo"][k][own], c["cutoff"]) for k in LAYERS},
                }
                print(f"[bench_attention] seed {seed} {name}: test accuracy {v['test']['accuracy']:.3f}, cell only "
                      f"{v['cell_only']['accuracy']:.3f}, surround only {v['surround_only']['accuracy']:.3f}; "
                      f"train {trained['train_seconds']:.0f} s", flush=True)
            per_seed.append(record)
            report = aggregate(mode, per_seed, audits, table, pops, uniform, ceilings(masks, audits))
            on_seed(report)
    return report


def ceilings(masks, audits: dict) -> dict:
    """Per layer, the highest Grad-CAMO any map on its grid can reach for each held-out cell
    (:func:`~gradcamo_dask.engine.gradcamo.gradcamo_ceiling`): the other end of the scale from the uniform map."""
    from gradcamo_dask.engine.gradcamo import gradcamo_ceiling

    grids = next(iter(audits.values()))["grids"]
    m = masks.numpy() if hasattr(masks, "numpy") else np.asarray(masks)
    return {k: np.asarray(gradcamo_ceiling(m, grids[k]), dtype=np.float64) for k in LAYERS}


def aggregate(mode: str, per_seed: list, audits: dict, table, pops: dict, uniform: np.ndarray,
              ceiling: dict | None = None) -> dict:
    """The report over the seeds done: layers, ranking, Cohen's d, references (uniform map, ceiling), filtering."""
    from gradcamo_dask.profiles.quality import filtering_effect

    s, c = SETTINGS[mode], COMMON
    seeds = [r["seed"] for r in per_seed]
    scores = {m: {k: np.concatenate([audits[(sd, m)]["gradcamo"][k][pops[m]] for sd in seeds]) for k in LAYERS}
              for m in MODELS}
    grids = audits[(seeds[0], "in_cell")]["grids"]
    ranks = {m: ranking(scores[m], grids, c["cutoff"]) for m in MODELS}
    best = next(r["layer"] for r in ranks["in_cell"] if r["localises"])
    by_method = {method: {k: separation(audits, seeds, pops, uniform, k, method) for k in LAYERS} for method in METHODS}
    layers = {k: {"grid": grids[k], "localises": grids[k][1] >= 3 and grids[k][2] >= 3, **by_method["gradcam"][k],
                  **({} if ceiling is None else {"ceiling": {m: float(ceiling[k][pops[m]].mean()) for m in MODELS}})}
              for k in LAYERS}
    reference = {m: {"mean": float(uniform[pops[m]].mean()), "sd": float(uniform[pops[m]].std())} for m in MODELS}
    quality = []
    for sd in seeds:
        for name in MODELS:
            a = audits[(sd, name)]
            q = filtering_effect(a["features"], table, a["gradcamo"][best], cutoff=c["cutoff"], draws=s["draws"],
                                 seed=sd)
            kept = np.nan_to_num(a["gradcamo"][best], nan=-1) >= c["cutoff"]
            q["responder_share_all"] = float(table["responder"].mean())
            q["responder_share_kept"] = float(table.loc[kept, "responder"].mean()) if kept.any() else float("nan")
            quality.append({"seed": sd, "model": name, **q})
    blanking = {m: {k: float(np.mean([r["models"][m][k]["accuracy"] for r in per_seed]))
                    for k in ("test", "cell_only", "surround_only")} for m in MODELS}
    return {"mode": mode, "seeds_done": seeds, "blanking_mean": blanking,
            "settings": {**{k: list(v) if isinstance(v, tuple) else v for k, v in s.items()},
                         **{k: list(v) if isinstance(v, tuple) else v for k, v in c.items()}},
            "test_cells": {"n": int(len(table)), "responders": int(pops["in_cell"].sum()),
                           "bystanders": int(pops["off_cell"].sum()),
                           "bystanders_touching_a_responder": float((table.loc[pops["off_cell"],
                                                                               "responding_neighbours"] > 0).mean())},
            "uniform_map_reference": reference, "best_layer": best, "layers": layers, "ranking": ranks,
            "per_seed": per_seed, "quality": quality, "by_target": by_target(audits, seeds, table, pops, layers),
            "by_method": by_method}


def separation(audits: dict, seeds: list, pops: dict, uniform: np.ndarray, layer: str, method: str) -> dict:
    """Each model's scores at ``layer`` with maps of ``method`` (seeds pooled), Cohen's d between them, d of
    score / uniform (size-free) and d per seed."""
    def own(seed: int, m: str) -> np.ndarray:
        return audits[(seed, m)]["by_method"][method][layer][pops[m]]

    scores = {m: np.concatenate([own(sd, m) for sd in seeds]) for m in MODELS}
    # responders are larger than bystanders: d of Grad-CAMO / uniform takes cell size out
    over = {m: scores[m] / np.tile(uniform[pops[m]], len(seeds)) for m in MODELS}
    return {**{m: summarise(scores[m], COMMON["cutoff"]) for m in MODELS},
            "cohens_d": cohens_d(scores["in_cell"], scores["off_cell"]),
            "cohens_d_over_uniform": cohens_d(over["in_cell"], over["off_cell"]),
            "cohens_d_per_seed": [cohens_d(own(sd, "in_cell"), own(sd, "off_cell")) for sd in seeds]}


def by_target(audits: dict, seeds: list, table, pops: dict, layers: dict) -> dict:
    """Grad-CAMO of each explained class (predicted, true label), pooled and per true class, at every
    layer that can localise; Cohen's d between the models on the same groups."""
    classes = sorted(set(table["treatment"]))
    groups = {"all": np.ones(len(table), bool), **{t: (table["treatment"] == t).to_numpy() for t in classes}}
    out = {}
    for target in TARGETS:
        out[target] = {}
        for k in (k for k, v in layers.items() if v["localises"]):
            pooled = {m: {g: np.concatenate([audits[(sd, m)]["by_target"][target][k][pops[m] & sel] for sd in seeds])
                          for g, sel in groups.items()} for m in MODELS}
            row = {m: {g: summarise(v, COMMON["cutoff"]) for g, v in pooled[m].items()} for m in MODELS}
            row.update({f"cohens_d_{g}": cohens_d(pooled["in_cell"][g], pooled["off_cell"][g]) for g in groups})
            out[target][k] = row
    return out


def headline(report: dict, method: str = "gradcam") -> dict:
    """The target figures of one report at its best layer and at every layer that localises: Cohen's d, d of
    score / uniform (size-free), the in-cell mean over its uniform reference; blanking accuracies (seed means).
    ``method``: the maps scored ("hirescam": the same models with HiResCAM maps, when the report has them)."""
    ref = report["uniform_map_reference"]
    source = report["layers"] if method == "gradcam" else report["by_method"][method]
    layers = {k: {"cohens_d": v["cohens_d"], "cohens_d_over_uniform": v.get("cohens_d_over_uniform"),
                  "in_cell_over_uniform": v["in_cell"]["mean"] / ref["in_cell"]["mean"],
                  "off_cell_over_uniform": v["off_cell"]["mean"] / ref["off_cell"]["mean"]}
              for k, v in source.items() if report["layers"][k]["localises"]}
    blanking = report.get("blanking_mean") or {
        m: {k: float(np.mean([r["models"][m][k]["accuracy"] for r in report["per_seed"]]))
            for k in ("test", "cell_only", "surround_only")} for m in MODELS}
    return {"best_layer": report["best_layer"], "layers": layers, "blanking": blanking,
            "scaling": report["settings"].get("intensity_scaling", "crop"),
            "responder_growth": report["settings"].get("responder_growth", True),
            "date": report.get("date"), "total_seconds": report.get("total_seconds")}


def _comparison(report: dict) -> list[str]:
    """Markdown: this run's target figures beside the per-crop reference run's (CROP_REFERENCE)."""
    runs = {"this run": headline(report)}
    if report.get("by_method", {}).get("hirescam"):  # same models and cells: blanking is not repeated for it
        runs["this run, HiResCAM maps (not the paper's)"] = {**headline(report, "hirescam"), "blanking": {}}
    if report.get("crop_reference"):
        runs["reference: per-crop min-max"] = report["crop_reference"]
    lines = ["## Targets, beside the per-crop reference", "",
             "Targets at the best layer that localises: d >= 1.0, size-free d (score / uniform) >= 1.0 too (a d "
             "that only size gives does not count), in-cell mean >= 3x uniform, wall time <= 1500 s. Chance accuracy "
             "0.5. The reference is the last committed full run with the paper's per-crop scaling "
             f"(`{CROP_REFERENCE.relative_to(REPO)}`, quoted, not rerun). HiResCAM rows: the same models and "
             "cells scored with HiResCAM maps (gradient times activation per voxel, no channel averaging); they show "
             "how much of the gap to the targets is the paper's Grad-CAM weighting rather than the model.", "",
             "| run | scaling | responders grow | layer | d | size-free d | in-cell / uniform | off-cell / uniform |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, h in runs.items():
        for k, v in h["layers"].items():
            star = " (best)" if k == h["best_layer"] else ""
            lines.append(f"| {name} | {h['scaling']} | {'yes' if h['responder_growth'] else 'no'} | {k}{star} | "
                         f"{v['cohens_d']:.2f} | {v['cohens_d_over_uniform']:.2f} | {v['in_cell_over_uniform']:.2f} | "
                         f"{v['off_cell_over_uniform']:.2f} |")
    lines += ["", "Blanking (held-out accuracy of each model on its own population, mean over seeds; chance 0.5):", "",
              "| run | model | test | cell only | surround only |", "| --- | --- | --- | --- | --- |"]
    for name, h in runs.items():
        for m, b in h["blanking"].items():
            lines.append(f"| {name} | {m} | {b['test']:.3f} | {b['cell_only']:.3f} | {b['surround_only']:.3f} |")
    return lines + [""]


def _fmt(v: dict) -> str:
    return f"{v['mean']:.3f} ± {v['sd']:.3f} ({v['share_on_target']:.2f})"


def mass_contrast(score: float, uniform: float) -> float:
    """A map's mass per voxel inside the cell over its mass per voxel outside, from its Grad-CAMO ``score``
    (the share inside) and the cell's share of the crop ``uniform``: ``(s / (1 - s)) / (u / (1 - u))``;
    1 for a uniform map. The ratio to the uniform map ``s / u`` is bounded by ``1 / u`` and rises when a larger
    crop adds background that the map treats like the rest of the background; this odds ratio does not."""
    return (score / (1.0 - score)) / (uniform / (1.0 - uniform))


def markdown(report: dict) -> str:
    m, st, lay, ref = report["machine"], report["settings"], report["layers"], report["uniform_map_reference"]
    best = report["best_layer"]
    lines = [
        f"# bench_attention ({report['mode']})", "",
        f"- date: {report['date']}; wall time {report['total_seconds']} s for seeds {report['seeds_done']} of "
        f"{st['seeds']}",
        f"- machine: {m['platform']}, {m['cpu_count']} CPUs, torch threads used {report.get('torch_threads_used')}, "
        f"GPU {m['gpu']}; "
        f"load average (1, 5, 15 min) at start {report['load_average_start']}, at end {report['load_average_end']} "
        "(other engineers shared the 2 cores)",
        f"- plate: synthetic mosaic, doses {st['doses_um']} µM, {st['wells_per_treatment']} wells x "
        f"{st['sites_per_well']} sites of {st['site_shape']} voxels, cell radius {st['cell_radius']} px, granules "
        f"{st.get('granules', 0.0)}, seed "
        f"{st['plate_seed']}; test wells row {st['test_rows']}"
        + ("; **the in-cell model's plate is the same mosaic without its bystanders** (every responder alone, "
           "`synthetic_plate(bystanders=False)`); the off-cell model keeps the full mosaic"
           if alone(st, "in_cell") else ""),
        f"- training: crop {st['crop_size']} (past the site: {st.get('crop_fill', 'zero')} fill), model grid {st['input_shape']}, {st['epochs']} epochs, at most "
        f"{st['max_train_cells']} training cells, batch 8, Adam {st['learning_rate']:g}, augmentation "
        f"{st.get('augmentation', 'none')}; seeds "
        f"{st['seeds']}; torch on 1 thread; intensity scaling {st.get('intensity_scaling', 'crop')}; responders "
        f"{'grow' if st.get('responder_growth', True) else 'keep the bystanders size'}",
        f"- command: `{report.get('command', '?')}`",
        f"- held-out cells: {report['test_cells']['responders']} responders (in-cell model), "
        f"{report['test_cells']['bystanders']} bystanders (off-cell model; "
        f"{report['test_cells']['bystanders_touching_a_responder']:.0%} touch a responder)",
        f"- uniform-map reference (cell's share of its crop): responders {ref['in_cell']['mean']:.3f} ± "
        f"{ref['in_cell']['sd']:.3f}, bystanders {ref['off_cell']['mean']:.3f} ± {ref['off_cell']['sd']:.3f}",
        "", *_comparison(report), "## Grad-CAMO of held-out cells, every layer (seeds pooled)", "",
        "mean ± sd (share >= 0.25). Best layer: the in-cell model's top-ranked layer that can localise "
        f"(>= 3 x 3 in y and x): **{best}**. Explained class: {st.get('target', 'predicted')}.", "",
        "| layer | grid | localises | in-cell model | off-cell model | Cohen's d | d of score / uniform | "
        "in-cell / uniform | off-cell / uniform | in-cell contrast | off-cell contrast | "
        "ceiling, in-cell cells (x uniform) | in-cell / ceiling |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for k, v in lay.items():
        top = v.get("ceiling", {}).get("in_cell", float("nan"))
        lines.append(f"| {k} | {'x'.join(map(str, v['grid']))} | {'yes' if v['localises'] else 'no'} | "
                     f"{_fmt(v['in_cell'])} | {_fmt(v['off_cell'])} | {v['cohens_d']:.2f} | "
                     f"{v.get('cohens_d_over_uniform', float('nan')):.2f} | "
                     f"{v['in_cell']['mean'] / ref['in_cell']['mean']:.2f} | "
                     f"{v['off_cell']['mean'] / ref['off_cell']['mean']:.2f} | "
                     f"{mass_contrast(v['in_cell']['mean'], ref['in_cell']['mean']):.2f} | "
                     f"{mass_contrast(v['off_cell']['mean'], ref['off_cell']['mean']):.2f} | "
                     f"{top:.3f} ({top / ref['in_cell']['mean']:.2f}) | {v['in_cell']['mean'] / top:.2f} |")
    lines += ["", "Contrast: the map's mass per voxel on the cell over its mass per voxel off the cell (seeds pooled: "
              "`mass_contrast` of the mean score and the mean uniform share; 1 = a uniform map). x uniform is bounded by "
              "1 / uniform and rises when a larger crop adds background the map treats like the rest; the contrast "
              "does not.", "",
              "Ceiling: the highest Grad-CAMO any non-negative map on the layer's grid can reach for the cell "
              "(all its mass on the one grid voxel that puts the most of its upsampled weight inside the mask; "
              "`gradcamo_ceiling`), mean over the in-cell model's held-out cells. A mean of 3x uniform needs a "
              "ceiling above that.", "", "Layer sweep ranking (rank_layers, pooled seeds):", ""]
    for name, ranks in report["ranking"].items():
        lines.append(f"- {name}: " + ", ".join(f"{r['rank']}. {r['layer']} {r['mean']:.3f}" for r in ranks))
    lines += ["", "## Grad-CAMO by explained class and by true class (seeds pooled, layers that localise)", "",
              "Explained class: `predicted` (the paper's) or `true` (the true label). Cells: all held-out cells of "
              "the model's population, or those of one treatment's wells. Reference: the uniform map above.", ""]
    per_target = report.get("by_target", {})
    first = next(iter(next(iter(per_target.values()), {}).values()), None)
    groups = list(first["in_cell"]) if first else ["all"]
    lines += ["| layer | explained | " + " | ".join(f"{m.replace('_', '-')} {g}" for m in MODELS for g in groups)
              + " | " + " | ".join(f"d {g}" for g in groups) + " |",
              "| --- | --- | " + " | ".join("---" for _ in range(3 * len(groups))) + " |"]
    for target, per_layer in per_target.items():
        for k, r in per_layer.items():
            cells = " | ".join(f"{r[m][g]['mean']:.3f} ± {r[m][g]['sd']:.3f}" for m in MODELS for g in groups)
            lines.append(f"| {k} | {target} | {cells} | " + " | ".join(f"{r[f'cohens_d_{g}']:.2f}" for g in groups)
                         + " |")
    lines += ["", "## Accuracy: what each model uses (held-out cells of its own population)", "",
              "| seed | model | train cells x epochs | train s | test accuracy (balanced) | cell only | surround only | "
              f"Grad-CAMO at {best} |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["per_seed"]:
        for name, v in r["models"].items():
            lines.append(f"| {r['seed']} | {name} | {v['train_cells']} x {v['epochs']} | {v['train_seconds']} | "
                         f"{v['test']['accuracy']:.3f} ({v['test']['balanced_accuracy']:.3f}) | "
                         f"{v['cell_only']['accuracy']:.3f} | {v['surround_only']['accuracy']:.3f} | "
                         f"{_fmt(v['gradcamo'][best])} |")
    lines += ["", f"## Does filtering help? copairs mAP of treatment retrieval, all held-out cells, "
              f"`{report['settings']['feature_layer']}` features, filter at {best}", "",
              "| seed | model | all cells | Grad-CAMO >= 0.25 | same number at random (mean ± sd) | kept / all | "
              "responders among all / kept |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for q in report["quality"]:
        lines.append(f"| {q['seed']} | {q['model']} | {q['all']:.3f} | {q['filtered']:.3f} | {q['random_mean']:.3f} ± "
                     f"{q['random_sd']:.3f} | {q['n_kept']} / {q['n_all']} | {q['responder_share_all']:.2f} / "
                     f"{q['responder_share_kept']:.2f} |")
    if "transformer" in report:  # issue #17's ViT row: benchmarks/attention_vit.py
        import attention_vit
        lines += attention_vit.markdown_lines(report["transformer"])
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from machine_info import finish_record, run_record, write_record

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, tiny (runs in a test)")
    parser.add_argument("--epochs", type=int, default=None, help="override the mode's epochs")
    parser.add_argument("--sites-per-well", type=int, default=None, help="override the mode's sites per well")
    parser.add_argument("--max-train-cells", type=int, default=None, help="override the mode's training cell cap")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="override the mode's seeds")
    parser.add_argument("--granules", type=float, default=None, help="synthetic_plate granules knob (default 1)")
    parser.add_argument("--compounds", type=int, default=None, help="synthetic_plate compounds knob")
    parser.add_argument("--doses", type=float, nargs="+", default=None, help="doses, µM (0 = control)")
    parser.add_argument("--input-shape", type=int, nargs=3, default=None, help="model grid z y x")
    parser.add_argument("--crop", type=int, nargs=2, default=None, help="crop y x, voxels")
    parser.add_argument("--crop-z", type=int, default=None, help="crop z, voxels, centred on the cell; 0: every slice (default 6)")
    parser.add_argument("--site-z", type=int, default=None, help="slices per site (default 12)")
    parser.add_argument("--site-yx", type=int, nargs=2, default=None, help="site y x, pixels (default 128 128)")
    parser.add_argument("--crop-fill", choices=("zero", "background"), default=None,
                        help="what fills crop windows past the site (default zero; Recipe.crop_fill)")
    parser.add_argument("--scaling", choices=("crop", "plate"), default=None, help="intensity scaling (default plate)")
    parser.add_argument("--responder-growth", action=argparse.BooleanOptionalAction, default=None,
                        help="responders grow with their response (default: no, same size as bystanders)")
    parser.add_argument("--clean-plate", choices=("mosaic", "alone"), default=None,
                        help="the in-cell model's plate: the mosaic's responders (default), or the same responders "
                             "alone (synthetic_plate(bystanders=False)), whose crops hold no other cell")
    parser.add_argument("--augment", choices=AUGMENTATION_NAMES, default=None,
                        help=f"training augmentation (default {COMMON['augmentation']})")
    parser.add_argument("--target", choices=TARGETS, default=None, help="explained class of the main tables")
    parser.add_argument("--workers", type=int, default=None,
                        help="models trained at once, one process and core each (default: 1 in quick mode, else "
                             "the machine's cores, at most 2)")
    parser.add_argument("--tag", default="", help="suffix of the output file names")
    parser.add_argument("--out", default=str(HERE / "results"), help="folder for the JSON and Markdown")
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else "full"
    for key in ("epochs", "sites_per_well", "max_train_cells", "seeds"):
        if getattr(args, key) is not None:
            SETTINGS[mode][key] = tuple(args.seeds) if key == "seeds" else getattr(args, key)
    for key, value in (("granules", args.granules), ("input_shape", args.input_shape), ("target", args.target),
                       ("compounds", args.compounds), ("doses_um", args.doses),
                       ("crop_size", None if args.crop is None else (None, *args.crop)),
                       ("intensity_scaling", args.scaling), ("responder_growth", args.responder_growth),
                       ("augmentation", args.augment), ("clean_plate", args.clean_plate),
                       ("crop_fill", args.crop_fill),
                       ("site_shape", (args.site_z or COMMON["site_shape"][0],
                                       *(args.site_yx or COMMON["site_shape"][1:])))):
        if value is not None:
            COMMON[key] = tuple(value) if isinstance(value, list) else value
    if args.crop_z is not None:
        COMMON["crop_size"] = (args.crop_z or None, *COMMON["crop_size"][1:])
    import os

    import torch

    report = run_record("bench_attention.py", argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    stem = "bench_attention" + ("_quick" if args.quick else "") + (f"_{args.tag}" if args.tag else "")

    def write(partial: dict) -> None:
        finish_record(report, t0, **partial, torch_threads_used=torch.get_num_threads())
        write_record(args.out, stem, report, markdown(report))

    if CROP_REFERENCE.exists():
        report["crop_reference"] = headline(json.loads(CROP_REFERENCE.read_text()))
    workers = args.workers or (1 if args.quick else min(2, os.cpu_count() or 1))
    report["workers"] = workers
    run(mode, write, workers)
    if args.quick:  # issue #17's transformer row (benchmarks/attention_vit.py): same plate, recipe and cells
        import attention_vit
        write({"transformer": attention_vit.vit_row(sys.modules[__name__], mode)})
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
