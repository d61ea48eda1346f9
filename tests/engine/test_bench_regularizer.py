"""The regulariser's λ sweep (benchmarks/bench_regularizer.py): the targets are judged against λ = 0, and the
quick mode writes a complete report (held-out crops normalised as each bundle was trained: bench_attention.audit
with raw crops; the scalings themselves: tests/test_normalize.py)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tests.helpers.benchmark_modules import benchmark_module


@pytest.fixture(scope="module")
def bench():
    with benchmark_module("bench_regularizer") as module:
        yield module


def test_targets_are_judged_against_lambda_0(bench):
    def row(d, test, cell_only):
        return {"cohens_d_vs_lambda_0": d, "test": {"mean": test}, "cell_only": {"mean": cell_only}}

    t = bench.targets({"0.0": row(0.0, 0.90, 0.60), "10.0": row(0.9, 0.88, 0.70), "30.0": row(1.2, 0.80, 0.75),
                       "3.0": row(0.5, 0.90, 0.55)})
    assert t["10.0"]["all"] and t["10.0"]["accuracy_lost"] == pytest.approx(0.02)
    assert t["30.0"]["d_at_least_0.8"] and not t["30.0"]["accuracy_lost_at_most_3_points"] and not t["30.0"]["all"]
    assert not t["3.0"]["d_at_least_0.8"] and not t["3.0"]["cell_only_rises"]
    assert "0.0" not in t and bench.targets({"10.0": row(1, 1, 1)}) == {}


def test_bench_regularizer_quick_mode_writes_a_complete_report(bench, tmp_path):
    assert bench.main(["--quick", "--workers", "1", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "bench_regularizer_quick.json").read_text())
    assert report["mode"] == "quick" and report["settings"]["intensity_scaling"] == "plate"
    grid = report["layer_grid"]
    assert grid[1] >= 3 and grid[2] >= 3  # the regulariser's layer can localise a cell
    assert set(report["by_lambda"]) == {"0.0", "10.0"} and set(report["targets"]) == {"10.0"}
    assert 0 < report["uniform_map_reference"]["mean"] < 0.5
    for run in report["runs"]:
        rng = run["intensity_range"]
        assert len(rng["low"]) == len(rng["high"]) > 0 and all(h > lo for lo, h in zip(rng["low"], rng["high"]))
        assert 0 <= run["gradcamo"]["mean"] <= 1 and run["gradcamo"]["n"] == report["test_cells"]
        assert 0 <= run["negative_outside_share_of_all"] <= 1  # evidence against the class outside the cell
        for key in ("test", "cell_only", "surround_only"):
            assert 0 <= run[key]["accuracy"] <= 1 and run[key]["n"] == report["test_cells"]
    assert math.isfinite(report["by_lambda"]["10.0"]["cohens_d_vs_lambda_0"])
    assert np.isclose(report["by_lambda"]["0.0"]["cohens_d_vs_lambda_0"], 0.0)
    md = (tmp_path / "bench_regularizer_quick.md").read_text()
    assert "intensity scaling `plate`" in md and "Targets against λ = 0" in md and "uniform" in md


def test_warm_start_fine_tunes_every_lambda_from_the_seed_s_plain_model(bench, tmp_path):
    assert bench.main(["--quick", "--workers", "1", "--warm-start", "1", "--out", str(tmp_path), "--tag", "w",
                       "--cam", "hirescam"]) == 0
    report = json.loads((tmp_path / "bench_regularizer_quick_w.json").read_text())
    assert report["warm_start"] == {"epochs": 1, "learning_rate": 3e-4}
    assert [(r["lambda"], r["epochs"]) for r in report["runs"]] == [("start", 1), (0.0, 1), (10.0, 1)]
    assert report["start"]["seeds"] == 1 and math.isfinite(report["by_lambda"]["10.0"]["cohens_d_vs_start"])
    start, control = report["runs"][0]["gradcamo"], report["runs"][1]["gradcamo"]
    assert start["n"] == control["n"] == report["test_cells"] and start["mean"] != control["mean"]  # it trained on
    md = (tmp_path / "bench_regularizer_quick_w.md").read_text()
    assert "warm start" in md and "| start | 1 |" in md and "d vs start" in md
    assert report["settings"]["cam"] == "hirescam" and "map `hirescam`" in md
    for run in report["runs"]:  # every model is audited with both maps
        assert 0 <= run["gradcamo_hirescam"]["mean"] <= 1 and run["gradcamo_hirescam"]["n"] == report["test_cells"]
    assert math.isfinite(report["by_lambda"]["10.0"]["hirescam"]["cohens_d_vs_lambda_0"])
