"""The device a site task runs on, and what a CUDA worker sets up once.

* :func:`resolve_device` turns a requested device (``None``, ``"cpu"``,
  ``"cuda"``, ``"cuda:1"``) into the one this process can use. A dask-cuda worker
  sees only its own GPU, as device 0 (``CUDA_VISIBLE_DEVICES``), so on a Dask
  worker any CUDA request means the worker's current device.
* :func:`share_cuda_memory` makes CuPy allocate from PyTorch's caching allocator
  (one pool per GPU instead of two that fight), unless RMM manages the memory.
* :func:`prepare_cuda` does the per-process CUDA set-up: the allocator bridge and
  ``torch.backends.cudnn.benchmark`` (fixed crop shapes: cuDNN picks its fastest
  convolution once per shape).
* :func:`site_array` moves a site's image or labels to the device's array kind
  with the array's own API (CuPy refuses ``numpy.asarray``).

torch and CuPy are imported inside the functions: importing this module never
creates a CUDA context.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
from typing import Any

from gradcamo_dask.arrays import to_numpy
from gradcamo_dask.errors import InputError

__all__ = ["cuda_memory_shared", "device_index", "in_dask_worker", "on_device", "prepare_cuda", "resolve_device", "rmm_in_use", "share_cuda_memory", "site_array"]

logger = logging.getLogger(__name__)

_BRIDGE = {"installed": False}
_BRIDGE_LOCK = threading.Lock()


def in_dask_worker() -> bool:
    """True inside a ``distributed`` worker (also a dask-cuda one)."""
    try:
        from distributed import get_worker

        get_worker()
        return True
    except (ImportError, ValueError):
        return False


def resolve_device(device: str | None = None) -> str:
    """The device string this process should use for a request.

    Parameters
    ----------
    device : str, optional
        ``None`` (CUDA when visible, else CPU), ``"cpu"``, ``"cuda"`` or
        ``"cuda:<index>"``.

    Returns
    -------
    str
        ``"cpu"`` or ``"cuda:<index>"``. On a Dask worker every CUDA request maps to
        the worker's current device (dask-cuda numbers each worker's GPU 0).

    Raises
    ------
    InputError
        A CUDA device that this process cannot see (outside a Dask worker), or an
        unknown device kind.
    """
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = str(device)
    if device == "cpu":
        return "cpu"
    if not device.startswith("cuda"):
        raise InputError(f"device must be 'cpu', 'cuda' or 'cuda:<index>', got {device!r}")
    if not torch.cuda.is_available():
        raise InputError(f"device {device!r} was asked for, but this process sees no CUDA GPU; use device='cpu'")
    current = int(torch.cuda.current_device())
    if device == "cuda" or in_dask_worker():
        if device not in ("cuda", f"cuda:{current}"):
            logger.info("device %s on a Dask worker: using the worker's own GPU cuda:%d", device, current)
        return f"cuda:{current}"
    index = int(torch.device(device).index or 0)
    count = int(torch.cuda.device_count())
    if index >= count:
        raise InputError(f"device {device!r} does not exist: this process sees {count} CUDA GPU(s) "
                         f"(cuda:0 to cuda:{count - 1}); check CUDA_VISIBLE_DEVICES or pick another index")
    return f"cuda:{index}"


def device_index(device: str) -> int:
    """The CUDA index of ``"cuda:<index>"`` (0 for ``"cuda"``)."""
    _, _, index = str(device).partition(":")
    return int(index or 0)


def rmm_in_use(cupy: Any = None) -> bool:
    """True when RMM manages device memory in this process (dask-cuda's ``rmm_pool_size`` and friends).

    Signs: RMM is imported and initialised, or CuPy's allocator was already replaced
    by someone else's (dask-cuda's ``rmm_allocator_external_lib_list``).
    """
    rmm = sys.modules.get("rmm")
    if rmm is not None:
        try:
            if bool(rmm.is_initialized()):
                return True
        except Exception:  # noqa: BLE001 - an RMM without is_initialized: judge by the allocator below
            pass
    if cupy is None:
        cupy = sys.modules.get("cupy")
    if cupy is None or _BRIDGE["installed"]:
        return False
    try:
        current = cupy.cuda.get_allocator()
    except Exception:  # noqa: BLE001 - an old CuPy without get_allocator
        return False
    owner = getattr(current, "__self__", None)
    return "rmm" in f"{getattr(current, '__module__', '')} {type(owner).__module__ if owner is not None else ''}"


def share_cuda_memory() -> bool:
    """Make CuPy allocate from PyTorch's CUDA caching allocator, once per process.

    CuPy's ``PythonFunctionAllocator`` calls ``malloc(size, device_id)`` and
    ``free(pointer, device_id)``; allocations are made on CuPy's current stream.
    Written here because neither library ships the bridge.

    Returns
    -------
    bool
        True when the bridge is in place; False without CuPy, or when RMM manages
        the memory (then both libraries are left to RMM and dask-cuda).
    """
    try:
        import cupy
    except ImportError:
        return False
    with _BRIDGE_LOCK:
        if _BRIDGE["installed"]:
            return True
        if rmm_in_use(cupy):
            logger.info("RMM manages device memory: CuPy's allocator is left as it is")
            return False
        import torch

        def malloc(size: int, device_id: int) -> int:
            stream = cupy.cuda.get_current_stream().ptr
            return int(torch.cuda.caching_allocator_alloc(int(size), int(device_id), int(stream)))

        def free(pointer: int, device_id: int) -> None:
            torch.cuda.caching_allocator_delete(int(pointer))

        cupy.cuda.set_allocator(cupy.cuda.memory.PythonFunctionAllocator(malloc, free).malloc)
        _BRIDGE["installed"] = True
    return True


def cuda_memory_shared() -> bool:
    """True once :func:`share_cuda_memory` has bridged CuPy to PyTorch's allocator in this process."""
    return bool(_BRIDGE["installed"])


def prepare_cuda() -> None:
    """Per-process CUDA set-up of a worker: the CuPy/PyTorch allocator bridge and ``cudnn.benchmark``."""
    import torch

    torch.backends.cudnn.benchmark = True
    share_cuda_memory()


def on_device(device: str) -> contextlib.AbstractContextManager:
    """Make ``device`` current for CuPy and torch inside the block (nothing to do on the CPU)."""
    stack = contextlib.ExitStack()
    if str(device).startswith("cuda"):
        import torch

        index = device_index(device)
        stack.enter_context(torch.cuda.device(index))
        cupy = sys.modules.get("cupy")
        if cupy is not None:
            stack.enter_context(cupy.cuda.Device(index))
    return stack


def site_array(x: Any, device: str) -> Any:
    """A site's image or labels as the array kind of ``device``.

    CUDA with CuPy installed: a CuPy array on that GPU (a NumPy array is copied up,
    a CuPy one stays). Otherwise a NumPy array (a CuPy one is copied down with its
    own ``.get()``, never through ``numpy.asarray``).
    """
    if str(device).startswith("cuda"):
        try:
            import cupy
        except ImportError:  # torch on the GPU still works; crops are then built on the host
            return to_numpy(x)
        with cupy.cuda.Device(device_index(device)):
            return cupy.asarray(x)
    return to_numpy(x)
