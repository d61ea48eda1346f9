"""Crop geometry: the shape of a crop on a site and the windows around cell centres, in voxels.

Shared by the cell table and crops (:mod:`gradcamo_dask.cells`) and by plates that know
their cells' geometry without labels (:mod:`gradcamo_dask.io.virtual`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from gradcamo_dask.errors import InputError, PlateLayoutError

__all__ = ["FILLS", "CropSize", "background_level", "check_fill", "crop_shape", "crop_windows", "gather_windows",
           "window_fill", "zyx_size"]

CropSize = Sequence[int | None]
#: What may fill a crop window past the site, by name (else one level per channel)
FILLS = ("zero", "background")


def zyx_size(size: CropSize) -> tuple[int | None, ...]:
    """A crop size as ``(z, y, x)``: a 2D size ``(y, x)`` means all z slices, ``(None, y, x)`` (one on a 2D plate)."""
    size = tuple(size)
    return (None, *size) if len(size) == 2 else size


def crop_shape(size: CropSize, site_zyx: Sequence[int], where: str = "site") -> tuple[int, int, int]:
    """The ``(z, y, x)`` crop shape of ``size`` (None = the whole axis) on a site.

    Raises
    ------
    PlateLayoutError
        If a crop depth larger than the site's number of z-slices is requested.
    """
    if len(size) not in (2, 3):
        raise InputError(f"crop size must be (z, y, x) with None for 'whole axis', or (y, x), got {size}")
    size = zyx_size(size)
    out = tuple(int(n) if n is not None else int(full) for n, full in zip(size, site_zyx))
    if any(n < 1 for n in out):
        raise InputError(f"crop size must be positive, got {size}")
    if size[0] is not None and out[0] > site_zyx[0]:
        raise PlateLayoutError(
            f"{where}: has {site_zyx[0]} z-slices, fewer than the requested crop depth {out[0]}; use size=(None, "
            f"{out[1]}, {out[2]}) to keep all slices, or a depth <= {site_zyx[0]}"
        )
    return out  # type: ignore[return-value]


def crop_windows(centers: np.ndarray, size: CropSize, site_zyx: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Half-open crop windows ``(start, stop)``, each ``(n, 3)`` int, voxels, around ``centers``."""
    size = zyx_size(size)
    shape = np.asarray(crop_shape(size, site_zyx))
    centers = np.asarray(centers, dtype=float).reshape(-1, 3)
    start = np.floor(centers - shape / 2 + 0.5).astype(np.int64)
    whole = np.array([n is None for n in size])
    start[:, whole] = 0
    return start, start + shape


def windows_past(centers: np.ndarray, size: CropSize, site_zyx: Sequence[int]) -> bool:
    """Whether any crop window around ``centers`` runs past the site (its fill is then used)."""
    start, stop = crop_windows(centers, size, site_zyx)
    return bool(((start < 0) | (stop > np.asarray(site_zyx))).any())


def background_level(image_site: Any, labels_site: Any, step: int = 4) -> Any:
    """Per-channel median intensity of the voxels the labels call background (label 0), sampled every ``step``
    voxels in y and x: ``(c,)`` float32, in the image's namespace. A site without background voxels gives each
    channel's median over the site."""
    from gradcamo_dask.arrays import array_module

    xp = array_module(image_site)
    sampled = image_site[:, :, ::step, ::step]
    empty = labels_site[:, ::step, ::step] == 0
    if not bool(empty.any()):
        empty = xp.ones_like(empty)
    return xp.stack([xp.median(sampled[c][empty]) for c in range(sampled.shape[0])]).astype(xp.float32)


def check_fill(outside: Any, where: str = "crop") -> None:
    """Refuse a crop fill that is a string other than one of :data:`FILLS`."""
    if isinstance(outside, str) and outside not in FILLS:
        raise InputError(f"{where}: outside must be 'background', 'zero' or a level per channel, got {outside!r}")


def window_fill(outside: Any, image_site: Any, labels_site: Any, past: bool, where: str = "crop") -> Any:
    """The fill of windows past a site for ``outside``: 0, the site's :func:`background_level`
    (computed only when some window is ``past`` the site), or the given level per channel."""
    from gradcamo_dask.arrays import array_module

    check_fill(outside, where)
    if not isinstance(outside, str):
        return array_module(image_site).asarray(outside, dtype=np.float32)
    return background_level(image_site, labels_site) if outside == "background" and past else 0


def gather_windows(volume: Any, start: Any, shape: Sequence[int], fill: Any = 0, dtype: Any = None) -> Any:
    """The windows ``[start, start + shape)`` of ``volume (..., z, y, x)``, all cells at once: ``(n, ..., z, y, x)``.

    ``start`` is ``(n, 3)`` int, voxels (host NumPy); windows may run past the volume
    and are filled with ``fill`` there (a scalar, or one value per leading index, e.g. per
    channel); ``dtype`` (default: the volume's) is the output's. One batched gather in the
    array's own namespace (NumPy or CuPy), no loop over cells: windows inside the volume are read through a
    strided sliding-window view, one gather per channel (never a loop over cells);
    windows that run past the volume (cells flagged ``crop_padded``, near the border)
    are block copies, one per such window. Written by hand because neither NumPy nor CuPy has a "gather boxes"
    call, and ``scipy.ndimage`` / MONAI crop one box per call.
    """
    from gradcamo_dask.arrays import array_module

    xp = array_module(volume)
    start = np.asarray(start, dtype=np.int64).reshape(-1, 3)
    shape = tuple(int(n) for n in shape)
    lead, zyx = tuple(volume.shape[:-3]), np.asarray(volume.shape[-3:], dtype=np.int64)
    n = start.shape[0]
    out = xp.empty((n, *lead, *shape), dtype=volume.dtype if dtype is None else dtype)
    if n == 0:
        return out
    inside = ((start >= 0) & (start + np.asarray(shape) <= zyx)).all(axis=1)
    if inside.any():
        # every window position as a strided view (numpy's sliding_window_view, built with as_strided, which
        # CuPy has in every supported version); never written to
        counts = tuple(int(n) for n in zyx - np.asarray(shape) + 1)
        view = xp.lib.stride_tricks.as_strided(volume, shape=(*lead, *counts, *shape),
                                               strides=(*volume.strides, *volume.strides[-3:]))
        rows = np.flatnonzero(inside)
        z, y, x = (xp.asarray(start[rows, a]) for a in range(3))
        whole = bool(inside.all())
        for lead_index in np.ndindex(*lead):  # channels: a few, never cells; each gather is (k, wz, wy, wx)
            picked = view[(*lead_index, z, y, x)]
            if whole:
                out[(slice(None), *lead_index)] = picked
            else:
                out[(xp.asarray(rows), *lead_index)] = picked
    if not inside.all():
        rows = np.flatnonzero(~inside)
        out[xp.asarray(rows)] = _cut_padded(volume, start[rows], shape, fill, xp, out.dtype)
    return out


def _cut_padded(volume: Any, start: np.ndarray, shape: tuple, fill: Any, xp: Any, dtype: Any) -> Any:
    """Windows that run past ``volume``, ``fill`` outside: ``(k, ..., z, y, x)``.

    One block copy per window, in a loop over these windows only (cells near the border):
    measured 3-4x faster than a per-voxel index gather in NumPy (benchmarks/results/bench_crops_host.md).
    """
    n_lead = volume.ndim - 3
    out = xp.empty((start.shape[0], *volume.shape[:n_lead], *shape), dtype=dtype)
    fill = xp.asarray(fill, dtype=dtype)
    out[...] = fill.reshape((1, *fill.shape, 1, 1, 1)) if fill.ndim else fill
    zyx = np.asarray(volume.shape[n_lead:])
    lo, hi = np.maximum(start, 0), np.minimum(start + np.asarray(shape), zyx)
    for i in np.flatnonzero((hi > lo).all(axis=1)):  # windows wholly outside stay ``fill``
        src = tuple(slice(a, b) for a, b in zip(lo[i], hi[i]))
        dst = tuple(slice(a - s, b - s) for a, b, s in zip(lo[i], hi[i], start[i]))
        out[(int(i), Ellipsis, *dst)] = volume[(Ellipsis, *src)]
    return out
