"""The region split of diagnose_regions: its regions partition a crop, and its quick mode runs end to end."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from tests.helpers.paths import REPO


def _module():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import diagnose_regions
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return diagnose_regions


def test_regions_partition_the_crop_and_sit_where_named():
    dr = _module()
    labels = np.zeros((4, 32, 32), np.int32)
    labels[1:3, 12:20, 12:20] = 1  # the cell, slices 1-2
    labels[:, 0:6, 26:32] = 2  # another cell in a corner
    inside = np.ones(labels.shape, bool)
    inside[:, 29:, :] = False  # the window runs 3 rows past the site there
    regions = dr.crop_regions(labels == 1, labels, inside)
    assert list(regions) == list(dr.REGIONS)
    count = sum(r.astype(int) for r in regions.values())
    assert (count == 1).all()  # every voxel in exactly one region
    assert regions["cell"][1, 15, 15] and regions["halo_2px"][1, 15, 21] and regions["halo_2_4px"][1, 15, 23]
    assert regions["footprint_other_slices"][0, 15, 15] and regions["footprint_other_slices"][3, 15, 15]
    assert regions["other_cells"][0, 2, 30] and regions["border_4px"][2, 28, 10] and regions["rest"][2, 6, 6]
    assert regions["outside_site"][2, 31, 10] and regions["outside_site"].sum() == 4 * 3 * 32
    # a map that is 3x as dense on the cell as everywhere else
    maps = np.where(labels == 1, 3.0, 1.0)[None]
    split = dr.region_split(maps, (labels == 1)[None], labels[None], inside[None])
    assert sum(split["map"].values()) == pytest.approx(1.0) and sum(split["crop"].values()) == pytest.approx(1.0)
    assert split["map"]["cell"] / split["crop"]["cell"] > 2 * split["map"]["rest"] / split["crop"]["rest"]
    assert split["z_mask"] == [0.0, 0.5, 0.5, 0.0] and split["z_map"][1] > split["z_map"][0]
    assert split["by_padding"]["padded"]["cells"] == 1 and split["by_padding"]["not_padded"]["cells"] == 0
    assert split["by_padding"]["padded"]["gradcamo"] == pytest.approx(split["map"]["cell"])


def test_site_voxels_marks_what_runs_past_the_site():
    import pandas as pd

    dr = _module()
    table = pd.DataFrame({"center_z": [5, 5], "center_y": [10, 60], "center_x": [60, 60]})
    inside = dr.site_voxels(table, (6, 48, 48), (12, 128, 128))
    assert inside.shape == (2, 6, 48, 48) and inside[1].all()
    assert not inside[0, :, :14].any() and inside[0, :, 14:].all()  # the window starts 14 rows above the site


def test_quick_mode_writes_a_report(tmp_path):
    dr = _module()
    assert dr.main(["--quick", "--workers", "1", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "diagnose_regions_quick.json").read_text())
    layers = report["seeds"]["0"]["layers"]
    assert set(layers) == set(dr.LAYERS)
    for maps in layers.values():
        for v in maps.values():  # gradcam and hirescam
            assert v["cells"] > 0
            assert sum(v["map"].values()) == pytest.approx(1.0, abs=1e-6)
            assert sum(v["crop"].values()) == pytest.approx(1.0, abs=1e-6)
            assert sum(v["z_map"]) == pytest.approx(1.0, abs=1e-3) and sum(v["z_mask"]) == pytest.approx(1.0, abs=1e-3)
            assert sum(g["cells"] for g in v["by_padding"].values()) == v["cells"]
    accuracy = report["seeds"]["0"]["accuracy"]
    assert accuracy["padded"]["cells"] + accuracy["not_padded"]["cells"] == accuracy["all"]["cells"] > 0
    assert 0 <= accuracy["all"]["accuracy"] <= 1
    assert "| 0 | _blocks.0.0 | gradcam |" in (tmp_path / "diagnose_regions_quick.md").read_text()
    # the background fill and a larger site reach the training recipe and the report
    assert dr.main(["--quick", "--workers", "1", "--out", str(tmp_path), "--tag", "bg", "--crop-fill", "background",
                    "--site-yx", "160", "160"]) == 0
    report = json.loads((tmp_path / "diagnose_regions_quick_bg.json").read_text())
    assert report["settings"]["crop_fill"] == "background" and report["settings"]["site_shape"][1:] == [160, 160]
    assert report["seeds"]["0"]["crop_fill"] == "background"  # the bundle's, which cut the audited crops too
    assert "background fill past the site" in (tmp_path / "diagnose_regions_quick_bg.md").read_text()
    # the two fills side by side, per seed, from the two reports
    zero_json, bg_json = tmp_path / "diagnose_regions_quick.json", tmp_path / "diagnose_regions_quick_bg.json"
    assert dr.main(["--compare-fills", str(zero_json), str(bg_json), "--out", str(tmp_path), "--tag", "q"]) == 0
    table = (tmp_path / "diagnose_regions_fills_q.md").read_text()
    zero_acc = json.loads(zero_json.read_text())["seeds"]["0"]["accuracy"]["all"]["accuracy"]
    bg_acc = report["seeds"]["0"]["accuracy"]["all"]["accuracy"]
    assert f"| 0 | {zero_acc:.3f} / {bg_acc:.3f} |" in table
    rows = dr.fill_rows([json.loads(zero_json.read_text()), report])
    assert set(rows[0]) == {"zero", "background"} and rows[0]["background"]["accuracy"] == bg_acc


def test_accuracy_by_padding_resamples_crops_to_the_model_grid():
    """The model sees crops at its own grid (as explain gives them), and the split counts each group."""
    from types import SimpleNamespace

    import pandas as pd
    import torch

    dr = _module()

    class SeesItsGrid(torch.nn.Module):  # class 0 only for inputs at the 4 x 16 x 16 grid
        def forward(self, x):
            right = float(tuple(x.shape[2:]) == (4, 16, 16))
            return torch.tensor([[right, 1.0 - right]]).repeat(len(x), 1)

    bundle = SimpleNamespace(model=SeesItsGrid(), config=SimpleNamespace(classes=["a", "b"], input_shape=[4, 16, 16]))
    table = pd.DataFrame({"treatment": ["a", "a", "b"]})
    out = dr.accuracy_by_padding(bundle, torch.zeros(3, 2, 4, 8, 8), table, np.array([True, False, False]))
    assert out["all"] == {"cells": 3, "accuracy": pytest.approx(2 / 3)}
    assert out["padded"] == {"cells": 1, "accuracy": 1.0} and out["not_padded"]["accuracy"] == 0.5
