"""connect() and plate scoring on real multi-process clusters: killed workers, 1 vs 2 workers.

Everything runs on 127.0.0.1: a LocalCluster of worker processes, and a `dask scheduler`
with two `dask worker` processes started as separate subprocesses.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from gradcamo_dask.profiles import store as store_module
from gradcamo_dask.jobs.cluster import connect, cuda_devices, local_cluster_shape
from gradcamo_dask.errors import ClusterError
from gradcamo_dask.jobs.score import score_plate
from gradcamo_dask.profiles.store import open_profiles, write_profiles
from tests.helpers.plate_fixtures import assert_same_profiles, slow_sites, strings

from tests.helpers.paths import REPO


@pytest.fixture(scope="module")
def tiny(scored_tiny):
    return scored_tiny  # the session's scored tiny plate, shared with test_pipeline.py


# ------------------------------------------------------------------ connect


def test_gpu_detection_reads_cuda_visible_devices_without_cuda():
    assert cuda_devices({"CUDA_VISIBLE_DEVICES": "0,2"}) == ["0", "2"]
    assert cuda_devices({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert cuda_devices({"CUDA_VISIBLE_DEVICES": "-1"}) == []
    # detection imports neither torch nor CuPy (no CUDA context in the client), checked in a fresh process
    code = ("import sys; from gradcamo_dask.jobs.cluster import cuda_devices; cuda_devices(); "
            "print(sorted(m for m in ('torch', 'cupy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}).stdout.strip()
    assert out == "[]"


def test_local_cluster_shape_shares_cores_between_processes_and_torch():
    two = local_cluster_shape(cores=2, memory=24 * 2**30)
    assert (two.n_workers, two.threads_per_worker, two.torch_threads) == (2, 1, 1)
    big = local_cluster_shape(cores=16, memory=8 * 2**30)  # memory, not cores, limits processes
    assert big.n_workers == 2 and big.torch_threads == 8
    one = local_cluster_shape(1, cores=4, memory=24 * 2**30)
    assert one.n_workers == 1 and one.torch_threads == 4


def test_unreachable_scheduler_fails_fast_with_a_clear_error():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(ClusterError, match="cannot reach a Dask scheduler"):
        connect(f"tcp://127.0.0.1:{port}", timeout=5)
    # a black-holed address (TEST-NET-1, RFC 5737: no answer at all) must also give up within the timeout
    with pytest.raises(ClusterError):
        connect("tcp://192.0.2.1:8786", timeout=3)
    assert time.monotonic() - start < 30
    with pytest.raises(ClusterError, match="does not exist"):
        connect("/nonexistent/scheduler.json")


def test_slurm_without_its_module_says_what_to_do(monkeypatch):
    monkeypatch.setitem(sys.modules, "gradcamo_dask.jobs.slurm", None)  # as if the module were absent
    with pytest.raises(ClusterError, match="--scheduler"):
        connect(cluster="slurm")


# ------------------------------------------------------------------ real clusters


def _kill_one_worker_mid_run(client, store: Path, pids: dict, killed: list) -> None:
    """Wait until the write is under way (a chunk is done, work remains), then SIGKILL a busy worker."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            done = np.asarray(zarr.open_group(str(store), mode="r")[store_module.DONE_ARRAY][:])
        except Exception:  # noqa: BLE001 - template not written yet
            time.sleep(0.05)
            continue
        if done.sum() >= 1:
            busy = [w for w, keys in client.processing().items() if keys]
            if busy and done.sum() < len(done):
                os.kill(pids[busy[0]], signal.SIGKILL)
                killed.append((busy[0], int(done.sum()), len(done)))
            return
        time.sleep(0.05)


def _score_and_kill(client, tiny, store: Path) -> list:
    pids = client.run(os.getpid)
    client.run(slow_sites, 0.7)
    killed: list = []
    ds = score_plate(tiny["image"], tiny["labels"], tiny["bundle"], client=client)
    killer = threading.Thread(target=_kill_one_worker_mid_run, args=(client, store, pids, killed))
    killer.start()
    write_profiles(ds, store, client=client, chunk_cells=4)
    killer.join()
    return killed


def _check_no_cell_lost_or_duplicated(tiny, store: Path) -> None:
    back = open_profiles(store)
    keys = [f"{w}/{s}/{o}" for w, s, o in zip(strings(back["well"].values), back["site"].values,
                                               back["object_number"].values)]
    assert len(keys) == len(set(keys)) == tiny["reference"].sizes["cell"]
    assert_same_profiles(tiny["reference"], back, atol=1e-5)


def _wait_for_the_specified_workers(client, timeout: float = 120) -> None:
    """Wait until the scheduler's workers are exactly the LocalCluster's specified ones (after a scale-down,
    and after the nanny of a killed worker has brought it back or the scale-down has closed it)."""
    wanted = sorted(map(str, client.cluster.worker_spec))
    deadline = time.monotonic() + timeout
    while (names := sorted(str(w["name"]) for w in client.scheduler_info()["workers"].values())) != wanted:
        assert time.monotonic() < deadline, f"workers {names}, not {wanted}, after {timeout} s"
        time.sleep(0.2)


def test_killed_worker_on_a_local_cluster_loses_no_cell_and_two_workers_agree_with_one(tiny, tmp_path):
    with connect(n_workers=2, quiet=True) as client:
        assert len(client.scheduler_info()["workers"]) == 2
        killed = _score_and_kill(client, tiny, tmp_path / "killed.zarr")
        assert killed, "the run finished before a worker could be killed"
        _check_no_cell_lost_or_duplicated(tiny, tmp_path / "killed.zarr")

        # determinism: 1 worker vs 2 workers (above) vs the in-process scheduler (the reference); the same
        # cluster scaled down to one worker (starting a second cluster cost ~20 s of worker start-up on 2 cores)
        client.cluster.scale(1)
        _wait_for_the_specified_workers(client)
        ds = score_plate(tiny["image"], tiny["labels"], tiny["bundle"], client=client)
        write_profiles(ds, tmp_path / "one.zarr", client=client)
        assert len(client.scheduler_info()["workers"]) == 1
    one = open_profiles(tmp_path / "one.zarr")
    two = open_profiles(tmp_path / "killed.zarr")
    for name in ("gradcamo", "cam_inside", "cam_total", "logits", "deep"):
        ref = tiny["reference"][name].values
        assert np.nanmax(np.abs(one[name].values - ref)) <= 1e-5
        assert np.nanmax(np.abs(two[name].values - ref)) <= 1e-5
        np.testing.assert_array_equal(np.isnan(one[name].values), np.isnan(ref))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_killed_worker_with_separate_scheduler_and_worker_processes(tiny, tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    dask_cli = [sys.executable, "-m", "distributed.cli"]
    scheduler = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                                  "--port", str(port), "--no-dashboard"], env=env, cwd=tmp_path,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1",
                                 "--no-nanny", "--no-dashboard", "--host", "127.0.0.1", "--name", f"w{i}"],
                                env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
               for i in range(2)]
    del dask_cli
    try:
        deadline = time.monotonic() + 60
        client = None
        while client is None:
            try:
                client = connect(address, timeout=5, quiet=True)
            except ClusterError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        with client:
            client.wait_for_workers(2, timeout=60)
            killed = _score_and_kill(client, tiny, tmp_path / "killed.zarr")
        assert killed, "the run finished before a worker could be killed"
        assert sum(w.poll() is not None for w in workers) == 1  # one worker process really died
        _check_no_cell_lost_or_duplicated(tiny, tmp_path / "killed.zarr")
    finally:
        for proc in (*workers, scheduler):
            if proc.poll() is None:
                proc.terminate()
        for proc in (*workers, scheduler):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.mark.gpu
def test_cuda_cluster_scores_on_each_workers_own_gpu(tiny, tmp_path):
    """dask-cuda numbers each worker's GPU 0: device='cuda:1' must mean 'this worker's GPU', and the CuPy
    allocator bridge and cudnn.benchmark are set on the worker; results agree with the CPU reference."""
    pytest.importorskip("dask_cuda")
    from gradcamo_dask.jobs.resources import site_resources

    with connect(device="cuda", quiet=True, dashboard=False) as client:
        assert site_resources(client) == {"GPU": 1}  # LocalCUDACluster workers advertise GPU=1
        ds = score_plate(tiny["image"], tiny["labels"], tiny["bundle"], client=client, device="cuda:1")
        write_profiles(ds, tmp_path / "cuda.zarr", client=client)

        def worker_state():
            import torch

            from gradcamo_dask.jobs import devices

            return torch.backends.cudnn.benchmark, devices.cuda_memory_shared() or devices.rmm_in_use()

        states = list(client.run(worker_state).values())
    assert states and all(benchmark and bridged for benchmark, bridged in states)
    back = open_profiles(tmp_path / "cuda.zarr")
    ref = tiny["reference"]
    np.testing.assert_array_equal(strings(back["object_number"].values), strings(ref["object_number"].values))
    assert np.nanmax(np.abs(back["gradcamo"].values - ref["gradcamo"].values)) < 0.05  # bf16 autocast on CUDA
    assert (back["predicted"].values == ref["predicted"].values).mean() > 0.9
