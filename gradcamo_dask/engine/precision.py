"""Mixed precision for 3D convolutions: bf16 autocast where it is known to be right.

bf16 ``conv3d`` is slow (about 4x) and gives wrong results with torch 2.9.0 and
with cuDNN 9.8 to 9.10 (``torch.backends.cudnn.version()`` 90800 to 91099). On
those versions a bf16 request on CUDA falls back to float32 with a warning.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import torch

__all__ = ["BAD_CUDNN_RANGES", "BAD_TORCH_VERSIONS", "autocast_context", "bf16_conv3d_problem", "resolve_autocast"]

#: torch releases whose bf16 conv3d on CUDA is known to be wrong.
BAD_TORCH_VERSIONS = ("2.9.0",)
#: cuDNN versions (as ``torch.backends.cudnn.version()``), half-open ranges ``[lo, hi)``.
BAD_CUDNN_RANGES = ((90800, 91100),)


def bf16_conv3d_problem(torch_version: str | None = None, cudnn_version: int | None = None) -> str | None:
    """Why bf16 conv3d cannot be trusted with these versions, or None when it can.

    Parameters
    ----------
    torch_version : str, optional
        Default: ``torch.__version__`` (a local tag such as ``+cu130`` is ignored).
    cudnn_version : int, optional
        Default: ``torch.backends.cudnn.version()`` (None without cuDNN).
    """
    version = str(torch_version if torch_version is not None else torch.__version__).split("+")[0]
    if version in BAD_TORCH_VERSIONS:
        return f"torch {version} computes bf16 conv3d wrongly on CUDA"
    if cudnn_version is None:
        try:
            cudnn_version = torch.backends.cudnn.version()
        except Exception:  # noqa: BLE001 - no cuDNN in this build
            cudnn_version = None
    if cudnn_version is not None:
        for lo, hi in BAD_CUDNN_RANGES:
            if lo <= int(cudnn_version) < hi:
                return f"cuDNN {int(cudnn_version)} (9.8 to 9.10) computes bf16 conv3d slowly and wrongly"
    return None


def resolve_autocast(device: torch.device, autocast: Any) -> Any:
    """The autocast dtype to use (or False): default bf16 on CUDA, float32 on CPU.

    A bf16 request on CUDA with a known-bad torch or cuDNN becomes False (float32)
    with a ``RuntimeWarning`` that names the versions.
    """
    if autocast is None:
        autocast = torch.bfloat16 if device.type == "cuda" else False
    if autocast is False:
        return False
    dtype = torch.bfloat16 if autocast is True else autocast
    if device.type == "cuda" and dtype == torch.bfloat16:
        problem = bf16_conv3d_problem()
        if problem:
            warnings.warn(f"{problem}: running in float32 instead; upgrade torch (not 2.9.0) or cuDNN "
                          f"(not 9.8 to 9.10) for bf16", RuntimeWarning, stacklevel=3)
            return False
    return dtype


def autocast_context(device: torch.device, autocast: Any) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for :func:`resolve_autocast`'s choice, or a null context for float32."""
    dtype = resolve_autocast(device, autocast)
    if dtype is False:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
