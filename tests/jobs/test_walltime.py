"""Jobs that end mid-run (the walltime) on a local jobqueue-like cluster: the run finishes, nothing is lost.

A LocalCluster stands in for dask-jobqueue's SLURMCluster (both are SpecClusters scaled
by :class:`~gradcamo_dask.jobs.walltime.ReplacingAdaptive`); its workers get a lifetime of
a few seconds through the same Dask configuration keys the SLURM job script exports,
so each leaves mid-run as a job at its walltime would, and new ones take over. The
tasks are one-second GPU=1 tasks, then a full scoring run of a plate (score_plate and
write_profiles) through worker lifetimes, compared with an uninterrupted run. The stall
near the last chunk that such a run once hit (written chunks held by the client, lost
and redone at each turnover) also has its own test, on one in-process worker that leaves
part way.
"""

from __future__ import annotations

import dask
from distributed import Client, LocalCluster, SchedulerPlugin

from gradcamo_dask.jobs.walltime import ReplacingAdaptive
from gradcamo_dask.jobs.worker_plugins import WritableOnJoin, as_worker_plugin


class Arrivals(SchedulerPlugin):
    """Workers that joined and left the scheduler, and when (``time.monotonic()`` seconds)."""

    def __init__(self):
        self.joined, self.left, self.joined_at, self.left_at = [], [], [], []

    def add_worker(self, scheduler, worker):
        import time

        self.joined.append(worker)
        self.joined_at.append(time.monotonic())

    def remove_worker(self, scheduler, worker, *, stimulus_id, **kwargs):
        import time

        self.left.append(worker)
        self.left_at.append(time.monotonic())


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
    # (a chunk's done-marker file is rewritten whenever the chunk is). A chunk can be on disk before the client
    # hears of it; if the worker leaves in that window Dask runs its task again, which must then leave it alone
    # (CI saw chunk 2 rewritten that way once).
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


STAGGER_S = 1.0


def _lifetime_plan(startup_s: float, site_s: float, n_sites: int, sites_per_life: int = 4) -> tuple[float, float]:
    """``(sleep per site, worker lifetime)`` in seconds, from one worker's measured start-up and per-site time.

    Two one-thread workers score at most two sites at once, so a run lasts at least
    ``ceil(n_sites / 2) * sleep`` whatever the load; that is set to 1.1 x (lifetime + stagger):
    the workers present when the run starts leave before it ends, with sites left that only
    replacements can score. A lifetime holds twice the start-up (two workers start at once on
    the same cores: seen 5 to 11 s for 5 s measured alone), ``sites_per_life`` slowed sites and
    the stagger, so that every worker scores sites; the replacements mostly finish within theirs
    (a third generation was seen once in five runs, when the start-up measured alone was 3.8 s).
    """
    half, startup_s = -(-n_sites // 2), 2 * startup_s
    sleep = 1.1 * (startup_s + sites_per_life * site_s + 2 * STAGGER_S) / (half - 1.1 * sites_per_life)
    return sleep, startup_s + sites_per_life * (sleep + site_s) + STAGGER_S


def _process_cluster():
    """A LocalCluster of one-thread GPU=1 process workers, none started yet (Dask config is read as each starts)."""
    return LocalCluster(n_workers=0, threads_per_worker=1, processes=True, resources={"GPU": 1},
                        dashboard_address=":0", host="127.0.0.1")


def _uninterrupted(paths, out) -> tuple[float, float]:
    """Score the plate into ``out`` on one process worker with no lifetime; ``(start-up s, per-site s)``.

    Start-up: from asking for the worker until ``score_plate`` returned (worker start, model load,
    cell table), an upper bound of what a replacement worker needs before its first site.
    """
    import time

    from gradcamo_dask.io.plate import open_labels, open_plate
    from gradcamo_dask.jobs.score import score_plate
    from gradcamo_dask.profiles.store import write_profiles

    image = open_plate(paths["plate"])
    with _process_cluster() as cluster, Client(cluster) as client:
        started = time.monotonic()
        cluster.scale(1)
        client.wait_for_workers(1, timeout=120)
        ds = score_plate(image, open_labels(paths["plate"], like=image), paths["bundle"], client=client)
        scored = time.monotonic()
        write_profiles(ds, out, client=client, chunk_cells=4)
        return scored - started, (time.monotonic() - scored) / (image.sizes["well"] * image.sizes["site"])


def test_a_scoring_run_through_ending_lifetimes_equals_an_uninterrupted_run(tmp_path):
    # issue #18: process workers with a short lifetime (as SLURM jobs at their walltime) leave mid-run and
    # ReplacingAdaptive starts new ones; the run finishes with every cell once and the same values as one
    # worker that never left. Sites are slowed by a sleep sized from the uninterrupted run's timings, so that a
    # worker must leave mid-run on an idle or a loaded machine alike.
    import time
    from concurrent.futures import ThreadPoolExecutor, wait

    import numpy as np

    from gradcamo_dask.io.plate import open_labels, open_plate
    from gradcamo_dask.jobs.score import score_plate
    from gradcamo_dask.profiles.store import open_profiles, write_profiles
    from tests.helpers.plate_fixtures import SlowSites, assert_same_profiles, strings
    from tests.helpers.tiny_plate import write_tiny_plate_and_bundle

    paths = write_tiny_plate_and_bundle(tmp_path, wells_per_treatment=2, sites=4)  # 16 sites
    startup_s, site_s = _uninterrupted(paths, tmp_path / "uninterrupted.zarr")
    image = open_plate(paths["plate"])
    n_sites = image.sizes["well"] * image.sizes["site"]
    sleep_s, lifetime_s = _lifetime_plan(startup_s, site_s, n_sites)
    config = {**LIFETIME, "distributed.worker.lifetime.duration": f"{lifetime_s:.2f}s",
              "distributed.worker.lifetime.stagger": f"{STAGGER_S}s"}
    out = tmp_path / "lifetimes.zarr"
    with dask.config.set(config), _process_cluster() as cluster, Client(cluster) as client:
        arrivals = Arrivals()
        cluster.scheduler.add_plugin(arrivals)
        client.register_plugin(as_worker_plugin(SlowSites(sleep_s)))
        cluster.adapt(Adaptive=ReplacingAdaptive, minimum=2, maximum=2, interval="300ms", wait_count=1)
        client.wait_for_workers(1, timeout=120)
        ds = score_plate(image, open_labels(paths["plate"], like=image), paths["bundle"], client=client)
        began = time.monotonic()
        run = ThreadPoolExecutor(1).submit(write_profiles, ds, out, client=client, chunk_cells=4)
        wait([run], timeout=240)
        ended = time.monotonic()
        plan = (f"start-up {startup_s:.1f} s, sleep {sleep_s:.2f} s a site, lifetime {lifetime_s:.1f} s, "
                f"run {ended - began:.1f} s, {len(arrivals.joined)} workers joined, {len(arrivals.left)} left")
        print(f"walltime run: {plan}")
        assert run.done(), f"the run did not finish ({plan})"
        run.result()  # a failed run raises here
    assert any(began < t < ended for t in arrivals.left_at), f"no worker left mid-run ({plan})"
    # at most two workers at a time: one that joins mid-run replaces one that left
    assert any(began < t < ended for t in arrivals.joined_at), f"no worker was replaced mid-run ({plan})"
    reference, got = open_profiles(tmp_path / "uninterrupted.zarr").load(), open_profiles(out).load()
    keys = list(zip(strings(got["well"].values), strings(got["site"].values), got["object_number"].values.tolist()))
    assert len(set(keys)) == len(keys) == reference.sizes["cell"], "a cell is missing or written twice"
    assert_same_profiles(reference, got)
    assert np.isfinite(got["gradcamo"].values).any()
