"""train() builds a vision transformer when the recipe names it; its bundle's map is the CLS attention."""

from __future__ import annotations

import numpy as np
import torch

from gradcamo_dask.engine.bundles import open_bundle
from gradcamo_dask.engine.vit import vit
from gradcamo_dask.io.synthetic import synthetic_plate
from gradcamo_dask.jobs.compare import compare_models
from gradcamo_dask.jobs.recipe import Recipe, Split
from gradcamo_dask.jobs.train import train

VIT = {"architecture": "vit", "patch_size": [4, 8, 8], "hidden_size": 16, "mlp_dim": 32, "num_layers": 2,
       "num_heads": 2}


def test_train_a_vit_by_name_and_rank_it(tmp_path):
    plate = synthetic_plate(doses_um=(0, 10), wells_per_treatment=2, sites_per_well=2, site_shape=(8, 64, 64),
                            cell_radius=9, seed=0)
    recipe = Recipe(crop_size=(None, 32, 32), input_shape=(8, 32, 32), batch_size=4, epochs=2, patience=None,
                    split=Split(max_train_cells=12), model_options=VIT)
    path = train(plate.image, plate.labels, recipe, out=tmp_path / "vit", platemap=plate.platemap, progress=False)
    bundle = open_bundle(path)
    assert bundle.config.architecture["name"] == "vit" and bundle.config.layers == ["cls_attention"]
    assert bundle.config.architecture["patch_size"] == [4, 8, 8]
    history = bundle.config.provenance["history"]
    assert len(history) == 2 and all(np.isfinite(h["train_loss"]) for h in history)
    options = {k: v for k, v in VIT.items() if k != "architecture"}
    torch.manual_seed(0)
    untrained = vit(6, 2, (8, 32, 32), **options).state_dict()
    trained = bundle.model.state_dict()
    assert any(not torch.equal(untrained[k], trained[k]) for k in trained)  # the optimiser moved the weights
    table = compare_models(plate.image, plate.labels, [bundle], platemap=plate.platemap)
    assert table["layer"].tolist() == ["cls_attention"] and table["cells"].iloc[0] == "held-out"
    assert 0 < table["mean"].iloc[0] < 1 and table["grid"].iloc[0] == "2 x 4 x 4"
