"""Training: splits, determinism, resume, bundle contents, bad input, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from gradcamo_dask.engine.augment import Augmentation
from gradcamo_dask.errors import PlateLayoutError, TrainingError
from gradcamo_dask.io.synthetic import synthetic_plate
from gradcamo_dask.jobs.train import optimizer_from_files, optimizer_to_files, train

CROP = (None, 24, 24)
GRID = (8, 24, 24)
FAST = dict(crop_size=CROP, input_shape=GRID, batch_size=4, max_train_cells=8, progress=False,
            model_options={"dropout_rate": 0.2})


@pytest.fixture(scope="module")
def plate():
    return synthetic_plate(doses_um=(0, 10), wells_per_treatment=2, sites_per_well=2, site_shape=(8, 64, 64),
                           cell_radius=9, seed=0)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(path) / "model.safetensors"))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bundle_split_and_normalization(plate, tmp_path):
    from gradcamo_dask.engine.bundles import load_bundle
    from gradcamo_dask.cells import cell_table, extract_crops, fit_normalization

    out = train(plate.image, plate.labels, plate.platemap, out=tmp_path / "b", epochs=1, **FAST)
    bundle = load_bundle(out)
    cfg = bundle.config
    assert cfg.classes == ["control", "compound_10uM"]
    assert cfg.channels == list(plate.image["c"].values)
    assert cfg.input_shape == list(GRID) and cfg.crop_shape == list(CROP)
    prov = cfg.provenance
    assert prov["split_wells"] == {"train": ["B02", "B03"], "test": ["C02", "C03"]}  # last replicate held out
    assert prov["epochs_run"] == 1 and len(prov["history"]) == 1 and prov["seed"] == 0
    assert prov["test"]["n"] == prov["cells"]["test"] and 0 <= prov["test"]["gradcamo_mean"] <= 1
    cells = __import__("pandas").read_csv(out / "cells.csv")
    assert set(cells.loc[cells.split == "test", "well"]) == {"C02", "C03"}
    assert set(cells.loc[cells.split.isin(["train", "val"]), "well"]) <= {"B02", "B03"}
    assert (cells.split == "train").sum() == 8 and (cells.split == "val").sum() >= 1
    # statistics pooled over sites = fit_normalization over all training crops at once
    table = cell_table(plate.labels, plate.platemap, size=CROP)
    keys = cells[cells.split == "train"][["well", "site", "object_number"]]
    train_cells = table.merge(keys, on=["well", "site", "object_number"])
    crops, _ = extract_crops(plate.image, plate.labels, train_cells, CROP)
    expected = fit_normalization(crops)
    np.testing.assert_allclose(cfg.normalization["mean"], expected["mean"], rtol=1e-5)
    np.testing.assert_allclose(cfg.normalization["std"], expected["std"], rtol=1e-4)
    # no pickles in the checkpoint
    assert sorted(p.name for p in (out / "checkpoint").iterdir()) == [
        "best.safetensors", "model.safetensors", "optimizer.safetensors", "state.json"]


def test_seeded_runs_are_identical_and_resume_is_bit_identical(plate, tmp_path):
    straight = train(plate.image, plate.labels, plate.platemap, out=tmp_path / "straight", epochs=2, seed=3,
                     patience=None, **FAST)
    again = train(plate.image, plate.labels, plate.platemap, out=tmp_path / "again", epochs=2, seed=3,
                  patience=None, cache=False, shuffle_sites=64, **FAST)
    assert _same(_weights(straight), _weights(again))  # deterministic, with or without the crop cache
    other = train(plate.image, plate.labels, plate.platemap, out=tmp_path / "other", epochs=1, seed=4,
                  patience=None, **FAST)
    assert not _same(_weights(straight), _weights(other))
    # 1 epoch, stop, resume for the second: same weights and loss curve as 2 epochs straight
    train(plate.image, plate.labels, plate.platemap, out=tmp_path / "resumed", epochs=1, seed=3, patience=None,
          **FAST)
    resumed = train(plate.image, plate.labels, plate.platemap, out=tmp_path / "resumed", epochs=2, seed=3,
                    patience=None, resume=True, **FAST)
    assert _same(_weights(straight), _weights(resumed))
    history = json.loads((resumed / "config.json").read_text())["provenance"]["history"]
    assert history == json.loads((straight / "config.json").read_text())["provenance"]["history"]
    # a checkpoint of another configuration is refused, naming what differs
    with pytest.raises(TrainingError, match=r"(?s)learning_rate.*0.0003.*0.001"):
        train(plate.image, plate.labels, plate.platemap, out=tmp_path / "resumed", epochs=3, seed=3,
              learning_rate=1e-3, resume=True, **FAST)


def test_regularized_training_runs_and_records(plate, tmp_path):
    out = train(plate.image, plate.labels, plate.platemap, out=tmp_path / "reg", epochs=1, regularizer=1.0,
                regularizer_layer="_blocks.2.4", augmentation=Augmentation(p=0.0), **FAST)
    prov = json.loads((out / "config.json").read_text())["provenance"]
    assert prov["regularizer"] == {"lambda": 1.0, "layer": "_blocks.2.4", "target": "label"}
    assert 0 <= prov["history"][0]["train_gradcamo"] <= 1
    assert prov["test"]["layer"] == "_blocks.2.4"


def test_optimizer_state_round_trip_without_pickle():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    tensors, meta = optimizer_to_files(opt)
    json.dumps(meta)  # JSON-able
    assert all(isinstance(v, torch.Tensor) for v in tensors.values())
    fresh = torch.optim.Adam(torch.nn.Linear(3, 2).parameters(), lr=5.0)
    optimizer_from_files(fresh, tensors, meta)
    a, b = opt.state_dict(), fresh.state_dict()
    assert a["param_groups"][0]["lr"] == b["param_groups"][0]["lr"] == 1e-3
    for k in a["state"]:
        for name in a["state"][k]:
            assert torch.equal(a["state"][k][name], b["state"][k][name])


def test_bad_input(plate, tmp_path):
    pm = plate.platemap
    with pytest.raises(PlateLayoutError, match=r"platemap wells missing from the plate: \['D02'\]"):
        extra = pm.iloc[:1].assign(well="D02")
        train(plate.image, plate.labels, __import__("pandas").concat([pm, extra]), out=tmp_path / "x", **FAST)
    with pytest.raises(PlateLayoutError, match=r"plate wells missing from the platemap: \['C03'\]"):
        train(plate.image, plate.labels, pm[pm.well != "C03"], out=tmp_path / "x", **FAST)
    with pytest.raises(TrainingError, match="compound_10uM"):
        train(plate.image, plate.labels, pm, out=tmp_path / "x", train_wells=["B02", "C02"], test_wells=["B03"],
              **FAST)
    with pytest.raises(TrainingError, match="too few cells"):
        train(plate.image, plate.labels, pm, out=tmp_path / "x", **{**FAST, "max_train_cells": 2})
    with pytest.raises(TrainingError, match="both training and test"):
        train(plate.image, plate.labels, pm, out=tmp_path / "x", train_columns=[2, 3], test_rows=["C"], **FAST)
    assert not (tmp_path / "x" / "config.json").exists()


def test_cli_train(plate, tmp_path):
    from gradcamo_dask.cli import main
    from gradcamo_dask.io.plate import write_plate

    path = tmp_path / "plate.zarr"
    write_plate(path, plate.image, plate.labels, platemap=plate.platemap, progress=False)
    code = main(["train", str(path), "--out", str(tmp_path / "cli_bundle"), "--epochs", "1", "--crop-size", "24",
                 "24", "--input-shape", *map(str, GRID), "--batch-size", "4", "--max-train-cells", "8",
                 "--test-rows", "C", "--quiet"])
    assert code == 0
    cfg = json.loads((tmp_path / "cli_bundle" / "config.json").read_text())
    assert cfg["provenance"]["split_wells"]["test"] == ["C02", "C03"]
    assert main(["train", str(path), "--out", str(tmp_path / "cli_bundle"), "--epochs", "2", "--lr", "0.1",
                 "--crop-size", "24", "24", "--input-shape", *map(str, GRID), "--batch-size", "4",
                 "--max-train-cells", "8", "--test-rows", "C", "--resume", "--quiet"]) == 1


def test_default_layer_has_more_than_one_voxel():
    from gradcamo_dask.engine.layers import layer_grids
    from gradcamo_dask.engine.models import efficientnet3d
    from gradcamo_dask.jobs.train import _informative_layer

    assert _informative_layer(efficientnet3d(6, 4, (64, 224, 224)), (64, 224, 224)) == "_head_swish"
    small = efficientnet3d(6, 4, GRID)
    name = _informative_layer(small, GRID)
    grids = layer_grids(small, GRID)
    assert grids["_head_swish"] == (1, 1, 1) and np.prod(grids[name]) > 1
    later = list(grids)[list(grids).index(name) + 1:]
    assert all(np.prod(grids[n]) == 1 for n in later if n.startswith("_blocks.") and n.count(".") == 2)


def test_last_batch_of_one_cell_is_merged(plate, tmp_path):
    """9 training cells at batch 4 would leave a batch of one, which batch norm cannot train on."""
    options = {**FAST, "max_train_cells": 9}
    out = train(plate.image, plate.labels, plate.platemap, out=tmp_path / "one", epochs=1, **options)
    cells = __import__("pandas").read_csv(out / "cells.csv")
    assert (cells.split == "train").sum() == 9
    history = json.loads((out / "config.json").read_text())["provenance"]["history"]
    assert len(history) == 1 and np.isfinite(history[0]["train_loss"])
