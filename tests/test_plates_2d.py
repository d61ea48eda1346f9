"""2D plates (one z slice) through every stage, from the command line: synth --2d -> segment -> train -> score
-> export, and the named errors for a bundle or recipe of the other dimensionality."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from gradcamo_dask import cli, open_labels, open_plate
from gradcamo_dask.cells import cell_table, extract_crops
from gradcamo_dask.engine.bundles import open_bundle
from gradcamo_dask.errors import DimensionalityError
from gradcamo_dask.io.synthetic import synthetic_plate
from gradcamo_dask.jobs.dimensionality import check_bundle_dims, plate_recipe
from gradcamo_dask.jobs.recipe import Recipe
from gradcamo_dask.profiles.store import open_profiles
from gradcamo_dask.provenance import read_provenance
from tests.helpers.plate_fixtures import make_bundle

SYNTH_2D = ["--2d", "--doses", "0", "10", "--wells-per-treatment", "2", "--sites", "1", "--site-shape", "96", "96",
            "--cell-radius", "12", "--mosaic", "--granules", "1", "--quiet"]


def test_2d_plate_end_to_end_through_the_cli(tmp_path):
    plate, labels, model = tmp_path / "p.zarr", tmp_path / "labels.zarr", tmp_path / "model"
    profiles, table = tmp_path / "profiles.zarr", tmp_path / "cells"
    assert cli.main(["synth", str(plate), *SYNTH_2D]) == 0
    assert cli.main(["segment", str(plate), "--out", str(labels), "--method", "watershed"]) == 0
    image = open_plate(plate)
    segmented = open_labels(labels, like=image)
    assert image.sizes["z"] == 1 and segmented.sizes["z"] == 1 and int(segmented.max()) > 4
    cells = cell_table(segmented, size=(32, 32))
    crops, masks = extract_crops(image, segmented, cells)
    assert crops.ndim == 4 and crops.shape[1:] == (6, 32, 32) and masks.shape[1:] == (32, 32)  # (cell, c, y, x)
    assert cli.main(["train", str(plate), "--labels", str(labels), "--out", str(model), "--crop-size", "32", "32",
                     "--input-shape", "32", "32", "--epochs", "1", "--batch-size", "4", "--patience", "0",
                     "--quiet"]) == 0
    bundle = open_bundle(model)
    assert bundle.config.architecture["name"] == "efficientnet2d" and bundle.config.spatial_dims == 2
    assert cli.main(["score", str(plate), "--labels", str(labels), "--model", str(model), "--out", str(profiles),
                     "--layers", "_swish", "--workers", "1", "--quiet"]) == 0
    scored = open_profiles(profiles)
    assert read_provenance(scored)["spatial_dims"] == 2 and scored["cam_lowres_0"].ndim == 3  # (cell, y, x) maps
    scores = scored["gradcamo"].values.ravel()
    assert len(scores) == len(cells) and np.isfinite(scores).all() and ((scores >= 0) & (scores <= 1)).all()
    assert cli.main(["export", str(profiles), "--out", str(table), "--formats", "parquet"]) == 0
    out = pd.read_parquet(tmp_path / "cells.parquet")
    assert {"Cells_Location_Center_X", "Cells_Location_Center_Y"} <= set(out.columns)
    assert not [c for c in out.columns if c.endswith("_Z") or "_z" in c]  # as CellProfiler's 2D output
    np.testing.assert_allclose(out["Metadata_GradCAMO"], scores)


def test_recipes_follow_the_plate_and_refuse_the_other_dimensionality():
    flat = synthetic_plate(doses_um=(0, 1), wells_per_treatment=1, sites_per_well=1, site_shape=(64, 64),
                           spatial_dims=2).image
    deep = synthetic_plate(doses_um=(0, 1), wells_per_treatment=1, sites_per_well=1, site_shape=(4, 64, 64)).image
    fitted = plate_recipe(Recipe(crop_size=(None, 48, 48)), flat)
    assert fitted.crop_size == (48, 48) and fitted.input_shape == (224, 224)
    assert fitted.model_options["architecture"] == "efficientnet2d"
    assert plate_recipe(Recipe(), deep) == Recipe()
    with pytest.raises(DimensionalityError, match="3D"):
        plate_recipe(Recipe(model_options={"architecture": "efficientnet3d"}), flat)
    with pytest.raises(DimensionalityError, match="input_shape"):
        plate_recipe(Recipe(input_shape=(12, 48, 48)), flat)
    with pytest.raises(DimensionalityError, match="is 3D"):
        plate_recipe(Recipe(input_shape=(48, 48)), deep)


def test_a_3d_bundle_is_refused_on_a_2d_plate_and_the_reverse(tmp_path):
    flat = synthetic_plate(doses_um=(0, 10), wells_per_treatment=1, sites_per_well=1, site_shape=(64, 64),
                           spatial_dims=2)
    deep = synthetic_plate(doses_um=(0, 10), wells_per_treatment=1, sites_per_well=1, site_shape=(4, 64, 64))
    bundle_3d = open_bundle(make_bundle(tmp_path / "b3"))
    check_bundle_dims(bundle_3d, deep.image)
    with pytest.raises(DimensionalityError, match="bundle is 3D.*plate is 2D"):
        check_bundle_dims(bundle_3d, flat.image)
    from gradcamo_dask import score_plate

    with pytest.raises(DimensionalityError):  # score_plate refuses before any cluster or cell table
        score_plate(flat.image, flat.labels, bundle_3d, client=None)


def test_vit_under_score_plate_threads_give_the_serial_maps(tmp_path):
    """A ViT bundle scored by score_plate on Dask's threaded scheduler: sites run at once on one shared model
    (cached per process), and each gets the maps it gets alone."""
    import dask
    import torch

    from gradcamo_dask import score_plate
    from gradcamo_dask.engine.bundles import write_bundle
    from gradcamo_dask.engine.vit import vit

    plate = synthetic_plate(doses_um=(0, 10), wells_per_treatment=2, sites_per_well=2, site_shape=(96, 96),
                            cell_radius=12.0, spatial_dims=2, plate="vit2d")
    torch.manual_seed(0)
    net = vit(6, 2, (32, 32), patch_size=8, hidden_size=32, mlp_dim=64, num_layers=2, num_heads=2).eval()
    sources = ["cls_attention", "rollout", "gradcam_tokens"]
    path = write_bundle(tmp_path / "vit", net, channels=[str(c) for c in plate.image["c"].values],
                        classes=["control", "compound_10uM"], crop_shape=(32, 32), input_shape=(32, 32),
                        normalization={"mean": [0.3] * 6, "std": [0.2] * 6}, layers=sources)
    scored = score_plate(plate.image, plate.labels, path, batch_size=4)
    assert scored["cam_lowres_0"].shape[1:] == (4, 4) and scored.sizes["feature"] == 3 * 32
    with dask.config.set(scheduler="sync"):
        serial = scored[["gradcamo", "cam_lowres_0", "cam_lowres_1", "cam_lowres_2"]].compute()
    with dask.config.set(scheduler="threads", num_workers=4):
        threaded = scored[["gradcamo", "cam_lowres_0", "cam_lowres_1", "cam_lowres_2"]].compute()
    assert np.isfinite(serial["gradcamo"].values).all()
    for name in serial.data_vars:
        np.testing.assert_allclose(threaded[name].values, serial[name].values, rtol=1e-5, atol=1e-7)


def test_demo_2d_settings_are_the_3d_demos_without_z():
    from gradcamo_dask.cli.demo import settings_2d
    from gradcamo_dask.jobs.demo import DEMO

    cfg = settings_2d()
    assert cfg["spatial_dims"] == 2 and cfg["site_shape"] == DEMO["site_shape"][1:]
    assert cfg["input_shape"] == DEMO["input_shape"][1:] and cfg["layers"] == DEMO["layers"]
    plate = synthetic_plate(doses_um=cfg["doses_um"], wells_per_treatment=1, sites_per_well=1,
                            site_shape=cfg["site_shape"], cell_radius=cfg["cell_radius"], mosaic=True,
                            spatial_dims=cfg["spatial_dims"])
    assert plate.image.sizes["z"] == 1
    fitted = plate_recipe(Recipe(crop_size=cfg["crop_shape"], input_shape=cfg["input_shape"]), plate.image)
    assert fitted.crop_size == (48, 48) and fitted.model_options["architecture"] == "efficientnet2d"
