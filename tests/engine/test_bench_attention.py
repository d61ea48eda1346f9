"""The ground-truth attention benchmark's quick mode runs end to end (about a minute and a half on a quiet
2-core machine, the ViT row included) and writes a complete report."""

from __future__ import annotations

import json
import math
import sys

import pytest

from tests.helpers.paths import REPO


def test_bench_attention_quick_mode_writes_a_complete_report(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import attention_vit
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
        for name in ("in_cell", "off_cell"):  # no map on the grid beats the ceiling; every cell can reach its share
            assert report["uniform_map_reference"][name]["mean"] - 1e-9 <= v["ceiling"][name] <= 1 + 1e-9
            assert v[name]["mean"] <= v["ceiling"][name] + 0.05  # a mean over cells, each below its own ceiling
        if v["grid"] == [1, 1, 1]:  # a 1 x 1 x 1 map scores each cell's uniform share, its ceiling too
            for name in ("in_cell", "off_cell"):
                ref = report["uniform_map_reference"][name]["mean"]
                assert v["ceiling"][name] == pytest.approx(ref, rel=1e-6)
                if v[name]["n_undefined"] == 0:  # (a mean over the defined cells only is over other cells)
                    assert abs(v[name]["mean"] / ref - 1) < 0.05
        else:
            assert math.isfinite(v["cohens_d_over_uniform"])
    assert report["layers"][report["best_layer"]]["localises"]
    ranks = [r["rank"] for r in report["ranking"]["in_cell"]]
    assert ranks == list(range(1, len(bench_attention.LAYERS) + 1))
    assert {q["model"] for q in report["quality"]} == {"in_cell", "off_cell"}
    assert all(0 <= q["all"] <= 1 for q in report["quality"])
    md = (tmp_path / "bench_attention_quick.md").read_text()
    assert report["by_target"]["true"] and report["by_target"]["predicted"]
    gradcam, hires = report["by_method"]["gradcam"], report["by_method"]["hirescam"]
    assert set(hires) == set(bench_attention.LAYERS) and "HiResCAM maps" in md
    for layer, v in gradcam.items():  # the paper's maps, as the main table reports them
        assert v["in_cell"]["mean"] == pytest.approx(report["layers"][layer]["in_cell"]["mean"])
    # at the pooled-linear head both methods make the same map; inside the network they differ
    assert hires["_head_swish"]["in_cell"]["mean"] == pytest.approx(gradcam["_head_swish"]["in_cell"]["mean"],
                                                                    rel=1e-5, nan_ok=True)
    assert any(abs(hires[k]["in_cell"]["mean"] - gradcam[k]["in_cell"]["mean"]) > 1e-4 for k in ("_swish", "_blocks.0.0"))
    assert "Cohen's d" in md and "score / uniform" in md and "uniform" in md and report["best_layer"] in md
    check_transformer_row(report, md, attention_vit.SOURCES)


def check_transformer_row(report: dict, md: str, sources: tuple) -> None:
    """Issue #17's ViT row: every attention source scored on the same held-out cells as the CNN rows."""
    assert set(sources) == {"cls_attention", "rollout", "gradcam_tokens"}
    row = report["transformer"]
    assert row["seeds"] == [0] and row["architecture"]["architecture"] == "vit"
    # 12 x 48 x 48 model grid in patches of 4 x 8 x 8
    assert row["patch_grid"] == [3, 6, 6] and row["localises"] is True
    cells = report["test_cells"]
    for name, population in (("in_cell", "responders"), ("off_cell", "bystanders")):
        m = row["models"][name]
        # the same held-out cells as the CNN rows: same count, same uniform-map reference
        assert m["n"] == cells[population]
        assert m["uniform"]["mean"] == pytest.approx(report["uniform_map_reference"][name]["mean"], rel=1e-9)
        assert 0 <= m["accuracy"] <= 1 and 0.5 <= m["accuracy_chance"] < 1
        for source in sources:
            v = m[source]
            assert v["n"] == m["n"] and 0 <= v["n_undefined"] < v["n"]
            assert 0 < v["mean"] < 1 and v["sd"] >= 0 and 0 <= v["share_on_target"] <= 1
    for source in sources:
        assert math.isfinite(row["cohens_d"][source]) and math.isfinite(row["cohens_d_over_uniform"][source])
        assert f"| {source} |" in md
    # the three sources are different maps: their mean scores differ
    assert len({round(row["models"]["in_cell"][s]["mean"], 6) for s in sources}) == 3
    assert {r["model"] for r in row["per_seed"]} == {"in_cell", "off_cell"}
    assert "Transformer row" in md and "test accuracy (chance)" in md


def test_clean_plate_alone_swaps_in_the_same_responders_without_their_bystanders():
    import torch

    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import bench_attention
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    s, c = bench_attention.SETTINGS["quick"], {**bench_attention.COMMON, "clean_plate": "alone"}
    assert bench_attention.alone(c, "in_cell") and not bench_attention.alone(c, "off_cell")
    assert not bench_attention.alone(bench_attention.COMMON, "in_cell")  # the default keeps the mosaic
    plate, truth = bench_attention.mosaic_plate(c, s)
    table, raw, masks = bench_attention.test_cells(plate, truth, s["max_test_cells"], c["plate_seed"], raw=True)
    mixed, raw2, masks2 = bench_attention.with_alone_responders(c, s, table, raw, masks)
    key = ["well", "site", "object_number"]
    before, after = table[table.responder], mixed[mixed.responder]
    assert len(mixed) == len(table) and sorted(map(tuple, before[key].to_numpy())) == sorted(map(tuple, after[key].to_numpy()))
    by_key = {tuple(r): i for i, r in enumerate(table[key].to_numpy())}
    order = [by_key[tuple(r)] for r in mixed[key].to_numpy()]
    assert bool((masks2 == masks[order]).all())  # same cells, same geometry, bystanders' crops untouched
    resp = torch.from_numpy(mixed.responder.to_numpy(dtype=bool, copy=True))
    assert bool((raw2[~resp] == raw[order][~resp]).all())
    outside = ~masks2[resp][:, None].expand_as(raw2[resp])
    assert raw2[resp][outside].mean() < 0.9 * raw[order][resp][outside].mean()  # the neighbours are gone


def test_mass_contrast_is_the_per_voxel_ratio_and_does_not_grow_with_the_crop():
    import numpy as np

    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import bench_attention
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    figures = []
    for side in (48, 64):  # the same cell and attention (4x per voxel on the cell), more background around it
        mask = np.zeros((6, side, side), bool)
        mask[1:5, side // 2 - 12:side // 2 + 12, side // 2 - 12:side // 2 + 12] = True
        cam = np.where(mask, 4.0, 1.0)
        score, uniform = cam[mask].sum() / cam.sum(), mask.mean()
        figures.append((score / uniform, bench_attention.mass_contrast(score, uniform)))
    (ratio48, contrast48), (ratio64, contrast64) = figures
    assert contrast48 == pytest.approx(4.0) and contrast64 == pytest.approx(4.0)
    assert ratio64 > ratio48 + 0.3  # x uniform rises with the crop alone
    assert bench_attention.mass_contrast(0.1, 0.1) == pytest.approx(1.0)  # a uniform map
