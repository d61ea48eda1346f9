"""Jobs that end mid-run (the walltime) on a local jobqueue-like cluster: the run finishes, nothing is lost.

A LocalCluster stands in for dask-jobqueue's SLURMCluster (both are SpecClusters scaled
by :class:`~gradcamo_dask.jobs.walltime.ReplacingAdaptive`); its workers get a lifetime of
a few seconds through the same Dask configuration keys the SLURM job script exports,
so each leaves mid-run as a job at its walltime would, and new ones take over. The
tasks are one-second GPU=1 tasks, not plate scoring: a scoring run with 60 s lifetimes
on this loaded machine stalled at 30 of 31 chunks (open, see the branch report).
"""

from __future__ import annotations

import dask
from distributed import Client, LocalCluster, SchedulerPlugin

from gradcamo_dask.jobs.walltime import ReplacingAdaptive
from gradcamo_dask.jobs.worker_plugins import WritableOnJoin, as_worker_plugin


class Arrivals(SchedulerPlugin):
    """Workers that joined and left the scheduler, with the reason they left."""

    def __init__(self):
        self.joined, self.left = [], []

    def add_worker(self, scheduler, worker):
        self.joined.append(worker)

    def remove_worker(self, scheduler, worker, *, stimulus_id, **kwargs):
        self.left.append(worker)


def _slow_square(x):
    import time

    time.sleep(1.0)
    return x * x


LIFETIME = {"distributed.worker.lifetime.duration": "15s", "distributed.worker.lifetime.stagger": "2s",
            "distributed.worker.lifetime.restart": False, "distributed.deploy.lost-worker-timeout": "500ms"}


def _run_through_lifetimes(adaptive, timeout_s: float):
    """40 one-second GPU=1 tasks on 2 workers whose lifetime (15 s) ends mid-run; (results or None, arrivals)."""
    from distributed import wait

    with dask.config.set(LIFETIME), \
            LocalCluster(n_workers=0, threads_per_worker=2, processes=True, resources={"GPU": 1},
                         dashboard_address=":0", host="127.0.0.1") as cluster, Client(cluster) as client:
        arrivals = Arrivals()
        cluster.scheduler.add_plugin(arrivals)
        cluster.adapt(Adaptive=adaptive, minimum=2, maximum=2, interval="300ms", wait_count=1)
        futures = client.map(_slow_square, range(40), resources={"GPU": 1}, pure=False)
        try:
            wait(futures, timeout=timeout_s)
            results = client.gather(futures)
        except TimeoutError:
            results = None
    return results, arrivals


def test_workers_whose_lifetime_ends_are_replaced_and_no_result_is_lost():
    results, arrivals = _run_through_lifetimes(ReplacingAdaptive, 300)
    assert results == [x * x for x in range(40)]
    assert len(arrivals.left) >= 2, "no worker reached its lifetime during the run"
    assert len(arrivals.joined) >= 3, "no ended worker was replaced"


def test_a_joining_worker_that_cannot_write_leaves_the_cluster():
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0",
                      host="127.0.0.1") as cluster, Client(cluster) as client:
        client.wait_for_workers(1, timeout=60)
        client.register_plugin(as_worker_plugin(WritableOnJoin("/proc/gradcamo-cannot-write-here/p.zarr")))
        cluster.scale(2)  # a new "job" joins: it probes the output, fails, and closes itself
        import time

        deadline = time.monotonic() + 60
        while client.scheduler_info()["workers"] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not client.scheduler_info()["workers"]
