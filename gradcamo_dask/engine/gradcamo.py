"""Grad-CAMO scores (paper Eq. 5): full-resolution and exact low-resolution routes.

``score = sum(G * M) / sum(G)`` where ``G`` is the Grad-CAM map upsampled
trilinearly to the crop grid and ``M`` the binary mask of the central cell. The
score is NaN (never 0) where ``sum(G) == 0``; the two sums are returned beside it.
Maps are never min-max normalised.

Trilinear upsampling (``align_corners=False``) is linear and separable:
``G = (Uz ⊗ Uy ⊗ Ux) G~`` with one small 1D interpolation matrix per axis. Hence
``sum(G * M) = <G~, Uzᵀ Uyᵀ Uxᵀ M>`` and ``sum(G) = <G~, (Uzᵀ1) ⊗ (Uyᵀ1) ⊗ (Uxᵀ1)>``:
:func:`gradcamo_lowres` contracts the mask down to the CAM grid and never builds
the full-resolution map. Functions take NumPy, CuPy or torch arrays and compute in
the array's own namespace and device.

2D (bilinear) maps and masks, ``(N, y, x)`` and ``(N, Y, X)``, are scored by the
same contraction with one fewer axis: a z axis of one voxel is added, whose 1 -> 1
interpolation matrix is the identity, so bilinear upsampling is trilinear
upsampling of that one-slice volume, exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np

from gradcamo_dask.arrays import array_namespace
from gradcamo_dask.errors import InputError

#: Grad-CAMO at or above which a profile counts as on target (the paper's cut-off).
DEFAULT_CUTOFF = 0.25

__all__ = [
    "DEFAULT_CUTOFF",
    "gradcamo_ceiling",
    "gradcamo_lowres",
    "gradcamo_score",
    "interpolation_matrix",
    "upsample_cam",
]


@lru_cache(maxsize=256)
def _interpolation_matrix(n_in: int, n_out: int) -> np.ndarray:
    # Hand-written because no library exposes the weights of torch's linear
    # resampling as a matrix. Rule of torch's upsample_linear with
    # align_corners=False and no scale_factor: source coordinate
    # (o + 0.5) * n_in / n_out - 0.5, clamped below at 0; neighbours floor(src)
    # and min(floor(src) + 1, n_in - 1).
    weights = np.zeros((n_out, n_in), dtype=np.float64)
    if n_in == 0 or n_out == 0:
        return weights
    scale = n_in / n_out
    for o in range(n_out):
        src = max((o + 0.5) * scale - 0.5, 0.0)
        i0 = min(int(math.floor(src)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        lam = src - i0
        weights[o, i0] += 1.0 - lam
        weights[o, i1] += lam
    weights.setflags(write=False)
    return weights


def interpolation_matrix(n_in: int, n_out: int) -> np.ndarray:
    """1D linear interpolation weights ``U`` of shape ``(n_out, n_in)``.

    ``U @ v`` equals ``torch.nn.functional.interpolate`` of ``v`` from ``n_in`` to
    ``n_out`` voxels with ``mode="linear"`` (one axis of ``"trilinear"``) and
    ``align_corners=False``. Rows sum to 1. Float64, read-only, cached.
    """
    if n_in < 0 or n_out < 0:
        raise InputError(f"interpolation sizes must be >= 0 voxels, got {n_in} -> {n_out}")
    return _interpolation_matrix(int(n_in), int(n_out))


def _device_of(x: Any) -> Any:
    return getattr(x, "device", None)


#: Interpolation matrices already on a device, by (namespace, device, n_in, n_out, dtype): uploaded once
#: per process, not once per batch and layer (each upload waits for the GPU).
_ON_DEVICE: dict[tuple, Any] = {}


def _matrix(xp: Any, like: Any, n_in: int, n_out: int, dtype: Any = None) -> Any:
    dtype = xp.float64 if dtype is None else dtype
    if xp is np or getattr(xp, "__name__", "").endswith("numpy"):
        return np.asarray(interpolation_matrix(n_in, n_out), dtype=dtype)  # host: cached float64, no copy
    device = _device_of(like)
    key = (xp.__name__, str(device), int(n_in), int(n_out), str(dtype))
    matrix = _ON_DEVICE.get(key)
    if matrix is None:
        u = np.array(interpolation_matrix(n_in, n_out))  # writable copy for torch
        if xp.__name__.endswith("torch") and device is not None:
            import torch

            with torch.inference_mode(False):  # a cached inference tensor would break later autograd use
                matrix = xp.asarray(u, dtype=dtype, device=device)
        else:
            matrix = xp.asarray(u, dtype=dtype)
        _ON_DEVICE[key] = matrix
    return matrix


def _check_cam(cam: Any, name: str = "cam") -> None:
    xp = array_namespace(cam)
    if cam.shape and math.prod(cam.shape) and not bool(xp.all(xp.isfinite(cam))):
        raise InputError(f"{name} contains NaN or inf; Grad-CAM maps must be finite")
    if cam.shape and math.prod(cam.shape) and float(xp.min(cam)) < 0:
        raise InputError(
            f"{name} has negative values (min {float(xp.min(cam)):.3g}); Eq. 5 needs the ReLU'd "
            "Grad-CAM map (do not pass raw weighted activations)"
        )


def _ratio(xp: Any, inside: Any, total: Any) -> Any:
    defined = total > 0
    safe = xp.where(defined, total, xp.ones_like(total))
    return xp.where(defined, inside / safe, xp.full_like(total, float("nan")))


def gradcamo_score(cam: Any, mask: Any, *, spatial_dims: int = 3) -> tuple[Any, Any, Any]:
    """Grad-CAMO of full-resolution maps (Eq. 5).

    Parameters
    ----------
    cam : array (..., Z, Y, X), or (..., Y, X) with ``spatial_dims=2``
        Non-negative Grad-CAM maps at the crop grid (NumPy, CuPy or torch).
    mask : array, same shape
        Binary masks of the central cells.
    spatial_dims : 3 or 2
        Trailing axes summed over (3: z, y, x; 2: y, x).

    Returns
    -------
    score, inside, total : arrays of shape ``(...)``, float64
        ``inside / total``, ``sum(cam * mask)``, ``sum(cam)`` over the last
        ``spatial_dims`` axes; the score is NaN where ``total == 0``.

    Raises
    ------
    InputError
        Shapes differ, fewer than ``spatial_dims`` axes, or the map is negative or not finite.
    """
    xp = array_namespace(cam, mask)
    if spatial_dims not in (2, 3):
        raise InputError(f"spatial_dims must be 2 (y, x) or 3 (z, y, x), got {spatial_dims}")
    if tuple(cam.shape) != tuple(mask.shape) or len(cam.shape) < spatial_dims:
        axes_text = "(..., Z, Y, X)" if spatial_dims == 3 else "(..., Y, X)"
        raise InputError(
            f"cam {tuple(cam.shape)} and mask {tuple(mask.shape)} must have the same shape {axes_text}; "
            "upsample the CAM to the crop grid first or use gradcamo_lowres"
        )
    _check_cam(cam)
    cam64 = xp.astype(cam, xp.float64)
    mask64 = xp.astype(mask != 0, xp.float64)
    axes = tuple(range(-spatial_dims, 0))
    inside = xp.sum(cam64 * mask64, axis=axes)
    total = xp.sum(cam64, axis=axes)
    return _ratio(xp, inside, total), inside, total


def contract_mask(mask: Any, grid: Sequence[int]) -> Any:
    """``Uzᵀ Uyᵀ Uxᵀ M``: masks ``(..., Z, Y, X)`` contracted to a CAM grid ``(z, y, x)``.

    Entry ``[..., i, j, k]`` is the summed weight that the upsampled CAM voxel
    ``(i, j, k)`` puts inside the mask. Float64, same namespace and device. A 2D
    grid ``(y, x)`` contracts 2D masks ``(..., Y, X)`` bilinearly to ``(..., y, x)``.
    """
    xp = array_namespace(mask)
    if len(grid) == 2:  # bilinear: a one-slice volume, whose 1 -> 1 z matrix is the identity
        return contract_mask(xp.expand_dims(mask, axis=-3), (1, *grid))[..., 0, :, :]
    z, y, x = (int(n) for n in grid)
    Z, Y, X = mask.shape[-3:]
    lead = len(mask.shape) - 3
    if mask.dtype == xp.float64:
        m = xp.matmul(mask, _matrix(xp, mask, x, X))  # (..., Z, Y, x)
    else:
        # The full-size step in float32 (half the memory traffic): 0/1 entries times
        # weights in [0, 1], at most X terms per sum, so ~1e-7 relative; then float64.
        m = mask if mask.dtype == xp.bool else mask != 0
        if hasattr(m, "view") and xp.__name__.endswith("torch"):
            m = m.view(xp.uint8)  # torch converts bool to float ~10x slower than uint8 to float
        m = xp.astype(m, xp.float32)
        m = xp.astype(xp.matmul(m, _matrix(xp, m, x, X, xp.float32)), xp.float64)  # (..., Z, Y, x)
    m = xp.permute_dims(m, (*range(lead), lead, lead + 2, lead + 1))  # (..., Z, x, Y)
    m = xp.matmul(m, _matrix(xp, m, y, Y))  # (..., Z, x, y)
    m = xp.permute_dims(m, (*range(lead), lead + 1, lead + 2, lead))  # (..., x, y, Z)
    m = xp.matmul(m, _matrix(xp, m, z, Z))  # (..., x, y, z)
    return xp.permute_dims(m, (*range(lead), lead + 2, lead + 1, lead))  # (..., z, y, x)


def total_weights(grid: Sequence[int], shape: Sequence[int], like: Any) -> Any:
    """``(Uzᵀ1) ⊗ (Uyᵀ1) ⊗ (Uxᵀ1)``: how much each CAM voxel adds to ``sum(G)`` (2D: ``(Uyᵀ1) ⊗ (Uxᵀ1)``)."""
    xp = array_namespace(like)
    if len(grid) == 2:
        return total_weights((1, *grid), (1, *shape), like)[0]
    (z, y, x), (Z, Y, X) = grid, shape
    wz, wy, wx = (xp.sum(_matrix(xp, like, n, N), axis=0) for n, N in ((z, Z), (y, Y), (x, X)))
    return wz[:, None, None] * wy[None, :, None] * wx[None, None, :]


def gradcamo_lowres(cam: Any, mask: Any, *, check: bool = True) -> tuple[Any, Any, Any]:
    """Grad-CAMO from low-resolution maps, exactly, without upsampling them.

    Equals ``gradcamo_score(upsample_cam(cam, mask.shape[-3:]), mask)`` (to
    rounding) at the cost of three small matrix products on the mask.

    Parameters
    ----------
    cam : array (N, z, y, x), or (N, y, x) for 2D maps (bilinear)
        Non-negative Grad-CAM maps at a layer's grid.
    mask : array (N, Z, Y, X), or (N, Y, X) for 2D
        Central-cell masks at the crop grid (bool or 0/1).
    check : bool
        Refuse maps with NaN, inf or negative values (costs two host syncs on a GPU).

    Returns
    -------
    score, inside, total : arrays (N,), float64
        As :func:`gradcamo_score`.
    """
    xp = array_namespace(cam, mask)
    if len(cam.shape) not in (3, 4) or len(mask.shape) != len(cam.shape) or cam.shape[0] != mask.shape[0]:
        raise InputError(
            f"cam {tuple(cam.shape)} must be (N, z, y, x) and mask {tuple(mask.shape)} (N, Z, Y, X) "
            "(2D: (N, y, x) and (N, Y, X)) with the same number of cells N"
        )
    if check:  # two host syncs; callers that made the map themselves (a ReLU of finite values) skip them
        _check_cam(cam)
    cam64 = xp.astype(cam, xp.float64)
    grid = tuple(cam.shape[1:])
    axes = tuple(range(1, len(cam.shape)))
    inside = xp.sum(cam64 * contract_mask(mask, grid), axis=axes)
    total = xp.sum(cam64 * total_weights(grid, tuple(mask.shape[1:]), cam64)[None], axis=axes)
    return _ratio(xp, inside, total), inside, total


def gradcamo_ceiling(mask: Any, grid: Sequence[int]) -> Any:
    """The highest Grad-CAMO any non-negative map on ``grid`` can reach, per cell (float64, ``(N,)``).

    Grad-CAMO is ``<G~, M~> / <G~, T>`` (:func:`gradcamo_lowres`: ``M~`` the mask
    contracted to the grid, ``T`` the total weights), a ratio of two linear forms
    with non-negative coefficients, so over ``G~ >= 0`` it is largest when all the
    map's mass sits on the one grid voxel of largest ``M~ / T``. This is what the
    layer's grid allows for that mask, whatever the model: a reference beside the
    uniform map (whose score is the mask's share of the crop). ``mask (N, Z, Y, X)``
    or ``(N, Y, X)`` with a 2D ``grid``.
    """
    xp = array_namespace(mask)
    grid = tuple(int(n) for n in grid)
    weights = total_weights(grid, tuple(mask.shape[1:]), mask)  # float64 on the mask's device
    ratio = contract_mask(mask, grid) / weights[None]
    return xp.max(xp.reshape(ratio, (ratio.shape[0], -1)), axis=1)


def upsample_cam(cam: Any, shape: Sequence[int]) -> Any:
    """Full-resolution maps ``(..., Z, Y, X)``: ``cam (..., z, y, x)`` upsampled trilinearly.

    The same operator as ``torch.nn.functional.interpolate(mode="trilinear",
    align_corners=False)``; float64. For pictures and checks only: scoring never
    needs it (see :func:`gradcamo_lowres`). A 2D ``shape`` ``(Y, X)`` upsamples
    ``cam (..., y, x)`` bilinearly (``mode="bilinear"``).
    """
    xp = array_namespace(cam)
    if len(shape) == 2:
        return upsample_cam(xp.expand_dims(cam, axis=-3), (1, *shape))[..., 0, :, :]
    z, y, x = cam.shape[-3:]
    Z, Y, X = (int(n) for n in shape)
    lead = len(cam.shape) - 3
    g = xp.astype(cam, xp.float64)
    g = xp.matmul(g, xp.permute_dims(_matrix(xp, g, x, X), (1, 0)))  # (..., z, y, X)
    g = xp.permute_dims(g, (*range(lead), lead, lead + 2, lead + 1))  # (..., z, X, y)
    g = xp.matmul(g, xp.permute_dims(_matrix(xp, g, y, Y), (1, 0)))  # (..., z, X, Y)
    g = xp.permute_dims(g, (*range(lead), lead + 1, lead + 2, lead))  # (..., X, Y, z)
    g = xp.matmul(g, xp.permute_dims(_matrix(xp, g, z, Z), (1, 0)))  # (..., X, Y, Z)
    return xp.permute_dims(g, (*range(lead), lead + 2, lead + 1, lead))
