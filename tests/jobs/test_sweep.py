"""The layer sweep job: several layers scored in one explain pass, ranked by mean Grad-CAMO."""

from __future__ import annotations

import numpy as np
import pytest

from gradcamo_dask.errors import InputError
from gradcamo_dask.jobs.sweep import layer_sweep
from tests.helpers.engine_models import seeded_tiny_cnn


def _cells(n: int, grid=(8, 16, 16), seed: int = 0):
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.meshgrid(*(np.linspace(-1, 1, s) for s in grid), indexing="ij")
    masks = np.empty((n, *grid), bool)
    crops = np.empty((n, 2, *grid), np.float32)
    for i in range(n):
        c = rng.uniform(-0.4, 0.4, 3)
        masks[i] = (zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 < rng.uniform(0.2, 0.5)
        crops[i] = 0.3 * rng.normal(size=(2, *grid)) + rng.normal(size=(2, 1, 1, 1)) * masks[i]
    return crops, masks


def test_layer_sweep_scores_all_layers_in_one_pass_and_ranks_them():
    from gradcamo_dask.engine.explain import explain
    
    model = seeded_tiny_cnn(width=6)
    crops, masks = _cells(12)
    calls = []
    handle = model.register_forward_pre_hook(lambda _m, args: calls.append(args[0].shape[0]))
    try:
        table = layer_sweep(model, crops, masks, layers=["act1", "conv2", "act2"], batch_size=12,
                            input_shape=crops.shape[2:])
    finally:
        handle.remove()
    assert calls == [12]  # one forward pass for the three layers
    assert table["rank"].tolist() == [1, 2, 3] and table["mean"].is_monotonic_decreasing
    assert set(table["layer"]) == {"act1", "conv2", "act2"}
    grids = dict(zip(table["layer"], table["grid"]))
    assert grids["act1"] == (8, 16, 16) and grids["act2"] == (4, 8, 8)
    for layer in ("act1", "act2"):  # the same scores as explaining each layer on its own
        alone = np.asarray(explain(model, crops, masks, layers=[layer]).gradcamo[layer], dtype=float)
        row = table[table.layer == layer].iloc[0]
        assert row["mean"] == pytest.approx(np.nanmean(alone), rel=1e-5)
        assert row["n_undefined"] == int(np.isnan(alone).sum()) and row["n"] == 12
    # default: every spatial layer of the model
    everything = layer_sweep(model, crops, masks, input_shape=crops.shape[2:])
    assert {"conv1", "act1", "conv2", "act2"} <= set(everything["layer"])
    with pytest.raises(InputError):
        layer_sweep(model, crops, masks, layers=["fc"], input_shape=crops.shape[2:])  # not spatial


def test_layer_sweep_with_a_bundle_normalises_raw_crops(tmp_path):
    from gradcamo_dask.engine.bundles import open_bundle, write_bundle
    from gradcamo_dask.engine.explain import explain
    from gradcamo_dask.engine.models import efficientnet3d
    from gradcamo_dask.normalize import normalize_crops
    
    crops, masks = _cells(4, grid=(8, 16, 16), seed=1)
    raw = (crops - crops.min()) * 1000  # raw intensities: the bundle's normalisation must be applied
    normalization = {"mean": [0.4, 0.5], "std": [0.2, 0.25]}
    model = efficientnet3d(2, 3, input_shape=(16, 32, 32))
    write_bundle(tmp_path / "bundle", model, channels=["DNA", "Mito"], classes=["a", "b", "c"], crop_shape=(8, 16, 16),
                input_shape=(16, 32, 32), normalization=normalization, layers=["_head_swish"])
    bundle = open_bundle(tmp_path / "bundle")
    layers = ["_blocks.3", "_head_swish"]
    table = layer_sweep(bundle, raw, masks, layers=layers)
    direct = explain(bundle.model, normalize_crops(raw, normalization), masks, layers=layers)
    for layer in layers:
        row = table[table.layer == layer].iloc[0]
        expected = np.asarray(direct.gradcamo[layer], dtype=float)
        assert row["n"] == 4 and row["n_undefined"] == int(np.isnan(expected).sum())
        if np.isfinite(expected).any():
            assert row["mean"] == pytest.approx(np.nanmean(expected), rel=1e-5)
        assert row["grid"] == tuple(direct.grids[layer])


def test_the_top_level_name_is_the_job():
    import gradcamo_dask

    assert gradcamo_dask.layer_sweep is layer_sweep
