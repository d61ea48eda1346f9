"""open_client: a Client that fails to connect leaves the process's default scheduler as it was."""

from __future__ import annotations

import dask
import dask.array as da
import distributed
import pytest
from distributed import Client, LocalCluster

from gradcamo_dask.jobs.client import open_client


@pytest.fixture
def garbled_handshake(monkeypatch):
    """Every new Client fails after it made itself the default, as a garbled handshake does (ValueError:
    distributed closes a failed client again only on OSError)."""
    async def fail(self, timeout=None):
        raise ValueError("garbled handshake")

    monkeypatch.setattr(distributed.Client, "_ensure_connected", fail)


def _default():
    try:
        return Client.current(allow_global=True)
    except ValueError:
        return None


def test_plain_client_leaves_a_default_that_never_connected(garbled_handshake):
    # the control: without open_client the failure leaves the process pointing at a client that is not there
    with pytest.raises(ValueError, match="garbled"):
        Client("tcp://127.0.0.1:1", timeout=1)
    stray = _default()
    try:
        assert dask.config.get("scheduler", None) == "dask.distributed"
        assert stray is not None and stray.status != "running"
    finally:
        if stray is not None:
            stray.close()
        dask.config.config.pop("scheduler", None)


def test_failed_open_client_leaves_no_default_and_dask_computes_locally(garbled_handshake):
    assert dask.config.get("scheduler", None) is None and _default() is None
    with pytest.raises(ValueError, match="garbled"):
        open_client("tcp://127.0.0.1:1", timeout=1)
    assert dask.config.get("scheduler", None) is None
    assert _default() is None
    assert da.ones(4, chunks=2).sum().compute() == 4


def test_failed_open_client_keeps_the_client_already_open(monkeypatch):
    with LocalCluster(n_workers=1, processes=False, dashboard_address=None) as cluster, Client(cluster) as first:
        async def fail(self, timeout=None):
            raise RuntimeError("scheduler went away mid-handshake")

        monkeypatch.setattr(distributed.Client, "_ensure_connected", fail)
        with pytest.raises(RuntimeError, match="went away"):
            open_client(cluster.scheduler_address, timeout=1)
        monkeypatch.undo()
        assert _default() is first and dask.config.get("scheduler", None) == "dask.distributed"
        assert da.ones(4, chunks=2).sum().compute() == 4
    assert dask.config.get("scheduler", None) is None and _default() is None


def test_a_local_cluster_whose_client_cannot_start_is_closed_again(monkeypatch, garbled_handshake):
    from gradcamo_dask.jobs.cluster import connect

    started = []

    class RecordedCluster(LocalCluster):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            started.append(self)

    monkeypatch.setattr(distributed, "LocalCluster", RecordedCluster)
    with pytest.raises(ValueError, match="garbled"):
        connect(n_workers=1, device="cpu", processes=False, protocol="tcp://", dashboard=False, quiet=True,
                timeout=5)
    assert len(started) == 1 and started[0].status.name == "closed"
    assert dask.config.get("scheduler", None) is None and _default() is None
