"""Jobs that end mid-run (the walltime) on a local jobqueue-like cluster: the run finishes, no cell is lost.

A LocalCluster stands in for dask-jobqueue's SLURMCluster (both are SpecClusters scaled
by :class:`~gradcamo_dask.jobs.walltime.ReplacingAdaptive`); its workers get a lifetime of
a few seconds through the same Dask configuration keys the SLURM job script exports,
so each leaves mid-run as a job at its walltime would, and new ones take over.
"""

from __future__ import annotations

import dask
import numpy as np
import pytest
from distributed import Client, LocalCluster, SchedulerPlugin, WorkerPlugin

from gradcamo_dask.jobs.score import score_plate
from gradcamo_dask.jobs.walltime import ReplacingAdaptive
from gradcamo_dask.jobs.worker_plugins import WritableOnJoin, as_worker_plugin, guard_output_on_join
from gradcamo_dask.profiles.store import open_profiles, write_profiles
from tests.helpers.plate_fixtures import assert_same_profiles, make_bundle, make_plate, open_tiny, slow_sites, strings


class Arrivals(SchedulerPlugin):
    """Workers that joined and left the scheduler, with the reason they left."""

    def __init__(self):
        self.joined, self.left = [], []

    def add_worker(self, scheduler, worker):
        self.joined.append(worker)

    def remove_worker(self, scheduler, worker, *, stimulus_id, **kwargs):
        self.left.append(worker)


class SlowSites(WorkerPlugin):
    """Every worker, also one that joins later, takes ``seconds`` longer per site (room for lifetimes to end)."""

    name = "test-slow-sites"

    def __init__(self, seconds):
        self.seconds = seconds

    def setup(self, worker):
        slow_sites(self.seconds)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("walltime")
    plate = make_plate(root / "plate.zarr", sites=4)  # 16 sites: a run longer than a worker lifetime
    bundle = make_bundle(root / "bundle")
    image, labels = open_tiny(plate)
    with dask.config.set(scheduler="sync"):
        reference = score_plate(image, labels, bundle).compute()
    return {"image": image, "labels": labels, "bundle": bundle, "reference": reference}


LIFETIME = {"distributed.worker.lifetime.duration": "60s", "distributed.worker.lifetime.stagger": "5s",
            "distributed.worker.lifetime.restart": False, "distributed.deploy.lost-worker-timeout": "500ms"}


def test_jobs_ending_mid_run_are_replaced_and_no_cell_is_lost(tiny, tmp_path):
    store = tmp_path / "profiles.zarr"
    with dask.config.set(LIFETIME), \
            LocalCluster(n_workers=0, threads_per_worker=2, processes=True, resources={"GPU": 1},
                         dashboard_address=":0", host="127.0.0.1") as cluster, Client(cluster) as client:
        arrivals = Arrivals()
        cluster.scheduler.add_plugin(arrivals)
        # registered before any worker exists, as on a SLURM cluster whose jobs are still queued:
        # every worker gets them as it joins
        client.register_plugin(SlowSites(6.0))
        guard_output_on_join(client, str(store))
        cluster.adapt(Adaptive=ReplacingAdaptive, minimum=2, maximum=2, interval="300ms", wait_count=1)
        client.wait_for_workers(1, timeout=300)
        ds = score_plate(tiny["image"], tiny["labels"], tiny["bundle"], client=client)
        write_profiles(ds, store, client=client, chunk_cells=4)
        checked = client.run(lambda dask_worker: dask_worker.plugins[WritableOnJoin.name].plugin.checked,
                             on_error="return")
    assert len(arrivals.left) >= 2, "no worker reached its lifetime during the run"
    assert len(arrivals.joined) >= 3, "no ended worker was replaced"
    late = set(arrivals.joined[2:]) & {w for w, v in checked.items() if isinstance(v, str)}
    assert late, checked  # replacement workers that joined mid-run proved they can write first
    back = open_profiles(store)
    keys = [f"{w}/{s}/{o}" for w, s, o in zip(strings(back["well"].values), back["site"].values,
                                               back["object_number"].values)]
    assert len(keys) == len(set(keys)) == tiny["reference"].sizes["cell"]
    assert_same_profiles(tiny["reference"], back, atol=1e-5)


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
