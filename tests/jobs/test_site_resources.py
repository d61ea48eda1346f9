"""One site per GPU: site tasks carry resources={"GPU": 1} whenever workers advertise GPUs.

Real LocalClusters of worker processes with 8 Dask threads each: the workers of one
advertise ``GPU=1`` (as dask-cuda, jobqueue and the Helm chart start them), the other
advertises nothing. A worker plugin counts the site tasks executing at once on each
worker, from the worker's own task-state transitions.
"""

from __future__ import annotations

import time

import dask
import numpy as np
import pytest
from distributed import Client, LocalCluster, WorkerPlugin

from gradcamo_dask.jobs.resources import restrict_sites_to_gpus, site_resources
from gradcamo_dask.jobs.score import score_plate
from tests.helpers.plate_fixtures import make_bundle, make_plate, open_tiny, slow_sites

SITE_PREFIX = "score-site-"
GROUP_PREFIX = "score-sites-"  # sites_per_task > 1: one task per group of sites, picks under SITE_PREFIX


class SiteConcurrency(WorkerPlugin):
    """Counts site tasks in state "executing" on this worker; keeps the maximum and the total started."""

    name = "test-site-concurrency"

    def __init__(self, prefix: str = SITE_PREFIX) -> None:
        self.prefix = prefix

    def setup(self, worker):
        self.now, self.most, self.started = 0, 0, 0

    def transition(self, key, start, finish, **kwargs):
        if not str(key[0] if isinstance(key, tuple) else key).startswith(self.prefix):
            return
        if finish == "executing":
            self.now += 1
            self.started += 1
            self.most = max(self.most, self.now)
        elif start == "executing":
            self.now -= 1


def _counts(dask_worker):
    plugin = dask_worker.plugins[SiteConcurrency.name]
    return plugin.most, plugin.started


def _site_restrictions(dask_scheduler, prefix=SITE_PREFIX):
    return {str(k): ts.resource_restrictions for k, ts in dask_scheduler.tasks.items()
            if str(k[0] if isinstance(k, tuple) else k).startswith(prefix)}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("resources")
    plate = make_plate(root / "plate.zarr", sites=3)
    bundle = make_bundle(root / "bundle")
    image, labels = open_tiny(plate)
    with dask.config.set(scheduler="sync"):
        reference = score_plate(image, labels, bundle)["gradcamo"].values
    return {"image": image, "labels": labels, "bundle": bundle, "reference": reference,
            "sites": image.sizes["well"] * image.sizes["site"]}


def _start_cluster(resources):
    """2 worker processes x 8 Dask threads, advertising ``resources`` (None: nothing)."""
    options = {"resources": resources} if resources else {}
    return LocalCluster(n_workers=2, threads_per_worker=8, processes=True, dashboard_address=None, host="127.0.0.1",
                        **options)


@pytest.fixture(scope="module")
def gpu_cluster():
    """One cluster of two GPU=1 workers for both GPU tests (each started cluster costs two worker processes that
    import torch and MONAI); each test has its own client and waits for the other's tasks to be forgotten."""
    with _start_cluster({"GPU": 1}) as cluster:
        yield cluster


def _wait_until_no_tasks(client, timeout: float = 60) -> None:
    """The scheduler holds no task (an earlier client's are released when it closes)."""
    deadline = time.monotonic() + timeout
    while (left := client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks))) != 0:
        assert time.monotonic() < deadline, f"{left} tasks of an earlier test still on the scheduler"
        time.sleep(0.1)


def _run(tiny, cluster, sites_per_task=1):
    """Score the plate on ``cluster``; (site restrictions, per-worker (most at once, started), gradcamo).

    With ``sites_per_task`` above 1 the restrictions are ``{"groups": ..., "picks": ...}`` and the counts are
    of the group tasks.
    """
    with Client(cluster) as client:
        _wait_until_no_tasks(client)
        client.register_plugin(SiteConcurrency(SITE_PREFIX if sites_per_task == 1 else GROUP_PREFIX))  # fresh counts
        client.run(slow_sites, 0.4)  # each site lasts >= 0.4 s, so sites on one worker would overlap
        data = score_plate(tiny["image"], tiny["labels"], tiny["bundle"], client=client,
                           sites_per_task=sites_per_task)["gradcamo"].data
        persisted = client.persist(data, optimize_graph=False)
        values = persisted.compute()
        restrictions = client.run_on_scheduler(_site_restrictions)
        if sites_per_task > 1:
            restrictions = {"picks": restrictions, "groups": client.run_on_scheduler(_site_restrictions, prefix=GROUP_PREFIX)}
        counts = client.run(_counts)
    return restrictions, counts, values


def test_two_gpu_workers_with_eight_threads_run_one_site_each_at_a_time(tiny, gpu_cluster):
    restrictions, counts, values = _run(tiny, gpu_cluster)
    assert len(restrictions) == tiny["sites"] >= 8
    assert set(map(repr, restrictions.values())) == {repr({"GPU": 1})}  # on the scheduler's own task states
    assert sum(started for _, started in counts.values()) == tiny["sites"]
    assert [most for most, _ in counts.values()] == [1, 1], counts  # never two sites on one GPU worker
    np.testing.assert_allclose(values, tiny["reference"], atol=1e-5, equal_nan=True)


def test_groups_of_sites_ask_for_a_gpu_and_their_picks_do_not(tiny, gpu_cluster):
    """sites_per_task=2: the group tasks carry GPU=1 on the scheduler; the picks of their results carry nothing."""
    restrictions, counts, values = _run(tiny, gpu_cluster, sites_per_task=2)
    groups, picks = restrictions["groups"], restrictions["picks"]
    assert len(groups) == (tiny["sites"] + 1) // 2 and len(picks) == tiny["sites"]
    assert set(map(repr, groups.values())) == {repr({"GPU": 1})}
    assert set(picks.values()) == {None}  # trivial getitem tasks wait for no GPU slot
    assert sum(started for _, started in counts.values()) == len(groups)
    assert all(most == 1 for most, _ in counts.values()), counts  # one group at a time per GPU worker
    np.testing.assert_allclose(values, tiny["reference"], atol=1e-5, equal_nan=True)


def test_cpu_workers_get_no_restriction_and_run_sites_side_by_side(tiny):
    """The control: the same measurement sees overlap when nothing restricts the site tasks."""
    with _start_cluster(None) as cluster:
        restrictions, counts, values = _run(tiny, cluster)
    assert len(restrictions) == tiny["sites"]
    assert set(restrictions.values()) == {None}
    assert max(most for most, _ in counts.values()) > 1, counts
    np.testing.assert_allclose(values, tiny["reference"], atol=1e-5, equal_nan=True)


def test_site_resources_follows_what_workers_advertise():
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0",
                      resources={"GPU": 1}) as gpu, Client(gpu) as client:
        assert site_resources(client) == {"GPU": 1}
        graph = dask.array.ones(4, chunks=2).__dask_graph__()
        layer = next(iter(graph.layers))
        restricted = restrict_sites_to_gpus(graph, layer, client)
        assert restricted.layers[layer].annotations == {"resources": {"GPU": 1}}
        assert dict(restricted) == dict(graph)  # same tasks, only annotated
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as cpu, \
            Client(cpu) as client:
        assert site_resources(client) is None
        assert restrict_sites_to_gpus(graph, layer, client) is graph
    assert site_resources(None) is None  # no distributed client: Dask's local schedulers
