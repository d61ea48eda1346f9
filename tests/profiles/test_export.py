"""Per-object CellProfiler-style tables: naming, files, pycytominer without options, beside real CellProfiler output."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from gradcamo_dask import InputError, cellprofiler_table
from gradcamo_dask.profiles.export import to_cellprofiler_table
from gradcamo_dask.profiles.export import QC_BELOW, QC_UNDEFINED, cellprofiler_name
from tests.helpers.feature_profiles import LAYERS, WIDTHS, make_profiles, synthetic_cells

KEYS = ["Metadata_Plate", "Metadata_Well", "Metadata_Site", "Metadata_ObjectNumber"]


@pytest.fixture(scope="module")
def profiles():
    return make_profiles(synthetic_cells(n_wells=4, sites=2, cells_per_site=12), classic=True, n_undefined=4)


@pytest.fixture(scope="module")
def written(profiles, tmp_path_factory):
    return to_cellprofiler_table(profiles, tmp_path_factory.mktemp("export") / "cells.parquet")


def test_layer_and_model_names_are_one_camelcase_token():
    assert cellprofiler_name("_head_swish") == "HeadSwish"
    assert cellprofiler_name("_blocks.4.8") == "Blocks4x8"
    assert cellprofiler_name("_blocks.10") == "Blocks10"
    assert cellprofiler_name("efficientnet3d") == "Efficientnet3D"
    with pytest.raises(InputError):
        cellprofiler_name("..")


def test_columns_follow_cellprofiler_naming(profiles):
    table = cellprofiler_table(profiles, model_name="EfficientNet3D")
    n = profiles.sizes["cell"]
    assert len(table) == n and list(table.columns[:4]) == KEYS
    assert not table[KEYS].duplicated().any()  # the four keys identify a cell
    assert table["Metadata_Well"].tolist() == profiles["well"].values.tolist()
    assert table["Metadata_ObjectNumber"].dtype == np.int64 and table["Metadata_Site"].dtype == np.int64
    np.testing.assert_array_equal(table["Cells_Location_Center_X"], profiles["center_x"].values)
    np.testing.assert_array_equal(table["Cells_Location_Center_Z"], profiles["center_z"].values)
    assert {"Metadata_treatment", "Metadata_dose", "Metadata_is_control", "Metadata_volume_voxels"} <= set(table)
    # classic
    np.testing.assert_array_equal(table["Cells_AreaShape_Volume"], profiles["classic"].sel(
        classic_feature="AreaShape_Volume").values)
    assert "Cells_Intensity_MeanIntensity_DNA" in table and "Cells_Granularity_1_DNA" in table
    # deep: Cells_<Model>_<Layer>_<i>, values in the same order as the dataset's features
    deep = [c for c in table if c.startswith("Cells_EfficientNet3D_")]
    assert len(deep) == sum(WIDTHS.values())
    assert deep[0] == "Cells_EfficientNet3D_Blocks10_0" and "Cells_EfficientNet3D_HeadSwish_19" in deep
    np.testing.assert_array_equal(table[deep].to_numpy(), profiles["deep"].values)
    assert all(len(c.split("_")) == 4 for c in deep)  # compartment_model_layer_index: no stray underscores
    # Grad-CAMO is metadata, for the first layer by default; NaN stays NaN
    score = profiles["gradcamo"].sel(layer=LAYERS[0]).values
    np.testing.assert_array_equal(table["Metadata_GradCAMO"], score)
    assert table["Metadata_GradCAMO"].isna().sum() == 4
    assert (table["Metadata_GradCAMO_Layer"] == LAYERS[0]).all()
    np.testing.assert_array_equal(table["Metadata_GradCAMO_HeadSwish"], profiles["gradcamo"].sel(layer=LAYERS[1]))
    assert not any(c.startswith("Cells_") and "GradCAMO" in c for c in table)
    # QC flags: below cut-off and undefined are separate and exclusive
    assert table[QC_UNDEFINED].tolist() == np.isnan(score).tolist()
    assert table[QC_BELOW].tolist() == [bool(s < 0.25) for s in np.nan_to_num(score, nan=1.0)]
    assert not (table[QC_BELOW] & table[QC_UNDEFINED]).any()
    # model outputs
    classes = profiles["class"].values
    assert table["Metadata_Predicted"].tolist() == classes[profiles["predicted"].values].tolist()
    assert f"Metadata_Logit_{classes[0]}" in table
    # another layer and cut-off
    other = cellprofiler_table(profiles, layer=LAYERS[1], cutoff=0.5)
    assert other[QC_BELOW].sum() == int((profiles["gradcamo"].sel(layer=LAYERS[1]).values < 0.5).sum())
    with pytest.raises(InputError, match="no Grad-CAMO scores"):
        cellprofiler_table(profiles, layer="_blocks.3")


def test_model_name_from_provenance_and_profiles_without_scores(profiles, tmp_path):
    table = cellprofiler_table(profiles)  # provenance bundle.architecture = "efficientnet3d"
    assert "Cells_Efficientnet3D_HeadSwish_0" in table
    # score_plate's layout: a 'cell' index coord and flat provenance with the bundle config's model name
    scored = profiles.assign_coords(cell=np.arange(profiles.sizes["cell"]))
    scored.attrs["provenance"] = json.dumps({"model_name": "efficientnet3d", "bundle_path": "somewhere/else",
                                             "plate": "P1", "layers": list(LAYERS)})
    table = cellprofiler_table(scored)
    assert "Cells_Efficientnet3D_HeadSwish_0" in table and "Metadata_cell" not in table
    assert list(table.columns) == list(cellprofiler_table(profiles).columns)
    # a path is never read: a readable bundle whose config names another model changes nothing
    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "config.json").write_text(json.dumps({"architecture": {"name": "othernet"}}))
    scored.attrs["provenance"] = json.dumps({"bundle_path": str(tmp_path / "bundle")})  # no model name stored
    assert "Cells_Deep_HeadSwish_0" in cellprofiler_table(scored)
    bare = profiles.drop_vars(["gradcamo", "cam_inside", "cam_total"])
    table = cellprofiler_table(bare)
    assert "Metadata_GradCAMO" not in table and QC_BELOW not in table
    assert len(table) == profiles.sizes["cell"]


def test_a_store_exports_the_same_names_from_any_working_folder(tmp_path, monkeypatch):
    from gradcamo_dask import open_plate, open_labels, open_profiles, score_plate, write_profiles
    from tests.helpers.tiny_plate import write_tiny_plate_and_bundle

    work = tmp_path / "project"
    write_tiny_plate_and_bundle(work)
    monkeypatch.chdir(work)  # the bundle is named relative to this folder, as a user types it
    image = open_plate("plate.zarr")
    write_profiles(score_plate(image, open_labels("plate.zarr", like=image), "bundle"),
                   "profiles.zarr")
    store = work / "profiles.zarr"
    provenance = json.loads(open_profiles(store).attrs["provenance"])
    assert provenance["model_name"] == "efficientnet3d"
    assert provenance["bundle_path"] == "bundle"  # relative: reading it would depend on the working folder
    names = {}
    for where in (work, tmp_path / "elsewhere", work / "bundle"):
        where.mkdir(exist_ok=True)
        monkeypatch.chdir(where)
        names[where] = [c for c in cellprofiler_table(open_profiles(store)) if c.startswith("Cells_")]
    first = next(iter(names.values()))
    assert first and all(c.startswith("Cells_Efficientnet3D_") for c in first if not c.startswith("Cells_Location"))
    assert all(n == first for n in names.values())


def test_parquet_and_csv_round_trip(profiles, written):
    assert set(written) == {"parquet", "csv"} and all(p.stat().st_size > 0 for p in written.values())
    assert written["csv"].name == "cells.csv" and written["parquet"].name == "cells.parquet"
    expected = cellprofiler_table(profiles)
    parquet = pd.read_parquet(written["parquet"])
    pd.testing.assert_frame_equal(parquet, expected)
    csv = pd.read_csv(written["csv"])
    assert list(csv.columns) == list(expected.columns)
    assert csv[QC_BELOW].dtype == bool and csv[QC_UNDEFINED].dtype == bool  # readable as flags
    np.testing.assert_allclose(csv["Metadata_GradCAMO"], expected["Metadata_GradCAMO"], equal_nan=True)
    meta = json.loads(pq.read_schema(written["parquet"]).metadata[b"gradcamo_dask"])
    assert meta["export"]["cutoff"] == 0.25 and meta["provenance"]["layers"] == list(LAYERS)
    assert not list(written["csv"].parent.glob("*.partial"))


def test_pycytominer_runs_on_the_export_without_options(written, profiles):
    from pycytominer import aggregate, feature_select, normalize
    from pycytominer.cyto_utils import infer_cp_features, load_profiles

    for path in written.values():
        table = load_profiles(str(path))
        features = infer_cp_features(table)
        assert "Cells_AreaShape_Volume" in features and "Cells_Efficientnet3D_HeadSwish_0" in features
        assert not any(f.startswith("Metadata_") for f in features)
        assert "Metadata_GradCAMO" in infer_cp_features(table, metadata=True)

        wells = aggregate(table, features="infer")
        assert len(wells) == table["Metadata_Well"].nunique() == 4
        first = wells.set_index("Metadata_Well").loc["B02", "Cells_AreaShape_Volume"]
        assert first == pytest.approx(table.loc[table.Metadata_Well == "B02", "Cells_AreaShape_Volume"].median())

        normalized = normalize(table, features="infer", samples="Metadata_is_control == True")
        controls = normalized[normalized["Metadata_is_control"]]
        assert controls["Cells_Efficientnet3D_HeadSwish_3"].mean() == pytest.approx(0, abs=1e-6)
        assert controls["Cells_Efficientnet3D_HeadSwish_3"].std(ddof=0) == pytest.approx(1, rel=1e-4)

        selected = feature_select(table, features="infer")
        assert set(KEYS) <= set(selected.columns) and len(selected) == len(table)
        assert "Cells_Efficientnet3D_HeadSwish_0" in selected  # informative deep features survive

    # pycytominer's own QC option drops the flagged rows: below the cut-off and undefined
    table = load_profiles(str(written["parquet"]))
    kept = normalize(table, features="infer", drop_cosmicqc_rows=True)
    score = profiles["gradcamo"].sel(layer=LAYERS[0]).values
    assert len(kept) == int((score >= 0.25).sum()) < len(table)
    assert (kept["Metadata_GradCAMO"] >= 0.25).all()


def test_export_stands_beside_a_real_cellprofiler_table(real_data, written):
    from pycytominer import aggregate
    from pycytominer.cyto_utils import infer_cp_features

    folder = real_data / "cellprofiler_jump_BR00116991_A01_1"
    cells = pd.read_csv(folder / "Cells.csv")
    image = pd.read_csv(folder / "Image.csv", usecols=["ImageNumber", "Metadata_Plate", "Metadata_Well",
                                                        "Metadata_Site"])
    # the usual single-cell assembly (as CytoTable does): image metadata joined on ImageNumber,
    # compartment prefix on the measurements, ObjectNumber as metadata
    real = cells.merge(image, on="ImageNumber", validate="many_to_one")
    real = real.rename(columns={"ObjectNumber": "Metadata_ObjectNumber", "ImageNumber": "Metadata_ImageNumber"})
    real = real.rename(columns={c: f"Cells_{c}" for c in real.columns if not c.startswith("Metadata_")})
    ours = pd.read_parquet(written["parquet"])
    for key in KEYS:  # same merge keys, compatible types
        assert key in real and key in ours
        assert real[key].dtype.kind == ours[key].dtype.kind or {real[key].dtype.kind, ours[key].dtype.kind} <= {"O", "U"}
    both = pd.concat([real, ours], ignore_index=True)
    assert not both[KEYS].duplicated().any()
    shared = set(infer_cp_features(real)) & set(infer_cp_features(ours))
    assert {"Cells_Location_Center_X", "Cells_Location_Center_Y", "Cells_Location_Center_Z",
            "Cells_Intensity_MeanIntensity_DNA", "Cells_Granularity_1_DNA"} <= shared
    # one pycytominer call over both, keyed the same way
    wells = aggregate(both[[*KEYS, *sorted(shared)]], features="infer")
    assert set(wells["Metadata_Plate"]) == {"BR00116991", "P1"}
    assert len(wells) == 1 + ours["Metadata_Well"].nunique()
    # joining per-object tables on the keys works row for row
    joined = ours[KEYS + ["Metadata_GradCAMO"]].merge(both, on=KEYS, how="inner", validate="one_to_one")
    assert len(joined) == len(ours)
