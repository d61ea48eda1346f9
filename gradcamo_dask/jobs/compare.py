"""Ranking designs: several model bundles and layers scored on the same held-out cells.

The paper's "Grad-CAMO as a heuristic for design choices": each bundle explains the
same cells in ONE :func:`~gradcamo_dask.engine.explain.explain` pass (all its layers,
or a ViT's attention sources, at once); per model and layer the table gives the
mean ± sd Grad-CAMO, the share at or above the cut-off, the accuracy and, where
copairs can compute it, the mAP of treatment retrieval from the layer's features,
each beside its reference (uniform map, chance accuracy, chance mAP). Rows are
ranked by mean Grad-CAMO, layers whose map can localise a cell (at least 3 x 3 in y
and x) first.

Cells: the test wells every bundle names in its training provenance (the common
held-out cells), else all cells, said in the table (``cells`` column). They are
found once, with the largest crop of all bundles, so that every bundle scores the
same cells.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gradcamo_dask.engine.gradcamo import DEFAULT_CUTOFF
from gradcamo_dask.errors import InputError

__all__ = ["common_cells", "compare_models", "held_out_wells", "model_layers", "write_comparison"]

COLUMNS = ["rank", "model", "layer", "grid", "localises", "cells", "n", "mean", "sd", "share_on_target", "n_undefined",
           "mean_uniform", "accuracy", "accuracy_chance", "map", "map_chance"]


def held_out_wells(bundles: Sequence[Any]) -> list[str] | None:
    """Test wells named by every bundle's training provenance (their intersection), or None when one names none."""
    wells: set[str] | None = None
    for bundle in bundles:
        test = ((bundle.config.provenance or {}).get("split_wells") or {}).get("test")
        if not test:
            return None
        wells = set(map(str, test)) if wells is None else wells & set(map(str, test))
    return sorted(wells) if wells else None


def common_cells(labels: Any, platemap: pd.DataFrame, bundles: Sequence[Any], *, max_cells: int | None = None,
                 seed: int = 0) -> tuple[pd.DataFrame, str]:
    """The cells every bundle scores: held-out wells (else all), built with the largest crop of all bundles.

    Returns the cell table (``max_cells`` drawn at random with ``seed`` when more) and
    ``"held-out"`` or ``"all"``.
    """
    from gradcamo_dask.cells import cell_table

    shapes = [list(b.config.crop_shape) for b in bundles]
    if len({len(s) for s in shapes}) != 1:
        raise InputError(f"the bundles mix 2D and 3D crops {shapes}; compare models of one dimensionality at a time")
    size = tuple(None if any(s[i] is None for s in shapes) else max(int(s[i]) for s in shapes)
                 for i in range(len(shapes[0])))
    table = cell_table(labels, platemap, size=size)
    table = table[~table["touches_border"].astype(bool)] if "touches_border" in table else table
    wells = held_out_wells(bundles)
    kind = "all"
    if wells is not None and table["well"].astype(str).isin(wells).any():
        table, kind = table[table["well"].astype(str).isin(wells)], "held-out"
    if max_cells is not None and len(table) > max_cells:
        keep = np.sort(np.random.default_rng(seed).choice(len(table), size=int(max_cells), replace=False))
        table = table.iloc[keep]
    if table.empty:
        raise InputError("no cells to compare on: the plate's held-out wells hold no whole cells; use a larger plate")
    return table.reset_index(drop=True), kind


def model_layers(bundle: Any, layers: Sequence[str] | None) -> list[str]:
    """The layers (or attention sources) of ``layers`` that this bundle's model has; default the bundle's own."""
    from gradcamo_dask.engine.attention import ATTENTION_SOURCES

    if not layers:
        return list(bundle.config.layers)
    names = set(dict(bundle.model.named_modules()))
    is_vit = hasattr(bundle.model, "vit")
    chosen = [n for n in layers if n in names or (is_vit and n in ATTENTION_SOURCES)]
    if not chosen:
        raise InputError(f"none of the layers {list(layers)} exists in {bundle.path} "
                         f"({bundle.config.architecture.get('name')}); its default layers are {bundle.config.layers}")
    return chosen


def _crops(image: Any, labels: Any, table: pd.DataFrame, bundle: Any) -> tuple[np.ndarray, np.ndarray]:
    """Normalised crops and masks of the table's cells at this bundle's crop grid (NumPy)."""
    import dask

    from gradcamo_dask.cells import extract_crops
    from gradcamo_dask.normalize import normalize_crops

    cells = table.copy()
    cells.attrs["crop_size"] = tuple(bundle.config.crop_shape)  # a smaller crop of cells that fit the largest
    crops, masks = extract_crops(image, labels, cells, size=tuple(bundle.config.crop_shape),
                                 outside=bundle.config.crop_fill)
    crops, masks = dask.compute(crops, masks)
    return normalize_crops(crops, bundle.config.normalization), masks


def _quality(features: np.ndarray, treatments: pd.Series) -> tuple[float, float]:
    """(mAP, chance mAP) of treatment retrieval (copairs), NaN where it cannot be computed."""
    from gradcamo_dask.profiles.quality import profile_quality

    try:
        table = profile_quality(features, pd.DataFrame({"treatment": treatments.astype(str).to_numpy()}),
                                null_size=100)
    except (InputError, ImportError, ValueError):  # one treatment, constant features, copairs missing
        return math.nan, math.nan
    return float(table["mean_average_precision"].mean()), float(table["chance"].mean())


def _score_bundle(bundle: Any, name: str, image: Any, labels: Any, table: pd.DataFrame, layers: Sequence[str] | None,
                  cutoff: float, batch_size: int) -> pd.DataFrame:
    """One explain pass of one bundle over the cells: one row per layer."""
    from gradcamo_dask.engine.explain import explain
    from gradcamo_dask.profiles.qc import rank_layer_scores

    chosen = model_layers(bundle, layers)
    crops, masks = _crops(image, labels, table, bundle)
    result = explain(bundle.model, crops, masks, layers=chosen, batch_size=batch_size)
    rows = rank_layer_scores({n: result.gradcamo[n] for n in chosen}, result.grids, cutoff)
    classes = list(bundle.config.classes)
    truth = np.array([classes.index(t) if t in classes else -1 for t in table["treatment"].astype(str)])
    known = truth >= 0
    rows["model"] = name
    rows["mean_uniform"] = float(masks.reshape(len(masks), -1).mean(axis=1).mean())  # G constant: Eq. 5 = mask share
    rows["accuracy"] = float((result.predicted[known] == truth[known]).mean()) if known.any() else math.nan
    rows["accuracy_chance"] = float(np.bincount(truth[known]).max() / known.sum()) if known.any() else math.nan
    quality = {n: _quality(result.features[n], table["treatment"]) for n in chosen}
    rows["map"] = [quality[n][0] for n in rows["layer"]]
    rows["map_chance"] = [quality[n][1] for n in rows["layer"]]
    return rows


def compare_models(image: Any, labels: Any, bundles: Sequence[Any], layers: Sequence[str] | None = None, *,
                   platemap: Any = None, cutoff: float = DEFAULT_CUTOFF, max_cells: int | None = 2000,
                   batch_size: int = 8, seed: int = 0) -> pd.DataFrame:
    """Score the same cells with several bundles and layers and rank (model, layer) by mean Grad-CAMO.

    Parameters
    ----------
    image, labels : DataArray
        The plate ``(well, site, c, z, y, x)`` and its labels.
    bundles : list of str, Path or Bundle
        Model bundles; each is run once over the cells.
    layers : list of str, optional
        Layers or attention sources, each used by the bundles that have it; default each bundle's own.
    platemap : DataFrame or path, optional
        Default: the plate's own.
    cutoff : float
        On-target cut-off (paper 0.25).
    max_cells : int, optional
        Cells drawn at random (``seed``) when more are held out (default 2000; None: all).
    batch_size : int
        Cells per forward pass.

    Returns
    -------
    pandas.DataFrame
        One row per (model, layer), best first (localising maps first), columns :data:`COLUMNS`.
    """
    from gradcamo_dask.engine.bundles import open_bundle
    from gradcamo_dask.io.platemap import open_platemap, platemap_of
    from gradcamo_dask.jobs.dimensionality import check_bundle_dims
    from gradcamo_dask.profiles.qc import check_cutoff
    from gradcamo_dask.profiles.report_summary import can_localise

    cutoff = check_cutoff(cutoff)
    opened = [b if hasattr(b, "model") else open_bundle(b) for b in bundles]
    if not opened:
        raise InputError("give at least one model bundle to compare")
    names = _model_names(opened)
    for bundle in opened:
        bundle.check_fits(channels=[str(c) for c in image["c"].values])
        check_bundle_dims(bundle, image)  # a 3D bundle on a 2D plate, or the reverse: DimensionalityError, up front
    pm = platemap_of(image) if platemap is None else (platemap if isinstance(platemap, pd.DataFrame)
                                                      else open_platemap(platemap))
    table, kind = common_cells(labels, pm, opened, max_cells=max_cells, seed=seed)
    parts = [_score_bundle(b, n, image, labels, table, layers, cutoff, batch_size) for b, n in zip(opened, names)]
    out = pd.concat(parts, ignore_index=True)
    # A map under 3 x 3 in y and x cannot localise a cell (its Grad-CAMO is about the mask's share): ranked after.
    out["localises"] = [bool(can_localise(g)) for g in out["grid"]]
    out = out.sort_values(["localises", "mean"], ascending=[False, False], na_position="last")
    out["rank"] = np.arange(1, len(out) + 1)
    out["cells"] = kind
    out["grid"] = [" x ".join(map(str, g)) if not isinstance(g, str) else g for g in out["grid"]]
    return out[COLUMNS].reset_index(drop=True)


def _model_names(bundles: Sequence[Any]) -> list[str]:
    """Bundle folder names, made unique with their parent folder where they repeat."""
    names = [Path(b.path).name for b in bundles]
    if len(set(names)) < len(names):
        names = [f"{Path(b.path).parent.name}/{Path(b.path).name}" for b in bundles]
    return names


def write_comparison(table: pd.DataFrame, out: str | Path, *, plate: str = "plate") -> dict[str, Path]:
    """Write the ranking as ``compare.csv``, a Markdown report section ``compare.md`` and ``compare.html``.

    ``out`` is a folder, created if absent; only these three files are written in it.
    """
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"csv": folder / "compare.csv", "markdown": folder / "compare.md", "html": folder / "compare.html"}
    table.to_csv(paths["csv"], index=False)
    paths["markdown"].write_text(comparison_section(table, plate))
    shown = _rounded(table).to_html(index=False, na_rep="n/a")
    paths["html"].write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>Model comparison: {plate}"
                             f"</title></head><body><h2>Model comparison: {plate}</h2>\n<p>{_caption(table)}</p>\n"
                             f"{shown}\n</body></html>\n")
    return paths


def _rounded(table: pd.DataFrame) -> pd.DataFrame:
    return table.round({c: 3 for c in ("mean", "sd", "share_on_target", "mean_uniform", "accuracy",
                                       "accuracy_chance", "map", "map_chance")})


def _caption(table: pd.DataFrame) -> str:
    kind = table["cells"].iloc[0] if len(table) else "no"
    return (f"{int(table['n'].max()) if len(table) else 0} {kind} cells, the same for every model. Ranked by mean "
            "Grad-CAMO, maps that can localise a cell (>= 3 x 3 in y and x) first (share of attention inside the cell's mask; mean_uniform: the score of a uniform map, i.e. "
            "the mask's share of the crop); share_on_target: share at or above the cut-off; accuracy beside "
            "accuracy_chance (largest class share); mAP of treatment retrieval (copairs) beside its chance.")


def comparison_section(table: pd.DataFrame, plate: str = "plate") -> str:
    """The ranking as a Markdown report section (a heading, a caption, a table)."""
    shown = _rounded(table).copy()
    shown["grad-camo"] = [f"{m:.3f} ± {s:.3f}" for m, s in zip(table["mean"], table["sd"])]
    keep = ["rank", "model", "layer", "grid", "localises", "n", "grad-camo", "share_on_target", "mean_uniform", "accuracy",
            "accuracy_chance", "map", "map_chance"]
    lines = [f"## Model comparison: {plate}", "", _caption(table), "",
             "| " + " | ".join(keep) + " |", "|" + "---|" * len(keep)]
    lines += ["| " + " | ".join("n/a" if isinstance(v, float) and math.isnan(v) else str(v) for v in row) + " |"
              for row in shown[keep].itertuples(index=False)]
    return "\n".join(lines) + "\n"
