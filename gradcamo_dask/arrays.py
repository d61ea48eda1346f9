"""Array namespaces and device transfer: one code path for NumPy, CuPy and torch.

Functions in this package take NumPy or CuPy arrays and work in the array's own
namespace. CuPy is optional: nothing here imports it unless a CuPy array is
handed in. Transfers between CuPy and torch go through DLPack (zero copy, on the
device); only ``to_numpy`` moves data to host memory.
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Any

import numpy as np
from array_api_compat import array_namespace as _compat_namespace


def is_cupy_array(x: Any) -> bool:
    """True for a ``cupy.ndarray`` (checked without importing CuPy)."""
    cupy = sys.modules.get("cupy")
    return cupy is not None and isinstance(x, cupy.ndarray)


def is_torch_tensor(x: Any) -> bool:
    """True for a ``torch.Tensor`` (checked without importing torch)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def array_module(x: Any) -> ModuleType:
    """The NumPy-like module of ``x``: ``numpy`` or ``cupy``.

    Use this for code that needs NumPy-only functions (``np.add.at``, ``bincount``)
    that the array API standard lacks; CuPy mirrors them.
    """
    if is_cupy_array(x):
        return sys.modules["cupy"]
    return np


def array_namespace(*arrays: Any) -> ModuleType:
    """The array-API namespace shared by ``arrays`` (NumPy, CuPy or torch)."""
    return _compat_namespace(*arrays)


def to_numpy(x: Any) -> np.ndarray:
    """Copy ``x`` (NumPy, CuPy or torch, any device) into a host NumPy array."""
    if isinstance(x, np.ndarray):
        return x
    if is_cupy_array(x):
        return x.get()
    if is_torch_tensor(x):
        return x.detach().to("cpu").numpy()
    return np.asarray(x)


def to_torch(x: Any, device: Any = None) -> Any:
    """``x`` as a torch tensor, sharing memory where possible.

    CuPy arrays go through DLPack and stay on their GPU; NumPy arrays are wrapped
    without a copy and then moved to ``device`` if one is given.
    """
    import torch

    if is_torch_tensor(x):
        tensor = x
    elif is_cupy_array(x):
        tensor = torch.from_dlpack(x)
    else:
        tensor = torch.from_numpy(np.ascontiguousarray(x))
    if device is not None:
        tensor = tensor.to(device)
    return tensor


def from_torch(tensor: Any, like: Any = None) -> Any:
    """A torch tensor as an array of the same kind as ``like`` (NumPy by default).

    With a CuPy ``like`` and a CUDA tensor the data stay on the GPU (DLPack).
    """
    tensor = tensor.detach()
    if like is not None and is_cupy_array(like) and tensor.is_cuda:
        import cupy

        return cupy.from_dlpack(tensor)
    return tensor.to("cpu").numpy()
