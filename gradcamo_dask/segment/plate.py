"""Plate-scale 3D cell segmentation: Cellpose (3.x and 4.x) or a classical watershed baseline.

:func:`segment` turns a lazy plate image ``(well, site, c, z, y, x)`` into lazy
labels ``(well, site, z, y, x)`` int32 (0 = background, ids 1..N per site):
nothing is read or computed until the labels are. The unit of work is one site,
or one tile of a site larger than ``tile_shape`` (see :mod:`gradcamo_dask.segment.tiling`
for how tiles are stitched without cutting cells). :func:`segment_site` does
the same for one site held in memory.

Paper settings are the defaults (Grad-CAMO, DESIGN §2): Cellpose's 2D model per
z-slice, stitched across z with stitch threshold 0.05, flow threshold 0.75,
anisotropy 1.71, minimum size 30 voxels, on a nucleus and a cytoplasm channel
chosen by name. Cellpose's own 3D mode is ``do_3D=True``.

Weights (Cellpose only) resolve on the client before any task runs: a file
path, a model name in ``CELLPOSE_LOCAL_MODELS_PATH``, or Cellpose's cache
``~/.cellpose/models``; see :mod:`gradcamo_dask.segment.cellpose_adapter`. Each worker
process loads the model once (never shipped in the graph) and uses its GPU when
it has one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from gradcamo_dask.segment import tiling
from gradcamo_dask.arrays import to_numpy
from gradcamo_dask.errors import InputError, PlateLayoutError
from gradcamo_dask.segment.segmenters import PAPER_ANISOTROPY, Segmenter, WatershedSettings, make_segmenter

if TYPE_CHECKING:  # pragma: no cover
    import xarray as xr

__all__ = ["segment_plate", "segment_site", "Segmenter", "make_segmenter", "WatershedSettings"]

logger = logging.getLogger(__name__)

PLATE_DIMS = ("well", "site", "c", "z", "y", "x")
LABEL_DIMS = ("well", "site", "z", "y", "x")
#: Sites wider than this many voxels get their normalisation statistics from a strided sample.
STATISTICS_MAX_SIZE = 2048


def _stats_stride(shape_yx: Sequence[int]) -> int:
    return max(1, math.ceil(max(shape_yx) / STATISTICS_MAX_SIZE))


def _tile_shape(tile_shape: int | Sequence[int] | None) -> tuple[int, int] | None:
    """``None``, or a ``(y, x)`` pair of positive voxel counts (an int means a square)."""
    if tile_shape is None:
        return None
    pair = (tile_shape, tile_shape) if isinstance(tile_shape, (int, np.integer)) else tuple(tile_shape)
    if len(pair) != 2 or not all(int(v) == v and v > 0 for v in pair):
        raise InputError(f"tile_shape must be None, a positive int or a (y, x) pair of them, got {tile_shape!r}")
    return int(pair[0]), int(pair[1])


def _check_finite(x: np.ndarray, where: str) -> None:
    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
        raise InputError(f"{where}: the image holds NaN or inf intensities; fix or mask them before segmenting")


def segment_site(
    nucleus: np.ndarray,
    cytoplasm: np.ndarray | None = None,
    method: str | Segmenter = "cellpose",
    *,
    tile_shape: int | Sequence[int] | None = None,
    tile_overlap: int = 128,
    **options: Any,
) -> np.ndarray:
    """Segment one site held in memory.

    Parameters
    ----------
    nucleus, cytoplasm : array
        ``(z, y, x)`` (or ``(y, x)``) intensities of the nucleus and cytoplasm
        channels (NumPy or CuPy); ``cytoplasm`` may be None.
    method : str or Segmenter
        ``"cellpose"``, ``"watershed"``, or a :class:`Segmenter` from :func:`make_segmenter`.
    tile_shape : (int, int), optional
        Largest tile core ``(y, x)`` in voxels; sites wider than it are tiled
        with ``tile_overlap`` and stitched (:mod:`gradcamo_dask.segment.tiling`).
        None: never tile.
    tile_overlap : int
        Voxels added around each tile core; at least the largest cell diameter.
    **options
        Options of :func:`make_segmenter` (when ``method`` is a name).

    Returns
    -------
    numpy.ndarray
        int32 labels of the input's shape, 0 background, ids 1..N.
    """
    tile_shape = _tile_shape(tile_shape)
    segmenter = method if isinstance(method, Segmenter) else make_segmenter(method, **options)
    if isinstance(method, Segmenter) and options:
        raise InputError(f"options {sorted(options)} are ignored when a Segmenter is given; set them in make_segmenter")
    nucleus = to_numpy(nucleus)
    cytoplasm = None if cytoplasm is None else to_numpy(cytoplasm)
    flat = nucleus.ndim == 2
    if flat:
        nucleus = nucleus[np.newaxis]
        cytoplasm = None if cytoplasm is None else cytoplasm[np.newaxis]
    if nucleus.ndim != 3:
        raise InputError(f"nucleus must be (z, y, x) or (y, x), got shape {nucleus.shape}")
    if cytoplasm is not None and cytoplasm.shape != nucleus.shape:
        raise InputError(f"cytoplasm shape {cytoplasm.shape} differs from nucleus shape {nucleus.shape}")
    _check_finite(nucleus, "nucleus channel")
    if cytoplasm is not None:
        _check_finite(cytoplasm, "cytoplasm channel")
    site_yx = nucleus.shape[1:]
    if tile_shape is None or (site_yx[0] <= tile_shape[0] and site_yx[1] <= tile_shape[1]):
        labels = segmenter(nucleus, cytoplasm)
    else:
        statistics = segmenter.statistics(nucleus, cytoplasm)

        def window(yx: tuple[slice, slice]) -> np.ndarray:
            cyto = None if cytoplasm is None else cytoplasm[:, yx[0], yx[1]]
            return segmenter(nucleus[:, yx[0], yx[1]], cyto, statistics)

        labels, resolution = tiling.stitch_tiles(window, site_yx, tile_shape, tile_overlap)
        _warn_cut(resolution, "site", tile_overlap)
    return labels[0] if flat else labels


def _warn_cut(resolution: tiling.Resolution, where: str, overlap: int) -> None:
    if resolution.n_cut:
        message = (
            f"{where}: {resolution.n_cut} cell(s) touch a tile window's cut edge, so they may be cut "
            f"at a tile border; use a tile_overlap larger than the largest cell diameter (now {overlap} voxels)"
        )
        logger.warning(message)
        warnings.warn(message, stacklevel=3)


def _channel_index(image: xr.DataArray, name: str, role: str) -> int:
    names = [str(c) for c in image.coords["c"].values] if "c" in image.coords else []
    if name not in names:
        plate = image.attrs.get("plate", "")
        raise PlateLayoutError(
            f"plate {plate!r} has no channel {name!r} for the {role} ({role}_channel={name!r}); "
            f"its channels are: {', '.join(names) if names else '(none named)'}. "
            f"Pass {role}_channel= one of them"
        )
    return names.index(name)


def _plate_anisotropy(image: xr.DataArray) -> float:
    spacing = image.attrs.get("spacing_zyx_um")
    try:
        z, y, x = (float(v) for v in spacing)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return PAPER_ANISOTROPY
    if z > 0 and x > 0 and y > 0:
        return z / x
    return PAPER_ANISOTROPY


def _site_name(wells: Sequence[str], sites: Sequence[Any], plate: str, w: int, s: int) -> str:
    return f"plate {plate!r} well {wells[w]} site {sites[s]}"


def _segment_block(
    block: np.ndarray,
    segmenter: Segmenter,
    has_cytoplasm: bool,
    names: tuple[tuple[str, ...], tuple[Any, ...], str],
    block_info: dict | None = None,
) -> np.ndarray:
    """One site: ``(1, 1, channels, z, y, x)`` intensities -> ``(1, 1, z, y, x)`` int32 labels."""
    w, s = block_info[0]["chunk-location"][:2] if block_info else (0, 0)
    where = _site_name(*names, w, s)
    block = to_numpy(block)
    nucleus = block[0, 0, 0]
    cytoplasm = block[0, 0, 1] if has_cytoplasm else None
    _check_finite(block, where)
    try:
        labels = segmenter(nucleus, cytoplasm)
    except InputError as error:
        raise InputError(f"{where}: {error}") from error
    return labels[np.newaxis, np.newaxis]


# ---- tiled sites: one task per tile, then stitching (rules in gradcamo_dask.segment.tiling) ----


def _tile_statistics(sample: np.ndarray, segmenter: Segmenter, has_cytoplasm: bool, stride: int, where: str) -> dict:
    sample = to_numpy(sample)
    _check_finite(sample, where)
    return segmenter.statistics(sample[0], sample[1] if has_cytoplasm else None, voxel_stride=stride)


def _tile_candidates(
    window: np.ndarray,
    statistics: dict,
    segmenter: Segmenter,
    has_cytoplasm: bool,
    tile: tiling.Tile,
    grid: tiling.TileGrid,
    where: str,
) -> tiling.TileCandidates:
    window = to_numpy(window)
    _check_finite(window, f"{where} tile {tile.index}")
    labels = segmenter(window[0], window[1] if has_cytoplasm else None, statistics)
    return tiling.select_candidates(labels, tile, grid)


def _candidate_summary(candidates: tiling.TileCandidates) -> tiling.TileCandidates:
    return tiling.TileCandidates(candidates.tile_index, np.zeros((0, 0, 0), np.int32), candidates.voxels, candidates.score)


def _candidate_labels(candidates: tiling.TileCandidates) -> np.ndarray:
    return candidates.labels


def _resolve(summaries: list, pairs: list, keys: list, where: str, overlap: int) -> tiling.Resolution:
    resolution = tiling.resolve_duplicates(summaries, dict(zip(keys, pairs, strict=True)))
    _warn_cut(resolution, where, overlap)
    return resolution


def _tiled_site(
    data: Any, w: int, s: int, segmenter: Segmenter, has_cytoplasm: bool, grid: tiling.TileGrid, where: str
) -> Any:
    import dask
    import dask.array as da

    site = data[w, s]  # (channels, z, y, x), lazy
    n_z = site.shape[1]
    stride = _stats_stride(grid.site_shape)
    stats = dask.delayed(_tile_statistics)(site[:, :, ::stride, ::stride], segmenter, has_cytoplasm, stride, where)
    candidates = {
        t.index: dask.delayed(_tile_candidates)(
            site[:, :, t.window[0], t.window[1]], stats, segmenter, has_cytoplasm, t, grid, where
        )
        for t in grid.tiles
    }
    labels = {i: dask.delayed(_candidate_labels)(c) for i, c in candidates.items()}
    summaries = [dask.delayed(_candidate_summary)(candidates[t.index]) for t in grid.tiles]
    keys = [(a.index, b.index) for a, b in grid.adjacent_pairs()]
    pairs = [dask.delayed(tiling.pair_overlaps)(a, labels[a.index], b, labels[b.index]) for a, b in grid.adjacent_pairs()]
    resolution = dask.delayed(_resolve)(summaries, pairs, keys, where, grid.overlap)
    rows = []
    for r in range(grid.rows):
        row = []
        for c in range(grid.cols):
            tile = grid.tile(r, c)
            windows = {n.index: labels[n.index] for n in grid.neighbours(tile)}
            core = dask.delayed(tiling.paint_core)(tile, grid, windows, resolution)
            shape = (n_z, tile.core[0].stop - tile.core[0].start, tile.core[1].stop - tile.core[1].start)
            row.append(da.from_delayed(core, shape=shape, dtype=np.int32))
        rows.append(row)
    return da.block(rows)


def segment_plate(
    image: xr.DataArray,
    method: str = "cellpose",
    *,
    nucleus_channel: str = "DNA",
    cytoplasm_channel: str | None = "RNA",
    model: str | os.PathLike[str] | None = None,
    diameter: float | None = None,
    stitch_threshold: float = 0.05,
    flow_threshold: float = 0.75,
    cellprob_threshold: float = 0.0,
    anisotropy: float | None = None,
    min_size: int = 30,
    do_3D: bool = False,
    device: str = "auto",
    batch_size: int = 8,
    normalize: bool = True,
    allow_download: bool = False,
    cellpose_options: Mapping[str, Any] | None = None,
    nucleus_diameter: float | None = None,
    smoothing: float = 1.0,
    seed_height: float = 0.1,
    tile_shape: int | Sequence[int] | None = (2048, 2048),
    tile_overlap: int = 128,
) -> xr.DataArray:
    """Segment every site of a plate into 3D cells, lazily.

    Parameters
    ----------
    image : xarray.DataArray
        Plate image with dims ``(well, site, c, z, y, x)`` (``open_plate``), Dask-backed or in memory.
    method : {"cellpose", "watershed"}
        Cellpose (the paper's choice) or the classical baseline, which needs no weights.
    nucleus_channel, cytoplasm_channel : str
        Channel names (coordinate ``c``) of the nucleus and cytoplasm stains;
        ``cytoplasm_channel=None`` segments from the nucleus channel alone.
    model : str or path-like, optional
        Cellpose weights: a file, or a model name looked up in
        ``CELLPOSE_LOCAL_MODELS_PATH`` then ``~/.cellpose/models``; None: ``cyto3``
        (Cellpose 3) or ``cpsam`` (Cellpose 4).
    diameter : float, optional
        Typical cell diameter in xy voxels for Cellpose; None: the model's own.
    stitch_threshold, flow_threshold, cellprob_threshold : float
        Cellpose settings (paper: 0.05, 0.75, Cellpose default 0.0).
    anisotropy : float, optional
        z step over xy pixel size; None: from the plate's ``spacing_zyx_um``,
        else the paper's 1.71. Cellpose uses it in 3D mode only; the baseline always.
    min_size : int
        Smallest cell kept, in voxels (paper: 30).
    do_3D : bool
        Cellpose's 3D mode instead of per-slice 2D plus stitching.
    device : str
        ``"auto"`` (a GPU when the worker has one), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
    batch_size : int
        Cellpose tiles (224 x 224 or 256 x 256) per network batch.
    normalize : bool
        Cellpose percentile normalisation (1st-99th) with site-level ranges.
    allow_download : bool
        Let Cellpose download a missing built-in model (off: fail at once offline).
    cellpose_options : mapping, optional
        Extra keyword arguments for ``CellposeModel.eval`` (e.g. ``{"niter": 200}``).
    nucleus_diameter, smoothing, seed_height
        Baseline settings, see :mod:`gradcamo_dask.segment.watershed`.
    tile_shape : (int, int), optional
        Sites larger than this in y or x are cut into tiles of at most this core
        size (voxels), segmented one task per tile and stitched so that no cell
        is cut (:mod:`gradcamo_dask.segment.tiling`). None: one task per site always.
    tile_overlap : int
        Voxels of context around each tile core; at least the largest cell
        diameter (default 128, the paper's crop width).

    Returns
    -------
    xarray.DataArray
        ``"labels"``, dims ``(well, site, z, y, x)``, int32, Dask-backed, chunked
        one site each (one tile core each for tiled sites); the image's well and
        site coordinates and ``plate``/``spacing_zyx_um`` attrs, plus
        ``segmentation``: a JSON string with the method, every setting, the
        Cellpose version and the weights' SHA-256.

    Raises
    ------
    PlateLayoutError
        The image lacks the expected dims or a named channel (the message lists the plate's channels).
    WeightsNotFoundError, WeightsFormatError
        Cellpose weights missing (says where to put them) or not a Cellpose model.
    """
    import dask.array as da
    import xarray as xr

    if not isinstance(image, xr.DataArray):
        raise PlateLayoutError(f"segment_plate() takes the plate image as an xarray.DataArray (open_plate), got {type(image).__name__}")
    if tuple(image.dims) != PLATE_DIMS:
        raise PlateLayoutError(
            f"plate {image.attrs.get('plate', '')!r} has dims {tuple(image.dims)}; segment_plate() needs {PLATE_DIMS}"
        )
    tile_shape = _tile_shape(tile_shape)
    indices = [_channel_index(image, nucleus_channel, "nucleus")]
    if cytoplasm_channel is not None:
        indices.append(_channel_index(image, cytoplasm_channel, "cytoplasm"))
    if anisotropy is None:
        anisotropy = _plate_anisotropy(image)
    segmenter = make_segmenter(
        method,
        model=model,
        diameter=diameter,
        stitch_threshold=stitch_threshold,
        flow_threshold=flow_threshold,
        cellprob_threshold=cellprob_threshold,
        anisotropy=anisotropy,
        min_size=min_size,
        do_3D=do_3D,
        device=device,
        batch_size=batch_size,
        normalize=normalize,
        allow_download=allow_download,
        cellpose_options=cellpose_options,
        nucleus_diameter=nucleus_diameter,
        smoothing=smoothing,
        seed_height=seed_height,
    )
    has_cytoplasm = cytoplasm_channel is not None
    data = image.data
    if not isinstance(data, da.Array):
        data = da.from_array(data, chunks=(1, 1, -1, -1, -1, -1))
    data = data[:, :, indices]
    n_wells, n_sites, _, n_z, n_y, n_x = data.shape
    wells = tuple(str(v) for v in image.coords["well"].values) if "well" in image.coords else tuple(map(str, range(n_wells)))
    sites = tuple(image.coords["site"].values.tolist()) if "site" in image.coords else tuple(range(n_sites))
    plate = str(image.attrs.get("plate", ""))
    tiled = tile_shape is not None and (n_y > tile_shape[0] or n_x > tile_shape[1])
    if not tiled:
        data = data.rechunk((1, 1, -1, -1, -1, -1))
        labels = da.map_blocks(
            _segment_block,
            data,
            segmenter=segmenter,
            has_cytoplasm=has_cytoplasm,
            names=(wells, sites, plate),
            drop_axis=2,
            dtype=np.int32,
            chunks=(1, 1, n_z, n_y, n_x),
            meta=np.empty((0, 0, 0, 0, 0), np.int32),
            name=f"segment-{method}",
        )
    else:
        grid = tiling.plan_tiles((n_y, n_x), tile_shape, tile_overlap)
        site_arrays = [
            da.stack(
                [
                    _tiled_site(data, w, s, segmenter, has_cytoplasm, grid, _site_name(wells, sites, plate, w, s))
                    for s in range(n_sites)
                ]
            )
            for w in range(n_wells)
        ]
        labels = da.stack(site_arrays)
    from gradcamo_dask.io.layout import labels_like

    out = labels_like(image, labels)  # the image's well/site coords (platemap included) and attrs
    provenance = segmenter.provenance()
    provenance.update(nucleus_channel=nucleus_channel, cytoplasm_channel=cytoplasm_channel)
    provenance.update(tile_shape=None if tile_shape is None else list(tile_shape), tile_overlap=tile_overlap)
    out.attrs["segmentation"] = json.dumps(provenance, default=str)
    return out

