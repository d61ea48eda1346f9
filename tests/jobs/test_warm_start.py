"""Fine-tuning from a bundle (``Recipe(init_from=...)``): the start weights, the kept normalisation, refusals."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gradcamo_dask.errors import BundleMismatchError, TrainingError
from gradcamo_dask.io.synthetic import synthetic_plate
from gradcamo_dask.jobs.recipe import Recipe, Split
from gradcamo_dask.jobs.train import train
from tests.helpers.tree_digest import tree_digest

FAST = Recipe(crop_size=(None, 24, 24), input_shape=(8, 24, 24), batch_size=4, epochs=1, patience=None,
              split=Split(max_train_cells=8))


@pytest.fixture(scope="module")
def plate():
    return synthetic_plate(doses_um=(0, 10), wells_per_treatment=2, sites_per_well=2, site_shape=(8, 64, 64),
                           cell_radius=9, seed=0)


@pytest.fixture(scope="module")
def start(plate, tmp_path_factory):
    """A plain one-epoch bundle to start from."""
    return train(plate.image, plate.labels, FAST, out=tmp_path_factory.mktemp("start") / "b",
                 platemap=plate.platemap, progress=False)


def _config(bundle: Path) -> dict:
    return json.loads((Path(bundle) / "config.json").read_text())


def test_zero_epochs_from_a_bundle_is_that_bundle(plate, start, tmp_path):
    before = tree_digest(start)
    out = train(plate.image, plate.labels, replace(FAST, epochs=0, seed=5, init_from=start), out=tmp_path / "b",
                platemap=plate.platemap, progress=False)
    a, b = load_file(str(start / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # not seed 5's random weights
    cfg, src = _config(out), _config(start)
    assert cfg["normalization"] == src["normalization"]
    assert cfg["provenance"]["test"]["loss"] == pytest.approx(src["provenance"]["test"]["loss"], rel=1e-6)
    assert cfg["provenance"]["init_from"]["path"] == str(start)
    assert cfg["provenance"]["init_from"]["hash"].startswith("sha256:")
    assert tree_digest(start) == before  # the start bundle is only read


def test_fine_tuning_moves_the_weights_from_the_start_not_from_scratch(plate, start, tmp_path):
    tuned = train(plate.image, plate.labels, replace(FAST, init_from=start, learning_rate=1e-5), out=tmp_path / "t",
                  platemap=plate.platemap, progress=False)
    fresh = load_file(str(train(plate.image, plate.labels, replace(FAST, learning_rate=1e-5), out=tmp_path / "f",
                                platemap=plate.platemap, progress=False) / "model.safetensors"))
    a, t = load_file(str(start / "model.safetensors")), load_file(str(tuned / "model.safetensors"))
    key = "_fc.weight"
    step_from_start = (t[key] - a[key]).abs().max().item()
    assert 0 < step_from_start < (fresh[key] - a[key]).abs().max().item()


def test_a_bundle_of_other_classes_scaling_or_network_is_refused(plate, start, tmp_path):
    other = synthetic_plate(doses_um=(0, 3), wells_per_treatment=2, sites_per_well=2, site_shape=(8, 64, 64),
                            cell_radius=9, seed=0)
    with pytest.raises(BundleMismatchError, match="classes"):
        train(other.image, other.labels, replace(FAST, init_from=start), out=tmp_path / "a", platemap=other.platemap,
              progress=False)
    with pytest.raises(BundleMismatchError, match="intensity_scaling"):
        train(plate.image, plate.labels, replace(FAST, init_from=start, intensity_scaling="plate"),
              out=tmp_path / "b", platemap=plate.platemap, progress=False)
    with pytest.raises(BundleMismatchError, match="does not fit"):
        train(plate.image, plate.labels, replace(FAST, init_from=start, model_options={"architecture": "vit", "patch_size": [4, 8, 8]}),
              out=tmp_path / "c", platemap=plate.platemap, progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_resume_refuses_a_checkpoint_started_from_another_bundle(plate, start, tmp_path):
    out = tmp_path / "b"
    train(plate.image, plate.labels, replace(FAST, init_from=start), out=out, platemap=plate.platemap, progress=False)
    with pytest.raises(TrainingError, match="init_from"):
        train(plate.image, plate.labels, replace(FAST, epochs=2), out=out, platemap=plate.platemap, resume=True,
              progress=False)


def test_cli_refuses_an_output_inside_the_start_bundle(plate, start, tmp_path, capsys):
    from gradcamo_dask.cli.main import main

    before = tree_digest(start)
    code = main(["train", str(tmp_path / "plate.zarr"), "--out", str(start / "tuned"), "--init-from", str(start)])
    assert code != 0 and "lies inside the bundle" in capsys.readouterr().err
    assert not (start / "tuned").exists() and tree_digest(start) == before
