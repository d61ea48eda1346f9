"""The layout of a scored plate: its variables, coords, cell-table key and provenance (no graph, no model run).

:func:`~gradcamo_dask.jobs.score.score_plate` builds the site tasks; this module says
what the resulting ``xarray.Dataset`` holds around them: the per-cell variables and
their shapes, the coords (feature names, classes, layers, every cell-table column),
the identity of the cell table, and the provenance recorded in ``attrs``.
"""

from __future__ import annotations

import hashlib
import operator
from collections.abc import Sequence
from typing import Any

import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr
from dask.highlevelgraph import HighLevelGraph

from gradcamo_dask.errors import InputError
from gradcamo_dask.provenance import package_versions

__all__ = [
    "cells_key",
    "classic_settings",
    "layer_shapes",
    "profile_coords",
    "profile_variables",
    "scoring_provenance",
    "site_variables",
    "table_coords",
]


def layer_shapes(model: Any, input_shape: Sequence[int], layers: list[str]) -> dict[str, tuple[int, tuple]]:
    """``{layer: (channels, (z, y, x))}`` from one forward pass on PyTorch's meta device."""
    from gradcamo_dask.engine.layers import probe_layers

    trace = {name: out for name, _m, calls, out in probe_layers(model, tuple(input_shape)) if calls == 1 and len(out) == 5}
    unknown = [name for name in layers if name not in trace]
    if unknown:
        raise InputError(f"layers {unknown} are not spatial layers of the model that run once; choose among "
                         f"{list(trace)[-8:]} (and others: gradcamo_dask.layer_grids lists them all)")
    return {name: (int(trace[name][1]), tuple(int(n) for n in trace[name][2:])) for name in layers}


def classic_settings(image: xr.DataArray, classic: bool | dict) -> tuple[dict | None, list[str]]:
    """The site tasks' CellProfiler spec (``channels``, ``spacing`` µm, ``options``) and its feature names.

    ``classic`` False gives ``(None, [])``; a dict gives
    :func:`~gradcamo_dask.profiles.classic.site_classic_features` options.
    """
    if not classic:
        return None, []
    from gradcamo_dask.profiles.classic import classic_feature_names

    channels = [str(c) for c in image["c"].values]
    options = dict(classic) if isinstance(classic, dict) else {}
    if "intensity_max" not in options:  # CellProfiler divides by the dtype's maximum
        options["intensity_max"] = float(np.iinfo(image.dtype).max) if np.issubdtype(image.dtype, np.integer) \
            else 1.0
    spacing = [float(v) for v in image.attrs.get("spacing_zyx_um", (1.0, 1.0, 1.0))]
    names = classic_feature_names(tuple(channels), options.get("measurements", "default"),
                                  texture_scales=options.get("texture_scales"),
                                  granularity_length=options.get("granularity_length", 16))
    return {"channels": channels, "spacing": spacing, "options": options}, list(names)


def profile_variables(shapes: dict[str, tuple[int, tuple]], layers: list[str], n_classes: int,
                      n_classic: int | None) -> dict[str, tuple[tuple, tuple, Any]]:
    """``{variable: (dims after cell, shape after cell, dtype)}`` of a scored plate."""
    n_layers = len(layers)
    variables = {
        "deep": (("feature",), (sum(c for c, _ in shapes.values()),), np.float32),
        "logits": (("class",), (n_classes,), np.float32),
        "predicted": ((), (), np.int16),
        "blank_site": ((), (), bool),  # the cell's site image is all zero (flagged, warned about)
        "gradcamo": (("layer",), (n_layers,), np.float64),
        "cam_inside": (("layer",), (n_layers,), np.float64),
        "cam_total": (("layer",), (n_layers,), np.float64),
    }
    for k, name in enumerate(layers):
        variables[f"cam_lowres_{k}"] = ((f"cam{k}_z", f"cam{k}_y", f"cam{k}_x"), shapes[name][1], np.float32)
    if n_classic is not None:
        variables["classic"] = (("classic_feature",), (n_classic,), np.float32)
    return variables


def site_variables(graph: HighLevelGraph, site_name: str, counts: list[int], variables: dict,
                   token: str) -> dict[str, tuple[tuple, da.Array]]:
    """Dask arrays ``(cell, ...)`` of ``variables``, one block per site task ``(site_name, k)``.

    Each site task returns a dict of per-cell arrays; block ``k`` of a variable is that
    dict's entry. A plate without cells gives zero-length arrays.
    """
    data_vars = {}
    for var, (dims, tail, dtype) in variables.items():
        if counts:
            name = f"{var.replace('_', '-')}-{token}"
            dsk = {(name, k, *([0] * len(tail))): (operator.getitem, (site_name, k), var) for k in range(len(counts))}
            layered = HighLevelGraph({**graph.layers, name: dsk}, {**graph.dependencies, name: {site_name}})
            array = da.Array(layered, name, chunks=(tuple(counts), *((n,) for n in tail)), dtype=dtype,
                             meta=np.empty((0,) * (1 + len(tail)), dtype=dtype))
        else:
            array = da.zeros((0, *tail), dtype=dtype, chunks=-1)
        data_vars[var] = (("cell", *dims), array)
    return data_vars


def table_coords(cells: pd.DataFrame) -> dict[str, tuple[str, np.ndarray]]:
    """Every cell-table column as a coord on ``cell`` (text as variable-length strings)."""
    coords = {}
    for column in cells.columns:
        values = cells[column].to_numpy()
        if values.dtype == object or pd.api.types.is_string_dtype(cells[column]):
            # variable-length UTF-8 in Zarr v3; all-text columns get one str per distinct value (a plate has a
            # few hundred), not per cell; others (missing values, mixed types) are converted cell by cell
            if pd.api.types.infer_dtype(values, skipna=False) != "string":
                values = np.asarray([str(v) for v in values], dtype=object)
            else:
                codes, uniques = pd.factorize(values)
                values = np.asarray([str(v) for v in uniques], dtype=object)[codes]
        coords[column] = ("cell", values)
    return coords


def profile_coords(cells: pd.DataFrame, shapes: dict[str, tuple[int, tuple]], layers: list[str],
                   classes: Sequence[Any], classic_names: list[str] | None) -> dict[str, Any]:
    """Coords of a scored plate: ``cell``, ``feature`` (+ layer, index), ``class``, ``layer``, table columns."""
    feature_names = [f"{name}_{i}" for name in layers for i in range(shapes[name][0])]
    return {
        "cell": np.arange(len(cells), dtype=np.int64),
        "feature": np.asarray(feature_names, dtype=object),
        "feature_layer": ("feature", np.asarray([n for n in layers for _ in range(shapes[n][0])], dtype=object)),
        "feature_index": ("feature", np.concatenate([np.arange(shapes[n][0]) for n in layers]).astype(np.int64)),
        "class": np.asarray([str(c) for c in classes], dtype=object),
        "layer": np.asarray(layers, dtype=object),
        **({"classic_feature": np.asarray(classic_names, dtype=object)} if classic_names is not None else {}),
        **table_coords(cells),
    }


def cells_key(cells: pd.DataFrame) -> str:
    """SHA-256 of the cells' identity columns, column by column (3.5 M cells in about a second).

    Numbers enter as little-endian int64 / float64 bytes, text as newline-joined UTF-8,
    each column preceded by its name.
    """
    digest = hashlib.sha256()
    for column in ("well", "site", "object_number", "center_z", "center_y", "center_x", "volume_voxels"):
        if column not in cells:
            continue
        values = cells[column].to_numpy()
        digest.update(f"\n{column}\n".encode())
        if np.issubdtype(values.dtype, np.number):
            kind = "<f8" if np.issubdtype(values.dtype, np.floating) else "<i8"
            digest.update(np.ascontiguousarray(values, dtype=kind).tobytes())
        else:
            digest.update("\n".join(map(str, values)).encode())
    return digest.hexdigest()


def scoring_provenance(image: xr.DataArray, labels: xr.DataArray, bundle: Any, cells: pd.DataFrame, *,
                       layers: list[str], shapes: dict, parameters: dict, cells_sha256: str,
                       plate_path: str | None, labels_path: str | None, dask_names: tuple[str, str]) -> dict[str, Any]:
    """The provenance of a scoring run (``attrs["provenance"]``, before JSON): inputs, bundle, parameters.

    ``dask_names``: the Dask names of the image and labels arrays (their identity when no path is known).
    """
    from gradcamo_dask.io.identity import input_identity

    cfg = bundle.config
    plate_path = str(plate_path or image.encoding.get("source", image.attrs.get("source", "")))
    labels_path = str(labels_path or labels.encoding.get("source", labels.attrs.get("source", "")))
    inputs = {"image": input_identity(plate_path, dask_names[0]), "labels": input_identity(labels_path, dask_names[1]),
              "cell_table": hashlib.sha256(pd.util.hash_pandas_object(cells, index=False).values).hexdigest()}
    return {
        "bundle_path": str(bundle.path), "bundle_hash": bundle.hash, "bundle_classes": list(cfg.classes),
        "model_name": str(cfg.architecture.get("name", "")),  # export column names come from this, never a path
        "layers": layers, "layer_grids": {n: list(shapes[n][1]) for n in layers},
        "plate": str(image.attrs.get("plate", "plate")), "plate_path": plate_path, "labels_path": labels_path,
        "inputs": inputs, "wells": [str(w) for w in image["well"].values],
        "sites": [int(s) for s in image["site"].values], "n_cells": len(cells), "cells_sha256": cells_sha256,
        "parameters": parameters, "versions": package_versions(),
    }
