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


def test_quick_mode_writes_every_model_and_layer(diag, tmp_path):
    assert diag.main(["--quick", "--workers", "1", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "diagnose_maps_quick.json").read_text())
    assert set(report["models"]) == {"in_cell", "off_cell", "start", "lambda_0", "lambda_3"}
    for layers in report["models"].values():
        assert set(layers) == set(diag.LAYERS)
        for f in layers.values():
            assert f["cells"] > 0 and 0 <= f["gradcamo"] <= 1 and 0 < f["uniform"] < 1
            assert 0 <= f["floor_share"] <= 1
    assert "floor-free" in (tmp_path / "diagnose_maps_quick.md").read_text()
