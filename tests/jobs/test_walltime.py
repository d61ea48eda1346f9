"""Jobs that end mid-run (the walltime) on a local jobqueue-like cluster: the run finishes, nothing is lost.

A LocalCluster stands in for dask-jobqueue's SLURMCluster (both are SpecClusters scaled
by :class:`~gradcamo_dask.jobs.walltime.ReplacingAdaptive`); its workers get a lifetime of
a few seconds through the same Dask configuration keys the SLURM job script exports,
so each leaves mid-run as a job at its walltime would, and new ones take over. The
tasks are one-second GPU=1 tasks. The scoring run through lifetimes that stalled near its
last chunk (written chunks held by the client, lost and redone at each turnover) has its
own test below, on one in-process worker that leaves part way.
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
            "distributed.worker.lifetime.restart": False, "distributed.deploy.lost-worker-timeout": "500ms",
            # a lifetime counts from process start: on a loaded machine a worker can end before its first task
            # does, and the task starts over elsewhere (dask/distributed#3141); Dask's default of 3 such
            # attempts turned that into KilledWorker in CI-like load, which is not what this test is about
            "distributed.scheduler.allowed-failures": 30}


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


def test_a_worker_leaving_after_chunks_were_written_costs_no_written_chunk(tmp_path, monkeypatch):
    # The scoring run through lifetimes (issue #18) stalled near its end because the client held every chunk's
    # future until the last: a worker that left with no other one free to take its data lost the results of the
    # chunks it had written, and Dask wrote them (and scored their sites) again, at every worker turnover.
    # Here the only worker leaves once some chunks are written: none of those may be written a second time
    # (a chunk's done-marker file is rewritten whenever the chunk is).
    import threading
    import time

    import numpy as np

    from gradcamo_dask.io.plate import open_labels, open_plate
    from gradcamo_dask.jobs import score as scoring
    from gradcamo_dask.jobs.score import score_plate
    from gradcamo_dask.profiles.store import DONE_ARRAY, open_profiles, write_profiles
    from tests.helpers.tiny_plate import write_tiny_plate_and_bundle

    paths = write_tiny_plate_and_bundle(tmp_path)
    real_site = scoring.score_site

    def slow_site(*args, **kwargs):  # looked up at run time in this process: not pickled
        time.sleep(0.5)
        return real_site(*args, **kwargs)

    monkeypatch.setattr(scoring, "score_site", slow_site)
    out = tmp_path / "p.zarr"
    markers = out / DONE_ARRAY / "c"
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        image = open_plate(paths["plate"])
        ds = score_plate(image, open_labels(paths["plate"], like=image), paths["bundle"], client=client)
        n_chunks = -(-ds.sizes["cell"] // 2)
        run = threading.Thread(target=write_profiles, args=(ds, out), kwargs={"client": client, "chunk_cells": 2})
        run.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (not markers.is_dir() or len(list(markers.iterdir())) < 2):
            time.sleep(0.05)
        written = {p.name: p.stat().st_mtime_ns for p in markers.iterdir()}
        assert 2 <= len(written) < n_chunks, "the run did not stop part way to test this"
        cluster.scale(0)  # the worker leaves (no other worker can take its data) ...
        while client.scheduler_info()["workers"] and time.monotonic() < deadline:
            time.sleep(0.05)
        cluster.scale(1)  # ... and a new one takes over
        run.join(90)
    assert not run.is_alive()
    assert open_profiles(out).sizes["cell"] == ds.sizes["cell"]
    again = sorted(name for name, mtime in written.items() if (markers / name).stat().st_mtime_ns != mtime)
    assert not again, f"chunks {again} were written before the worker left and written again after"
