"""benchmarks/diagnose_maps.py: the map figures on maps built by hand, and the quick mode's report."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers.benchmark_modules import benchmark_module


@pytest.fixture(scope="module")
def diag():
    with benchmark_module("diagnose_maps") as module:
        yield module


def test_map_figures_on_known_maps(diag):
    masks = torch.zeros(2, 2, 4, 4, dtype=torch.bool)
    masks[:, :, :2, :2] = True  # a quarter of each crop
    pre = torch.full((2, 2, 4, 4), 1.0, dtype=torch.float64)
    pre[0, :, :2, :2] = 3.0  # cell 0: floor 1 everywhere plus 2 on the cell
    pre[1, :, 2:, 2:] = -1.0  # cell 1: 1 elsewhere, evidence against the class in one corner outside the cell
    g = pre.clamp(min=0)
    f = diag.map_figures(g[:1], pre[:1], masks[:1])
    assert f["uniform"] == pytest.approx(0.25)
    assert f["gradcamo"] == pytest.approx(12 / 24)  # 8 voxels x 3 / (8 x 3 + 24 x 1)
    assert f["floor_share"] == pytest.approx(32 / 48) and f["floor_free_gradcamo"] == pytest.approx(1.0)
    f = diag.map_figures(g[1:], pre[1:], masks[1:])
    assert f["negative_outside_share_of_negative"] == pytest.approx(1.0)
    assert f["negative_outside_share_of_all"] == pytest.approx(8 / 32)
    assert f["floor_share"] == 0.0 and f["gradcamo"] == pytest.approx(8 / 24)


def test_mass_split_on_known_maps(diag):
    masks = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    masks[0, 0, :2, :2] = True  # the cell: a quarter of the crop
    labels = torch.zeros(1, 1, 4, 4, dtype=torch.int64)
    labels[0, 0, :2, :2] = 7
    labels[0, 0, 2:, :2] = 8  # another cell: a quarter
    g = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    g[0, 0, :2, :2] = 2.0  # 8 on the cell
    g[0, 0, 2:, :2] = 1.0  # 4 on the other cell
    g[0, 0, 2:, 2:] = 1.0  # 4 on the background
    f = diag.mass_split(torch.cat([g, torch.zeros_like(g)]), masks.repeat(2, 1, 1, 1), labels.repeat(2, 1, 1, 1))
    assert f["cells_with_a_map"] == 1  # the all-zero map is left out
    assert (f["map_on_cell"], f["map_on_other_cells"], f["map_on_background"]) == pytest.approx((0.5, 0.25, 0.25))
    assert (f["crop_on_cell"], f["crop_on_other_cells"], f["crop_on_background"]) == pytest.approx((0.25, 0.25, 0.5))


def test_quick_mode_writes_every_model_and_layer(diag, tmp_path):
    assert diag.main(["--quick", "--workers", "1", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "diagnose_maps_quick.json").read_text())
    assert set(report["models"]) == {"in_cell", "off_cell", "start", "lambda_0", "lambda_3"}
    for layers in report["models"].values():
        assert set(layers) == set(diag.LAYERS)
        for f in layers.values():
            assert f["cells"] > 0 and 0 <= f["gradcamo"] <= 1 and 0 < f["uniform"] < 1
            assert 0 <= f["floor_share"] <= 1
    for name in ("in_cell", "off_cell"):  # the mosaic models: where each map's mass goes, both maps
        for f in report["models"][name].values():
            for method in ("gradcam", "hirescam"):
                v = f["split"][method]
                if v["cells_with_a_map"]:
                    assert sum(v[f"map_on_{r}"] for r in ("cell", "other_cells", "background")) == pytest.approx(1)
                assert sum(v[f"crop_on_{r}"] for r in ("cell", "other_cells", "background")) == pytest.approx(1) \
                    or not v["cells_with_a_map"]
    md = (tmp_path / "diagnose_maps_quick.md").read_text()
    assert "floor-free" in md and "Where the map's mass goes" in md and "hirescam" in md
