"""Every snippet of the README's "Using the results elsewhere" runs as it is, on a store the pipeline wrote."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from tests.helpers.paths import REPO

SNIPPET = re.compile(r"<!-- snippet: (\w+) -->\n```python\n(.*?)```", re.S)
SNIPPETS = dict(SNIPPET.findall((REPO / "README.md").read_text()))
COSMICQC_PYTHON = os.environ.get("GRADCAMO_COSMICQC_PYTHON")  # an interpreter where coSMicQC imports


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A tiny plate (2 wells x 2 sites) scored by the pipeline with classic features: ``profiles.zarr``."""
    from gradcamo_dask import open_labels, open_plate, score_plate, write_profiles
    from tests.helpers.tiny_plate import write_tiny_plate_and_bundle

    work = tmp_path_factory.mktemp("snippets")
    paths = write_tiny_plate_and_bundle(work)
    image = open_plate(paths["plate"])
    write_profiles(score_plate(image, open_labels(paths["plate"], like=image), paths["bundle"], classic=True),
                   work / "profiles.zarr")
    return work / "profiles.zarr"


@pytest.fixture
def folder(store, tmp_path, monkeypatch):
    (tmp_path / "profiles.zarr").symlink_to(store)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))  # install_duckdb_extensions writes under ~/.duckdb
    return tmp_path


def run(name: str) -> tuple[dict, str]:
    namespace: dict = {"__name__": f"readme_{name}"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(SNIPPETS[name], f"README.md:{name}", "exec"), namespace)
    return namespace, out.getvalue()


def test_the_readme_has_the_five_snippets():
    assert list(SNIPPETS) == ["xarray", "pandas", "pycytominer", "cytotable", "cosmicqc"]


def test_xarray_snippet(folder):
    ns, out = run("xarray")
    n = ns["ds"].sizes["cell"]
    expected = int((ns["score"].values >= 0.25).sum())
    assert out.startswith(f"{expected} of {n} cells on target") and ns["on_target"].sizes["cell"] == expected
    assert ns["by_well"].dims == ("well", "feature") and ns["by_well"].sizes["well"] == 2


def test_pandas_snippet(folder):
    ns, out = run("pandas")
    table = ns["table"]
    assert "Metadata_Well" in out and len(table) == ns["table"]["Metadata_ObjectNumber"].size > 0
    assert (folder / "cells.parquet").is_file() and (folder / "cells.csv").is_file()
    pd.testing.assert_frame_equal(pd.read_parquet(folder / "cells.parquet"), table)


def test_pycytominer_snippet(folder):
    from pycytominer.cyto_utils import infer_cp_features

    ns, out = run("pycytominer")
    table, normalized, wells, passed = ns["table"], ns["normalized"], ns["wells"], ns["passed"]
    assert len(normalized) == len(table) and "Metadata_GradCAMO" in normalized
    assert not [f for f in infer_cp_features(normalized) if "GradCAMO" in f or "cqc" in f]
    assert len(wells) == table["Metadata_Well"].nunique() == 2 and str(wells.shape) in out
    assert len(ns["selected"].columns) < len(normalized.columns)
    assert len(passed) == int((table["Metadata_GradCAMO"] >= 0.25).sum())  # flagged cells left out


def test_cytotable_snippet(folder):
    from pycytominer.cyto_utils import infer_cp_features

    ns, _ = run("cytotable")
    converted = pd.read_parquet(ns["cells"])
    table = ns["open_profiles"]("profiles.zarr")
    assert len(converted) == table.sizes["cell"]
    assert {"Metadata_GradCAMO", "Metadata_cqc_gradcamo_below_cutoff", "Cells_AreaShape_Volume"} <= set(converted)
    assert not [f for f in infer_cp_features(converted) if "GradCAMO" in f or "cqc" in f]
    assert sorted(converted["Metadata_Site"].unique()) == [1, 2]  # CellProfiler's 1-based fields


def _check_cosmicqc(folder, labelled: pd.DataFrame, kept: pd.DataFrame) -> None:
    from gradcamo_dask import cellprofiler_table, open_profiles
    from gradcamo_dask.profiles.outliers import CELL_THRESHOLDS_3D

    table = cellprofiler_table(open_profiles(folder / "profiles.zarr"))
    for condition in CELL_THRESHOLDS_3D:
        assert labelled[f"Metadata_cqc_{condition}_is_outlier"].dtype == bool
    for flag in ("Metadata_cqc_gradcamo_below_cutoff", "Metadata_cqc_gradcamo_undefined"):
        np.testing.assert_array_equal(labelled[flag].to_numpy(), table[flag].to_numpy())  # kept as they were
    flags = [c for c in labelled if c.startswith("Metadata_cqc_") and c.endswith(("_is_outlier", "_cutoff", "_undefined"))
             and c != "Metadata_cqc_any_is_outlier"]
    np.testing.assert_array_equal(labelled["Metadata_cqc_any_is_outlier"], labelled[flags].any(axis=1))
    assert len(kept) == int((~labelled["Metadata_cqc_any_is_outlier"]).sum())
    assert not kept.filter(like="Metadata_cqc_").select_dtypes(bool).any().any()


def test_cosmicqc_snippet(folder):
    if importlib.util.find_spec("cosmicqc") is not None:
        ns, _ = run("cosmicqc")
        _check_cosmicqc(folder, ns["labelled"], ns["kept"])
        return
    if not COSMICQC_PYTHON:
        pytest.skip("coSMicQC is not importable here (it pins pandas<3, pyarrow<23); set GRADCAMO_COSMICQC_PYTHON "
                    "to an interpreter where it is to run this snippet")
    code = SNIPPETS["cosmicqc"] + '\nlabelled.to_parquet("labelled.parquet")\nkept.to_parquet("kept.parquet")\n'
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([COSMICQC_PYTHON, "-c", code], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    _check_cosmicqc(folder, pd.read_parquet(folder / "labelled.parquet"), pd.read_parquet(folder / "kept.parquet"))


def test_without_cosmicqc_the_function_says_what_to_do(folder, monkeypatch):
    from gradcamo_dask import InputError, cellprofiler_table, label_outliers_with_gradcamo, open_profiles

    monkeypatch.setitem(sys.modules, "cosmicqc", None)  # as on a machine without it
    table = cellprofiler_table(open_profiles("profiles.zarr"))
    with pytest.raises(InputError, match=r"pip install coSMicQC .*pandas is < 3"):
        label_outliers_with_gradcamo(table)
