"""`python -m benchmarks.report` / `gradcamo-dask bench-report`: one HTML page from the committed results."""

from __future__ import annotations

import json
import re
import shutil

from gradcamo_dask.cli import main
from tests.helpers.paths import REPO

RESULTS = REPO / "benchmarks" / "results"


def _figures(page: str) -> list[str]:
    return re.findall(r"<h2>([^<]+)</h2>\n<img", page)


def test_report_from_committed_results_has_every_figure(tmp_path):
    out = tmp_path / "report.html"
    assert main(["bench-report", "--out", str(out)]) == 0
    page = out.read_text()
    titles = _figures(page)
    for title in ("One-pass overhead vs peers", "Throughput and efficiency vs workers", "Memory vs plate size",
                  "Segmentation AP", "Ground-truth attention"):
        assert title in titles, titles
    assert page.count("data:image/png;base64,") == len(titles)
    committed = sorted(p.stem for p in RESULTS.glob("*.json"))
    for name in committed:  # every result file is listed with its date and kind
        assert re.search(rf"<td>{name}</td><td>(\d{{4}}-\d\d-\d\d|undated)</td><td>(measured|simulated)</td>", page), name


def test_simulated_results_are_labelled_simulated(tmp_path):
    shutil.copy(RESULTS / "bench_plate.json", tmp_path / "bench_plate.json")
    fleet = {"benchmark": "bench_fleet", "simulated": True, "date": "2026-11-30T10:00:00+00:00",
             "machine": {"cpus": 2, "platform": "Linux-x"},
             "rows": [{"gpus": n, "cells_per_s": 1000.0 * n * (1 - 0.01 * n)} for n in (1, 2, 4)]}
    (tmp_path / "bench_fleet.json").write_text(json.dumps(fleet))
    (tmp_path / "notes.json").write_text("[1, 2]")  # not an object: ignored
    assert main(["bench-report", "--results", str(tmp_path)]) == 0
    page = (tmp_path / "report.html").read_text()
    assert _figures(page) == ["Throughput and efficiency vs workers", "Memory vs plate size"]
    assert "<td>bench_fleet</td><td>2026-11-30</td><td>simulated</td>" in page
    assert "<td>bench_plate</td><td>2026-11-23</td><td>measured</td>" in page


def test_empty_results_folder_is_a_clear_error(tmp_path, capsys):
    assert main(["bench-report", "--results", str(tmp_path)]) == 1
    assert "no benchmark JSON files" in capsys.readouterr().err
