"""Classic CellProfiler features of single cells (cp_measure) on crops and central masks."""

from __future__ import annotations

import csv

import dask
import numpy as np
import pytest

from gradcamo_dask import InputError, cell_table, synthetic_plate
from gradcamo_dask.cells import crop_site
from gradcamo_dask.profiles.classic import classic_feature_names, classic_features, site_classic_features
from gradcamo_dask.profiles.export import cellprofiler_table
from tests.helpers.feature_profiles import make_profiles

SPACING = (1.1115, 0.65, 0.65)
SIZE = (None, 48, 48)


@pytest.fixture(scope="module")
def small_plate():
    """Two wells x 2 sites of 12 x 96 x 96 voxels, small cells (radius 14 px)."""
    plate = synthetic_plate(doses_um=(0, 1), wells_per_treatment=1, sites_per_well=2, site_shape=(12, 96, 96),
                            cell_radius=14)
    cells = cell_table(plate.labels, size=SIZE)
    return plate, cells


@pytest.fixture(scope="module")
def site_crops(small_plate):
    plate, cells = small_plate
    image = plate.image.isel(well=0, site=0).values
    labels = plate.labels.isel(well=0, site=0).values
    rows = cells[(cells.well == "B02") & (cells.site == 0)]
    crops, masks = crop_site(image, labels, rows, SIZE)
    return crops, masks, list(plate.image["c"].values), labels, rows


def test_names_are_cellprofiler_style_and_sizeshape_is_measured_once():
    names = classic_feature_names(["DNA", "Mito"])
    assert len(names) == len(set(names))
    shape = [n for n in names if n.startswith("AreaShape_")]
    assert "AreaShape_Volume" in shape and "AreaShape_SurfaceArea" in shape
    assert not any(n.endswith(("_DNA", "_Mito")) for n in shape)  # once per cell, not per channel
    for channel in ("DNA", "Mito"):
        assert f"Intensity_MeanIntensity_{channel}" in names
        assert f"Texture_Contrast_{channel}_3_00_256" in names
        assert f"Texture_Contrast_{channel}_3_12_256" in names  # 13 directions in 3D
    assert not any(n.startswith("Granularity_") for n in names)  # not in the default set
    # crop-relative positions are left out; the export takes positions from the cell table
    assert not any("Center_" in n or "BoundingBoxMinimum" in n or "SpatialMoment" in n for n in names)
    assert not any(n.startswith("Location_") for n in names)
    full = classic_feature_names(["DNA"], "full")
    assert "Granularity_1_DNA" in full and "Granularity_16_DNA" in full
    assert {"Texture_Contrast_DNA_3_00_256", "Texture_Contrast_DNA_5_00_256", "Texture_Contrast_DNA_10_00_256"} <= set(full)


def test_names_exist_in_a_real_cellprofiler_table(real_data):
    with open(real_data / "cellprofiler_jump_BR00116991_A01_1" / "Cells.csv", newline="") as f:
        real = set(next(csv.reader(f)))
    names = classic_feature_names(["DNA", "ER", "RNA", "AGP", "Mito"], "full")
    per_channel = [n for n in names if not n.startswith("AreaShape_")]
    # 2D CellProfiler measures 4 texture directions (00-03); 3D adds 04-12
    comparable = [n for n in per_channel if not (n.startswith("Texture_") and int(n.split("_")[-2]) > 3)]
    missing = [n for n in comparable if n not in real]
    assert comparable and not missing, missing[:10]
    shape_2d_names = {"Extent", "EulerNumber", "EquivalentDiameter", "Solidity", "MajorAxisLength",
                      "MinorAxisLength"}
    assert {f"AreaShape_{n}" for n in shape_2d_names} <= set(names) & real


def test_values_match_direct_measurements(site_crops):
    crops, masks, channels, _labels, rows = site_crops
    names, values = site_classic_features(crops, masks, channels, SPACING)
    assert values.dtype == np.float32 and values.shape == (len(rows), len(names))
    col = {n: j for j, n in enumerate(names)}
    dna = channels.index("DNA")
    for i in range(len(rows)):
        inside = crops[i, dna][masks[i]].astype(np.float64) / 65535
        assert values[i, col["AreaShape_Volume"]] == masks[i].sum() == rows.iloc[i].volume_voxels
        assert values[i, col["Intensity_MeanIntensity_DNA"]] == pytest.approx(inside.mean(), rel=1e-5)
        assert values[i, col["Intensity_IntegratedIntensity_DNA"]] == pytest.approx(inside.sum(), rel=1e-5)
        assert values[i, col["Intensity_MaxIntensity_DNA"]] == pytest.approx(inside.max(), rel=1e-5)
    texture = [j for n, j in col.items() if n.startswith("Texture_")]
    assert np.isfinite(values[:, texture]).all()
    # different cells differ (the features are measured, not constant)
    assert np.ptp(values[:, col["AreaShape_SurfaceArea"]]) > 0


def test_trimming_does_not_change_mask_bound_features(site_crops):
    crops, masks, channels, _, _ = site_crops
    names, trimmed = site_classic_features(crops[:2], masks[:2], channels, SPACING, margin=2)
    _, whole = site_classic_features(crops[:2], masks[:2], channels, SPACING, margin=1000)
    np.testing.assert_allclose(trimmed, whole, rtol=1e-5, equal_nan=True)


def test_neighbours_do_not_count(site_crops):
    crops, masks, channels, labels, _ = site_crops
    names, values = site_classic_features(crops[:1], masks[:1], channels, SPACING, measurements=["intensity"])
    # brighten everything outside the central mask: the cell's intensity features must not move
    brighter = crops[:1].copy()
    brighter[:, :, ~masks[0]] += 5000
    _, again = site_classic_features(brighter, masks[:1], channels, SPACING, measurements=["intensity"])
    keep = [j for j, n in enumerate(names) if "Edge" not in n]
    np.testing.assert_allclose(values[:, keep], again[:, keep], rtol=1e-6)


def test_spacing_scales_surface_area_only(site_crops):
    crops, masks, channels, _, _ = site_crops
    names, a = site_classic_features(crops[:1], masks[:1], channels, SPACING, measurements=["sizeshape"])
    _, b = site_classic_features(crops[:1], masks[:1], channels, tuple(2 * s for s in SPACING),
                                 measurements=["sizeshape"])
    col = {n: j for j, n in enumerate(names)}
    assert b[0, col["AreaShape_SurfaceArea"]] == pytest.approx(4 * a[0, col["AreaShape_SurfaceArea"]], rel=1e-4)
    assert b[0, col["AreaShape_Volume"]] == a[0, col["AreaShape_Volume"]]  # voxels


def test_granularity_and_options(site_crops):
    crops, masks, channels, _, _ = site_crops
    names, values = site_classic_features(crops[:1, :1], masks[:1], channels[:1], SPACING,
                                          measurements=["granularity"], granularity_length=4)
    assert names == [f"Granularity_{k}_{channels[0]}" for k in range(1, 5)]
    assert np.isfinite(values).all()
    names, _ = site_classic_features(crops[:1, :1], masks[:1], channels[:1], SPACING, measurements=["texture"],
                                     texture_scales=(2,))
    assert all(n.split("_")[-3] == "2" for n in names) and len(names) == 13 * 13


def test_empty_site_empty_mask_and_bad_input(site_crops):
    crops, masks, channels, _, _ = site_crops
    names, values = site_classic_features(crops[:0], masks[:0], channels, SPACING)
    assert values.shape == (0, len(names)) and names == classic_feature_names(channels)
    empty = masks[:1].copy()
    empty[:] = False
    _, values = site_classic_features(crops[:1], empty, channels, SPACING)
    assert np.isnan(values).all()
    with pytest.raises(InputError, match="channel names"):
        site_classic_features(crops[:1], masks[:1], channels[:3], SPACING)
    with pytest.raises(InputError, match="do not match"):
        site_classic_features(crops[:1], masks[:2], channels, SPACING)
    with pytest.raises(InputError, match="measurements"):
        site_classic_features(crops[:1], masks[:1], channels, SPACING, measurements=["zernike"])
    with pytest.raises(InputError, match="spacing"):
        site_classic_features(crops[:1], masks[:1], channels, (1.0, 0.0, 1.0))


def test_lazy_per_site_matches_the_site_function(small_plate, site_crops):
    plate, cells = small_plate
    arr = classic_features(plate.image, plate.labels, cells, SIZE, measurements=["sizeshape", "intensity"])
    assert arr.dims == ("cell", "classic_feature") and arr.sizes["cell"] == len(cells)
    assert arr.chunks[0] == tuple(cells.groupby(["well", "site"], sort=False).size())  # one chunk per site
    assert list(arr["well"].values) == list(cells["well"])
    with dask.config.set(scheduler="sync"):
        values = arr.values
    crops, masks, channels, _, rows = site_crops
    _, direct = site_classic_features(crops, masks, channels, SPACING, measurements=["sizeshape", "intensity"])
    np.testing.assert_array_equal(values[: len(rows)], direct)
    assert np.isfinite(values).all()
    # the 'classic' variable beside 'deep' in a profiles dataset of the same cells, exported as Cells_*
    profiles = make_profiles(cells)
    profiles["classic"] = arr
    assert profiles["classic"].dims == ("cell", "classic_feature") and "deep" in profiles
    table = cellprofiler_table(profiles)
    column = list(arr["classic_feature"].values)
    for name in ("AreaShape_Volume", "AreaShape_SurfaceArea", "Intensity_MeanIntensity_DNA", f"Intensity_MaxIntensity_{channels[-1]}"):
        np.testing.assert_array_equal(table[f"Cells_{name}"], values[:, column.index(name)])
    # measured on the crop the model sees: a cell wider than the crop keeps only its part inside it
    volume = table["Cells_AreaShape_Volume"].to_numpy()
    assert (volume <= cells["volume_voxels"].to_numpy()).all() and (volume == cells["volume_voxels"]).mean() > 0.5


# ------------------------------------------------------------------ thin, small and real cells

IN_PLANE = ("02", "04", "06", "10")  # mahotas' 3D directions without a z step


def _pairs_exist(mask, pixels, direction, scale):
    """Whether the cell has two voxels ``scale`` apart along mahotas' 3D ``direction``, both quantised above 0."""
    import mahotas.features.texture as texture
    from skimage.util import img_as_ubyte

    levels = img_as_ubyte(np.clip(pixels, 0, 1))
    levels[~mask] = 0
    cmat = np.zeros((int(levels.max()) + 1,) * 2, np.int32)
    texture.cooccurence(levels, direction, output=cmat, distance=scale)
    return cmat[1:, 1:].sum() > 0


def _check_defined(names, values, masks, pixels, scales):
    """No inf anywhere; NaN only in texture directions without voxel pairs (checked here, voxel by voxel)."""
    assert not np.isinf(values).any(), [names[j] for j in np.nonzero(np.isinf(values))[1]]
    col = {n: j for j, n in enumerate(names)}
    for i in range(len(values)):
        nan = {names[j] for j in np.nonzero(np.isnan(values[i]))[0]}
        assert not [n for n in nan if not n.startswith("Texture_")], sorted(nan)[:5]
        for channel, image in pixels[i].items():
            for scale in scales:
                for d in range(13):
                    name = f"Texture_Contrast_{channel}_{scale}_{d:02d}_256"
                    has_pairs = _pairs_exist(masks[i], image, d, scale)
                    assert (name in nan) == (not has_pairs), (i, name, has_pairs)
                    assert np.isnan(values[i, col[name.replace("Contrast", "Entropy")]]) == (not has_pairs)


def test_thin_and_small_cells_are_defined(site_crops):
    """Synthetic discs 1-4 z-slices thick and tiny cells: no inf, NaN only where no voxel pairs exist."""
    rng = np.random.default_rng(5)
    z, y, x = np.mgrid[:12, :32, :32]
    masks = [((y - 15.5) ** 2 + (x - 15.5) ** 2 <= r * r) & (z >= 4) & (z < 4 + t)
             for t, r in ((1, 8), (2, 8), (3, 8), (4, 8), (4, 2), (1, 1))]
    masks = np.stack(masks)
    crops = (1000 + 30000 * rng.random((len(masks), 2, *masks.shape[1:]))).astype(np.uint16)
    names, values = site_classic_features(crops, masks, ["DNA", "Mito"], SPACING, texture_scales=(1, 3, 5),
                                          measurements=["sizeshape", "intensity", "texture", "granularity"],
                                          granularity_length=4)
    col = {n: j for j, n in enumerate(names)}
    pixels = [{c: crops[i, k] / 65535 for k, c in enumerate(["DNA", "Mito"])} for i in range(len(masks))]
    _check_defined(names, values, masks, pixels, (1, 3, 5))
    # thinner than the scale: the z directions have no pairs, the in-plane ones do and are measured
    one_slice = values[0]
    assert np.isnan(one_slice[col["Texture_Contrast_DNA_3_00_256"]])
    assert all(np.isfinite(one_slice[col[f"Texture_Contrast_DNA_3_{d}_256"]]) for d in IN_PLANE)
    assert np.isfinite(values[3, col["Texture_Contrast_DNA_3_00_256"]])  # 4 slices reach 3 apart in z
    # the in-plane directions are mahotas' own 2D values on the cell's one slice (CellProfiler's 2D texture)
    import mahotas.features
    from skimage.util import img_as_ubyte

    plane = img_as_ubyte(pixels[0]["DNA"][4])
    plane[~masks[0, 4]] = 0
    expected = mahotas.features.haralick(plane, distance=3, ignore_zeros=True)  # 2D directions 0..3
    for d3, d2 in zip(IN_PLANE, (2, 0, 1, 3)):
        assert values[0, col[f"Texture_Contrast_DNA_3_{d3}_256"]] == pytest.approx(expected[d2, 1], rel=1e-5)
        assert values[0, col[f"Texture_Entropy_DNA_3_{d3}_256"]] == pytest.approx(expected[d2, 8], rel=1e-5)
    # flat cells: solidity from the 2D hull of the slice, never inf; the disc is nearly convex
    assert 0.85 < values[0, col["AreaShape_Solidity"]] <= 1.0
    assert values[0, col["AreaShape_ConvexArea"]] >= values[0, col["AreaShape_Volume"]] == masks[0].sum()
    assert values[5, col["AreaShape_Solidity"]] == pytest.approx(masks[5].sum() / values[5, col["AreaShape_ConvexArea"]])
    # granularity is defined for every cell of a 12-slice crop, whatever the cell's thickness
    granularity = [j for n, j in col.items() if n.startswith("Granularity_")]
    assert np.isfinite(values[:, granularity]).all()


def test_granularity_is_nan_only_when_the_crop_itself_is_too_small():
    z, y, x = np.mgrid[:6, :32, :32]
    mask = (((y - 15.5) ** 2 + (x - 15.5) ** 2 <= 64) & (z >= 2) & (z < 4))[None]
    crops = np.full((1, 1, *mask.shape[1:]), 20000, np.uint16)
    crops[0, 0, 2:4, 12:20, 12:20] = 40000
    names, values = site_classic_features(crops, mask, ["DNA"], SPACING, measurements=["granularity"],
                                          granularity_length=2)
    assert np.isnan(values).all()  # 6 slices shrink to 1 in z: CellProfiler has no value for this image either
    names, values = site_classic_features(np.concatenate([crops, crops], axis=2), np.concatenate([mask, mask * 0], 1),
                                          ["DNA"], SPACING, measurements=["granularity"], granularity_length=2)
    assert np.isfinite(values).all()  # 12 slices: defined


def test_real_volume_cells_and_their_thin_slabs_are_defined(real_data):
    """Cells of the real confocal volume, whole and cut to slabs of 1-4 slices: no inf, NaN only without pairs."""
    import tifffile

    from gradcamo_dask import WatershedSegmenter, segment_site
    from gradcamo_dask.io.plate import plate_dataarray

    stack = tifffile.imread(real_data / "rgb_3D.tif")  # (z, c, y, x), no voxel size: isotropic (its README)
    labels = segment_site(stack[:, 0], stack[:, 1], WatershedSegmenter(anisotropy=1.0))
    table = cell_table(plate_dataarray(labels[None, None].astype(np.int32), wells=["A01"], plate="rgb_3D"),
                       size=(None, 48, 48), drop_border=False)
    crops, masks = crop_site(stack.transpose(1, 0, 2, 3), labels, table, (None, 48, 48))
    slabs = []
    for i in range(len(table)):  # the middle 1, 2, 3 or 4 slices of each cell, as a thin segmentation gives
        zs = np.nonzero(masks[i].any(axis=(1, 2)))[0]
        thick = 1 + i % 4
        start = zs[len(zs) // 2] - thick // 2
        slab = np.zeros_like(masks[i])
        slab[start:start + thick] = masks[i][start:start + thick]
        slabs.append(slab)
    slabs = np.stack(slabs)
    assert sorted({int(s.any(axis=(1, 2)).sum()) for s in slabs}) == [1, 2, 3, 4]
    all_masks = np.concatenate([masks, slabs])
    all_crops = np.concatenate([crops, crops])
    assert all_crops.max() == 65535  # real saturated voxels are part of it
    names, values = site_classic_features(all_crops, all_masks, ["nucleus", "cytoplasm"], (1.0, 1.0, 1.0),
                                          texture_scales=(3, 5))
    pixels = [{c: all_crops[i, k] / 65535 for k, c in enumerate(["nucleus", "cytoplasm"])}
              for i in range(len(all_masks))]
    _check_defined(names, values, all_masks, pixels, (3, 5))
    col = {n: j for j, n in enumerate(names)}
    thin = values[len(table):]
    assert np.isfinite(thin[:, col["AreaShape_Solidity"]]).all() and (thin[:, col["AreaShape_Solidity"]] <= 1).all()
    for d in IN_PLANE:  # every slab, even one slice thick, has its in-plane texture
        assert np.isfinite(thin[:, col[f"Texture_Contrast_nucleus_3_{d}_256"]]).all()
