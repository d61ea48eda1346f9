"""Plate-scale scoring on Dask: one task per site, lazily, and resumable writes to Zarr.

:func:`score_plate` turns a plate, its labels and a model bundle into a lazy
``xarray.Dataset`` of profiles:

1. the cell table is computed first (one small task per site over the labels);
   it fixes the row order (``cell`` = cell-table order) and each site's cell count;
2. one Dask task per site with cells reads that site's image and label chunks,
   builds the crops *on the worker* (CuPy on a GPU worker), normalises them with
   the bundle's statistics, runs :func:`~gradcamo_dask.engine.explain` in micro-batches
   and returns only small per-cell arrays;
3. those become Dask arrays of known shape (one block per site along ``cell``),
   assembled into the Dataset with every cell-table column as a coord.

The model is never put into the graph: tasks carry the bundle's path and hash and
take the model from a per-process cache (:func:`cached_bundle`), filled once per
worker by :class:`ModelCache` (a ``distributed.WorkerPlugin``) or lazily on first
use (in-process schedulers).

:func:`~gradcamo_dask.profiles.store.write_profiles` writes the Dataset to Zarr resumably.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import operator
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph

from gradcamo_dask.errors import BundleMismatchError, InputError, LabelsError
from gradcamo_dask.jobs.devices import in_dask_worker, on_device, prepare_cuda, resolve_device
from gradcamo_dask.jobs.feed import ExplainRunner, SiteJob, score_sites
from gradcamo_dask.jobs.profile_layout import (cells_key, classic_settings, layer_shapes, profile_coords,
                                               profile_variables, scoring_provenance, site_variables)
from gradcamo_dask.jobs.resources import restrict_sites_to_gpus

__all__ = [
    "ModelCache",
    "cached_bundle",
    "folded_model",
    "score_plate",
    "score_site",
    "site_tasks",
]

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------ model cache

_CACHE: dict[tuple[str, str, str], Any] = {}
_CACHE_LOCK = threading.Lock()


def cached_bundle(path: str, expected_hash: str | None = None, device: str | None = None) -> Any:
    """The bundle at ``path`` loaded once per process and device (thread-safe).

    Parameters
    ----------
    path : str
        Bundle directory.
    expected_hash : str, optional
        ``Bundle.hash`` the caller scored with; a bundle changed on disk since
        then raises :class:`BundleMismatchError` instead of mixing two models.
    device : str, optional
        ``"cpu"``, ``"cuda"``, ``"cuda:<index>"``; default: CUDA when visible.
    """
    from gradcamo_dask.engine.bundles import open_bundle

    device = resolve_device(device)
    key = (str(Path(path).resolve()) if "://" not in str(path) else str(path), str(expected_hash or ""), device)
    with _CACHE_LOCK:
        bundle = _CACHE.get(key)
        if bundle is None:
            bundle = open_bundle(path, device=device)
            if device.startswith("cuda"):  # converted once per worker, not per batch
                import torch

                bundle.model.to(memory_format=torch.channels_last_3d)
            if expected_hash and bundle.hash != expected_hash:
                raise BundleMismatchError(
                    f"bundle {path} has hash {bundle.hash[:19]}..., the run was planned with "
                    f"{expected_hash[:19]}...; the bundle changed on disk during the run: score again"
                )
            _CACHE[key] = bundle
    return bundle


_FOLDED: dict[tuple[int, tuple], tuple[Any, Any]] = {}


def folded_model(bundle: Any, layers: Sequence[str]) -> Any:
    """The bundle's model with batch norms folded into convolutions, made once per process, bundle and layers.

    Scoring runs this copy on every device (:func:`~gradcamo_dask.engine.fold.fold_batch_norm`;
    ``layers`` keep their activations); on CUDA it keeps the ``channels_last_3d`` layout.
    """
    from gradcamo_dask.engine.fold import fold_batch_norm

    key = (id(bundle.model), tuple(layers))
    with _CACHE_LOCK:
        entry = _FOLDED.get(key)
        if entry is None or entry[0] is not bundle.model:  # the original is held, so its id is never reused
            folded = fold_batch_norm(bundle.model, bundle.config.input_shape, keep=layers)
            if next(folded.parameters()).device.type == "cuda":
                import torch

                folded.to(memory_format=torch.channels_last_3d)
            entry = _FOLDED[key] = (bundle.model, folded)
    return entry[1]


class ModelCache:
    """Worker plugin: load the bundle onto the worker's device once, when the worker starts.

    Registered by :func:`score_plate` with ``client.register_plugin``; site tasks
    then find the model in :func:`cached_bundle`'s cache. On GPU workers it also
    wires CuPy to PyTorch's caching allocator and turns on ``cudnn.benchmark``
    (:func:`~gradcamo_dask.jobs.devices.prepare_cuda`).
    """

    idempotent = True

    def __init__(self, path: str, bundle_hash: str) -> None:
        self.path = str(path)
        self.bundle_hash = str(bundle_hash)
        self.name = f"gradcamo-model-{bundle_hash[-16:]}"

    def setup(self, worker: Any = None) -> None:
        device = resolve_device()
        if device.startswith("cuda"):
            prepare_cuda()
        cached_bundle(self.path, self.bundle_hash, device)


def _as_worker_plugin(cache: ModelCache) -> Any:
    from distributed import WorkerPlugin

    class _ModelCachePlugin(WorkerPlugin):
        idempotent = True
        name = cache.name

        def setup(self, worker: Any) -> None:
            cache.setup(worker)

    return _ModelCachePlugin()


# ------------------------------------------------------------------ one site


def score_site(
    image_site: Any,
    labels_site: Any,
    cells_site: pd.DataFrame,
    spec: dict,
) -> dict[str, np.ndarray]:
    """Score one site's cells (in memory, on the worker): crops, normalisation, explain.

    Parameters
    ----------
    image_site : array (c, z, y, x)
        NumPy or CuPy (moved to the GPU here on a CUDA worker, to the host on a CPU one).
    labels_site : array (z, y, x) of int
    cells_site : DataFrame
        The site's rows of the cell table (``object_number``, ``center_z/y/x``).
    spec : dict
        ``bundle_path``, ``bundle_hash``, ``layers``, ``crop_size``, ``batch_size``
        (cells per micro-batch; crops are cut, normalised and resampled one batch at a
        time), ``target``, ``plate``, ``well``, ``site``, ``device`` (None = auto);
        optionally ``runner`` (a model runner, see :mod:`gradcamo_dask.jobs.feed`,
        with ``normalization`` and ``crop_fill``) in place of the bundle's model.

    Returns
    -------
    dict of NumPy arrays, one row per cell
        ``deep (n, features)`` float32, ``logits`` float32, ``predicted`` int16,
        ``gradcamo``/``cam_inside``/``cam_total`` ``(n, layers)`` float64 and
        ``cam_lowres_<k>`` per layer; ``classic (n, classic features)`` float32 when
        ``spec["classic"]`` holds ``channels``, ``spacing`` and ``options`` for
        :func:`~gradcamo_dask.profiles.classic.site_classic_features`.
    """
    return score_site_group([image_site], [labels_site], [cells_site], [spec])[0]


def score_site_group(images: Sequence[Any], labels: Sequence[Any], cells: Sequence[pd.DataFrame],
                     specs: Sequence[dict]) -> list[dict[str, np.ndarray]]:
    """Score several sites in one task (see :func:`score_site` for the arguments, one per site).

    Micro-batches of ``spec["batch_size"]`` cells span the sites, and with more than
    one site the next site's crops are cut in a thread while the current batch runs
    (:func:`~gradcamo_dask.jobs.feed.score_sites`). All specs share the bundle,
    layers, device and batch size of the first.
    """
    import torch

    spec = specs[0]
    device = resolve_device(spec.get("device"))
    # Denormal activations make CPU convolutions up to 10x slower and change nothing a score can see.
    torch.set_flush_denormal(True)
    if not in_dask_worker():
        # In-process schedulers run sites on several threads of one process: one torch thread per task.
        # (Measured on 2 busy cores: 2 intra-op threads per task were 50x slower than 1.) Workers of a
        # cluster get their share of cores from cluster.TorchThreads instead.
        torch.set_num_threads(int(spec.get("torch_threads") or 1))
    if device.startswith("cuda"):
        prepare_cuda()
    layers = list(spec["layers"])
    runner, normalization, fill = spec.get("runner"), spec.get("normalization"), spec.get("crop_fill", "zero")
    if runner is None:
        bundle = cached_bundle(spec["bundle_path"], spec["bundle_hash"], device)
        # crop_site refuses non-finite images, so crops are finite: no NaN scan, no host sync per batch
        runner, normalization = ExplainRunner(folded_model(bundle, layers), layers, spec["target"],
                                              check_finite=False, method=spec.get("cam_method", "gradcam")), \
            bundle.config.normalization
        fill = bundle.config.crop_fill
    jobs = [SiteJob(read=functools.partial(_pair, image, label), cells=rows,
                    where={"plate": one["plate"], "well": one["well"], "site": one["site"]}, outside=fill)
            for image, label, rows, one in zip(images, labels, cells, specs)]
    with on_device(device):
        outs = score_sites(jobs, runner, crop_size=tuple(spec["crop_size"]), normalization=normalization,
                           device=device, batch_size=int(spec["batch_size"]), prefetch=len(jobs) > 1,
                           classic=spec.get("classic"))
    return [site_result_types(out, len(layers)) for out in outs]


def _pair(image: Any, labels: Any) -> tuple[Any, Any]:
    return image, labels


def site_result_types(out: dict[str, np.ndarray], n_layers: int) -> dict[str, np.ndarray]:
    """A site's results in the dtypes of the profiles store (see :func:`score_site`)."""
    typed = {"deep": out["deep"].astype(np.float32), "logits": out["logits"].astype(np.float32),
             "predicted": out["predicted"].astype(np.int16)}
    for kind in ("gradcamo", "cam_inside", "cam_total"):
        typed[kind] = out[kind].astype(np.float64)
    for k in range(n_layers):
        typed[f"cam_lowres_{k}"] = out[f"cam_lowres_{k}"].astype(np.float32)
    if "classic" in out:
        typed["classic"] = out["classic"].astype(np.float32)
    return typed


def _flag_blank(out: dict, image_site: Any, cells_site: pd.DataFrame, spec: dict) -> dict:
    """Add ``blank_site`` (an all-zero site image: its scores mean nothing) and warn about it."""
    from gradcamo_dask.arrays import array_module

    blank = not bool(array_module(image_site).any(image_site))  # the array's own namespace: CuPy blocks too
    if blank:
        logger.warning("plate %s, well %s, site %s: the image is blank (all zero); its %d cells are flagged "
                       "blank_site", spec.get("plate"), spec.get("well"), spec.get("site"), len(cells_site))
    out["blank_site"] = np.full(len(cells_site), blank, dtype=bool)
    return out


def _score_block(image_block: Any, labels_block: Any, cells_site: pd.DataFrame, spec: dict) -> dict:
    return _flag_blank(score_site(image_block[0, 0], labels_block[0, 0], cells_site, spec), image_block, cells_site,
                       spec)


def _score_group_blocks(image_blocks: list, labels_blocks: list, cells: list, specs: list) -> list[dict]:
    outs = score_site_group([b[0, 0] for b in image_blocks], [b[0, 0] for b in labels_blocks], cells, specs)
    return [_flag_blank(o, b, c, s) for o, b, c, s in zip(outs, image_blocks, cells, specs)]


# ------------------------------------------------------------------ the plate


def score_plate(image: xr.DataArray, labels: xr.DataArray, bundle: Any, layers: str | Sequence[str] | None = None,
                client: Any = None, *, platemap: pd.DataFrame | Any = None, target: Any = "predicted",
                batch_size: int = 8, check_classes: bool = True, device: str | None = None,
                cells: pd.DataFrame | None = None, plate_path: str | None = None, labels_path: str | None = None,
                classic: bool | dict = False, sites_per_task: int = 1, cam_method: str = "gradcam") -> xr.Dataset:
    """Lazy profiles of every cell of a plate: deep features, logits, Grad-CAM(O) per layer.

    Parameters
    ----------
    image : DataArray (well, site, c, z, y, x)
        The plate, as from :func:`~gradcamo_dask.open_plate` (Dask-backed, read lazily).
    labels : DataArray (well, site, z, y, x) of int
        Its cell labels (same wells, sites and grid).
    bundle : str, Path or Bundle
        A bundle directory (or a loaded :class:`~gradcamo_dask.Bundle`; only its path reaches the workers).
    layers : str or list of str, optional
        Grad-CAM / feature layers (default: the bundle's ``layers``).
    client : distributed.Client, optional
        Cluster to run on (model loaded once per worker by a plugin); None: the current scheduler.
    platemap : DataFrame or path, optional
        Treatments per well (default: the coords the plate carries).
    target, cam_method : "predicted" or int; "gradcam" or "hirescam"
        Class explained (paper: the predicted class) and its map (paper: Grad-CAM; see
        :func:`~gradcamo_dask.engine.explain.explain`), both recorded in the provenance.
    batch_size : int
        Cells per forward pass on a worker (batches span the sites of a task).
    check_classes, device : bool; str, optional
        Refuse treatments that are not classes of the bundle (False: score new compounds); force ``"cpu"``
        or ``"cuda"`` on the workers (default: each worker's own).
    plate_path, labels_path : str, optional
        Recorded in the provenance (a report reads crops back from them); default: xarray's.
    cells, classic : DataFrame, optional; bool or dict
        A precomputed cell table (default: :func:`~gradcamo_dask.cell_table` at the bundle's crop grid); also
        CellProfiler's 3D features into ``classic`` (dict: ``site_classic_features`` options).
    sites_per_task : int
        Sites scored by one task: above 1, micro-batches span them and the next site is cut while the
        current batch runs (results equal one site per task to float rounding).

    Returns
    -------
    xarray.Dataset
        Lazy ``deep (cell, feature)``, ``logits (cell, class)``, ``predicted``, ``gradcamo``, ``cam_inside``,
        ``cam_total`` ``(cell, layer)``, ``cam_lowres_<k>``: one Dask block per site, rows in cell-table order,
        every table column a coord on ``cell``; attrs ``plate``, ``provenance`` (JSON). No cells: zero rows.

    Raises
    ------
    BundleMismatchError, LabelsError, PlateLayoutError
        The bundle's channels or classes do not fit the plate; labels missing, on another grid, not integers.
    """
    loaded, layers, crop_size, shapes = _checked_inputs(image, labels, bundle, layers, sites_per_task, cam_method)
    classic_spec, classic_names = classic_settings(image, classic)
    cells = _plate_cells(image, labels, loaded, cells, platemap, crop_size, client, check_classes)
    if client is not None:
        client.register_plugin(_as_worker_plugin(ModelCache(str(loaded.path), loaded.hash)))
    img, lab = (a if isinstance(a, da.Array) else da.asarray(a) for a in (image.data, labels.data))
    parameters = {"layers": layers, "target": target if isinstance(target, (str, int)) else "per-cell",
                  "batch_size": int(batch_size), "crop_size": list(crop_size),
                  "input_shape": list(loaded.config.input_shape), "normalization": loaded.config.normalization,
                  "check_classes": bool(check_classes), "classic": classic_spec,
                  # recorded only when set, so that earlier stores keep their fingerprint
                  **{k: v for k, v in (("sites_per_task", int(sites_per_task)), ("cam_method", cam_method),
                                       ("crop_fill", loaded.config.crop_fill)) if v not in (1, "gradcam", "zero")}}
    spec = {"bundle_path": str(loaded.path), "bundle_hash": loaded.hash, "layers": layers, "crop_size": crop_size,
            "batch_size": int(batch_size), "target": target, "plate": str(image.attrs.get("plate", "plate")),
            "device": device, "classic": classic_spec, "cam_method": cam_method}
    cells_sha256 = cells_key(cells)
    token = tokenize(img.name, lab.name, cells_sha256, loaded.hash, json.dumps(parameters, default=str), device)
    graph, site_name, counts = site_tasks(image, labels, cells, spec, token, sites_per_task, client)
    names = None if classic_spec is None else classic_names
    variables = profile_variables(shapes, layers, len(loaded.config.classes), None if names is None else len(names))
    ds = xr.Dataset(site_variables(graph, site_name, counts, variables, token),
                    coords=profile_coords(cells, shapes, layers, loaded.config.classes, names))
    for k, name in enumerate(layers):
        ds[f"cam_lowres_{k}"].attrs["layer"] = name
    provenance = scoring_provenance(image, labels, loaded, cells, layers=layers, shapes=shapes,
                                    parameters=parameters, cells_sha256=cells_sha256, plate_path=plate_path,
                                    labels_path=labels_path, dask_names=(img.name, lab.name))
    ds.attrs.update(plate=provenance["plate"], provenance=json.dumps(provenance, default=str))
    return ds


def _checked_inputs(image: xr.DataArray, labels: xr.DataArray, bundle: Any, layers: Any,
                    sites_per_task: int, cam_method: str = "gradcam") -> tuple[Any, list[str], tuple, dict]:
    """The loaded bundle, the layers, the crop size and the layers' shapes, once the inputs fit each other."""
    from gradcamo_dask.crop_geometry import zyx_size
    from gradcamo_dask.engine.bundles import Bundle
    from gradcamo_dask.engine.gradcam import check_method  # torch: on first use, not at import

    check_method(cam_method)
    from gradcamo_dask.io.layout import check_labels
    from gradcamo_dask.jobs.dimensionality import check_bundle_dims

    if tuple(image.dims) != ("well", "site", "c", "z", "y", "x"):
        raise InputError(f"image must have dims (well, site, c, z, y, x), got {image.dims}")
    if labels is None:
        raise LabelsError("no labels given; segment the plate first (gradcamo-dask segment) or pass --labels")
    check_labels(image, labels)
    plate = str(image.attrs.get("plate", "plate"))
    loaded = bundle if isinstance(bundle, Bundle) else cached_bundle(str(bundle), None, "cpu")
    cfg = loaded.config
    loaded.check_fits(channels=[str(c) for c in image["c"].values])
    check_bundle_dims(loaded, image)  # a 3D bundle on a 2D plate, or the reverse: DimensionalityError
    crop_size = zyx_size(tuple(None if n is None else int(n) for n in cfg.crop_shape))
    zyx = tuple(int(image.sizes[d]) for d in "zyx")
    if crop_size[0] is not None and crop_size[0] != zyx[0] and crop_size[0] > zyx[0]:
        raise BundleMismatchError(f"bundle expects crops of {crop_size} voxels, plate {plate!r} sites are only "
                                  f"{zyx}; use a bundle made for this plate's grid")
    if int(sites_per_task) < 1:
        raise InputError(f"sites_per_task must be >= 1, got {sites_per_task}")
    layers = list(cfg.layers) if layers is None else ([layers] if isinstance(layers, str) else list(layers))
    if not layers or not all(layers):
        raise InputError("no layers to explain: pass layers=[...] (the bundle names none)")
    return loaded, layers, crop_size, layer_shapes(loaded.model, cfg.input_shape, layers)


def _plate_cells(image: xr.DataArray, labels: xr.DataArray, loaded: Any, cells: pd.DataFrame | None,
                 platemap: Any, crop_size: tuple, client: Any, check_classes: bool) -> pd.DataFrame:
    """The cell table to score (computed now, one task per site, when not given), classes checked."""
    from gradcamo_dask.cells import cell_table

    with (client.as_current() if client is not None else contextlib.nullcontext()):
        if cells is None:
            if platemap is None:
                from gradcamo_dask.io.platemap import platemap_of

                platemap = platemap_of(image)
            cells = cell_table(labels, platemap, size=crop_size)
    cells = cells.reset_index(drop=True)
    if check_classes and len(cells) and "treatment" in cells:
        treatments = sorted({str(t) for t in cells["treatment"] if str(t)})
        if treatments:
            loaded.check_fits(classes=treatments)
    return cells


def site_tasks(image: xr.DataArray, labels: xr.DataArray, cells: pd.DataFrame, spec: dict, token: str,
               sites_per_task: int = 1, client=None) -> tuple[HighLevelGraph, str, list[int]]:
    """The scoring graph's site tasks: ``(graph, name, cells per site)``; task ``(name, k)`` scores site run k.

    Every site task is created here (one home for per-task annotations such as
    resources). With ``sites_per_task`` above 1, groups of sites run in one task
    ``("score-sites-<token>", first k)`` and each ``(name, k)`` picks its site's result
    from the group: micro-batches span the group and the next site is cut ahead.
    """
    from gradcamo_dask.cells import site_graph

    site_name = f"score-site-{token}"
    base, counts = site_graph(image, labels, cells, _score_block, site_name,
                              lambda w, s: ({**spec, "well": w, "site": s},))
    if sites_per_task > 1:
        base = _grouped(base, site_name, f"score-sites-{token}", len(counts), sites_per_task)
        # one group of sites per GPU; the picks of a group's results are trivial and run anywhere
        return restrict_sites_to_gpus(base, f"score-sites-{token}", client), site_name, counts
    # one site per GPU where workers advertise GPU=1
    return restrict_sites_to_gpus(base, site_name, client), site_name, counts


def _grouped(base: HighLevelGraph, site_name: str, group_name: str, n_sites: int, per_task: int) -> HighLevelGraph:
    """``base`` with its site tasks run in groups: layer ``group_name`` holds a task ``(group_name, g)`` per
    ``per_task`` sites, and layer ``site_name`` only picks site ``k``'s result from its group (own layer, so
    that a GPU restriction on the groups does not reach the picks)."""
    tasks = base.layers[site_name]
    groups, picks = {}, {}
    for g in range(0, n_sites, per_task):
        members = [tasks[(site_name, k)] for k in range(g, min(g + per_task, n_sites))]
        groups[(group_name, g)] = (_score_group_blocks, [m[1] for m in members], [m[2] for m in members],
                                   [m[3] for m in members], [m[4] for m in members])
        for j in range(len(members)):
            picks[(site_name, g + j)] = (operator.getitem, (group_name, g), j)
    layers = {**base.layers, group_name: groups, site_name: picks}
    dependencies = {**base.dependencies, group_name: set(base.dependencies[site_name]), site_name: {group_name}}
    return HighLevelGraph(layers, dependencies)
