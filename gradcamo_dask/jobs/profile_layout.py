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
    "per_cell_text",
    "table_coords",
    "table_hash",
]


def layer_shapes(model: Any, input_shape: Sequence[int], layers: list[str]) -> dict[str, tuple[int, tuple]]:
    """``{layer: (channels, (z, y, x))}`` (``(y, x)`` for a 2D model) from one forward pass on PyTorch's meta
    device; a ViT's attention sources (``cls_attention``, ...) have its width and patch grid."""
    from gradcamo_dask.engine.attention import ATTENTION_SOURCES
    from gradcamo_dask.engine.layers import probe_layers

    if hasattr(model, "vit") and layers and all(name in ATTENTION_SOURCES for name in layers):
        width = int(model.vit.norm.normalized_shape[0])  # features: the CLS token after the final norm
        return {name: (width, tuple(int(n) for n in model.patch_grid)) for name in layers}
    spatial = len(tuple(input_shape)) + 2  # (N, C, [z,] y, x) activations
    trace = {name: out for name, _m, calls, out in probe_layers(model, tuple(input_shape))
             if calls == 1 and len(out) == spatial}
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
    from gradcamo_dask.cells import plate_spatial_dims
    from gradcamo_dask.profiles.classic import classic_feature_names

    channels = [str(c) for c in image["c"].values]
    options = dict(classic) if isinstance(classic, dict) else {}
    if "intensity_max" not in options:  # CellProfiler divides by the dtype's maximum
        options["intensity_max"] = float(np.iinfo(image.dtype).max) if np.issubdtype(image.dtype, np.integer) \
            else 1.0
    spacing = [float(v) for v in image.attrs.get("spacing_zyx_um", (1.0, 1.0, 1.0))]
    names = classic_feature_names(tuple(channels), options.get("measurements", "default"),
                                  texture_scales=options.get("texture_scales"),
                                  granularity_length=options.get("granularity_length", 16),
                                  spatial_dims=plate_spatial_dims(image))
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
        grid = shapes[name][1]  # (z, y, x), or (y, x) for a 2D model
        variables[f"cam_lowres_{k}"] = (tuple(f"cam{k}_{a}" for a in "zyx"[-len(grid):]), grid, np.float32)
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


def table_coords(cells: pd.DataFrame) -> dict[str, Any]:
    """Every cell-table column as a coord on ``cell`` (text as variable-length strings).

    A text column becomes an object array of one ``str`` per distinct value (a plate
    has a few hundred wells), shared by all their cells: 8 bytes per cell, made from
    the column's codes (``pd.factorize``, no Python object per cell), with xarray's
    variable-length string dtype so that writing it neither scans nor copies it. It is
    written to Zarr as before (variable-length UTF-8) and reads back as the same text.
    """
    coords: dict[str, Any] = {}
    for column in cells.columns:
        text = per_cell_text(cells[column])
        # fastpath: xarray would otherwise round-trip object arrays through a pandas (Arrow) string Series,
        # which makes one new str per cell (650 MiB of client memory for 3.5 M cells, bench_scale)
        coords[column] = ("cell", cells[column].to_numpy()) if text is None else xr.Variable("cell", text,
                                                                                              fastpath=True)
    return coords


def per_cell_text(column: pd.Series) -> np.ndarray | None:
    """A text column as ``str(value)`` per cell in an object array of xarray's variable-length ``str`` dtype; None
    for a column that is not text.

    Values that are all text (or missing) share one ``str`` per distinct value; other
    object columns (mixed types) are converted cell by cell.
    """
    from xarray.coding.strings import create_vlen_dtype

    dtype = column.dtype.categories.dtype if isinstance(column.dtype, pd.CategoricalDtype) else column.dtype
    if not (dtype == object or pd.api.types.is_string_dtype(dtype)):
        return None
    vlen = create_vlen_dtype(str)
    if isinstance(column.dtype, pd.StringDtype) or pd.api.types.infer_dtype(column, skipna=False) in (
            "string", "empty", "categorical"):
        codes, uniques = pd.factorize(column, use_na_sentinel=False)
        return np.asarray([str(v) for v in uniques], dtype=vlen)[codes]
    return np.asarray([str(v) for v in column.to_numpy()], dtype=vlen)


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


def cells_key(cells: pd.DataFrame, rows_per_slice: int = 2**18) -> str:
    """SHA-256 of the cells' identity columns, column by column (3.5 M cells in about a second).

    Numbers enter as little-endian int64 / float64 bytes, text as newline-joined UTF-8
    (``str`` of each value), each column preceded by its name. Text is joined in slices
    of rows from one ``str`` per distinct value: the same bytes as one join of the whole
    column, without a Python object per cell; ``rows_per_slice`` bounds that memory.
    """
    digest = hashlib.sha256()
    for column in ("well", "site", "object_number", "center_z", "center_y", "center_x", "volume_voxels"):
        if column not in cells:
            continue
        digest.update(f"\n{column}\n".encode())
        text = per_cell_text(cells[column])  # before to_numpy, which makes a str per cell of Arrow text
        values = cells[column].to_numpy() if text is None else text
        if np.issubdtype(values.dtype, np.number):
            kind = "<f8" if np.issubdtype(values.dtype, np.floating) else "<i8"
            digest.update(np.ascontiguousarray(values, dtype=kind).tobytes())
            continue
        text = np.asarray([str(v) for v in values], dtype=object) if text is None else text
        for start in range(0, len(text), rows_per_slice):
            digest.update(("\n" if start else "").encode() + "\n".join(text[start:start + rows_per_slice]).encode())
    return digest.hexdigest()


def table_hash(cells: pd.DataFrame, rows_per_slice: int = 2**18) -> str:
    """SHA-256 of ``pandas.util.hash_pandas_object(cells, index=False)``, computed in slices of rows.

    The row hashes depend on each row alone, so slices give the same bytes as the
    whole table at once, with a slice's temporaries in memory instead of the table's.
    An object column of mixed types is the exception (pandas hashes ``1`` as ``True``
    when both are in the column): such a table is hashed at once.
    """
    mixed = any(cells[c].dtype == object and pd.api.types.infer_dtype(cells[c], skipna=True) not in ("string", "empty")
                for c in cells.columns)
    rows_per_slice = max(1, len(cells)) if mixed else rows_per_slice
    digest = hashlib.sha256()
    for start in range(0, len(cells), rows_per_slice):
        part = cells.iloc[start:start + rows_per_slice]
        digest.update(np.ascontiguousarray(pd.util.hash_pandas_object(part, index=False).to_numpy()).tobytes())
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
              "cell_table": table_hash(cells)}
    return {
        "bundle_path": str(bundle.path), "bundle_hash": bundle.hash, "bundle_classes": list(cfg.classes),
        "model_name": str(cfg.architecture.get("name", "")),  # export column names come from this, never a path
        "layers": layers, "layer_grids": {n: list(shapes[n][1]) for n in layers},
        "spatial_dims": 2 if image.sizes["z"] == 1 else 3,  # 2D plates export without Location_Center_Z
        "plate": str(image.attrs.get("plate", "plate")), "plate_path": plate_path, "labels_path": labels_path,
        "inputs": inputs, "wells": [str(w) for w in image["well"].values],
        "sites": [int(s) for s in image["site"].values], "n_cells": len(cells), "cells_sha256": cells_sha256,
        "parameters": parameters, "versions": package_versions(),
    }
