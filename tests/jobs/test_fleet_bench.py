"""bench_fleet's quick mode: the simulated fleet runs, writes its report, and prefetch hides reads."""

from __future__ import annotations

import json
import sys

from tests.helpers.paths import REPO


def test_bench_fleet_quick_mode(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import bench_fleet
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    # a slow stand-in GPU (20 ms per cell) so that the reads can be hidden on a busy 2-core machine
    assert bench_fleet.main(["--quick", "--ms-per-cell", "20", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "bench_fleet_quick.json").read_text())
    runs = {(r["gpus"], r["prefetch"]): r for r in result["runs"]}
    assert set(runs) == {(1, False), (1, True), (2, False), (2, True)}
    cells = result["settings"]["cells"]
    assert cells > 50 and all(r["cells"] == cells for r in runs.values())
    assert runs[(1, True)]["idle_share_mean"] < runs[(1, False)]["idle_share_mean"]
    assert runs[(1, True)]["efficiency"] == 1.0 and runs[(2, True)]["efficiency"] > 0
    assert result["simulated"] is True and result["task_overhead_ms"] > 0
    assert "| 2 | on |" in (tmp_path / "bench_fleet_quick.md").read_text()


def test_stand_in_gpus_are_slowed_until_their_feeders_fit_the_cores():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import bench_fleet
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    host = {"cpu_ms_per_cell": 4.0, "wall_ms_per_cell": 6.0}
    # 4 feeders at 6 ms of host per cell in 80 % of 2 cores: each GPU must take >= 6 * 4 / 1.6 = 15 ms per cell
    assert bench_fleet.fitted_ms_per_cell(host, 1.0, [1, 2, 4], 2) == 15.0
    assert bench_fleet.fitted_ms_per_cell(host, 40.0, [1, 2, 4], 2) == 40.0  # already slow enough: unchanged
    assert bench_fleet.fitted_ms_per_cell(host, 1.0, [1, 16], 32) == 3.75
