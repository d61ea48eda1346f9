"""Profile quality: how well single-cell profiles retrieve their own treatment.

:func:`profile_quality` is copairs' mean average precision (mAP) of treatment
retrieval: each profile is a query, profiles of the same treatment are its
positives, profiles of any other treatment its negatives, ranked by cosine
similarity; the average precision of each query is averaged per treatment, with a
permutation p-value from copairs. :func:`filtering_effect` asks whether a Grad-CAMO
filter improves it: mAP of all cells, of cells scoring at least the cut-off, and of
as many cells kept at random (several draws), on the same features.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd

from gradcamo_dask.errors import InputError
from gradcamo_dask.profiles.qc import DEFAULT_CUTOFF

__all__ = ["filtering_effect", "profile_quality"]


def _check(features: np.ndarray, meta: pd.DataFrame, by: str) -> np.ndarray:
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) != len(meta):
        raise InputError(f"features must be (cells, features) with one row per metadata row; got {features.shape} "
                         f"for {len(meta)} rows")
    if by not in meta:
        raise InputError(f"metadata has no {by!r} column (it has {list(meta.columns)})")
    if not np.isfinite(features).all():
        raise InputError("features hold NaN or inf; drop or impute those cells before measuring profile quality")
    return features


def profile_quality(
    features: np.ndarray,
    meta: pd.DataFrame,
    by: str = "treatment",
    *,
    standardize: bool = True,
    null_size: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """Mean average precision of retrieving each profile's ``by`` group (copairs).

    Parameters
    ----------
    features : array (cells, features)
        Profiles, e.g. deep features of one layer.
    meta : DataFrame
        One row per profile with the ``by`` column.
    by : str
        Column whose equal values are positives (default ``"treatment"``).
    standardize : bool
        Z-score each feature over these cells first (so that no feature's scale
        dominates the cosine similarity); constant features become 0.
    null_size, seed
        Size and seed of copairs' permutation null for the p-values.

    Returns
    -------
    pandas.DataFrame
        One row per group: ``by``, ``n``, ``mean_average_precision``, ``p_value``,
        ``chance`` (the share of positives among the other profiles, the AP of a
        random ranking).
    """
    from copairs.map import average_precision, mean_average_precision

    x = _check(features, meta, by)
    groups = meta[by].astype(str).reset_index(drop=True)
    if groups.nunique() < 2:
        raise InputError(f"profile quality needs at least two {by!r} groups, got {sorted(groups.unique())}")
    if standardize:
        sd = x.std(axis=0)
        x = (x - x.mean(axis=0)) / np.where(sd > 0, sd, 1.0)
    table = pd.DataFrame({by: groups})
    logging.getLogger("copairs").setLevel(logging.WARNING)
    ap = average_precision(table, x, pos_sameby=[by], pos_diffby=[], neg_sameby=[], neg_diffby=[by],
                           progress_bar=False)
    result = mean_average_precision(ap, [by], null_size=null_size, threshold=0.05, seed=seed, progress_bar=False,
                                    max_workers=1)
    sizes = groups.value_counts()
    out = result[[by, "mean_average_precision", "p_value"]].copy()
    out.insert(1, "n", [int(sizes[g]) for g in out[by]])
    out["chance"] = [(sizes[g] - 1) / (len(groups) - 1) for g in out[by]]
    return out.reset_index(drop=True)


def filtering_effect(
    features: np.ndarray,
    meta: pd.DataFrame,
    scores: Sequence[float],
    by: str = "treatment",
    *,
    cutoff: float = DEFAULT_CUTOFF,
    draws: int = 5,
    seed: int = 0,
    null_size: int = 200,
) -> dict:
    """Does keeping cells with Grad-CAMO >= ``cutoff`` improve profile quality?

    Returns a dict with the mean over groups of mAP (``all``, ``filtered``) and the
    mean and sd of ``random`` over ``draws`` random subsets of the filtered size,
    plus ``n_all``, ``n_kept`` and per-draw figures. Undefined scores (NaN) count as
    not on target.
    """
    x = _check(features, meta, by)
    s = np.asarray(scores, dtype=np.float64)
    if s.shape != (len(meta),):
        raise InputError(f"need one Grad-CAMO score per profile, got {s.shape} for {len(meta)} profiles")
    keep = np.flatnonzero(np.nan_to_num(s, nan=-1.0) >= cutoff)
    meta = meta.reset_index(drop=True)

    def quality(rows: np.ndarray) -> float:
        sub = meta.iloc[rows]
        if len(rows) < 4 or sub[by].nunique() < 2 or sub[by].value_counts().min() < 2:
            return float("nan")
        return float(profile_quality(x[rows], sub, by, null_size=null_size, seed=seed)["mean_average_precision"]
                     .mean())

    rng = np.random.default_rng(seed)
    random = [quality(np.sort(rng.choice(len(meta), size=len(keep), replace=False))) for _ in range(draws)]
    return {"n_all": int(len(meta)), "n_kept": int(len(keep)), "cutoff": float(cutoff),
            "all": quality(np.arange(len(meta))), "filtered": quality(keep),
            "random_mean": float(np.nanmean(random)) if np.isfinite(random).any() else float("nan"),
            "random_sd": float(np.nanstd(random)) if np.isfinite(random).any() else float("nan"),
            "random_draws": random}
