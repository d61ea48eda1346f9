"""Nothing hangs: non-Dask servers at --scheduler and schedulers without workers end within their timeouts.

Real sockets on 127.0.0.1: a tiny HTTP server, a socket that accepts and never
replies, one that replies with non-Dask bytes; every loop is bounded.
"""

from __future__ import annotations

import http.server
import socket
import threading
import time
from contextlib import contextmanager

import pytest

from gradcamo_dask.errors import ClusterError
from gradcamo_dask.jobs.cluster import connect


@contextmanager
def http_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"tcp://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def listener(reply: bytes | None):
    """A socket that accepts connections and then sends ``reply`` (None: nothing, ever)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.settimeout(0.2)
    stop = threading.Event()
    held = []

    def serve():
        for _ in range(500):  # bounded: at most ~100 s
            if stop.is_set():
                return
            try:
                conn, _ = sock.accept()
            except OSError:
                continue
            held.append(conn)
            if reply:
                conn.sendall(reply)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"tcp://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(5)
        for conn in held:
            conn.close()
        sock.close()


@pytest.mark.parametrize("kind", ["http", "silent", "garbage"])
def test_something_that_is_not_a_scheduler_is_refused_within_the_timeout(kind):
    servers = {"http": http_server, "silent": lambda: listener(None),
               "garbage": lambda: listener(b"HTTP/1.1 400 Bad Request\r\n\r\n")}
    with servers[kind]() as address:
        started = time.monotonic()
        with pytest.raises(ClusterError, match="not a Dask scheduler|not as a Dask scheduler") as info:
            connect(address, timeout=2.0, quiet=True)
        elapsed = time.monotonic() - started
    assert elapsed < 2.0 + 3.0, f"took {elapsed:.1f} s for a 2 s timeout"
    assert address in str(info.value)


def test_scheduler_without_workers_says_it_waits_and_gives_up_after_worker_timeout(capsys):
    from distributed import LocalCluster

    with LocalCluster(n_workers=0, processes=True, host="127.0.0.1", dashboard_address=None) as cluster:
        started = time.monotonic()
        with pytest.raises(ClusterError, match="no Dask worker joined") as info:
            connect(cluster.scheduler_address, timeout=10.0, worker_timeout=1.0)
        elapsed = time.monotonic() - started
        assert elapsed < 10.0, f"took {elapsed:.1f} s for a 1 s worker timeout"
        assert "--worker-timeout" in str(info.value)
        err = capsys.readouterr().err
        assert "has no workers yet; waiting up to 1 s" in err
        cluster.scale(1)  # a worker that joins while we wait is taken
        client = connect(cluster.scheduler_address, timeout=10.0, worker_timeout=60.0, quiet=True)
        try:
            assert len(client.scheduler_info()["workers"]) == 1
        finally:
            client.close()
