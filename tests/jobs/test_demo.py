"""The demo resumes: a rerun with the same --out reuses complete bundles and finished profiles,
retrains only what did not finish, and refuses a folder made with other settings."""

from __future__ import annotations

import json

import pytest

from gradcamo_dask.errors import InputError
from gradcamo_dask.jobs.demo import MODELS, complete_bundle, run_demo

TINY = dict(doses_um=(0.0, 10.0), sites_per_well=2, site_shape=(8, 96, 96), cell_radius=10.0,
            crop_shape=(None, 40, 40), input_shape=(8, 32, 32), epochs=1, max_train_cells=16)


@pytest.fixture(scope="module")
def scheduler():
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster:
        yield cluster.scheduler_address


def chunk_times(out) -> dict:
    """Modification times of every data chunk file of the demo's profiles stores."""
    return {str(p): p.stat().st_mtime_ns for n in MODELS for p in (out / f"profiles_{n}.zarr").rglob("*")
            if p.is_file() and "/c/" in str(p)}


def test_demo_rerun_resumes_instead_of_retraining(tmp_path, scheduler):
    out = tmp_path / "demo"
    quiet = dict(settings=TINY, scheduler=scheduler, progress=False, log=lambda *_: None)
    first = run_demo(out, **quiet)
    assert first["retrained"] == sorted(MODELS)
    weights = {n: (out / f"model_{n}" / "model.safetensors").stat().st_mtime_ns for n in MODELS}
    profiles = chunk_times(out)

    lines: list[str] = []
    again = run_demo(out, **{**quiet, "log": lines.append})
    assert again["retrained"] == []  # both bundles were complete: reused, not retrained
    assert {n: (out / f"model_{n}" / "model.safetensors").stat().st_mtime_ns for n in MODELS} == weights
    assert chunk_times(out) == profiles and profiles  # no profile chunk was written again
    assert sum("reusing the complete bundle" in line for line in lines) == 2
    assert sum("chunks were already written: kept" in line for line in lines) == 2
    assert again["comparison"].equals(first["comparison"])  # same scores as the uninterrupted run

    # a bundle whose training did not finish (no cells.csv yet) is retrained; the other one is kept
    (out / "model_neighbours" / "cells.csv").unlink()
    assert not complete_bundle(out / "model_neighbours", None)
    third = run_demo(out, **quiet)
    assert third["retrained"] == ["neighbours"]
    assert (out / "model_own_cell" / "model.safetensors").stat().st_mtime_ns == weights["own_cell"]
    assert json.loads((out / "demo.json").read_text())["retrained"] == ["neighbours"]

    with pytest.raises(InputError, match="other settings .*epochs.*--overwrite"):
        run_demo(out, **{**quiet, "settings": {**TINY, "epochs": 2}})
