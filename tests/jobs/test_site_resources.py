"""One site per GPU: site tasks carry resources={"GPU": 1} whenever workers advertise GPUs.

Real LocalClusters of worker processes with 8 Dask threads each: the workers of one
advertise ``GPU=1`` (as dask-cuda, jobqueue and the Helm chart start them), the other
advertises nothing. A worker plugin counts the site tasks executing at once on each
worker, from the worker's own task-state transitions.
"""

from __future__ import annotations

import dask
import numpy as np
import pytest
from distributed import Client, LocalCluster, WorkerPlugin

from gradcamo_dask.jobs.resources import restrict_sites_to_gpus, site_resources
from gradcamo_dask.jobs.score import score_plate
from tests.helpers.plate_fixtures import make_bundle, make_plate, open_tiny, slow_sites

SITE_PREFIX = "score-site-"


class SiteConcurrency(WorkerPlugin):
    """Counts site tasks in state "executing" on this worker; keeps the maximum and the total started."""

    name = "test-site-concurrency"

    def setup(self, worker):
        self.now, self.most, self.started = 0, 0, 0

    def transition(self, key, start, finish, **kwargs):
        if not str(key[0] if isinstance(key, tuple) else key).startswith(SITE_PREFIX):
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


def _site_restrictions(dask_scheduler):
    return {str(k): ts.resource_restrictions for k, ts in dask_scheduler.tasks.items()
            if str(k[0] if isinstance(k, tuple) else k).startswith(SITE_PREFIX)}


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


def _run(tiny, resources):
    """Score the plate on 2 workers x 8 threads; (site restrictions, per-worker (most at once, started), gradcamo)."""
    options = {"resources": resources} if resources else {}
    with LocalCluster(n_workers=2, threads_per_worker=8, processes=True, dashboard_address=None,
                      host="127.0.0.1", **options) as cluster, Client(cluster) as client:
        client.register_plugin(SiteConcurrency())
        client.run(slow_sites, 0.4)  # each site lasts >= 0.4 s, so sites on one worker would overlap
        data = score_plate(tiny["image"], tiny["labels"], tiny["bundle"], client=client)["gradcamo"].data
        persisted = client.persist(data, optimize_graph=False)
        values = persisted.compute()
        restrictions = client.run_on_scheduler(_site_restrictions)
        counts = client.run(_counts)
    return restrictions, counts, values


def test_two_gpu_workers_with_eight_threads_run_one_site_each_at_a_time(tiny):
    restrictions, counts, values = _run(tiny, {"GPU": 1})
    assert len(restrictions) == tiny["sites"] >= 8
    assert set(map(repr, restrictions.values())) == {repr({"GPU": 1})}  # on the scheduler's own task states
    assert sum(started for _, started in counts.values()) == tiny["sites"]
    assert [most for most, _ in counts.values()] == [1, 1], counts  # never two sites on one GPU worker
    np.testing.assert_allclose(values, tiny["reference"], atol=1e-5, equal_nan=True)


def test_cpu_workers_get_no_restriction_and_run_sites_side_by_side(tiny):
    """The control: the same measurement sees overlap when nothing restricts the site tasks."""
    restrictions, counts, values = _run(tiny, None)
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
