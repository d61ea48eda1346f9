"""Several trainings at once, one process and one torch thread each.

On a few shared CPU cores two small trainings in two processes finish in about the
time of one: torch's own intra-op threads scale poorly at these sizes, and on a
loaded machine a forward + backward pass of 8 cells took 10.5 s on 2 threads and
0.92 s on 1 (``benchmarks/bench_attention.py``). The processes are *spawned* (not
forked), so no torch or Dask state of the caller is inherited.
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["set_torch_threads", "train_at_once", "training_processes"]


def set_torch_threads(threads: int = 1) -> None:
    """Run torch on ``threads`` intra-op threads (the initializer of every training process)."""
    import torch

    torch.set_num_threads(int(threads))


@contextmanager
def training_processes(workers: int, torch_threads: int = 1) -> Iterator[ProcessPoolExecutor]:
    """A pool of ``workers`` spawned processes whose torch runs on ``torch_threads`` threads each."""
    with ProcessPoolExecutor(max_workers=max(1, int(workers)), mp_context=mp.get_context("spawn"),
                             initializer=set_torch_threads, initargs=(torch_threads,)) as pool:
        yield pool


def _train_one(kwargs: dict) -> Path:
    """:func:`~gradcamo_dask.jobs.train.train` with keyword arguments (runs inside a training process)."""
    from gradcamo_dask.jobs.train import train

    return train(**kwargs)


def train_at_once(jobs: Mapping[str, dict], workers: int = 2, torch_threads: int = 1) -> dict[str, Path]:
    """Train every job, ``workers`` at a time; returns ``{name: bundle path}``.

    Parameters
    ----------
    jobs : mapping of name -> keyword arguments of :func:`~gradcamo_dask.jobs.train.train`
        ``image``, ``labels``, ``recipe``, ``out`` ... (picklable: lazy Zarr-backed arrays are).
    workers : int
        Processes at once (one core each); 1 trains in this process, one job after the other,
        with this process's torch settings.
    torch_threads : int
        Torch intra-op threads per training process.
    """
    if workers <= 1 or len(jobs) <= 1:
        return {name: _train_one(kwargs) for name, kwargs in jobs.items()}
    with training_processes(min(workers, len(jobs)), torch_threads) as pool:
        futures: dict[str, Future[Any]] = {name: pool.submit(_train_one, kwargs) for name, kwargs in jobs.items()}
        return {name: Path(f.result()) for name, f in futures.items()}
