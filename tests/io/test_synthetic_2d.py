"""Synthetic 2D plates: the focal plane of the same 3D sites, ground truth and knobs included."""

from __future__ import annotations

import numpy as np
import pytest

from gradcamo_dask import InputError, synthetic_plate
from gradcamo_dask.io.synthetic import RENDER_Z_2D, cell_truth, focal_plane
from gradcamo_dask.profiles.classic import site_classic_features
from gradcamo_dask.cells import crop_site, site_cells

KNOBS = dict(doses_um=(0, 10), wells_per_treatment=1, sites_per_well=1, cell_radius=12.0, mosaic=True, granules=1.0,
             seed=3)


def test_2d_plate_is_the_focal_plane_of_the_3d_render():
    flat = synthetic_plate(site_shape=(96, 96), spatial_dims=2, **KNOBS)
    deep = synthetic_plate(site_shape=(RENDER_Z_2D, 96, 96), **KNOBS)
    assert flat.image.sizes == {"well": 2, "site": 1, "c": 6, "z": 1, "y": 96, "x": 96}
    assert flat.labels.sizes["z"] == 1
    image3, labels3 = deep.image.values, deep.labels.values
    for w in range(2):
        k = focal_plane(labels3[w, 0])
        np.testing.assert_array_equal(flat.labels.values[w, 0, 0], labels3[w, 0, k])
        np.testing.assert_array_equal(flat.image.values[w, 0, :, 0], image3[w, 0, :, k])
        # every cell of the 3D ground truth has its whole footprint in the plane
        np.testing.assert_array_equal(flat.labels.values[w, 0, 0], labels3[w, 0].max(axis=0))
    truth = cell_truth(flat)
    assert truth.equals(cell_truth(deep)) and truth["responder"].any() and not truth["responder"].all()


def test_confounder_stays_outside_the_cells_in_2d():
    base = dict(KNOBS, granules=0.0)
    plain = synthetic_plate(site_shape=(96, 96), spatial_dims=2, **base)
    confounded = synthetic_plate(site_shape=(96, 96), spatial_dims=2, confounder=1.0, **base)
    labels = plain.labels.values[0, 0, 0]
    diff = np.abs(confounded.image.values[0, 0, :, 0].astype(float) - plain.image.values[0, 0, :, 0])
    assert diff[:, labels == 0].mean() > 20 * max(diff[:, labels > 0].mean(), 1e-3)  # grating off-cell only


def test_bad_2d_settings_are_named():
    with pytest.raises(InputError, match=r"\(y, x\)"):
        synthetic_plate(site_shape=(8, 96, 96), spatial_dims=2)
    with pytest.raises(InputError, match="spatial_dims"):
        synthetic_plate(spatial_dims=4)


def test_classic_2d_measurements_on_2d_crops():
    plate = synthetic_plate(site_shape=(96, 96), spatial_dims=2, **KNOBS)
    image, labels = plate.image.values[0, 0], plate.labels.values[0, 0]
    cells = site_cells(labels, size=(40, 40)).iloc[:3]
    crops, masks = crop_site(image, labels, cells, (40, 40))
    assert crops.shape == (3, 6, 40, 40) and masks.shape == (3, 40, 40)
    names, values = site_classic_features(crops, masks, [str(c) for c in plate.image["c"].values],
                                          (1.0, 0.65, 0.65))
    col = {n: j for j, n in enumerate(names)}
    assert "AreaShape_Area" in col and "AreaShape_Perimeter" in col and "AreaShape_Volume" not in col
    np.testing.assert_array_equal(values[:, col["AreaShape_Area"]], masks.sum(axis=(1, 2)))
    assert len([n for n in names if n.startswith("Texture_Contrast_DNA_3_")]) == 4  # CellProfiler's 2D directions
    assert np.isfinite(values[:, col["Intensity_MeanIntensity_DNA"]]).all()
