"""TIFF stacks as plates: one file per site, read lazily (headers at open time).

Layouts: one file (one well "A01", one site), a folder of files named like
``B02_s0.tif`` (labels: ``B02_s0_labels.tif``), or a ``{(well, site): path}`` mapping.
Axes come from the file's metadata (ImageJ hyperstacks, OME-TIFF) or the ``axes``
argument (e.g. ``"ZCYX"``); files that record none are read in ImageJ order
(``TZCYX``) with a warning. Voxel size comes from ImageJ metadata when present.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import xarray as xr
from dask.base import tokenize

from gradcamo_dask.errors import MetadataError, PlateLayoutError
from gradcamo_dask.io.layout import czyx_shape, lazy_sites, plate_dataarray, to_czyx
from gradcamo_dask.io.platemap import PathLike, normalize_well, plate_order

_TIFF_NAME_RE = re.compile(r"^(?P<well>[A-Za-z]{1,2}\d{1,3})_s(?P<site>\d+)(?P<labels>_labels)?\.tiff?$", re.I)


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
            xy = res.value[1] / res.value[0] if res is not None and res.value[0] else 1.0
            # tifffile writes a resolution of 1 to every ImageJ file: it counts only with a unit or a z step
            if "spacing" in meta or str(meta.get("unit", "pixel")).lower() not in ("pixel", "") or xy != 1.0:
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


def _read_tiff(path: str, axes: str, with_c: bool) -> np.ndarray:
    import tifffile

    return to_czyx(tifffile.imread(path), axes, with_c)[None, None]


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
        probe = czyx_shape(shape, ax)
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
