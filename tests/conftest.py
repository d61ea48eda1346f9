"""Shared test set-up: GPU marker handling, the path to the shared real data, shared fixtures."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# Keep tests reproducible and within the 2 cores of the CI machine.
os.environ.setdefault("OMP_NUM_THREADS", "2")

from tests.helpers.paths import REAL_DATA, REPO  # noqa: F401  (re-exported for fixtures)
from tests.helpers.tiny_plate import scored_tiny, tiny_plate  # noqa: F401  (session: tiny plates, bundles, profiles)
from tests.helpers.demo_run import one_worker_scheduler, tiny_demo  # noqa: F401  (session: cluster, demo run)


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a core dependency
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if _cuda_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; run benchmarks/gpu_check.sh on a GPU machine")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # not `in item.keywords`: folder names count there
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def real_data() -> Path:
    """``../shared/data/real`` beside the checkout; skips with a reason when absent."""
    if not REAL_DATA.is_dir():
        pytest.skip(f"real data folder {REAL_DATA} is absent (it sits beside the project checkout, not in it)")
    return REAL_DATA


@pytest.fixture(autouse=True)
def _dask_scheduler_setting_is_left_as_found():
    """One test's stray ``scheduler="dask.distributed"`` (a client that never connected, see
    :func:`gradcamo_dask.jobs.client.open_client`) must not fail every later test: put back, and warned of
    with the test's name so that the leak itself gets fixed."""
    import warnings

    import dask

    before = dask.config.get("scheduler", None)
    yield
    after = dask.config.get("scheduler", None)
    if after != before:
        if before is None:
            dask.config.config.pop("scheduler", None)
        else:
            dask.config.set(scheduler=before)
        warnings.warn(f"this test left dask's scheduler setting at {after!r} (was {before!r}); put back",
                      stacklevel=1)
    _close_a_default_client_that_never_started()


def _close_a_default_client_that_never_started() -> None:
    """A default client that is not running would take the next test's ``.compute()``; close it."""
    import sys

    if "distributed" not in sys.modules:
        return
    from distributed import Client

    try:
        stray = Client.current(allow_global=True)
    except ValueError:
        return
    if stray.status in ("newly-created", "connecting"):  # between tests, only a client that failed to start
        stray.close(timeout=5)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.when == "call":
        item.stash[_CALL_PASSED] = report.passed
    return report


_CALL_PASSED = pytest.StashKey[bool]()


@pytest.fixture(autouse=True)
def _tmp_path_freed_after_a_pass(request):
    """A passing test's ``tmp_path`` is removed when it ends (a failing one's is kept to look at): bundles
    (19 MB of EfficientNet weights each), checkpoints and plates added up to 3.6 GB a run, and CI once ran
    out of disk ("No space left on device" while saving a bundle)."""
    yield
    path = request.node.funcargs.get("tmp_path")
    if path is not None and request.node.stash.get(_CALL_PASSED, False):
        shutil.rmtree(path, ignore_errors=True)
