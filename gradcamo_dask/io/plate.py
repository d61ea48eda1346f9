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
  :mod:`gradcamo_dask.io.ngff`; also a single OME-Zarr image (one well, one site).
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

from gradcamo_dask.errors import LabelsError, MetadataError, PlateLayoutError
from gradcamo_dask.io.layout import check_labels, plate_dataarray, select_channels
from gradcamo_dask.io.platemap import (  # noqa: F401  (re-exported: plate.py is the public home)
    PLATEMAP_FILE,
    PathLike,
    attach_platemap,
    normalize_well,
    plate_order,
    platemap_of,
    open_platemap,
    split_well,
    validate_platemap,
    well_name,
)

# Voxel size (µm, z, y, x) of a plate that records none: z / xy = 1.71, the paper's anisotropy,
# which is also the segmenters' default.
DEFAULT_SPACING_ZYX_UM: tuple[float, float, float] = (1.1115, 0.65, 0.65)

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
    return plate_dataarray(data, wells=wells, channels=channels, plate=name, spacing_zyx_um=spacing,
                           attrs={"spacing_recorded": "spacing_zyx_um" in attrs})


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


def _open_source(path: Any, what: str, *, axes: str | None = None, plate: str | None = None,
                 name: str | None = None) -> xr.DataArray:
    """The plate image (``what="image"``) or labels (``what="labels"``) at ``path`` as found there:
    TIFF files, an OME-Zarr (NGFF) plate or image, or a plain-Zarr plate; no channel names, spacing
    or platemap applied yet. ``name``: the NGFF label image; ``plate``: the plate name (images only)."""
    labels = what == "labels"
    if _is_tiff(path):
        from gradcamo_dask.io.tiff import open_tiff

        return open_tiff(path, axes=axes, labels=True) if labels else open_tiff(path, axes=axes, plate=plate)
    from gradcamo_dask.io import ngff

    group, where = _open_zarr_group(path)
    if ngff.is_ngff(group):
        return ngff.open_hcs_labels(group, where, name=name) if labels else ngff.open_hcs(group, where, plate=plate)
    if what in group:
        return _open_plain(group, where, what, None if labels else plate)
    if labels:
        raise LabelsError(f"{where}: no labels found (no NGFF plate with labels, no plain-Zarr 'labels' array)")
    raise PlateLayoutError(
        f"{where}: neither an OME-Zarr plate or image (no 'plate'/'multiscales' metadata in its "
        f"attributes) nor a plain-Zarr plate (no 'image' array). If this store was being written, "
        f"the write did not finish: write it again."
    )


def _set_spacing(image: xr.DataArray, spacing_zyx_um: Sequence[float] | None, path: Any) -> None:
    """Set ``image.attrs["spacing_zyx_um"]`` (µm) to the given voxel size, or to the default with a
    warning when the plate records none; else leave the recorded one."""
    if spacing_zyx_um is not None:
        if len(spacing_zyx_um) != 3:
            raise ValueError(f"spacing_zyx_um must be 3 numbers (z, y, x in µm), got {spacing_zyx_um}")
        image.attrs["spacing_zyx_um"] = [float(v) for v in spacing_zyx_um]
    elif image.attrs.get("spacing_recorded") is False:
        image.attrs["spacing_zyx_um"] = list(DEFAULT_SPACING_ZYX_UM)
        z, y, x = DEFAULT_SPACING_ZYX_UM
        warnings.warn(f'plate "{image.attrs.get("plate")}" at {path} records no voxel size; using the default '
                      f"{z} x {y} x {x} µm (z, y, x), anisotropy {z / x:.2f} (the paper's). Pass "
                      f"spacing_zyx_um=(z, y, x) to open_plate if the microscope's voxel size differs",
                      UserWarning, stacklevel=3)  # 3: the warning points at open_plate's caller


def _with_platemap(image: xr.DataArray, platemap: Any, path: Any) -> xr.DataArray:
    """``image`` with the platemap given, else the ``platemap.csv`` beside the plate, as coords on
    ``well``; ``platemap=False`` says there is none, None and no file warns that treatments are unknown."""
    if platemap is None and (d := _plate_dir(path)) is not None and (d / PLATEMAP_FILE).is_file():
        platemap = d / PLATEMAP_FILE
    if platemap is not None and platemap is not False:
        return attach_platemap(image, platemap)
    if platemap is None:  # stacklevel 3: the warning points at open_plate's caller
        warnings.warn(f'plate "{image.attrs.get("plate")}" at {path} was opened without a platemap (none given, no '
                      f"{PLATEMAP_FILE} beside it): treatments are unknown, so scoring cannot check them against "
                      f"the model's classes (classes unchecked). Pass platemap=PATH (or platemap=False to say "
                      f"there is none)", UserWarning, stacklevel=3)
    return image


def open_plate(
    path: Any,
    platemap: pd.DataFrame | PathLike | bool | None = None,
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
        :func:`write_plate`), that file is used; when there is none either, a
        warning says that treatments are unknown and the model's classes go
        unchecked. Pass ``False`` to say there is no platemap (no warning).
    channels : list of str, optional
        Channel names. If the plate records names, the plate is restricted to these
        channels in this order (a missing one is an error); if it records none, these
        name the channels (their number must match).
    spacing_zyx_um : 3 floats, optional
        Voxel size (µm) overriding what the metadata say (TIFFs often record none).
        A plate that records none and gets none here uses ``DEFAULT_SPACING_ZYX_UM``
        (1.1115 x 0.65 x 0.65 µm, anisotropy 1.71) with a warning naming it.
    axes : str, optional
        Axis order of TIFF files, e.g. ``"ZCYX"``.
    plate : str, optional
        Plate name (default: from the metadata, else the file or folder name).

    Returns
    -------
    xarray.DataArray
        Named ``"image"``, Dask-backed, one chunk per site.
    """
    image = _open_source(path, "image", axes=axes, plate=plate)
    _set_spacing(image, spacing_zyx_um, path)
    if channels is not None:
        image = _apply_channel_names(image, list(channels))
    image = _with_platemap(image, platemap, path)
    if isinstance(path, (str, Path)):
        image.encoding["source"] = str(path)  # what score records, and whose files identify the input
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
    labels = _open_source(path, "labels", axes=axes, name=name)
    if not np.issubdtype(labels.dtype, np.integer):
        raise LabelsError(f'plate "{labels.attrs.get("plate")}": labels at {path} have dtype {labels.dtype}; labels must '
                          f"be integers (0 = background)")
    if labels.dtype != np.int32:  # the package's label dtype: ids that do not fit are refused, never wrapped
        wells = [str(w) for w in labels["well"].values]
        data = labels.data.map_blocks(_checked_int32, str(path), wells, dtype=np.int32)
        labels = labels.copy(data=data)
    if like is not None:
        labels.attrs["plate"] = like.attrs.get("plate", labels.attrs["plate"])
        check_labels(like, labels)
    if isinstance(path, (str, Path)):
        labels.encoding["source"] = str(path)
    return labels


_INT32 = np.iinfo(np.int32)


def _checked_int32(block: np.ndarray, where: str, wells: list[str], block_info: dict | None = None) -> np.ndarray:
    """Cast one site's labels to int32, refusing ids outside 0..2**31-1 (a cast would merge or negate cells)."""
    if block.size and (block.max() > _INT32.max or block.min() < 0):
        location = (block_info or {}).get(0, {}).get("chunk-location", ())
        site = f'well "{wells[location[0]]}", site {location[1]}' if len(location) >= 2 else "a site"
        bad = block.max() if block.max() > _INT32.max else block.min()
        raise LabelsError(f"{where}: {site} has label id {bad}, outside 0..{_INT32.max} (int32), the range the "
                          "package stores; relabel the cells consecutively (skimage.segmentation.relabel_sequential) "
                          "and write the labels again")
    return block.astype(np.int32)


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
        If False, create the store's groups and arrays now and return a
        ``dask.delayed`` object that writes the data and, last, the plate metadata.
    progress : bool
        Show a Dask progress bar (local schedulers).
    """
    from gradcamo_dask.io import ngff

    if labels is not None:
        check_labels(image, labels)
    if platemap is None:
        platemap = platemap_of(image)
    options = ngff.HcsWriteOptions(label_name=label_name, overwrite=overwrite, compute=compute, progress=progress)
    return ngff.write_hcs(path, image, labels, platemap, options)


def describe_plate(image: xr.DataArray) -> dict:
    """What a plate holds: name, wells, sites, channels, site shape (voxels), spacing (µm), treatments."""
    return {
        "kind": "plate", "plate": image.attrs.get("plate"), "wells": [str(w) for w in image["well"].values],
        "sites": [int(s) for s in image["site"].values],
        "channels": [str(c) for c in image["c"].values] if "c" in image.coords else None,
        "zyx": [int(image.sizes[d]) for d in "zyx"], "spacing_zyx_um": image.attrs.get("spacing_zyx_um"),
        "dtype": str(image.dtype),
        "treatments": sorted({str(t) for t in image["treatment"].values}) if "treatment" in image.coords else [],
    }


LABELS_COMPLETE = "wells"  # the group attribute write_labels writes last


def _finish_labels(_stored: Any, path: str, attrs: dict) -> str:
    import zarr

    zarr.open_group(path, mode="r+").attrs.update(attrs)
    return path


def write_labels(path: PathLike, labels: xr.DataArray, *, compute: bool = True, progress: bool = False) -> Any:
    """Write labels as a plain-Zarr store that ``open_labels(path, like=image)`` reads back.

    An int32 array ``labels`` ``(well, site, z, y, x)``, one chunk per site (at most 2048 x 2048
    in y and x), and the group attributes ``plate``, ``wells``, ``sites``, ``spacing_zyx_um`` and
    ``segmentation`` written after the data, so an interrupted write never opens as labels.

    Parameters
    ----------
    path : str or Path
        The store to create; an existing path is refused (labels are inputs: never written over).
    labels : DataArray (well, site, z, y, x) of int
        Lazy or in memory, e.g. from :func:`~gradcamo_dask.segment_plate`.
    compute : bool
        If False, create the store now and return a ``dask.delayed`` object that writes the
        data and then the attributes (compute it with your scheduler).
    progress : bool
        Show a Dask progress bar (local schedulers).

    Returns
    -------
    str or dask.delayed.Delayed
        The store's path, or the delayed write.
    """
    import os

    import dask
    import zarr

    from gradcamo_dask.errors import OutputStoreError

    path = str(path)
    if tuple(labels.dims) != ("well", "site", "z", "y", "x"):
        raise LabelsError(f"labels must have dims (well, site, z, y, x), got {labels.dims}")
    if os.path.exists(path):
        raise OutputStoreError(f"{path} exists; choose a new path (labels are never written over)")
    n_z, n_y, n_x = (labels.sizes[d] for d in ("z", "y", "x"))
    chunks = (1, 1, n_z, min(n_y, 2048), min(n_x, 2048))
    group = zarr.open_group(path, mode="w-")
    array = group.create_array("labels", shape=labels.shape, chunks=chunks, dtype="int32", fill_value=0)
    data = labels.data if isinstance(labels.data, da.Array) else da.from_array(np.asarray(labels.data))
    stored = da.store(data.astype(np.int32).rechunk(chunks), array, lock=False, compute=False)
    attrs = {"plate": str(labels.attrs.get("plate", "")), "sites": [int(s) for s in labels["site"].values],
             "spacing_zyx_um": [float(v) for v in labels.attrs.get("spacing_zyx_um", (1.0, 1.0, 1.0))],
             "segmentation": labels.attrs.get("segmentation", ""),
             LABELS_COMPLETE: [str(w) for w in labels["well"].values]}
    done = dask.delayed(_finish_labels)(stored, path, attrs)
    if not compute:
        return done
    if progress:
        from dask.diagnostics import ProgressBar

        with ProgressBar():
            return done.compute()
    return done.compute()


def describe_labels(path: PathLike) -> dict | None:
    """What a plain-Zarr labels store holds (wells, sites, shape, whether its write finished);
    None when ``path`` is not one (a plate, a profiles store, ...)."""
    import zarr

    try:
        group = zarr.open_group(str(path), mode="r")
    except (FileNotFoundError, ValueError, TypeError, zarr.errors.GroupNotFoundError):
        return None
    if "labels" not in group or "image" in group or "gradcamo_fingerprint" in group.attrs:
        return None
    attrs = dict(group.attrs)
    shape = list(group["labels"].shape)
    return {"kind": "labels", "plate": attrs.get("plate"), "wells": attrs.get(LABELS_COMPLETE),
            "sites": attrs.get("sites"), "zyx": shape[-3:], "dtype": str(group["labels"].dtype),
            "segmentation": attrs.get("segmentation") or None, "complete": LABELS_COMPLETE in attrs}
