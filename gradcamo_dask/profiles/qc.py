"""Grad-CAMO quality control: flag or filter profiles, summaries by any grouping, layer sweep.

A profile is *on target* when its Grad-CAMO is at least the cut-off (paper: 0.25),
*off target* below it, and *undefined* when the Grad-CAM map had no positive
attention at all (score NaN). Undefined scores are counted apart, never read as 0
and never as on target: filtering keeps on-target cells only, unless asked to keep
the undefined ones too.

The layer sweep is the paper's proposed use of Grad-CAMO for choosing the feature
layer: score several layers of the same model on the same cells in ONE explain pass
(one forward pass, one backward pass to all requested layers) and rank the layers by
mean Grad-CAMO.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from gradcamo_dask.engine.gradcamo import DEFAULT_CUTOFF
from gradcamo_dask.errors import InputError

__all__ = [
    "DEFAULT_CUTOFF",
    "filter_profiles",
    "flag_profiles",
    "gradcamo_counts",
    "gradcamo_status",
    "layer_sweep",
    "rank_layers",
    "summarize_gradcamo",
]

ON_TARGET, OFF_TARGET, UNDEFINED = "on_target", "off_target", "undefined"


def _check_cutoff(cutoff: float) -> float:
    cutoff = float(cutoff)
    if not 0.0 <= cutoff <= 1.0:
        raise InputError(f"the Grad-CAMO cut-off must be in [0, 1] (a share of attention), got {cutoff}")
    return cutoff


def scored_layers(profiles: xr.Dataset) -> list[str]:
    """Layers with Grad-CAMO scores in ``profiles`` (``[]`` when there are none)."""
    if "gradcamo" not in profiles:
        return []
    if "layer" in profiles["gradcamo"].dims:
        return [str(v) for v in profiles["layer"].values]
    return [str(profiles["gradcamo"].attrs.get("layer", ""))]


def _require_scores(profiles: xr.Dataset) -> None:
    if not isinstance(profiles, xr.Dataset):
        raise InputError("profiles must be an xarray.Dataset (CONTRACTS 'Profiles')")
    if "gradcamo" not in profiles:
        raise InputError(f"the profiles have no Grad-CAMO scores (variables: {list(profiles.data_vars)}); score them "
                         f"with masks (score_plate does) before quality control")


def _layer(profiles: xr.Dataset, layer: str | None) -> str:
    layers = scored_layers(profiles)
    if layer is None:
        return layers[0]
    if str(layer) not in layers:
        raise InputError(f"layer {layer!r} has no Grad-CAMO scores; scored layers: {layers}")
    return str(layer)


def scores_of(profiles: xr.Dataset, layer: str | None = None) -> np.ndarray:
    """Grad-CAMO per cell (float64, NaN = undefined) for ``layer`` (default: the first scored)."""
    _require_scores(profiles)
    arr = profiles["gradcamo"]
    if "layer" in arr.dims:
        arr = arr.sel(layer=_layer(profiles, layer))
    return np.asarray(arr.values, dtype=np.float64)


def gradcamo_status(profiles: xr.Dataset, cutoff: float = DEFAULT_CUTOFF, layer: str | None = None) -> np.ndarray:
    """``"on_target"``, ``"off_target"`` or ``"undefined"`` per cell."""
    cutoff = _check_cutoff(cutoff)
    score = scores_of(profiles, layer)
    status = np.full(score.shape, OFF_TARGET, dtype=object)
    status[np.isnan(score)] = UNDEFINED
    status[~np.isnan(score) & (np.nan_to_num(score, nan=-1.0) >= cutoff)] = ON_TARGET
    return status.astype(str)


def gradcamo_counts(profiles: xr.Dataset, cutoff: float = DEFAULT_CUTOFF, layer: str | None = None) -> dict[str, Any]:
    """Counts of on-target, off-target and undefined cells, and the on-target share among defined ones."""
    status = gradcamo_status(profiles, cutoff, layer)
    n_on, n_off, n_und = (int((status == s).sum()) for s in (ON_TARGET, OFF_TARGET, UNDEFINED))
    defined = n_on + n_off
    return {"layer": _layer(profiles, layer), "cutoff": float(cutoff), "n": int(status.size), "n_on_target": n_on,
            "n_off_target": n_off, "n_undefined": n_und,
            "share_on_target": n_on / defined if defined else float("nan")}


def flag_profiles(profiles: xr.Dataset, cutoff: float = DEFAULT_CUTOFF, layer: str | None = None) -> xr.Dataset:
    """A copy of the profiles with a ``gradcamo_qc`` coord on ``cell``
    (``"on_target"``/``"off_target"``/``"undefined"``) and attr ``gradcamo_qc`` (JSON counts)."""
    status = gradcamo_status(profiles, cutoff, layer)
    out = profiles.assign_coords(gradcamo_qc=("cell", status))
    out.attrs["gradcamo_qc"] = json.dumps(gradcamo_counts(profiles, cutoff, layer))
    return out


def filter_profiles(
    profiles: xr.Dataset,
    cutoff: float = DEFAULT_CUTOFF,
    layer: str | None = None,
    *,
    keep_undefined: bool = False,
) -> xr.Dataset:
    """Only the on-target profiles (Grad-CAMO >= cut-off), optionally with the undefined ones.

    The result's attr ``gradcamo_filter`` (JSON) records the cut-off, the layer and how
    many cells were kept and dropped (off target, undefined).
    """
    status = gradcamo_status(profiles, cutoff, layer)
    keep = (status == ON_TARGET) | ((status == UNDEFINED) if keep_undefined else False)
    out = profiles.isel(cell=np.flatnonzero(keep))
    counts = gradcamo_counts(profiles, cutoff, layer)
    out.attrs["gradcamo_filter"] = json.dumps({**counts, "keep_undefined": bool(keep_undefined),
                                               "n_kept": int(keep.sum())})
    return out


def summarize_gradcamo(
    profiles: xr.Dataset | pd.DataFrame,
    by: str | Sequence[str] | None = None,
    cutoff: float = DEFAULT_CUTOFF,
    layer: str | None = None,
) -> pd.DataFrame:
    """Grad-CAMO per group: ``n``, ``mean``, ``sd``, ``share_on_target`` (>= cut-off among
    defined scores), ``n_undefined``; by any cell coords (``"treatment"``, ``"dose"``,
    ``["well", "site"]``, ...).

    Profiles with several scored layers are summarised per layer (a ``layer`` column
    first) unless ``layer`` picks one. Tables (one row per cell with a ``gradcamo``
    column) work too. Undefined (NaN) scores are counted in ``n_undefined``, never treated as 0.
    """
    cutoff = _check_cutoff(cutoff)
    by_list = [] if by is None else [by] if isinstance(by, str) else list(by)
    if isinstance(profiles, pd.DataFrame):
        return _summary(profiles, by_list, cutoff)
    _require_scores(profiles)
    missing = [c for c in by_list if c not in profiles.coords]
    if missing:
        cell_coords = [c for c, v in profiles.coords.items() if v.dims == ("cell",)]
        raise InputError(f"cannot group by {missing}: not cell coords of the profiles (they have {cell_coords})")
    scores = profiles["gradcamo"]
    if layer is not None and "layer" in scores.dims:
        scores = scores.sel(layer=_layer(profiles, layer))
    # only the grouping coords travel (the summary never needs the rest)
    keep = set(by_list) | {"cell", "layer"}
    scores = scores.drop_vars([c for c in scores.coords if c not in keep])
    table = scores.to_dataframe(name="gradcamo").reset_index()
    group = (["layer"] if "layer" in scores.dims else []) + by_list
    return _summary(table, group, cutoff)


def _summary(table: pd.DataFrame, by: list[str], cutoff: float, column: str = "gradcamo") -> pd.DataFrame:
    """One row per group of a one-row-per-cell table: n, mean, sd, share_on_target, n_undefined."""
    missing = [c for c in [column, *by] if c not in table.columns]
    if missing:
        raise InputError(f"table has no column(s) {missing}; it has {list(table.columns)}")
    scores = table[column].astype("float64")
    frame = pd.DataFrame({column: scores, "_on": scores >= cutoff, "_def": scores.notna()})
    for c in by:
        frame[c] = table[c].to_numpy()

    def summarise(group: pd.DataFrame) -> dict:
        defined = group[column].dropna()
        n_def = len(defined)
        return {
            "n": len(group),
            "mean": float(defined.mean()) if n_def else float("nan"),
            "sd": float(defined.std(ddof=1)) if n_def > 1 else float("nan"),
            "share_on_target": float(group["_on"].sum()) / n_def if n_def else float("nan"),
            "n_undefined": len(group) - n_def,
        }

    if by:
        rows = []
        for key, group in frame.groupby(by, sort=True, dropna=False):
            key = key if isinstance(key, tuple) else (key,)
            rows.append({**dict(zip(by, key)), **summarise(group)})
    else:
        rows = [summarise(frame)]
    out = pd.DataFrame(rows, columns=[*by, "n", "mean", "sd", "share_on_target", "n_undefined"])
    return out.astype({"n": "int64", "n_undefined": "int64"})


def rank_layers(profiles: xr.Dataset, cutoff: float = DEFAULT_CUTOFF) -> pd.DataFrame:
    """Scored layers ranked by mean Grad-CAMO (highest first), with share on target and
    undefined counts; ``grid`` (z, y, x) when the low-resolution CAMs are stored."""
    _require_scores(profiles)
    table = summarize_gradcamo(profiles, cutoff=cutoff)
    if "layer" not in table:
        table.insert(0, "layer", scored_layers(profiles))
    grids = {}
    for name, var in profiles.data_vars.items():
        if str(name).startswith("cam_lowres_") and "layer" in var.attrs:
            grids[str(var.attrs["layer"])] = tuple(int(n) for n in var.shape[1:])
    if grids:
        table["grid"] = [grids.get(str(layer)) for layer in table["layer"]]
    return _ranked(table)


def _ranked(table: pd.DataFrame) -> pd.DataFrame:
    table = table.sort_values(["mean", "share_on_target"], ascending=False, na_position="last", kind="stable")
    table = table.reset_index(drop=True)
    table.insert(0, "rank", np.arange(1, len(table) + 1))
    return table


def layer_sweep(
    model: Any,
    crops: Any,
    masks: Any,
    layers: Sequence[str] | None = None,
    *,
    cutoff: float = DEFAULT_CUTOFF,
    target: Any = "predicted",
    input_shape: Sequence[int] | None = None,
    normalization: dict | None = None,
    batch_size: int | None = None,
) -> pd.DataFrame:
    """Score several layers in ONE explain pass and rank them by mean Grad-CAMO.

    Parameters
    ----------
    model : torch.nn.Module or Bundle
        A CNN (crops must then be model-ready, i.e. normalised) or a model bundle
        (raw crops are normalised with its statistics; its input grid is used).
    crops : array (cell, c, z, y, x)
        Crops of the cells to sweep (a few hundred are plenty).
    masks : array (cell, z, y, x)
        Their central-cell masks.
    layers : list of str, optional
        Layers to compare; default: every spatial layer of the model
        (:func:`~gradcamo_dask.layer_grids`).
    cutoff : float
        On-target cut-off for ``share_on_target``.
    target, input_shape, batch_size
        As for :func:`~gradcamo_dask.engine.explain`.
    normalization : dict, optional
        ``{"mean", "std"}`` to normalise raw crops with (a bundle's by default).

    Returns
    -------
    pandas.DataFrame
        One row per layer, best first: ``rank, layer, grid, n, mean, sd,
        share_on_target, n_undefined``.
    """
    from gradcamo_dask.engine.explain import explain
    from gradcamo_dask.engine.layers import layer_grids

    cutoff = _check_cutoff(cutoff)
    bundle = model if hasattr(model, "model") and hasattr(model, "config") else None
    net = bundle.model if bundle is not None else model
    if bundle is not None:
        input_shape = input_shape or tuple(bundle.config.input_shape)
        normalization = normalization or dict(bundle.config.normalization)
    if normalization is not None:
        from gradcamo_dask.engine.normalize import normalize_crops

        crops = normalize_crops(crops, normalization)
    if layers is None:
        layers = list(layer_grids(net, input_shape))
    layers = list(layers)
    if not layers:
        raise InputError("no layers to sweep; name them or use a model with spatial layers")
    result = explain(net, crops, masks, layers=layers, target=target, input_shape=input_shape,
                     batch_size=batch_size)
    rows = []
    for name in layers:
        table = pd.DataFrame({"gradcamo": np.asarray(result.gradcamo[name], dtype=np.float64).reshape(-1)})
        summary = _summary(table, [], cutoff).iloc[0].to_dict()
        rows.append({"layer": name, "grid": tuple(int(n) for n in result.grids[name]), **summary})
    table = pd.DataFrame(rows).astype({"n": "int64", "n_undefined": "int64"})
    return _ranked(table)
