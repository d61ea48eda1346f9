"""Output paths never touch inputs: one check for every command that writes.

:func:`check_output_path` compares the *resolved real paths* (symbolic links
followed, ``..`` removed, ``~`` expanded) of an output and of every input
(plate, labels, bundle, platemap, profiles store). It refuses an output that is
an input, lies inside one, or contains one, whatever ``--overwrite`` says: an
output folder is created, filled and (with ``--overwrite``) replaced, and any of
those would change an input. URLs other than ``file://`` (``s3://``, ``gs://``,
``memory://``) are compared as text.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from gradcamo_dask.errors import OutputStoreError

__all__ = ["check_output_folder", "check_output_path", "real_location"]


def real_location(path: Any) -> str:
    """The resolved real path of a local path or ``file://`` URL; other URLs unchanged (minus a trailing ``/``).

    Works for paths that do not exist yet: their nearest existing parent is resolved.
    """
    from gradcamo_dask.io.storage import normalize_output_url

    text = normalize_output_url(os.fspath(path))
    if "://" in text:
        return text.rstrip("/")
    return os.path.realpath(text)


def _inside(inner: str, outer: str) -> bool:
    if "://" in inner or "://" in outer:
        return inner == outer or inner.startswith(outer + "/")
    return inner == outer or os.path.commonpath([inner, outer]) == outer


def check_output_path(out: Any, inputs: Mapping[str, Any], *, option: str = "--out") -> str:
    """Refuse an output that is, contains or lies inside an input; return its real location.

    Parameters
    ----------
    out : str or path
        The output path or URL the command will create or replace.
    inputs : mapping of str to path or None
        What each input is (``"plate"``, ``"labels"``, ``"bundle"``...) -> its path;
        None entries and non-path objects (in-memory arrays) are skipped.
    option : str
        How the user gave ``out`` (named in the message).

    Raises
    ------
    OutputStoreError
        Names the output, the input and what to do. Nothing has been written.
    """
    target = real_location(out)
    for role, path in inputs.items():
        if path is None or not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
            continue
        source = real_location(path)
        if _inside(target, source):
            relation = "is" if target == source else "lies inside"
            raise OutputStoreError(
                f"{option} {os.fspath(out)} {relation} the {role} {os.fspath(path)} (real path {source}); writing "
                f"there would change an input. Choose an output outside every input. Nothing was written.")
        if _inside(source, target):
            raise OutputStoreError(
                f"{option} {os.fspath(out)} contains the {role} {os.fspath(path)} (real path {source}); replacing "
                f"or filling it would change an input. Choose an output outside every input. Nothing was written.")
    return target


def check_output_folder(out: Any, own_names: set[str] | frozenset[str], *, what: str, option: str = "--out") -> None:
    """Refuse a local output folder that holds anything a command does not write itself.

    A command that writes several files into a folder (``train``: a bundle, its
    checkpoint and cell list) would otherwise mix them into a user's folder and
    replace any of the user's files of the same names. A missing or empty folder, or
    one holding only ``own_names`` (an earlier run of the same command, e.g. to
    resume), is accepted.

    Raises
    ------
    OutputStoreError
        Names the folder, up to five foreign entries and what to do. Nothing has been written.
    """
    from gradcamo_dask.io.storage import normalize_output_url

    path = normalize_output_url(os.fspath(out))
    if "://" in path or not os.path.lexists(path):
        return
    if not os.path.isdir(path):
        raise OutputStoreError(f"{option} {os.fspath(out)} is a file, not a folder for {what}; choose a new "
                               "folder. Nothing was written.")
    foreign = sorted(set(os.listdir(path)) - set(own_names))
    if foreign:
        raise OutputStoreError(
            f"{option} {os.fspath(out)} holds files that are not {what} ({', '.join(foreign[:5])}"
            f"{', ...' if len(foreign) > 5 else ''}); writing there would mix with or replace them. Choose a new "
            "or empty folder. Nothing was written.")
