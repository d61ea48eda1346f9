"""Handing micro-batches to the model with the next one already on its way to the device.

:class:`Prefetcher` runs a batch producer (reads, crops, normalisation) in a thread,
at most ``depth`` batches ahead of the consumer; each batch passes through a stager:

* :class:`HostStager` (CPU, and batches already cut on the GPU): nothing to move, so
  the prefetcher is a plain bounded queue;
* :class:`CudaStager` (a CUDA model): the producer makes each batch with a side
  stream current for torch and CuPy, so crops cut and normalised on the GPU (CuPy)
  queue there, not on the default stream the model runs on. A host batch is copied
  into one of a few pinned host buffers (torch ``pin_memory``) and sent to the
  device on the side stream. Either way an event is recorded on the side stream; the
  consumer makes its own stream wait for it (a wait on the device, never on the
  host), so the next batch's crops and copies overlap the current batch's kernels.
  A batch cut on the side stream is let go only once the side stream waits for the
  consumer's work on it, so that its memory is not reused while that work runs.

The only host waits are in the producer thread (a pinned buffer is refilled once its
previous copy has finished), never in the consumer's batch loop.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterable, Iterator
from dataclasses import replace
from typing import Any

import numpy as np

__all__ = ["CudaStager", "HostStager", "Prefetcher", "stager_for"]


class HostStager:
    """Batches stay where they are (CPU runs, or crops already cut on the GPU)."""

    def stage(self, batch: Any) -> Any:
        """Producer side: nothing to copy."""
        return batch

    def ready(self, batch: Any) -> Any:
        """Consumer side: nothing to wait for."""
        return batch

    def producing(self) -> contextlib.AbstractContextManager:
        """Producer side, around making a batch: nothing to set."""
        return contextlib.nullcontext()

    def release(self, batch: Any) -> None:
        """Consumer side, once the batch's work is queued: nothing to do."""


class CudaStager:
    """Host (NumPy) batches to a CUDA device through pinned buffers and a side stream.

    Parameters
    ----------
    device : str
        ``"cuda"`` or ``"cuda:<index>"``.
    slots : int
        Pinned buffers per shape and dtype, reused in turn (the prefetch depth + 1
        lets the producer fill one while earlier copies run).
    torch_module : module, optional
        ``torch`` (default); tests pass a stand-in that records the calls.
    cupy_module : module, optional
        ``cupy`` (default: imported when installed; None without it); tests pass a stand-in.
    """

    def __init__(self, device: str, slots: int = 3, torch_module: Any = None, cupy_module: Any = None) -> None:
        if torch_module is None:
            import torch as torch_module
        self.torch, self.device, self.slots = torch_module, device, max(2, int(slots))
        self.side = torch_module.cuda.Stream(device=device)
        self._buffers: dict[tuple, dict] = {}  # (shape, dtype) -> slots [pinned buffer, event of its last copy]
        self._cupy = cupy_module if cupy_module is not None else _optional_cupy()
        self._cupy_side: Any = None  # the side stream as CuPy sees it, made on first use
        self._made_on_side: set = set()  # events of batches cut on the side stream, until released

    def _pinned(self, array: np.ndarray) -> list:
        """The next ``[pinned buffer, event]`` slot for ``array``'s shape and dtype, filled with ``array``
        once the slot's previous copy has finished."""
        key = (tuple(array.shape), str(array.dtype))
        ring = self._buffers.setdefault(key, {"slots": [], "turn": 0})
        index = ring["turn"] % self.slots
        ring["turn"] += 1
        if index == len(ring["slots"]):
            buffer = self.torch.empty(array.shape, dtype=_torch_dtype(self.torch, array.dtype), pin_memory=True)
            ring["slots"].append([buffer, None])
        slot = ring["slots"][index]
        if slot[1] is not None:
            slot[1].synchronize()  # producer thread only: the copy from this buffer is done before it is refilled
        slot[0].copy_(self.torch.from_numpy(np.ascontiguousarray(array)))
        return slot

    def producing(self) -> contextlib.AbstractContextManager:
        """Producer side, around making a batch: the side stream is current for torch and CuPy (the same CUDA
        stream), so crops cut and normalised on the GPU queue there, not on the model's stream."""
        stack = contextlib.ExitStack()
        stack.enter_context(self.torch.cuda.stream(self.side))
        if self._cupy is not None:
            if self._cupy_side is None:
                from gradcamo_dask.jobs.devices import device_index

                self._cupy_side = self._cupy.cuda.ExternalStream(int(self.side.cuda_stream), device_index(self.device))
            stack.enter_context(self._cupy_side)
        return stack

    def stage(self, batch: Any) -> Any:
        """Producer side: start the copy of a host batch's crops and masks; a batch cut on the device (inside
        :meth:`producing`) gets an event after its work on the side stream."""
        event = self.torch.cuda.Event()
        if not isinstance(batch.crops, np.ndarray):
            event.record(self.side)
            self._made_on_side.add(event)
            return replace(batch, copied=event)
        crops_slot, masks_slot = self._pinned(batch.crops), self._pinned(batch.masks)
        with self.torch.cuda.stream(self.side):
            crops = crops_slot[0].to(self.device, non_blocking=True)
            masks = masks_slot[0].to(self.device, non_blocking=True)
            event.record(self.side)
        crops_slot[1] = masks_slot[1] = event
        return replace(batch, crops=crops, masks=masks, copied=event)

    def ready(self, batch: Any) -> Any:
        """Consumer side: its stream waits (on the device) for the batch's copy or crops; copied tensors learn
        that they are used on that stream, not only on the side stream that made them."""
        event = getattr(batch, "copied", None)
        if event is None:
            return batch
        current = self.torch.cuda.current_stream(self.device)
        current.wait_event(event)
        if event not in self._made_on_side:
            batch.crops.record_stream(current)
            batch.masks.record_stream(current)
        return batch

    def release(self, batch: Any) -> None:
        """Consumer side, once the batch's work is queued: a batch cut on the side stream (CuPy arrays, which
        have no ``record_stream``) is freed to that stream's memory only after the side stream waits for the
        consumer's work so far, so its memory is not reused while the model still reads it."""
        event = getattr(batch, "copied", None)
        if event is None or event not in self._made_on_side:
            return
        self._made_on_side.discard(event)
        used = self.torch.cuda.Event()
        used.record(self.torch.cuda.current_stream(self.device))
        self.side.wait_event(used)


def _optional_cupy() -> Any:
    try:
        import cupy
    except ImportError:
        return None
    return cupy


def _torch_dtype(torch: Any, dtype: Any) -> Any:
    return {"float32": torch.float32, "bool": torch.bool, "uint8": torch.uint8}[str(np.dtype(dtype))]


def stager_for(device: str, slots: int = 3) -> HostStager | CudaStager:
    """:class:`CudaStager` for a CUDA device torch can use, :class:`HostStager` otherwise."""
    if str(device).startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            return CudaStager(device, slots)
    return HostStager()


class Prefetcher:
    """Iterate ``source``'s batches, produced in a thread at most ``depth`` ahead and staged by ``stager``.

    The producer calls ``stager.stage(batch)``, the consumer ``stager.ready(batch)``
    before handing it on. An error in the producer is raised in the consumer; leaving
    the loop early stops the producer (it never blocks for good on a full queue).
    """

    def __init__(self, source: Iterable[Any], depth: int = 2, stager: Any = None) -> None:
        self.source, self.depth = source, max(1, int(depth))
        self.stager = stager if stager is not None else HostStager()

    def __iter__(self) -> Iterator[Any]:
        box: queue.Queue = queue.Queue(maxsize=self.depth)
        done, stop = object(), threading.Event()

        def put(item: Any) -> bool:
            while not stop.is_set():  # never blocks for good once the consumer has gone
                try:
                    box.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            try:
                batches = iter(self.source)
                while True:
                    with self.stager.producing():  # CUDA: the next batch's crops on the side stream
                        batch = next(batches, done)
                        staged = batch if batch is done else self.stager.stage(batch)
                    if staged is done or not put(staged):
                        break
                put(done)
            except BaseException as err:  # noqa: BLE001 - handed to the consumer
                put(err)

        thread = threading.Thread(target=produce, name="gradcamo-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                item = box.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                batch = self.stager.ready(item)
                yield batch
                self.stager.release(batch)  # the consumer asked for the next: this batch's work is queued
        finally:
            stop.set()
            thread.join(timeout=5)
