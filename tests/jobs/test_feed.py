"""Feeding a model runner: fixed-size batches across sites, per-batch crops, prefetch, no host syncs in the loop."""

from __future__ import annotations

import threading
import time

import dask
import numpy as np
import pytest
import torch

from gradcamo_dask.cells import cell_table, crop_site
from gradcamo_dask.engine.bundles import open_bundle
from gradcamo_dask.engine.explain import explain
from gradcamo_dask.normalize import normalize_crops
from gradcamo_dask.io.platemap import platemap_of
from gradcamo_dask.jobs.feed import ExplainRunner, FeedStats, SiteJob, SleepRunner, score_sites
from tests.helpers.plate_fixtures import CROP_SHAPE, LAYERS, make_bundle, make_plate, open_tiny

COLUMNS = ["object_number", "center_z", "center_y", "center_x"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("feed")
    image, labels = open_tiny(make_plate(root / "plate.zarr", wells_per_treatment=1, sites=2))
    cells = cell_table(labels, platemap_of(image), size=CROP_SHAPE)
    sites = []
    with dask.config.set(scheduler="sync"):
        for (well, site), rows in cells.groupby(["well", "site"], sort=False):
            w = list(image["well"].values).index(well)
            s = list(image["site"].values).index(site)
            sites.append((image.data[w, s].compute(), labels.data[w, s].compute(),
                          rows[COLUMNS].reset_index(drop=True), {"well": well, "site": int(site)}))
    return {"sites": sites, "bundle": open_bundle(make_bundle(root / "bundle"))}


def _jobs(sites, read_delay: float = 0.0):
    def reader(image, labels):
        def read():
            time.sleep(read_delay)
            return image, labels
        return read

    return [SiteJob(reader(image, labels), rows, where) for image, labels, rows, where in sites]


class Recorder:
    def __init__(self, inner=None) -> None:
        self.sizes, self.inner = [], inner

    def __call__(self, crops, masks):
        self.sizes.append(int(crops.shape[0]))
        assert crops.dtype == np.float32 and masks.dtype == bool
        if self.inner is not None:
            return self.inner(crops, masks)
        return {"first": np.asarray(crops[:, 0, 0, 0, 0]).copy()}


def test_batches_have_a_fixed_size_across_sites_and_results_come_back_per_site(tiny):
    sites, bundle = tiny["sites"], tiny["bundle"]
    counts = [len(rows) for _, _, rows, _ in sites]
    assert len(counts) == 4 and sum(counts) > 12
    norm = bundle.config.normalization
    recorder = Recorder()
    out = score_sites(_jobs(sites), recorder, crop_size=CROP_SHAPE, normalization=norm, batch_size=5, prefetch=True)
    total = sum(counts)
    assert recorder.sizes == [5] * (total // 5) + ([total % 5] if total % 5 else [])  # sites do not end batches
    for (image, labels, rows, where), got in zip(sites, out):  # each cell's crop went to its own site's rows
        crops, _ = crop_site(image, labels, rows, CROP_SHAPE, **where)
        np.testing.assert_array_equal(got["first"], normalize_crops(crops, norm)[:, 0, 0, 0, 0])


def test_explain_runner_across_sites_equals_explain_per_site(tiny):
    sites, bundle = tiny["sites"], tiny["bundle"]
    norm = bundle.config.normalization
    runner = ExplainRunner(bundle.model, LAYERS, check_finite=False)
    out = score_sites(_jobs(sites), runner, crop_size=CROP_SHAPE, normalization=norm, batch_size=6)
    for (image, labels, rows, where), got in zip(sites, out):
        crops, masks = crop_site(image, labels, rows, CROP_SHAPE, **where)
        want = explain(bundle.model, normalize_crops(crops, norm), masks, layers=LAYERS)
        np.testing.assert_allclose(got["logits"], want.logits, atol=1e-5)
        for k, name in enumerate(LAYERS):
            np.testing.assert_allclose(got["gradcamo"][:, k], want.gradcamo[name], atol=1e-6)
            np.testing.assert_allclose(got[f"cam_lowres_{k}"], want.cams[name], atol=1e-6)


def test_prefetch_overlaps_reads_with_the_model(tiny):
    sites = tiny["sites"]
    shapes = {"deep": ((3,), np.float32)}
    norm = tiny["bundle"].config.normalization
    runs = {}
    for prefetch in (False, True):
        stats = FeedStats()
        start = time.perf_counter()
        # the stand-in GPU (0.4 s per batch of 4) is slower than a read (0.15 s): prefetch can hide the reads
        out = score_sites(_jobs(sites, read_delay=0.15), SleepRunner(0.1, shapes), crop_size=CROP_SHAPE,
                          normalization=norm, batch_size=4, prefetch=prefetch, stats=stats)
        runs[prefetch] = (time.perf_counter() - start, stats)
        assert [o["deep"].shape for o in out] == [(len(s[2]), 3) for s in sites]
    (serial, s_stats), (overlapped, p_stats) = runs[False], runs[True]
    assert s_stats.wait_s > 0.6  # without prefetch the "GPU" waits for every read (4 x 0.15 s)
    assert p_stats.idle_share < 0.6 * s_stats.idle_share  # with it, for about the first one only
    assert overlapped < serial - 0.3
    assert p_stats.cells == s_stats.cells == sum(len(s[2]) for s in sites)


class SyncCounter:
    """Counts host-sync calls (.item, bool, float, int, .cpu, .numpy, .tolist, __array__) on torch tensors
    made in one thread."""

    NAMES = ("item", "__bool__", "__float__", "__int__", "cpu", "numpy", "tolist", "__array__")

    def __init__(self, monkeypatch, thread: int) -> None:
        self.calls: list[str] = []
        self.active = False
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)

            def counted(tensor, *args, _name=name, _original=original, **kwargs):
                if self.active and threading.get_ident() == thread:
                    self.calls.append(_name)
                return _original(tensor, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)


def test_no_host_sync_inside_the_batch_loop(tiny, monkeypatch):
    sites, bundle = tiny["sites"], tiny["bundle"]
    counter = SyncCounter(monkeypatch, threading.get_ident())
    inner = ExplainRunner(bundle.model, LAYERS, check_finite=False)

    def runner(crops, masks):
        counter.active = True
        try:
            return inner(crops, masks)
        finally:
            counter.active = False

    stats = FeedStats()
    out = score_sites(_jobs(sites), runner, crop_size=CROP_SHAPE, normalization=bundle.config.normalization,
                      batch_size=4, stats=stats)
    assert stats.batches >= 4 and len(out) == len(sites)
    assert counter.calls == [], counter.calls  # bound: 0 host syncs per batch
    checked = ExplainRunner(bundle.model, LAYERS, check_finite=True)  # the counter does see syncs
    counter.active = True
    checked(*crop_site(*sites[0][:3], CROP_SHAPE))
    counter.active = False
    assert len(counter.calls) >= 1


def test_score_plate_with_several_sites_per_task_equals_one_site_per_task(tmp_path, monkeypatch):
    from gradcamo_dask.jobs import score as pipeline
    from gradcamo_dask.jobs.score import score_plate
    from gradcamo_dask.profiles.store import open_profiles, write_profiles
    from tests.helpers.plate_fixtures import assert_same_profiles

    image, labels = open_tiny(make_plate(tmp_path / "plate.zarr", wells_per_treatment=1, sites=2))
    bundle = make_bundle(tmp_path / "bundle")
    with dask.config.set(scheduler="sync"):
        one = score_plate(image, labels, bundle).compute()
        grouped_ds = score_plate(image, labels, bundle, sites_per_task=3, batch_size=5)
        real, scored = pipeline.score_site_group, []

        def counted(images, labels, cells, specs):
            scored.append(len(specs))
            return real(images, labels, cells, specs)

        monkeypatch.setattr(pipeline, "score_site_group", counted)
        grouped = grouped_ds.compute()
        assert sorted(scored) == [1, 3]  # 4 sites in 2 tasks (3 + 1)
    tasks = [k for k in grouped_ds["deep"].data.__dask_graph__() if str(k[0] if isinstance(k, tuple) else k)
             .startswith("score-sites-")]
    assert len(tasks) == 2
    assert_same_profiles(one, grouped, atol=1e-5)
    with dask.config.set(scheduler="threads"):
        write_profiles(grouped_ds, tmp_path / "p.zarr", chunk_cells=5)
    assert_same_profiles(grouped, open_profiles(tmp_path / "p.zarr"))
    with pytest.raises(Exception, match="sites_per_task"):
        score_plate(image, labels, bundle, sites_per_task=0)


def test_a_read_error_in_the_prefetch_thread_reaches_the_caller(tiny):
    sites = tiny["sites"]

    def broken():
        raise OSError("chunk 0.0.0 of plate.zarr cannot be read")

    jobs = _jobs(sites[:1]) + [SiteJob(broken, sites[1][2], sites[1][3])]
    started = time.perf_counter()
    with pytest.raises(OSError, match="cannot be read"):
        score_sites(jobs, SleepRunner(0.001, {"deep": ((2,), np.float32)}), crop_size=CROP_SHAPE,
                    normalization=tiny["bundle"].config.normalization, batch_size=64, prefetch=True)
    assert time.perf_counter() - started < 5  # no hang waiting for the thread


def test_the_background_level_is_computed_once_per_site_and_only_where_a_window_runs_past(tiny, monkeypatch):
    from gradcamo_dask import crop_geometry

    sites, bundle = tiny["sites"], tiny["bundle"]
    norm = bundle.config.normalization
    half = CROP_SHAPE[1] // 2
    inside = [(image, labels, rows[rows["center_y"].between(half, image.shape[2] - half)
                                  & rows["center_x"].between(half, image.shape[3] - half)].reset_index(drop=True),
               where)
              for image, labels, rows, where in sites[:2]]  # no window of these runs past the site
    sites = inside + sites[2:]
    pasts = [crop_geometry.windows_past(rows[COLUMNS[1:]].to_numpy(float), CROP_SHAPE, image.shape[1:])
             for image, labels, rows, _ in sites]
    assert pasts[:2] == [False, False] and any(pasts[2:]) and min(len(s[2]) for s in sites) > 0
    calls = []
    real = crop_geometry.background_level
    monkeypatch.setattr(crop_geometry, "background_level", lambda *a, **k: calls.append(1) or real(*a, **k))
    jobs = [SiteJob(job.read, job.cells, job.where, outside="background") for job in _jobs(sites)]
    out = score_sites(jobs, Recorder(), crop_size=CROP_SHAPE, normalization=norm, batch_size=2)
    assert len(calls) == sum(pasts)  # once per site that needs it, though each site spans several micro-batches
    for (image, labels, rows, where), got in zip(sites, out):
        crops, _ = crop_site(image, labels, rows, CROP_SHAPE, outside="background", **where)
        np.testing.assert_array_equal(got["first"], normalize_crops(crops, norm)[:, 0, 0, 0, 0])
