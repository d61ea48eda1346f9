"""Faults at plate scale: a killed client and a full disk during a multi-site run on a LocalCluster.

Each rerun must finish with a store equal to an undisturbed run, and no done-marker
may point at a chunk that was not fully written (every marked chunk already equals
the undisturbed run's rows before the rerun). A killed worker is covered by
``tests/jobs/test_cluster.py::test_killed_worker_on_a_local_cluster_loses_no_cell_and_two_workers_agree_with_one``.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time

import dask
import fsspec
import numpy as np
import pytest
import zarr
from fsspec.implementations.memory import MemoryFileSystem

from gradcamo_dask.io.plate import open_labels, open_plate
from gradcamo_dask.jobs.score import score_plate
from gradcamo_dask.profiles.store import CHUNK_ATTR, DONE_ARRAY, open_profiles, write_profiles
from tests.helpers.plate_fixtures import assert_same_profiles
from tests.helpers.paths import REPO

CHUNK = 3


class FullMemoryFileSystem(MemoryFileSystem):
    """An in-memory filesystem that raises ENOSPC once ``budget`` bytes have been written."""

    protocol = ("fullmem",)
    budget = [10**12]
    written = [0]

    def _spend(self, n: int, path: str) -> None:
        if FullMemoryFileSystem.budget[0] < n:
            raise OSError(errno.ENOSPC, "No space left on device (simulated)", path)
        FullMemoryFileSystem.budget[0] -= n
        FullMemoryFileSystem.written[0] += n

    def pipe_file(self, path, value, *args, **kwargs):
        self._spend(len(value), path)
        return super().pipe_file(path, value, *args, **kwargs)

    def _open(self, path, mode="rb", **kwargs):
        handle = super()._open(path, mode, **kwargs)
        if "w" in mode or "a" in mode:
            write = handle.write

            def counted(data):
                self._spend(len(data), path)
                return write(data)

            handle.write = counted
        return handle


fsspec.register_implementation("fullmem", FullMemoryFileSystem, clobber=True)


@pytest.fixture(scope="module")
def tiny(tiny_plate):
    """The session's tiny plate and bundle (tests/helpers/tiny_plate.py) and its undisturbed run's profiles,
    scored there on Dask threads (the chunking of that store does not matter: only values are compared)."""
    image = open_plate(tiny_plate["plate"])
    return {**tiny_plate, "image": image, "labels": open_labels(tiny_plate["plate"], like=image),
            "reference": open_profiles(tiny_plate["local"]).load()}


def assert_markers_honest(store, reference) -> int:
    """Every chunk marked done already holds the reference's rows; returns the number of marked chunks."""
    group = zarr.open_group(str(store), mode="r")
    assert DONE_ARRAY in group, "no done-markers: the setup did not finish"
    done = np.asarray(group[DONE_ARRAY][:]).astype(bool)
    chunk = int(group.attrs[CHUNK_ATTR])
    for i in np.flatnonzero(done):
        a, b = i * chunk, min((i + 1) * chunk, reference.sizes["cell"])
        for name in reference.data_vars:
            np.testing.assert_array_equal(np.asarray(group[name][a:b]), reference[name].values[a:b],
                                          err_msg=f"chunk {i} of {name} is marked done but not fully written")
    return int(done.sum())


def _score(tiny, client=None):
    return score_plate(tiny["image"], tiny["labels"], tiny["bundle"], client=client, plate_path=str(tiny["plate"]),
                       labels_path=str(tiny["plate"]))


def test_full_disk_mid_run_then_rerun_equals_an_undisturbed_run(tiny):
    from distributed import Client, LocalCluster

    n_chunks = -(-tiny["reference"].sizes["cell"] // CHUNK)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        FullMemoryFileSystem.budget[0], FullMemoryFileSystem.written[0] = 10**12, 0
        write_profiles(_score(tiny, client), "fullmem://sizing/p.zarr", client=client, chunk_cells=CHUNK)
        total = FullMemoryFileSystem.written[0]
        FullMemoryFileSystem.budget[0] = int(total * 0.7)  # the disk fills up about two thirds in
        url = "fullmem://full/p.zarr"
        with pytest.raises(OSError) as info:
            write_profiles(_score(tiny, client), url, client=client, chunk_cells=CHUNK)
        assert info.value.errno == errno.ENOSPC or "No space left" in str(info.value)
        marked = assert_markers_honest(url, tiny["reference"])
        for _ in range(60):  # bounded: tasks already running when the disk filled may still finish (or fail)
            time.sleep(1.0)
            now = assert_markers_honest(url, tiny["reference"])
            if now == marked:
                break
            marked = now
        assert marked < n_chunks
        FullMemoryFileSystem.budget[0] = 10**12  # space freed
        report = write_profiles(_score(tiny, client), url, client=client, chunk_cells=CHUNK)
    assert report["skipped"] >= marked and report["skipped"] + report["written"] == n_chunks
    assert_same_profiles(tiny["reference"], open_profiles(url))


KILLED_CLIENT = textwrap.dedent("""
    import sys
    from distributed import Client, LocalCluster
    from gradcamo_dask.io.plate import open_labels, open_plate
    from gradcamo_dask.jobs.score import score_plate
    from gradcamo_dask.profiles.store import write_profiles
    from tests.helpers.plate_fixtures import slow_sites

    plate, bundle, out, chunk = sys.argv[1:5]
    if __name__ == "__main__":
        # worker threads in this process (two worker processes would each import torch and MONAI, ~20 s of
        # CPU on 2 cores): the SIGKILL ends the client, its cluster and its workers at once either way
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None)
        client = Client(cluster)
        client.run(slow_sites, 1.5)
        image = open_plate(plate)
        labels = open_labels(plate, like=image)
        ds = score_plate(image, labels, bundle, client=client, plate_path=plate, labels_path=plate)
        write_profiles(ds, out, client=client, chunk_cells=int(chunk))
""")


def test_killed_client_mid_run_then_rerun_equals_an_undisturbed_run(tiny, tmp_path):
    out = tmp_path / "killed.zarr"
    script = tmp_path / "client.py"
    script.write_text(KILLED_CLIENT)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    process = subprocess.Popen([sys.executable, str(script), str(tiny["plate"]), str(tiny["bundle"]), str(out),
                                str(CHUNK)], env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    markers = out / "_gradcamo" / "done_chunks" / "c"
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if markers.is_dir() and any(markers.iterdir()):
                break
            time.sleep(0.1)
        assert process.poll() is None, f"the client ended before it could be killed: {process.stderr.read()[-2000:]}"
        assert markers.is_dir() and any(markers.iterdir()), "no chunk was written within 240 s"
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)  # the client, its cluster and workers: everything it started
        process.wait(30)
    marked = assert_markers_honest(out, tiny["reference"])
    n_chunks = -(-tiny["reference"].sizes["cell"] // CHUNK)
    assert 0 < marked < n_chunks
    with dask.config.set(scheduler="threads"):
        report = write_profiles(_score(tiny), out, chunk_cells=CHUNK)
    assert report["skipped"] == marked
    assert_same_profiles(tiny["reference"], open_profiles(out))
