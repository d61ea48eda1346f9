"""The profiles store: resumable writes to Zarr, opening, and what a store holds.

A profiles store is the Zarr form of the Dataset that
:func:`~gradcamo_dask.jobs.score.score_plate` builds. :func:`write_profiles` writes
it one cell-chunk task at a time and marks each chunk done in a bookkeeping
array (``_gradcamo/done_chunks``, a subgroup that ``xarray.open_zarr`` does not
show); a rerun with the same fingerprint skips done chunks. :func:`open_profiles`
is the one reader, :func:`describe_profiles` and :func:`done_sites` say what is
in a store.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph

from gradcamo_dask.errors import InputError, OutputStoreError
from gradcamo_dask.provenance import read_provenance

__all__ = [
    "DEFAULT_CHUNK_CELLS",
    "check_output_store",
    "describe_profiles",
    "done_sites",
    "open_profiles",
    "profiles_fingerprint",
    "write_profiles",
]

#: Zarr attribute names of a profiles store.
FINGERPRINT_ATTR = "gradcamo_fingerprint"
COMPLETE_ATTR = "gradcamo_complete"
CHUNK_ATTR = "gradcamo_chunk_cells"
DONE_ARRAY = "_gradcamo/done_chunks"  # in a subgroup: xarray.open_zarr(store) shows the profiles only
DEFAULT_CHUNK_CELLS = 512


#: Scoring parameters that do not change a stored value (beyond float noise): not part of the fingerprint.
NEUTRAL_PARAMETERS = ("batch_size", "check_classes")


def profiles_fingerprint(ds: xr.Dataset) -> str:
    """What makes two runs the same run: plate, wells, sites, cells, input identity, bundle hash, layers, parameters.

    ``inputs`` (the identity of the plate's and labels' files, see
    :func:`~gradcamo_dask.io.identity.input_identity`) makes a store scored from one
    image "another run" for an image with the same names and other pixels. Options
    in :data:`NEUTRAL_PARAMETERS` (batch size, class check) are left out, so a rerun
    with another batch size resumes.
    """
    prov = read_provenance(ds)
    keep = {k: prov.get(k) for k in ("plate", "wells", "sites", "n_cells", "cells_sha256", "bundle_hash", "layers",
                                     "inputs")}
    keep["parameters"] = {k: v for k, v in (prov.get("parameters") or {}).items() if k not in NEUTRAL_PARAMETERS}
    return "sha256:" + hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()


def _chunk_bounds(n_cells: int, chunk_cells: int) -> list[tuple[int, int]]:
    return [(a, min(a + chunk_cells, n_cells)) for a in range(0, n_cells, chunk_cells)]


def _open_group(path: Any, mode: str) -> Any:
    import zarr

    return zarr.open_group(str(path) if isinstance(path, Path) else path, mode=mode)


def _existing(path: Any) -> Any:
    """The Zarr group at ``path``, or None when nothing is there."""
    import zarr

    try:
        return _open_group(path, "r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError):
        return None
    except Exception:  # noqa: BLE001 - an array or foreign files: treat as "something is there"
        return False


def _write_chunk(path: str, index: int, start: int, stop: int, names: list[str], parts: list[list],
                 cuts: list[list[tuple[int, int]]]) -> int:
    """Write cells ``[start, stop)`` of every data variable, then mark chunk ``index`` done.

    ``parts[v]`` are the site blocks of variable ``v`` that overlap the chunk and
    ``cuts[v]`` the rows of each block that fall in it. Exactly one task writes
    each Zarr chunk, so concurrent tasks never touch the same chunk; the done
    marker is its own chunk of size 1. A chunk already marked done is not
    written again: a worker can leave between writing a chunk and the client
    hearing of it, and Dask then runs the task again (its sites are scored again
    in that window; the chunk's bytes and marker are left as they are).
    """
    group = _open_group(path, "r+")
    if group[DONE_ARRAY][index]:
        return stop - start
    for name, blocks, rows in zip(names, parts, cuts):
        pieces = [np.asarray(block)[a:b] for block, (a, b) in zip(blocks, rows)]
        group[name][start:stop] = np.concatenate(pieces, axis=0) if len(pieces) > 1 else pieces[0]
    group[DONE_ARRAY][index] = 1
    return stop - start


def _write_graph(ds: xr.Dataset, path: str, bounds: list[tuple[int, int]], todo: list[int], names: list[str],
                 token: str) -> list:
    """Delayed write tasks, one per Zarr cell-chunk, each depending directly on the site blocks it needs.

    The tasks are one new layer on top of the score graph's layers, which are shared,
    never copied into one dict; a resumed store culls them layer by layer to the sites
    its chunks still need. Built by hand rather than with ``dask.delayed(f)(array[a:b])``:
    delayed finalises each array argument with its own optimisation, which fuses the
    site task into every variable's chain and runs it once per variable.
    """
    from dask.delayed import Delayed

    arrays = [ds[name].data for name in names]
    if not todo:
        return []
    graph = HighLevelGraph.merge(*[a.__dask_graph__() for a in arrays])
    layer = f"write-profiles-{token}"
    offsets = [np.concatenate([[0], np.cumsum(a.chunks[0])]).astype(np.int64) for a in arrays]  # cells per block
    tasks = {(layer, i): _write_task(arrays, offsets, names, path, i, bounds[i]) for i in todo}
    depends = {a.name for a in arrays}
    if len(todo) < len(bounds):  # resumed: only the site blocks these chunks read (cull renames the layers)
        graph = graph.cull({key for task in tasks.values() for keys in task[6] for key in keys})
        depends = set(graph.layers)
    graph = HighLevelGraph({**graph.layers, layer: tasks}, {**graph.dependencies, layer: depends})
    return [Delayed(key, graph, layer=layer) for key in tasks]


def _write_task(arrays: list, offsets: list, names: list[str], path: str, index: int,
                bound: tuple[int, int]) -> tuple:
    """The task writing cells ``bound = [start, stop)``: the site blocks of every variable that overlap it."""
    start, stop = bound
    parts, cuts = [], []
    for array, off in zip(arrays, offsets):
        tail = (0,) * (array.ndim - 1)
        first, last = int(np.searchsorted(off, start, side="right")) - 1, int(np.searchsorted(off, stop, side="left"))
        blocks = [b for b in range(max(0, first), last) if off[b] < stop and off[b + 1] > start]
        parts.append([(array.name, b, *tail) for b in blocks])
        cuts.append([(int(max(start, off[b]) - off[b]), int(min(stop, off[b + 1]) - off[b])) for b in blocks])
    return (_write_chunk, path, index, start, stop, names, parts, cuts)


def _chunks_to_write(ds: xr.Dataset, path: Any, fingerprint: str, chunk_cells: int,
                     resume: bool) -> tuple[list[tuple[int, int]], list[int]]:
    """The ``[start, stop)`` cell rows of every Zarr cell-chunk and the indices of the chunks not yet
    done. A new store gets its template (``chunk_cells`` cells per chunk) written first; a resumed
    store keeps its own chunking, which does not change a single value."""
    if resume:
        chunk_cells = int(_open_group(path, "r").attrs[CHUNK_ATTR])
    bounds = _chunk_bounds(int(ds.sizes["cell"]), chunk_cells)
    if not resume:  # a new template has no chunk marked done: not read back (a 3.5 M-cell plate: 6,912 markers)
        _write_template(ds, path, fingerprint, chunk_cells, len(bounds))
        return bounds, list(range(len(bounds)))
    done = _done_markers(path)
    return bounds, [i for i in range(len(bounds)) if not done[i]]


def _done_markers(path: Any) -> np.ndarray:
    """The store's done marker per cell-chunk (bool), without reading a file per marker when none is on disk.

    Markers are only ever written as 1, so their chunks on disk (one listing) say how
    many are done; reading them all costs a file each (about 3 CPU s for the 6,912 of
    a 3.5 M-cell plate, bench_scale), so that is done only when some are there.
    """
    markers = _open_group(path, "r")[DONE_ARRAY]
    if markers.nchunks_initialized == 0:
        return np.zeros(markers.shape[0], dtype=bool)
    return np.asarray(markers[:]).astype(bool)


def write_profiles(
    ds: xr.Dataset,
    path: Any,
    *,
    overwrite: bool = False,
    client: Any = None,
    chunk_cells: int = DEFAULT_CHUNK_CELLS,
    progress: bool = False,
    check: bool = True,
    wait_for_first_worker: Any = None,
) -> dict:
    """Write profiles to Zarr, resumably; ``xarray.open_zarr(path)`` reads them back.

    Plan: the template (coords, attrs, empty data arrays chunked ``chunk_cells``
    along ``cell``) is written first; then one write task per Zarr cell-chunk,
    depending on the site tasks whose cells it holds, writes that chunk of every
    variable and marks its own element of the ``_done_chunks`` array (chunk size
    1, so markers never race). A rerun on a store with the same fingerprint
    (plate, cells, bundle hash, layers, parameters) skips done chunks, and the
    site tasks only they needed are never run. ``gradcamo_complete`` becomes true
    when every chunk is done; until then the store does not look complete.

    Parameters
    ----------
    ds : Dataset
        From :func:`score_plate`.
    path : str, Path or fsspec URL
        The Zarr store to create or resume.
    overwrite : bool
        Replace a profiles store that holds another run's results (another plate,
        image content, bundle or parameters). Anything that is not a profiles store
        (a folder of other files, another Zarr store) is never replaced.
    client : distributed.Client, optional
        Run on this client (default: the current Dask scheduler).
    chunk_cells : int
        Cells per Zarr chunk (and per resumable write task); a resumed store keeps its own.
    progress : bool
        Show a progress bar.
    check : bool
        First prove that every worker can write ``path``
        (:func:`~gradcamo_dask.io.storage.check_writable`); False when the caller
        already did, before scoring.
    wait_for_first_worker : callable, optional
        ``f(client)`` waiting for a first worker when there is none at the check (e.g.
        ``jobs.joining.wait_for_workers`` with a timeout); None: refused at once.

    Returns
    -------
    dict
        ``n_cells``, ``chunks``, ``written`` (chunks written now), ``skipped``
        (chunks already done), ``seconds``.

    Raises
    ------
    OutputStoreError
        ``path`` holds something that is not a profiles store, or another run's
        profiles and ``overwrite`` is False.
    """
    started = time.perf_counter()
    if chunk_cells < 1:
        raise InputError(f"chunk_cells must be >= 1, got {chunk_cells}")
    from gradcamo_dask.io.storage import check_writable, normalize_output_url

    path = normalize_output_url(path)  # absolute; file:// URLs become the local path they name
    fingerprint = profiles_fingerprint(ds)
    n_cells = int(ds.sizes["cell"])
    names = [name for name in ds.data_vars]
    state = check_output_store(path, overwrite=overwrite, fingerprint=fingerprint)
    if check:
        # every worker can write there, before any site work
        check_writable(path, client, wait_for_first_worker=wait_for_first_worker)
    bounds, todo = _chunks_to_write(ds, path, fingerprint, chunk_cells, resume=state == "resume")
    tasks = _write_graph(ds, str(path), bounds, todo, names, tokenize(fingerprint, str(path), time.time()))
    if tasks:
        _run(tasks, client, progress)
    markers = _open_group(path, "r")[DONE_ARRAY]
    if markers.nchunks_initialized == markers.nchunks and bool(np.all(_done_markers(path))):
        _open_group(path, "r+").attrs[COMPLETE_ATTR] = True
    return {"n_cells": n_cells, "chunks": len(bounds), "written": len(todo), "skipped": len(bounds) - len(todo),
            "seconds": time.perf_counter() - started}


def check_output_store(path: Any, *, overwrite: bool = False, fingerprint: str | None = None) -> str:
    """What writing profiles to ``path`` would do, refusing anything that could lose data.

    Call it before any work (it reads only metadata). ``--overwrite`` replaces a
    gradcamo-dask profiles store only: an existing file, a folder of other files
    or another Zarr store is refused whatever ``overwrite`` says.

    Parameters
    ----------
    path : str, Path or fsspec URL
        The output store.
    overwrite : bool
        Whether a profiles store of another run may be replaced.
    fingerprint : str, optional
        The run's :func:`profiles_fingerprint`; None when not known yet (then any
        profiles store is accepted here and the fingerprint is checked again later).

    Returns
    -------
    str
        ``"new"`` (nothing there, or an empty folder), ``"resume"`` (the same run,
        set up), ``"setup"`` (the same run, its setup interrupted: set up again) or
        ``"replace"`` (another run's store, ``overwrite`` given).

    Raises
    ------
    OutputStoreError
        ``path`` holds something that is not a profiles store, or another run's
        profiles without ``overwrite``.
    """
    from gradcamo_dask.io.storage import normalize_output_url

    path = normalize_output_url(path)
    local = "://" not in path
    if local and not os.path.lexists(path):
        return "new"
    if local and os.path.isdir(path) and not os.path.islink(path) and not os.listdir(path):
        return "new"
    existing = _existing(path)
    if existing is None and not local:
        return "new"
    if not existing or FINGERPRINT_ATTR not in existing.attrs:
        raise OutputStoreError(
            f"{path} exists and is not a gradcamo-dask profiles store (it holds other files); nothing was "
            f"written or removed. --overwrite replaces only a profiles store: choose a new output path "
            f"(or empty that folder yourself)")
    if fingerprint is None or existing.attrs.get(FINGERPRINT_ATTR) == fingerprint:
        return "resume" if DONE_ARRAY in existing and CHUNK_ATTR in existing.attrs else "setup"
    if overwrite:
        return "replace"
    raise OutputStoreError(
        f"{path} holds profiles of another run (another plate, bundle, labels, image content or parameters); "
        f"choose another output path, or pass --overwrite (overwrite=True) to replace that store")


def _write_template(ds: xr.Dataset, path: Any, fingerprint: str, chunk_cells: int, n_chunks: int) -> None:
    """Coords, attrs and empty data arrays; nothing marked done; ``gradcamo_complete`` false."""
    template = ds.copy(deep=False)  # a deep copy duplicates every per-cell string coord, one Python object each
    encoding = {}
    for name in ds.data_vars:
        var = ds[name]
        template[name] = var.copy(deep=False, data=da.zeros(var.shape, dtype=var.dtype, chunks=-1))
        encoding[name] = {"chunks": (max(1, min(chunk_cells, max(1, var.shape[0]))), *var.shape[1:])}
    template.attrs.update({FINGERPRINT_ATTR: fingerprint, COMPLETE_ATTR: False, CHUNK_ATTR: int(chunk_cells)})
    target = str(path) if isinstance(path, Path) else path
    template.to_zarr(target, mode="w", compute=False, encoding=encoding, consolidated=False)
    group = _open_group(path, "r+")
    sub = group.require_group(DONE_ARRAY.split("/")[0])
    sub.create_array(DONE_ARRAY.split("/")[1], shape=(n_chunks,), chunks=(1,), dtype="uint8", fill_value=0,
                     overwrite=True)


def _run(tasks: list, client: Any, progress: bool) -> None:
    if client is not None:
        _run_on_cluster(tasks, client, progress)
        return
    try:
        from distributed import default_client

        default_client()
        has_client = True
    except (ImportError, ValueError):
        has_client = False
    if progress and not has_client:
        from dask.diagnostics import ProgressBar

        with ProgressBar():
            dask.compute(*tasks, optimize_graph=False)
    else:
        dask.compute(*tasks, optimize_graph=False)


def _run_on_cluster(tasks: list, client: Any, progress: bool) -> None:
    """Run the chunk writes on ``client``, letting go of each one as soon as it is written.

    A written chunk is on disk (marker set), so its future is released at once: a
    worker that leaves later (its lifetime or walltime ended, with no other worker free
    to take its data) then costs nothing already written. Holding every future until
    the end, as ``client.gather`` does, made Dask recompute the chunks and sites such a
    worker had finished: with lifetimes not much longer than the run, work was lost at
    every turnover and the run stalled near its end (issue #18, 30 of 31 chunks).
    """
    from distributed import as_completed

    futures = client.compute(tasks, optimize_graph=False)
    if not futures:  # as_completed([]) would look for a default client, and there may be none
        return
    done, total = 0, len(futures)
    try:
        for future in as_completed(futures):
            future.result()  # a chunk that failed (full disk, bad site) is raised here
            futures.remove(future)
            future.release()
            done += 1
            if progress:
                print(f"\rchunks written: {done}/{total}", end="" if done < total else "\n", file=sys.stderr,
                      flush=True)
    except BaseException:
        client.cancel(futures)  # a failed run (full disk, bad site) stops starting new chunks
        raise


def open_profiles(path: Any) -> xr.Dataset:
    """The profiles at ``path``, lazily: a store from :func:`write_profiles` (or ``Dataset.to_zarr``).

    Bookkeeping variables (names starting with ``_``) are dropped.

    Raises
    ------
    OutputStoreError
        ``path`` does not exist, holds no profiles (no ``cell`` dim), or is a
        store whose resumable write has not finished (rerun the same score command).
    """
    from gradcamo_dask.io.storage import normalize_output_url

    path = normalize_output_url(path)
    group = _existing(path)
    what = "give the Zarr store written by `gradcamo-dask score` (or write_profiles)"
    if group is None:
        raise OutputStoreError(f"no profiles at {path}; {what}")
    if group is not False and FINGERPRINT_ATTR in group.attrs and not group.attrs.get(COMPLETE_ATTR):
        raise OutputStoreError(f"{path}: the write did not finish ({done_summary(path)}); run the same score "
                               f"command again to resume it")
    try:
        ds = xr.open_zarr(str(path) if isinstance(path, Path) else path, consolidated=False)
    except Exception as err:  # noqa: BLE001 - zarr raises several unrelated types for "not a store"
        raise OutputStoreError(f"{path} is not a readable profiles store ({type(err).__name__}: {err}); {what}") from err
    if "cell" not in ds.dims:
        raise OutputStoreError(f"{path} holds no profiles (no 'cell' dim); {what}")
    return ds.drop_vars([v for v in ds.variables if str(v).startswith("_")])


def done_summary(path: Any) -> str:
    group = _open_group(path, "r")
    if DONE_ARRAY not in group:
        return "its setup was interrupted before any chunk was planned"
    done = np.asarray(group[DONE_ARRAY][:])
    return f"{int(done.sum())} of {len(done)} cell chunks written"


def done_sites(path: Any) -> pd.DataFrame:
    """Per site of a profiles store: cells and whether all of them are written.

    Returns
    -------
    DataFrame
        ``well, site, n_cells, done`` (sites without cells do not appear).
    """
    group = _open_group(path, "r")
    wells = np.asarray([str(w) for w in group["well"][:]], dtype=object)
    sites = np.asarray(group["site"][:]).astype(np.int64)
    if len(wells) == 0:
        return pd.DataFrame({"well": [], "site": [], "n_cells": [], "done": []})
    if DONE_ARRAY in group and CHUNK_ATTR in group.attrs:  # else the setup was interrupted: nothing is done
        done = np.asarray(group[DONE_ARRAY][:]).astype(bool)
        cell_done = done[np.arange(len(wells)) // int(group.attrs[CHUNK_ATTR])]
    else:
        cell_done = np.zeros(len(wells), dtype=bool)
    frame = pd.DataFrame({"well": wells, "site": sites, "done": cell_done})
    out = frame.groupby(["well", "site"], sort=False).agg(n_cells=("done", "size"), done=("done", "all"))
    return out.reset_index()


def describe_profiles(path: Any) -> dict | None:
    """What a profiles store holds, or None when ``path`` is not a profiles store.

    Returns
    -------
    dict or None
        ``kind="profiles"``, ``plate``, ``cells``, ``layers``, ``classes``,
        ``features``, ``bundle``, ``bundle_hash``, ``complete``, ``chunks_done``,
        ``sites_done``/``sites_pending`` (``"B02/0"``...).
    """
    group = _existing(path)
    if not group or FINGERPRINT_ATTR not in group.attrs:
        return None
    prov = json.loads(group.attrs.get("provenance", "{}"))
    if not all(name in group for name in ("cell", "well", "site", "layer", "class", "feature")):
        return {"kind": "profiles", "plate": group.attrs.get("plate"), "complete": False,
                "chunks_done": "0 (setup interrupted: run the same score command again)",
                "bundle": prov.get("bundle_path"), "bundle_hash": prov.get("bundle_hash")}
    sites = done_sites(path)
    done = np.asarray(group[DONE_ARRAY][:]) if DONE_ARRAY in group else None
    return {
        "kind": "profiles", "plate": group.attrs.get("plate"), "cells": int(group["cell"].shape[0]),
        "layers": [str(v) for v in group["layer"][:]], "classes": [str(v) for v in group["class"][:]],
        "features": int(group["feature"].shape[0]), "bundle": prov.get("bundle_path"),
        "bundle_hash": prov.get("bundle_hash"), "complete": bool(group.attrs.get(COMPLETE_ATTR)),
        "chunks_done": f"{int(done.sum())}/{len(done)}" if done is not None else
        "0 (setup interrupted: run the same score command again)",
        "sites_done": [f"{w}/{s}" for w, s, d in zip(sites["well"], sites["site"], sites["done"]) if d],
        "sites_pending": [f"{w}/{s}" for w, s, d in zip(sites["well"], sites["site"], sites["done"]) if not d],
    }
