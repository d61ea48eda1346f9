"""The demo resumes: a rerun with the same --out reuses complete bundles and finished profiles,
retrains only what did not finish, and refuses a folder made with other settings."""

from __future__ import annotations

import json

import pytest

from gradcamo_dask.errors import InputError
from gradcamo_dask.jobs.demo import MODELS, complete_bundle, run_demo
from tests.helpers.demo_run import TINY_DEMO as TINY
from tests.helpers.demo_run import copy_demo


def chunk_times(out) -> dict:
    """Modification times of every data chunk file of the demo's profiles stores."""
    return {str(p): p.stat().st_mtime_ns for n in MODELS for p in (out / f"profiles_{n}.zarr").rglob("*")
            if p.is_file() and "/c/" in str(p)}


def test_demo_rerun_resumes_instead_of_retraining(tmp_path, tiny_demo, one_worker_scheduler):
    # the first, uninterrupted run is the session's tiny demo (the CLI test checks its results); reruns go to a copy
    out = copy_demo(tiny_demo, tmp_path / "demo")
    quiet = dict(settings=TINY, scheduler=one_worker_scheduler, progress=False, log=lambda *_: None)
    first = tiny_demo["result"]
    assert first["retrained"] == sorted(MODELS)
    weights = {n: (out / f"model_{n}" / "model.safetensors").stat().st_mtime_ns for n in MODELS}
    profiles = chunk_times(out)

    lines: list[str] = []
    again = run_demo(out, **{**quiet, "log": lines.append})
    assert again["retrained"] == []  # both bundles were complete: reused, not retrained
    assert {n: (out / f"model_{n}" / "model.safetensors").stat().st_mtime_ns for n in MODELS} == weights
    assert chunk_times(out) == profiles and profiles  # no profile chunk was written again
    assert sum("reusing the complete bundle" in line for line in lines) == 2
    assert sum("chunks were already written: kept" in line for line in lines) == 4  # 2 models x 2 maps
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


def test_demo_2d_rerun_reuses_its_bundles(tmp_path, one_worker_scheduler):
    # the 2D bundle records its crop as (y, x); the demo's recipe must say the same, or every rerun retrains
    from gradcamo_dask.cli.demo import settings_2d

    tiny_2d = {**settings_2d(TINY), "max_train_cells": 8, "train_workers": 1}
    quiet = dict(settings=tiny_2d, scheduler=one_worker_scheduler, progress=False, log=lambda *_: None)
    first = run_demo(tmp_path / "demo2d", **quiet)
    assert first["retrained"] == sorted(MODELS)
    config = json.loads((tmp_path / "demo2d" / "model_own_cell" / "config.json").read_text())
    assert config["provenance"]["crop_size"] == [40, 40] and "low" in config["normalization"]  # plate scaling
    weights = {n: (tmp_path / "demo2d" / f"model_{n}" / "model.safetensors").stat().st_mtime_ns for n in MODELS}
    lines: list[str] = []
    again = run_demo(tmp_path / "demo2d", **{**quiet, "log": lines.append})
    assert again["retrained"] == []
    assert sum("reusing the complete bundle" in line for line in lines) == 2
    assert {n: (tmp_path / "demo2d" / f"model_{n}" / "model.safetensors").stat().st_mtime_ns
            for n in MODELS} == weights
