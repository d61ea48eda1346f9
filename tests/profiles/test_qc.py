"""Grad-CAMO quality control: flags, filters, summaries by any grouping, layer ranking and sweep."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from gradcamo_dask import InputError
from gradcamo_dask.profiles.qc import (
    filter_profiles,
    flag_profiles,
    gradcamo_counts,
    gradcamo_status,
    rank_layers,
    summarize_gradcamo,
)
from tests.helpers.feature_profiles import LAYERS, make_profiles, synthetic_cells


@pytest.fixture(scope="module")
def profiles():
    return make_profiles(synthetic_cells(n_wells=4, sites=2, cells_per_site=10), n_undefined=5)


def test_status_counts_and_undefined_are_not_zero(profiles):
    score = profiles["gradcamo"].sel(layer=LAYERS[0]).values
    status = gradcamo_status(profiles)
    assert (status[np.isnan(score)] == "undefined").all() and (status == "undefined").sum() == 5
    assert (status[score >= 0.25] == "on_target").all() and (status[score < 0.25] == "off_target").all()
    counts = gradcamo_counts(profiles)
    assert counts["n_undefined"] == 5 and counts["n"] == 80 and counts["layer"] == LAYERS[0]
    assert counts["n_on_target"] + counts["n_off_target"] + counts["n_undefined"] == 80
    defined = score[~np.isnan(score)]
    assert counts["share_on_target"] == pytest.approx((defined >= 0.25).mean())  # among defined only
    # a cut-off of 0 puts every defined score on target, never the undefined ones
    assert gradcamo_counts(profiles, cutoff=0.0)["n_on_target"] == 75
    assert gradcamo_counts(profiles, layer=LAYERS[1])["n_undefined"] == 0
    with pytest.raises(InputError, match=r"cut-off must be in \[0, 1\]"):
        gradcamo_status(profiles, cutoff=25)
    with pytest.raises(InputError, match="scored layers"):
        gradcamo_status(profiles, layer="nope")


def test_flag_and_filter(profiles):
    flagged = flag_profiles(profiles, cutoff=0.3)
    assert flagged["gradcamo_qc"].dims == ("cell",) and flagged.sizes == profiles.sizes
    assert json.loads(flagged.attrs["gradcamo_qc"])["cutoff"] == 0.3
    kept = filter_profiles(profiles)
    score = profiles["gradcamo"].sel(layer=LAYERS[0]).values
    assert kept.sizes["cell"] == int((score >= 0.25).sum())
    assert (kept["gradcamo"].sel(layer=LAYERS[0]).values >= 0.25).all()
    assert set(kept["well"].values) <= set(profiles["well"].values) and "deep" in kept
    info = json.loads(kept.attrs["gradcamo_filter"])
    assert info["n_kept"] == kept.sizes["cell"] and info["n_undefined"] == 5
    with_undefined = filter_profiles(profiles, keep_undefined=True)
    assert with_undefined.sizes["cell"] == kept.sizes["cell"] + 5
    by_head = filter_profiles(profiles, layer=LAYERS[1])
    assert by_head.sizes["cell"] == int((profiles["gradcamo"].sel(layer=LAYERS[1]).values >= 0.25).sum())


def test_summaries_by_any_grouping(profiles):
    by_treatment = summarize_gradcamo(profiles, by="treatment")
    assert list(by_treatment.columns) == ["layer", "treatment", "n", "mean", "sd", "share_on_target", "n_undefined"]
    assert len(by_treatment) == len(LAYERS) * profiles["treatment"].to_series().nunique()
    frame = pd.DataFrame({"treatment": profiles["treatment"].values,
                          "score": profiles["gradcamo"].sel(layer=LAYERS[0]).values})
    for treatment, group in frame.groupby("treatment"):
        row = by_treatment[(by_treatment.layer == LAYERS[0]) & (by_treatment.treatment == treatment)].iloc[0]
        defined = group["score"].dropna()
        assert row.n == len(group) and row.n_undefined == group["score"].isna().sum()
        assert row["mean"] == pytest.approx(defined.mean()) and row.sd == pytest.approx(defined.std(ddof=1))
        assert row.share_on_target == pytest.approx((defined >= 0.25).mean())
    one_layer = summarize_gradcamo(profiles, by=["well", "site"], layer=LAYERS[1])
    assert list(one_layer.columns[:2]) == ["well", "site"] and len(one_layer) == 8
    by_dose = summarize_gradcamo(profiles, by="dose", cutoff=0.5)
    assert set(by_dose["dose"]) == set(profiles["dose"].values)
    overall = summarize_gradcamo(profiles)
    assert overall["n"].tolist() == [80, 80] and overall["n_undefined"].tolist() == [5, 0]
    with pytest.raises(InputError, match="cannot group by"):
        summarize_gradcamo(profiles, by="compound")
    with pytest.raises(InputError, match="no Grad-CAMO scores"):
        summarize_gradcamo(profiles.drop_vars(["gradcamo"]), by="treatment")


def test_rank_layers_from_stored_scores(profiles):
    ranked = rank_layers(profiles)
    assert ranked["rank"].tolist() == [1, 2]
    means = {layer: np.nanmean(profiles["gradcamo"].sel(layer=layer).values) for layer in LAYERS}
    assert ranked["layer"].tolist() == sorted(means, key=means.get, reverse=True)
    assert ranked["mean"].is_monotonic_decreasing
    assert dict(zip(ranked.layer, ranked.grid)) == {"_blocks.10": (2, 7, 7), "_head_swish": (1, 4, 4)}


class _TinyCNN:
    """Built lazily so that importing this test module does not import torch."""

    @staticmethod
    def make(in_channels: int = 2, num_classes: int = 3, seed: int = 0):
        import torch
        from torch import nn

        torch.manual_seed(seed)

        class TinyCNN(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.conv1 = nn.Conv3d(in_channels, 6, 3, padding=1)
                self.act1 = nn.ReLU()
                self.conv2 = nn.Conv3d(6, 6, 3, stride=2, padding=1)
                self.act2 = nn.ReLU()
                self.pool = nn.AdaptiveAvgPool3d(1)
                self.fc = nn.Linear(6, num_classes)

            def forward(self, x):
                return self.fc(self.pool(self.act2(self.conv2(self.act1(self.conv1(x))))).flatten(1))

        return TinyCNN().eval()


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
    from gradcamo_dask.profiles.qc import layer_sweep

    model = _TinyCNN.make()
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
    from gradcamo_dask.engine.bundles import load_bundle, save_bundle
    from gradcamo_dask.engine.explain import explain
    from gradcamo_dask.engine.models import efficientnet3d
    from gradcamo_dask.engine.normalize import normalize_crops
    from gradcamo_dask.profiles.qc import layer_sweep

    crops, masks = _cells(4, grid=(8, 16, 16), seed=1)
    raw = (crops - crops.min()) * 1000  # raw intensities: the bundle's normalisation must be applied
    normalization = {"mean": [0.4, 0.5], "std": [0.2, 0.25]}
    model = efficientnet3d(2, 3, input_shape=(16, 32, 32))
    save_bundle(tmp_path / "bundle", model, channels=["DNA", "Mito"], classes=["a", "b", "c"], crop_shape=(8, 16, 16),
                input_shape=(16, 32, 32), normalization=normalization, layers=["_head_swish"])
    bundle = load_bundle(tmp_path / "bundle")
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


def test_summary_counts_undefined_scores_and_never_zeroes_them():
    table = pd.DataFrame({
        "gradcamo": [0.1, 0.3, np.nan, 0.5, 0.25, np.nan],
        "treatment": ["a", "a", "b", "b", "c", "c"],
    })
    out = summarize_gradcamo(table, by="treatment").set_index("treatment")
    assert out.loc["a", "n"] == 2 and out.loc["a", "n_undefined"] == 0
    assert out.loc["a", "mean"] == pytest.approx(0.2)
    assert out.loc["a", "sd"] == pytest.approx(np.std([0.1, 0.3], ddof=1))
    assert out.loc["a", "share_on_target"] == pytest.approx(0.5)
    assert out.loc["b", "n"] == 2 and out.loc["b", "n_undefined"] == 1
    assert out.loc["b", "mean"] == pytest.approx(0.5)  # the NaN is not a 0
    assert out.loc["b", "share_on_target"] == pytest.approx(1.0)
    assert out.loc["c", "share_on_target"] == pytest.approx(1.0)  # cut-off is inclusive
    overall = summarize_gradcamo(table, cutoff=0.3)
    assert overall.loc[0, "n"] == 6 and overall.loc[0, "n_undefined"] == 2
    assert overall.loc[0, "mean"] == pytest.approx(np.mean([0.1, 0.3, 0.5, 0.25]))
    assert overall.loc[0, "share_on_target"] == pytest.approx(2 / 4)
    with pytest.raises(InputError, match="no column"):
        summarize_gradcamo(table, by="well")


def test_summary_of_a_profiles_dataset_is_per_layer():
    import xarray as xr

    ds = xr.Dataset(
        {"gradcamo": (("cell", "layer"), np.array([[0.1, 0.6], [np.nan, 0.2], [0.4, 0.9]]))},
        coords={"layer": ["head", "stage4"], "treatment": ("cell", ["a", "a", "b"])},
    )
    out = summarize_gradcamo(ds, by="treatment").set_index(["layer", "treatment"])
    assert out.loc[("head", "a"), "n_undefined"] == 1
    assert out.loc[("stage4", "a"), "mean"] == pytest.approx(0.4)
    assert out.loc[("stage4", "b"), "share_on_target"] == pytest.approx(1.0)
