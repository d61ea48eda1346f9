"""The plate's array layout: lazy per-site arrays, labeled DataArrays, axis order and label checks.

The primitives every plate reader (:mod:`gradcamo_dask.io.ngff`, :mod:`gradcamo_dask.io.tiff`,
plain Zarr in :mod:`gradcamo_dask.io.plate`) and the synthetic plates build on. A plate
is an ``xarray.DataArray`` with dims ``(well, site, c, z, y, x)`` and one Dask chunk
per site; labels are the same without ``c``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
from dask.highlevelgraph import HighLevelGraph

from gradcamo_dask.errors import LabelsError, PlateLayoutError
from gradcamo_dask.io.platemap import normalize_well, split_well


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


def labels_like(image: xr.DataArray, data: Any) -> xr.DataArray:
    """Wrap ``(well, site, z, y, x)`` label data (NumPy, CuPy or Dask) as the labels of
    ``image``: name ``"labels"``, int32, the image's ``well``/``site`` coords (platemap
    coords included) and attrs. For segmenters that compute labels from a plate."""
    expected = tuple(image.sizes[d] for d in ("well", "site", "z", "y", "x"))
    if tuple(data.shape) != expected:
        raise LabelsError(f'plate "{image.attrs.get("plate", "?")}": label data have shape {tuple(data.shape)}, '
                          f"the plate needs (well, site, z, y, x) = {expected}")
    if not np.issubdtype(data.dtype, np.integer):
        raise LabelsError(f'plate "{image.attrs.get("plate", "?")}": label data have dtype {data.dtype}; labels must '
                          f"be integers (0 = background)")
    coords = {name: coord for name, coord in image.coords.items() if set(coord.dims) <= {"well", "site"}}
    labels = xr.DataArray(data, dims=("well", "site", "z", "y", "x"), coords=coords, name="labels",
                          attrs=dict(image.attrs))
    return labels if labels.dtype == np.int32 else labels.astype(np.int32)


def to_czyx(data: np.ndarray, axes: str, with_c: bool = True) -> np.ndarray:
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


def czyx_shape(shape: Sequence[int], axes: str) -> tuple[int, int, int, int]:
    """The ``(c, z, y, x)`` shape :func:`to_czyx` makes of ``shape`` (from metadata, no data)."""
    sizes = dict(zip(axes.upper(), shape))
    return tuple(int(sizes.get(a, 1)) for a in "CZYX")


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


