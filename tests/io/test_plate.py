"""Plates: OME-Zarr HCS 0.4/0.5, plain Zarr and TIFF readers, the OME-Zarr 0.5 writer, platemaps."""

from __future__ import annotations

import json
import warnings

import dask
import dask.array as da
import numpy as np
import pandas as pd
import pytest
import tifffile
import xarray as xr
import zarr
import zarr.storage

from gradcamo_dask import InputError, LabelsError, MetadataError, OutputStoreError, PlateLayoutError, open_labels, open_plate, open_platemap, synthetic_plate, write_plate
from gradcamo_dask.io.layout import select_channels
from gradcamo_dask.io.layout import plate_dataarray
from gradcamo_dask.io.platemap import normalize_well

CHANNELS = ["DNA", "ER", "RNA", "AGP", "Actin", "Mito"]


@pytest.fixture(scope="module")
def small_plate():
    """2 doses x 2 wells x 2 sites of 5 x 48 x 48, computed once (in memory)."""
    plate = synthetic_plate(doses_um=(0.0, 3.0), wells_per_treatment=2, sites_per_well=2, site_shape=(5, 48, 48),
                            cell_radius=10.0, seed=3)
    image, labels = dask.compute(plate.image, plate.labels)
    return plate._replace(image=image, labels=labels)


@pytest.fixture(scope="module")
def written(small_plate, tmp_path_factory):
    path = tmp_path_factory.mktemp("plates") / "small.zarr"
    write_plate(path, small_plate.image, small_plate.labels)
    return path


# ------------------------------------------------------------------ OME-Zarr 0.5


def test_written_plate_validates_with_ome_zarr_models(written, small_plate):
    from ome_zarr_models.v05.hcs import HCS
    from ome_zarr_models.v05.image_label import ImageLabel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ome-zarr-models' own notices
        hcs = HCS.from_zarr(zarr.open_group(written, mode="r"))
    assert hcs.n_wells == 4
    wells = list(hcs.well_groups)
    assert [len(w.ome_attributes.well.images) for w in wells] == [2, 2, 2, 2]
    field = zarr.open_group(written / "B" / "2" / "1", mode="r")
    assert [c["label"] for c in field.attrs["ome"]["omero"]["channels"]] == CHANNELS
    label_group = zarr.open_group(written / "B" / "2" / "1" / "labels" / "cells", mode="r")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        label_model = ImageLabel.from_zarr(label_group)
    assert label_model.attributes.ome.image_label is not None
    assert label_group["0"].dtype == np.int32


def test_round_trip_keeps_values_coords_and_attrs(written, small_plate):
    image = open_plate(written)
    assert image.dims == ("well", "site", "c", "z", "y", "x")
    assert image.name == "image"
    assert image.chunks[:2] == ((1,) * 4, (1, 1))  # one chunk per site
    assert image.data.chunksize == (1, 1, 6, 5, 48, 48)
    assert list(image["well"].values) == ["B02", "B03", "C02", "C03"]
    assert list(image["row"].values) == ["B", "B", "C", "C"]
    assert list(image["column"].values) == [2, 3, 2, 3]
    assert list(image["site"].values) == [0, 1]
    assert list(image["c"].values) == CHANNELS
    assert image.attrs["plate"] == "synthetic"
    assert image.attrs["spacing_zyx_um"] == pytest.approx([1.1115, 0.65, 0.65])
    assert json.loads(image.attrs["synthetic"])["seed"] == 3  # provenance travels
    # the platemap was written as platemap.csv and is picked up
    assert list(image["treatment"].values) == ["control", "compound_3uM", "control", "compound_3uM"]
    assert list(image["is_control"].values) == [True, False, True, False]
    np.testing.assert_array_equal(image.values, small_plate.image.values)
    labels = open_labels(written, like=image)
    assert labels.dims == ("well", "site", "z", "y", "x") and labels.dtype == np.int32
    np.testing.assert_array_equal(labels.values, small_plate.labels.values)
    assert open_plate(written, platemap=False).coords.get("treatment") is None


class CountingStore(zarr.storage.WrapperStore):
    """Records every key read, to tell metadata reads from chunk reads."""

    def __init__(self, store, log=None):
        super().__init__(store)
        self.log = [] if log is None else log

    def _with_store(self, store):
        return type(self)(store, self.log)

    async def get(self, key, prototype, byte_range=None):
        self.log.append(key)
        return await self._store.get(key, prototype, byte_range)

    async def get_partial_values(self, prototype, key_ranges):
        key_ranges = list(key_ranges)
        self.log.extend(k for k, _ in key_ranges)
        return await self._store.get_partial_values(prototype, key_ranges)


_METADATA = ("zarr.json", ".zattrs", ".zarray", ".zgroup", ".zmetadata")


def _chunk_reads(log):
    return [k for k in log if not k.endswith(_METADATA)]


def test_open_reads_metadata_only_and_a_site_reads_only_its_chunks(written):
    store = CountingStore(zarr.storage.LocalStore(written, read_only=True))
    image = open_plate(store)
    labels = open_labels(store)
    graph_size = len(image.data.__dask_graph__())
    assert store.log, "opening must have read metadata through the store"
    assert _chunk_reads(store.log) == []
    assert graph_size == 4 * 2  # one task per site
    site = image.sel(well="C03", site=1).values
    reads = _chunk_reads(store.log)
    assert reads and all(k.startswith("C/3/1/0/") for k in reads), reads
    assert site.shape == (6, 5, 48, 48)
    labels.sel(well="B02", site=0).values
    assert any(k.startswith("B/2/0/labels/cells/0/") for k in _chunk_reads(store.log))


# ------------------------------------------------------------------ OME-Zarr 0.4


def _write_v04_plate(path, *, wells=("B/3", "D/11"), fields=3, channels=("Hoechst", "Phalloidin"),
                     shape=(1, 2, 4, 8, 10), ragged=False):
    """A hand-made NGFF 0.4 plate on Zarr v2 (axes tczyx, xy in nanometres, two levels, labels)."""
    root = zarr.open_group(path, mode="w", zarr_format=2)
    rows = sorted({w.split("/")[0] for w in wells})
    cols = sorted({w.split("/")[1] for w in wells}, key=int)
    root.attrs["plate"] = {
        "version": "0.4", "name": "v04plate", "field_count": fields,
        "rows": [{"name": r} for r in rows], "columns": [{"name": c} for c in cols],
        "wells": [{"path": w, "rowIndex": rows.index(w.split("/")[0]), "columnIndex": cols.index(w.split("/")[1])}
                  for w in wells],
    }
    axes = [{"name": "t", "type": "time", "unit": "second"}, {"name": "c", "type": "channel"},
            {"name": "z", "type": "space", "unit": "micrometer"},
            {"name": "y", "type": "space", "unit": "nanometer"}, {"name": "x", "type": "space", "unit": "nanometer"}]
    values = {}
    for wi, w in enumerate(wells):
        n_fields = fields - 1 if ragged and wi == 1 else fields
        well = root.require_group(w)
        well.attrs["well"] = {"version": "0.4", "images": [{"path": str(f), "acquisition": 0} for f in range(n_fields)]}
        for f in range(n_fields):
            img = well.require_group(str(f))
            img.attrs["multiscales"] = [{
                "version": "0.4", "axes": axes, "datasets": [
                    {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1, 1, 2.0, 325.0, 325.0]}]},
                    {"path": "1", "coordinateTransformations": [{"type": "scale", "scale": [1, 1, 2.0, 650.0, 650.0]}]},
                ]}]
            img.attrs["omero"] = {"channels": [{"label": c, "color": "FFFFFF", "window": {
                "min": 0, "max": 65535, "start": 0, "end": 65535}} for c in channels]}
            data = (np.arange(np.prod(shape), dtype=np.uint16).reshape(shape) + 1000 * wi + 100 * f).astype(np.uint16)
            values[(wi, f)] = data
            img.create_array("0", shape=shape, chunks=(1, 1, shape[2], shape[3], shape[4]), dtype=np.uint16,
                             chunk_key_encoding={"name": "v2", "separator": "/"})[...] = data
            img.create_array("1", shape=shape[:3] + (shape[3] // 2, shape[4] // 2), dtype=np.uint16)[...] = 0
            lab = img.require_group("labels")
            lab.attrs["labels"] = ["nuclei"]
            nuc = lab.require_group("nuclei")
            nuc.attrs["image-label"] = {"version": "0.4", "colors": [{"label-value": 1, "rgba": [255, 0, 0, 255]}]}
            nuc.attrs["multiscales"] = [{"version": "0.4", "axes": axes, "datasets": [
                {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1, 1, 2.0, 325.0, 325.0]}]}]}]
            lab_data = np.zeros((1, 1) + shape[2:], np.int32)
            lab_data[0, 0, :, 2:5, 3:7] = 1 + f
            nuc.create_array("0", shape=lab_data.shape, dtype=np.int32)[...] = lab_data
    return values


def test_ngff_04_on_zarr_v2_reads_every_field_of_every_well(tmp_path):
    from ome_zarr_models.v04.hcs import HCS

    path = tmp_path / "v04.zarr"
    values = _write_v04_plate(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert HCS.from_zarr(zarr.open_group(path, mode="r")).n_wells == 2  # the fixture is valid NGFF 0.4
    image = open_plate(path)
    assert image.sizes == {"well": 2, "site": 3, "c": 2, "z": 4, "y": 8, "x": 10}
    assert list(image["well"].values) == ["B03", "D11"]
    assert list(image["column"].values) == [3, 11]
    assert list(image["c"].values) == ["Hoechst", "Phalloidin"]
    assert image.attrs["plate"] == "v04plate"
    # voxel size of the full-resolution dataset (datasets[0]), converted to µm
    assert image.attrs["spacing_zyx_um"] == pytest.approx([2.0, 0.325, 0.325])
    for (wi, f), data in values.items():
        np.testing.assert_array_equal(image.isel(well=wi, site=f).values, data[0])
    labels = open_labels(path, like=image)
    assert labels.sizes == {"well": 2, "site": 3, "z": 4, "y": 8, "x": 10}
    assert int(labels.isel(well=1, site=2).max()) == 3
    with pytest.raises(LabelsError, match="no label image 'cells'"):
        open_labels(path, name="cells")


def test_ragged_fields_read_as_zero_sites_with_a_warning(tmp_path):
    path = tmp_path / "ragged.zarr"
    _write_v04_plate(path, ragged=True)
    with pytest.warns(UserWarning, match="fewer fields"):
        image = open_plate(path)
    assert image.sizes["site"] == 3
    assert int(image.isel(well=1, site=2).max()) == 0
    assert int(image.isel(well=1, site=1).max()) > 0


def test_single_ome_zarr_image_is_one_well_one_site(written):
    image = open_plate(written / "C" / "3" / "1")
    assert image.sizes["well"] == 1 and image.sizes["site"] == 1
    np.testing.assert_array_equal(image.values[0, 0], open_plate(written).sel(well="C03", site=1).values)


def _edit_attrs(path, edit):
    group = zarr.open_group(path, mode="r+")
    attrs = json.loads(json.dumps(dict(group.attrs)))
    edit(attrs)
    group.attrs.clear()
    group.attrs.update(attrs)


@pytest.mark.parametrize(
    ("where", "edit", "key"),
    [
        ("B/3/1", lambda a: a["multiscales"][0]["datasets"][0].pop("coordinateTransformations"),
         "multiscales[0].datasets[0].coordinateTransformations"),
        ("B/3/1", lambda a: a["multiscales"][0]["datasets"][0]["coordinateTransformations"][0].update(scale=[1, 2]),
         "multiscales[0].datasets[0].coordinateTransformations[0].scale"),
        ("B/3/1", lambda a: a["multiscales"][0]["datasets"][0].update(path="nope"), "multiscales[0].datasets[0].path"),
        ("B/3/1", lambda a: a["multiscales"][0]["axes"][3].update(name="q"), "multiscales[0].axes[3].name"),
        ("B/3/1", lambda a: a["multiscales"][0]["axes"][4].update(unit="parsec"), "multiscales[0].axes[4].unit"),
        ("B/3/1", lambda a: a["omero"]["channels"].pop(), "omero.channels"),
        ("B/3/1", lambda a: a.pop("multiscales"), "multiscales"),
        ("D/11", lambda a: a["well"]["images"][2].update(path="7"), "well.images[2].path"),
        ("D/11", lambda a: a["well"].pop("images"), "well.images"),
        ("", lambda a: a["plate"]["wells"][1].update(path="D/12"), "plate.wells[1].path"),
        ("", lambda a: a["plate"]["wells"][0].update(path="B3"), "plate.wells[0].path"),
        ("", lambda a: a["plate"].update(wells=[]), "plate.wells"),
    ],
)
def test_malformed_metadata_names_the_key_and_the_file(tmp_path, where, edit, key):
    path = tmp_path / "bad.zarr"
    _write_v04_plate(path)
    _edit_attrs(path / where if where else path, edit)
    with pytest.raises(MetadataError) as err:
        open_plate(path)
    message = str(err.value)
    assert f'"{key}"' in message
    assert str(path / where / ".zattrs") in message
    if where.count("/") == 2:  # a field: plate, well and site are named too
        assert 'plate "v04plate", well "B03", site 1' in message
    elif where:
        assert 'plate "v04plate", well "D11"' in message


def test_wells_with_inconsistent_shapes_name_plate_well_and_site(tmp_path):
    path = tmp_path / "shapes.zarr"
    _write_v04_plate(path)
    img = zarr.open_group(path / "D/11/2", mode="r+")
    del img["0"]
    img.create_array("0", shape=(1, 2, 4, 8, 12), dtype=np.uint16)
    with pytest.raises(PlateLayoutError, match=r'plate "v04plate", well "D11", site 2: image shape .* \(2, 4, 8, 12\)'):
        open_plate(path)


def test_channels_select_reorder_and_missing_ones_are_named(written):
    image = open_plate(written, channels=["Mito", "DNA"])
    assert list(image["c"].values) == ["Mito", "DNA"]
    np.testing.assert_array_equal(image.isel(well=0, site=0, c=1).values,
                                  open_plate(written).isel(well=0, site=0, c=0).values)
    with pytest.raises(PlateLayoutError) as err:
        select_channels(open_plate(written), ["DNA", "ER", "RNA", "AGP", "Actin", "Mito", "Brightfield"])
    assert 'plate "synthetic", well "B02", site 0' in str(err.value) and "missing: Brightfield" in str(err.value)


# ------------------------------------------------------------------------ write


def test_write_refuses_to_overwrite_and_never_leaves_a_complete_looking_store(tmp_path, small_plate):
    path = tmp_path / "p.zarr"
    write_plate(path, small_plate.image)
    with pytest.raises(OutputStoreError, match="already exists"):
        write_plate(path, small_plate.image)
    (tmp_path / "notzarr").mkdir()
    with pytest.raises(OutputStoreError, match="not a Zarr store"):
        write_plate(tmp_path / "notzarr", small_plate.image, overwrite=True)

    bad = small_plate.image.astype(np.float32).copy()
    bad[1, 1, 2, 0, 3, 3] = np.nan
    with pytest.raises(InputError, match=r'plate "synthetic", well "B03", site 1: .*NaN'):
        write_plate(path, bad, overwrite=True)
    with pytest.raises(PlateLayoutError, match="write did not finish"):
        open_plate(path)  # the failed write left no plate metadata


def test_write_checks_labels_against_the_image(tmp_path, small_plate):
    with pytest.raises(LabelsError, match=r"labels have shape \(z, y, x\) = \(5, 48, 40\)"):
        write_plate(tmp_path / "a.zarr", small_plate.image, small_plate.labels.isel(x=slice(0, 40)))
    with pytest.raises(LabelsError, match=r'plate "synthetic", well "B02", site 0: labels have dtype float32'):
        write_plate(tmp_path / "b.zarr", small_plate.image, small_plate.labels.astype(np.float32))
    assert not (tmp_path / "a.zarr").exists() and not (tmp_path / "b.zarr").exists()


def test_open_labels_checks_wells_and_shape(written, small_plate):
    other = small_plate.image.isel(well=[0, 1])
    with pytest.raises(LabelsError, match="differ in well"):
        open_labels(written, like=other)


# ----------------------------------------------------------------- plain Zarr


def test_plain_zarr_layout(tmp_path):
    path = tmp_path / "plain.zarr"
    group = zarr.open_group(path, mode="w")
    image = np.random.default_rng(0).integers(0, 4000, (2, 3, 2, 4, 16, 16), dtype=np.uint16)
    labels = np.zeros((2, 3, 4, 16, 16), np.int32)
    labels[..., 4:8, 4:9] = 5
    group.create_array("image", shape=image.shape, dtype=image.dtype, chunks=(1, 1, 1, 4, 16, 16))[...] = image
    group.create_array("labels", shape=labels.shape, dtype=labels.dtype)[...] = labels
    group.attrs.update({"plate": "P1", "wells": ["A1", "H12"], "channels": ["DNA", "Mito"],
                        "spacing_zyx_um": [1.0, 0.5, 0.5]})
    plate = open_plate(path)
    assert list(plate["well"].values) == ["A01", "H12"] and list(plate["c"].values) == ["DNA", "Mito"]
    assert plate.attrs == {"plate": "P1", "spacing_zyx_um": [1.0, 0.5, 0.5], "spacing_recorded": True}
    assert plate.data.chunksize == (1, 1, 2, 4, 16, 16)
    np.testing.assert_array_equal(plate.values, image)
    np.testing.assert_array_equal(open_labels(path, like=plate).values, labels)

    one = tmp_path / "one.zarr"
    zarr.open_group(one, mode="w").create_array("image", data=image[0, 0])
    single = open_plate(one, channels=["DNA", "Mito"], spacing_zyx_um=(2, 1, 1))
    assert single.sizes == {"well": 1, "site": 1, "c": 2, "z": 4, "y": 16, "x": 16}
    assert list(single["c"].values) == ["DNA", "Mito"] and single.attrs["spacing_zyx_um"] == [2.0, 1.0, 1.0]

    bad = tmp_path / "bad.zarr"
    g = zarr.open_group(bad, mode="w")
    g.create_array("image", data=image)
    g.attrs["channels"] = ["DNA"]
    with pytest.raises(MetadataError, match="'channels' lists 1 names"):
        open_plate(bad)


# ------------------------------------------------------------------------ TIFF


def test_tiff_folder_and_single_file(tmp_path):
    rng = np.random.default_rng(1)
    stacks = {}
    for well in ("B2", "C10"):
        for site in (0, 1):
            data = rng.integers(0, 60000, (4, 3, 12, 14), dtype=np.uint16)  # Z, C, Y, X
            tifffile.imwrite(tmp_path / f"{well}_s{site}.tif", data, imagej=True, metadata={"axes": "ZCYX"})
            lab = np.zeros((4, 12, 14), np.uint16)
            lab[1:3, 2:6, 2:6] = 7
            tifffile.imwrite(tmp_path / f"{well}_s{site}_labels.tif", lab, photometric="minisblack")
            stacks[(normalize_well(well), site)] = (data, lab)
    plate = open_plate(tmp_path, channels=["DNA", "ER", "Mito"])
    assert list(plate["well"].values) == ["B02", "C10"] and list(plate["c"].values) == ["DNA", "ER", "Mito"]
    for (well, site), (data, lab) in stacks.items():
        np.testing.assert_array_equal(plate.sel(well=well, site=site).values, data.transpose(1, 0, 2, 3))
    labels = open_labels(tmp_path, like=plate, axes="ZYX")
    assert labels.dtype == np.int32  # stored as uint16
    np.testing.assert_array_equal(labels.sel(well="C10", site=1).values, stacks[("C10", 1)][1])

    single = open_plate(tmp_path / "B2_s1.tif")
    assert single.sizes == {"well": 1, "site": 1, "c": 3, "z": 4, "y": 12, "x": 14}

    tifffile.imwrite(tmp_path / "C10_s2.tif", rng.integers(0, 9, (4, 3, 12, 15), dtype=np.uint16), imagej=True,
                     metadata={"axes": "ZCYX"})
    with pytest.raises(PlateLayoutError, match=r'well "C10", site 2: .*\(3, 4, 12, 15\)'):
        open_plate(tmp_path)


def test_real_tiff_opens_lazily_with_axes(real_data):
    path = real_data / "rgb_3D.tif"
    with pytest.warns(UserWarning, match="assuming TZCYX|assuming ZCYX"):
        guessed = open_plate(path)
    plate = open_plate(path, axes="ZCYX", channels=["nucleus", "cytoplasm"])
    assert plate.sizes == {"well": 1, "site": 1, "c": 2, "z": 75, "y": 75, "x": 75}
    assert guessed.sizes == plate.sizes
    raw = tifffile.imread(path)
    np.testing.assert_array_equal(plate.values[0, 0], raw.transpose(1, 0, 2, 3))
    assert plate.attrs["spacing_zyx_um"] == [1.1115, 0.65, 0.65]  # records none: the documented default


def test_plate_without_voxel_size_uses_the_documented_default_with_a_warning(tmp_path):
    from gradcamo_dask.io.plate import DEFAULT_SPACING_ZYX_UM
    from gradcamo_dask.segment.segmenters import PAPER_ANISOTROPY

    data = np.random.default_rng(2).integers(0, 60000, (4, 2, 12, 14), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "bare.tif", data, imagej=True, metadata={"axes": "ZCYX"})
    with pytest.warns(UserWarning, match=r"records no voxel size; using the default 1.1115 x 0.65 x 0.65 µm .*"
                                         r"anisotropy 1.71"):
        bare = open_plate(tmp_path / "bare.tif", platemap=False)
    assert bare.attrs["spacing_zyx_um"] == list(DEFAULT_SPACING_ZYX_UM)
    z, y, x = bare.attrs["spacing_zyx_um"]
    assert round(z / x, 2) == PAPER_ANISOTROPY == 1.71 and y == x  # what the segmenter derives from it
    # a voxel size given, or recorded by the file, is used as it is and nothing is said
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        given = open_plate(tmp_path / "bare.tif", platemap=False, spacing_zyx_um=(1.0, 1.0, 1.0))
        tifffile.imwrite(tmp_path / "recorded.tif", data, imagej=True, resolution=(1 / 0.5, 1 / 0.5),
                         metadata={"axes": "ZCYX", "spacing": 2.0, "unit": "um"})
        recorded = open_plate(tmp_path / "recorded.tif", platemap=False)
    assert given.attrs["spacing_zyx_um"] == [1.0, 1.0, 1.0]
    assert recorded.attrs["spacing_zyx_um"] == pytest.approx([2.0, 0.5, 0.5])
    # plain Zarr without the attribute: the same default and warning
    group = zarr.open_group(tmp_path / "plain.zarr", mode="w")
    group.create_array("image", data=data.transpose(1, 0, 2, 3))
    with pytest.warns(UserWarning, match="records no voxel size"):
        plain = open_plate(tmp_path / "plain.zarr", platemap=False)
    assert plain.attrs["spacing_zyx_um"] == list(DEFAULT_SPACING_ZYX_UM)


def test_plate_without_platemap_warns_that_classes_go_unchecked(tmp_path, written):
    data = np.zeros((2, 1, 4, 4), np.uint16)
    tifffile.imwrite(tmp_path / "A1_s0.tif", data, imagej=True, metadata={"axes": "ZCYX"})
    with pytest.warns(UserWarning, match=r"without a platemap .*classes unchecked"):
        image = open_plate(tmp_path, spacing_zyx_um=(1, 1, 1))
    assert "treatment" not in image.coords
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "treatment" not in open_plate(tmp_path, spacing_zyx_um=(1, 1, 1), platemap=False).coords
        mapped = open_plate(tmp_path, spacing_zyx_um=(1, 1, 1),
                            platemap=pd.DataFrame({"well": ["A01"], "treatment": ["DMSO"]}))
        assert mapped["treatment"].values.tolist() == ["DMSO"]
        assert "treatment" in open_plate(written).coords  # platemap.csv beside the plate is found


# -------------------------------------------------------------------- platemap


def test_open_platemap_aliases_and_control_inference(tmp_path):
    path = tmp_path / "map.csv"
    pd.DataFrame({"Metadata_Well": ["B2", "b03", "C02"], "Metadata_Treatment": ["DMSO", "taxol", "taxol"],
                  "concentration": [0, 1.5, 0.5], "batch": ["x", "y", "z"]}).to_csv(path, index=False)
    pm = open_platemap(path)
    assert list(pm.columns) == ["well", "treatment", "dose", "is_control", "batch"]
    assert list(pm["well"]) == ["B02", "B03", "C02"]
    assert list(pm["is_control"]) == [True, False, False]
    assert pm["dose"].tolist() == [0.0, 1.5, 0.5]

    explicit = tmp_path / "map.tsv"
    explicit.write_text("well\ttreatment\tis_control\nA1\tx\tyes\nA2\ty\tno\n")
    assert open_platemap(explicit)["is_control"].tolist() == [True, False]
    assert open_platemap(explicit)["dose"].isna().all()


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("well,dose\nA1,1\n", r"no 'treatment' column"),
        ("well,treatment\nA1,x\nA01,y\n", r"wells \['A01'\] appear more than once"),
        ("well,treatment\nZZZ9999,x\n", r"column 'well'"),
        ("well,treatment,dose\nA1,x,lots\n", r"column 'dose' is not numeric"),
        ("well,treatment,is_control\nA1,x,maybe\n", r"column 'is_control' holds 'maybe'"),
    ],
)
def test_bad_platemaps_name_the_column_and_file(tmp_path, text, match):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(MetadataError, match=match) as err:
        open_platemap(path)
    assert str(path) in str(err.value)


def test_platemap_must_cover_every_well(written):
    pm = pd.DataFrame({"well": ["B02", "B03", "C02"], "treatment": ["a", "b", "c"]})
    with pytest.raises(PlateLayoutError, match=r"wells \['C03'\] have no row in the platemap"):
        open_plate(written, platemap=pm)
    pm = pd.DataFrame({"well": ["B2", "B3", "C2", "C3", "H12"], "treatment": list("abcde"), "dose": [0, 1, 2, 3, 4]})
    plate = open_plate(written, platemap=pm)
    assert list(plate["treatment"].values) == ["a", "b", "c", "d"]
    assert list(plate["is_control"].values) == [True, False, False, False]


def test_labels_like_wraps_segmenter_output(small_plate):
    from gradcamo_dask.io.layout import labels_like

    data = da.from_array(small_plate.labels.values.astype(np.uint16), chunks=(1, 1, 5, 48, 48))
    labels = labels_like(small_plate.image, data)
    assert labels.name == "labels" and labels.dtype == np.int32 and isinstance(labels.data, da.Array)
    assert list(labels["treatment"].values) == list(small_plate.image["treatment"].values)
    assert labels.attrs["plate"] == "synthetic"
    with pytest.raises(LabelsError, match=r"the plate needs \(well, site, z, y, x\) = \(4, 2, 5, 48, 48\)"):
        labels_like(small_plate.image, data[:, :, :4])
    with pytest.raises(LabelsError, match="dtype float32"):
        labels_like(small_plate.image, data.astype(np.float32))


def test_plate_dataarray_rejects_wrong_rank():
    with pytest.raises(PlateLayoutError, match="expected an array with dims"):
        plate_dataarray(np.zeros((2, 3, 4)), wells=["A01", "A02"], channels=["DNA"])
    da_ok = plate_dataarray(np.zeros((1, 1, 1, 2, 3, 4)), wells=["a1"], channels=["DNA"], plate="P")
    assert isinstance(da_ok, xr.DataArray) and da_ok["well"].item() == "A01"


def test_write_labels_reads_back_and_info_calls_it_finished(written, small_plate, tmp_path, capsys):
    from gradcamo_dask import describe_labels, write_labels
    from gradcamo_dask.cli import main
    from gradcamo_dask.errors import OutputStoreError

    image = open_plate(written)
    labels = open_labels(written, like=image)
    out = tmp_path / "labels.zarr"
    assert write_labels(out, labels) == str(out)
    back = open_labels(out, like=image)  # wells, sites and grid match the plate
    np.testing.assert_array_equal(back.values, labels.values)
    assert back.dtype == np.int32 and list(back["well"].values) == list(labels["well"].values)
    with pytest.raises(OutputStoreError, match="exists"):
        write_labels(out, labels)
    info = describe_labels(out)
    assert info["kind"] == "labels" and info["complete"] is True and info["wells"] == list(labels["well"].values)
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "kind: labels" in text and "complete: True" in text and "did not finish" not in text
    # a write that never ran (store created, data and attributes not) is not finished
    pending = write_labels(tmp_path / "pending.zarr", labels, compute=False)
    assert describe_labels(tmp_path / "pending.zarr")["complete"] is False
    pending.compute()
    assert describe_labels(tmp_path / "pending.zarr")["complete"] is True
    assert describe_labels(written) is None  # an OME-Zarr plate is not a labels store
