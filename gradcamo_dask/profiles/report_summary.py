"""The report's plain-language summary: baseline, accuracy, a verdict, what to do next, a glossary.

A Grad-CAMO score means little on its own: a map that spreads its attention evenly
over the crop (a "uniform map") scores the cell mask's share of the crop volume.
:func:`plain_summary` sets the scores of one layer beside that baseline and beside the
model's accuracy against chance, checks whether the layer's map is fine enough to
localise a cell at all, and turns that into a verdict and next steps that
:func:`summary_html` writes at the top of the report.
"""

from __future__ import annotations

import html
import json
import math
from typing import Any

import numpy as np
import xarray as xr

from gradcamo_dask.profiles.export import str_values

__all__ = ["GLOSSARY", "MIN_LOCALISING_GRID", "can_localise", "details_html", "model_accuracy", "plain_summary",
           "summary_html", "uniform_baseline"]

#: A map needs at least this many cells in y and in x to say where in the crop a cell is.
MIN_LOCALISING_GRID = 3

#: Clearly above the uniform baseline: mean Grad-CAMO at least this many times the baseline's mean.
CLEAR_RATIO = 1.5

GLOSSARY = {
    "Grad-CAM": "a heatmap of where a trained network looked when it made its prediction, computed from the "
                "gradients of the predicted class at one layer; coarse: one value per cell of that layer's grid.",
    "Grad-CAMO": "the share of a cell's Grad-CAM attention that falls inside the cell's own mask, from 0 (all "
                 "of it on neighbours or background) to 1 (all of it on the cell); undefined when the map is "
                 "all zero.",
    "uniform baseline": "the Grad-CAMO a map with the same value everywhere would get: the mask's volume share "
                        "of the crop. A layer or model that does not localise scores about this.",
    "layer grid": "the size (z x y x x) of the chosen layer's feature map; a map of fewer than 3 x 3 in y and x "
                  "cannot tell a cell centred in its crop from its surroundings.",
    "ZCA whitening": "a linear transform, fit on control cells, that decorrelates the features and scales each "
                     "to unit variance while staying as close as possible to the original features.",
    "Ledoit-Wolf": "a shrinkage of the covariance toward a scaled identity, used when there are too few control "
                   "cells to estimate the covariance reliably.",
    "UMAP": "a 2D map of the cells in which cells with similar profiles lie close together.",
    "cut-off": "the Grad-CAMO above which a profile counts as 'on target' (paper: 0.25).",
}


def can_localise(grid: Any) -> bool | None:
    """Whether a map of ``grid`` (z, y, x cells) can localise a cell; None when unknown."""
    if grid is None or len(grid) < 2:
        return None
    return int(grid[-2]) >= MIN_LOCALISING_GRID and int(grid[-1]) >= MIN_LOCALISING_GRID


def uniform_baseline(profiles: xr.Dataset, crop_zyx: tuple[int, int, int]) -> np.ndarray | None:
    """Per cell, the Grad-CAMO of a uniform map: the cell's volume inside its crop over the crop volume.

    Parameters
    ----------
    profiles : xarray.Dataset
        With ``volume_voxels`` and the ``bbox_*`` coords (voxels) of the cell table.
    crop_zyx : (int, int, int)
        The crop grid, voxels.

    Returns
    -------
    numpy.ndarray or None
        (cell,) in [0, 1]; a cell wider than its crop counts with the part of its bounding box inside
        the crop. None when the profiles lack ``volume_voxels``.
    """
    if "volume_voxels" not in profiles.coords:
        return None
    volume = np.asarray(profiles["volume_voxels"].values, dtype=np.float64)
    inside = np.ones_like(volume)
    for axis, size in zip("zyx", crop_zyx):
        lo, hi = f"bbox_{axis}0", f"bbox_{axis}1"
        if lo in profiles.coords and hi in profiles.coords:
            extent = np.asarray(profiles[hi].values, dtype=np.float64) - np.asarray(profiles[lo].values, np.float64)
            inside *= np.clip(size / np.maximum(extent, 1.0), 0.0, 1.0)
    return np.clip(volume * inside / float(np.prod(crop_zyx)), 0.0, 1.0)


def model_accuracy(profiles: xr.Dataset) -> dict | None:
    """Share of cells whose predicted class is their treatment, beside chance (1 / number of classes).

    Returns None when the profiles lack ``predicted``, class names or treatments, or when no
    cell's treatment is one of the model's classes (new compounds scored with ``--any-classes``).
    """
    if "predicted" not in profiles or "class" not in profiles.coords or "treatment" not in profiles.coords:
        return None
    classes = str_values(profiles["class"].values)
    predicted = np.asarray(profiles["predicted"].values).astype(int)
    treatment = str_values(profiles["treatment"].values)
    known = np.isin(treatment, classes) & (predicted >= 0) & (predicted < len(classes))
    if not known.any():
        return None
    correct = classes[predicted[known]] == treatment[known]
    return {"accuracy": float(correct.mean()), "chance": 1.0 / len(classes), "n_cells": int(known.sum()),
            "n_classes": len(classes)}


def _verdict(mean: float, base: float, grid_ok: bool | None, accuracy: dict | None) -> tuple[str, str]:
    """(level, sentence): level is "good", "weak" or "bad"."""
    ratio = mean / base if base > 0 else math.inf
    learned = accuracy is None or accuracy["accuracy"] > accuracy["chance"] + 0.1
    if grid_ok is False:
        return "bad", ("This layer's map is too coarse to localise a cell, so its Grad-CAMO says little about "
                       "whether the profiles describe their own cells: at this grid the score mostly follows the "
                       "uniform baseline.")
    if not learned:
        return "bad", ("The model predicts treatments hardly better than chance, so its attention maps, and the "
                       "profiles built from it, are not yet trustworthy.")
    if ratio >= CLEAR_RATIO:
        return "good", (f"The model's attention concentrates on the cells: mean Grad-CAMO is {ratio:.1f} times "
                        "that of a uniform map. Profiles above the cut-off can be used; check the gallery.")
    return "weak", (f"The model's attention is about as spread as a uniform map (mean Grad-CAMO {ratio:.1f} times "
                    "the baseline): many profiles may describe neighbours or background.")


def _next_steps(level: str, grid_ok: bool | None, finer: list[str], accuracy: dict | None) -> list[str]:
    steps = []
    if grid_ok is False:
        steps.append("score a layer with a map of at least 3 x 3 in y and x (" + (
            "scored here: " + ", ".join(finer) if finer else "e.g. an earlier block; `--layers`") +
            "), or train at a larger model grid (`train --input-shape`) so deeper maps grow")
    if accuracy is not None and accuracy["accuracy"] <= accuracy["chance"] + 0.1:
        steps.append("train longer or on more cells (`train --epochs`, more wells or sites) until the held-out "
                     "accuracy is clearly above chance")
    if level == "weak":
        steps.append("try the Grad-CAMO regulariser (`train --regularizer`) and compare the layers ranked below")
    if level == "good":
        steps.append("keep only on-target profiles (`filter_profiles`, or the Metadata_cqc_* flags of the "
                     "exported table) before aggregating")
    steps.append("check the example cells below: the heatmap should sit on the outlined cell, not beside it")
    return steps


def plain_summary(profiles: xr.Dataset, scores: np.ndarray, layer: str, provenance: dict, cutoff: float,
                  crop_zyx: tuple[int, int, int] | None) -> dict:
    """Baseline, accuracy, grid check, verdict and next steps for one scored layer.

    Parameters
    ----------
    profiles : xarray.Dataset
        The profiles the report is about.
    scores : numpy.ndarray
        (cell,) Grad-CAMO of ``layer`` (NaN: undefined).
    layer : str
        The reported layer.
    provenance : dict
        The profiles' provenance (``layer_grids`` gives each scored layer's map grid).
    cutoff : float
        The on-target cut-off.
    crop_zyx : (int, int, int) or None
        The crop grid in voxels; None when unknown (no baseline then).
    """
    grids = provenance.get("layer_grids") or {}
    grid = grids.get(layer)
    grid_ok = can_localise(grid)
    finer = [name for name, g in grids.items() if can_localise(g)]
    defined = ~np.isnan(scores)
    mean = float(np.mean(scores[defined])) if defined.any() else math.nan
    baseline = uniform_baseline(profiles, crop_zyx) if crop_zyx is not None else None
    accuracy = model_accuracy(profiles)
    out: dict[str, Any] = {"layer": layer, "grid": list(grid) if grid is not None else None,
                           "can_localise": grid_ok, "layers_that_localise": finer, "gradcamo_mean": mean,
                           "cutoff": cutoff, "accuracy": accuracy}
    if baseline is not None and defined.any():
        base = float(np.mean(baseline[defined]))
        out.update(uniform_mean=base, ratio_to_uniform=mean / base if base > 0 else None,
                   share_above_uniform=float(np.mean(scores[defined] > baseline[defined])))
    else:
        base = math.nan
        out.update(uniform_mean=None, ratio_to_uniform=None, share_above_uniform=None)
    if not defined.any():
        level, text = "bad", "No cell has a defined Grad-CAMO at this layer (every map is all zero)."
    elif math.isnan(base):
        level, text = "weak", "No uniform baseline could be computed (the cell table lacks volumes or the crop size)."
    else:
        level, text = _verdict(mean, base, grid_ok, accuracy)
    out.update(level=level, verdict=text, next_steps=_next_steps(level, grid_ok, finer, accuracy))
    return out


def _number(value: Any, form: str = ".3f") -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, form)


def summary_html(plain: dict) -> str:
    """The opening section of the report: what Grad-CAMO is, the verdict with its figures, next steps."""
    e = html.escape
    colour = {"good": "#e7f6e7;border-left:4px solid #2e8b57", "weak": "#fff4e5;border-left:4px solid #f0a020",
              "bad": "#fdecea;border-left:4px solid #d93025"}[plain["level"]]
    acc = plain.get("accuracy")
    grid = plain.get("grid")
    rows = [("mean Grad-CAMO", _number(plain["gradcamo_mean"])),
            ("uniform-map baseline (mask's share of the crop)", _number(plain.get("uniform_mean"))),
            ("ratio to the baseline", _number(plain.get("ratio_to_uniform"), ".2f")),
            ("cells above their own baseline", _number(plain.get("share_above_uniform"), ".0%")),
            ("model accuracy (predicted = treatment)",
             f"{acc['accuracy']:.2f} on {acc['n_cells']} cells (chance {acc['chance']:.2f}, {acc['n_classes']} "
             "classes)" if acc else "– (no predictions or treatments to compare)"),
            (f"grid of layer {plain['layer']}", " x ".join(map(str, grid)) if grid else "unknown")]
    table = "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in rows)
    parts = [
        "<section id='summary'><h2>In short</h2>",
        "<p><b>Grad-CAMO</b> asks, for every cell, how much of the model's attention (its Grad-CAM heatmap) "
        "lies inside that cell's own outline. High: the profile describes the cell; low: it describes "
        "neighbours or background.</p>",
        f"<div class='verdict' style='background:{colour};padding:0.5em 1em'><b>Verdict:</b> "
        f"{e(plain['verdict'])}</div>",
    ]
    if plain.get("can_localise") is False:
        parts.append(f"<div class='warning' style='background:#fdecea;border-left:4px solid #d93025;padding:0.5em "
                     f"1em;margin-top:0.5em'><b>Warning:</b> layer <code>{e(plain['layer'])}</code> has a "
                     f"{e(' x '.join(map(str, grid)))} map, fewer than {MIN_LOCALISING_GRID} x "
                     f"{MIN_LOCALISING_GRID} in y and x: it cannot localise a cell.</div>")
    parts.append(f"<table class='t verdict-figures'>{table}</table>")
    parts.append("<h3>What to do next</h3><ul>" + "".join(f"<li>{e(s)}</li>" for s in plain["next_steps"])
                 + "</ul></section>")
    return "\n".join(parts)


def details_html(provenance: Any) -> str:
    """A folded section with the glossary and the raw provenance JSON."""
    e = html.escape
    terms = "".join(f"<dt><b>{e(k)}</b></dt><dd>{e(v)}</dd>" for k, v in GLOSSARY.items())
    return ("<details id='details'><summary>Glossary and provenance (how these results were made)</summary>"
            f"<h3>Glossary</h3><dl class='note'>{terms}</dl>"
            "<h3>Provenance</h3><pre class='note'>" + e(json.dumps(provenance, indent=2, default=str)) +
            "</pre></details>")
