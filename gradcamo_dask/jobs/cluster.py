"""Dask clusters for plate-scale work: local CPU, local CUDA, SLURM, or an existing scheduler.

:func:`connect` returns a :class:`distributed.Client`:

* ``scheduler=None`` and no CUDA GPU: a :class:`distributed.LocalCluster` of worker
  *processes* sized to the machine (see :func:`~gradcamo_dask.jobs.machine.local_cluster_shape`);
* ``scheduler=None`` and CUDA GPUs: a ``dask_cuda.LocalCUDACluster``, one worker per
  GPU, each advertising the resource ``GPU=1`` (``pip install -e ".[gpu]"``);
* ``cluster="slurm"``: dask-jobqueue GPU jobs that adapt between a minimum and a
  maximum, with TLS by default (:mod:`gradcamo_dask.jobs.slurm`);
* ``scheduler="tcp://host:port"`` (or a scheduler JSON file as written by
  ``dask scheduler --scheduler-file``): joins that cluster (SLURM, Kubernetes, ...);
  an address that does not answer raises :class:`~gradcamo_dask.errors.ClusterError`
  within ``timeout`` seconds (:mod:`gradcamo_dask.jobs.joining`).

Site tasks ask for ``GPU=1`` whenever workers advertise it
(:mod:`gradcamo_dask.jobs.resources`), so a GPU runs one site at a time.

Threads: each local CPU worker gets one Dask thread and ``cores / workers`` torch
intra-op threads (:class:`~gradcamo_dask.jobs.worker_plugins.TorchThreads` sets them on
every worker, from the job's CPU quota). On small crops torch's intra-op parallelism
scales poorly, so independent sites on separate worker processes (no shared GIL, one
model copy each, ~20 MB for EfficientNet-B0) use the cores better than one worker
with many threads; a worker is given more torch threads only when memory limits the
number of processes.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from gradcamo_dask.errors import ClusterError, InputError
from gradcamo_dask.jobs.client import open_client
from gradcamo_dask.jobs.joining import DEFAULT_WORKER_TIMEOUT_S, join_scheduler, wait_for_workers
from gradcamo_dask.jobs.machine import ClusterShape, cuda_devices, local_cluster_shape, usable_cores
from gradcamo_dask.jobs.resources import GPU_RESOURCE
from gradcamo_dask.jobs.worker_plugins import TorchThreads, as_worker_plugin, workers_per_host

__all__ = ["DEFAULT_TIMEOUT_S", "DEFAULT_WORKER_TIMEOUT_S", "connect", "cuda_devices", "dashboard_address",
           "local_cluster_shape", "wait_for_workers"]

DEFAULT_TIMEOUT_S = 20.0


def _security_options(security: Any) -> dict:
    return {"security": security} if security is not None else {}


def _slurm_client(cluster_config: Any, n_workers: int | None, security: Any, timeout: float,
                  worker_timeout: float | None, torch_threads: int | None, quiet: bool) -> Any:
    try:
        from gradcamo_dask.jobs.slurm import open_slurm_config, slurm_cluster
    except ImportError as err:
        raise ClusterError(f"cluster='slurm' needs gradcamo_dask.jobs.slurm (dask-jobqueue), which is not "
                           f"available here ({err}); start the cluster yourself and pass --scheduler ADDRESS") \
            from None
    per_job = int(open_slurm_config(cluster_config)["processes"])
    slurm = slurm_cluster(cluster_config, n_workers=n_workers, security=security)
    try:
        client = open_client(slurm, timeout=timeout)  # the cluster's own Security (TLS by default) is the client's
        # GPU workers of a job share its cores: per_host = GPUs per job, before any worker has joined
        client.register_plugin(as_worker_plugin(TorchThreads(torch_threads, per_host=per_job)))
        _announce(client, f"SLURM cluster (jobs of {per_job} GPU worker(s))", quiet)
        wait_for_workers(client, worker_timeout, quiet=quiet, where=f"SLURM cluster {slurm.scheduler_address}")
    except BaseException:
        slurm.close()
        raise
    return client


def _joined_client(scheduler: str, security: Any, timeout: float, worker_timeout: float | None,
                   torch_threads: int | None, quiet: bool) -> Any:
    client = join_scheduler(scheduler, float(timeout), security)
    try:
        wait_for_workers(client, worker_timeout, quiet=quiet, where=scheduler)
        client.register_plugin(as_worker_plugin(TorchThreads(torch_threads, workers_per_host(client))))
    except BaseException:
        client.close()
        raise
    _announce(client, f"joined {scheduler}", quiet)
    return client


def _cuda_client(gpus: list[str], cuda_visible_devices: Sequence[str] | None, options: dict, security: Any,
                 timeout: float, torch_threads: int | None, quiet: bool) -> Any:
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError:
        raise ClusterError(
            f"{len(gpus)} CUDA GPU(s) found but dask-cuda is not installed; pip install -e '.[gpu]' "
            "(CuPy and dask-cuda), or pass device='cpu'"
        ) from None
    visible = list(cuda_visible_devices) if cuda_visible_devices is not None else gpus
    per_gpu = max(1, usable_cores() // len(visible))
    options = {"resources": {GPU_RESOURCE: 1}, **options}  # one site per GPU (jobs.resources)
    local = LocalCUDACluster(**{"CUDA_VISIBLE_DEVICES": ",".join(visible), **options})
    client = _client_of(local, timeout, security)
    client.register_plugin(as_worker_plugin(TorchThreads(torch_threads or per_gpu)))
    _announce(client, f"LocalCUDACluster: {len(visible)} GPU worker(s) ({','.join(visible)})", quiet)
    return client


def _local_client(shape: ClusterShape, options: dict, security: Any, timeout: float, torch_threads: int | None,
                  quiet: bool) -> Any:
    from distributed import LocalCluster

    options = {"n_workers": shape.n_workers, "processes": True, "memory_limit": shape.memory_limit, **options}
    try:
        local = LocalCluster(**options)
    except Exception as err:  # noqa: BLE001 - ports, permissions, spawn failures
        raise ClusterError(f"could not start a local Dask cluster ({type(err).__name__}: {err})") from err
    client = _client_of(local, timeout, security)
    client.register_plugin(as_worker_plugin(TorchThreads(torch_threads or shape.torch_threads)))
    _announce(client, f"LocalCluster: {shape.n_workers} worker process(es) x {shape.threads_per_worker} thread(s), "
                      f"{torch_threads or shape.torch_threads} torch thread(s) each", quiet)
    return client


def _client_of(local: Any, timeout: float, security: Any) -> Any:
    """A client of the cluster this process just started; the cluster is closed again when none connects."""
    try:
        return open_client(local, timeout=timeout, **_security_options(security))
    except BaseException:
        local.close()
        raise


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
        ``gradcamo_dask.jobs.slurm.slurm_cluster(cluster_config, n_workers=n_workers)``
        (adaptive GPU jobs, TLS with temporary certificates unless ``security`` is given).
    cluster_config : path or dict, optional
        The SLURM cluster's settings (see ``gradcamo_dask.jobs.slurm``).
    security : distributed.security.Security, optional
        TLS settings for the client (and the local cluster); for ``cluster="slurm"`` a
        full-role Security (scheduler, worker and client certificates).
    n_workers, threads_per_worker : int, optional
        Local CPU cluster size (default: :func:`local_cluster_shape`); for a CUDA
        cluster ``n_workers`` is ignored (one worker per GPU); for SLURM it is the
        most GPU workers the cluster adapts up to.
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
        Seconds to wait, saying so, for a first worker of a joined scheduler or of the
        SLURM jobs (None: no limit, for jobs queued behind others).
    dashboard, quiet : bool
        Serve the Dask dashboard (local clusters; needs ``bokeh``); do not print addresses.
    **cluster_options
        Passed to ``LocalCluster`` / ``LocalCUDACluster``.

    Returns a :class:`distributed.Client`: close it or use it as a context manager.

    Raises
    ------
    ClusterError
        Unreachable scheduler or not a Dask scheduler; no worker within
        ``worker_timeout``; ``device="cuda"`` without GPUs or without dask-cuda.
    """
    _check_options(scheduler, cluster, device, worker_timeout)
    if cluster == "slurm":
        return _slurm_client(cluster_config, n_workers, security, timeout, worker_timeout, torch_threads, quiet)
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
