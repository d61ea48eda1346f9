"""Cell tables and single-cell crops with central-cell masks (normalisation re-exported).

The paper's recipe: a crop is ``C x Z x H x W`` (default all z-slices x
128 x 128), centred on the cell at the mean of the minimum and maximum index of its
3D mask; cells that touch the volume's border are flagged and, by default, removed;
the mask ``M`` holds the central cell only (neighbours are in the image crop, not
in ``M``). Crops are rescaled per crop and channel to [0, 1] and standardised with
per-channel statistics fit on training cells: :mod:`gradcamo_dask.normalize`, whose
functions are importable from here too (``cells.normalize_crops`` is the contract).

Where a crop sits: along an axis of crop size ``n``, a cell with centre ``c`` (float,
voxels) gets the window ``[floor(c - n/2 + 0.5), ... + n)``. The centre lands on crop
index ``n/2 - 0.5`` exactly when that is possible (``c`` on a half voxel for even
``n``, on a whole voxel for odd ``n``), otherwise on ``n/2``. Windows past the image
are filled with zeros (or the background level: ``outside``); the cell is flagged ``crop_padded``.

Devices: :func:`crop_site` and :func:`site_cells` work on NumPy or CuPy arrays in
the array's own namespace (:func:`gradcamo_dask.arrays.array_module`); bounding boxes come from
``scipy.ndimage.find_objects`` on the CPU (one C pass) and from a scatter reduction
on the GPU (no host round trip).
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from typing import Any

import dask
import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph

from gradcamo_dask.arrays import array_module, to_numpy
from gradcamo_dask.crop_geometry import (CropSize, background_level, check_fill, crop_shape, crop_windows,  # noqa: F401
                                         gather_windows, window_fill, windows_past, zyx_size)
from gradcamo_dask.errors import InputError, LabelsError, PlateLayoutError
from gradcamo_dask.normalize import fit_normalization, normalize_crops, rescale_crops  # noqa: F401  (contract home)

DEFAULT_SIZE: tuple[int | None, int, int] = (None, 128, 128)
GEOMETRY_COLUMNS = [
    "object_number", "center_z", "center_y", "center_x", "bbox_z0", "bbox_z1", "bbox_y0", "bbox_y1",
    "bbox_x0", "bbox_x1", "volume_voxels", "touches_border", "crop_padded",
]
KEY_COLUMNS = ["plate", "well", "site"]


def _where(plate: Any = None, well: Any = None, site: Any = None) -> str:
    """``plate "P", well "B02", site 0`` for messages (parts that are known)."""
    parts = []
    if plate is not None:
        parts.append(f'plate "{plate}"')
    if well is not None:
        parts.append(f'well "{well}"')
    if site is not None:
        parts.append(f"site {site}")
    return ", ".join(parts) or "site"


# ------------------------------------------------------------------ geometry


def _boxes_scatter(labels: Any, xp: Any) -> tuple[Any, Any, Any]:
    """Bounding boxes by scatter: per axis, which labels occur at which index.

    Works in any NumPy-like namespace (used for CuPy). Returns ``ids`` (n,),
    ``lo``/``hi`` (n, 3) half-open and ``volume`` (n,), for the labels present.
    """
    n = int(labels.max()) if labels.size else 0
    volume = xp.bincount(labels.ravel(), minlength=n + 1)
    ids = xp.flatnonzero(volume[1:]) + 1
    lo, hi = [], []
    for axis in range(3):
        length = labels.shape[axis]
        present = xp.zeros((length, n + 1), dtype=bool)
        index = xp.arange(length).reshape([-1 if a == axis else 1 for a in range(3)])
        present[index, labels] = True
        lo.append(xp.argmax(present, axis=0)[ids])
        hi.append(length - xp.argmax(present[::-1], axis=0)[ids])
    return ids, xp.stack(lo, axis=1), xp.stack(hi, axis=1), volume[ids]


def _boxes(labels: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``ids, lo, hi, volume`` of every label present (NumPy out), one pass each."""
    xp = array_module(labels)
    if xp is not np:
        return tuple(to_numpy(a) for a in _boxes_scatter(labels, xp))  # type: ignore[return-value]
    from scipy import ndimage as ndi

    volume = np.bincount(labels.ravel()) if labels.size else np.zeros(1, np.int64)
    ids = np.flatnonzero(volume[1:]) + 1
    slices = ndi.find_objects(labels)
    lo = np.array([[s.start for s in slices[i - 1]] for i in ids], dtype=np.int64).reshape(-1, 3)
    hi = np.array([[s.stop for s in slices[i - 1]] for i in ids], dtype=np.int64).reshape(-1, 3)
    return ids, lo, hi, volume[ids]


def _check_labels_site(labels: Any, where: str) -> None:
    if labels.ndim != 3:
        raise LabelsError(f"{where}: labels must be 3D (z, y, x), got shape {tuple(labels.shape)}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise LabelsError(f"{where}: labels have dtype {labels.dtype}; labels must be integers (0 = background). "
                          f"Cast whole-number labels with .astype('int32').")
    if labels.size and int(labels.min()) < 0:
        raise LabelsError(f"{where}: labels hold negative values; use 0 for background and 1, 2, ... for cells")


def site_cells(
    labels_site: Any,
    *,
    size: CropSize = DEFAULT_SIZE,
    drop_border: bool = True,
    drop_padded: bool = False,
    border_axes: str = "yx",
    plate: str | None = None,
    well: str | None = None,
    site: int | None = None,
) -> pd.DataFrame:
    """One row per cell of one site (in memory): centre, bounding box, volume, flags.

    Parameters
    ----------
    labels_site : array (z, y, x) of int, NumPy or CuPy
        0 = background, one id per cell.
    size : (int or None, int or None, int or None)
        Crop size ``(z, y, x)`` in voxels, None = the whole axis; decides ``crop_padded``.
    drop_border : bool
        Drop cells whose box touches the site's border along ``border_axes``.
    drop_padded : bool
        Drop cells whose crop runs past the image (instead of keeping them zero-padded).
    border_axes : str
        Axes whose borders count for ``touches_border``: ``"yx"`` (default: stacks of
        adherent cells are taken to contain whole cells in z, and out-of-focus light
        often stretches segmented masks to the first or last slice) or ``"zyx"``.
    plate, well, site : optional
        Added as the first columns (and named in error messages) when given.

    Returns
    -------
    pandas.DataFrame
        Columns ``object_number`` (the label id), ``center_z/y/x`` (float, voxels, mean
        of min and max index), ``bbox_z0, bbox_z1, bbox_y0, bbox_y1, bbox_x0, bbox_x1``
        (int, half-open, voxels), ``volume_voxels`` (int), ``touches_border`` and
        ``crop_padded`` (bool); sorted by ``object_number``. An empty site gives zero rows.
    """
    where = _where(plate, well, site)
    _check_labels_site(labels_site, where)
    if any(a not in "zyx" for a in border_axes):
        raise InputError(f"border_axes must be letters among 'zyx', got {border_axes!r}")
    shape = tuple(int(n) for n in labels_site.shape)
    crop_shape(size, shape, where)
    ids, lo, hi, volume = _boxes(labels_site)
    centers = (lo + hi - 1) / 2.0
    axes = ["zyx".index(a) for a in border_axes]
    touches = ((lo[:, axes] == 0) | (hi[:, axes] == np.asarray(shape)[axes])).any(axis=1)
    start, stop = crop_windows(centers, size, shape)
    padded = ((start < 0) | (stop > np.asarray(shape))).any(axis=1)
    table = pd.DataFrame({
        "object_number": ids.astype(np.int64),
        "center_z": centers[:, 0], "center_y": centers[:, 1], "center_x": centers[:, 2],
        "bbox_z0": lo[:, 0], "bbox_z1": hi[:, 0], "bbox_y0": lo[:, 1], "bbox_y1": hi[:, 1],
        "bbox_x0": lo[:, 2], "bbox_x1": hi[:, 2],
        "volume_voxels": volume.astype(np.int64), "touches_border": touches, "crop_padded": padded,
    })
    keep = np.ones(len(table), dtype=bool)
    if drop_border:
        keep &= ~touches
    if drop_padded:
        keep &= ~padded
    table = table[keep].reset_index(drop=True)
    if site is not None:
        table.insert(0, "site", np.full(len(table), int(site), dtype=np.int64))
    if well is not None:
        table.insert(0, "well", str(well))
    if plate is not None:
        table.insert(0, "plate", str(plate))
    return table


def _site_cells_block(block: np.ndarray, **kwargs: Any) -> pd.DataFrame:
    return site_cells(block[0, 0], **kwargs)


def _per_site(data: da.Array, n_site_dims: int) -> da.Array:
    """Rechunk a ``(well, site, ...)`` array to one chunk per site (no-op when already so)."""
    target = ((1,) * data.shape[0], (1,) * data.shape[1], *((n,) for n in data.shape[2:]))
    return data if data.chunks == target else data.rechunk((1, 1) + (-1,) * n_site_dims)


def _platemap_table(labels: xr.DataArray, platemap: Any) -> pd.DataFrame | None:
    from gradcamo_dask.io.platemap import platemap_of, open_platemap, validate_platemap

    if platemap is None:
        return platemap_of(labels)
    if isinstance(platemap, pd.DataFrame):
        return validate_platemap(platemap)
    return open_platemap(platemap)


def cell_table(
    labels: xr.DataArray,
    platemap: pd.DataFrame | Any = None,
    *,
    size: CropSize = DEFAULT_SIZE,
    drop_border: bool = True,
    drop_padded: bool = False,
    border_axes: str = "yx",
) -> pd.DataFrame:
    """The plate's cell table: one pass over each site's labels (one Dask task per site).

    Parameters
    ----------
    labels : DataArray (well, site, z, y, x) of int
        As from :func:`~gradcamo_dask.open_labels`, a segmenter or a synthetic plate.
    platemap : DataFrame or path, optional
        Adds ``treatment``, ``dose``, ``is_control`` (and extra columns) per well;
        default: the platemap carried by ``labels``' coords, if any.
    size, drop_border, drop_padded, border_axes
        As in :func:`site_cells`.

    Returns
    -------
    pandas.DataFrame
        ``plate, well, site, object_number, center_z/y/x, bbox_*, volume_voxels,
        touches_border, crop_padded, treatment, dose, is_control`` (+ platemap
        extras), sorted by well (plate order), site and object number. Without a
        platemap, ``treatment`` is "" , ``dose`` NaN and ``is_control`` False.
    """
    if tuple(labels.dims) != ("well", "site", "z", "y", "x"):
        raise LabelsError(f"labels must have dims (well, site, z, y, x), got {labels.dims}")
    plate = str(labels.attrs.get("plate", "plate"))
    wells = [str(w) for w in labels["well"].values]
    sites = [int(s) for s in labels["site"].values]
    first = _where(plate, wells[0] if wells else None, sites[0] if sites else None)
    if not np.issubdtype(labels.dtype, np.integer):
        raise LabelsError(f"{first}: labels have dtype {labels.dtype}; labels must be integers (0 = background). "
                          f"Cast whole-number labels with labels.astype('int32').")
    crop_shape(size, tuple(labels.sizes[d] for d in "zyx"), first)
    data = labels.data if isinstance(labels.data, da.Array) else da.asarray(labels.data)
    blocks = _per_site(data, 3).to_delayed()
    tasks = [
        dask.delayed(_site_cells_block)(blocks[w, s, 0, 0, 0], size=tuple(size), drop_border=drop_border,
                                        drop_padded=drop_padded, border_axes=border_axes, plate=plate,
                                        well=wells[w], site=sites[s])
        for w in range(len(wells)) for s in range(len(sites))
    ]
    parts = list(dask.compute(*tasks)) if tasks else []
    empty = site_cells(np.zeros((1, 1, 1), np.int32), size=(None, None, None), plate=plate, well="", site=0)
    nonempty = [p for p in parts if len(p)]
    table = pd.concat(nonempty, ignore_index=True) if nonempty else empty
    pm = _platemap_table(labels, platemap)
    if pm is not None:
        pm = pm.drop(columns=[c for c in ("plate", "site", *GEOMETRY_COLUMNS) if c in pm.columns])
        missing = [w for w in wells if w not in set(pm["well"])]
        if missing:
            raise PlateLayoutError(f'plate "{plate}": wells {missing} have no row in the platemap; add them')
        table = table.merge(pm, on="well", how="left", validate="many_to_one")
    else:
        import warnings

        warnings.warn(f'plate "{plate}": no platemap, so every cell gets an empty treatment; pass platemap= (a '
                      "CSV path or table) or open the plate with open_plate(..., platemap=...)", UserWarning,
                      stacklevel=2)
        table["treatment"], table["dose"], table["is_control"] = "", np.nan, False
    table["is_control"] = table["is_control"].astype(bool)
    order = {w: i for i, w in enumerate(wells)}
    table = table.sort_values(["well", "site", "object_number"], key=lambda c: c.map(order) if c.name == "well" else c,
                              kind="stable").reset_index(drop=True)
    table.attrs["crop_size"] = tuple(size)  # extract_crops crops at the size the border checks used
    return table


# --------------------------------------------------------------------- crops


def _cells_arrays(cells_site: Any) -> tuple[np.ndarray, np.ndarray]:
    ids = np.asarray(cells_site["object_number"], dtype=np.int64).reshape(-1)
    centers = np.stack([np.asarray(cells_site[f"center_{a}"], dtype=float).reshape(-1) for a in "zyx"], axis=1)
    return ids, centers


def crop_site(
    image_site: Any,
    labels_site: Any,
    cells_site: pd.DataFrame | Mapping[str, Any],
    size: CropSize = DEFAULT_SIZE,
    *,
    plate: str | None = None,
    well: str | None = None,
    site: int | None = None,
    outside: Any = "zero",
) -> tuple[Any, Any]:
    """Crops and central-cell masks of one site, on the site's device.

    Parameters
    ----------
    image_site : array (c, z, y, x), NumPy or CuPy
        The site's image (any real dtype).
    labels_site : array (z, y, x) of int, same module as ``image_site``
        The site's labels.
    cells_site : DataFrame or mapping
        ``object_number`` and ``center_z/y/x`` of the cells to crop (e.g. the site's
        rows of :func:`cell_table`).
    size : (int or None, int or None, int or None)
        Crop size ``(z, y, x)``, voxels; None = the whole axis.
    plate, well, site : optional (named in error messages)
    outside : {"zero", "background"} or array (c,)
        Fill past the image: 0 (default; a step Grad-CAM credits, benchmarks/results/diagnose_regions.md),
        the site's background level or that level given (:func:`~gradcamo_dask.crop_geometry.window_fill`).

    Returns
    -------
    crops : array (cell, c, z, y, x) float32
        Raw intensities, filled as ``outside`` says where the window runs past the image. A
        2D site (one z slice) gives 2D crops ``(cell, c, y, x)``.
    masks : array (cell, z, y, x) bool
        The central cell only (neighbours excluded); ``(cell, y, x)`` for a 2D site.
    """
    where = _where(plate, well, site)
    xp = array_module(image_site)
    if image_site.ndim != 4:
        raise InputError(f"{where}: image must be (c, z, y, x), got shape {tuple(image_site.shape)}")
    _check_labels_site(labels_site, where)
    shape = tuple(int(n) for n in image_site.shape[1:])
    if tuple(labels_site.shape) != shape:
        raise LabelsError(f"{where}: labels have shape (z, y, x) = {tuple(labels_site.shape)}, the image {shape}; "
                          f"labels must be computed on the same grid as the image")
    if np.issubdtype(image_site.dtype, np.floating) and not bool(xp.isfinite(image_site).all()):
        raise InputError(f"{where}: the image holds NaN or inf intensities; fix or mask them before cropping")
    ids, centers = _cells_arrays(cells_site)
    dz, dy, dx = crop_shape(size, shape, where)
    n = len(ids)
    start, _stop = crop_windows(centers, size, shape)
    fill = window_fill(outside, image_site, labels_site, windows_past(centers, size, shape), where)
    # one batched gather per array (no loop over cells); ``fill`` where a window runs past the image
    crops = gather_windows(image_site, start, (dz, dy, dx), fill=fill, dtype=xp.float32)
    masks = gather_windows(labels_site, start, (dz, dy, dx)) == xp.asarray(ids).reshape(-1, 1, 1, 1)
    found = to_numpy(masks.reshape(n, -1).any(axis=1)) if n else np.zeros(0, bool)
    if not found.all():
        lost = ids[~found][:10].tolist()
        raise LabelsError(f"{where}: cells {lost} are not in the labels inside their crop window; the cell table "
                          f"does not belong to these labels (recompute it with cell_table)")
    if shape[0] == 1:  # a 2D plate: crops (cell, c, y, x), as 2D models and the 2D Grad-CAMO route take them
        return crops[:, :, 0], masks[:, 0]
    return crops, masks


def plate_spatial_dims(image: xr.DataArray) -> int:
    """2 for a plate (or labels) whose ``z`` has length 1, else 3: what its crops are (cell, c, [z,] y, x)."""
    return 2 if int(image.sizes.get("z", 1)) == 1 else 3


def _crop_block(image_block: Any, labels_block: Any, cells_site: pd.DataFrame, size: tuple, plate: str,
                well: str, site: int, outside: str = "zero") -> tuple[Any, Any]:
    return crop_site(image_block[0, 0], labels_block[0, 0], cells_site, size, plate=plate, well=well, site=site,
                     outside=outside)


def site_runs(cells: pd.DataFrame) -> list[tuple[str, int, int, int]]:
    """``(well, site, first row, stop row)`` of each run of rows of one site; runs must not repeat.

    Vectorised: the runs start where well or site changes (3.5 M rows in well under a second).
    """
    if not len(cells):
        return []
    # well codes, not a str per row: the few runs' names alone would keep the rows' strs' memory (client RSS)
    wells, names = pd.factorize(cells["well"].astype(str), use_na_sentinel=False)
    sites = cells["site"].astype(np.int64).to_numpy()
    change = np.flatnonzero((wells[1:] != wells[:-1]) | (sites[1:] != sites[:-1])) + 1
    starts = np.concatenate([[0], change])
    stops = np.concatenate([change, [len(cells)]])
    runs = [(str(names[wells[a]]), int(sites[a]), int(a), int(b)) for a, b in zip(starts, stops)]
    if len({(w, s) for w, s, _, _ in runs}) < len(runs):
        seen: set = set()
        for w, s, _, _ in runs:
            if (w, s) in seen:
                raise InputError(f'cells of well "{w}" site {s} are not contiguous in the cell table; sort it by '
                                 f"(well, site) first (cell_table returns it so)")
            seen.add((w, s))
    return runs


def site_rows(ids: np.ndarray, centers: np.ndarray) -> pd.DataFrame:
    """A site's cell rows for a task: ``object_number`` (int64) and ``center_z/y/x`` (float, voxels)."""
    return pd.DataFrame({"object_number": np.asarray(ids, dtype=np.int64), "center_z": centers[:, 0],
                         "center_y": centers[:, 1], "center_x": centers[:, 2]})


def site_graph(image: xr.DataArray, labels: xr.DataArray, cells: pd.DataFrame, func: Any, name: str,
               args_of: Any = lambda well, site: ()) -> tuple[HighLevelGraph, list[int]]:
    """One Dask task per site with cells: ``func(image_block, labels_block, rows, *args_of(well, site))``.

    The per-site graph that crops and scoring share. ``image`` is ``(well, site, c, z,
    y, x)`` and ``labels`` ``(well, site, z, y, x)``; each task gets that site's blocks
    (shapes ``(1, 1, ...)``) and its cell-table rows (``object_number, center_z,
    center_y, center_x``). Cells must be contiguous per site (:func:`site_runs`).

    Returns
    -------
    graph : HighLevelGraph
        Tasks ``(name, k)`` for the k-th run of sites in cell-table order.
    counts : list of int
        Cells in each task, in the same order.
    """
    plate = str(image.attrs.get("plate", "plate"))
    wells = {str(w): i for i, w in enumerate(image["well"].values)}
    sites = {int(s): i for i, s in enumerate(image["site"].values)}
    img = _per_site(image.data if isinstance(image.data, da.Array) else da.asarray(image.data), 4)
    lab = _per_site(labels.data if isinstance(labels.data, da.Array) else da.asarray(labels.data), 3)
    # the graph holds per-site views of two plate-wide arrays; each task builds its rows' table on the worker
    ids, centers = _cells_arrays(cells)
    dsk, counts = {}, []
    for k, (w, s, i, j) in enumerate(site_runs(cells)):
        if w not in wells or s not in sites:
            raise PlateLayoutError(f"{_where(plate, w, s)}: in the cell table but not in the image")
        dsk[(name, k)] = (func, (img.name, wells[w], sites[s], 0, 0, 0, 0), (lab.name, wells[w], sites[s], 0, 0, 0),
                          (site_rows, ids[i:j], centers[i:j]), *args_of(w, s))
        counts.append(j - i)
    return HighLevelGraph.from_collections(name, dsk, dependencies=[img, lab]), counts


def extract_crops(
    image: xr.DataArray,
    labels: xr.DataArray,
    cells: pd.DataFrame,
    size: CropSize | None = None,
    outside: str = "zero",
) -> tuple[da.Array, da.Array]:
    """Lazy crops and central masks of every cell of the table, one Dask task per site.

    Parameters
    ----------
    image : DataArray (well, site, c, z, y, x)
        The plate.
    labels : DataArray (well, site, z, y, x) of int
        Its labels (same wells, sites and grid).
    cells : DataFrame
        Rows with ``well, site, object_number, center_z/y/x``; the rows of one site
        must be contiguous (as :func:`cell_table` returns them). The output follows
        the table's row order.
    size : (int or None, int or None, int or None), optional
        Crop size ``(z, y, x)``, voxels; None in z = all z-slices (the paper's default).
        Default: the size :func:`cell_table` built the table with, else (None, 128, 128);
        a different size than the table's is refused.
    outside : {"zero", "background"}
        What fills windows past the site (:func:`crop_site`; a bundle's ``crop_fill``).

    Returns
    -------
    crops : dask.array (cell, c, z, y, x) float32, chunked per site along ``cell``
        (``(cell, c, y, x)`` on a 2D plate, whose ``z`` has length 1)
    masks : dask.array (cell, z, y, x) bool, chunked the same way (``(cell, y, x)`` in 2D)
    """
    from gradcamo_dask.io.layout import check_labels

    if tuple(image.dims) != ("well", "site", "c", "z", "y", "x"):
        raise InputError(f"image must have dims (well, site, c, z, y, x), got {image.dims}")
    check_labels(image, labels)
    check_fill(outside, "extract_crops")
    built = cells.attrs.get("crop_size")
    if size is None:
        size = built if built is not None else DEFAULT_SIZE
    elif built is not None and zyx_size(size) != zyx_size(built):
        raise InputError(f"crop size {tuple(size)} differs from the {tuple(built)} the cell table was built with "
                         "(its border checks used that size); pass the same size or rebuild the table")
    plate = str(image.attrs.get("plate", "plate"))
    wells = {str(w): i for i, w in enumerate(image["well"].values)}
    sites = {int(s): i for i, s in enumerate(image["site"].values)}
    zyx = tuple(image.sizes[d] for d in "zyx")
    first = _where(plate, next(iter(wells), None), next(iter(sites), None))
    dz, dy, dx = crop_shape(size, zyx, first)
    n_c = image.sizes["c"]
    missing = [c for c in ("well", "site", "object_number", "center_z", "center_y", "center_x") if c not in cells]
    if missing:
        raise InputError(f"the cell table lacks columns {missing}; make it with cell_table()")
    meta_mod = array_module(image.data._meta if isinstance(image.data, da.Array) else image.data)
    grid = (dz, dy, dx) if zyx[0] != 1 else (dy, dx)  # a 2D plate's crops have no z axis (crop_site)
    if not len(cells):
        return (da.zeros((0, n_c, *grid), dtype=np.float32, chunks=-1),
                da.zeros((0, *grid), dtype=bool, chunks=-1))
    token = tokenize(image.data.name if isinstance(image.data, da.Array) else image.data,
                     labels.data.name if isinstance(labels.data, da.Array) else labels.data,
                     cells[["well", "site", "object_number", "center_z", "center_y", "center_x"]].to_numpy().tolist(),
                     tuple(size), outside)
    pair, crops_name, masks_name = f"crop-site-{token}", f"crops-{token}", f"masks-{token}"
    base, counts = site_graph(image, labels, cells, _crop_block, pair, lambda w, s: (tuple(size), plate, w, s, outside))
    zeros = (0,) * len(grid)
    crops_dsk = {(crops_name, k, 0, *zeros): (operator.getitem, (pair, k), 0) for k in range(len(counts))}
    masks_dsk = {(masks_name, k, *zeros): (operator.getitem, (pair, k), 1) for k in range(len(counts))}
    outputs = []
    for name, dsk, tail, dtype in ((crops_name, crops_dsk, (n_c, *grid), np.float32),
                                   (masks_name, masks_dsk, grid, bool)):
        graph = HighLevelGraph({**base.layers, name: dsk}, {**base.dependencies, name: {pair}})
        meta = meta_mod.empty((0,) * (1 + len(tail)), dtype=dtype)
        outputs.append(da.Array(graph, name, chunks=(tuple(counts), *((n,) for n in tail)), dtype=dtype, meta=meta))
    return outputs[0], outputs[1]
