"""Overlap tiling and label stitching (gradcamo_dask.segment.tiling): cells cut by tile borders stay whole."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from gradcamo_dask.segment import tiling
from gradcamo_dask.errors import InputError
from tests.helpers.segment_blobs import as_voxel_sets, blob_site, matched_iou


def test_plan_tiles_partitions_the_site_and_clips_windows():
    grid = tiling.plan_tiles((150, 101), (64, 64), 20)
    assert (grid.rows, grid.cols) == (3, 2)
    cover = np.zeros((150, 101), int)
    for t in grid.tiles:
        cover[t.core] += 1
        assert t.window[0].start == max(0, t.core[0].start - 20)
        assert t.window[1].stop == min(101, t.core[1].stop + 20)
    assert (cover == 1).all()  # cores partition the site
    sizes = {t.core[0].stop - t.core[0].start for t in grid.tiles}
    assert max(sizes) - min(sizes) <= 1  # even split, no thin last tile
    assert grid.core_chunks[0] == (50, 50, 50) and sorted(grid.core_chunks[1]) == [50, 51]
    assert len(grid.neighbours(grid.tile(1, 0))) == 6
    assert len(grid.adjacent_pairs()) == 3 + 4 + 4  # vertical + horizontal + diagonal (2 per 2x2 block)


def test_overlap_larger_than_a_core_is_refused():
    with pytest.raises(InputError, match="larger than the smallest tile core"):
        tiling.plan_tiles((100, 100), (40, 40), 50)


def _truth_segmenter(truth: np.ndarray, seed: int = 0):
    """A perfect but window-bound segmenter: the ground truth inside the window, ids shuffled.

    Cells cut by the window edge come out cut, exactly like a real segmenter
    sees them; ids are permuted per window so that nothing relies on them.
    """

    def run(window: tuple[slice, slice]) -> np.ndarray:
        part = truth[:, window[0], window[1]]
        rng = np.random.default_rng(seed + window[0].start * 1000 + window[1].start)
        lut = np.zeros(truth.max() + 1, np.int32)
        lut[1:] = rng.permutation(truth.max()) + 1
        return lut[part]

    return run


def _straddling(truth: np.ndarray, grid: tiling.TileGrid) -> int:
    """Number of cells whose voxels lie in more than one tile core."""
    core_of = np.zeros(truth.shape[1:], int)
    for t in grid.tiles:
        core_of[t.core] = t.index
    n = 0
    for i in range(1, truth.max() + 1):
        if len(np.unique(core_of[(truth == i).any(0)])) > 1:
            n += 1
    return n


def test_four_tiles_give_the_truth_back_exactly():
    _, truth = blob_site((5, 120, 120), n_cells=28, radius=9, seed=7, margin=2)
    grid = tiling.plan_tiles((120, 120), (60, 60), 20)
    assert grid.rows * grid.cols == 4
    assert _straddling(truth, grid) >= 4  # the test would catch cells cut at borders
    stitched, resolution = tiling.stitch_tiles(_truth_segmenter(truth), (120, 120), (60, 60), 20)
    assert stitched.dtype == np.int32
    assert as_voxel_sets(stitched) == as_voxel_sets(truth)
    assert sorted(np.unique(stitched))[1:] == list(range(1, truth.max() + 1))
    assert resolution.n_cut == 0


def test_window_dependent_segmentations_are_deduplicated():
    """Copies of a cell that differ between windows still give one label per cell."""
    _, truth = blob_site((5, 120, 120), n_cells=28, radius=9, seed=11, margin=2)
    perfect = _truth_segmenter(truth)

    def noisy(window):
        labels = perfect(window)
        rng = np.random.default_rng(window[0].start * 7 + window[1].start)
        eroded = ndi.grey_erosion(labels, size=(1, 3, 3))
        return np.where(rng.random(labels.shape) < 0.3, eroded, labels)  # ragged, window-dependent edges

    stitched, resolution = tiling.stitch_tiles(noisy, (120, 120), (60, 60), 20)
    matches, n_truth, n_found = matched_iou(truth, stitched)
    assert matches == n_truth == n_found
    assert resolution.n_duplicates_dropped > 0  # copies from neighbouring windows existed and were dropped


def test_too_small_an_overlap_is_reported_as_cut_cells():
    _, truth = blob_site((5, 120, 120), n_cells=28, radius=9, seed=7, margin=2)
    _, resolution = tiling.stitch_tiles(_truth_segmenter(truth), (120, 120), (60, 60), 4)
    assert resolution.n_cut > 0


def test_pair_overlaps_counts_shared_voxels():
    grid = tiling.plan_tiles((20, 40), (20, 20), 4)
    a, b = grid.tiles
    la = np.zeros((1, 20, 24), np.int32)
    lb = np.zeros((1, 20, 24), np.int32)
    la[0, 5:10, 18:24] = 1  # site x 18..24
    lb[0, 5:10, 0:8] = 2  # site x 16..24
    rows = tiling.pair_overlaps(a, la, b, lb)
    assert rows.tolist() == [[1, 2, 5 * 6]]


def test_tile_shape_may_be_an_int_and_must_be_positive():
    from gradcamo_dask.segment.plate import segment_site

    image, _ = blob_site((3, 70, 70), n_cells=6, radius=8, seed=2)
    one = segment_site(image[0], image[1], "watershed", tile_shape=40, tile_overlap=20)
    two = segment_site(image[0], image[1], "watershed", tile_shape=(40, 40), tile_overlap=20)
    np.testing.assert_array_equal(one, two)
    with pytest.raises(InputError, match="tile_shape"):
        segment_site(image[0], image[1], "watershed", tile_shape=(0, 40))
