"""Overlap tiling of large sites and stitching of the per-tile labels into one site.

A site wider than one block is cut, in y and x only (every tile keeps all z
slices), into a regular grid of *cores* that partition the site. Each tile is
segmented on its *window*: the core grown by ``overlap`` voxels on every side
(clipped to the site). Windows overlap, cores do not.

Stitching rule (the reason it keeps every cell whole)
------------------------------------------------------
1. Candidates. From its window, a tile keeps the objects whose centroid (mean
   y, x of its voxels, in site coordinates, rounded down) lies in its core grown
   by ``overlap // 2``. Every cell's centroid lies in exactly one core, so every
   cell is a candidate of at least one tile; with ``overlap`` at least the
   largest cell diameter, a cell whose centroid lies in a core (or within
   ``overlap // 2`` of it) lies wholly inside that tile's window, never cut.
2. Score. Each candidate gets a score: its distance, in voxels, from the
   window's *cut* edges (window edges inside the site; the site's own border is
   not a cut). A candidate that touches a cut edge scores 0 and is counted as
   cut. More context around an object means a more trustworthy segmentation.
3. Duplicates. Candidates of different tiles are the same cell when they share
   at least ``duplicate_overlap`` (default half) of the smaller one's voxels.
   Duplicate groups (transitively) keep one member: the highest score, ties
   going to the lower tile index, then the lower local id. The others are
   dropped. With a deterministic segmenter whose result does not depend on
   what lies outside the window, the copies are identical and this is exact.
4. Ids. Kept candidates get site ids 1..N in (tile index, local id) order.
5. Painting. Each core is painted from its own window and its neighbours'
   windows (a window reaches at most into adjacent cores, since ``overlap`` may
   not exceed a core's size). Where two kept objects claim a voxel, the higher
   score wins, ties going to the lower tile index. Each voxel lies in exactly
   one core, so blocks never disagree.

Cells larger than ``overlap`` may be cut; they are kept (score 0) and counted so
that the caller can warn and suggest a larger overlap.

The functions here are pure NumPy on in-memory arrays; :func:`stitch_tiles`
runs them in order for a whole site, and :mod:`gradcamo_dask.segment.plate` wires the
same functions into a Dask graph with one task per tile (no site-sized array
is ever held by one task).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

from gradcamo_dask.errors import InputError

__all__ = [
    "Tile",
    "TileGrid",
    "TileCandidates",
    "Resolution",
    "plan_tiles",
    "select_candidates",
    "pair_overlaps",
    "resolve_duplicates",
    "paint_core",
    "stitch_tiles",
]


@dataclass(frozen=True)
class Tile:
    """One tile of a site: its core (a cell of the partition) and its window.

    Attributes
    ----------
    index : int
        Row-major position in the grid, 0-based.
    row, col : int
        Grid position.
    core : tuple of slice
        ``(y, x)`` slices of the core in site coordinates (voxels).
    window : tuple of slice
        ``(y, x)`` slices of the window (core grown by the overlap, clipped to the site).
    """

    index: int
    row: int
    col: int
    core: tuple[slice, slice]
    window: tuple[slice, slice]


@dataclass(frozen=True)
class TileGrid:
    """A site's tiles plus the site shape and overlap they were planned with."""

    site_shape: tuple[int, int]
    overlap: int
    rows: int
    cols: int
    tiles: tuple[Tile, ...]

    def tile(self, row: int, col: int) -> Tile:
        return self.tiles[row * self.cols + col]

    def neighbours(self, tile: Tile) -> list[Tile]:
        """The tile itself and its up to 8 neighbours, in tile-index order."""
        out = []
        for r in range(max(0, tile.row - 1), min(self.rows, tile.row + 2)):
            for c in range(max(0, tile.col - 1), min(self.cols, tile.col + 2)):
                out.append(self.tile(r, c))
        return out

    def adjacent_pairs(self) -> list[tuple[Tile, Tile]]:
        """Pairs ``(a, b)``, ``a.index < b.index``, of tiles whose windows may share cells."""
        pairs = []
        for a in self.tiles:
            for b in self.neighbours(a):
                if b.index > a.index:
                    pairs.append((a, b))
        return pairs

    @property
    def core_chunks(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Core sizes along y and x, as Dask chunk tuples."""
        ys = tuple(self.tile(r, 0).core[0].stop - self.tile(r, 0).core[0].start for r in range(self.rows))
        xs = tuple(self.tile(0, c).core[1].stop - self.tile(0, c).core[1].start for c in range(self.cols))
        return ys, xs


def _even_bounds(length: int, max_size: int) -> list[int]:
    n = max(1, math.ceil(length / max_size))
    return [round(i * length / n) for i in range(n + 1)]


def plan_tiles(site_shape: Sequence[int], tile_shape: Sequence[int], overlap: int) -> TileGrid:
    """Cut a site of ``(y, x)`` size ``site_shape`` into cores of at most ``tile_shape``.

    Cores are split evenly (sizes differ by at most one voxel), so that no thin
    last tile is left over.

    Parameters
    ----------
    site_shape : (int, int)
        Site size in voxels, ``(y, x)``.
    tile_shape : (int, int)
        Largest core size in voxels, ``(y, x)``.
    overlap : int
        Voxels added on each side of a core to make its window; at least the
        largest expected cell diameter. Must not exceed the smallest core.
    """
    site_y, site_x = (int(v) for v in site_shape)
    tile_y, tile_x = (int(v) for v in tile_shape)
    overlap = int(overlap)
    if tile_y < 1 or tile_x < 1:
        raise InputError(f"tile_shape must be positive voxel counts (y, x), got {tuple(tile_shape)}")
    if overlap < 0:
        raise InputError(f"tile_overlap must be >= 0 voxels, got {overlap}")
    ybounds = _even_bounds(site_y, tile_y)
    xbounds = _even_bounds(site_x, tile_x)
    rows, cols = len(ybounds) - 1, len(xbounds) - 1
    smallest = min(min(np.diff(ybounds)), min(np.diff(xbounds)))
    if (rows > 1 or cols > 1) and overlap > smallest:
        raise InputError(
            f"tile_overlap {overlap} voxels is larger than the smallest tile core ({smallest} voxels) "
            f"for a {site_y} x {site_x} site cut into {rows} x {cols} tiles of at most {tile_y} x {tile_x}: "
            "use larger tiles or a smaller overlap"
        )
    tiles = []
    for r in range(rows):
        for c in range(cols):
            y0, y1 = ybounds[r], ybounds[r + 1]
            x0, x1 = xbounds[c], xbounds[c + 1]
            window = (
                slice(max(0, y0 - overlap), min(site_y, y1 + overlap)),
                slice(max(0, x0 - overlap), min(site_x, x1 + overlap)),
            )
            tiles.append(Tile(r * cols + c, r, c, (slice(y0, y1), slice(x0, x1)), window))
    return TileGrid((site_y, site_x), overlap, rows, cols, tuple(tiles))


@dataclass
class TileCandidates:
    """Candidate objects of one tile, from its window's labels.

    Attributes
    ----------
    tile_index : int
    labels : numpy.ndarray
        ``(z, wy, wx)`` int32 labels of the window holding only the candidates,
        numbered 1..n in the order of the segmenter's ids.
    voxels : numpy.ndarray
        ``(n,)`` voxel count per candidate (index ``i`` is candidate ``i + 1``).
    score : numpy.ndarray
        ``(n,)`` distance in voxels from the nearest cut edge of the window (0: touches one).
    """

    tile_index: int
    labels: np.ndarray
    voxels: np.ndarray
    score: np.ndarray

    @property
    def count(self) -> int:
        return int(self.voxels.shape[0])


def select_candidates(window_labels: np.ndarray, tile: Tile, grid: TileGrid) -> TileCandidates:
    """Keep the objects of a window that this tile may own (rule 1) and score them (rule 2).

    Parameters
    ----------
    window_labels : numpy.ndarray
        ``(z, wy, wx)`` integer labels of the tile's window from any segmenter
        (0 = background, ids unique within the window).
    tile, grid : Tile, TileGrid
        The tile and the grid it belongs to.
    """
    labels = np.asarray(window_labels)
    wy = tile.window[0].stop - tile.window[0].start
    wx = tile.window[1].stop - tile.window[1].start
    if labels.ndim != 3 or labels.shape[1:] != (wy, wx):
        raise InputError(f"labels of tile {tile.index} have shape {labels.shape}, expected (z, {wy}, {wx})")
    ids = np.unique(labels)
    ids = ids[ids != 0]
    empty = TileCandidates(tile.index, np.zeros(labels.shape, np.int32), np.zeros(0, np.int64), np.zeros(0))
    if ids.size == 0:
        return empty
    index = np.arange(1, ids.size + 1)
    dense = (np.searchsorted(ids, labels) + 1).astype(np.int32)  # ids -> 1..n
    dense[labels == 0] = 0
    voxels = ndi.sum_labels(np.ones(labels.shape, np.int64), dense, index).astype(np.int64)
    _, cy, cx = (np.asarray(v) for v in zip(*ndi.center_of_mass(np.ones(labels.shape), dense, index)))
    cy = np.floor(cy).astype(np.int64) + tile.window[0].start
    cx = np.floor(cx).astype(np.int64) + tile.window[1].start
    margin = grid.overlap // 2
    own = (
        (cy >= tile.core[0].start - margin)
        & (cy < tile.core[0].stop + margin)
        & (cx >= tile.core[1].start - margin)
        & (cx < tile.core[1].stop + margin)
    )
    # distance of each object's bounding box to the window's cut edges
    site_y, site_x = grid.site_shape
    boxes = ndi.find_objects(dense)
    distances = np.full(ids.size, np.inf)
    for i, box in enumerate(boxes):
        if box is None:
            continue
        y0, y1 = box[1].start, box[1].stop  # window coordinates, half-open
        x0, x1 = box[2].start, box[2].stop
        d = np.inf
        if tile.window[0].start > 0:
            d = min(d, y0)
        if tile.window[0].stop < site_y:
            d = min(d, wy - y1)
        if tile.window[1].start > 0:
            d = min(d, x0)
        if tile.window[1].stop < site_x:
            d = min(d, wx - x1)
        distances[i] = d
    keep = np.flatnonzero(own)
    if keep.size == 0:
        return empty
    lut = np.zeros(ids.size + 1, np.int32)
    lut[keep + 1] = np.arange(1, keep.size + 1, dtype=np.int32)
    score = distances[keep]
    score[np.isinf(score)] = float(max(grid.site_shape))  # no cut edge at all: best possible
    return TileCandidates(tile.index, lut[dense], voxels[keep], score.astype(np.float64))


def _window_intersection(a: Tile, b: Tile) -> tuple[tuple[slice, slice], tuple[slice, slice]] | None:
    y0 = max(a.window[0].start, b.window[0].start)
    y1 = min(a.window[0].stop, b.window[0].stop)
    x0 = max(a.window[1].start, b.window[1].start)
    x1 = min(a.window[1].stop, b.window[1].stop)
    if y0 >= y1 or x0 >= x1:
        return None
    in_a = (slice(y0 - a.window[0].start, y1 - a.window[0].start), slice(x0 - a.window[1].start, x1 - a.window[1].start))
    in_b = (slice(y0 - b.window[0].start, y1 - b.window[0].start), slice(x0 - b.window[1].start, x1 - b.window[1].start))
    return in_a, in_b


def pair_overlaps(a: Tile, labels_a: np.ndarray, b: Tile, labels_b: np.ndarray) -> np.ndarray:
    """Shared voxel counts of the candidates of two tiles, as rows ``(id_a, id_b, voxels)``."""
    both = _window_intersection(a, b)
    if both is None:
        return np.zeros((0, 3), np.int64)
    in_a, in_b = both
    la = labels_a[:, in_a[0], in_a[1]].ravel()
    lb = labels_b[:, in_b[0], in_b[1]].ravel()
    hit = (la > 0) & (lb > 0)
    if not hit.any():
        return np.zeros((0, 3), np.int64)
    pairs, counts = np.unique(np.stack([la[hit], lb[hit]]), axis=1, return_counts=True)
    return np.column_stack([pairs.T.astype(np.int64), counts.astype(np.int64)])


@dataclass
class Resolution:
    """Outcome of duplicate resolution for one site.

    Attributes
    ----------
    site_ids : dict[int, numpy.ndarray]
        Per tile index, a lookup table ``candidate id -> site id`` (index 0 -> 0;
        dropped candidates -> 0).
    score : numpy.ndarray
        Score per site id (index 0 unused).
    tile_of : numpy.ndarray
        Tile index per site id (index 0 unused).
    n_cells : int
    n_duplicates_dropped : int
    n_cut : int
        Kept cells that touch a cut window edge (larger than the overlap allows).
    """

    site_ids: dict[int, np.ndarray]
    score: np.ndarray
    tile_of: np.ndarray
    n_cells: int
    n_duplicates_dropped: int
    n_cut: int = 0
    notes: list[str] = field(default_factory=list)


def resolve_duplicates(
    candidates: Sequence[TileCandidates],
    overlaps: dict[tuple[int, int], np.ndarray],
    duplicate_overlap: float = 0.5,
) -> Resolution:
    """Rules 3 and 4: drop duplicate copies of a cell and number the kept cells 1..N.

    Parameters
    ----------
    candidates : sequence of TileCandidates
        One per tile (any order).
    overlaps : dict
        ``(tile_a, tile_b) -> pair_overlaps(...)`` rows for adjacent tiles.
    duplicate_overlap : float
        Shared voxels over the smaller object's voxels at or above which two
        candidates of different tiles are the same cell.
    """
    by_tile = {c.tile_index: c for c in candidates}
    order = sorted(by_tile)
    offset, start = {}, 0
    for t in order:
        offset[t] = start
        start += by_tile[t].count
    total = start
    parent = np.arange(total)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for (ta, tb), rows in overlaps.items():
        if rows.size == 0:
            continue
        va = by_tile[ta].voxels[rows[:, 0] - 1]
        vb = by_tile[tb].voxels[rows[:, 1] - 1]
        same = rows[:, 2] >= duplicate_overlap * np.minimum(va, vb)
        for ia, ib in rows[same, :2]:
            ra, rb = find(offset[ta] + int(ia) - 1), find(offset[tb] + int(ib) - 1)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)

    flat_tile = np.concatenate([np.full(by_tile[t].count, t) for t in order]) if total else np.zeros(0, int)
    flat_score = np.concatenate([by_tile[t].score for t in order]) if total else np.zeros(0)
    roots = np.array([find(i) for i in range(total)], dtype=np.int64)
    # winner per group: highest score, then lowest tile index, then lowest local id (= flat order)
    keep = np.zeros(total, bool)
    if total:
        ranking = np.lexsort((np.arange(total), flat_tile, -flat_score, roots))
        first = np.ones(total, bool)
        first[1:] = roots[ranking][1:] != roots[ranking][:-1]
        keep[ranking[first]] = True
    site_of_flat = np.zeros(total, np.int32)
    site_of_flat[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    site_ids = {}
    for t in order:
        lut = np.zeros(by_tile[t].count + 1, np.int32)
        lut[1:] = site_of_flat[offset[t] : offset[t] + by_tile[t].count]
        site_ids[t] = lut
    n_cells = int(keep.sum())
    score = np.zeros(n_cells + 1)
    tile_of = np.zeros(n_cells + 1, np.int64)
    score[1:] = flat_score[keep]
    tile_of[1:] = flat_tile[keep]
    return Resolution(
        site_ids=site_ids,
        score=score,
        tile_of=tile_of,
        n_cells=n_cells,
        n_duplicates_dropped=int(total - n_cells),
        n_cut=int((score[1:] == 0).sum()),
    )


def paint_core(tile: Tile, grid: TileGrid, windows: dict[int, np.ndarray], resolution: Resolution) -> np.ndarray:
    """Rule 5: the site labels of one core, from its own and its neighbours' candidate windows.

    Parameters
    ----------
    tile : Tile
        The core to paint.
    windows : dict[int, numpy.ndarray]
        Candidate labels (``TileCandidates.labels``) for at least every tile in
        ``grid.neighbours(tile)``.
    resolution : Resolution
        From :func:`resolve_duplicates`.

    Returns
    -------
    numpy.ndarray
        ``(z, core_y, core_x)`` int32 site labels.
    """
    cy0, cy1 = tile.core[0].start, tile.core[0].stop
    cx0, cx1 = tile.core[1].start, tile.core[1].stop
    n_z = windows[tile.index].shape[0]
    best_id = np.zeros((n_z, cy1 - cy0, cx1 - cx0), np.int32)
    best_score = np.full(best_id.shape, -1.0)
    for other in grid.neighbours(tile):  # tile-index order: ties go to the lower index
        y0, y1 = max(cy0, other.window[0].start), min(cy1, other.window[0].stop)
        x0, x1 = max(cx0, other.window[1].start), min(cx1, other.window[1].stop)
        if y0 >= y1 or x0 >= x1:
            continue
        piece = windows[other.index][
            :,
            y0 - other.window[0].start : y1 - other.window[0].start,
            x0 - other.window[1].start : x1 - other.window[1].start,
        ]
        ids = resolution.site_ids[other.index][piece]
        score = np.where(ids > 0, resolution.score[ids], -1.0)
        target = (slice(None), slice(y0 - cy0, y1 - cy0), slice(x0 - cx0, x1 - cx0))
        better = score > best_score[target]
        best_id[target] = np.where(better, ids, best_id[target])
        best_score[target] = np.where(better, score, best_score[target])
    return best_id


def stitch_tiles(
    segment_window: Callable[[tuple[slice, slice]], np.ndarray],
    site_shape: Sequence[int],
    tile_shape: Sequence[int],
    overlap: int,
    duplicate_overlap: float = 0.5,
) -> tuple[np.ndarray, Resolution]:
    """Segment a site tile by tile and stitch the labels, all in memory.

    Parameters
    ----------
    segment_window : callable
        ``segment_window((y_slice, x_slice)) -> (z, wy, wx)`` integer labels of
        that window of the site.
    site_shape : (int, int)
        Site size ``(y, x)`` in voxels.
    tile_shape, overlap
        See :func:`plan_tiles`.

    Returns
    -------
    labels : numpy.ndarray
        ``(z, y, x)`` int32 site labels, ids 1..N.
    resolution : Resolution
    """
    grid = plan_tiles(site_shape, tile_shape, overlap)
    candidates = {t.index: select_candidates(segment_window(t.window), t, grid) for t in grid.tiles}
    overlaps = {
        (a.index, b.index): pair_overlaps(a, candidates[a.index].labels, b, candidates[b.index].labels)
        for a, b in grid.adjacent_pairs()
    }
    resolution = resolve_duplicates(list(candidates.values()), overlaps, duplicate_overlap)
    windows = {i: c.labels for i, c in candidates.items()}
    n_z = windows[0].shape[0]
    out = np.zeros((n_z, *grid.site_shape), np.int32)
    for t in grid.tiles:
        out[:, t.core[0], t.core[1]] = paint_core(t, grid, windows, resolution)
    return out, resolution
