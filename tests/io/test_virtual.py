"""The virtual plate of real size: laziness, determinism, a cell table equal to a real pass, planning figures."""

from __future__ import annotations

import json
import time

import dask
import numpy as np
import pandas as pd
import pytest

from gradcamo_dask import InputError
from gradcamo_dask.cells import cell_table
from gradcamo_dask.io.virtual import VirtualPlate, plate_wells
from tests.helpers.paths import REPO

SMALL = dict(n_wells=3, n_sites=2, shape_zyx=(7, 200, 240))


def test_real_size_plate_opens_lazily_in_seconds():
    start = time.perf_counter()
    plate = VirtualPlate()
    image, labels = plate.image(), plate.labels()
    seconds = time.perf_counter() - start
    assert image.sizes == {"well": 384, "site": 9, "c": 6, "z": 21, "y": 2160, "x": 2160}
    assert labels.sizes == {"well": 384, "site": 9, "z": 21, "y": 2160, "x": 2160}
    assert image.dtype == np.uint16 and labels.dtype == np.int32
    assert image.nbytes > 4e12  # about 4 TB of pixels, none of them made
    assert image.data.npartitions == 384 * 9 and labels.data.npartitions == 384 * 9
    assert list(image["well"].values[[0, 23, 24, 383]]) == ["A01", "A24", "B01", "P24"]
    assert set(image["treatment"].values) == {"control", "compound_10uM"}
    assert seconds < 10, seconds


def test_sites_are_deterministic_and_differ_between_sites():
    plate = VirtualPlate(**SMALL)
    a, b = plate.site_image(1, 0), VirtualPlate(**SMALL).site_image(1, 0)
    assert a.shape == (6, 7, 200, 240) and np.array_equal(a, b)
    assert not np.array_equal(plate.site_labels(1, 0), plate.site_labels(1, 1))
    inside = plate.site_labels(1, 0) > 0
    assert a[0][inside].mean() > a[0][~inside].mean() + 1000  # cells are brighter than the background
    lazy = plate.image().isel(well=1, site=0).values
    assert np.array_equal(lazy, a)


def test_geometry_cell_table_equals_a_real_pass_over_the_labels():
    plate = VirtualPlate(**SMALL)
    with dask.config.set(scheduler="sync"):
        real = cell_table(plate.labels(), size=(None, 64, 64))
    expected = plate.cell_table(size=(None, 64, 64))
    assert len(real) > 30 and real["crop_padded"].any() and not real["crop_padded"].all()
    pd.testing.assert_frame_equal(real, expected)


def test_full_size_site_has_about_a_thousand_cells():
    cells = VirtualPlate().site_cells(0, 0)
    assert 900 <= len(cells) <= 1100


def test_bad_plates_are_refused():
    with pytest.raises(InputError, match="384"):
        plate_wells(385)
    with pytest.raises(InputError, match="pixels"):
        VirtualPlate(shape_zyx=(21, 32, 32))


def test_bench_scale_quick_plans_with_tasks_linear_in_sites(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))
    from benchmarks.bench_scale import main

    assert main(["--quick", "--part", "plan", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "bench_scale_plan_quick.json").read_text())
    rows = result["planning"]
    assert [r["sites"] for r in rows] == [4, 8, 16]
    per_site = [r["write_tasks"] / r["sites"] for r in rows]
    # a fixed number of tasks per site plus a few per write chunk: linear, no per-cell tasks
    assert max(per_site) - min(per_site) < 0.5 and max(per_site) < 15, per_site
    assert all(r["write_tasks"] < r["cells"] for r in rows)
    assert all(r["scheduler_tasks"] >= r["sites"] for r in rows)
    cost = result["cell_table_cost"]
    assert cost["pass_s_per_site"] > 0 and cost["plate_pass_s_1_core"] == pytest.approx(
        cost["pass_s_per_site"] * 16, rel=0.01, abs=0.1)  # both rounded in the JSON
    assert (tmp_path / "bench_scale_plan_quick.md").read_text().count("| 4 x") == 3
    assert (tmp_path / "bench_scale_plan_quick.png").stat().st_size > 1000
