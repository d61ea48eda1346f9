"""Supervised training of the 3D feature extractor (DESIGN §2) with an optional Grad-CAMO regulariser.

:func:`train` fits EfficientNet-B0 3D to predict each cell's treatment from its crop,
with the paper's recipe as defaults: leave-wells-out split, a validation subset of
training cells for early stopping, augmentations with p = 0.5 each (x/y flips,
brightness, gamma), Adam at 3e-4, batch 8, cross-entropy; optionally minus
``lambda`` times the batch's mean Grad-CAMO (:mod:`gradcamo_dask.engine.regularize`). The
result is a model bundle (:func:`gradcamo_dask.save_bundle`) with the normalisation
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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from gradcamo_dask.engine.augment import Augmentation, augment_batch
from gradcamo_dask.engine.regularize import gradcamo_loss
from gradcamo_dask.errors import InputError, LabelsError, TrainingError
from gradcamo_dask.jobs.trainset import (
    SiteReader,
    assign_split,
    check_wells,
    combine_normalization,
)
from gradcamo_dask.provenance import package_versions

__all__ = ["train", "evaluate_split"]

CHECKPOINT_STATE = "state.json"
CHECKPOINT_WEIGHTS = "model.safetensors"
CHECKPOINT_BEST = "best.safetensors"
CHECKPOINT_OPTIMIZER = "optimizer.safetensors"


# ------------------------------------------------------------------ helpers
def _seed_of(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1, np.uint64)[0] % (2**63))


def _save_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp))
    from gradcamo_dask.engine.bundles import honour_umask

    honour_umask(tmp)  # safetensors writes 0600 whatever the umask
    os.replace(tmp, path)


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state as (tensors for safetensors, JSON-able rest): no pickle."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entries in state["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value
            else:
                scalars[f"{index}.{name}"] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in state["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_from_files(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Inverse of :func:`optimizer_to_files` (loads into ``optimizer``)."""
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for key, value in meta.get("scalars", {}).items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _differences(saved: dict, current: dict) -> list[str]:
    out = []
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            out.append(f"{key}: checkpoint {saved.get(key)!r}, now {current.get(key)!r}")
    return out


def _autocast(device: torch.device, autocast: Any) -> Any:
    import contextlib

    if autocast is None:
        autocast = device.type == "cuda"
    if autocast is False:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if autocast is True else autocast)


class _Batches:
    """Shuffled batches of one split: sites in a seeded order, read ``shuffle_sites`` at a
    time, cells shuffled within each group; the random draws do not depend on the cache."""

    def __init__(self, reader: SiteReader, split: str, labels: np.ndarray, normalization: dict,
                 batch_size: int, shuffle_sites: int) -> None:
        self.reader, self.split, self.labels = reader, split, labels
        self.batch_size, self.shuffle_sites = batch_size, shuffle_sites
        self.mean = torch.tensor(normalization["mean"], dtype=torch.float32).view(1, -1, 1, 1, 1)
        self.std = torch.tensor(normalization["std"], dtype=torch.float32).view(1, -1, 1, 1, 1)
        self.keys = reader.sites([split])
        split_of = reader.table["split"].to_numpy()
        self.n_cells = int((split_of == split).sum())

    def __len__(self) -> int:
        return math.ceil(self.n_cells / self.batch_size)

    def iterate(self, generator: torch.Generator | None, augmentation: Augmentation | None):
        """Yield ``(inputs, labels, masks)``; ``generator=None``: fixed order, no augmentation."""
        order = (torch.randperm(len(self.keys), generator=generator).tolist() if generator is not None
                 else list(range(len(self.keys))))
        keys = [self.keys[i] for i in order]
        split_of = self.reader.table["split"].to_numpy()
        carry: list[tuple[torch.Tensor, torch.Tensor, np.ndarray]] = []
        for start in range(0, len(keys), self.shuffle_sites):
            group = list(self.reader.stream(keys[start:start + self.shuffle_sites]))
            xs, ms, rows = [], [], []
            for _key, data in group:
                keep = np.flatnonzero(split_of[data.rows] == self.split)
                xs.append(data.inputs[keep])
                ms.append(data.masks[keep])
                rows.append(data.rows[keep])
            x, m, r = torch.cat(xs), torch.cat(ms), np.concatenate(rows)
            if carry:
                x, m, r = torch.cat([carry[0][0], x]), torch.cat([carry[0][1], m]), np.concatenate([carry[0][2], r])
                carry = []
            perm = torch.randperm(len(r), generator=generator) if generator is not None else torch.arange(len(r))
            x, m, r = x[perm], m[perm], r[perm.numpy()]
            last = start + self.shuffle_sites >= len(keys)
            n_full = len(r) if last else (len(r) // self.batch_size) * self.batch_size
            for b in range(0, n_full, self.batch_size):
                xb = x[b:b + self.batch_size]
                if generator is not None and augmentation is not None:
                    xb = augment_batch(xb, generator, augmentation)
                yield (xb - self.mean) / self.std, torch.from_numpy(self.labels[r[b:b + self.batch_size]]), \
                    m[b:b + self.batch_size]
            if not last and n_full < len(r):
                carry = [(x[n_full:], m[n_full:], r[n_full:])]


def _informative_layer(model: nn.Module, input_shape: tuple[int, int, int]) -> str:
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


def _prepare(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last_3d) if channels_last else x


def evaluate_split(model: nn.Module, batches: _Batches, *, device: torch.device, channels_last: bool,
                   autocast: Any = None, layer: str | None = None) -> dict[str, Any]:
    """Loss and accuracy of a split (eval mode, no augmentation); with ``layer`` also
    Grad-CAMO of the predicted class per cell (low-resolution route, as :func:`explain`).

    Returns a dict with ``loss``, ``accuracy``, ``n`` and, with a layer, ``gradcamo``
    (per-cell array, NaN where undefined), ``gradcamo_mean``, ``gradcamo_sd``,
    ``n_undefined``, ``predicted``, ``rows``.
    """
    from gradcamo_dask.engine.explain import GradCAM
    from gradcamo_dask.engine.gradcamo import gradcamo_lowres

    was_training = model.training
    model.eval()
    total_loss, correct, n = 0.0, 0, 0
    scores, predicted = [], []
    try:
        for x, y, m in batches.iterate(None, None):
            x = _prepare(x, device, channels_last)
            y = y.to(device)
            if layer is None:
                with torch.no_grad(), _autocast(device, autocast):
                    logits = model(x).float()
            else:
                with GradCAM(model, [layer]) as cam, _autocast(device, autocast):
                    result = cam(x, target="predicted")
                logits = result.logits.float()
                score, _, _ = gradcamo_lowres(result.cams[layer], m.to(device))
                scores.append(score.cpu().numpy())
            total_loss += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
            pred = logits.argmax(dim=1)
            predicted.append(pred.cpu().numpy())
            correct += int((pred == y).sum())
            n += len(y)
    finally:
        model.train(was_training)
    out: dict[str, Any] = {"loss": total_loss / max(n, 1), "accuracy": correct / max(n, 1), "n": n}
    if layer is not None:
        s = np.concatenate(scores) if scores else np.zeros(0)
        defined = s[np.isfinite(s)]
        out.update(gradcamo=s, gradcamo_mean=float(defined.mean()) if len(defined) else float("nan"),
                   gradcamo_sd=float(defined.std()) if len(defined) else float("nan"),
                   n_undefined=int((~np.isfinite(s)).sum()), predicted=np.concatenate(predicted))
    return out


# -------------------------------------------------------------------- train
def train(
    image: Any,
    labels: Any,
    platemap: pd.DataFrame | str | os.PathLike | None = None,
    *,
    out: str | os.PathLike,
    crop_size: Sequence[int | None] = (None, 128, 128),
    input_shape: Sequence[int] = (64, 224, 224),
    epochs: int = 50,
    batch_size: int = 8,
    learning_rate: float = 3e-4,
    seed: int = 0,
    test_wells: Sequence[str] | None = None,
    test_columns: Sequence[int] | None = None,
    test_rows: Sequence[str] | None = None,
    train_wells: Sequence[str] | None = None,
    train_columns: Sequence[int] | None = None,
    train_rows: Sequence[str] | None = None,
    val_fraction: float = 0.1,
    max_train_cells: int | None = None,
    patience: int | None = 5,
    augmentation: Augmentation | None = Augmentation(),
    regularizer: float = 0.0,
    regularizer_layer: str | None = None,
    regularizer_target: str = "label",
    layers: Sequence[str] | None = None,
    resume: bool = False,
    checkpoint_dir: str | os.PathLike | None = None,
    cache: bool | None = None,
    shuffle_sites: int = 64,
    device: str | torch.device | None = None,
    autocast: Any = None,
    channels_last: bool | None = None,
    model_options: dict | None = None,
    batchnorm_momentum: float | str | None = "epoch",
    head_init_std: float | None = 0.01,
    progress: bool = True,
) -> Path:
    """Train EfficientNet-B0 3D on a plate; returns the path of the model bundle.

    Parameters
    ----------
    image : DataArray (well, site, c, z, y, x)
        The plate (lazy; read one site at a time), e.g. from :func:`open_plate`.
    labels : DataArray (well, site, z, y, x) of int
        Its cell labels.
    platemap : DataFrame or path, optional
        ``well, treatment, ...``; the treatments are the classes. Default: the
        platemap carried by ``image``'s coords.
    out : path
        Bundle directory to write; checkpoints go to ``out/checkpoint`` unless
        ``checkpoint_dir`` says otherwise.
    crop_size : (z or None, y, x)
        Crop size in voxels (None = all z-slices). Paper: (None, 128, 128).
    input_shape : (z, y, x)
        Model grid in voxels. Paper: (64, 224, 224); e.g. (16, 48, 48) trains
        quickly on a CPU.
    epochs, batch_size, learning_rate, seed
        Paper: batch 8, Adam at 3e-4.
    test_wells, test_columns, test_rows, train_wells, train_columns, train_rows
        Leave-wells-out split (see :func:`gradcamo_dask.jobs.trainset.assign_split`);
        default: each treatment's last well is held out for testing. The paper:
        ``train_columns=[2], test_columns=[3]``.
    val_fraction : float
        Share of training cells held out (seeded) for early stopping.
    max_train_cells : int, optional
        Use at most this many training cells (a seeded random subset).
    patience : int or None
        Stop after this many epochs without a lower validation loss; the bundle
        gets the weights of the best epoch. None: run all epochs.
    augmentation : Augmentation or None
        Default: the paper's (p = 0.5 each: x/y flips, brightness U[0.5, 1.25],
        gamma U[0.5, 1.5]). None: no augmentation.
    regularizer : float
        ``lambda`` of ``loss = CE - lambda * mean Grad-CAMO``; 0 = plain CE.
    regularizer_layer : str, optional
        Grad-CAM layer of the regulariser (default: the model's default layer, or
        the last block output with more than one voxel when the default layer's
        grid is a single voxel at ``input_shape``).
    regularizer_target : ``"label"`` or ``"predicted"``
        Class whose map is scored by the regulariser.
    layers : list of str, optional
        Default Grad-CAM layers stored in the bundle (default: the regulariser's
        layer, else the model's default); test Grad-CAMO is reported at the first.
    resume : bool
        Continue from the checkpoint (refused, with the differences listed, when it
        was made with another configuration); without one, start afresh.
    cache : bool, optional
        Keep crops (at the model grid) in memory across epochs. Default: when the
        estimated size is below 2 GiB.
    shuffle_sites : int
        Sites whose cells are shuffled together (read-ahead window).
    device, autocast, channels_last
        Default: CUDA when available, then bf16 autocast and ``channels_last_3d``.
    model_options : dict, optional
        Extra :func:`efficientnet3d` options (``dropout_rate``, ...).
    batchnorm_momentum : ``"epoch"``, float or None
        How batch-norm running statistics (used at inference) are kept. ``"epoch"``
        (default): reset at the start of each epoch and averaged over that epoch's
        batches (no extra pass over the data). A float: an exponential moving
        average with that momentum. None keeps the model's own (EfficientNet's
        0.01), which needs thousands of steps before the statistics leave their
        initial values: a short run would then be scored by a model that gives the
        same logits for every cell.
    head_init_std : float or None
        Re-initialise the classification layer with N(0, std) weights and zero bias
        (initial logits near 0, initial loss ln K). MONAI's EfficientNet draws it from
        U(+-1/sqrt(K)), which for a handful of classes gives initial logits of +-10
        and a loss of several nats. None keeps MONAI's.
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
        checkpoint made with another configuration.
    """
    from gradcamo_dask.cells import cell_table
    from gradcamo_dask.engine.bundles import save_bundle
    from gradcamo_dask.engine.models import efficientnet3d
    from gradcamo_dask.io.platemap import platemap_of, read_platemap, validate_platemap

    started = time.time()
    if tuple(image.dims) != ("well", "site", "c", "z", "y", "x"):
        raise InputError(f"image must have dims (well, site, c, z, y, x), got {image.dims}")
    if tuple(labels.dims) != ("well", "site", "z", "y", "x"):
        raise LabelsError(f"labels must have dims (well, site, z, y, x), got {labels.dims}")
    if batch_size < 1 or epochs < 0 or learning_rate <= 0 or not 0 <= val_fraction < 1:
        raise InputError("need batch_size >= 1, epochs >= 0, learning_rate > 0 and 0 <= val_fraction < 1")
    plate = str(image.attrs.get("plate", "plate"))
    if platemap is None:
        pm = platemap_of(image)
        if pm is None:
            raise TrainingError("no platemap: pass platemap= (a DataFrame or CSV with well and treatment columns)")
    elif isinstance(platemap, pd.DataFrame):
        pm = validate_platemap(platemap)
    else:
        pm = read_platemap(platemap)
    check_wells([str(w) for w in image["well"].values], pm, plate)
    input_shape = tuple(int(n) for n in input_shape)
    crop_size = tuple(None if n is None else int(n) for n in crop_size)
    channels = [str(c) for c in image["c"].values]

    # cells and split
    table = cell_table(labels, pm, size=crop_size)
    split, split_wells = assign_split(
        table, pm, test_wells=test_wells, test_columns=test_columns, test_rows=test_rows, train_wells=train_wells,
        train_columns=train_columns, train_rows=train_rows, val_fraction=val_fraction,
        max_train_cells=max_train_cells, seed=seed)
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
    if counts["train"] < batch_size or (val_fraction > 0 and counts["val"] < 1):
        raise TrainingError(
            f"too few cells for the split: {counts['train']} training and {counts['val']} validation cells "
            f"(batch size {batch_size}); use more wells or sites, a smaller crop (fewer border cells dropped) "
            "or a smaller batch")
    if (test_wells or test_columns or test_rows) and counts["test"] == 0:
        raise TrainingError(f"the test wells {split_wells['test']} hold no usable cells")
    class_index = {c: i for i, c in enumerate(classes)}
    targets = np.array([class_index.get(str(t), -1) for t in table["treatment"]], dtype=np.int64)

    # model, device, layers
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if channels_last is None:
        channels_last = device.type == "cuda"
    torch.manual_seed(_seed_of(seed, 999_999))
    model = efficientnet3d(len(channels), len(classes), input_shape, **(model_options or {}))
    layer = regularizer_layer or (layers[0] if layers else _informative_layer(model, input_shape))
    bundle_layers = list(layers) if layers else [layer]
    if batchnorm_momentum not in (None, "epoch") and not isinstance(batchnorm_momentum, (int, float)):
        raise InputError(f"batchnorm_momentum must be 'epoch', a float or None, got {batchnorm_momentum!r}")
    if isinstance(batchnorm_momentum, (int, float)):
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.momentum = float(batchnorm_momentum)
    head = getattr(model, "_fc", None)
    if head_init_std is not None and isinstance(head, nn.Linear):
        nn.init.normal_(head.weight, 0.0, float(head_init_std))
        nn.init.zeros_(head.bias)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)

    fingerprint = {
        "plate": plate, "channels": channels, "classes": classes, "crop_size": list(crop_size),
        "input_shape": list(input_shape), "batch_size": batch_size, "learning_rate": learning_rate, "seed": seed,
        "train_wells": split_wells["train"], "test_wells": split_wells["test"], "val_fraction": val_fraction,
        "max_train_cells": max_train_cells, "cells": counts, "shuffle_sites": shuffle_sites,
        "augmentation": augmentation.to_dict() if augmentation is not None else None,
        "regularizer": float(regularizer), "regularizer_layer": layer if regularizer else None,
        "regularizer_target": regularizer_target if regularizer else None, "model_options": model_options or {},
        "batchnorm_momentum": batchnorm_momentum, "head_init_std": head_init_std,
    }
    out = Path(out)
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else out / "checkpoint"
    history: list[dict] = []
    best = {"epoch": 0, "val_loss": float("inf")}
    start_epoch, stale, normalization = 0, 0, None
    if resume and (ckpt / CHECKPOINT_STATE).is_file():
        state = json.loads((ckpt / CHECKPOINT_STATE).read_text())
        diffs = _differences(state["config"], json.loads(json.dumps(fingerprint)))
        if diffs:
            raise TrainingError(f"checkpoint {ckpt} was made with another configuration; differences:\n  "
                                + "\n  ".join(diffs) + "\nresume with the same settings or start afresh (no resume)")
        model.load_state_dict(_load_tensors(ckpt / CHECKPOINT_WEIGHTS))
        optimizer_from_files(optimizer, _load_tensors(ckpt / CHECKPOINT_OPTIMIZER), state["optimizer"])
        history, best, stale = state["history"], state["best"], state["stale"]
        start_epoch, normalization = state["epochs_done"], state["normalization"]
    ckpt.mkdir(parents=True, exist_ok=True)

    # data
    n_used = sum(counts.values())
    per_cell = len(channels) * math.prod(input_shape) * 4 + math.prod(
        n if n is not None else image.sizes["z"] for n in crop_size)
    if cache is None:
        cache = n_used * per_cell < 2 * 2**30
    reader = SiteReader(image, labels, table[table["split"] != ""], crop_size, input_shape, cache=cache)
    try:
        if normalization is None:
            parts = [(int((reader.table["split"].to_numpy()[d.rows] == "train").sum()), d.normalization)
                     for _k, d in reader.stream(reader.sites(["train"])) if d.normalization is not None]
            normalization = combine_normalization(parts)
        sub_targets = targets[reader.table.index.to_numpy()]
        train_batches = _Batches(reader, "train", sub_targets, normalization, batch_size, shuffle_sites)
        val_batches = _Batches(reader, "val", sub_targets, normalization, batch_size, shuffle_sites)
        test_batches = _Batches(reader, "test", sub_targets, normalization, batch_size, shuffle_sites)
        for epoch in range(start_epoch, epochs):
            if patience is not None and stale >= patience:
                break
            record = _train_epoch(model, optimizer, train_batches, epoch=epoch, epochs=epochs, seed=seed,
                                  augmentation=augmentation, regularizer=regularizer, layer=layer,
                                  target=regularizer_target, device=device, channels_last=channels_last,
                                  autocast=autocast, progress=progress,
                                  epoch_batchnorm=batchnorm_momentum == "epoch")
            if counts["val"]:
                val = evaluate_split(model, val_batches, device=device, channels_last=channels_last,
                                     autocast=autocast)
                record.update(val_loss=val["loss"], val_accuracy=val["accuracy"])
            history.append(record)
            if progress:
                from tqdm.auto import tqdm

                tqdm.write(f"epoch {epoch + 1}/{epochs}: " + ", ".join(
                    f"{k} {v:.4g}" for k, v in record.items() if k != "epoch" and isinstance(v, float)))
            improved = record.get("val_loss", -epoch) < best["val_loss"]
            weights = {k: v for k, v in model.state_dict().items()}
            if improved:
                best, stale = {"epoch": epoch + 1, "val_loss": record.get("val_loss", -epoch)}, 0
                _save_tensors(ckpt / CHECKPOINT_BEST, weights)
            else:
                stale += 1
            _save_tensors(ckpt / CHECKPOINT_WEIGHTS, weights)
            opt_tensors, opt_meta = optimizer_to_files(optimizer)
            _save_tensors(ckpt / CHECKPOINT_OPTIMIZER, opt_tensors)
            _save_json(ckpt / CHECKPOINT_STATE, {
                "config": fingerprint, "epochs_done": epoch + 1, "history": history, "best": best, "stale": stale,
                "normalization": normalization, "optimizer": opt_meta})
        stopped = "early stopping" if len(history) < epochs else "epochs"
        if (ckpt / CHECKPOINT_BEST).is_file() and best["epoch"]:
            model.load_state_dict(_load_tensors(ckpt / CHECKPOINT_BEST))
        test = None
        if counts["test"]:
            test = evaluate_split(model, test_batches, device=device, channels_last=channels_last,
                                  autocast=autocast, layer=bundle_layers[0])
    finally:
        reader.close()

    model = model.to("cpu", memory_format=torch.contiguous_format).eval()
    provenance = {
        "trained_by": "gradcamo_dask.jobs.train", "plate": plate, "split_wells": split_wells, "cells": counts,
        "classes": classes, "epochs_run": len(history), "epochs": epochs, "best_epoch": best["epoch"],
        "stopped_by": stopped, "seed": seed, "batch_size": batch_size, "learning_rate": learning_rate,
        "optimizer": "Adam", "loss": "cross_entropy" + (f" - {regularizer} * mean Grad-CAMO" if regularizer else ""),
        "regularizer": {"lambda": float(regularizer), "layer": layer, "target": regularizer_target}
        if regularizer else None,
        "augmentation": fingerprint["augmentation"], "crop_size": list(crop_size), "input_shape": list(input_shape),
        "val_fraction": val_fraction, "batchnorm_momentum": batchnorm_momentum, "head_init_std": head_init_std,
        "history": history, "device": str(device), "versions": package_versions(),
        "seconds": round(time.time() - started, 1),
        "test": None if test is None else {k: test[k] for k in ("loss", "accuracy", "n", "gradcamo_mean",
                                                                 "gradcamo_sd", "n_undefined")} | {"layer": bundle_layers[0]},
    }
    save_bundle(out, model, channels=channels, classes=classes, crop_shape=crop_size, input_shape=input_shape,
                normalization=normalization, provenance=provenance, layers=bundle_layers)
    keys = ["plate", "well", "site", "object_number", "treatment", "split"]
    table[keys].to_csv(out / "cells.csv", index=False)
    return out


def _train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, batches: _Batches, *, epoch: int,
                 epochs: int, seed: int, augmentation: Augmentation | None, regularizer: float, layer: str,
                 target: str, device: torch.device, channels_last: bool, autocast: Any, progress: bool,
                 epoch_batchnorm: bool = False) -> dict:
    from tqdm.auto import tqdm

    torch.manual_seed(_seed_of(seed, epoch))  # dropout and drop-connect
    generator = torch.Generator().manual_seed(_seed_of(seed, 10_000 + epoch))
    model.train()
    if epoch_batchnorm:  # running statistics = the average over this epoch's batches
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.reset_running_stats()
                module.momentum = None
    total, correct, n, score_sum, score_n, undefined = 0.0, 0, 0, 0.0, 0, 0
    bar = tqdm(total=len(batches), desc=f"epoch {epoch + 1}/{epochs}", disable=not progress, leave=False)
    try:
        for x, y, m in batches.iterate(generator, augmentation):
            x = _prepare(x, device, channels_last)
            y = y.to(device)
            with _autocast(device, autocast):
                result = gradcamo_loss(model, x, y, m, layer=layer, lam=regularizer, target=target)
            optimizer.zero_grad(set_to_none=True)
            result.loss.backward()
            optimizer.step()
            k = len(y)
            total += float(result.cross_entropy.detach()) * k
            correct += int((result.logits.detach().argmax(dim=1) == y).sum())
            n += k
            if regularizer:
                s = result.scores[torch.isfinite(result.scores)]
                score_sum, score_n, undefined = score_sum + float(s.sum()), score_n + len(s), \
                    undefined + result.n_undefined
            post = {"loss": f"{total / n:.3f}", "acc": f"{correct / n:.3f}"}
            if score_n:
                post["gradcamo"] = f"{score_sum / score_n:.3f}"
            bar.set_postfix(post, refresh=False)
            bar.update(1)
    finally:
        bar.close()
    record = {"epoch": epoch + 1, "train_loss": total / max(n, 1), "train_accuracy": correct / max(n, 1)}
    if regularizer:
        record.update(train_gradcamo=score_sum / score_n if score_n else None, train_undefined=undefined)
    return record
