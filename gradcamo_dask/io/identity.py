"""The identity of an input (plate, labels): which bytes a run read, from file metadata only.

A profiles store records the identity of its plate and labels; a rerun whose
inputs have another identity is another run (its store is never "already done").
:func:`input_identity` hashes, for every file under the input, its path relative
to the input, its size in bytes and its modification time in nanoseconds (for
object stores: size and the ETag / checksum / modification time the store
reports). No pixel is read: the cost is one ``stat`` per file (Zarr chunk),
whatever the size of the chunks, and rewriting any chunk, the metadata or the
platemap changes the identity. Copying a plate without keeping modification
times (``cp`` without ``-p``) also changes it: the copy is scored again rather
than trusted.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from typing import Any

__all__ = ["input_identity"]

_OBJECT_KEYS = ("size", "ETag", "etag", "md5Hash", "crc32c", "LastModified", "mtime", "last_modified", "updated")


def _local_entries(root: str) -> list[tuple[str, int, int]]:
    if os.path.isfile(root):
        info = os.stat(root)
        return [(os.path.basename(root), info.st_size, info.st_mtime_ns)]
    entries = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(folder, name)
            try:
                info = os.stat(full)
            except FileNotFoundError:  # removed while walking (a probe file): not part of the input
                continue
            entries.append((os.path.relpath(full, root), info.st_size, info.st_mtime_ns))
    return entries


def _remote_entries(url: str) -> list[tuple]:
    import fsspec

    protocol = url.split("://", 1)[0]
    if protocol not in fsspec.available_protocols():  # a generated plate (virtual://NAME?seed=N): its URL says it all
        return [(url,)]
    fs, root = fsspec.core.url_to_fs(url)
    found = fs.find(root, detail=True) or {root: fs.info(root)}
    return [(name[len(root):], *(str(info.get(k)) for k in _OBJECT_KEYS)) for name, info in sorted(found.items())]


def input_identity(source: Any, array_name: str | None = None) -> str | None:
    """A short hash that changes when the input at ``source`` changes.

    Parameters
    ----------
    source : str, Path, mapping of keys to paths, or None
        The plate or labels as given to the command: a folder (Zarr store, TIFF
        folder), a file, an fsspec URL, or a ``{(well, site): path}`` mapping.
    array_name : str, optional
        The Dask name of the array, used when ``source`` is None: Dask names
        arrays made from in-memory data by their content. (With a source it is not
        used: names of opened plates hold the path as spelled, which would make the
        same plate under another relative path another input.)

    Returns
    -------
    str or None
        ``"sha256:..."``, or None when neither a source nor an array name is known.
    """
    if source is None or (isinstance(source, str) and not source):
        return None if array_name is None else f"dask:{array_name}"
    digest = hashlib.sha256()
    if isinstance(source, Mapping):
        items = sorted((str(k), os.fspath(v)) for k, v in source.items())
        for key, path in items:
            digest.update(repr((key, _local_entries(path))).encode())
    else:
        text = os.fspath(source)
        if text.startswith("file://") or "://" not in text:
            from gradcamo_dask.io.storage import normalize_output_url

            entries = _local_entries(normalize_output_url(text))
        else:
            entries = _remote_entries(text)
        digest.update(repr(entries).encode())
    return "sha256:" + digest.hexdigest()
