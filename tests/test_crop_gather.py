"""Batched crops (one gather per site, no loop over cells) equal the per-cell slicing they replaced, bit for bit."""

from __future__ import annotations

import types

import dask
import numpy as np
import pytest

from gradcamo_dask import synthetic_plate
from gradcamo_dask.cells import background_level, crop_site, site_cells
from benchmarks.bench_crops import per_cell_crops  # the per-cell slicing it replaced: the reference
from gradcamo_dask.crop_geometry import crop_shape, crop_windows, gather_windows

# Functions CuPy provides with NumPy's semantics; the gather may use nothing else from its namespace.
CUPY_HAS = {"asarray", "empty", "full", "lib", "float32", "median", "ones_like", "stack"}


@pytest.fixture(scope="module")
def site():
    plate = synthetic_plate(doses_um=(0.0,), wells_per_treatment=1, sites_per_well=1, site_shape=(9, 160, 160),
                            cell_radius=14.0, seed=3)
    image, labels = dask.compute(plate.image.data[0, 0], plate.labels.data[0, 0])
    return image, labels


@pytest.mark.parametrize("size", [(None, 48, 48), (5, 33, 40)])
def test_crop_site_equals_the_per_cell_slicing_bit_for_bit(site, size):
    image, labels = site
    cells = site_cells(labels, size=size, drop_border=False)  # border cells: windows that run past the image
    assert cells["crop_padded"].any() and (~cells["crop_padded"]).any() and len(cells) > 10
    crops, masks = crop_site(image, labels, cells, size)  # the default fills with zeros, as the reference does
    ref_crops, ref_masks = per_cell_crops(image, labels, cells, size)
    assert crops.dtype == ref_crops.dtype and masks.dtype == ref_masks.dtype
    np.testing.assert_array_equal(crops, ref_crops)
    np.testing.assert_array_equal(masks, ref_masks)
    assert masks.reshape(len(cells), -1).any(axis=1).all()
    # the background fill differs only where windows run past the image
    filled, filled_masks = crop_site(image, labels, cells, size, outside="background")
    np.testing.assert_array_equal(filled_masks, masks)
    ones = np.ones((1, *labels.shape), np.float32)
    inside = crop_site(ones, labels, cells, size, outside="zero")[0][:, 0] > 0
    np.testing.assert_array_equal(filled.transpose(1, 0, 2, 3, 4)[:, inside], ref_crops.transpose(1, 0, 2, 3, 4)[:, inside])
    level = background_level(image, labels)
    assert (~inside).any()
    np.testing.assert_array_equal(filled.transpose(1, 0, 2, 3, 4)[:, ~inside],
                                  np.broadcast_to(level[:, None], (len(level), int((~inside).sum()))))


def test_gather_windows_pads_with_fill_and_handles_windows_outside():
    volume = np.arange(2 * 4 * 5 * 6, dtype=np.int32).reshape(2, 4, 5, 6)
    start = np.array([[0, 0, 0], [-1, 3, 4], [2, -1, -2], [10, 10, 10]])
    out = gather_windows(volume, start, (3, 3, 3), fill=-7)
    assert out.shape == (4, 2, 3, 3, 3)
    np.testing.assert_array_equal(out[0], volume[:, 0:3, 0:3, 0:3])
    assert (out[1][:, 0] == -7).all() and (out[1][:, 1:, :2, :2] == volume[:, 0:2, 3:5, 4:6]).all()
    assert (out[1][:, 1:, 2:] == -7).all() and (out[1][:, 1:, :, 2:] == -7).all()
    np.testing.assert_array_equal(out[2][:, :2, 1:, 2], volume[:, 2:4, 0:2, 0])
    assert (out[2][:, 2] == -7).all() and (out[2][:, :, 0] == -7).all() and (out[2][..., :2] == -7).all()
    assert (out[3] == -7).all()  # entirely outside
    assert gather_windows(volume[0], np.zeros((0, 3), int), (1, 2, 3)).shape == (0, 1, 2, 3)


def test_gather_uses_only_what_cupy_has(site, monkeypatch):
    """The CuPy path is this same code in CuPy's namespace: record every namespace call on the CPU."""
    import gradcamo_dask.arrays as arrays

    used: set = set()

    class Recording(types.SimpleNamespace):
        def __getattr__(self, name):
            used.add(name)
            return getattr(np, name)

    monkeypatch.setattr(arrays, "array_module", lambda x: Recording())
    image, labels = site
    size = (None, 48, 48)
    cells = site_cells(labels, size=size, drop_border=False)
    start, _ = crop_windows(cells[["center_z", "center_y", "center_x"]].to_numpy(), size, labels.shape)
    got = gather_windows(image, start, crop_shape(size, labels.shape), dtype=np.float32)
    np.testing.assert_array_equal(got, per_cell_crops(image, labels, cells, size)[0])
    pass  # background_level imports array_module at call time, from the patched module
    level = background_level(image, labels)  # the background fill, computed in the same namespace
    filled = gather_windows(image, start, crop_shape(size, labels.shape), fill=level, dtype=np.float32)
    assert (filled != got).any()
    assert used and used <= CUPY_HAS, used - CUPY_HAS
