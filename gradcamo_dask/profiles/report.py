"""The Grad-CAMO report: an HTML page with the figures the paper argues with, and a JSON summary.

:func:`write_report` turns a profiles dataset into ``DIR/index.html``,
``DIR/summary.json`` and ``DIR/figures/*.png``:

1. Grad-CAMO counts and summary tables (overall, by treatment, by dose, by well and
   site; layers ranked by mean Grad-CAMO when several were scored);
2. Grad-CAMO distributions by treatment and by site (paper Fig. 5B);
3. UMAP of the whitened deep features (ZCA fit on control cells) coloured by
   treatment and by site (paper Fig. 4A);
4. a gallery of example cells with high, middle and low Grad-CAMO: the central z
   slice of the crop with the cell's outline, and the same slice under the Grad-CAM
   map (paper Figs. 4B and 5A). The crops are read back from the plate and labels
   recorded in the provenance (only the sites of the chosen cells), and the stored
   low-resolution CAMs (``cam_lowres_<k>``) are upsampled trilinearly to the crop
   grid, so the model never runs again;
5. the UMAP again after keeping only on-target profiles (Grad-CAMO >= cut-off).

Parts that cannot be made are listed, with the reason, at the top of the page and in
the JSON (``missing``) instead of failing: profiles without Grad-CAMO variables, no
deep features, no control cells (then the UMAP uses standardised, not whitened,
features and says so), no plate path in the provenance, too few cells.
"""

from __future__ import annotations

import html
import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from gradcamo_dask.errors import GradcamoError, InputError
from gradcamo_dask.profiles.export import str_values
from gradcamo_dask.profiles.qc import (
    DEFAULT_CUTOFF,
    gradcamo_counts,
    rank_layers,
    scored_layers,
    summarize_gradcamo,
)
from gradcamo_dask.profiles.store import open_profiles
from gradcamo_dask.provenance import read_provenance

__all__ = ["write_report"]

FIGURES = {
    "gradcamo_by_treatment": "Grad-CAMO by treatment",
    "gradcamo_by_site": "Grad-CAMO by site",
    "umap": "UMAP of whitened deep features",
    "gallery": "Example cells: high, middle and low Grad-CAMO",
    "umap_filtered": "UMAP after Grad-CAMO filtering",
}
NO_SCORES = ("the profiles have no Grad-CAMO variables (gradcamo, cam_inside, cam_total): they were computed "
             "without masks or without Grad-CAM; rerun scoring with masks to get this part")


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, pd.DataFrame):
        return [_jsonable(r) for r in value.to_dict(orient="records")]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def _site_labels(profiles: xr.Dataset) -> np.ndarray:
    wells = str_values(profiles["well"].values)
    sites = np.asarray(profiles["site"].values).astype(int)
    return np.array([f"{w}/s{s}" for w, s in zip(wells, sites)])


def _ordered(values: np.ndarray, profiles: xr.Dataset | None = None, by_dose: bool = False) -> list[str]:
    unique = list(dict.fromkeys(values.tolist()))
    if by_dose and profiles is not None and "dose" in profiles.coords:
        dose = {t: float(d) for t, d in zip(values, np.asarray(profiles["dose"].values, dtype=float))}
        return sorted(unique, key=lambda t: (dose.get(t, math.inf), t))
    return sorted(unique)


def _treatments(profiles: xr.Dataset) -> np.ndarray:
    if "treatment" in profiles.coords:
        return str_values(profiles["treatment"].values)
    return np.full(profiles.sizes["cell"], "(no treatment)")


# ------------------------------------------------------------------- UMAP


def _feature_matrix(profiles: xr.Dataset, layer: str | None) -> tuple[xr.Dataset, str]:
    """The deep features of the report's layer (all features when the layer has none)."""
    deep = profiles["deep"]
    if layer is not None and "feature_layer" in deep.coords:
        pick = str_values(deep["feature_layer"].values) == str(layer)
        if pick.any() and not pick.all():
            return profiles.isel(feature=np.flatnonzero(pick)), f"layer {layer}"
    return profiles, "all layers" if "feature_layer" in deep.coords and len(
        set(str_values(deep["feature_layer"].values))) > 1 else "features"


def _whitened(profiles: xr.Dataset, method: str, notes: list[str]) -> tuple[np.ndarray, str]:
    """Whitened deep features (fit on controls) or, without controls, standardised ones."""
    from gradcamo_dask.profiles.whitening import fit_whitening

    values = np.asarray(profiles["deep"].values, dtype=np.float64)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            whitening = fit_whitening(profiles, method=method)
        for w in caught:
            notes.append(f"whitening: {w.message}")
        column = {str(f): j for j, f in enumerate(profiles["feature"].values)}
        used = values[:, [column[f] for f in whitening.feature_names]]
        return whitening.transform_array(used), f"{method}-whitened on {whitening.n_controls} control cells"
    except InputError as err:
        notes.append(f"whitening not possible ({err}); the UMAP uses standardised deep features instead")
        std = values.std(axis=0)
        return (values - values.mean(axis=0)) / np.where(std > 0, std, 1.0), "standardised (not whitened)"


def _umap(x: np.ndarray, seed: int) -> np.ndarray:
    import umap

    n = len(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # n_jobs overridden by random_state; tiny-graph notices
        reducer = umap.UMAP(n_neighbors=max(2, min(15, n - 1)), min_dist=0.1, random_state=seed,
                            init="spectral" if n > 50 else "random")
        return np.asarray(reducer.fit_transform(np.nan_to_num(x)), dtype=np.float64)


# ---------------------------------------------------------------- gallery


def _paths_from_provenance(prov: dict) -> tuple[Any, Any, Any]:
    def find(*keys: str) -> Any:
        for key in keys:
            for scope in (prov, prov.get("inputs") or {}, prov.get("parameters") or {}):
                if isinstance(scope, dict) and scope.get(key) not in (None, ""):
                    return scope[key]
        return None

    # paths only: score_plate's provenance also has "plate", the plate's NAME
    plate = find("plate_path", "image_path")
    labels = find("labels_path")
    size = find("crop_size", "crop_shape", "size")
    if size is None and isinstance(prov.get("bundle"), dict):
        size = prov["bundle"].get("crop_shape")
    return plate, labels, size


def _choose_examples(scores: np.ndarray, per_bin: int) -> list[tuple[str, np.ndarray]]:
    defined = np.flatnonzero(~np.isnan(scores))
    order = defined[np.argsort(scores[defined], kind="stable")]
    k = min(per_bin, max(len(order) // 3, 1))
    mid = len(order) // 2
    middle = order[max(mid - k // 2, 0): max(mid - k // 2, 0) + k]
    return [("high", order[::-1][:k]), ("middle", middle), ("low", order[:k])]


def _cam_variable(profiles: xr.Dataset, layer: str) -> str | None:
    for name, var in profiles.data_vars.items():
        if str(name).startswith("cam_lowres_") and str(var.attrs.get("layer")) == str(layer):
            return str(name)
    layers = scored_layers(profiles)
    name = f"cam_lowres_{layers.index(layer)}" if layer in layers else None
    return name if name in profiles else None


def _gallery_examples(profiles: xr.Dataset, layer: str, per_bin: int, channel: str | None,
                      plate_path: Any, labels_path: Any, size: Any) -> tuple[list, str, dict]:
    """Rows of gallery examples, the channel shown, and a check: the Grad-CAMO recomputed from
    the upsampled CAM and the mask read back, against the stored score (they agree when the
    crops read back are the crops that were scored)."""
    from gradcamo_dask.cells import crop_site
    from gradcamo_dask.engine.gradcamo import gradcamo_score, upsample_cam
    from gradcamo_dask.io.plate import open_labels, open_plate

    cam_name = _cam_variable(profiles, layer)
    if cam_name is None:
        raise _Missing(f"the profiles store no low-resolution CAMs for layer {layer!r} (cam_lowres_<k>)")
    if plate_path is None:
        raise _Missing("the provenance records no plate path to read the example crops from")
    image = open_plate(plate_path)
    labels = open_labels(labels_path or plate_path, like=image)
    channels = [str(c) for c in image["c"].values]
    shown = channel or ("DNA" if "DNA" in channels else channels[0])
    if shown not in channels:
        raise _Missing(f"channel {shown!r} is not in the plate (channels: {channels})")
    size = tuple(None if s is None else int(s) for s in size) if size is not None else (None, 128, 128)
    scores = np.asarray(profiles["gradcamo"].sel(layer=layer).values if "layer" in profiles["gradcamo"].dims
                        else profiles["gradcamo"].values, dtype=np.float64)
    picks = _choose_examples(scores, per_bin)
    wanted = sorted({int(i) for _, idx in picks for i in idx})
    coords = {c: np.asarray(profiles[c].values) for c in ("well", "site", "object_number", "center_z", "center_y",
                                                           "center_x")}
    crops_of: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    by_site: dict[tuple[str, int], list[int]] = {}
    for i in wanted:
        by_site.setdefault((str(coords["well"][i]), int(coords["site"][i])), []).append(i)
    c_index = channels.index(shown)
    for (well, site), rows in by_site.items():
        site_image = np.asarray(image.sel(well=well, site=site).values)
        site_labels = np.asarray(labels.sel(well=well, site=site).values)
        table = pd.DataFrame({c: coords[c][rows] for c in ("object_number", "center_z", "center_y", "center_x")})
        crops, masks = crop_site(site_image, site_labels, table, size, well=well, site=site)
        for j, i in enumerate(rows):
            crops_of[i] = (crops[j, c_index], masks[j])
    cams = np.asarray(profiles[cam_name].isel(cell=wanted).values, dtype=np.float32)
    cam_of = {i: cams[j] for j, i in enumerate(wanted)}
    rows_out, differences, cells_shown = [], [], []
    for label, idx in picks:
        examples = []
        for i in idx:
            crop, mask = crops_of[int(i)]
            full = upsample_cam(cam_of[int(i)], crop.shape)
            recomputed = float(gradcamo_score(full, mask)[0])
            differences.append(abs(recomputed - scores[i]) if math.isfinite(recomputed) else math.inf)
            cells_shown.append({"bin": label, "well": str(coords["well"][i]), "site": int(coords["site"][i]),
                                "object_number": int(coords["object_number"][i]), "gradcamo": float(scores[i])})
            zs = np.flatnonzero(mask.any(axis=(1, 2)))
            z = int((zs.min() + zs.max()) // 2) if zs.size else crop.shape[0] // 2
            examples.append({"image": crop[z], "cam": np.asarray(full[z]), "mask": mask[z],
                             "caption": f"{coords['well'][i]}/s{coords['site'][i]} #{coords['object_number'][i]}  "
                                        f"{scores[i]:.2f}"})
        rows_out.append((f"{label} Grad-CAMO", examples))
    check = {"channel": shown, "cells": cells_shown,
             "max_score_difference": max(differences) if differences else None}
    return rows_out, shown, check


class _Missing(Exception):
    """A report part that cannot be made; the message says why."""


# ------------------------------------------------------------------ write


def write_report(
    profiles: xr.Dataset | str | Path,
    out_dir: str | Path,
    *,
    cutoff: float = DEFAULT_CUTOFF,
    layer: str | None = None,
    whitening: str = "ZCA",
    gallery_per_bin: int = 4,
    channel: str | None = None,
    max_umap_cells: int = 20000,
    seed: int = 0,
    plate: str | Path | None = None,
    labels: str | Path | None = None,
) -> Path:
    """Write the HTML report, its figures and a JSON summary of profiles.

    Parameters
    ----------
    profiles : xarray.Dataset or path
        Profiles (CONTRACTS "Profiles"), or the Zarr store holding them.
    out_dir : str or Path
        Folder to write ``index.html``, ``summary.json`` and ``figures/`` into.
    cutoff : float
        Grad-CAMO cut-off for "on target" (paper: 0.25).
    layer : str, optional
        Scored layer to report (default: the first); its deep features feed the UMAPs.
    whitening : "ZCA", "PCA", "ZCA-cor" or "PCA-cor"
        Whitening fit on the control cells before UMAP.
    gallery_per_bin : int
        Example cells per score bin (high, middle, low).
    channel : str, optional
        Channel shown in the gallery (default DNA, else the first).
    max_umap_cells : int
        UMAP a random subset of at most this many cells (seeded).
    seed : int
        Seed of the UMAP and of the subset.
    plate, labels : path, optional
        Where to read the gallery crops (default: the paths in the provenance).

    Returns
    -------
    pathlib.Path
        The ``index.html`` written.
    """
    if not isinstance(profiles, xr.Dataset):
        profiles = open_profiles(profiles)
    if "cell" not in profiles.dims:
        raise InputError("profiles must have a 'cell' dim (CONTRACTS 'Profiles')")
    out = Path(out_dir)
    figures_dir = out / "figures"
    figures_dir.mkdir(parents=True, exist_ok=True)
    for old in figures_dir.glob("*.png"):  # a rerun never shows figures of an earlier run
        old.unlink()
    prov = read_provenance(profiles)
    layers = scored_layers(profiles)
    has_scores = bool(layers)
    if layer is not None and has_scores and str(layer) not in layers:
        raise InputError(f"layer {layer!r} has no Grad-CAMO scores; scored layers: {layers}")
    layer = str(layer) if layer is not None else (layers[0] if layers else None)
    n = int(profiles.sizes["cell"])
    treatments = _treatments(profiles)
    sites = _site_labels(profiles) if {"well", "site"} <= set(profiles.coords) else np.full(n, "?")
    treatment_order = _ordered(treatments, profiles, by_dose=True)
    site_order = _ordered(sites)

    figures: dict[str, Path] = {}
    missing: dict[str, str] = {}
    notes: list[str] = []
    tables: dict[str, pd.DataFrame] = {}
    summary: dict[str, Any] = {
        "plate": profiles.attrs.get("plate"), "n_cells": n, "n_wells": len(set(profiles["well"].values))
        if "well" in profiles.coords else None, "n_sites": len(site_order), "treatments": treatment_order,
        "layers": layers, "layer": layer, "cutoff": float(cutoff), "provenance": prov,
    }

    from gradcamo_dask.profiles import report_figures as figs

    # -- Grad-CAMO tables and distributions
    scores = None
    if has_scores and n:
        scores = np.asarray(profiles["gradcamo"].sel(layer=layer).values if "layer" in profiles["gradcamo"].dims
                            else profiles["gradcamo"].values, dtype=np.float64)
        summary["counts"] = gradcamo_counts(profiles, cutoff, layer)
        tables["Overall"] = summarize_gradcamo(profiles, cutoff=cutoff, layer=layer)
        for name, by in (("By treatment", ["treatment"]), ("By dose", ["dose"]), ("By well and site", ["well", "site"])):
            if all(b in profiles.coords for b in by):
                tables[name] = summarize_gradcamo(profiles, by=by, cutoff=cutoff, layer=layer)
        if len(layers) > 1:
            tables["Layers ranked by mean Grad-CAMO"] = rank_layers(profiles, cutoff)
        figures["gradcamo_by_treatment"] = figs.distribution_figure(
            figures_dir / "gradcamo_by_treatment.png", scores, treatments, treatment_order, cutoff,
            f"Grad-CAMO by treatment ({layer})", "treatment")
        figures["gradcamo_by_site"] = figs.distribution_figure(
            figures_dir / "gradcamo_by_site.png", scores, sites, site_order, cutoff, f"Grad-CAMO by site ({layer})",
            "well/site")
    else:
        reason = NO_SCORES if not has_scores else "the profiles hold no cells"
        for part in ("gradcamo_by_treatment", "gradcamo_by_site", "gallery", "umap_filtered"):
            missing[part] = reason
        missing["summary_tables"] = reason

    # -- UMAPs
    if "deep" not in profiles:
        missing["umap"] = "the profiles have no deep features (variable 'deep')"
        missing.setdefault("umap_filtered", missing["umap"])
    elif n < 10:
        missing["umap"] = f"only {n} cells: too few for a UMAP (need at least 10)"
        missing.setdefault("umap_filtered", missing["umap"])
    else:
        feats, which = _feature_matrix(profiles, layer)
        values, how = _whitened(feats, whitening, notes)
        rng = np.random.default_rng(seed)
        subset = np.sort(rng.choice(n, size=min(n, max_umap_cells), replace=False))
        if len(subset) < n:
            notes.append(f"UMAP of a random subset of {len(subset)} of {n} cells (max_umap_cells)")
        xy = _umap(values[subset], seed)
        figures["umap"] = figs.umap_figure(figures_dir / "umap.png", xy, treatments[subset], treatment_order,
                                           sites[subset], site_order, f"UMAP of deep features ({which}, {how})")
        summary["umap"] = {"features": which, "whitening": how, "n_cells": int(len(subset))}
        if scores is not None:
            on = subset[~np.isnan(scores[subset]) & (np.nan_to_num(scores[subset], nan=-1) >= cutoff)]
            if len(on) >= 10:
                xy_on = _umap(values[on], seed)
                figures["umap_filtered"] = figs.umap_figure(
                    figures_dir / "umap_filtered.png", xy_on, treatments[on], treatment_order, sites[on], site_order,
                    f"UMAP after filtering: {len(on)} cells with Grad-CAMO >= {cutoff:g} ({which}, {how})")
                summary["umap_filtered"] = {"n_cells": int(len(on))}
            else:
                missing["umap_filtered"] = f"only {len(on)} cells have Grad-CAMO >= {cutoff:g}: too few for a UMAP"

    # -- gallery
    if has_scores and n and "gallery" not in missing:
        prov_plate, prov_labels, size = _paths_from_provenance(prov)
        try:
            rows, shown, check = _gallery_examples(profiles, layer, gallery_per_bin, channel, plate or prov_plate,
                                                   labels or prov_labels, size)
            summary["gallery"] = check
            if check["max_score_difference"] is not None and not check["max_score_difference"] <= 1e-3:
                notes.append(f"gallery: the Grad-CAMO recomputed from the crops read back differs from the stored "
                             f"scores by up to {check['max_score_difference']:.3g}; the plate, labels or crop size "
                             f"used for the gallery may not be those that were scored")
            figures["gallery"] = figs.gallery_figure(
                figures_dir / "gallery.png", rows,
                f"Example cells ({shown}, central slice) and Grad-CAM of {layer}; yellow: the cell's mask")
        except _Missing as err:
            missing["gallery"] = str(err)
        except (GradcamoError, OSError, KeyError) as err:
            missing["gallery"] = f"could not read the example crops back ({type(err).__name__}: {err})"

    summary["figures"] = {k: str(v.relative_to(out)) for k, v in figures.items()}
    summary["missing"] = missing
    summary["notes"] = notes
    summary["tables"] = {k: v for k, v in tables.items()}
    json_path = out / "summary.json"
    json_path.write_text(json.dumps(_jsonable(summary), indent=2) + "\n")
    html_path = out / "index.html"
    html_path.write_text(_html(summary, figures, tables, missing, notes, out))
    return html_path


def _table_html(frame: pd.DataFrame) -> str:
    return frame.to_html(index=False, float_format=lambda v: f"{v:.3f}", na_rep="–", border=0, classes="t")


def _html(summary: dict, figures: dict[str, Path], tables: dict[str, pd.DataFrame], missing: dict[str, str],
          notes: Sequence[str], out: Path) -> str:
    e = html.escape
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>Grad-CAMO report</title>",
        "<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}"
        "img{max-width:100%;border:1px solid #ddd}table.t{border-collapse:collapse;font-size:13px;margin:0.5em 0}"
        "table.t td,table.t th{padding:2px 8px;border-bottom:1px solid #eee;text-align:right}"
        ".missing{background:#fff4e5;border-left:4px solid #f0a020;padding:0.5em 1em}"
        ".note{color:#555;font-size:13px}</style></head><body>",
        f"<h1>Grad-CAMO report: plate {e(str(summary.get('plate')))}</h1>",
        f"<p>{summary['n_cells']} cells, {summary.get('n_wells')} wells, {summary['n_sites']} sites; "
        f"treatments: {e(', '.join(map(str, summary['treatments'])))}. Reported layer: "
        f"<code>{e(str(summary.get('layer')))}</code>; cut-off {summary['cutoff']:g}.</p>",
    ]
    if missing:
        items = "".join(f"<li><b>{e(FIGURES.get(k, k.replace('_', ' ')))}</b>: {e(v)}</li>" for k, v in missing.items())
        parts.append(f"<div class='missing'><b>Missing parts</b><ul>{items}</ul></div>")
    counts = summary.get("counts")
    if counts:
        share = counts["share_on_target"]
        parts.append(
            f"<h2>Grad-CAMO at a glance</h2><p>{counts['n_on_target']} cells on target (Grad-CAMO &ge; "
            f"{counts['cutoff']:g}), {counts['n_off_target']} off target, {counts['n_undefined']} undefined (no "
            f"positive attention: counted apart, not as 0); share on target among defined scores: "
            f"{'–' if share is None or (isinstance(share, float) and math.isnan(share)) else f'{share:.1%}'}.</p>")
    order = [("gradcamo_by_treatment", "Grad-CAMO distributions (paper Fig. 5B)"), ("gradcamo_by_site", None),
             ("umap", "Deep features (paper Fig. 4A)"), ("gallery", "Example cells (paper Figs. 4B, 5A)"),
             ("umap_filtered", "After Grad-CAMO filtering")]
    for key, heading in order:
        if heading:
            parts.append(f"<h2>{e(heading)}</h2>")
        if key in figures:
            rel = figures[key].relative_to(out).as_posix()
            parts.append(f"<figure><img src='{e(rel)}' alt='{e(FIGURES[key])}'><figcaption class='note'>"
                         f"{e(FIGURES[key])}</figcaption></figure>")
        elif key in missing:
            parts.append(f"<p class='missing'>{e(FIGURES[key])}: missing ({e(missing[key])})</p>")
    if tables:
        parts.append("<h2>Summary tables</h2>")
        for name, frame in tables.items():
            parts.append(f"<h3>{e(name)}</h3>{_table_html(frame)}")
    if notes:
        parts.append("<h2>Notes</h2><ul class='note'>" + "".join(f"<li>{e(str(n))}</li>" for n in notes) + "</ul>")
    parts.append("<h2>Provenance</h2><pre class='note'>" + e(json.dumps(_jsonable(summary.get("provenance")),
                                                                        indent=2)) + "</pre>")
    parts.append("<p class='note'>Machine-readable summary: <a href='summary.json'>summary.json</a></p></body></html>")
    return "\n".join(parts)
