"""Crop intensities for the model: per-crop rescaling and training-set standardisation.

The paper's recipe (``scaling="crop"``): each channel of each crop is rescaled to [0, 1]
(min-max over the crop's voxels), then standardised with the per-channel mean and standard
deviation of rescaled intensities over the training cells.

A per-crop min-max lets one cell's bright phenotype change every voxel of the crops it
appears in: a responder's bright granules set the channel's maximum, so its neighbours'
intensities come out dimmer too, and a model can read the treatment from anywhere in the
crop (the ground-truth benchmark measured this, benchmarks/results/bench_attention_crop.md).
``scaling="plate"`` rescales every crop with one fixed per-channel range fitted on the
training sites (:func:`fit_intensity_range`: ``"low"``/``"high"`` in the normalisation),
so a voxel's value depends on that voxel only. The statistics are plain lists of
floats so that they travel in a model bundle's JSON config. Every function works on
NumPy, CuPy and Dask arrays ``(cell, c, z, y, x)``, or ``(cell, c, y, x)`` for 2D plates
(Dask arrays stay lazy, except in
:func:`fit_normalization`, which computes). Also re-exported by
:mod:`gradcamo_dask.cells`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import dask.array as da
import numpy as np

from gradcamo_dask.arrays import array_module, array_namespace, to_numpy
from gradcamo_dask.errors import InputError


def _module_of(x: Any) -> Any:
    return array_module(getattr(x, "_meta", x))


def _scale_in_place(x: Any, mean: Any = None, std: Any = None, *, rescaled: bool = False, low: Any = None,
                    high: Any = None) -> Any:
    """Rescale (unless ``rescaled``) and standardise the float32 array ``x (cell, c, z, y, x)`` in place;
    ``low``/``high`` (per channel, broadcastable): a fixed range instead of each crop's min-max.

    The same float32 operations in the same order as ``((x - lo) / span - mean) / std``, so
    results are bit-identical to that expression, but with no temporary the size of ``x``:
    two reductions and four in-place passes per micro-batch (array API namespace: NumPy,
    CuPy or torch). Written as in-place operators by hand because neither NumPy nor CuPy
    has a fused "min-max rescale" call, and a fused ``x * a + b`` is not bit-equal.
    """
    xp = array_namespace(x)
    if not rescaled and low is not None:
        x -= low
        x /= high - low
    elif not rescaled:
        flat = xp.reshape(x, (x.shape[0], x.shape[1], math.prod(x.shape[2:])))  # a view: one run per (cell, channel)
        ones = (1,) * (x.ndim - 2)  # 3D (z, y, x) or 2D (y, x) crops
        lo = xp.reshape(xp.min(flat, axis=2), (x.shape[0], x.shape[1], *ones))
        span = xp.reshape(xp.max(flat, axis=2), (x.shape[0], x.shape[1], *ones)) - lo
        span = span + xp.astype(span == 0, span.dtype)  # constant channels: divide by 1 instead of 0
        x -= lo
        x /= span
    if mean is not None:
        x -= mean
        x /= std
    return x


def _as_float32(crops: Any, overwrite: bool) -> Any:
    """``crops`` as float32: a new buffer, or ``crops`` itself when ``overwrite`` and it is float32 already."""
    xp = array_namespace(crops)
    return xp.astype(crops, xp.float32, copy=not overwrite)


def rescale_crops(crops: Any, *, overwrite: bool = False, intensity_range: Mapping[str, Sequence[float]] | None = None
                  ) -> Any:
    """Rescale each channel of each crop to [0, 1] (min-max over z, y, x), float32.

    Works on NumPy, CuPy and Dask arrays ``(cell, c, z, y, x)``; a constant channel
    becomes 0. ``overwrite=True`` writes into float32 ``crops`` (no copy; for crops the
    caller owns, such as a freshly cut micro-batch). ``intensity_range``
    (``{"low": [...], "high": [...]}``, raw intensity units, from :func:`fit_intensity_range`):
    map ``low -> 0`` and ``high -> 1`` in every crop instead (values outside stay outside).
    """
    if crops.ndim not in (4, 5):
        raise InputError(f"crops must be (cell, c, z, y, x) or 2D (cell, c, y, x), got shape {tuple(crops.shape)}")
    low, high = _range_of(intensity_range, crops)
    if isinstance(crops, da.Array):
        return _lazy(crops, None, None, rescaled=False, low=low, high=high)
    x = _as_float32(crops, overwrite)
    return _scale_in_place(x, rescaled=False, **_on_device(x, low=low, high=high))


def _range_of(intensity_range: Mapping[str, Sequence[float]] | None, crops: Any) -> tuple[Any, Any]:
    """``(low, high)`` as float32 ``(1, c, 1, ...)`` NumPy arrays shaped for ``crops``, or ``(None, None)``."""
    if not intensity_range or intensity_range.get("low") is None:
        return None, None
    low, high = (np.asarray(intensity_range.get(k), dtype=np.float32) for k in ("low", "high"))
    if low.shape != high.shape or low.ndim != 1 or len(low) != crops.shape[1] or not np.all(high > low):
        raise InputError(f"the intensity range needs 'low' and 'high' lists with one value per channel "
                         f"({crops.shape[1]}) and high > low, got {dict(intensity_range)}")
    shape = (1, -1, *(1,) * (crops.ndim - 2))
    return low.reshape(shape), high.reshape(shape)


def _on_device(x: Any, **stats: Any) -> dict[str, Any]:
    """``stats`` (NumPy arrays or None) in ``x``'s namespace (CuPy blocks need them on their device)."""
    xp = array_namespace(x)
    return {k: None if v is None else xp.asarray(v) for k, v in stats.items()}


def site_intensity_range(site: Any, quantile: float = 0.999, max_voxels: int = 2**20) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel minimum and ``quantile`` of one raw site ``(c, z, y, x)`` (or ``(c, y, x)``), float64.

    At most ``max_voxels`` voxels per channel are used (an even stride over the site),
    so a 21 x 2160 x 2160 site costs about as much as a small one.
    """
    x = to_numpy(site)
    flat = x.reshape(x.shape[0], -1)
    step = max(1, flat.shape[1] // int(max_voxels))
    sample = flat[:, ::step].astype(np.float64)
    return sample.min(axis=1), np.quantile(sample, quantile, axis=1)


def fit_intensity_range(sites: Any, quantile: float = 0.999) -> dict[str, list[float]]:
    """One fixed intensity range for the whole plate (``scaling="plate"``), from training sites.

    ``sites``: an iterable of raw sites ``(c, z, y, x)``. Each channel's ``low`` is the
    median over sites of the site's minimum and ``high`` the median of its ``quantile``
    (default the 99.9th percentile), raw intensity units: a median, so that neither one
    bright site nor one treatment sets the range. A channel with ``high <= low`` gets
    ``high = low + 1``. Returns ``{"low": [...], "high": [...]}`` (JSON-ready).
    """
    ranges = [site_intensity_range(s, quantile) for s in sites]
    if not ranges:
        raise InputError("fit_intensity_range needs at least one site (the training sites)")
    low, high = (np.median(np.stack(v), axis=0) for v in zip(*ranges, strict=True))
    high = np.where(high > low, high, low + 1.0)
    return {"low": [float(v) for v in low], "high": [float(v) for v in high]}


def _lazy(crops: da.Array, mean: Any, std: Any, *, rescaled: bool, low: Any = None, high: Any = None) -> da.Array:
    """The Dask version: per block when each block holds whole crops, else the plain lazy expression."""
    if all(len(c) == 1 for c in crops.chunks[2:]):  # whole crops per block (extract_crops' layout)
        ones = (1,) * (crops.ndim - 2)
        stats = {k: v for k, v in dict(mean=mean, std=std, low=low, high=high).items() if v is not None}
        names = list(stats)
        args = [da.from_array(np.asarray(v, np.float32).reshape(1, -1, *ones), chunks=(1, crops.chunks[1], *ones))
                for v in stats.values()]
        return da.map_blocks(_block, crops, *args, names=names, rescaled=rescaled, dtype=np.float32,
                             meta=_module_of(crops).empty((0,) * 5, dtype=np.float32))
    x = crops.astype(np.float32)
    if not rescaled and low is not None:
        x = (x - _module_of(crops).asarray(low)) / _module_of(crops).asarray(high - low)
    elif not rescaled:
        space = tuple(range(2, crops.ndim))
        lo = x.min(axis=space, keepdims=True)
        span = x.max(axis=space, keepdims=True) - lo
        x = (x - lo) / (span + (span == 0))
    if mean is None:
        return x
    xp = _module_of(crops)
    m = xp.asarray(mean, dtype=xp.float32).reshape(1, -1, *(1,) * (crops.ndim - 2))
    s = xp.asarray(std, dtype=xp.float32).reshape(1, -1, *(1,) * (crops.ndim - 2))
    return (x - m) / s


def _block(block: Any, *stats: Any, names: Sequence[str] = (), rescaled: bool) -> Any:
    """One Dask block of whole crops (a fresh float32 copy: blocks are never written to); ``stats``
    are the blocks of the statistics named in ``names`` (``mean``, ``std``, ``low``, ``high``)."""
    x = _as_float32(block, False)
    # the statistics' blocks are NumPy; CuPy blocks need them on their device
    return _scale_in_place(x, rescaled=rescaled, **_on_device(x, **dict(zip(names, stats, strict=True))))


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
    axes = (0, *range(2, x.ndim))
    mean = x.mean(axis=axes, dtype=np.float64)
    sq = (x.astype(np.float64) ** 2).mean(axis=axes)
    if isinstance(mean, da.Array):
        mean, sq = da.compute(mean, sq)
    mean, sq = to_numpy(mean).astype(float), to_numpy(sq).astype(float)
    std = np.sqrt(np.maximum(sq - mean**2, 0.0))
    return {"mean": [float(v) for v in mean], "std": [float(v) if v > 0 else 1.0 for v in std]}


def normalize_crops(crops: Any, normalization: Mapping[str, Sequence[float]], *, rescaled: bool = False,
                    overwrite: bool = False) -> Any:
    """The model's input intensities: rescale to [0, 1] per crop and channel, then
    standardise with ``normalization`` (from :func:`fit_normalization` or a bundle).

    Vectorised over the whole micro-batch (no loop over cells), float32 throughout,
    in the crops' own namespace (NumPy, CuPy; Dask stays lazy).

    Parameters
    ----------
    crops : array (cell, c, z, y, x), NumPy, CuPy or Dask
        Raw crops, or already rescaled ones with ``rescaled=True``.
    normalization : mapping
        ``{"mean": [...], "std": [...]}`` with one value per channel; with ``"low"`` and
        ``"high"`` too (``scaling="plate"``), crops are rescaled with that fixed range
        instead of their own min-max.
    overwrite : bool
        Write the result into ``crops`` when they are float32 NumPy/CuPy (no copy of
        the batch; for crops the caller owns). Default: ``crops`` are left as they are.

    Returns
    -------
    array of float32, same kind as ``crops``
    """
    mean, std = normalization.get("mean"), normalization.get("std")
    if mean is None or std is None or len(mean) != len(std):
        raise InputError(f"normalization needs 'mean' and 'std' lists of equal length, got {dict(normalization)}")
    if crops.ndim not in (4, 5) or crops.shape[1] != len(mean):
        raise InputError(f"crops have shape {tuple(crops.shape)} ({crops.shape[1] if crops.ndim in (4, 5) else '?'} "
                         f"channels); the normalization has {len(mean)} channels")
    low, high = _range_of(normalization, crops)
    if isinstance(crops, da.Array):
        return _lazy(crops, mean, std, rescaled=rescaled, low=low, high=high)
    x = _as_float32(crops, overwrite)
    xp = array_namespace(x)
    m = xp.reshape(xp.asarray(mean, dtype=xp.float32), (1, -1, *(1,) * (crops.ndim - 2)))
    s = xp.reshape(xp.asarray(std, dtype=xp.float32), (1, -1, *(1,) * (crops.ndim - 2)))
    return _scale_in_place(x, m, s, rescaled=rescaled, **_on_device(x, low=low, high=high))
