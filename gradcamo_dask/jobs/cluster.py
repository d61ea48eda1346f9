"""Dask clusters for plate-scale work: local CPU, local CUDA, or an existing scheduler.

:func:`connect` returns a :class:`distributed.Client`:

* ``scheduler=None`` and no CUDA GPU: a :class:`distributed.LocalCluster` of worker
  *processes* sized to the machine (see :func:`local_cluster_shape`);
* ``scheduler=None`` and CUDA GPUs: a ``dask_cuda.LocalCUDACluster``, one worker per
  GPU (``pip install -e ".[gpu]"``);
* ``scheduler="tcp://host:port"`` (or a scheduler JSON file as written by
  ``dask scheduler --scheduler-file``): joins that cluster (SLURM, Kubernetes, ...);
  an address that does not answer raises :class:`~gradcamo_dask.errors.ClusterError`
  within ``timeout`` seconds.

GPUs are detected without creating a CUDA context in the client process (a context
made before worker processes start breaks forked workers and wastes device memory):
``CUDA_VISIBLE_DEVICES``, then NVML (``pynvml``, as dask-cuda uses it), then the
driver's ``/proc/driver/nvidia/gpus`` listing. torch is never imported here.

Threads: each local CPU worker gets one Dask thread and ``cores / workers`` torch
intra-op threads (:class:`TorchThreads` sets them on every worker). On small crops
torch's intra-op parallelism scales poorly, so independent sites on separate worker
processes (no shared GIL, one model copy each, ~20 MB for EfficientNet-B0) use the
cores better than one worker with many threads; a worker is given more torch
threads only when memory limits the number of processes.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradcamo_dask.errors import ClusterError, InputError

__all__ = [
    "ClusterShape",
    "TorchThreads",
    "connect",
    "cuda_devices",
    "local_cluster_shape",
    "usable_cores",
    "wait_for_workers",
    "workers_per_host",
]

logger = logging.getLogger(__name__)

#: Memory a CPU worker is sized for (model, a site's crops, activations at a small grid).
CPU_WORKER_MEMORY_BYTES = 3 * 2**30
DEFAULT_TIMEOUT_S = 20.0


def usable_cores() -> int:
    """CPU cores this process may run on (affinity-aware; at least 1)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return max(1, os.cpu_count() or 1)


def _total_memory() -> int:
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
        Machine size (default: this machine's usable cores and RAM, bytes).
    worker_memory : int
        RAM a worker needs, bytes.
    """
    cores = usable_cores() if cores is None else int(cores)
    memory = _total_memory() if memory is None else int(memory)
    threads = 1 if threads_per_worker is None else int(threads_per_worker)
    if threads < 1 or (n_workers is not None and int(n_workers) < 1):
        raise InputError(f"workers and threads per worker must be >= 1, got {n_workers} and {threads_per_worker}")
    if n_workers is None:
        by_memory = max(1, memory // max(1, worker_memory))
        n_workers = max(1, min(cores // threads, by_memory))
    n_workers = int(n_workers)
    torch_threads = max(1, cores // (n_workers * threads))
    return ClusterShape(n_workers, threads, torch_threads, max(1, memory // n_workers))


def workers_per_host(client: Any) -> dict[str, int]:
    """``{host: number of worker processes}`` of the client's cluster right now."""
    counts: dict[str, int] = {}
    for info in client.scheduler_info(n_workers=-1)["workers"].values():
        host = str(info.get("host", ""))
        counts[host] = counts.get(host, 0) + 1
    return counts


class TorchThreads:
    """A worker plugin that sets torch's intra-op threads on each worker when it starts.

    ``threads=None`` gives each worker ``cores // (dask threads x workers on its
    host)`` (at least 1), with ``hosts`` the worker count per host (from
    :func:`workers_per_host`; a host not listed counts one worker).
    """

    name = "gradcamo-torch-threads"
    idempotent = False

    def __init__(self, threads: int | None = None, hosts: dict[str, int] | None = None) -> None:
        self.threads = threads
        self.hosts = dict(hosts or {})

    def threads_for(self, worker: Any) -> int:
        if self.threads:
            return int(self.threads)
        host = str(getattr(worker, "ip", "") or "")
        local = max(1, self.hosts.get(host, 1))
        return max(1, usable_cores() // (max(1, int(worker.state.nthreads)) * local))

    def setup(self, worker: Any) -> None:
        import torch

        n = self.threads_for(worker)
        torch.set_num_threads(n)
        os.environ["OMP_NUM_THREADS"] = str(n)
        logger.debug("worker %s: %d torch threads", getattr(worker, "address", "?"), n)


def _as_worker_plugin(plugin: Any) -> Any:
    from distributed import WorkerPlugin

    class _Plugin(WorkerPlugin):  # a thin adapter so TorchThreads imports without distributed
        name = plugin.name
        idempotent = False

        def setup(self, worker: Any) -> None:
            plugin.setup(worker)

    return _Plugin()


def _is_scheduler_file(scheduler: str) -> bool:
    return "://" not in scheduler and Path(scheduler).suffix == ".json"


#: Seconds a joined scheduler without workers is waited on before :class:`ClusterError` (``--worker-timeout``).
DEFAULT_WORKER_TIMEOUT_S = 600.0
_MAX_HANDSHAKE_BYTES = 2**26  # a Dask handshake is ~100 bytes; an 8-byte length beyond this is not Dask


def _probe_tcp(scheduler: str, timeout: float) -> None:
    """Fail fast unless a Dask scheduler answers at a ``tcp://host:port`` address.

    A Dask scheduler sends its handshake as soon as a connection opens; something
    else (an HTTP server, a dashboard port, a socket that never replies) sends
    nothing or bytes that are not a Dask frame header, and is refused within
    ``timeout`` seconds instead of hanging in the client's handshake.
    """
    import socket
    import struct
    import time
    from urllib.parse import urlsplit

    parts = urlsplit(scheduler if "://" in scheduler else f"tcp://{scheduler}")
    if parts.scheme not in ("tcp", "") or parts.hostname is None:
        return  # tls://, ucx://, inproc:// ...: let distributed handle them
    try:
        port = parts.port or 8786
    except ValueError as err:
        raise ClusterError(f"scheduler address {scheduler!r} is malformed ({err}); use tcp://host:port") from None
    deadline = time.monotonic() + timeout
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout) as sock:
            header = b""
            while len(header) < 8:
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = sock.recv(8 - len(header))
                if not chunk:
                    break
                header += chunk
    except socket.timeout:
        raise ClusterError(
            f"{scheduler} accepts connections but sent no Dask handshake within {timeout:g} s: it is not a Dask "
            "scheduler (an HTTP server or the dashboard port?); the scheduler's default port is 8786, its "
            "dashboard's 8787") from None
    except OSError as err:
        raise ClusterError(
            f"cannot reach a Dask scheduler at {scheduler}: nothing answers at {parts.hostname}:{port} "
            f"({type(err).__name__}: {err}); check the address (tcp://host:port), that the scheduler runs and "
            "that its port is open, or leave --scheduler out to start a local cluster"
        ) from None
    if len(header) < 8 or not 0 < struct.unpack("<Q", header)[0] < _MAX_HANDSHAKE_BYTES:
        raise ClusterError(
            f"{scheduler} answered, but not as a Dask scheduler (first bytes {header[:8]!r}); check the address and "
            "port (the scheduler's default port is 8786; 8787 is its dashboard)")


def _join(scheduler: str, timeout: float, security: Any = None) -> Any:
    from distributed import Client

    extra = {"security": security} if security is not None else {}
    try:
        if not _is_scheduler_file(scheduler):
            _probe_tcp(scheduler, timeout)
        if _is_scheduler_file(scheduler):
            if not Path(scheduler).is_file():
                raise ClusterError(f"scheduler file {scheduler} does not exist; start the scheduler with "
                                   f"`dask scheduler --scheduler-file {scheduler}` or pass its address")
            return Client(scheduler_file=scheduler, timeout=timeout, **extra)
        return Client(scheduler, timeout=timeout, **extra)
    except ClusterError:
        raise
    except (MemoryError, EOFError) as err:  # something answered that does not speak Dask's protocol
        raise ClusterError(
            f"{scheduler} answered, but not as a Dask scheduler ({type(err).__name__}); check the address and port "
            "(the scheduler's default port is 8786; 8787 is its dashboard)"
        ) from None
    except (OSError, TimeoutError, ValueError) as err:  # distributed raises OSError on timeouts
        raise ClusterError(
            f"cannot reach a Dask scheduler at {scheduler} within {timeout:g} s ({type(err).__name__}: {err}); "
            "check the address (tcp://host:port), that the scheduler runs and that its port is open, "
            "or leave --scheduler out to start a local cluster"
        ) from None


def wait_for_workers(client: Any, timeout: float | None = DEFAULT_WORKER_TIMEOUT_S, *, quiet: bool = False,
                     where: str = "") -> int:
    """Wait until the client's cluster has a worker, saying so; return the worker count.

    Parameters
    ----------
    client : distributed.Client
    timeout : float or None
        Seconds to wait (None: without limit).
    quiet : bool
        Do not print the waiting message.
    where : str
        The scheduler's address as the user gave it (named in messages).

    Raises
    ------
    ClusterError
        No worker joined within ``timeout``.
    """
    n = len(client.scheduler_info().get("workers", {}))
    if n:
        return n
    where = where or str(client.scheduler.address)
    limit = "without limit" if timeout is None else f"up to {timeout:g} s"
    if not quiet:
        print(f"gradcamo-dask: the scheduler {where} has no workers yet; waiting {limit} for one to join "
              "(--worker-timeout SECONDS changes this)", file=sys.stderr, flush=True)
    try:
        client.wait_for_workers(1, timeout=timeout)
    except TimeoutError as err:
        raise ClusterError(
            f"no Dask worker joined the scheduler {where} within {timeout:g} s; start workers "
            f"(`dask worker {client.scheduler.address}`), look at the cluster's queue (squeue, kubectl get pods), "
            "or raise --worker-timeout") from err
    return len(client.scheduler_info().get("workers", {}))


def _security_options(security: Any) -> dict:
    return {"security": security} if security is not None else {}


def _slurm_client(cluster_config: Any, n_workers: int | None, security: Any, timeout: float,
                  torch_threads: int | None, quiet: bool) -> Any:
    from distributed import Client

    try:
        from gradcamo_dask.jobs.slurm import slurm_cluster
    except ImportError as err:
        raise ClusterError(f"cluster='slurm' needs gradcamo_dask.jobs.slurm (issue #8, dask-jobqueue), which is not "
                           f"available here ({err}); start the cluster yourself and pass --scheduler ADDRESS") \
            from None
    slurm = slurm_cluster(cluster_config, n_workers=n_workers, security=security)
    client = Client(slurm, timeout=timeout, **_security_options(security))
    client.register_plugin(_as_worker_plugin(TorchThreads(torch_threads)))
    _announce(client, "SLURM cluster", quiet)
    return client


def _joined_client(scheduler: str, security: Any, timeout: float, worker_timeout: float | None,
                   torch_threads: int | None, quiet: bool) -> Any:
    client = _join(scheduler, float(timeout), security)
    try:
        wait_for_workers(client, worker_timeout, quiet=quiet, where=scheduler)
        client.register_plugin(_as_worker_plugin(TorchThreads(torch_threads, workers_per_host(client))))
    except BaseException:
        client.close()
        raise
    _announce(client, f"joined {scheduler}", quiet)
    return client


def _cuda_client(gpus: list[str], cuda_visible_devices: Sequence[str] | None, options: dict, security: Any,
                 timeout: float, torch_threads: int | None, quiet: bool) -> Any:
    from distributed import Client

    try:
        from dask_cuda import LocalCUDACluster
    except ImportError:
        raise ClusterError(
            f"{len(gpus)} CUDA GPU(s) found but dask-cuda is not installed; pip install -e '.[gpu]' "
            "(CuPy and dask-cuda), or pass device='cpu'"
        ) from None
    visible = list(cuda_visible_devices) if cuda_visible_devices is not None else gpus
    per_gpu = max(1, usable_cores() // len(visible))
    local = LocalCUDACluster(**{"CUDA_VISIBLE_DEVICES": ",".join(visible), **options})
    client = Client(local, timeout=timeout, **_security_options(security))
    client.register_plugin(_as_worker_plugin(TorchThreads(torch_threads or per_gpu)))
    _announce(client, f"LocalCUDACluster: {len(visible)} GPU worker(s) ({','.join(visible)})", quiet)
    return client


def _local_client(shape: ClusterShape, options: dict, security: Any, timeout: float, torch_threads: int | None,
                  quiet: bool) -> Any:
    from distributed import Client, LocalCluster

    options = {"n_workers": shape.n_workers, "processes": True, "memory_limit": shape.memory_limit, **options}
    try:
        local = LocalCluster(**options)
    except Exception as err:  # noqa: BLE001 - ports, permissions, spawn failures
        raise ClusterError(f"could not start a local Dask cluster ({type(err).__name__}: {err})") from err
    client = Client(local, timeout=timeout, **_security_options(security))
    client.register_plugin(_as_worker_plugin(TorchThreads(torch_threads or shape.torch_threads)))
    _announce(client, f"LocalCluster: {shape.n_workers} worker process(es) x {shape.threads_per_worker} thread(s), "
                      f"{torch_threads or shape.torch_threads} torch thread(s) each", quiet)
    return client


def _check_options(scheduler: str | None, cluster: str | None, device: str, worker_timeout: float | None) -> None:
    if device not in ("auto", "cpu", "cuda"):
        raise InputError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if cluster not in (None, "local", "slurm"):
        raise InputError(f"cluster must be 'local' or 'slurm', got {cluster!r}")
    if scheduler and cluster == "slurm":
        raise InputError("pass either a scheduler address or cluster='slurm', not both")
    if worker_timeout is not None and worker_timeout < 0:
        raise InputError(f"worker_timeout must be >= 0 seconds (or None), got {worker_timeout}")


def connect(
    scheduler: str | None = None,
    *,
    cluster: str | None = None,
    cluster_config: Any = None,
    n_workers: int | None = None,
    security: Any = None,
    threads_per_worker: int | None = None,
    device: str = "auto",
    cuda_visible_devices: Sequence[str] | None = None,
    torch_threads: int | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
    worker_timeout: float | None = DEFAULT_WORKER_TIMEOUT_S,
    dashboard: bool = True,
    quiet: bool = False,
    **cluster_options: Any,
) -> Any:
    """A Dask client: local CPU cluster, local CUDA cluster, or an existing scheduler.

    Parameters
    ----------
    scheduler : str, optional
        ``tcp://host:port`` (or ``tls://``) of a running scheduler, or the path of its
        scheduler JSON file; None starts a cluster (``cluster``).
    cluster : "local" or "slurm", optional
        Cluster to start when no scheduler is given: local (default) or SLURM through
        ``gradcamo_dask.jobs.slurm.slurm_cluster(cluster_config, n_workers=n_workers)``.
    cluster_config : path or dict, optional
        The SLURM cluster's settings (see ``gradcamo_dask.jobs.slurm``).
    security : distributed.security.Security, optional
        TLS settings for the client (and the local cluster).
    n_workers, threads_per_worker : int, optional
        Local CPU cluster size (default: :func:`local_cluster_shape`); for a CUDA
        cluster ``n_workers`` is ignored (one worker per GPU).
    device : "auto", "cpu" or "cuda"
        Local cluster kind: "auto" starts a CUDA cluster when GPUs are found
        (:func:`cuda_devices`), "cuda" requires one, "cpu" never starts one.
    cuda_visible_devices : list of str, optional
        GPUs for the CUDA cluster (default: all found).
    torch_threads : int, optional
        torch intra-op threads per worker (default: cores shared out, :class:`TorchThreads`).
    timeout : float
        Seconds for an existing scheduler to answer; a ``tcp://`` address that is not
        a Dask scheduler is refused within this time.
    worker_timeout : float or None
        Seconds to wait, saying so, for a first worker of a joined scheduler (None: no limit).
    dashboard, quiet : bool
        Serve the Dask dashboard (local clusters; needs ``bokeh``); do not print addresses.
    **cluster_options
        Passed to ``LocalCluster`` / ``LocalCUDACluster``.

    Returns
    -------
    distributed.Client
        Close it (the local cluster closes with it) or use it as a context manager.

    Raises
    ------
    ClusterError
        Unreachable scheduler or not a Dask scheduler; no worker within
        ``worker_timeout``; ``device="cuda"`` without GPUs or without dask-cuda.
    """
    _check_options(scheduler, cluster, device, worker_timeout)
    if cluster == "slurm":
        return _slurm_client(cluster_config, n_workers, security, timeout, torch_threads, quiet)
    if scheduler:
        return _joined_client(str(scheduler), security, timeout, worker_timeout, torch_threads, quiet)
    gpus = cuda_devices() if device != "cpu" else []
    if device == "cuda" and not gpus:
        raise ClusterError("device='cuda' but no CUDA GPU is visible (CUDA_VISIBLE_DEVICES, NVML); "
                           "use device='cpu' or 'auto'")
    options = {"dashboard_address": ":0" if dashboard and _has_bokeh() else None, "host": "127.0.0.1",
               **_security_options(security)}
    if gpus:
        options = {**options, "threads_per_worker": threads_per_worker or 1, **cluster_options}
        return _cuda_client(gpus, cuda_visible_devices, options, security, timeout, torch_threads, quiet)
    shape = local_cluster_shape(n_workers, threads_per_worker)
    options = {**options, "threads_per_worker": shape.threads_per_worker, **cluster_options}
    return _local_client(shape, options, security, timeout, torch_threads, quiet)


def _has_bokeh() -> bool:
    try:
        import bokeh  # noqa: F401
    except ImportError:
        return False
    return True


def dashboard_address(client: Any) -> str | None:
    """The client's dashboard URL, or None when the cluster serves none."""
    try:
        link = client.dashboard_link
    except Exception:  # noqa: BLE001 - no dashboard (bokeh missing) raises on some versions
        return None
    if not link:
        return None
    try:
        info = client.scheduler_info()
        if "dashboard" not in info.get("services", {}):
            return None
    except Exception:  # noqa: BLE001
        pass
    return str(link)


def _announce(client: Any, what: str, quiet: bool) -> None:
    if quiet:
        return
    link = dashboard_address(client)
    where = f"dashboard {link}" if link else "no dashboard (pip install bokeh for one)"
    print(f"gradcamo-dask: {what}; scheduler {client.scheduler.address}; {where}", file=sys.stderr)
