"""Session fixtures shared by the CLI and demo tests: one single-worker cluster and one tiny demo run.

The demo (a plate, two trained models, their profiles and reports) is the suite's most expensive
artefact; the CLI test checks its results and the resume test reruns it in a copy, so it is made once.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

# the demo at test size: 2 compounds x 2 wells x 2 sites of 8 x 96 x 96 voxels, one epoch on 16 training cells;
# the two models still train at once in two processes, as the demo's do
TINY_DEMO = dict(sites_per_well=2, site_shape=(8, 96, 96), cell_radius=10.0, crop_shape=(None, 40, 40),
                 input_shape=(8, 32, 32), epochs=1, max_train_cells=16)


@pytest.fixture(scope="session")
def one_worker_scheduler():
    """Address of one single-worker, single-thread process cluster (starting one costs ~20 s on 2 cores).
    Tests that kill or reconfigure workers start their own instead."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster:
        yield cluster.scheduler_address


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory, one_worker_scheduler) -> dict:
    """``{"out": folder, "result": run_demo's return}`` of one uninterrupted tiny demo run.
    Read-only for tests: a test that changes the folder works on :func:`copy_demo` of it."""
    from gradcamo_dask.jobs.demo import run_demo

    out = tmp_path_factory.mktemp("tiny-demo") / "demo"
    result = run_demo(out, settings=TINY_DEMO, scheduler=one_worker_scheduler, progress=False, log=lambda *_: None)
    return {"out": out, "result": result}


def copy_demo(demo: dict, destination: Path) -> Path:
    """A copy of the tiny demo's folder at ``destination``, file times kept (the resume test compares them)."""
    shutil.copytree(demo["out"], destination, symlinks=True)  # copy2: modification times preserved
    return destination
