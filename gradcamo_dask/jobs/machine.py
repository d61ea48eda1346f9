"""What this machine, SLURM job or container lets a Dask cluster use: CPU cores, memory, CUDA GPUs.

Cores are the *job's* share, not the node's: the smallest of the CPU affinity mask,
``SLURM_CPUS_PER_TASK`` and the cgroup CPU quota (``cpu.max`` in cgroup v2,
``cpu.cfs_quota_us / cpu.cfs_period_us`` in v1, which is how Kubernetes enforces a
pod's ``limits.cpu``). A pod limited to 4 CPUs on a 128-core node gets 4 torch
threads, not 128. Written by hand because neither distributed nor psutil reads the
quota (``distributed.system.CPU_COUNT`` does, but only at import time, before a
worker knows its task's ``SLURM_CPUS_PER_TASK``).

GPUs are detected without creating a CUDA context in the client process (a context
made before worker processes start breaks forked workers and wastes device memory):
``CUDA_VISIBLE_DEVICES``, then NVML (``pynvml``, as dask-cuda uses it), then the
driver's ``/proc/driver/nvidia/gpus`` listing. torch is never imported here.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from gradcamo_dask.errors import InputError

__all__ = ["CPU_WORKER_MEMORY_BYTES", "ClusterShape", "cgroup_cpu_quota", "cuda_devices", "local_cluster_shape",
           "total_memory", "usable_cores"]

#: Memory a CPU worker is sized for (model, a site's crops, activations at a small grid).
CPU_WORKER_MEMORY_BYTES = 3 * 2**30
CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_cpu_quota(root: Path | str = CGROUP_ROOT) -> float | None:
    """CPUs the cgroup quota allows (e.g. 2.5), or None without a quota (``max``, no cgroup files)."""
    root = Path(root)
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]  # cgroup v2: "200000 100000" or "max 100000"
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())  # cgroup v1: -1 means no quota
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def usable_cores(environ: dict | None = None, cgroup_root: Path | str = CGROUP_ROOT) -> int:
    """CPU cores this process may use: min of affinity, ``SLURM_CPUS_PER_TASK`` and the cgroup quota (>= 1)."""
    env = os.environ if environ is None else environ
    try:
        limits = [len(os.sched_getaffinity(0))]
    except AttributeError:  # pragma: no cover - macOS, Windows
        limits = [os.cpu_count() or 1]
    slurm = str(env.get("SLURM_CPUS_PER_TASK", "")).strip()
    if slurm.isdigit() and int(slurm) > 0:
        limits.append(int(slurm))
    quota = cgroup_cpu_quota(cgroup_root)
    if quota:
        limits.append(max(1, math.floor(quota)))
    return max(1, min(limits))


def total_memory() -> int:
    """Physical memory of this machine, bytes."""
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except ImportError:  # pragma: no cover - psutil comes with distributed
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def cuda_devices(environ: dict | None = None) -> list[str]:
    """Identifiers of the CUDA GPUs workers could use, found without a CUDA context.

    ``CUDA_VISIBLE_DEVICES`` decides when set (``""`` or ``"-1"``: none); otherwise
    NVML counts the devices, and without NVML the driver's
    ``/proc/driver/nvidia/gpus`` folder does. Returns e.g. ``["0", "1"]`` (an empty
    list on a CPU machine).
    """
    env = os.environ if environ is None else environ
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        items = [v.strip() for v in visible.split(",") if v.strip()]
        if not items or items[0].startswith("-"):
            return []
        return items
    try:
        import pynvml  # ships with dask-cuda (nvidia-ml-py)

        pynvml.nvmlInit()
        try:
            return [str(i) for i in range(pynvml.nvmlDeviceGetCount())]
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - no NVML library, no driver, no permission: fall through
        pass
    gpus = Path("/proc/driver/nvidia/gpus")
    if gpus.is_dir():
        return [str(i) for i, _ in enumerate(sorted(gpus.iterdir()))]
    return []


@dataclass(frozen=True)
class ClusterShape:
    """How a local CPU cluster is laid out: worker processes, Dask threads each, torch threads each."""

    n_workers: int
    threads_per_worker: int
    torch_threads: int
    memory_limit: int  # bytes per worker


def local_cluster_shape(
    n_workers: int | None = None,
    threads_per_worker: int | None = None,
    *,
    cores: int | None = None,
    memory: int | None = None,
    worker_memory: int = CPU_WORKER_MEMORY_BYTES,
) -> ClusterShape:
    """Size a local CPU cluster to the machine.

    Defaults: one Dask thread per worker, as many worker processes as cores while
    each gets ``worker_memory`` bytes (3 GiB) of RAM, and the cores shared out as
    torch intra-op threads (``cores // (workers * threads)``, at least 1). On a
    2-core machine: 2 workers x 1 thread x 1 torch thread.

    Parameters
    ----------
    n_workers, threads_per_worker : int, optional
        Override the process count and Dask threads per process.
    cores, memory : int, optional
        Machine size (default: this job's usable cores, :func:`usable_cores`, and RAM, bytes).
    worker_memory : int
        RAM a worker needs, bytes.
    """
    cores = usable_cores() if cores is None else int(cores)
    memory = total_memory() if memory is None else int(memory)
    threads = 1 if threads_per_worker is None else int(threads_per_worker)
    if threads < 1 or (n_workers is not None and int(n_workers) < 1):
        raise InputError(f"workers and threads per worker must be >= 1, got {n_workers} and {threads_per_worker}")
    if n_workers is None:
        by_memory = max(1, memory // max(1, worker_memory))
        n_workers = max(1, min(cores // threads, by_memory))
    n_workers = int(n_workers)
    torch_threads = max(1, cores // (n_workers * threads))
    return ClusterShape(n_workers, threads, torch_threads, max(1, memory // n_workers))
