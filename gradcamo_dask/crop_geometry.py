"""Crop geometry: the shape of a crop on a site and the windows around cell centres, in voxels.

Shared by the cell table and crops (:mod:`gradcamo_dask.cells`) and by plates that know
their cells' geometry without labels (:mod:`gradcamo_dask.io.virtual`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from gradcamo_dask.errors import InputError, PlateLayoutError

__all__ = ["CropSize", "crop_shape", "crop_windows"]

CropSize = Sequence[int | None]


def crop_shape(size: CropSize, site_zyx: Sequence[int], where: str = "site") -> tuple[int, int, int]:
    """The ``(z, y, x)`` crop shape of ``size`` (None = the whole axis) on a site.

    Raises
    ------
    PlateLayoutError
        If a crop depth larger than the site's number of z-slices is requested.
    """
    if len(size) != 3:
        raise InputError(f"crop size must be (z, y, x) with None for 'whole axis', got {size}")
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
    shape = np.asarray(crop_shape(size, site_zyx))
    centers = np.asarray(centers, dtype=float).reshape(-1, 3)
    start = np.floor(centers - shape / 2 + 0.5).astype(np.int64)
    whole = np.array([n is None for n in size])
    start[:, whole] = 0
    return start, start + shape
