"""Cell tables, crops with central masks, normalisation; NumPy here, CuPy on a GPU machine."""

from __future__ import annotations

import json

import dask
import dask.array as da
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage as ndi

from gradcamo_dask import InputError, LabelsError, PlateLayoutError, cell_table, extract_crops, open_plate, synthetic_plate
from gradcamo_dask.cells import background_level, crop_site, fit_normalization, normalize_crops, rescale_crops, site_cells
from gradcamo_dask.cells import GEOMETRY_COLUMNS, _boxes_scatter, crop_windows
from gradcamo_dask.io.layout import plate_dataarray


def _two_cells():
    """A 6 x 20 x 30 site: cell 3 in the middle, cell 5 touching it, cell 9 on the x border."""
    labels = np.zeros((6, 20, 30), np.int32)
    labels[1:4, 5:10, 8:15] = 3  # z 1..3, y 5..9, x 8..14
    labels[2:5, 5:10, 15:20] = 5  # the touching neighbour
    labels[0:2, 12:16, 26:30] = 9  # touches x = 29 (and z = 0)
    return labels


def test_site_cells_boxes_centres_volumes_and_flags():
    labels = _two_cells()
    table = site_cells(labels, size=(None, 8, 8), drop_border=False, plate="P", well="B02", site=1)
    assert list(table.columns) == ["plate", "well", "site", *GEOMETRY_COLUMNS]
    assert table["object_number"].tolist() == [3, 5, 9]
    row = table.iloc[0]
    assert (row.bbox_z0, row.bbox_z1, row.bbox_y0, row.bbox_y1, row.bbox_x0, row.bbox_x1) == (1, 4, 5, 10, 8, 15)
    assert (row.center_z, row.center_y, row.center_x) == (2.0, 7.0, 11.0)  # mean of min and max index
    assert table["volume_voxels"].tolist() == [3 * 5 * 7, 3 * 5 * 5, 2 * 4 * 4]
    assert table["touches_border"].tolist() == [False, False, True]  # y/x borders only by default
    assert table["crop_padded"].tolist() == [False, False, True]
    assert (table.plate == "P").all() and (table.well == "B02").all() and (table.site == 1).all()
    # defaults drop border cells; z borders count with border_axes="zyx"
    assert site_cells(labels, size=(None, 8, 8))["object_number"].tolist() == [3, 5]
    zyx = site_cells(labels, size=(None, 8, 8), drop_border=False, border_axes="zyx")
    assert zyx["touches_border"].tolist() == [False, False, True]
    assert site_cells(labels, size=(None, 12, 12), drop_padded=True)["object_number"].tolist() == [3, 5]
    # float centres: x of cell 5 is (15 + 19) / 2
    assert table.iloc[1].center_x == 17.0 and table.iloc[1].center_z == 3.0


def test_empty_site_gives_zero_rows_with_columns():
    table = site_cells(np.zeros((3, 10, 10), np.uint16), size=(None, 4, 4), plate="P", well="A01", site=0)
    assert len(table) == 0
    assert list(table.columns) == ["plate", "well", "site", *GEOMETRY_COLUMNS]


@pytest.mark.parametrize(
    ("labels", "error", "match"),
    [
        (np.zeros((3, 10, 10), np.float32), LabelsError, "dtype float32; labels must be integers"),
        (np.full((3, 10, 10), -1, np.int16), LabelsError, "negative"),
        (np.zeros((10, 10), np.int32), LabelsError, "must be 3D"),
    ],
)
def test_site_cells_bad_labels_name_plate_well_site(labels, error, match):
    with pytest.raises(error, match=match) as err:
        site_cells(labels, size=(None, 4, 4), plate="P", well="C07", site=2)
    assert 'plate "P", well "C07", site 2' in str(err.value)


def test_scatter_boxes_for_cupy_agree_with_find_objects():
    rng = np.random.default_rng(0)
    labels = ndi.label(ndi.gaussian_filter(rng.random((8, 40, 50)), 2) > 0.52)[0].astype(np.int32)
    labels[labels == 2] = 0  # a gap in the ids
    ids, lo, hi, volume = _boxes_scatter(labels, np)
    expected = [i for i in range(1, labels.max() + 1) if (labels == i).any()]
    assert ids.tolist() == expected
    for k, i in enumerate(ids):
        box = ndi.find_objects(labels)[i - 1]
        assert lo[k].tolist() == [s.start for s in box] and hi[k].tolist() == [s.stop for s in box]
        assert volume[k] == (labels == i).sum()


def test_crop_windows_centre_the_cell():
    start, stop = crop_windows(np.array([[2.0, 100.0, 100.5]]), (None, 128, 5), (6, 300, 300))
    assert start.tolist() == [[0, 36, 98]] and stop.tolist() == [[6, 164, 103]]
    # y: whole-voxel centre, even size -> crop index 64; x: half-voxel centre, odd size -> crop index 2.5
    start, _ = crop_windows(np.array([[2.0, 100.5, 100.0]]), (3, 128, 5), (6, 300, 300))
    assert start.tolist() == [[1, 37, 98]]  # y: 100.5 lands exactly on 63.5, the crop's centre


def _coded_image(shape, channels=2):
    """Each voxel holds c*1e6 + z*1e4 + y*100 + x, so a crop tells where it came from."""
    c, z, y, x = np.meshgrid(*(np.arange(n) for n in (channels, *shape)), indexing="ij")
    return (c * 1_000_000 + z * 10_000 + y * 100 + x + 1).astype(np.float64)


def test_crop_site_copies_the_window_pads_with_zeros_and_masks_only_the_central_cell():
    labels = _two_cells()
    image = _coded_image(labels.shape)
    cells = site_cells(labels, size=(None, 8, 8), drop_border=False)
    crops, masks = crop_site(image, labels, cells, (None, 8, 8), outside="background")
    assert crops.shape == (3, 2, 6, 8, 8) and crops.dtype == np.float32
    assert masks.shape == (3, 6, 8, 8) and masks.dtype == bool
    # cell 3: centre (7, 11) -> window y 3..10, x 7..14, all z
    np.testing.assert_array_equal(crops[0], image[:, :, 3:11, 7:15].astype(np.float32))
    np.testing.assert_array_equal(masks[0], labels[:, 3:11, 7:15] == 3)
    assert not masks[0][labels[:, 3:11, 7:15] == 5].any()  # the neighbour is in the crop but not in M
    assert (crops[0][:, labels[:, 3:11, 7:15] == 5] > 0).all()
    assert masks[0].sum() == cells.volume_voxels[0]
    # cell 9 at the x border: centre (13.5, 27.5) -> window y 10..17, x 24..31; x 30, 31 padded
    np.testing.assert_array_equal(crops[2][:, :, :, :6], image[:, :, 10:18, 24:30])
    assert not masks[2][:, :, 6:].any()
    # ... filled with each channel's median over the background (label 0), not with a step down to zero
    level = np.array([np.median(image[c][:, ::4, ::4][labels[:, ::4, ::4] == 0]) for c in range(len(image))])
    np.testing.assert_array_equal(crops[2][:, :, :, 6:], np.broadcast_to(level[:, None, None, None], (2, 6, 8, 2)))
    np.testing.assert_array_equal(background_level(image, labels), level.astype(np.float32))
    zero, _ = crop_site(image, labels, cells, (None, 8, 8))  # the default: zeros
    assert (zero[2][:, :, :, 6:] == 0).all()
    np.testing.assert_array_equal(zero[:, :, :, :, :6], crops[:, :, :, :, :6])  # only the fill differs
    np.testing.assert_array_equal(zero[:2], crops[:2])
    given, _ = crop_site(image, labels, cells, (None, 8, 8), outside=background_level(image, labels))
    np.testing.assert_array_equal(given, crops)  # a site cut in several calls passes its level once
    with pytest.raises(InputError, match="outside"):
        crop_site(image, labels, cells, (None, 8, 8), outside="edge")
    # a crop depth smaller than the stack, centred on the cell's z centre
    crops_z, masks_z = crop_site(image, labels, cells.iloc[:1], (3, 8, 8))
    np.testing.assert_array_equal(crops_z[0], image[:, 1:4, 3:11, 7:15])


def test_crop_site_bad_input():
    labels = _two_cells()
    cells = site_cells(labels, size=(None, 8, 8))
    image = _coded_image(labels.shape)
    where = dict(plate="P", well="D04", site=3)
    with pytest.raises(PlateLayoutError, match=r'plate "P", well "D04", site 3: has 6 z-slices, fewer than .* 9'):
        crop_site(image, labels, cells, (9, 8, 8), **where)
    bad = image.copy()
    bad[1, 2, 3, 4] = np.inf
    with pytest.raises(InputError, match=r'plate "P", well "D04", site 3: the image holds NaN or inf'):
        crop_site(bad, labels, cells, (None, 8, 8), **where)
    with pytest.raises(LabelsError, match=r"site 3: labels have shape \(z, y, x\) = \(6, 20, 29\)"):
        crop_site(image, labels[:, :, :29], cells, (None, 8, 8), **where)
    wrong = cells.assign(object_number=[3, 77])
    with pytest.raises(LabelsError, match=r"cells \[77\] are not in the labels"):
        crop_site(image, labels, wrong, (None, 8, 8), **where)


@pytest.fixture(scope="module")
def plate():
    p = synthetic_plate(doses_um=(0.0, 10.0), wells_per_treatment=2, sites_per_well=2, site_shape=(7, 80, 80),
                        cell_radius=12.0, seed=2)
    image, labels = dask.compute(p.image, p.labels)
    empty = labels.copy()
    empty[1, 0] = 0  # an empty site: zero rows, not an error
    return p._replace(image=image, labels=empty)


def test_cell_table_is_one_row_per_cell_sorted_with_platemap(plate):
    table = cell_table(plate.labels, plate.platemap, size=(None, 32, 32))
    assert list(table.columns[:16]) == ["plate", "well", "site", *GEOMETRY_COLUMNS]
    assert {"treatment", "dose", "is_control"} <= set(table.columns)
    assert table.groupby(["well", "site"]).size().get(("B03", 0), 0) == 0  # the empty site
    keys = list(zip(table.well, table.site, table.object_number))
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    # no lost cells: every non-border label of every site is there
    for w, well in enumerate(plate.labels["well"].values):
        for s in range(2):
            lab = plate.labels.values[w, s]
            boxes = ndi.find_objects(lab)
            inner = {i + 1 for i, b in enumerate(boxes) if b is not None and b[1].start > 0 and b[2].start > 0
                     and b[1].stop < 80 and b[2].stop < 80}
            got = set(table.loc[(table.well == well) & (table.site == s), "object_number"])
            assert got == inner
    assert (table.loc[table.well.isin(["B02", "C02"]), "treatment"] == "control").all()
    assert table.loc[table.well == "B03", "is_control"].eq(False).all()
    # platemap from the coords of a plate opened with one; none at all gives empty values
    with pytest.warns(UserWarning, match="no platemap, so every cell gets an empty treatment"):
        bare = cell_table(plate.labels, size=(None, 32, 32))
    assert (bare.treatment == "").all() and bare.dose.isna().all() and len(bare) == len(table)


def test_cell_table_bad_input(plate):
    with pytest.raises(LabelsError, match=r'plate "synthetic", well "B02", site 0: labels have dtype float64'):
        cell_table(plate.labels.astype(float))
    with pytest.raises(PlateLayoutError, match="has 7 z-slices, fewer than the requested crop depth 21"):
        cell_table(plate.labels, size=(21, 32, 32))
    with pytest.raises(PlateLayoutError, match=r"wells \['C03'\] have no row"):
        cell_table(plate.labels, plate.platemap.iloc[:3])


def test_extract_crops_is_lazy_per_site_and_matches_crop_site(plate):
    table = cell_table(plate.labels, plate.platemap, size=(None, 32, 32))
    lazy = plate._replace(image=plate.image.chunk({"well": 1, "site": 1}),
                          labels=plate.labels.chunk({"well": 1, "site": 1}))
    crops, masks = extract_crops(lazy.image, lazy.labels, table, size=(None, 32, 32))
    sizes = table.groupby(["well", "site"], sort=False).size().tolist()
    assert crops.chunks[0] == tuple(sizes) and masks.chunks[0] == tuple(sizes)
    assert crops.shape == (len(table), 6, 7, 32, 32) and crops.dtype == np.float32
    assert masks.shape == (len(table), 7, 32, 32) and masks.dtype == bool
    pair_layers = [k for k in crops.dask.layers if str(k).startswith("crop-site-")]
    assert len(pair_layers) == 1 and len(crops.dask.layers[pair_layers[0]]) == len(sizes)  # one task per site
    c, m = dask.compute(crops, masks)
    # no lost or duplicated cells: every crop holds its own cell, volumes add up where nothing was padded
    assert m.reshape(len(table), -1).any(axis=1).all()
    whole = (~table.crop_padded & (table.bbox_y1 - table.bbox_y0 <= 32) & (table.bbox_x1 - table.bbox_x0 <= 32)).to_numpy()
    assert whole.sum() >= 5
    np.testing.assert_array_equal(m[whole].reshape(whole.sum(), -1).sum(axis=1), table.volume_voxels[whole])
    well, site = table.well[5], table.site[5]
    rows = table[(table.well == well) & (table.site == site)]
    w, s = list(plate.image["well"].values).index(well), int(site)
    direct_c, direct_m = crop_site(plate.image.values[w, s], plate.labels.values[w, s], rows, (None, 32, 32))
    np.testing.assert_array_equal(c[rows.index], direct_c)
    np.testing.assert_array_equal(m[rows.index], direct_m)


def test_extract_crops_follows_a_filtered_table_and_checks_it(plate):
    table = cell_table(plate.labels, plate.platemap, size=(None, 32, 32))
    some = table[table.well == "C03"].iloc[::2]
    crops, masks = extract_crops(plate.image, plate.labels, some, size=(None, 32, 32))
    assert crops.shape[0] == len(some)
    full, _ = extract_crops(plate.image, plate.labels, table, size=(None, 32, 32))
    np.testing.assert_array_equal(crops.compute(), full.compute()[some.index])
    empty_c, empty_m = extract_crops(plate.image, plate.labels, table.iloc[:0], size=(None, 32, 32))
    assert empty_c.shape == (0, 6, 7, 32, 32) and empty_m.shape == (0, 7, 32, 32)
    shuffled = pd.concat([table.iloc[:2], table[table.well == "C03"].iloc[:1], table.iloc[2:3]])
    with pytest.raises(InputError, match="not contiguous"):
        extract_crops(plate.image, plate.labels, shuffled, size=(None, 32, 32))
    with pytest.raises(LabelsError, match="differ in site"):
        extract_crops(plate.image, plate.labels.isel(site=[0]), table, size=(None, 32, 32))
    nan = plate.image.astype(np.float32).copy()
    nan[2, 1, 0, 3, 10, 10] = np.nan
    crops, _ = extract_crops(nan, plate.labels, table, size=(None, 32, 32))
    with pytest.raises(InputError, match=r'plate "synthetic", well "C02", site 1: the image holds NaN'):
        crops.compute()


def test_rescale_and_normalisation():
    rng = np.random.default_rng(0)
    crops = rng.gamma(2.0, 300.0, (10, 3, 4, 8, 8)).astype(np.float32)
    crops[0, 1] = 42.0  # a constant channel
    scaled = rescale_crops(crops)
    assert scaled.dtype == np.float32
    np.testing.assert_allclose(scaled[1:].min(axis=(2, 3, 4)), 0.0)
    np.testing.assert_allclose(scaled[1:].max(axis=(2, 3, 4)), 1.0)
    assert (scaled[0, 1] == 0).all()
    norm = fit_normalization(crops)
    json.dumps(norm)  # plain floats: goes into a bundle's JSON
    assert all(type(v) is float for v in norm["mean"] + norm["std"]) and len(norm["mean"]) == 3
    np.testing.assert_allclose(norm["mean"], scaled.astype(np.float64).mean(axis=(0, 2, 3, 4)), rtol=1e-6)
    np.testing.assert_allclose(norm["std"], scaled.astype(np.float64).std(axis=(0, 2, 3, 4)), rtol=1e-5)
    lazy = da.from_array(crops, chunks=(3, 3, 4, 8, 8))
    norm_lazy = fit_normalization(lazy)
    np.testing.assert_allclose(norm_lazy["mean"], norm["mean"], rtol=1e-6)
    np.testing.assert_allclose(norm_lazy["std"], norm["std"], rtol=1e-5)
    x = normalize_crops(crops, norm)
    np.testing.assert_allclose(x.mean(axis=(0, 2, 3, 4)), 0.0, atol=1e-5)
    np.testing.assert_allclose(x.std(axis=(0, 2, 3, 4)), 1.0, atol=1e-4)
    np.testing.assert_allclose(normalize_crops(lazy, norm).compute(), x, atol=1e-6)
    np.testing.assert_allclose(normalize_crops(scaled, norm, rescaled=True), x, atol=1e-6)
    with pytest.raises(InputError, match=r"\(3 channels\); the normalization has 2 channels"):
        normalize_crops(crops, {"mean": [0.1, 0.2], "std": [1.0, 1.0]})
    with pytest.raises(InputError, match="at least one crop"):
        fit_normalization(crops[:0])


def test_real_stack_runs_through_the_same_code(real_data):
    from skimage.filters import threshold_otsu
    from skimage.segmentation import expand_labels

    image = open_plate(real_data / "rgb_3D.tif", axes="ZCYX", channels=["nucleus", "cytoplasm"])
    raw = image.values[0, 0]
    nucleus = ndi.gaussian_filter(raw[0].astype(float), 1.5)
    seeds = ndi.label(nucleus > threshold_otsu(nucleus))[0]
    cyto = ndi.gaussian_filter(raw[1].astype(float), 1.5)
    cells = expand_labels(seeds, 4) * (cyto > threshold_otsu(cyto))  # a crude, test-only segmentation
    labels = plate_dataarray(cells[None, None].astype(np.int32), wells=["A01"], plate=image.attrs["plate"])
    table = cell_table(labels, size=(None, 48, 48), drop_border=False)
    assert len(table) >= 3
    assert table.touches_border.any()  # real cells are cut by the volume's edges
    crops, masks = extract_crops(image, labels, table, size=(None, 48, 48))
    c, m = dask.compute(crops, masks)
    assert c.shape == (len(table), 2, 75, 48, 48)
    assert c.max() == 65535.0  # saturated real voxels survive as they are
    for k, row in table.iterrows():
        assert m[k].sum() == (cells == row.object_number).sum() or row.crop_padded
        zz, yy, xx = np.nonzero(m[k])
        start = crop_windows(np.array([[row.center_z, row.center_y, row.center_x]]), (None, 48, 48), raw.shape[1:])[0][0]
        np.testing.assert_array_equal(c[k][:, zz, yy, xx], raw[:, zz + start[0], yy + start[1], xx + start[2]])
    norm = fit_normalization(c)
    assert np.isfinite(normalize_crops(c, norm)).all()
    # the background fill on real intensities: windows past the volume hold each channel's background median
    level = background_level(raw, cells)
    assert (level > 0).all()  # a real camera's background is not 0: the zero fill would be a step
    filled = extract_crops(image, labels, table, size=(None, 48, 48), outside="background")[0].compute()
    padded = table.crop_padded.to_numpy()
    assert padded.any() and np.array_equal(filled[~padded], c[~padded])
    for k in np.flatnonzero(padded):
        row = table.iloc[k]
        start = crop_windows(np.array([[row.center_z, row.center_y, row.center_x]]), (None, 48, 48), raw.shape[1:])[0][0]
        inside = np.zeros((75, 48, 48), bool)
        lo, hi = np.maximum(-start, 0), np.minimum(np.asarray(raw.shape[1:]) - start, (75, 48, 48))
        inside[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = True
        np.testing.assert_array_equal(filled[k][:, inside], c[k][:, inside])
        past = filled[k][:, ~inside]
        np.testing.assert_array_equal(past, np.broadcast_to(level[:, None], past.shape))


@pytest.mark.gpu
def test_cupy_crops_and_boxes_match_numpy():
    cupy = pytest.importorskip("cupy")
    labels = _two_cells()
    image = _coded_image(labels.shape).astype(np.float32)
    cells = site_cells(labels, size=(None, 8, 8), drop_border=False)
    gpu_cells = site_cells(cupy.asarray(labels), size=(None, 8, 8), drop_border=False)
    pd.testing.assert_frame_equal(cells, gpu_cells)
    crops, masks = crop_site(cupy.asarray(image), cupy.asarray(labels), cells, (None, 8, 8))
    assert isinstance(crops, cupy.ndarray) and isinstance(masks, cupy.ndarray)
    ref_c, ref_m = crop_site(image, labels, cells, (None, 8, 8))
    np.testing.assert_array_equal(crops.get(), ref_c)
    np.testing.assert_array_equal(masks.get(), ref_m)
    # the background fill (cell 9's window runs past the site): the level is a CuPy median over label 0
    filled, _ = crop_site(cupy.asarray(image), cupy.asarray(labels), cells, (None, 8, 8), outside="background")
    np.testing.assert_allclose(filled.get(), crop_site(image, labels, cells, (None, 8, 8), outside="background")[0],
                               rtol=1e-6)
    norm = fit_normalization(ref_c)
    np.testing.assert_allclose(normalize_crops(crops, norm).get(), normalize_crops(ref_c, norm), atol=1e-5)


def test_extract_crops_uses_the_tables_crop_size(plate):
    table = cell_table(plate.labels, plate.platemap, size=(None, 32, 32))
    assert table.attrs["crop_size"] == (None, 32, 32)
    crops, masks = extract_crops(plate.image, plate.labels, table)  # no size: the table's
    assert crops.shape[-2:] == (32, 32) and masks.shape[-2:] == (32, 32)
    with pytest.raises(InputError, match=r"crop size \(None, 48, 48\) differs from the \(None, 32, 32\)"):
        extract_crops(plate.image, plate.labels, table, size=(None, 48, 48))
