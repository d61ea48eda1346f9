"""Per-object tables in CellProfiler's naming, for CytoTable and pycytominer without adapters.

One row per cell, columns:

* keys: ``Metadata_Plate``, ``Metadata_Well``, ``Metadata_Site`` (the 0-based field
  index of the plate), ``Metadata_ObjectNumber`` (the label id); together unique;
* every other cell-table column as ``Metadata_<column>`` (``Metadata_treatment``,
  ``Metadata_dose``, ``Metadata_is_control``, ``Metadata_volume_voxels``, ... : the
  names pycytominer's ``annotate`` gives platemap columns);
* ``Cells_Location_Center_X/Y/Z`` from the cell table (voxels; CellProfiler's pixels); profiles
  of a 2D plate (provenance ``spatial_dims`` 2) have no ``Location_Center_Z`` and no z bounding box,
  as CellProfiler's 2D output;
* classic features as ``Cells_<name>`` (``Cells_AreaShape_Volume``,
  ``Cells_Intensity_MeanIntensity_DNA``, ``Cells_Texture_..._DNA_3_00_256``, ...);
* deep features as ``Cells_<Model>_<Layer>_<i>``: model and layer names are made
  alphanumeric CamelCase (``_head_swish`` -> ``HeadSwish``, ``_blocks.4.8`` ->
  ``Blocks4x8``) because CellProfiler-style names use ``_`` to separate
  compartment, feature group and the rest;
* Grad-CAMO as QC metadata, never a feature: ``Metadata_GradCAMO`` (the reported
  layer), its two sums ``Metadata_GradCAMO_CAMInside`` / ``_CAMTotal``, the layer name
  ``Metadata_GradCAMO_Layer``, ``Metadata_GradCAMO_<Layer>`` for every layer when
  there are several, and two QC flags that pycytominer's
  ``normalize(..., drop_cosmicqc_rows=True)`` drops (it drops rows where any
  ``Metadata_cqc_*`` column is True): ``Metadata_cqc_gradcamo_below_cutoff`` (score
  below the cut-off, default 0.25) and ``Metadata_cqc_gradcamo_undefined`` (no positive
  attention at all: NaN score, counted apart, never read as 0);
* the model's output as ``Metadata_Predicted`` (class name) and
  ``Metadata_Logit_<class>``.

``pycytominer``'s ``features="infer"`` picks the ``Cells_*`` columns (locations,
classic and deep features) and ``meta_features="infer"`` the ``Metadata_*`` ones.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from gradcamo_dask.cells import GEOMETRY_COLUMNS
from gradcamo_dask.engine.gradcamo import DEFAULT_CUTOFF
from gradcamo_dask.errors import InputError
from gradcamo_dask.provenance import read_provenance

__all__ = ["cellprofiler_name", "cellprofiler_table", "to_cellprofiler_table"]

KEY_COLUMNS = {"plate": "Metadata_Plate", "well": "Metadata_Well", "site": "Metadata_Site",
               "object_number": "Metadata_ObjectNumber"}
QC_BELOW = "Metadata_cqc_gradcamo_below_cutoff"
QC_UNDEFINED = "Metadata_cqc_gradcamo_undefined"


def str_values(values: Any) -> np.ndarray:
    """Any array of text (NumPy ``<U``, object, or the ``StringDType`` that Zarr v3 stores
    return) as a NumPy ``<U`` array."""
    values = np.asarray(values)
    if values.dtype.kind == "U":
        return values
    return np.array([str(v) for v in values.reshape(-1).tolist()], dtype=str).reshape(values.shape)


def cellprofiler_name(name: str) -> str:
    """A model or layer name as one CellProfiler-safe CamelCase token.

    Letters and digits are kept, everything else splits words; each word starts with
    a capital; two numbers in a row are joined by ``x``. ``"_head_swish"`` ->
    ``"HeadSwish"``, ``"_blocks.4.8"`` -> ``"Blocks4x8"``, ``"efficientnet3d"`` ->
    ``"Efficientnet3D"``.
    """
    tokens = re.findall(r"[A-Za-z]+|[0-9]+", str(name))
    out = ""
    for i, token in enumerate(tokens):
        if token.isdigit() and i and tokens[i - 1].isdigit():
            out += "x"
        out += token[0].upper() + token[1:]
    if not out:
        raise InputError(f"name {name!r} has no letters or digits to build a CellProfiler feature name from")
    return out




def model_name_of(profiles: xr.Dataset) -> str:
    """The model's name recorded in the provenance (its architecture name), else ``"Deep"``.

    A pure function of the stored provenance: ``model_name`` (as ``score_plate``
    records it from the bundle's config), ``architecture``, or a ``bundle``/``model``
    dict's ``name``/``architecture``/``config.architecture``. Paths are never read, so
    the same store gives the same column names wherever it is exported from.
    """
    prov = read_provenance(profiles)
    candidates: list[Any] = [prov.get("model_name"), prov.get("architecture")]
    for key in ("bundle", "model"):
        sub = prov.get(key)
        if isinstance(sub, dict):
            candidates += [sub.get("name"), sub.get("architecture")]
            config = sub.get("config")
            if isinstance(config, dict):
                candidates.append(config.get("architecture"))
    for cand in candidates:
        if isinstance(cand, dict):  # a bundle's architecture: {"name": "efficientnet3d", ...}
            cand = cand.get("name")
        if isinstance(cand, str) and re.search(r"[A-Za-z0-9]", cand):
            return cellprofiler_name(cand)
    return "Deep"


def _layer_of_scores(profiles: xr.Dataset, layer: str | None) -> str | None:
    if "gradcamo" not in profiles:
        return None
    if "layer" not in profiles["gradcamo"].dims:  # one layer, stored without the dim
        return str(profiles["gradcamo"].attrs.get("layer", layer or ""))
    layers = [str(v) for v in profiles["layer"].values] if "layer" in profiles.coords else []
    if layer is None:
        return layers[0] if layers else None
    if str(layer) not in layers:
        raise InputError(f"layer {layer!r} has no Grad-CAMO scores; scored layers: {layers}")
    return str(layer)


def _scores(profiles: xr.Dataset, name: str, layer: str | None) -> np.ndarray:
    arr = profiles[name]
    if "layer" in arr.dims:
        arr = arr.sel(layer=layer)
    return np.asarray(arr.values, dtype=np.float64)


def cellprofiler_table(
    profiles: xr.Dataset,
    *,
    model_name: str | None = None,
    layer: str | None = None,
    cutoff: float = DEFAULT_CUTOFF,
    compartment: str = "Cells",
    deep: bool = True,
    classic: bool = True,
) -> pd.DataFrame:
    """The profiles as one CellProfiler-style row per cell (see the module notes).

    Parameters
    ----------
    profiles : xarray.Dataset
        Profiles as written by the pipeline; lazy variables are
        computed.
    model_name : str, optional
        ``<Model>`` in deep feature names (default: from the provenance, else "Deep").
    layer : str, optional
        Layer whose Grad-CAMO is ``Metadata_GradCAMO`` (default: the first scored layer).
    cutoff : float
        Grad-CAMO cut-off of the QC flag (paper: 0.25).
    compartment : str
        Feature prefix (CellProfiler's object name), ``"Cells"``.
    deep, classic : bool
        Include deep / classic features (when present).

    Returns
    -------
    pandas.DataFrame
    """
    if not isinstance(profiles, xr.Dataset) or "cell" not in profiles.dims:
        raise InputError("profiles must be an xarray.Dataset with a 'cell' dim")
    n = profiles.sizes["cell"]
    columns = _metadata_columns(profiles, compartment)
    columns.update(_gradcamo_columns(profiles, layer, cutoff))
    columns.update(_model_output_columns(profiles))
    blocks = [pd.DataFrame(columns, index=pd.RangeIndex(n))]
    if classic and "classic" in profiles:
        arr = profiles["classic"]
        names = [f"{compartment}_{nm}" for nm in str_values(arr[arr.dims[1]].values)]
        blocks.append(pd.DataFrame(np.asarray(arr.values, dtype=np.float32), columns=names))
    if deep and "deep" in profiles:
        blocks.append(_deep_block(profiles["deep"], model_name or model_name_of(profiles), compartment))
    table = pd.concat(blocks, axis=1)
    if table.columns.duplicated().any():
        dup = table.columns[table.columns.duplicated()].tolist()
        raise InputError(f"feature names collide in the export: {dup[:5]}; rename the layers or pass model_name=")
    return table


def _metadata_columns(profiles: xr.Dataset, compartment: str) -> dict[str, Any]:
    """The cell keys, every other per-cell coord as ``Metadata_<coord>`` and the cell centres
    (voxels) as ``<compartment>_Location_Center_X/Y/Z``, one array per column."""
    missing = [c for c in KEY_COLUMNS if c not in profiles.coords]
    if missing:
        raise InputError(f"the profiles lack the cell-key coords {missing}; a profiles dataset carries plate, well, "
                         f"site and object_number on 'cell'")
    columns: dict[str, Any] = {}
    for coord, name in KEY_COLUMNS.items():
        values = np.asarray(profiles[coord].values)
        columns[name] = str_values(values) if coord in ("plate", "well") else values.astype(np.int64)
    # the 'cell' index itself (a row number, as score_plate sets it) is not a cell-table column
    flat = int(read_provenance(profiles).get("spatial_dims", 3)) == 2  # a 2D plate: no z, as CellProfiler 2D
    z_columns = ("center_z", "bbox_z0", "bbox_z1") if flat else ()
    cell_coords = [c for c, v in profiles.coords.items() if v.dims == ("cell",) and c not in KEY_COLUMNS
                   and c not in ("cell", "center_x", "center_y", "center_z", *z_columns)]
    # one order whatever order the store lists its coords in: the cell table's, then by name
    rank = {c: i for i, c in enumerate(GEOMETRY_COLUMNS)}
    cell_coords.sort(key=lambda c: (rank.get(c, len(rank)), c))
    for coord in cell_coords:
        values = np.asarray(profiles[coord].values)
        columns[f"Metadata_{coord}"] = str_values(values) if values.dtype.kind in "OUST" else values
    for axis in ("X", "Y") if flat else ("X", "Y", "Z"):
        coord = f"center_{axis.lower()}"
        if coord in profiles.coords:
            columns[f"{compartment}_Location_Center_{axis}"] = np.asarray(profiles[coord].values, dtype=np.float64)
    return columns


def _gradcamo_columns(profiles: xr.Dataset, layer: str | None, cutoff: float) -> dict[str, Any]:
    """``Metadata_GradCAMO`` (score in [0, 1] or NaN) of the reported layer, its two sums, its layer
    name, one score per layer when there are several, and the two ``Metadata_cqc_*`` QC flags
    (score below ``cutoff``; undefined); empty when the profiles hold no scores."""
    scored = _layer_of_scores(profiles, layer)
    if scored is None:
        return {}
    score = _scores(profiles, "gradcamo", scored)
    columns: dict[str, Any] = {"Metadata_GradCAMO": score}
    if "cam_inside" in profiles:
        columns["Metadata_GradCAMO_CAMInside"] = _scores(profiles, "cam_inside", scored)
    if "cam_total" in profiles:
        columns["Metadata_GradCAMO_CAMTotal"] = _scores(profiles, "cam_total", scored)
    columns["Metadata_GradCAMO_Layer"] = np.full(profiles.sizes["cell"], scored)
    layers = [str(v) for v in profiles["layer"].values] if "layer" in profiles["gradcamo"].dims else []
    if len(layers) > 1:
        for other in layers:
            columns[f"Metadata_GradCAMO_{cellprofiler_name(other)}"] = _scores(profiles, "gradcamo", other)
    undefined = np.isnan(score)
    columns[QC_BELOW] = ~undefined & (np.where(undefined, np.inf, score) < cutoff)
    columns[QC_UNDEFINED] = undefined
    return columns


def _model_output_columns(profiles: xr.Dataset) -> dict[str, Any]:
    """The predicted class name as ``Metadata_Predicted`` and each class's logit as
    ``Metadata_Logit_<class>``, when the profiles hold them."""
    columns: dict[str, Any] = {}
    if "predicted" in profiles and "class" in profiles.coords:
        classes = str_values(profiles["class"].values)
        predicted = np.asarray(profiles["predicted"].values).astype(np.int64)
        columns["Metadata_Predicted"] = classes[predicted] if profiles.sizes["cell"] else np.array([], dtype=str)
    if "logits" in profiles and "class" in profiles.coords:
        logits = np.asarray(profiles["logits"].values, dtype=np.float32)
        for j, cls in enumerate(str_values(profiles["class"].values)):
            columns[f"Metadata_Logit_{cls}"] = logits[:, j]
    return columns


def _deep_block(arr: xr.DataArray, model: str, compartment: str) -> pd.DataFrame:
    dim = arr.dims[1]
    model = cellprofiler_name(model)
    if "feature_layer" in arr.coords and "feature_index" in arr.coords:
        layers = str_values(arr["feature_layer"].values)
        index = np.asarray(arr["feature_index"].values).astype(np.int64)
    else:  # features named "<layer>_<i>"
        names = str_values(arr[dim].values)
        split = [nm.rsplit("_", 1) for nm in names]
        layers = np.array([s[0] if len(s) == 2 else "features" for s in split])
        index = np.array([int(s[1]) if len(s) == 2 and s[1].isdigit() else i for i, s in enumerate(split)])
    safe = {layer: cellprofiler_name(layer) for layer in dict.fromkeys(layers)}
    clash = [s for s in set(safe.values()) if list(safe.values()).count(s) > 1]
    if clash:
        raise InputError(f"layers {[k for k, v in safe.items() if v in clash]} give the same CellProfiler name "
                         f"{clash}; deep feature columns would collide")
    names = [f"{compartment}_{model}_{safe[layer]}_{i}" for layer, i in zip(layers, index)]
    return pd.DataFrame(np.asarray(arr.values, dtype=np.float32), columns=names)


def _paths(path: str | Path, formats: Sequence[str]) -> dict[str, Path]:
    path = Path(path)
    stem = path.with_suffix("") if path.suffix.lower() in (".parquet", ".csv") else path
    return {fmt: stem.with_name(stem.name + f".{fmt}") for fmt in formats}


def to_cellprofiler_table(
    profiles: xr.Dataset,
    path: str | Path,
    *,
    formats: Sequence[str] = ("parquet", "csv"),
    **options: Any,
) -> dict[str, Path]:
    """Write the per-object table as Parquet and CSV (CellProfiler naming).

    Parameters
    ----------
    profiles : xarray.Dataset
        Profiles.
    path : str or Path
        Output path; ``cells.parquet``, ``cells.csv`` or ``cells`` all write
        ``cells.parquet`` and ``cells.csv`` beside each other.
    formats : sequence of "parquet", "csv"
        Which files to write.
    **options
        Passed to :func:`cellprofiler_table` (``model_name``, ``layer``, ``cutoff``, ...).

    Returns
    -------
    dict
        ``{"parquet": Path, "csv": Path}`` of the files written. The Parquet file's
        schema metadata key ``gradcamo_dask`` holds the provenance and the export
        options (JSON).
    """
    unknown = [f for f in formats if f not in ("parquet", "csv")]
    if unknown or not formats:
        raise InputError(f"formats must be among 'parquet' and 'csv', got {list(formats)}")
    table = cellprofiler_table(profiles, **options)
    paths = _paths(path, formats)
    next(iter(paths.values())).parent.mkdir(parents=True, exist_ok=True)
    meta = {"provenance": read_provenance(profiles), "export": {
        "cutoff": options.get("cutoff", DEFAULT_CUTOFF), "layer": table["Metadata_GradCAMO_Layer"].iloc[0]
        if "Metadata_GradCAMO_Layer" in table and len(table) else options.get("layer"),
        "qc_columns": [c for c in (QC_BELOW, QC_UNDEFINED) if c in table]}}
    if "parquet" in paths:
        import pyarrow as pa
        import pyarrow.parquet as pq

        arrow = pa.Table.from_pandas(table, preserve_index=False)
        schema_meta = dict(arrow.schema.metadata or {})
        schema_meta[b"gradcamo_dask"] = json.dumps(meta, default=str).encode()
        tmp = paths["parquet"].with_name(paths["parquet"].name + ".partial")
        pq.write_table(arrow.replace_schema_metadata(schema_meta), tmp)
        tmp.replace(paths["parquet"])  # never a half-written file under the final name
    if "csv" in paths:
        tmp = paths["csv"].with_name(paths["csv"].name + ".partial")
        table.to_csv(tmp, index=False)
        tmp.replace(paths["csv"])
    return paths
