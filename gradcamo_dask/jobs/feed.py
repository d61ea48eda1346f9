"""Feeding a model on a worker: fixed-size micro-batches that span sites, with the next site prefetched.

:func:`score_sites` scores the cells of one or more sites with a model runner:

* a producer reads each site (:class:`SiteJob`), moves it to the device, and cuts,
  normalises and stacks the crops of one micro-batch at a time (``batch_size``
  cells, filled across site boundaries), so a site's crops never exist all at once
  in float32;
* with ``prefetch=True`` the producer runs in a thread, at most ``depth`` batches
  ahead (:class:`~gradcamo_dask.jobs.prefetch.Prefetcher`): the next site's read,
  decompression and crops overlap the current batch; host batches for a CUDA model
  go through pinned buffers and a side stream;
* the consumer hands each batch to the runner and keeps its results on the device;
  nothing in its loop waits for the device. Results go to the host once, after the
  last batch, and are split per site.

A runner is any callable ``runner(crops, masks) -> {name: array (n, ...)}`` on
normalised crops ``(n, c, z, y, x)`` and masks ``(n, z, y, x)``: :class:`ExplainRunner`
(the model with :func:`~gradcamo_dask.engine.explain.explain`) or :class:`SleepRunner`
(a stand-in GPU that takes a fixed time per cell, for simulated fleets).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gradcamo_dask.arrays import array_module, to_numpy, to_torch
from gradcamo_dask.jobs.devices import site_array
from gradcamo_dask.jobs.prefetch import Prefetcher, stager_for

__all__ = ["Batch", "ExplainRunner", "FeedStats", "SiteJob", "SleepRunner", "score_sites"]

DEFAULT_BATCH_CELLS = 32
CENTERS = ["center_z", "center_y", "center_x"]  # voxels, as cell_table writes them


@dataclass
class SiteJob:
    """One site to score: how to read it and which cells to crop.

    Attributes
    ----------
    read : callable
        ``read() -> (image (c, z, y, x), labels (z, y, x))``, NumPy or CuPy; called
        in the producer (a Zarr read for a plate on disk).
    cells : DataFrame
        ``object_number``, ``center_z/y/x`` of the cells, in output order.
    where : dict
        ``plate``, ``well``, ``site`` (for error messages).
    outside : {"zero", "background"}
        What fills crop windows past the site, as the model was trained (the bundle's ``crop_fill``).
    """

    read: Callable[[], tuple[Any, Any]]
    cells: Any
    where: dict = field(default_factory=dict)
    outside: str = "zero"


@dataclass
class Batch:
    """Normalised crops and masks of up to ``batch_size`` cells, and where each run of them came from."""

    crops: Any
    masks: Any
    owners: list[tuple[int, int, int]]  # (job index, first row, stop row), in batch order
    classic: Any = None
    copied: Any = None  # the event of its host-to-device copy (CUDA stager), else None


@dataclass
class FeedStats:
    """Seconds the consumer spent waiting for batches vs running the model (idle share of the device)."""

    wait_s: float = 0.0
    run_s: float = 0.0
    batches: int = 0
    cells: int = 0

    @property
    def idle_share(self) -> float:
        total = self.wait_s + self.run_s
        return self.wait_s / total if total > 0 else 0.0


class ExplainRunner:
    """Features, logits, Grad-CAM and Grad-CAMO of a batch with :func:`~gradcamo_dask.engine.explain.explain`.

    Results stay on the batch's device as torch tensors (``deep``, ``logits``,
    ``predicted``, ``gradcamo``, ``cam_inside``, ``cam_total``, ``cam_lowres_<k>``).
    ``check_finite=False`` (crops of integer images) keeps host syncs out of the loop.
    """

    def __init__(self, model: Any, layers: Sequence[str], target: Any = "predicted", *,
                 check_finite: bool = True, method: str = "gradcam") -> None:
        self.model, self.layers, self.target, self.check_finite = model, list(layers), target, check_finite
        self.method = method  # "gradcam" (paper) or "hirescam"

    def __call__(self, crops: Any, masks: Any) -> dict[str, Any]:
        import torch

        from gradcamo_dask.engine.explain import explain

        result = explain(self.model, to_torch(crops), to_torch(_bool_view(masks)).bool(), layers=self.layers,
                         target=self.target, batch_size=int(crops.shape[0]), check_finite=self.check_finite,
                         method=self.method)
        out = {"deep": torch.cat([result.features[n] for n in self.layers], dim=1), "logits": result.logits,
               "predicted": result.predicted}
        for kind in ("gradcamo", "cam_inside", "cam_total"):
            out[kind] = torch.stack([getattr(result, kind)[n] for n in self.layers], dim=1)
        for k, name in enumerate(self.layers):
            out[f"cam_lowres_{k}"] = result.cams[name]
        return out


def _bool_view(masks: Any) -> Any:
    """CuPy bool arrays as uint8 for DLPack (bool support varies across CuPy versions)."""
    return masks.view("uint8") if array_module(masks) is not np and masks.dtype == bool else masks


class SleepRunner:
    """A stand-in GPU: sleeps ``seconds_per_cell`` per cell and returns zeros of the runner's shapes.

    ``shapes``: ``{name: (tail shape, dtype)}`` of each per-cell result (as
    :class:`ExplainRunner` would return them). 1 ms per cell stands for an H100 at
    1,000 cells/s.
    """

    def __init__(self, seconds_per_cell: float, shapes: dict[str, tuple[tuple[int, ...], Any]]) -> None:
        self.seconds_per_cell, self.shapes = float(seconds_per_cell), dict(shapes)

    def __call__(self, crops: Any, masks: Any) -> dict[str, Any]:
        n = int(crops.shape[0])
        time.sleep(self.seconds_per_cell * n)  # releases the GIL, like a GPU kernel
        return {name: np.zeros((n, *tail), dtype=dtype) for name, (tail, dtype) in self.shapes.items()}


def _batches(jobs: Sequence[SiteJob], batch_size: int, device: str, crop_size: tuple, normalization: dict,
             classic: dict | None) -> Iterator[Batch]:
    """Micro-batches of ``batch_size`` cells across ``jobs``: each cut and normalised when it is needed."""
    from gradcamo_dask.cells import crop_site
    from gradcamo_dask.crop_geometry import background_level, windows_past
    from gradcamo_dask.normalize import normalize_crops

    pending: list[tuple] = []  # (crops, masks, owner, classic)
    filled = 0
    for index, job in enumerate(jobs):
        n = len(job.cells)
        if n == 0:
            continue
        image, labels = job.read()
        image, labels = site_array(image, device), site_array(labels, device)
        # the site's level once, not once per micro-batch (a batch sees only some of the site's cells), and only
        # when some window runs past the site (about 77 ms for a 6 x 21 x 1080 x 1080 site on one CPU core)
        past = job.outside == "background" and windows_past(job.cells[CENTERS].to_numpy(float), crop_size,
                                                             image.shape[1:])
        fill = background_level(image, labels) if past else "zero"
        start = 0
        while start < n:
            stop = min(n, start + batch_size - filled)
            rows = job.cells.iloc[start:stop].reset_index(drop=True)
            crops, masks = crop_site(image, labels, rows, crop_size, outside=fill, **job.where)
            extra = None
            if classic is not None:  # CellProfiler measurements on the same raw crops and masks
                from gradcamo_dask.profiles.classic import site_classic_features

                extra = site_classic_features(to_numpy(crops), to_numpy(masks), tuple(classic["channels"]),
                                              tuple(classic["spacing"]), **classic["options"])[1].astype(np.float32)
            # the crops are this micro-batch's own fresh buffer: normalised in place, no second float32 copy
            pending.append((normalize_crops(crops, normalization, overwrite=True), masks, (index, start, stop), extra))
            filled += stop - start
            start = stop
            if filled == batch_size:
                yield _stack(pending)
                pending, filled = [], 0
    if pending:
        yield _stack(pending)


def _stack(pending: list[tuple]) -> Batch:
    xp = array_module(pending[0][0])
    if len(pending) == 1:
        crops, masks, owner, extra = pending[0]
        return Batch(crops, masks, [owner], extra)
    extras = [p[3] for p in pending]
    return Batch(xp.concatenate([p[0] for p in pending]), xp.concatenate([p[1] for p in pending]),
                 [p[2] for p in pending], None if extras[0] is None else np.concatenate(extras))


def score_sites(
    jobs: Sequence[SiteJob],
    runner: Callable[[Any, Any], dict[str, Any]],
    *,
    crop_size: Sequence[int | None],
    normalization: dict,
    device: str = "cpu",
    batch_size: int = DEFAULT_BATCH_CELLS,
    prefetch: bool = True,
    depth: int = 2,
    classic: dict | None = None,
    stats: FeedStats | None = None,
) -> list[dict[str, np.ndarray]]:
    """Score the cells of ``jobs`` with ``runner``; one dict of NumPy arrays per job, rows in cell order.

    Parameters
    ----------
    jobs : list of SiteJob
    runner : callable
        ``runner(crops, masks) -> {name: array (n, ...)}``.
    crop_size : (z, y, x)
        Crop size in voxels (None = the whole axis).
    normalization : dict
        ``{"mean": [...], "std": [...]}`` per channel (a bundle's).
    device : str
        ``"cpu"`` or ``"cuda:<index>"``: where sites are cropped (CuPy on CUDA).
    batch_size : int
        Cells per micro-batch (fixed; batches span sites).
    prefetch : bool
        Read and crop ahead in a thread, ``depth`` batches at most.
    classic : dict, optional
        ``channels``, ``spacing``, ``options`` for CellProfiler features (``classic``).
    stats : FeedStats, optional
        Filled with the consumer's waiting and running seconds.
    """
    stats = stats if stats is not None else FeedStats()
    source = _batches(jobs, int(batch_size), device, tuple(crop_size), normalization, classic)
    stager = stager_for(device, depth + 1)  # pinned buffers and a side stream for host batches on CUDA; else nothing
    feed = Prefetcher(source, depth, stager) if prefetch else (stager.ready(stager.stage(b)) for b in source)
    parts: list[tuple[list, dict, Any]] = []
    ready = time.perf_counter()
    for batch in feed:
        got = time.perf_counter()
        stats.wait_s += got - ready
        parts.append((batch.owners, runner(batch.crops, batch.masks), batch.classic))
        ready = time.perf_counter()
        stats.run_s += ready - got
        stats.batches += 1
        stats.cells += int(batch.crops.shape[0])
    return _split(parts, jobs)


def _split(parts: list[tuple[list, dict, Any]], jobs: Sequence[SiteJob]) -> list[dict[str, np.ndarray]]:
    """Per-job host arrays from the batches' device results (one transfer per result name)."""
    out: list[dict[str, list]] = [{} for _ in jobs]
    if not parts:
        return [{} for _ in jobs]
    names = list(parts[0][1])
    whole = {name: to_numpy(_concat([p[1][name] for p in parts])) for name in names}
    classic = [p[2] for p in parts]
    whole_classic = np.concatenate(classic) if classic[0] is not None else None
    row = 0
    for owners, _, _ in parts:
        for index, start, stop in owners:
            n = stop - start
            for name, values in whole.items():
                out[index].setdefault(name, []).append(values[row:row + n])
            if whole_classic is not None:
                out[index].setdefault("classic", []).append(whole_classic[row:row + n])
            row += n
    return [{name: np.concatenate(chunks) for name, chunks in site.items()} for site in out]


def _concat(values: list) -> Any:
    first = values[0]
    if hasattr(first, "detach"):  # torch
        import torch

        return torch.cat(values)
    return array_module(first).concatenate(values)
