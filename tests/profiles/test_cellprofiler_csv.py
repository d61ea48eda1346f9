"""CellProfiler's per-compartment layout (Image.csv, Cells.csv) through real CytoTable and pycytominer."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pandas as pd
import pytest

from gradcamo_dask import OutputStoreError, cellprofiler_table, cytotable_options, write_cellprofiler_csv
from gradcamo_dask.profiles.cellprofiler_csv import install_duckdb_extensions
from gradcamo_dask.profiles.export import QC_BELOW, QC_UNDEFINED
from tests.helpers.feature_profiles import LAYERS, make_profiles, synthetic_cells

QC = ["Metadata_GradCAMO", "Metadata_GradCAMO_CAMInside", "Metadata_GradCAMO_CAMTotal", QC_BELOW, QC_UNDEFINED]


def run_cytotable(source, dest, home, run_dir):
    """cytotable.convert with the layout's options, offline (extensions from PyPI) and on threads."""
    import cytotable
    import parsl
    from parsl.executors import ThreadPoolExecutor

    install_duckdb_extensions(home)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(home))  # DuckDB looks for its extensions under ~/.duckdb
        config = parsl.Config(executors=[ThreadPoolExecutor(max_threads=2, label="tests")], run_dir=str(run_dir))
        out = cytotable.convert(source_path=str(source), dest_path=str(dest), dest_datatype="parquet",
                                parsl_config=config, **cytotable_options(source))
    return pd.read_parquet(out)


@pytest.fixture(scope="module")
def profiles():
    return make_profiles(synthetic_cells(n_wells=4, sites=2, cells_per_site=12), classic=True, n_undefined=4)


@pytest.fixture(scope="module")
def folder(profiles, tmp_path_factory):
    out = tmp_path_factory.mktemp("cp") / "cellprofiler"
    write_cellprofiler_csv(profiles, out)
    return out


@pytest.fixture(scope="module")
def converted(folder, tmp_path_factory):
    work = tmp_path_factory.mktemp("cytotable")
    return run_cytotable(folder, work / "cells.parquet", work, work / "runinfo")


def test_layout_is_cellprofilers_image_and_cells_tables(profiles, folder, real_data):
    assert sorted(p.name for p in folder.iterdir()) == ["Cells.csv", "Image.csv"]
    image = pd.read_csv(folder / "Image.csv")
    cells = pd.read_csv(folder / "Cells.csv")
    joined = cellprofiler_table(profiles)
    # one Image row per site, numbered 1.. in store order, 1-based fields, counts that add up
    assert image["ImageNumber"].tolist() == list(range(1, 9))
    assert image["Metadata_Site"].tolist() == [1, 2] * 4  # the store's sites 0 and 1
    assert image["Metadata_Well"].tolist() == ["B02", "B02", "B03", "B03", "B04", "B04", "B05", "B05"]
    assert image["Count_Cells"].sum() == len(cells) == profiles.sizes["cell"]
    assert {"Metadata_treatment", "Metadata_dose", "Metadata_is_control"} <= set(image)  # platemap: per image
    assert "Metadata_treatment" not in cells and "Metadata_volume_voxels" in cells  # geometry: per object
    # Cells: keyed by ImageNumber/ObjectNumber, measurements without the compartment prefix
    assert list(cells.columns[:3]) == ["ImageNumber", "ObjectNumber", "Number_Object_Number"]
    assert not cells[["ImageNumber", "ObjectNumber"]].duplicated().any()
    assert not any(c.startswith("Cells_") for c in cells)
    np.testing.assert_array_equal(cells["ObjectNumber"], joined["Metadata_ObjectNumber"])
    np.testing.assert_allclose(cells["AreaShape_Volume"], joined["Cells_AreaShape_Volume"])
    np.testing.assert_allclose(cells["Efficientnet3D_HeadSwish_3"], joined["Cells_Efficientnet3D_HeadSwish_3"],
                               rtol=1e-6)
    np.testing.assert_allclose(cells["Metadata_GradCAMO"], joined["Metadata_GradCAMO"], equal_nan=True)
    assert cells[QC_UNDEFINED].sum() == 4 and cells[QC_BELOW].dtype == bool
    # the same key and measurement names as a real CellProfiler export
    real = real_data / "cellprofiler_jump_BR00116991_A01_1"
    with open(real / "Cells.csv", newline="") as f:
        real_cells = set(next(csv.reader(f)))
    with open(real / "Image.csv", newline="") as f:
        real_image = set(next(csv.reader(f)))
    assert {"ImageNumber", "ObjectNumber", "Number_Object_Number", "Location_Center_X", "Location_Center_Y",
            "Intensity_MeanIntensity_DNA", "Granularity_1_DNA"} <= real_cells & set(cells)
    assert {"ImageNumber", "Metadata_Plate", "Metadata_Well", "Metadata_Site", "Count_Cells"} <= real_image & set(image)
    assert pd.read_csv(real / "Image.csv", usecols=["Metadata_Site"])["Metadata_Site"].min() == 1  # 1-based there too


def test_existing_tables_are_never_replaced(profiles, folder):
    before = (folder / "Cells.csv").stat().st_mtime_ns
    with pytest.raises(OutputStoreError, match="already exist"):
        write_cellprofiler_csv(profiles, folder)
    assert (folder / "Cells.csv").stat().st_mtime_ns == before


def test_cytotable_preset_reads_the_folder_and_keeps_gradcamo_as_metadata(profiles, folder, converted):
    from pycytominer.cyto_utils import infer_cp_features

    joined = cellprofiler_table(profiles).assign(Metadata_Site=lambda t: t["Metadata_Site"] + 1)
    keys = ["Metadata_Plate", "Metadata_Well", "Metadata_Site", "Metadata_ObjectNumber"]
    assert len(converted) == len(joined) and not converted[keys].duplicated().any()
    features = infer_cp_features(converted)
    assert set(features) >= {"Cells_AreaShape_Volume", "Cells_Location_Center_X", "Cells_Efficientnet3D_HeadSwish_0"}
    assert not [f for f in features if "GradCAMO" in f or "cqc" in f or "Logit" in f or "Predicted" in f]
    assert not [c for c in converted if c.startswith("Cells_Metadata_") or c.startswith("Image_Metadata_")]
    merged = joined[keys + QC].merge(converted[keys + QC], on=keys, suffixes=("", "_ct"), validate="one_to_one")
    assert len(merged) == len(joined)
    for column in QC:
        np.testing.assert_array_equal(merged[column].to_numpy(float), merged[f"{column}_ct"].to_numpy(float))
    ours = joined.set_index(keys)["Cells_Efficientnet3D_Blocks10_5"]
    theirs = converted.set_index(keys)["Cells_Efficientnet3D_Blocks10_5"].reindex(ours.index)
    np.testing.assert_allclose(theirs, ours, rtol=1e-6)


def test_pycytominer_annotate_normalize_feature_select_after_cytotable(profiles, converted):
    from pycytominer import annotate, feature_select, normalize
    from pycytominer.cyto_utils import infer_cp_features

    platemap = pd.DataFrame({"well_position": ["B02", "B03", "B04", "B05"], "batch": ["b1", "b1", "b2", "b2"]})
    keys = ["Metadata_Well", "Metadata_Site", "Metadata_ObjectNumber"]
    reference = converted.set_index(keys)[QC]
    annotated = annotate(converted, platemap, join_on=["Metadata_well_position", "Metadata_Well"])
    normalized = normalize(annotated, features="infer", samples="Metadata_is_control == True")
    selected = feature_select(normalized, features="infer", operation=["variance_threshold", "correlation_threshold"])
    for step, table in (("annotate", annotated), ("normalize", normalized), ("feature_select", selected)):
        assert set(QC) <= set(table), step
        assert not set(QC) & set(infer_cp_features(table)), step  # never a feature
        assert "Metadata_batch" in table, step
        again = table.set_index(keys)[QC].reindex(reference.index)
        for column in QC:  # values untouched by every step
            np.testing.assert_array_equal(again[column].to_numpy(float), reference[column].to_numpy(float))
    controls = normalized[normalized["Metadata_is_control"]]
    assert controls["Cells_Efficientnet3D_HeadSwish_3"].mean() == pytest.approx(0, abs=1e-6)
    assert len(selected.columns) < len(normalized.columns)  # feature_select did select
    # pycytominer's coSMicQC option drops the rows our flags mark: below the cut-off and undefined
    kept = normalize(annotated, features="infer", drop_cosmicqc_rows=True)
    score = profiles["gradcamo"].sel(layer=LAYERS[0]).values
    assert len(kept) == int((score >= 0.25).sum()) and (kept["Metadata_GradCAMO"] >= 0.25).all()


def test_the_same_options_read_a_real_cellprofiler_folder(real_data, tmp_path):
    source = tmp_path / "real"
    shutil.copytree(real_data / "cellprofiler_jump_BR00116991_A01_1", source)  # never touch the input
    real = run_cytotable(source, tmp_path / "real.parquet", tmp_path, tmp_path / "runinfo")
    cells = pd.read_csv(source / "Cells.csv", usecols=["ObjectNumber", "AreaShape_Area"])
    assert len(real) == len(cells)
    assert real["Metadata_Plate"].unique().tolist() == ["BR00116991"] and real["Metadata_Site"].unique().tolist() == [1]
    np.testing.assert_allclose(real.sort_values("Metadata_ObjectNumber")["Cells_AreaShape_Area"],
                               cells.sort_values("ObjectNumber")["AreaShape_Area"])
