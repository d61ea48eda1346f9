"""Joining a running Dask scheduler: refuse a non-Dask address fast, wait (saying so) for a first worker.

A scheduler started by SLURM, Kubernetes or by hand (``dask scheduler``) is joined by
``tcp://``/``tls://`` address or by its scheduler JSON file.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from gradcamo_dask.errors import ClusterError
from gradcamo_dask.jobs.client import open_client

__all__ = ["DEFAULT_WORKER_TIMEOUT_S", "join_scheduler", "probe_tcp", "wait_for_workers"]

#: Seconds a joined scheduler without workers is waited on before :class:`ClusterError` (``--worker-timeout``).
DEFAULT_WORKER_TIMEOUT_S = 600.0
_MAX_HANDSHAKE_BYTES = 2**26  # a Dask handshake is ~100 bytes; an 8-byte length beyond this is not Dask
_NOT_DASK = "check the address and port (the scheduler's default port is 8786; 8787 is its dashboard)"


def is_scheduler_file(scheduler: str) -> bool:
    """True for a path ending in ``.json`` (a ``dask scheduler --scheduler-file`` file), not an address."""
    return "://" not in scheduler and Path(scheduler).suffix == ".json"


def _read_header(host: str, port: int, timeout: float) -> bytes:
    import socket
    import time

    deadline = time.monotonic() + timeout
    with socket.create_connection((host, port), timeout=timeout) as sock:
        header = b""
        while len(header) < 8:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = sock.recv(8 - len(header))
            if not chunk:
                break
            header += chunk
    return header


def probe_tcp(scheduler: str, timeout: float) -> None:
    """Fail fast unless a Dask scheduler answers at a ``tcp://host:port`` address.

    A Dask scheduler sends its handshake as soon as a connection opens; something
    else (an HTTP server, a dashboard port, a socket that never replies) sends
    nothing or bytes that are not a Dask frame header, and is refused within
    ``timeout`` seconds instead of hanging in the client's handshake.
    """
    import socket
    import struct
    from urllib.parse import urlsplit

    parts = urlsplit(scheduler if "://" in scheduler else f"tcp://{scheduler}")
    if parts.scheme not in ("tcp", "") or parts.hostname is None:
        return  # tls://, ucx://, inproc:// ...: let distributed handle them
    try:
        port = parts.port or 8786
    except ValueError as err:
        raise ClusterError(f"scheduler address {scheduler!r} is malformed ({err}); use tcp://host:port") from None
    try:
        header = _read_header(parts.hostname, port, timeout)
    except socket.timeout:
        raise ClusterError(
            f"{scheduler} accepts connections but sent no Dask handshake within {timeout:g} s: it is not a Dask "
            "scheduler (an HTTP server or the dashboard port?); the scheduler's default port is 8786, its "
            "dashboard's 8787") from None
    except OSError as err:
        raise ClusterError(
            f"cannot reach a Dask scheduler at {scheduler}: nothing answers at {parts.hostname}:{port} "
            f"({type(err).__name__}: {err}); check the address (tcp://host:port), that the scheduler runs and "
            "that its port is open, or leave --scheduler out to start a local cluster"
        ) from None
    if len(header) < 8 or not 0 < struct.unpack("<Q", header)[0] < _MAX_HANDSHAKE_BYTES:
        raise ClusterError(f"{scheduler} answered, but not as a Dask scheduler (first bytes {header[:8]!r}); "
                           f"{_NOT_DASK}")


def join_scheduler(scheduler: str, timeout: float, security: Any = None) -> Any:
    """A :class:`distributed.Client` of the scheduler at ``scheduler`` (address or JSON file), within ``timeout`` s."""
    extra = {"security": security} if security is not None else {}
    try:
        if is_scheduler_file(scheduler):
            if not Path(scheduler).is_file():
                raise ClusterError(f"scheduler file {scheduler} does not exist; start the scheduler with "
                                   f"`dask scheduler --scheduler-file {scheduler}` or pass its address")
            return open_client(scheduler_file=scheduler, timeout=timeout, **extra)
        if security is not None and getattr(security, "require_encryption", False):
            from gradcamo_dask.jobs.tls import open_tls_client  # names TLS failures, bounded in time

            return open_tls_client(scheduler, security, timeout_s=timeout)
        probe_tcp(scheduler, timeout)
        return open_client(scheduler, timeout=timeout, **extra)
    except ClusterError:
        raise
    except (MemoryError, EOFError) as err:  # something answered that does not speak Dask's protocol
        raise ClusterError(f"{scheduler} answered, but not as a Dask scheduler ({type(err).__name__}); "
                           f"{_NOT_DASK}") from None
    except (OSError, TimeoutError, ValueError) as err:  # distributed raises OSError on timeouts
        raise ClusterError(
            f"cannot reach a Dask scheduler at {scheduler} within {timeout:g} s ({type(err).__name__}: {err}); "
            "check the address (tcp://host:port), that the scheduler runs and that its port is open, "
            "or leave --scheduler out to start a local cluster"
        ) from None


def wait_for_workers(client: Any, timeout: float | None = DEFAULT_WORKER_TIMEOUT_S, *, quiet: bool = False,
                     where: str = "") -> int:
    """Wait until the client's cluster has a worker, saying so; return the worker count.

    Parameters
    ----------
    client : distributed.Client
    timeout : float or None
        Seconds to wait (None: without limit, for jobs queued behind others).
    quiet : bool
        Do not print the waiting message.
    where : str
        The scheduler's address as the user gave it (named in messages).

    Raises
    ------
    ClusterError
        No worker joined within ``timeout``.
    """
    n = len(client.scheduler_info().get("workers", {}))
    if n:
        return n
    where = where or str(client.scheduler.address)
    limit = "without limit" if timeout is None else f"up to {timeout:g} s"
    if not quiet:
        print(f"gradcamo-dask: the scheduler {where} has no workers yet; waiting {limit} for one to join "
              "(--worker-timeout SECONDS changes this; 0 waits without limit)", file=sys.stderr, flush=True)
    try:
        client.wait_for_workers(1, timeout=timeout)
    except TimeoutError as err:
        raise ClusterError(
            f"no Dask worker joined the scheduler {where} within {timeout:g} s; start workers "
            f"(`dask worker {client.scheduler.address}`), look at the cluster's queue (squeue, kubectl get pods), "
            "or raise --worker-timeout (0: no limit)") from err
    return len(client.scheduler_info().get("workers", {}))
