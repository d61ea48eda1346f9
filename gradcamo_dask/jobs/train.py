"""Supervised training of the 3D feature extractor with an optional Grad-CAMO regulariser.

:func:`train` fits EfficientNet-B0 3D to predict each cell's treatment from its crop,
by a :class:`~gradcamo_dask.jobs.recipe.Recipe` whose defaults are the paper's: leave-wells-out split, a validation subset of
training cells for early stopping, augmentations with p = 0.5 each (x/y flips,
brightness, gamma), Adam at 3e-4, batch 8, cross-entropy; optionally minus
``lambda`` times the batch's mean Grad-CAMO (:mod:`gradcamo_dask.engine.regularize`). The
result is a model bundle (:func:`gradcamo_dask.write_bundle`) with the normalisation
statistics of the training cells, class names, grids and provenance.

Reproducibility: every epoch draws its shuffling and augmentations from a
generator seeded with ``(seed, epoch)`` and reseeds torch's global generator
(dropout, drop-connect) the same way, so a run resumed from the checkpoint of
epoch ``e`` continues exactly as the uninterrupted run did (bit-identical on CPU).
Checkpoints hold no pickles: weights and Adam's tensors in safetensors files,
everything else in JSON.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from gradcamo_dask.errors import InputError, LabelsError, TrainingError
from gradcamo_dask.jobs.checkpoint import (
    CheckpointFiles,
    differences,
    load_tensors,
    optimizer_from_files,
    optimizer_to_files,
    save_json,
    save_tensors,
)
from gradcamo_dask.jobs.dimensionality import plate_recipe
from gradcamo_dask.jobs.epochs import Batches, evaluate_split, seed_of, train_epoch
from gradcamo_dask.jobs.recipe import Recipe
from gradcamo_dask.jobs.warm_start import load_start_weights
from gradcamo_dask.jobs.trainset import SiteReader, assign_split, check_wells, combine_normalization
from gradcamo_dask.normalize import fit_intensity_range
from gradcamo_dask.provenance import package_versions

__all__ = ["Recipe", "informative_layer", "train"]

def informative_layer(model: nn.Module, input_shape: tuple[int, int, int]) -> str:
    """The model's default Grad-CAM layer, or, when that layer's grid is a single voxel at
    this input grid (small grids on a CPU: Grad-CAMO would then be the mask's volume
    share whatever the model does), the last block output with more than one voxel."""
    import re

    from gradcamo_dask.engine.layers import default_layer, layer_grids

    name = default_layer(model, input_shape)
    grids = layer_grids(model, input_shape)
    if math.prod(grids.get(name, (2,))) > 1:
        return name
    wider = [n for n, g in grids.items() if math.prod(g) > 1]
    blocks = [n for n in wider if re.fullmatch(r"_blocks\.\d+\.\d+", n)]
    if not (blocks or wider):
        raise InputError(f"no layer of the model has more than one voxel at input grid {input_shape}; use a larger "
                         "input_shape")
    return (blocks or wider)[-1]


# -------------------------------------------------------------------- train
@dataclass
class _Cells:
    """The cells of a run: table with its split, classes, counts per split, targets."""

    table: pd.DataFrame
    classes: list[str]
    counts: dict[str, int]
    split_wells: dict[str, list[str]]
    targets: np.ndarray


@dataclass
class _State:
    """What a checkpoint carries from one epoch to the next."""

    history: list[dict] = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"epoch": 0, "val_loss": float("inf")})
    stale: int = 0
    epochs_done: int = 0
    normalization: dict | None = None


def _platemap(image: Any, labels: Any, platemap: Any) -> pd.DataFrame:
    from gradcamo_dask.io.platemap import platemap_of, open_platemap, validate_platemap

    if tuple(image.dims) != ("well", "site", "c", "z", "y", "x"):
        raise InputError(f"image must have dims (well, site, c, z, y, x), got {image.dims}")
    if tuple(labels.dims) != ("well", "site", "z", "y", "x"):
        raise LabelsError(f"labels must have dims (well, site, z, y, x), got {labels.dims}")
    if platemap is None:
        pm = platemap_of(image)
        if pm is None:
            raise TrainingError("no platemap: pass platemap= (a DataFrame or CSV with well and treatment columns)")
    elif isinstance(platemap, pd.DataFrame):
        pm = validate_platemap(platemap)
    else:
        pm = open_platemap(platemap)
    check_wells([str(w) for w in image["well"].values], pm, str(image.attrs.get("plate", "plate")))
    return pm


def _split_cells(labels: Any, pm: pd.DataFrame, recipe: Recipe) -> _Cells:
    """Cell table, leave-wells-out split and class targets; refuses splits that cannot train."""
    from gradcamo_dask.cells import cell_table

    table = cell_table(labels, pm, size=recipe.crop_size)
    split, split_wells = assign_split(table, pm, recipe.split, seed=recipe.seed)
    table["split"] = split.to_numpy()
    used = pm[pm["well"].isin(split_wells["train"] + split_wells["test"])]
    classes = list(dict.fromkeys(used["treatment"].astype(str)))
    counts = {s: int((table["split"] == s).sum()) for s in ("train", "val", "test")}
    per_class = table[table["split"] == "train"].groupby("treatment").size()
    empty = [c for c in classes if int(per_class.get(c, 0)) == 0]
    if empty:
        raise TrainingError(
            f"class(es) {empty} have no training cells (training wells {split_wells['train']}); add training wells "
            "of these treatments or drop them from the platemap and plate")
    if counts["train"] < recipe.batch_size or (recipe.split.val_fraction > 0 and counts["val"] < 1):
        raise TrainingError(
            f"too few cells for the split: {counts['train']} training and {counts['val']} validation cells "
            f"(batch size {recipe.batch_size}); use more wells or sites, a smaller crop (fewer border cells dropped) "
            "or a smaller batch")
    if recipe.split.names_test_wells and counts["test"] == 0:
        raise TrainingError(f"the test wells {split_wells['test']} hold no usable cells")
    class_index = {c: i for i, c in enumerate(classes)}
    targets = np.array([class_index.get(str(t), -1) for t in table["treatment"]], dtype=np.int64)
    return _Cells(table, classes, counts, split_wells, targets)


def _build_model(n_channels: int, n_classes: int, recipe: Recipe) -> tuple[nn.Module, str, list[str]]:
    """The seeded model with the recipe's batch-norm and head settings, its regulariser and bundle layers."""
    from gradcamo_dask.engine.bundles import ARCHITECTURES

    torch.manual_seed(seed_of(recipe.seed, 999_999))
    options = dict(recipe.model_options or {})
    builder = ARCHITECTURES[options.pop("architecture", "efficientnet3d")]  # e.g. "vit" (attention maps)
    model = builder(n_channels, n_classes, recipe.input_shape, **options)
    layers = recipe.layers
    layer = recipe.regularizer_layer or (layers[0] if layers else informative_layer(model, recipe.input_shape))
    if isinstance(recipe.batchnorm_momentum, (int, float)):
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.momentum = float(recipe.batchnorm_momentum)
    head = getattr(model, "_fc", None)
    if recipe.head_init_std is not None and isinstance(head, nn.Linear):
        nn.init.normal_(head.weight, 0.0, float(recipe.head_init_std))
        nn.init.zeros_(head.bias)
    return model, layer, list(layers) if layers else [layer]


def _fingerprint(plate: str, channels: list[str], cells: _Cells, recipe: Recipe, layer: str,
                 start: str | None = None) -> dict:
    """The settings a checkpoint must share with the run that resumes it (JSON-ready)."""
    r = recipe
    return json.loads(json.dumps({
        "plate": plate, "channels": channels, "classes": cells.classes, "crop_size": list(r.crop_size),
        "input_shape": list(r.input_shape), "batch_size": r.batch_size, "learning_rate": r.learning_rate,
        "seed": r.seed, "train_wells": cells.split_wells["train"], "test_wells": cells.split_wells["test"],
        "val_fraction": r.split.val_fraction, "max_train_cells": r.split.max_train_cells, "cells": cells.counts,
        "shuffle_sites": r.shuffle_sites,
        "augmentation": r.augmentation.to_dict() if r.augmentation is not None else None,
        "regularizer": float(r.regularizer), "regularizer_layer": layer if r.regularizer else None,
        "regularizer_target": r.regularizer_target if r.regularizer else None,
        "model_options": dict(r.model_options or {}), "batchnorm_momentum": r.batchnorm_momentum,
        "head_init_std": r.head_init_std,
        # only when not the paper's, so that checkpoints made before the option existed still resume
        **({"intensity_scaling": r.intensity_scaling} if r.intensity_scaling != "crop" else {}),
        **({"crop_fill": r.crop_fill} if r.crop_fill != "zero" else {}),
        **({"init_from": start} if start is not None else {}),  # the start bundle's hash
        **({"regularizer_evidence": r.regularizer_evidence} if r.regularizer and r.regularizer_evidence != "positive"
           else {}),
        **({"regularizer_cam": r.regularizer_cam} if r.regularizer and r.regularizer_cam != "gradcam" else {}),
    }))


def _resume(files: CheckpointFiles, fingerprint: dict, model: nn.Module, optimizer: torch.optim.Optimizer) -> _State:
    """Load the checkpoint into ``model`` and ``optimizer``; refuse one made with other settings."""
    state = json.loads(files.state.read_text())
    diffs = differences(state["config"], fingerprint)
    if diffs:
        raise TrainingError(f"checkpoint {files.folder} was made with another configuration; differences:\n  "
                            + "\n  ".join(diffs) + "\nresume with the same settings or start afresh (no resume)")
    model.load_state_dict(load_tensors(files.weights))
    optimizer_from_files(optimizer, load_tensors(files.optimizer), state["optimizer"])
    return _State(state["history"], state["best"], state["stale"], state["epochs_done"], state["normalization"])


def _save_checkpoint(files: CheckpointFiles, fingerprint: dict, model: nn.Module, optimizer: torch.optim.Optimizer,
                     state: _State, improved: bool) -> None:
    weights = dict(model.state_dict())
    if improved:
        save_tensors(files.best, weights)
    save_tensors(files.weights, weights)
    opt_tensors, opt_meta = optimizer_to_files(optimizer)
    save_tensors(files.optimizer, opt_tensors)
    save_json(files.state, {
        "config": fingerprint, "epochs_done": state.epochs_done, "history": state.history, "best": state.best,
        "stale": state.stale, "normalization": state.normalization, "optimizer": opt_meta})


def _crop_reader(image: Any, labels: Any, cells: _Cells, recipe: Recipe, cache: bool | None,
                 resumed: dict | None) -> SiteReader:
    """The training crops' reader; with ``intensity_scaling="plate"``, its fixed range (the checkpoint's
    normalisation ``resumed`` when resuming) is set before any crop is read (the reader caches crops)."""
    channels = image.sizes["c"]
    per_cell = channels * math.prod(recipe.input_shape) * 4 + math.prod(
        n if n is not None else image.sizes["z"] for n in recipe.crop_size)
    if cache is None:  # keep crops in memory across epochs when they take under 2 GiB
        cache = sum(cells.counts.values()) * per_cell < 2 * 2**30
    table = cells.table
    reader = SiteReader(image, labels, table[table["split"] != ""], recipe.crop_size, recipe.input_shape, cache=cache,
                        outside=recipe.crop_fill)
    if recipe.intensity_scaling == "plate":
        reader.intensity_range = _plate_intensity_range(reader, resumed)
    return reader


def _training_normalization(reader: SiteReader) -> dict:
    split_of = reader.table["split"].to_numpy()
    parts = [(int((split_of[d.rows] == "train").sum()), d.normalization)
             for _k, d in reader.stream(reader.sites(["train"])) if d.normalization is not None]
    return combine_normalization(parts) | dict(reader.intensity_range or {})


#: Training sites sampled (evenly, in table order) to fit a plate's fixed intensity range.
RANGE_SITES = 32


def _plate_intensity_range(reader: SiteReader, resumed: dict | None) -> dict:
    """The fixed range of ``intensity_scaling="plate"``: the checkpoint's when resuming, else fitted on
    up to :data:`RANGE_SITES` training sites."""
    if resumed is not None:
        return {"low": resumed["low"], "high": resumed["high"]}
    keys = reader.sites(["train"])
    keys = [keys[i] for i in np.unique(np.linspace(0, len(keys) - 1, min(RANGE_SITES, len(keys))).astype(int))]
    return fit_intensity_range(reader.raw_site(k) for k in keys)


@dataclass
class _Run:
    """Model, optimiser and device of a run, with the checkpoint files and the fingerprint."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    channels_last: bool
    autocast: Any
    files: CheckpointFiles
    fingerprint: dict
    layer: str
    progress: bool
    start_normalization: dict | None = None  # the init_from bundle's


def _start(plate: str, channels: list[str], cells: _Cells, recipe: Recipe, files: CheckpointFiles, device: Any,
           channels_last: bool | None, autocast: Any, progress: bool) -> tuple[_Run, list[str]]:
    """Model on its device, Adam, fingerprint: a run ready for its first (or resumed) epoch."""
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    channels_last = device.type == "cuda" if channels_last is None else channels_last
    model, layer, bundle_layers = _build_model(len(channels), len(cells.classes), recipe)
    start_normalization = start_hash = None
    if recipe.init_from is not None:
        start_normalization, start_hash = load_start_weights(recipe.init_from, model, channels, cells.classes,
                                                             recipe.intensity_scaling)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.learning_rate)
    fingerprint = _fingerprint(plate, channels, cells, recipe, layer, start_hash)
    run = _Run(model, optimizer, device, channels_last, autocast, files, fingerprint, layer, progress,
               start_normalization)
    return run, bundle_layers


def _fit(run: _Run, state: _State, batches: dict[str, Batches], counts: dict[str, int], recipe: Recipe) -> str:
    """The epochs still to run, a checkpoint after each; returns what stopped them."""
    r = recipe
    for epoch in range(state.epochs_done, r.epochs):
        if r.patience is not None and state.stale >= r.patience:
            break
        record = train_epoch(run.model, run.optimizer, batches["train"], epoch=epoch, epochs=r.epochs, seed=r.seed,
                              augmentation=r.augmentation, regularizer=r.regularizer, layer=run.layer,
                              target=r.regularizer_target, device=run.device, channels_last=run.channels_last,
                              autocast=run.autocast, progress=run.progress,
                              epoch_batchnorm=r.batchnorm_momentum == "epoch", evidence=r.regularizer_evidence,
                              cam=r.regularizer_cam)
        if counts["val"]:
            val = evaluate_split(run.model, batches["val"], device=run.device, channels_last=run.channels_last,
                                 autocast=run.autocast)
            record.update(val_loss=val["loss"], val_accuracy=val["accuracy"])
        state.history.append(record)
        if run.progress:
            from tqdm.auto import tqdm

            tqdm.write(f"epoch {epoch + 1}/{r.epochs}: " + ", ".join(
                f"{k} {v:.4g}" for k, v in record.items() if k != "epoch" and isinstance(v, float)))
        improved = record.get("val_loss", -epoch) < state.best["val_loss"]
        if improved:
            state.best, state.stale = {"epoch": epoch + 1, "val_loss": record.get("val_loss", -epoch)}, 0
        else:
            state.stale += 1
        state.epochs_done = epoch + 1
        _save_checkpoint(run.files, run.fingerprint, run.model, run.optimizer, state, improved)
    return "early stopping" if len(state.history) < r.epochs else "epochs"


def _fit_then_test(run: _Run, state: _State, reader: SiteReader, cells: _Cells, recipe: Recipe,
                   layer: str) -> tuple[str, dict | None]:
    """Fit ``run.model`` (normalisation from the training cells unless resumed), load the best
    epoch's weights, and evaluate it on the test cells; returns why fitting stopped and the test
    metrics (None without test cells). ``layer``: the layer whose Grad-CAMO the test reports."""
    if state.normalization is None:
        state.normalization = _training_normalization(reader)
    targets = cells.targets[reader.table.index.to_numpy()]
    batches = {s: Batches(reader, s, targets, state.normalization, recipe.batch_size, recipe.shuffle_sites)
               for s in ("train", "val", "test")}
    stopped = _fit(run, state, batches, cells.counts, recipe)
    if run.files.best.is_file() and state.best["epoch"]:
        run.model.load_state_dict(load_tensors(run.files.best))
    test = None
    if cells.counts["test"]:
        test = evaluate_split(run.model, batches["test"], device=run.device, channels_last=run.channels_last,
                              autocast=run.autocast, layer=layer)
    return stopped, test


def train(
    image: Any,
    labels: Any,
    recipe: Recipe | None = None,
    *,
    out: str | os.PathLike,
    platemap: pd.DataFrame | str | os.PathLike | None = None,
    resume: bool = False,
    checkpoint_dir: str | os.PathLike | None = None,
    cache: bool | None = None,
    device: str | torch.device | None = None,
    autocast: Any = None,
    channels_last: bool | None = None,
    progress: bool = True,
) -> Path:
    """Train EfficientNet-B0 3D (2D on a 2D plate) on a plate by a recipe; returns the path of the model bundle.

    Parameters
    ----------
    image : DataArray (well, site, c, z, y, x)
        The plate (lazy; read one site at a time), e.g. from :func:`open_plate`.
    labels : DataArray (well, site, z, y, x) of int
        Its cell labels.
    recipe : Recipe, optional
        Grids, epochs, batch, optimiser, augmentation, regulariser and split
        (:class:`~gradcamo_dask.jobs.recipe.Recipe`; default ``Recipe()``, the paper's).
    out : path
        Bundle directory to write.
    platemap : DataFrame or path, optional
        ``well, treatment, ...``; the treatments are the classes. Default: the
        platemap carried by ``image``'s coords.
    resume : bool
        Continue from the checkpoint (refused, with the differences listed, when it
        was made with another recipe); without one, start afresh.
    checkpoint_dir : path, optional
        Checkpoint folder (default ``out/checkpoint``).
    cache : bool, optional
        Keep crops (at the model grid) in memory across epochs. Default: when the
        estimated size is below 2 GiB.
    device, autocast, channels_last
        Default: CUDA when available, then bf16 autocast and ``channels_last_3d``.
    progress : bool
        tqdm progress bar with loss and accuracy.

    Returns
    -------
    pathlib.Path
        The bundle directory (``model.safetensors``, ``config.json``; ``cells.csv``
        lists every cell's split).

    Raises
    ------
    PlateLayoutError
        Platemap and plate wells differ (either way).
    TrainingError
        A class without training cells, too few cells for the split, a resume
        checkpoint made with another recipe.
    """
    started = time.time()
    recipe = Recipe() if recipe is None else recipe
    if not isinstance(recipe, Recipe):
        raise InputError(f"train() takes a Recipe as its third argument, got {type(recipe).__name__}; "
                         "pass a platemap as platemap=")
    pm = _platemap(image, labels, platemap)
    recipe = plate_recipe(recipe, image)  # a 2D plate trains efficientnet2d on (y, x) crops
    plate, channels = str(image.attrs.get("plate", "plate")), [str(c) for c in image["c"].values]
    cells = _split_cells(labels, pm, recipe)
    files = CheckpointFiles(checkpoint_dir if checkpoint_dir is not None else Path(out) / "checkpoint")
    run, bundle_layers = _start(plate, channels, cells, recipe, files, device, channels_last, autocast, progress)
    state = (_resume(files, run.fingerprint, run.model, run.optimizer) if resume and files.state.is_file()
             else _State(normalization=run.start_normalization))
    files.folder.mkdir(parents=True, exist_ok=True)
    reader = _crop_reader(image, labels, cells, recipe, cache, state.normalization)
    try:
        stopped, test = _fit_then_test(run, state, reader, cells, recipe, bundle_layers[0])
    finally:
        reader.close()
    provenance = _provenance(plate, cells, recipe, run, state, stopped, test, bundle_layers[0], started)
    _write_bundle(out, run.model, channels, cells, recipe, state.normalization, provenance, bundle_layers)
    return Path(out)


def _provenance(plate: str, cells: _Cells, recipe: Recipe, run: _Run, state: _State, stopped: str,
                test: dict | None, test_layer: str, started: float) -> dict:
    r = recipe
    return {
        "trained_by": "gradcamo_dask.jobs.train", "plate": plate, "split_wells": cells.split_wells,
        "cells": cells.counts, "classes": cells.classes, "epochs_run": len(state.history), "epochs": r.epochs,
        "best_epoch": state.best["epoch"], "stopped_by": stopped, "seed": r.seed, "batch_size": r.batch_size,
        "learning_rate": r.learning_rate, "optimizer": "Adam",
        "loss": "cross_entropy" + (f" - {r.regularizer} * mean Grad-CAMO" if r.regularizer else ""),
        "regularizer": {"lambda": float(r.regularizer), "layer": run.layer, "target": r.regularizer_target,
                        "evidence": r.regularizer_evidence, "cam": r.regularizer_cam}
        if r.regularizer else None,
        "augmentation": run.fingerprint["augmentation"], "crop_size": list(r.crop_size),
        "input_shape": list(r.input_shape), "val_fraction": r.split.val_fraction,
        "batchnorm_momentum": r.batchnorm_momentum, "head_init_std": r.head_init_std, "history": state.history,
        "init_from": None if r.init_from is None else {"path": r.init_from, "hash": run.fingerprint["init_from"]},
        "device": str(run.device), "versions": package_versions(), "seconds": round(time.time() - started, 1),
        "test": None if test is None else {k: test[k] for k in ("loss", "accuracy", "n", "gradcamo_mean",
                                                                 "gradcamo_sd", "n_undefined")} | {"layer": test_layer},
    }


def _write_bundle(out: str | os.PathLike, model: nn.Module, channels: list[str], cells: _Cells, recipe: Recipe,
                  normalization: dict, provenance: dict, layers: list[str]) -> None:
    from gradcamo_dask.engine.bundles import write_bundle

    model = model.to("cpu", memory_format=torch.contiguous_format).eval()
    write_bundle(out, model, channels=channels, classes=cells.classes, crop_shape=recipe.crop_size,
                input_shape=recipe.input_shape, normalization=normalization, provenance=provenance, layers=layers,
                crop_fill=recipe.crop_fill)
    keys = ["plate", "well", "site", "object_number", "treatment", "split"]
    cells.table[keys].to_csv(Path(out) / "cells.csv", index=False)
