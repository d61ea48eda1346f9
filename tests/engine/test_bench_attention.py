"""The ground-truth attention benchmark's quick mode runs end to end (under a minute on a quiet 2-core
machine) and writes a complete report."""

from __future__ import annotations

import json
import math
import sys

from tests.helpers.paths import REPO


def test_bench_attention_quick_mode_writes_a_complete_report(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import bench_attention
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    assert bench_attention.main(["--quick", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "bench_attention_quick.json").read_text())
    assert report["seeds_done"] == [0] and report["mode"] == "quick"
    assert set(report["layers"]) == set(bench_attention.LAYERS)
    cells = report["test_cells"]
    assert cells["responders"] > 0 and cells["bystanders"] > 0
    for name in ("in_cell", "off_cell"):
        ref = report["uniform_map_reference"][name]["mean"]
        assert 0 < ref < 0.5
        run = report["per_seed"][0]["models"][name]
        for key in ("test", "cell_only", "surround_only"):
            assert 0 <= run[key]["accuracy"] <= 1 and run[key]["n"] > 0
    for layer, v in report["layers"].items():
        assert v["localises"] == (v["grid"][1] >= 3 and v["grid"][2] >= 3)
        assert 0 <= v["in_cell"]["mean"] <= 1 and 0 <= v["off_cell"]["mean"] <= 1
        assert math.isfinite(v["cohens_d"])
        if v["grid"] == [1, 1, 1]:  # a 1 x 1 x 1 map scores each cell's uniform share (undefined cells aside)
            for name in ("in_cell", "off_cell"):
                assert abs(v[name]["mean"] / report["uniform_map_reference"][name]["mean"] - 1) < 0.05
        else:
            assert math.isfinite(v["cohens_d_over_uniform"])
    assert report["layers"][report["best_layer"]]["localises"]
    ranks = [r["rank"] for r in report["ranking"]["in_cell"]]
    assert ranks == list(range(1, len(bench_attention.LAYERS) + 1))
    assert {q["model"] for q in report["quality"]} == {"in_cell", "off_cell"}
    assert all(0 <= q["all"] <= 1 for q in report["quality"])
    md = (tmp_path / "bench_attention_quick.md").read_text()
    assert report["by_target"]["true"] and report["by_target"]["predicted"]
    assert "Cohen's d" in md and "score / uniform" in md and "uniform" in md and report["best_layer"] in md
