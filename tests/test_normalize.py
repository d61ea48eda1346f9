"""The micro-batch normalisation: equal to the expression it replaced, vectorised, in place when asked."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest

from benchmarks.bench_crops import normalize_crops_before  # the one-temporary-per-step version: the reference
from gradcamo_dask.errors import InputError
from gradcamo_dask.normalize import fit_intensity_range, fit_normalization, normalize_crops, rescale_crops

NORM = {"mean": [0.11, 0.23, 0.05, 0.4, 0.31, 0.2], "std": [0.07, 0.19, 0.03, 0.25, 0.11, 0.5]}


def _batch(n: int = 12, seed: int = 0) -> np.ndarray:
    """Crops as the feeder cuts them: float32 of uint16 intensities, a padded corner, a constant channel."""
    rng = np.random.default_rng(seed)
    crops = rng.integers(90, 4000, (n, 6, 5, 16, 16)).astype(np.float32)
    crops[1, :, :, :4, :] = 0.0  # window past the image: zero-filled
    crops[2, 3] = 700.0  # a constant channel
    crops[3, 0] += 60000.0  # bright, narrow range: (x - lo) must stay exact
    return crops


def test_equals_the_old_expression_to_1e6():
    crops = _batch()
    want = normalize_crops_before(crops, NORM)
    got = normalize_crops(crops, NORM)
    assert got.dtype == np.float32 and got.shape == crops.shape
    assert float(np.abs(got - want).max()) <= 1e-6
    np.testing.assert_array_equal(got, want)  # same float32 operations in the same order: bit-equal
    assert (got[2, 3] == np.float32(-NORM["mean"][3]) / np.float32(NORM["std"][3])).all()
    raw = crops.astype(np.uint16)  # integer crops are cast once, same numbers
    np.testing.assert_array_equal(normalize_crops(raw, NORM, overwrite=True), want)


def test_overwrite_reuses_the_batch_and_default_leaves_it():
    crops = _batch()
    kept = crops.copy()
    normalize_crops(crops, NORM)
    np.testing.assert_array_equal(crops, kept)  # inputs are read-only by default
    out = normalize_crops(crops, NORM, overwrite=True)
    assert np.shares_memory(out, crops)  # no second float32 copy of the micro-batch
    np.testing.assert_array_equal(out, normalize_crops_before(kept, NORM))
    scaled = rescale_crops(kept)
    np.testing.assert_array_equal(normalize_crops(scaled, NORM, rescaled=True), out)


@pytest.mark.parametrize("chunks", [(4, 6, 5, 16, 16), (5, 2, 5, 16, 16), (4, 6, 2, 8, 16)])
def test_dask_stays_lazy_and_equal(chunks):
    crops = _batch()
    lazy = da.from_array(crops, chunks=chunks)
    out = normalize_crops(lazy, NORM)
    assert isinstance(out, da.Array) and out.dtype == np.float32 and out.chunks == lazy.chunks
    np.testing.assert_array_equal(out.compute(), normalize_crops_before(crops, NORM))
    np.testing.assert_array_equal(rescale_crops(lazy).compute(), rescale_crops(crops))
    np.testing.assert_array_equal(crops, _batch())  # blocks were never written to


class _CountingArray(np.ndarray):
    """A stand-in array type: counts every ufunc call made on it (elementwise passes and reductions)."""

    calls = 0

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        type(self).calls += 1
        inputs = tuple(np.asarray(i) if isinstance(i, _CountingArray) else i for i in inputs)
        if "out" in kwargs:
            kwargs["out"] = tuple(np.asarray(o) if isinstance(o, _CountingArray) else o for o in kwargs["out"])
        result = getattr(ufunc, method)(*inputs, **kwargs)
        return result.view(_CountingArray) if isinstance(result, np.ndarray) else result


def _calls(n: int) -> int:
    crops = _batch(n).view(_CountingArray)
    _CountingArray.calls = 0
    normalize_crops(crops, NORM, overwrite=True)
    return _CountingArray.calls


def test_no_loop_over_cells():
    one, many = _calls(4), _calls(40)
    assert one == many  # array calls per micro-batch do not grow with its cells
    assert many <= 10  # two reductions and a handful of in-place passes, not per-crop work


def test_fit_then_normalise_is_standardised():
    crops = _batch(30, seed=3)
    x = normalize_crops(crops, fit_normalization(crops))
    np.testing.assert_allclose(x.mean(axis=(0, 2, 3, 4)), 0.0, atol=1e-5)
    np.testing.assert_allclose(x.std(axis=(0, 2, 3, 4)), 1.0, atol=1e-4)


def _two_cells(bright_neighbour: bool) -> np.ndarray:
    """One crop (1, 1, 4, 16, 16): the cell of interest in x < 8, a neighbour in x >= 8, whose granules
    (one voxel 10x the stain) are switched on or off."""
    rng = np.random.default_rng(5)
    crop = rng.uniform(100, 200, (1, 1, 4, 16, 16)).astype(np.float32)
    if bright_neighbour:
        crop[0, 0, 2, 8, 12] = 2000.0
    return crop


def test_per_crop_minmax_lets_a_neighbours_granule_change_the_cell_and_plate_scaling_does_not():
    dim, bright = _two_cells(False), _two_cells(True)
    own = (slice(None), slice(None), slice(None), slice(None), slice(0, 8))
    per_crop = [rescale_crops(c)[own] for c in (dim, bright)]
    assert np.abs(per_crop[0] - per_crop[1]).max() > 0.5  # the neighbour's granule rescaled the own cell
    fixed = {"low": [100.0], "high": [200.0]}
    plate = [rescale_crops(c, intensity_range=fixed)[own] for c in (dim, bright)]
    np.testing.assert_array_equal(plate[0], plate[1])  # each voxel depends on itself only
    np.testing.assert_allclose(plate[0], (dim[own] - 100) / 100, rtol=1e-6)
    norm = {"mean": [0.5], "std": [0.25]} | fixed
    want = ((bright - 100) / 100 - 0.5) / 0.25
    np.testing.assert_allclose(normalize_crops(bright, norm), want, rtol=1e-5, atol=1e-5)
    lazy = da.from_array(bright, chunks=(1, 1, 4, 16, 16))
    np.testing.assert_allclose(normalize_crops(lazy, norm).compute(), want, rtol=1e-5, atol=1e-5)
    odd = da.from_array(bright, chunks=(1, 1, 2, 8, 16))  # crops split over blocks: the plain lazy expression
    np.testing.assert_allclose(normalize_crops(odd, norm).compute(), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rescale_crops(odd, intensity_range=fixed).compute(), (bright - 100) / 100, rtol=1e-5)


def test_fit_intensity_range_is_a_median_over_sites_so_one_bright_site_does_not_set_it():
    rng = np.random.default_rng(0)
    sites = [rng.uniform(10, 20, (2, 3, 32, 32)).astype(np.float32) for _ in range(5)]
    sites[0][1] *= 100  # one site 100x brighter in channel 1
    got = fit_intensity_range(iter(sites))
    assert set(got) == {"low", "high"} and len(got["low"]) == 2
    assert all(9.9 < lo < 10.2 for lo in got["low"]) and all(19.5 < hi < 20.01 for hi in got["high"])
    const = fit_intensity_range([np.full((1, 2, 4, 4), 7.0)])
    assert const == {"low": [7.0], "high": [8.0]}  # a constant channel gets a range of 1, not 0
    with pytest.raises(InputError, match="at least one site"):
        fit_intensity_range([])


def test_a_bad_intensity_range_is_refused_by_name():
    crops = _two_cells(False)
    for bad in ({"low": [1.0, 2.0], "high": [3.0, 4.0]}, {"low": [5.0], "high": [5.0]}):
        with pytest.raises(InputError, match="intensity range"):
            rescale_crops(crops, intensity_range=bad)
