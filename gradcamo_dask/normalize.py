"""Crop intensities for the model: per-crop rescaling and training-set standardisation.

The paper's recipe: each channel of each crop is rescaled to [0, 1] (min-max over the crop's
voxels), then standardised with the per-channel mean and standard deviation of
rescaled intensities over the training cells. The statistics are plain lists of
floats so that they travel in a model bundle's JSON config. Every function works on
NumPy, CuPy and Dask arrays ``(cell, c, z, y, x)`` (Dask arrays stay lazy, except in
:func:`fit_normalization`, which computes). Also re-exported by
:mod:`gradcamo_dask.cells`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import dask.array as da
import numpy as np

from gradcamo_dask.arrays import array_module, to_numpy
from gradcamo_dask.errors import InputError


def _module_of(x: Any) -> Any:
    return array_module(getattr(x, "_meta", x))


def rescale_crops(crops: Any) -> Any:
    """Rescale each channel of each crop to [0, 1] (min-max over z, y, x), float32.

    Works on NumPy, CuPy and Dask arrays ``(cell, c, z, y, x)``; a constant channel
    becomes 0.
    """
    if crops.ndim != 5:
        raise InputError(f"crops must be (cell, c, z, y, x), got shape {tuple(crops.shape)}")
    x = crops.astype(np.float32)
    lo = x.min(axis=(2, 3, 4), keepdims=True)
    span = x.max(axis=(2, 3, 4), keepdims=True) - lo
    span = span + (span == 0)  # constant channels: divide by 1 instead of 0
    return (x - lo) / span


def fit_normalization(crops: Any, *, rescaled: bool = False) -> dict[str, list[float]]:
    """Per-channel mean and standard deviation of rescaled crops (fit on training cells).

    Parameters
    ----------
    crops : array (cell, c, z, y, x), NumPy, CuPy or Dask
        Raw crops (rescaled here first), or already rescaled ones with ``rescaled=True``.

    Returns
    -------
    dict
        ``{"mean": [float, ...], "std": [float, ...]}``, one value per channel, plain
        Python floats (JSON-ready for a model bundle). A zero std is stored as 1.0.
    """
    x = crops if rescaled else rescale_crops(crops)
    if x.shape[0] == 0:
        raise InputError("fit_normalization needs at least one crop (the training cells)")
    mean = x.mean(axis=(0, 2, 3, 4), dtype=np.float64)
    sq = (x.astype(np.float64) ** 2).mean(axis=(0, 2, 3, 4))
    if isinstance(mean, da.Array):
        mean, sq = da.compute(mean, sq)
    mean, sq = to_numpy(mean).astype(float), to_numpy(sq).astype(float)
    std = np.sqrt(np.maximum(sq - mean**2, 0.0))
    return {"mean": [float(v) for v in mean], "std": [float(v) if v > 0 else 1.0 for v in std]}


def normalize_crops(crops: Any, normalization: Mapping[str, Sequence[float]], *, rescaled: bool = False) -> Any:
    """The model's input intensities: rescale to [0, 1] per crop and channel, then
    standardise with ``normalization`` (from :func:`fit_normalization` or a bundle).

    Parameters
    ----------
    crops : array (cell, c, z, y, x), NumPy, CuPy or Dask
        Raw crops, or already rescaled ones with ``rescaled=True``.
    normalization : mapping
        ``{"mean": [...], "std": [...]}`` with one value per channel.

    Returns
    -------
    array of float32, same kind as ``crops``
    """
    mean, std = normalization.get("mean"), normalization.get("std")
    if mean is None or std is None or len(mean) != len(std):
        raise InputError(f"normalization needs 'mean' and 'std' lists of equal length, got {dict(normalization)}")
    if crops.ndim != 5 or crops.shape[1] != len(mean):
        raise InputError(f"crops have shape {tuple(crops.shape)} ({crops.shape[1] if crops.ndim == 5 else '?'} "
                         f"channels); the normalization has {len(mean)} channels")
    xp = _module_of(crops)
    m = xp.asarray(mean, dtype=xp.float32).reshape(1, -1, 1, 1, 1)
    s = xp.asarray(std, dtype=xp.float32).reshape(1, -1, 1, 1, 1)
    x = crops.astype(np.float32) if rescaled else rescale_crops(crops)
    return (x - m) / s
