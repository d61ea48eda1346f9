"""Batches of a fixed size that span sites, several sites per task: the same profiles, no cell lost or doubled."""

from __future__ import annotations

import dask
import numpy as np
import pytest

from gradcamo_dask.cells import cell_table
from gradcamo_dask.io.platemap import platemap_of
from gradcamo_dask.jobs.score import score_plate
from tests.helpers.plate_fixtures import CROP_SHAPE, assert_same_profiles, make_bundle, make_plate, open_tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("batching")
    image, labels = open_tiny(make_plate(root / "plate.zarr", wells_per_treatment=1, sites=2))
    return {"root": root, "image": image, "labels": labels, "bundle": make_bundle(root / "bundle")}


def test_sites_per_task_and_batch_size_change_nothing_and_lose_no_cell(tiny):
    image, labels, bundle = tiny["image"], tiny["labels"], tiny["bundle"]
    table = cell_table(labels, platemap_of(image), size=CROP_SHAPE)  # the bundle's crop grid
    with dask.config.set(scheduler="sync"):
        runs = {(spt, bs): score_plate(image, labels, bundle, sites_per_task=spt, batch_size=bs).compute()
                for spt, bs in ((1, 8), (3, 8), (1, 32), (3, 32))}
    base = runs[(1, 8)]
    keys = list(zip(base["well"].values.astype(str), base["site"].values.astype(int),
                    base["object_number"].values.astype(int)))
    assert len(keys) == len(set(keys)) > 8  # no cell twice
    assert len({(w, s) for w, s, _ in keys}) == 4  # cells of all 4 sites
    assert keys == list(zip(table["well"].astype(str), table["site"].astype(int), table["object_number"].astype(int)))
    assert np.isfinite(base["deep"].values).all()
    for setting, ds in runs.items():
        assert ds.sizes["cell"] == len(table), setting  # none lost
        assert_same_profiles(base, ds, atol=1e-5)  # same cells, same order, same numbers (float rounding)


def test_cli_score_passes_batch_size_and_sites_per_task(tiny, monkeypatch, capsys):
    import gradcamo_dask.cli.score as command
    import gradcamo_dask.jobs.score as scoring
    import gradcamo_dask.jobs.worker_plugins as worker_plugins
    from gradcamo_dask import cli
    from gradcamo_dask.errors import InputError

    seen = {}

    def fake_score_plate(*args, **kwargs):
        seen.update(kwargs)
        raise InputError("stop here: only the options are checked")

    monkeypatch.setattr(scoring, "score_plate", fake_score_plate)
    monkeypatch.setattr(command, "connect", lambda args: None)  # no cluster for an option check
    monkeypatch.setattr(worker_plugins, "guard_output_on_join", lambda client, out: None)  # nor its join hook
    plate = str(tiny["root"] / "plate.zarr")
    base = ["score", plate, "--labels", plate, "--model", str(tiny["bundle"]), "--out", str(tiny["root"] / "o.zarr")]
    assert cli.main(base) == 1
    assert seen["batch_size"] == 32 and seen["sites_per_task"] == 1  # defaults
    assert cli.main([*base, "--batch-size", "64", "--sites-per-task", "3"]) == 1
    assert seen["batch_size"] == 64 and seen["sites_per_task"] == 3
    seen.clear()
    assert cli.main([*base, "--sites-per-task", "0"]) == 1
    assert not seen and "--sites-per-task must be a whole number >= 1" in capsys.readouterr().err
    assert not (tiny["root"] / "o.zarr").exists()
