"""Profile quality (copairs mAP of treatment retrieval) and the Grad-CAMO filtering comparison."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from gradcamo_dask.errors import InputError
from gradcamo_dask.profiles.quality import filtering_effect, profile_quality


def _profiles(n=60, separation=3.0, seed=0):
    rng = np.random.default_rng(seed)
    treatment = np.repeat(["control", "drug"], n // 2)
    x = rng.normal(size=(n, 8))
    x[treatment == "drug", :3] += separation
    return x, pd.DataFrame({"treatment": treatment})


def test_separated_treatments_score_high_and_noise_scores_chance():
    x, meta = _profiles(separation=4.0)
    good = profile_quality(x, meta, null_size=100)
    assert set(good["treatment"]) == {"control", "drug"}
    assert (good["mean_average_precision"] > 0.9).all() and (good["p_value"] < 0.05).all()
    noise, _ = _profiles(separation=0.0, seed=1)
    bad = profile_quality(noise, meta, null_size=100)
    assert abs(bad["mean_average_precision"].mean() - bad["chance"].mean()) < 0.12
    assert (good["n"] == 30).all() and np.allclose(good["chance"], 29 / 59)


def test_filter_that_keeps_informative_cells_beats_random_removal():
    x, meta = _profiles(n=80, separation=3.0, seed=2)
    rng = np.random.default_rng(3)
    informative = rng.random(80) < 0.5
    x[~informative, :3] = rng.normal(size=((~informative).sum(), 3))  # half the cells lose their phenotype
    scores = np.where(informative, 0.6, 0.1)
    scores[0] = np.nan  # undefined counts as off target
    out = filtering_effect(x, meta, scores, draws=4, null_size=50)
    assert out["n_kept"] == int(informative[1:].sum())
    assert out["filtered"] > out["random_mean"] + 0.1
    assert out["filtered"] > out["all"]
    assert len(out["random_draws"]) == 4


def test_bad_inputs_are_refused():
    x, meta = _profiles()
    with pytest.raises(InputError, match="one row per metadata row"):
        profile_quality(x[:5], meta)
    with pytest.raises(InputError, match="no 'dose' column"):
        profile_quality(x, meta, by="dose")
    with pytest.raises(InputError, match="two 'treatment' groups"):
        profile_quality(x[:30], meta.iloc[:30])
    x[0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        profile_quality(x, meta)
    with pytest.raises(InputError, match="one Grad-CAMO score per profile"):
        filtering_effect(np.ones((4, 2)), meta.iloc[:4], [0.1])
