"""Ranking designs: `compare` scores the same held-out cells with several bundles and layers."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from tests.helpers.engine_models import lively
from tests.helpers.plate_fixtures import CHANNELS, make_plate, open_tiny
from gradcamo_dask import efficientnet3d, explain
from gradcamo_dask.cells import cell_table, extract_crops
from gradcamo_dask.cli.main import main
from gradcamo_dask.engine.bundles import open_bundle, write_bundle
from gradcamo_dask.engine.vit import vit
from gradcamo_dask.io.platemap import platemap_of
from gradcamo_dask.jobs.compare import compare_models, write_comparison
from gradcamo_dask.normalize import normalize_crops


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("compare")
    plate = make_plate(folder / "plate.zarr", wells_per_treatment=2, site_shape=(8, 64, 64), cell_radius=9.0,
                       with_platemap=True, overwrite=True)
    image, labels = open_tiny(plate)
    pm = platemap_of(image)
    test_wells = sorted(pm.groupby("treatment")["well"].last().astype(str))
    classes = sorted(pm["treatment"].astype(str).unique())
    provenance = {"split_wells": {"train": sorted(set(pm["well"].astype(str)) - set(test_wells)), "test": test_wells}}
    norm = {"mean": [0.3] * len(CHANNELS), "std": [0.2] * len(CHANNELS)}
    torch.manual_seed(0)
    cnn = lively(efficientnet3d(len(CHANNELS), len(classes), (8, 48, 48)), seed=4)
    effnet = write_bundle(folder / "effnet", cnn, channels=CHANNELS, classes=classes, crop_shape=(None, 32, 32),
                          input_shape=(8, 48, 48), normalization=norm, provenance=provenance,
                          layers=["_head_swish", "_blocks.2.4"])
    torch.manual_seed(1)
    transformer = vit(len(CHANNELS), len(classes), (8, 32, 32), patch_size=(4, 8, 8), hidden_size=16, mlp_dim=32,
                      num_layers=2, num_heads=2)
    vit_bundle = write_bundle(folder / "vit", transformer, channels=CHANNELS, classes=classes,
                              crop_shape=(None, 40, 40), input_shape=(8, 32, 32), normalization=norm,
                              provenance=provenance, layers=["cls_attention", "rollout"])
    return {"folder": folder, "plate": plate, "image": image, "labels": labels, "pm": pm, "test": test_wells,
            "effnet": effnet, "vit": vit_bundle}


def test_same_held_out_cells_one_row_per_model_and_layer_ranked(setup):
    table = compare_models(setup["image"], setup["labels"], [setup["effnet"], setup["vit"]])
    assert set(zip(table["model"], table["layer"])) == {("effnet", "_head_swish"), ("effnet", "_blocks.2.4"),
                                                        ("vit", "cls_attention"), ("vit", "rollout")}
    assert list(table["rank"]) == [1, 2, 3, 4]
    assert table["localises"].tolist() == sorted(table["localises"], reverse=True)  # maps that localise first
    assert dict(zip(table["layer"], table["localises"]))["_head_swish"] is False  # 1 x 1 x 1 at 8 x 48 x 48
    assert table["localises"].sum() == 3
    for _, group in table.groupby("localises"):
        defined = group["mean"].notna()
        assert group["mean"][defined].is_monotonic_decreasing
        assert defined[:defined.sum()].all()  # rows without a defined score come last
    assert (table["cells"] == "held-out").all()
    # the cells: whole cells at the larger crop (40 x 40) in the test wells, the same for both models
    cells = cell_table(setup["labels"], setup["pm"], size=(None, 40, 40))
    cells = cells[cells["well"].astype(str).isin(setup["test"])].reset_index(drop=True)
    assert len(cells) >= 4 and (table["n"] == len(cells)).all()
    # one row recomputed by hand: the CNN's stage-2 layer (1 x 3 x 3 map) on 32 x 32 crops of those cells
    bundle = open_bundle(setup["effnet"])
    small = cells.copy()
    small.attrs["crop_size"] = (None, 32, 32)
    crops, masks = (a.compute() for a in extract_crops(setup["image"], setup["labels"], small, size=(None, 32, 32)))
    result = explain(bundle.model, normalize_crops(crops, bundle.config.normalization), masks, layers="_blocks.2.4")
    scores = result.gradcamo["_blocks.2.4"]
    assert np.isfinite(scores).sum() >= 3 and np.nanstd(scores) > 0
    row = table[(table["model"] == "effnet") & (table["layer"] == "_blocks.2.4")].iloc[0]
    np.testing.assert_allclose(row["mean"], np.nanmean(scores), rtol=1e-6)
    np.testing.assert_allclose(row["sd"], np.nanstd(scores, ddof=1), rtol=1e-6)
    assert row["n_undefined"] == np.isnan(scores).sum()
    truth = np.array([bundle.config.classes.index(t) for t in cells["treatment"].astype(str)])
    assert row["accuracy"] == pytest.approx(float((result.predicted == truth).mean()))
    assert row["mean_uniform"] == pytest.approx(float(masks.mean(axis=(1, 2, 3)).mean()))
    assert 0 < row["mean_uniform"] < 1 and 0.5 <= row["accuracy_chance"] <= 1
    assert np.isfinite(table["map"]).all() and ((table["map"] >= 0) & (table["map"] <= 1)).all()


def test_cli_prints_and_writes_csv_markdown_html(setup, capsys):
    out = setup["folder"] / "ranking"
    before = sorted(p.name for p in setup["plate"].rglob("*"))
    code = main(["compare", str(setup["plate"]), "--models", str(setup["effnet"]), str(setup["vit"]),
                 "--layers", "_head_swish", "rollout", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    table = pd.read_csv(out / "compare.csv")
    assert sorted(table["layer"]) == ["_head_swish", "rollout"] and set(table["model"]) == {"effnet", "vit"}
    assert "rollout" in printed and "compare.html" in printed
    markdown = (out / "compare.md").read_text()
    assert markdown.startswith("## Model comparison") and "±" in markdown and "mean_uniform" in markdown
    assert "<table" in (out / "compare.html").read_text()
    assert sorted(p.name for p in setup["plate"].rglob("*")) == before  # the plate is read-only


def test_refusals(setup, capsys):
    code = main(["compare", str(setup["plate"]), "--models", str(setup["effnet"]), "--layers", "no_such_layer",
                 "--out", str(setup["folder"] / "bad")])
    assert code == 1 and "none of the layers" in capsys.readouterr().err
    table = compare_models(setup["image"], setup["labels"], [setup["effnet"]], ["_head_swish"], max_cells=3)
    assert table["n"].tolist() == [3]
    paths = write_comparison(table, setup["folder"] / "one")
    assert sorted(p.name for p in paths.values()) == ["compare.csv", "compare.html", "compare.md"]


def test_2d_plate_cnn_and_vit_ranked_and_a_3d_bundle_refused(tmp_path):
    """compare on a 2D plate: a 2D CNN and a 2D ViT on the same held-out cells; a 3D bundle is refused up front."""
    from gradcamo_dask.engine.models2d import efficientnet2d
    from gradcamo_dask.errors import DimensionalityError
    from gradcamo_dask.io.synthetic import synthetic_plate

    plate = synthetic_plate(doses_um=(0, 10), wells_per_treatment=2, sites_per_well=1, site_shape=(96, 96),
                            cell_radius=10, spatial_dims=2, seed=0)
    image, labels, pm = plate.image, plate.labels, plate.platemap
    channels = [str(c) for c in image["c"].values]
    classes = sorted(pm["treatment"].astype(str).unique())
    test_wells = sorted(pm.groupby("treatment")["well"].last().astype(str))
    common = dict(channels=channels, classes=classes, normalization={"mean": [0.3] * 6, "std": [0.2] * 6},
                  provenance={"split_wells": {"test": test_wells}})
    torch.manual_seed(0)
    cnn = write_bundle(tmp_path / "cnn2d", efficientnet2d(6, len(classes), (48, 48)), crop_shape=(32, 32),
                       input_shape=(48, 48), layers=["_blocks.1.1", "_head_swish"], **common)
    torch.manual_seed(1)
    transformer = vit(6, len(classes), (32, 32), patch_size=8, hidden_size=16, mlp_dim=32, num_layers=2, num_heads=2)
    with torch.no_grad():  # livelier than the default init, so that attention is far from uniform
        for name, p in transformer.named_parameters():
            if "qkv" in name or "pos" in name:
                p.mul_(6.0)
    vit2d = write_bundle(tmp_path / "vit2d", transformer, crop_shape=(40, 40), input_shape=(32, 32),
                         layers=["cls_attention", "gradcam_tokens"], **common)
    table = compare_models(image, labels, [cnn, vit2d], platemap=pm)
    grids = dict(zip(table["layer"], table["grid"]))
    assert grids == {"_blocks.1.1": "12 x 12", "_head_swish": "2 x 2", "cls_attention": "4 x 4",
                     "gradcam_tokens": "4 x 4"}
    assert table["layer"].iloc[-1] == "_head_swish" and not table["localises"].iloc[-1]  # 2 x 2: ranked last
    assert table["mean"].iloc[:3].is_monotonic_decreasing and (table["cells"] == "held-out").all()
    # the same cells for both models: the test wells' whole cells at the larger (40 x 40) crop
    cells = cell_table(labels, pm, size=(40, 40))
    cells = cells[~cells["touches_border"] & cells["well"].astype(str).isin(test_wells)].reset_index(drop=True)
    assert len(cells) >= 4 and (table["n"] == len(cells)).all()
    # the ViT's CLS-attention row recomputed by hand on 40 x 40 crops of those cells
    bundle = open_bundle(vit2d)
    crops, masks = (a.compute() for a in extract_crops(image, labels, cells, size=(40, 40)))
    result = explain(bundle.model, normalize_crops(crops, bundle.config.normalization), masks, layers="cls_attention")
    row = table[table["layer"] == "cls_attention"].iloc[0]
    np.testing.assert_allclose(row["mean"], np.nanmean(result.gradcamo["cls_attention"]), rtol=1e-6)
    assert row["mean_uniform"] == pytest.approx(float(masks.mean(axis=(1, 2)).mean()))
    assert row["mean"] != pytest.approx(row["mean_uniform"], abs=1e-4)  # attention is not spread evenly
    flat = efficientnet3d(6, len(classes), (4, 32, 32))
    deep = write_bundle(tmp_path / "cnn3d", flat, crop_shape=(None, 32, 32), input_shape=(4, 32, 32),
                        layers=["_head_swish"], **common)
    with pytest.raises(DimensionalityError, match="the plate is 2D"):
        compare_models(image, labels, [cnn, deep], platemap=pm)


def test_a_background_fill_bundle_is_compared_on_crops_filled_as_it_was_trained(setup, tmp_path):
    import shutil

    from gradcamo_dask.jobs.compare import _crops

    filled = tmp_path / "effnet_bg"
    shutil.copytree(setup["effnet"], filled)
    config = json.loads((filled / "config.json").read_text())
    (filled / "config.json").write_text(json.dumps({**config, "crop_fill": "background"}))
    zero, background = open_bundle(setup["effnet"]), open_bundle(filled)
    assert background.config.crop_fill == "background"
    cells = cell_table(setup["labels"], setup["pm"], size=(None, 32, 32))
    cells = cells[cells["well"].astype(str).isin(setup["test"])].reset_index(drop=True)
    got, masks = _crops(setup["image"], setup["labels"], cells, background)
    raw, expected_masks = (a.compute() for a in extract_crops(setup["image"], setup["labels"], cells,
                                                             size=(None, 32, 32), outside="background"))
    np.testing.assert_array_equal(got, normalize_crops(raw, background.config.normalization))
    np.testing.assert_array_equal(masks, expected_masks)
    plain, _ = _crops(setup["image"], setup["labels"], cells, zero)
    padded = cells["crop_padded"].to_numpy()
    assert padded.any() and not np.array_equal(got[padded], plain[padded])
    np.testing.assert_array_equal(got[~padded], plain[~padded])
    table = compare_models(setup["image"], setup["labels"], [setup["effnet"], filled], layers=["_blocks.2.4"])
    assert set(table["model"]) == {"effnet", "effnet_bg"} and (table["n"] == len(cells)).all()
