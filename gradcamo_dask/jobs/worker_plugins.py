"""Worker plugins every gradcamo-dask cluster gets: torch threads sized to the job, write access on join.

Both run on every worker as it starts, including workers that join long after the
run began (SLURM jobs replacing ones that hit the walltime, pods rescheduled).
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from gradcamo_dask.jobs.machine import usable_cores

__all__ = ["TorchThreads", "WritableOnJoin", "as_worker_plugin", "guard_output_on_join", "workers_per_host"]

logger = logging.getLogger(__name__)


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
    host)`` (at least 1). ``cores`` is the job's share on that worker
    (:func:`~gradcamo_dask.jobs.machine.usable_cores`: affinity, SLURM_CPUS_PER_TASK,
    cgroup quota), never the node's. ``hosts`` maps a host to its worker count (from
    :func:`workers_per_host`); a host not listed (a worker that joins later) counts
    ``per_host`` workers (the GPUs per SLURM job: dask-cuda starts one worker per GPU).
    """

    name = "gradcamo-torch-threads"
    idempotent = False

    def __init__(self, threads: int | None = None, hosts: dict[str, int] | None = None, per_host: int = 1) -> None:
        self.threads = threads
        self.hosts = dict(hosts or {})
        self.per_host = max(1, int(per_host))

    def threads_for(self, worker: Any) -> int:
        """torch threads for ``worker`` (has ``.ip`` and ``.state.nthreads``)."""
        if self.threads:
            return int(self.threads)
        host = str(getattr(worker, "ip", "") or "")
        local = max(1, self.hosts.get(host, self.per_host))
        return max(1, usable_cores() // (max(1, int(worker.state.nthreads)) * local))

    def setup(self, worker: Any) -> None:
        import torch

        n = self.threads_for(worker)
        torch.set_num_threads(n)
        os.environ["OMP_NUM_THREADS"] = str(n)
        logger.debug("worker %s: %d torch threads", getattr(worker, "address", "?"), n)


class WritableOnJoin:
    """A worker plugin: each worker, as it joins, proves it can write the output store.

    :func:`~gradcamo_dask.io.storage.check_writable` checks the workers present when
    the run starts; this plugin checks every later one too (a SLURM job that starts
    on a node without the shared filesystem mounted). A worker that cannot write
    logs why and closes itself (and its nanny, so it is not restarted) before it
    takes a site. ``checked`` holds the probe path written (then removed) on success.
    """

    name = "gradcamo-writable-on-join"
    idempotent = False

    def __init__(self, url: str, storage_options: dict | None = None) -> None:
        self.url = str(url)
        self.storage_options = dict(storage_options or {})
        self.checked: str | None = None

    def setup(self, worker: Any) -> None:
        from gradcamo_dask.io.storage import probe_writable

        try:
            self.checked = probe_writable(self.url, self.storage_options)
        except Exception as error:  # noqa: BLE001 - any filesystem error means "cannot write"
            reason = (f"gradcamo-dask: worker {getattr(worker, 'address', '?')} cannot write the output {self.url} "
                      f"({type(error).__name__}: {error}); it leaves the cluster. Mount the output's filesystem on "
                      "every node, or choose an output every node can write.")
            logger.error(reason)
            asyncio.ensure_future(worker.close(nanny=True, reason="gradcamo-output-not-writable"))


def as_worker_plugin(plugin: Any) -> Any:
    """Wrap ``plugin`` (``name`` and ``setup(worker)``) as a :class:`distributed.WorkerPlugin`.

    The plugins above stay importable without distributed; this adapter forwards
    ``setup`` and exposes the wrapped object as ``.plugin`` on the worker.
    """
    from distributed import WorkerPlugin

    class _Plugin(WorkerPlugin):
        name = plugin.name
        idempotent = False

        def __init__(self) -> None:
            self.plugin = plugin

        def setup(self, worker: Any) -> None:
            self.plugin.setup(worker)

    return _Plugin()


def guard_output_on_join(client: Any, url: str, storage_options: dict | None = None) -> None:
    """Make every worker that joins from now on prove it can write ``url`` (:class:`WritableOnJoin`).

    Call after :func:`~gradcamo_dask.io.storage.check_writable` has checked the workers
    present. The scheduler keeps the plugin for later workers even when the broadcast
    to present ones fails because one of them is leaving (its lifetime ended), so that
    failure is logged, not raised.
    """
    try:
        client.register_plugin(as_worker_plugin(WritableOnJoin(url, storage_options)))
    except OSError as error:  # distributed's CommClosedError is an OSError
        logger.warning("a worker left while the output check was being installed (%s); workers that join "
                       "later still check %s", error, url)
