"""Output locations on shared filesystems and object stores (fsspec URLs).

The profiles store is written by the workers, not by the client, so a path the client
can write proves nothing on a cluster. :func:`check_writable` writes and removes a
small probe file from every worker before any site is submitted, so that a read-only
mount, a missing bucket or missing credentials stop the run at once, with the worker
and the URL named, instead of after the first hour of GPU time.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from typing import Any

from gradcamo_dask.errors import ClusterError, OutputStoreError

_PROBE_PREFIX = ".gradcamo-write-check-"
_CHECK_ROUNDS = 3  # times every worker may leave during the write check before it gives up


def normalize_output_url(url: str | os.PathLike) -> str:
    """Return ``url`` in a form every host reads the same way.

    Local paths become absolute (workers do not share the client's working
    directory), and so do ``file://`` URLs: fsspec's local filesystem does not
    create a store's folder (``auto_mkdir=False``) and ``to_zarr(mode="w")``
    removes an existing one. Other URLs (``s3://``, ``gs://``, ``memory://``, ...)
    are returned unchanged.
    """
    text = os.fspath(url)
    if text.startswith("file://"):
        from urllib.request import url2pathname

        text = url2pathname(text[len("file://"):])
    elif "://" in text:
        return text
    return os.path.abspath(os.path.expanduser(text))


def probe_writable(url: str, storage_options: dict | None = None) -> str:
    """Write, read back and remove a probe file for ``url`` on this host.

    Nothing is left behind and no folder is created: on a local filesystem a store
    that does not exist yet is probed in its nearest existing parent folder (where
    it will be created); object stores have no folders and are probed under ``url``
    itself. Several workers probing the same location at once therefore never
    remove a folder under each other's feet. Runs on a worker; the client calls it
    through :func:`check_writable`.

    Returns
    -------
    str
        The path of the probe that was written (already removed).
    """
    import fsspec

    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    folder = root.rstrip("/")
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    if "file" in protocols or "local" in protocols:
        while not fs.exists(folder):
            parent = os.path.dirname(folder)
            if parent == folder:
                break
            folder = parent
        if not fs.isdir(folder):
            raise NotADirectoryError(f"{folder} is a file, so {root} cannot be created")
    probe = f"{folder}/{_PROBE_PREFIX}{uuid.uuid4().hex}"
    payload = b"gradcamo-dask write check"
    try:
        with fs.open(probe, "wb") as handle:
            handle.write(payload)
        with fs.open(probe, "rb") as handle:
            if handle.read() != payload:
                raise OSError(f"the probe file {probe} read back different bytes")
    finally:
        if fs.exists(probe):
            fs.rm(probe)
    return probe


def check_writable(url: str | os.PathLike, client: Any, *, storage_options: dict | None = None,
                   wait_for_first_worker: Callable[[Any], Any] | None = None) -> dict[str, str]:
    """Prove that every worker of ``client`` can write the output ``url``.

    Call it after connecting and before submitting any site. Each worker writes,
    reads back and removes a small probe file under ``url`` (see
    :func:`probe_writable`); nothing else is written, and a store that did not
    exist is not left behind.

    Parameters
    ----------
    url
        The output store: a local path (made absolute on the client, see
        :func:`normalize_output_url`) or an fsspec URL such as ``s3://bucket/p.zarr``.
    client
        A connected :class:`distributed.Client`; ``None`` uses the current client
        (``distributed.default_client()``) or, without one, checks from this process
        (Dask's local schedulers write from here).
    storage_options
        fsspec options (credentials, endpoint) passed to the filesystem on the workers.
    wait_for_first_worker
        Called with ``client`` when the cluster has no worker yet (SLURM jobs in the
        queue, pods starting); it waits, saying so, and raises when none comes, e.g.
        ``functools.partial(gradcamo_dask.jobs.joining.wait_for_workers, timeout=600)``.
        The caller owns the wait (its limit and messages); ``None``: a cluster without
        workers is refused at once.

    Returns
    -------
    dict
        Worker address -> probe path written there.

    Raises
    ------
    OutputStoreError
        A worker cannot write ``url``; names the URL, the worker and the cause.
    ClusterError
        The cluster has no worker and ``wait_for_first_worker`` is None (or raised it).
    """
    target = normalize_output_url(url)
    if client is None:
        try:
            from distributed import default_client

            client = default_client()
        except (ImportError, ValueError):
            try:
                return {"local": probe_writable(target, storage_options)}
            except Exception as error:  # noqa: BLE001 - any filesystem error means "cannot write"
                raise OutputStoreError(f"the output {target} is not writable from this process "
                                       f"({type(error).__name__}: {error}); choose a writable location. "
                                       "Nothing was computed.") from error
    for _ in range(_CHECK_ROUNDS):
        if not client.scheduler_info().get("workers"):
            if wait_for_first_worker is None:
                raise ClusterError(
                    f"the scheduler {client.scheduler.address} has no Dask worker, so the output {target} could not "
                    "be checked; start workers first, or wait for one (gradcamo_dask.jobs.joining.wait_for_workers, "
                    "which connect() and the CLI use)")
            wait_for_first_worker(client)
        written = _probe_workers(client, target, storage_options)
        if written:
            return written
    raise ClusterError(f"every Dask worker left the cluster while it checked the output {target}, "
                       f"{_CHECK_ROUNDS} times; look at the worker logs (lifetimes much shorter than a minute?)")


def _probe_workers(client: Any, target: str, storage_options: dict | None) -> dict[str, str]:
    """Probe ``target`` on every worker: ``{worker: probe}`` of those that wrote; refuses any that could not.

    A worker that left while it was asked (its lifetime ended: the connection to it
    closed) neither proves nor disproves anything and is left out; workers that join
    later are checked as they join (``jobs.worker_plugins.WritableOnJoin``).
    """
    from distributed.comm.core import CommClosedError

    results = client.run(probe_writable, target, storage_options, on_error="return")
    failures = {worker: result for worker, result in results.items()
                if isinstance(result, BaseException) and not isinstance(result, CommClosedError)}
    if failures:
        worker, error = sorted(failures.items())[0]
        raise OutputStoreError(
            f"the output {target} is not writable from {len(failures)} of {len(results)} Dask workers "
            f"(e.g. {worker}: {type(error).__name__}: {error}); give a location every worker can write "
            "(a shared filesystem mounted on all nodes, or an object-store URL such as s3://bucket/p.zarr "
            "with credentials available on the workers). Nothing was computed.") from error
    return {worker: result for worker, result in results.items() if not isinstance(result, BaseException)}
