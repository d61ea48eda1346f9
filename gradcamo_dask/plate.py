"""Plates as lazy labeled arrays: open and write plates, read platemaps.

A plate is an ``xarray.DataArray`` named ``"image"`` with dims
``(well, site, c, z, y, x)``, backed by a Dask array with one chunk per site (the unit
of work). Coords: ``well`` ("B02"), ``row`` ("B") and ``column`` (2) on ``well``,
``site`` (the field index, 0-based), ``c`` (channel names). Attrs: ``plate`` (name)
and ``spacing_zyx_um`` (voxel size, µm). A platemap adds ``treatment``, ``dose``,
``is_control`` and any extra columns as coords on ``well``. Labels are the same
without ``c``, named ``"labels"``, int32.

Supported layouts (see the README's "Plates" section):

* **OME-Zarr HCS** plates, NGFF 0.4 (Zarr v2) and 0.5 (Zarr v3), read and written by
  :mod:`gradcamo_dask.ngff`; also a single OME-Zarr image (one well, one site).
* **Plain Zarr**: a group with an array ``image`` of dims ``(well, site, c, z, y, x)``
  (or ``(site, c, z, y, x)``, or ``(c, z, y, x)``), an optional integer array ``labels``
  without the ``c`` dim, and optional group attributes ``plate`` (str), ``wells``
  (list of names), ``channels`` (list of names) and ``spacing_zyx_um`` (3 floats).
* **TIFF stacks**: one file (one well "A01", one site), a folder of files named like
  ``B02_s0.tif`` / ``B02_s0_labels.tif``, or a ``{(well, site): path}`` mapping;
  axes from the file's metadata or the ``axes`` argument (e.g. ``"ZCYX"``).

Opening reads metadata only: every site is one Dask task that reads its own
chunks when computed.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph

from gradcamo_dask.errors import LabelsError, MetadataError, PlateLayoutError

PathLike = str | Path
PLATEMAP_FILE = "platemap.csv"
_WELL_RE = re.compile(r"^\s*([A-Za-z]{1,2})\s*0*(\d{1,3})\s*$")
_TIFF_NAME_RE = re.compile(r"^(?P<well>[A-Za-z]{1,2}\d{1,3})_s(?P<site>\d+)(?P<labels>_labels)?\.tiff?$", re.I)
_CONTROL_NAMES = {"control", "dmso", "negcon", "neg_control", "vehicle", "untreated", "mock"}
_ALIASES = {
    "well": ("well", "Metadata_Well", "well_position", "Metadata_well_position"),
    "treatment": ("treatment", "Metadata_Treatment", "compound", "Metadata_Compound"),
    "dose": ("dose", "Metadata_Dose", "concentration", "Metadata_Concentration", "dose_um"),
    "is_control": ("is_control", "Metadata_IsControl", "control"),
}


# --------------------------------------------------------------------------- wells


def well_name(row: str, column: int | str) -> str:
    """Canonical well name: row letters plus a two-digit column, e.g. ``("B", 2) -> "B02"``."""
    return f"{str(row).upper()}{int(column):02d}"


def split_well(name: str) -> tuple[str, int]:
    """``"B02"`` (or ``"b2"``) -> ``("B", 2)``; raises ValueError for anything else."""
    match = _WELL_RE.match(str(name))
    if match is None:
        raise ValueError(f"{name!r} is not a well name like 'B02'")
    return match.group(1).upper(), int(match.group(2))


def normalize_well(name: str) -> str:
    """``"b2"``, ``"B2"``, ``"B002"`` -> ``"B02"``."""
    return well_name(*split_well(name))


def _row_order(row: str) -> tuple[int, str]:
    return (len(row), row)  # A..Z before AA..AF, as on a 1536-well plate


def plate_order(wells: Sequence[str]) -> list[str]:
    """Wells sorted row by row, then by column number (plate reading order)."""
    return sorted(wells, key=lambda w: (_row_order(split_well(w)[0]), split_well(w)[1]))


# ------------------------------------------------------------------- lazy arrays


def lazy_sites(
    read: Any,
    sources: Mapping[tuple[int, int], tuple],
    n_wells: int,
    n_sites: int,
    site_shape: tuple[int, ...],
    dtype: Any,
    name: str,
) -> da.Array:
    """A ``(well, site, *site_shape)`` Dask array with one task per site.

    ``read(*sources[(w, s)])`` must return the site as an array of shape
    ``(1, 1, *site_shape)``. Sites without a source are zeros (a missing field).
    """
    dtype = np.dtype(dtype)
    zeros_index = (0,) * len(site_shape)
    dsk: dict = {}
    for w in range(n_wells):
        for s in range(n_sites):
            src = sources.get((w, s))
            key = (name, w, s, *zeros_index)
            dsk[key] = (read, *src) if src is not None else (np.zeros, (1, 1, *site_shape), dtype)
    chunks = ((1,) * n_wells, (1,) * n_sites, *((n,) for n in site_shape))
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=())
    meta = np.empty((0,) * (2 + len(site_shape)), dtype=dtype)
    return da.Array(graph, name, chunks=chunks, dtype=dtype, meta=meta)


def plate_dataarray(
    data: Any,
    *,
    wells: Sequence[str],
    sites: Sequence[int] | None = None,
    channels: Sequence[str] | None = None,
    plate: str = "plate",
    spacing_zyx_um: Sequence[float] = (1.0, 1.0, 1.0),
    attrs: Mapping[str, Any] | None = None,
) -> xr.DataArray:
    """Wrap a ``(well, site, c, z, y, x)`` array (or ``(well, site, z, y, x)`` labels when
    ``channels`` is None) in a DataArray with the package's coords and attrs."""
    wells = [normalize_well(w) for w in wells]
    labels = channels is None
    dims = ("well", "site", "z", "y", "x") if labels else ("well", "site", "c", "z", "y", "x")
    if not isinstance(data, da.Array):
        data = da.asarray(data)
    if data.ndim != len(dims):
        raise PlateLayoutError(f'plate "{plate}": expected an array with dims {dims}, got shape {data.shape}')
    sites = list(range(data.shape[1])) if sites is None else [int(s) for s in sites]
    rows, columns = zip(*(split_well(w) for w in wells)) if wells else ((), ())
    coords: dict[str, Any] = {
        "well": ("well", list(wells)),
        "row": ("well", list(rows)),
        "column": ("well", np.asarray(columns, dtype=np.int64)),
        "site": ("site", np.asarray(sites, dtype=np.int64)),
    }
    if not labels:
        coords["c"] = ("c", [str(c) for c in channels])
    out_attrs = {"plate": str(plate), "spacing_zyx_um": [float(v) for v in spacing_zyx_um]}
    out_attrs.update(attrs or {})
    return xr.DataArray(data, dims=dims, coords=coords, name="labels" if labels else "image", attrs=out_attrs)


# ----------------------------------------------------------------------- platemap


def _find_column(frame: pd.DataFrame, field: str) -> str | None:
    lower = {str(c).lower(): c for c in frame.columns}
    for alias in _ALIASES[field]:
        if alias.lower() in lower:
            return lower[alias.lower()]
    return None


def _as_bool(values: pd.Series, source: str, column: str) -> np.ndarray:
    table = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False, "t": True, "f": False}
    out = []
    for v in values:
        key = str(v).strip().lower()
        if isinstance(v, (bool, np.bool_)):
            out.append(bool(v))
        elif key in table:
            out.append(table[key])
        else:
            raise MetadataError(f"platemap {source}: column {column!r} holds {v!r}; use true/false (or 1/0)")
    return np.asarray(out, dtype=bool)


def validate_platemap(frame: pd.DataFrame, source: str = "<DataFrame>") -> pd.DataFrame:
    """Check and normalise a platemap table: one row per well with ``well, treatment, dose,
    is_control`` (+ extras).

    Column aliases from CellProfiler/pycytominer naming are accepted (``Metadata_Well``,
    ``Metadata_Treatment``, ``concentration`` ...). ``dose`` defaults to NaN, and a
    missing ``is_control`` is inferred: dose 0 or a treatment named like a control
    (control, DMSO, negcon, vehicle, untreated, mock).
    """
    frame = frame.copy()
    found = {field: _find_column(frame, field) for field in _ALIASES}
    for field in ("well", "treatment"):
        if found[field] is None:
            raise MetadataError(
                f"platemap {source}: no {field!r} column (columns: {list(frame.columns)}); "
                f"a platemap needs at least 'well' and 'treatment'"
            )
    out = pd.DataFrame(index=frame.index)
    try:
        out["well"] = [normalize_well(w) for w in frame[found["well"]]]
    except ValueError as err:
        raise MetadataError(f"platemap {source}: column {found['well']!r}: {err}") from None
    out["treatment"] = frame[found["treatment"]].astype(str).to_numpy()
    if found["dose"] is not None:
        try:
            out["dose"] = pd.to_numeric(frame[found["dose"]]).astype(float).to_numpy()
        except (ValueError, TypeError) as err:
            raise MetadataError(f"platemap {source}: column {found['dose']!r} is not numeric ({err})") from None
    else:
        out["dose"] = np.nan
    if found["is_control"] is not None:
        out["is_control"] = _as_bool(frame[found["is_control"]], source, found["is_control"])
    else:
        named = out["treatment"].str.lower().isin(_CONTROL_NAMES)
        out["is_control"] = (named | (out["dose"] == 0)).to_numpy(bool)
    for column in frame.columns:
        if column not in found.values() and column not in out.columns:
            out[column] = frame[column].to_numpy()
    duplicated = out["well"][out["well"].duplicated()].unique().tolist()
    if duplicated:
        raise MetadataError(f"platemap {source}: wells {duplicated} appear more than once; one row per well")
    return out.reset_index(drop=True)


def read_platemap(path: PathLike) -> pd.DataFrame:
    """Read a platemap (CSV, TSV or Parquet): one row per well.

    Parameters
    ----------
    path : str or Path
        ``.csv``, ``.tsv``/``.txt`` (tab-separated) or ``.parquet`` file with at least
        the columns ``well`` and ``treatment``; ``dose`` (µM) and ``is_control`` are
        optional, any other column is kept.

    Returns
    -------
    pandas.DataFrame
        Columns ``well`` ("B02"), ``treatment`` (str), ``dose`` (float),
        ``is_control`` (bool), then the extra columns.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"platemap {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        frame = pd.read_parquet(path)
    else:
        frame = pd.read_csv(path, sep="\t" if suffix in (".tsv", ".txt") else ",")
    return validate_platemap(frame, str(path))


def attach_platemap(image: xr.DataArray, platemap: pd.DataFrame | PathLike) -> xr.DataArray:
    """Add the platemap's columns as coords on ``well`` (``treatment``, ``dose``, ...).

    Every well of the plate needs a platemap row (wells only in the platemap are
    ignored). Columns that clash with existing coords (``row``, ``column``, ``site``,
    ``c``) or with ``plate`` are not copied.
    """
    if not isinstance(platemap, pd.DataFrame):
        platemap = read_platemap(platemap)
    elif not {"well", "treatment", "dose", "is_control"} <= set(platemap.columns):
        platemap = validate_platemap(platemap)
    table = platemap.assign(well=[normalize_well(w) for w in platemap["well"]]).set_index("well")
    wells = [str(w) for w in image["well"].values]
    missing = [w for w in wells if w not in table.index]
    if missing:
        raise PlateLayoutError(
            f'plate "{image.attrs.get("plate", "?")}": wells {missing} have no row in the platemap; '
            f"add them to the platemap or select the mapped wells with image.sel(well=[...])"
        )
    rows = table.loc[wells]
    skip = set(image.dims) | {"row", "column", "plate"}
    coords = {col: ("well", rows[col].to_numpy()) for col in rows.columns if col not in skip}
    return image.assign_coords(coords)


def platemap_of(image: xr.DataArray) -> pd.DataFrame | None:
    """The platemap carried as coords on ``well`` (None when there is none)."""
    if "treatment" not in image.coords:
        return None
    names = [n for n, c in image.coords.items() if c.dims == ("well",) and n not in ("row", "column")]
    return pd.DataFrame({n: image.coords[n].values for n in ["well", *[m for m in names if m != "well"]]})


# ----------------------------------------------------------------- shape checks


def select_channels(image: xr.DataArray, channels: Sequence[str]) -> xr.DataArray:
    """The plate restricted to ``channels``, in that order; a clear error for missing ones.

    Raises
    ------
    PlateLayoutError
        When a requested channel is not in the plate; names plate, well and site.
    """
    have = [str(c) for c in image["c"].values]
    missing = [c for c in channels if c not in have]
    if missing:
        well = str(image["well"].values[0]) if image.sizes["well"] else "?"
        site = int(image["site"].values[0]) if image.sizes["site"] else 0
        raise PlateLayoutError(
            f'plate "{image.attrs.get("plate", "?")}", well "{well}", site {site}: has {len(have)} channels '
            f"({', '.join(have)}), {len(channels)} are expected ({', '.join(channels)}); missing: "
            f"{', '.join(missing)}. Rename channels with open_plate(..., channels=[...]) if only the names differ."
        )
    return image.sel(c=list(channels))


def check_labels(image: xr.DataArray, labels: xr.DataArray) -> None:
    """Raise LabelsError unless ``labels`` fits ``image``: integer dtype, same wells and
    sites, same ``(z, y, x)`` shape. The message names plate, well and site."""
    plate = image.attrs.get("plate", labels.attrs.get("plate", "?"))
    well0 = str(labels["well"].values[0]) if labels.sizes.get("well") else "?"
    site0 = int(labels["site"].values[0]) if labels.sizes.get("site") else 0
    if not np.issubdtype(labels.dtype, np.integer):
        raise LabelsError(
            f'plate "{plate}", well "{well0}", site {site0}: labels have dtype {labels.dtype}; labels must be '
            f"integers (0 = background). Cast whole-number labels with labels.astype('int32')."
        )
    for dim in ("well", "site"):
        a, b = list(image[dim].values), list(labels[dim].values)
        if a != b:
            extra = [v for v in a if v not in b] or [v for v in b if v not in a] or a[:3]
            raise LabelsError(
                f'plate "{plate}": labels and image differ in {dim} (first difference around {extra[:3]}); '
                f"select the same wells and sites in both (labels.sel({dim}=image.{dim}))"
            )
    img_zyx = tuple(image.sizes[d] for d in ("z", "y", "x"))
    lab_zyx = tuple(labels.sizes[d] for d in ("z", "y", "x"))
    if img_zyx != lab_zyx:
        raise LabelsError(
            f'plate "{plate}", well "{well0}", site {site0}: labels have shape (z, y, x) = {lab_zyx}, the image '
            f"{img_zyx}; labels must be computed on the same grid as the image"
        )


# ------------------------------------------------------------------------- TIFF


def _tiff_axes(path: Path, axes: str | None) -> tuple[tuple[int, ...], np.dtype, str, tuple[float, float, float] | None]:
    """Shape, dtype, axes and (if recorded) spacing of a TIFF file, from its header only."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        shape, dtype, found = tuple(series.shape), np.dtype(series.dtype), series.axes.upper()
        spacing = None
        if tif.is_imagej and tif.imagej_metadata:
            meta = tif.imagej_metadata
            res = tif.pages[0].tags.get("XResolution")
            if res is not None and res.value[0]:
                xy = res.value[1] / res.value[0]
                spacing = (float(meta.get("spacing", 1.0)), xy, xy)
    if axes is None:
        axes = found
        if any(a not in "TCZYXS" for a in axes) or len(set(axes)) != len(axes):
            axes = "TZCYX"[-len(shape):] if len(shape) <= 5 else None
            if axes is None:
                raise MetadataError(f"TIFF {path}: cannot tell the axes of shape {shape}; pass axes='ZCYX' or similar")
            warnings.warn(f"TIFF {path} records no usable axes ({found}); assuming {axes} (ImageJ order). "
                          f"Pass axes=... if that is wrong.", stacklevel=3)
    axes = axes.upper().replace("S", "C")
    if len(axes) != len(shape) or len(set(axes)) != len(axes) or any(a not in "TCZYX" for a in axes):
        raise MetadataError(f"TIFF {path}: axes {axes!r} do not fit its shape {shape}")
    return shape, dtype, axes, spacing


def _to_czyx(data: np.ndarray, axes: str, with_c: bool = True) -> np.ndarray:
    """Reorder an array with the given axes to ``(c, z, y, x)`` (or ``(z, y, x)``); time point 0."""
    if "T" in axes:
        data = np.take(data, 0, axis=axes.index("T"))
        axes = axes.replace("T", "")
    for a in "CZ":
        if a not in axes:
            data, axes = data[None], a + axes
    data = np.transpose(data, [axes.index(a) for a in "CZYX"])
    if not with_c:
        if data.shape[0] != 1:
            raise LabelsError(f"label TIFF has {data.shape[0]} channels; labels must have one")
        data = data[0]
    return data


def _czyx_shape(shape: Sequence[int], axes: str) -> tuple[int, int, int, int]:
    """The ``(c, z, y, x)`` shape :func:`_to_czyx` makes of ``shape`` (from metadata, no data)."""
    sizes = dict(zip(axes.upper(), shape))
    return tuple(int(sizes.get(a, 1)) for a in "CZYX")


def _read_tiff(path: str, axes: str, with_c: bool) -> np.ndarray:
    import tifffile

    return _to_czyx(tifffile.imread(path), axes, with_c)[None, None]


def _tiff_sources(path: PathLike | Mapping, labels: bool) -> dict[tuple[str, int], Path]:
    if isinstance(path, Mapping):
        return {(normalize_well(w), int(s)): Path(p) for (w, s), p in path.items()}
    path = Path(path)
    if path.is_file():
        return {("A01", 0): path}
    found = {}
    for f in sorted(path.iterdir()):
        m = _TIFF_NAME_RE.match(f.name)
        if m and bool(m.group("labels")) == labels:
            found[(normalize_well(m.group("well")), int(m.group("site")))] = f
    if not found:
        kind = "label" if labels else "image"
        raise PlateLayoutError(f"folder {path} holds no {kind} TIFFs named like 'B02_s0{'_labels' if labels else ''}.tif'")
    return found


def open_tiff(
    path: PathLike | Mapping,
    *,
    axes: str | None = None,
    labels: bool = False,
    plate: str | None = None,
) -> xr.DataArray:
    """Open TIFF stacks as a plate (or labels when ``labels=True``); see the module docstring."""
    files = _tiff_sources(path, labels)
    wells = plate_order(sorted({w for w, _ in files}))
    sites = sorted({s for _, s in files})
    plate = plate or (Path(path).stem if not isinstance(path, Mapping) else "plate")
    first = None
    sources: dict = {}
    for (w, s), f in files.items():
        shape, dtype, ax, spacing = _tiff_axes(f, axes)
        probe = _czyx_shape(shape, ax)
        site_shape = probe if not labels else probe[1:]
        if first is None:
            first = (site_shape, dtype, spacing, f)
        elif (site_shape, dtype) != first[:2]:
            raise PlateLayoutError(
                f'plate "{plate}", well "{w}", site {s}: {f} has shape {site_shape} {dtype}, but {first[3]} has '
                f"{first[0]} {first[1]}; every site must have the same shape and dtype"
            )
        sources[(wells.index(w), sites.index(s))] = (str(f), ax, not labels)
    site_shape, dtype, spacing, _ = first
    name = f"tiff-{'labels' if labels else 'image'}-{tokenize(sorted(map(str, files.values())), axes)}"
    data = lazy_sites(_read_tiff, sources, len(wells), len(sites), site_shape, dtype, name)
    channels = None if labels else [f"channel_{i}" for i in range(site_shape[0])]
    return plate_dataarray(data, wells=wells, sites=sites, channels=channels, plate=plate,
                           spacing_zyx_um=spacing or (1.0, 1.0, 1.0),
                           attrs={"spacing_recorded": spacing is not None})


# ------------------------------------------------------------------- plain Zarr


def _open_plain(group: Any, where: str, array_name: str, plate: str | None) -> xr.DataArray:
    """The plain-Zarr layout: arrays ``image``/``labels`` plus optional group attributes."""
    labels = array_name == "labels"
    arr = group[array_name]
    attrs = dict(group.attrs)
    full = 5 if labels else 6
    lead = full - arr.ndim
    if lead not in (0, 1, 2):
        dims = "(well, site, z, y, x)" if labels else "(well, site, c, z, y, x)"
        raise MetadataError(f"{where}/{array_name}: the plain-Zarr layout expects dims {dims} (leading well and "
                            f"site optional), got shape {arr.shape}")
    site_ndim = full - 2
    chunks = (1,) * (arr.ndim - site_ndim) + tuple(arr.shape[arr.ndim - site_ndim:])
    name = f"plain-{array_name}-{tokenize(where, arr.shape, str(arr.dtype))}"
    data = da.from_array(arr, chunks=chunks, lock=False, meta=np.empty((0,) * arr.ndim, dtype=arr.dtype), name=name)
    if lead:
        data = data[(None,) * lead]
    wells = attrs.get("wells") or [well_name("A", i + 1) for i in range(data.shape[0])]
    if len(wells) != data.shape[0]:
        raise MetadataError(f"{where}: attribute 'wells' lists {len(wells)} wells, array '{array_name}' has "
                            f"{data.shape[0]}")
    channels = None
    if not labels:
        channels = attrs.get("channels") or [f"channel_{i}" for i in range(data.shape[2])]
        if len(channels) != data.shape[2]:
            raise MetadataError(f"{where}: attribute 'channels' lists {len(channels)} names, array 'image' has "
                                f"{data.shape[2]} channels")
    spacing = attrs.get("spacing_zyx_um", (1.0, 1.0, 1.0))
    if not isinstance(spacing, (list, tuple)) or len(spacing) != 3:
        raise MetadataError(f"{where}: attribute 'spacing_zyx_um' must hold 3 numbers (z, y, x in µm), got {spacing}")
    name = plate or attrs.get("plate") or Path(where.rstrip("/")).stem
    return plate_dataarray(data, wells=wells, channels=channels, plate=name, spacing_zyx_um=spacing)


# -------------------------------------------------------------------- dispatch


def _is_tiff(path: Any) -> bool:
    if isinstance(path, Mapping):
        return True
    if isinstance(path, (str, Path)):
        p = Path(path)
        if p.suffix.lower() in (".tif", ".tiff"):
            return True
        return p.is_dir() and not any((p / m).exists() for m in ("zarr.json", ".zgroup", ".zarray"))
    return False


def _open_zarr_group(path: Any) -> tuple[Any, str]:
    import zarr

    if isinstance(path, zarr.Group):
        return path, str(path.store)
    where = str(path)
    try:
        group = zarr.open_group(path, mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as err:
        raise FileNotFoundError(f"{where}: no Zarr group here ({err})") from None
    return group, where


def _plate_dir(path: Any) -> Path | None:
    return Path(path) if isinstance(path, (str, Path)) and Path(path).is_dir() else None


def open_plate(
    path: Any,
    platemap: pd.DataFrame | PathLike | None = None,
    *,
    channels: Sequence[str] | None = None,
    spacing_zyx_um: Sequence[float] | None = None,
    axes: str | None = None,
    plate: str | None = None,
) -> xr.DataArray:
    """Open a plate lazily as a ``(well, site, c, z, y, x)`` DataArray; reads metadata only.

    Parameters
    ----------
    path : str, Path, zarr store or group, or {(well, site): tiff path}
        An OME-Zarr HCS plate (NGFF 0.4 or 0.5) or image, a plain-Zarr plate, a TIFF
        file or a folder of TIFFs (see the module docstring).
    platemap : DataFrame or path, optional
        Adds ``treatment``, ``dose``, ``is_control`` and extra columns as coords on
        ``well``. When None and the plate folder holds ``platemap.csv`` (as written by
        :func:`write_plate`), that file is used; pass ``False`` to skip it.
    channels : list of str, optional
        Channel names. If the plate records names, the plate is restricted to these
        channels in this order (a missing one is an error); if it records none, these
        name the channels (their number must match).
    spacing_zyx_um : 3 floats, optional
        Voxel size (µm) overriding what the metadata say (TIFFs often record none).
    axes : str, optional
        Axis order of TIFF files, e.g. ``"ZCYX"``.
    plate : str, optional
        Plate name (default: from the metadata, else the file or folder name).

    Returns
    -------
    xarray.DataArray
        Named ``"image"``, Dask-backed, one chunk per site.
    """
    if _is_tiff(path):
        image = open_tiff(path, axes=axes, plate=plate)
    else:
        from gradcamo_dask import ngff

        group, where = _open_zarr_group(path)
        if ngff.is_ngff(group):
            image = ngff.open_hcs(group, where, plate=plate)
        elif "image" in group:
            image = _open_plain(group, where, "image", plate)
        else:
            raise PlateLayoutError(
                f"{where}: neither an OME-Zarr plate or image (no 'plate'/'multiscales' metadata in its "
                f"attributes) nor a plain-Zarr plate (no 'image' array). If this store was being written, "
                f"the write did not finish: write it again."
            )
    if spacing_zyx_um is not None:
        if len(spacing_zyx_um) != 3:
            raise ValueError(f"spacing_zyx_um must be 3 numbers (z, y, x in µm), got {spacing_zyx_um}")
        image.attrs["spacing_zyx_um"] = [float(v) for v in spacing_zyx_um]
    if channels is not None:
        image = _apply_channel_names(image, list(channels))
    if platemap is None and (d := _plate_dir(path)) is not None and (d / PLATEMAP_FILE).is_file():
        platemap = d / PLATEMAP_FILE
    if platemap is not None and platemap is not False:
        image = attach_platemap(image, platemap)
    return image


def _apply_channel_names(image: xr.DataArray, channels: list[str]) -> xr.DataArray:
    have = [str(c) for c in image["c"].values]
    generic = all(re.fullmatch(r"channel_\d+", c) for c in have)
    if generic and len(channels) == len(have):
        return image.assign_coords(c=channels)
    return select_channels(image, channels)


def open_labels(
    path: Any,
    name: str | None = None,
    *,
    like: xr.DataArray | None = None,
    axes: str | None = None,
) -> xr.DataArray:
    """Open labels lazily as a ``(well, site, z, y, x)`` int DataArray.

    Parameters
    ----------
    path : str, Path, zarr store or group, or {(well, site): tiff path}
        An OME-Zarr plate whose fields hold NGFF ``labels/`` groups, a separate
        OME-Zarr plate whose fields are label images, a plain-Zarr plate with a
        ``labels`` array, or label TIFFs (``B02_s0_labels.tif`` in a folder, a single
        file, or a mapping).
    name : str, optional
        Which NGFF label image (``labels/<name>``); default the first one listed.
    like : DataArray, optional
        The plate image; the labels are checked against it (wells, sites, shape).
    axes : str, optional
        Axis order of TIFF files, e.g. ``"ZYX"``.
    """
    if _is_tiff(path):
        labels = open_tiff(path, axes=axes, labels=True)
    else:
        from gradcamo_dask import ngff

        group, where = _open_zarr_group(path)
        if ngff.is_ngff(group):
            labels = ngff.open_hcs_labels(group, where, name=name)
        elif "labels" in group:
            labels = _open_plain(group, where, "labels", None)
        else:
            raise LabelsError(f"{where}: no labels found (no NGFF plate with labels, no plain-Zarr 'labels' array)")
    if not np.issubdtype(labels.dtype, np.integer):
        raise LabelsError(f'plate "{labels.attrs.get("plate")}": labels at {path} have dtype {labels.dtype}; labels must '
                          f"be integers (0 = background)")
    if like is not None:
        labels.attrs["plate"] = like.attrs.get("plate", labels.attrs["plate"])
        check_labels(like, labels)
    return labels


def write_plate(
    path: PathLike,
    image: xr.DataArray,
    labels: xr.DataArray | None = None,
    *,
    platemap: pd.DataFrame | None = None,
    label_name: str = "cells",
    overwrite: bool = False,
    compute: bool = True,
    progress: bool = False,
) -> Any:
    """Write an OME-Zarr 0.5 HCS plate (Zarr v3), with labels and ``platemap.csv``.

    One Dask task per site; the plate-level metadata are written last, so an
    interrupted or failed write never looks like a complete plate.

    Parameters
    ----------
    path : str or Path
        The ``.zarr`` folder to create.
    image : DataArray
        ``(well, site, c, z, y, x)``, as from :func:`open_plate` or
        :func:`~gradcamo_dask.synthetic_plate`.
    labels : DataArray, optional
        ``(well, site, z, y, x)`` integers; written as ``labels/<label_name>`` of each field.
    platemap : DataFrame, optional
        Written as ``platemap.csv`` inside the plate folder; default: the platemap
        carried by ``image``'s coords, if any.
    overwrite : bool
        Replace an existing Zarr store at ``path``.
    compute : bool
        If False, return a ``dask.delayed`` object that does the writing.
    progress : bool
        Show a Dask progress bar (local schedulers).
    """
    from gradcamo_dask import ngff

    if labels is not None:
        check_labels(image, labels)
    if platemap is None:
        platemap = platemap_of(image)
    return ngff.write_hcs(path, image, labels, platemap=platemap, label_name=label_name, overwrite=overwrite,
                          compute=compute, progress=progress)


def describe(image: xr.DataArray) -> str:
    """One line about a plate: name, wells, sites, channels, site shape, spacing."""
    return json.dumps({
        "plate": image.attrs.get("plate"), "wells": image.sizes["well"], "sites": image.sizes["site"],
        "channels": [str(c) for c in image["c"].values] if "c" in image.coords else None,
        "zyx": [image.sizes[d] for d in ("z", "y", "x")], "spacing_zyx_um": image.attrs.get("spacing_zyx_um"),
    })
