"""The Grad-CAMO report: an HTML page with the figures the paper argues with, and a JSON summary.

:func:`write_report` turns a profiles dataset into ``DIR/index.html``,
``DIR/summary.json`` and ``DIR/figures/*.png``:

0. a plain-language summary first (:mod:`gradcamo_dask.profiles.report_summary`): what
   Grad-CAMO is, a verdict with the uniform-map baseline and the model's accuracy beside
   chance, a warning when the layer's map is too coarse to localise, what to do next;
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

import json
import math
import warnings
from dataclasses import dataclass, field
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
from gradcamo_dask.profiles.report_page import FIGURES, jsonable, report_html
from gradcamo_dask.profiles.report_summary import plain_summary
from gradcamo_dask.profiles.store import open_profiles
from gradcamo_dask.provenance import read_provenance

__all__ = ["FIGURES", "write_report"]

NO_SCORES = ("the profiles have no Grad-CAMO variables (gradcamo, cam_inside, cam_total): they were computed "
             "without masks or without Grad-CAM; rerun scoring with masks to get this part")


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


def _crop_grid(size: Any, plate_path: Any, profiles: xr.Dataset) -> tuple[int, int, int] | None:
    """The crop grid (z, y, x voxels): ``size`` with an open z taken from the plate's depth (metadata only),
    else from the deepest cell's bounding box."""
    size = list(size) if size is not None else [None, 128, 128]
    if len(size) != 3 or size[1] is None or size[2] is None:
        return None
    if size[0] is None:
        try:
            from gradcamo_dask.io.plate import open_plate

            size[0] = int(open_plate(plate_path).sizes["z"]) if plate_path else None
        except (GradcamoError, OSError, KeyError):
            size[0] = None
        if size[0] is None and "bbox_z1" in profiles.coords:
            size[0] = int(np.max(profiles["bbox_z1"].values))
    return None if size[0] is None else (int(size[0]), int(size[1]), int(size[2]))


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
    fill = (read_provenance(profiles).get("parameters") or {}).get("crop_fill", "zero")  # as the model was scored
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
        crops, masks = crop_site(site_image, site_labels, table, size, well=well, site=site, outside=fill)
        if crops.ndim == 4:  # a 2D plate: shown as one z slice (trilinear upsampling of one slice is bilinear)
            crops, masks = crops[:, :, None], masks[:, None]
        for j, i in enumerate(rows):
            crops_of[i] = (crops[j, c_index], masks[j])
    cams = np.asarray(profiles[cam_name].isel(cell=wanted).values, dtype=np.float32)
    cams = cams[:, None] if cams.ndim == 3 else cams  # 2D maps (cell, y, x) as one z slice, like the crops
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
                             "caption": f"{coords['well'][i]} site {coords['site'][i]}, cell "
                                        f"{coords['object_number'][i]}\nGrad-CAMO {scores[i]:.2f}"})
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
        Profiles (one row per cell, as written by scoring), or the Zarr store holding them.
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
        raise InputError("profiles must have a 'cell' dim (one row per cell, as gradcamo-dask score writes them)")
    out = Path(out_dir)
    figures_dir = out / "figures"
    figures_dir.mkdir(parents=True, exist_ok=True)
    for old in figures_dir.glob("*.png"):  # a rerun never shows figures of an earlier run
        old.unlink()
    report = _start_report(profiles, layer, cutoff, figures_dir)
    scores = _gradcamo_part(report, plate)
    if "deep" not in profiles:
        report.missing["umap"] = "the profiles have no deep features (variable 'deep')"
        report.missing.setdefault("umap_filtered", report.missing["umap"])
    elif report.n < 10:
        report.missing["umap"] = f"only {report.n} cells: too few for a UMAP (need at least 10)"
        report.missing.setdefault("umap_filtered", report.missing["umap"])
    else:
        _umap_part(report, scores, whitening, max_umap_cells, seed)
    if report.layers and report.n and "gallery" not in report.missing:
        _gallery_part(report, gallery_per_bin, channel, plate, labels)

    summary = report.summary
    summary["figures"] = {k: str(v.relative_to(out)) for k, v in report.figures.items()}
    summary["missing"] = report.missing
    summary["notes"] = report.notes
    summary["tables"] = dict(report.tables)
    json_path = out / "summary.json"
    json_path.write_text(json.dumps(jsonable(summary), indent=2) + "\n")
    html_path = out / "index.html"
    html_path.write_text(report_html(summary, report.figures, report.tables, report.missing, report.notes, out))
    return html_path


@dataclass
class _Report:
    """What the parts of one report share while it is built: the cells' labels and orders, the
    reported layer, and the figures, tables, missing parts and notes each part adds."""

    profiles: xr.Dataset
    layer: str | None
    layers: list[str]
    cutoff: float
    figures_dir: Path
    treatments: np.ndarray
    sites: np.ndarray
    treatment_order: list[str]
    site_order: list[str]
    summary: dict[str, Any]
    figures: dict[str, Path] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)

    @property
    def n(self) -> int:
        """Number of cells."""
        return int(self.profiles.sizes["cell"])


def _start_report(profiles: xr.Dataset, layer: str | None, cutoff: float, figures_dir: Path) -> _Report:
    """The report's shared state and the head of its summary; ``layer`` checked against the scored layers."""
    prov = read_provenance(profiles)
    layers = scored_layers(profiles)
    if layer is not None and layers and str(layer) not in layers:
        raise InputError(f"layer {layer!r} has no Grad-CAMO scores; scored layers: {layers}")
    layer = str(layer) if layer is not None else (layers[0] if layers else None)
    n = int(profiles.sizes["cell"])
    treatments = _treatments(profiles)
    sites = _site_labels(profiles) if {"well", "site"} <= set(profiles.coords) else np.full(n, "?")
    treatment_order = _ordered(treatments, profiles, by_dose=True)
    site_order = _ordered(sites)
    summary: dict[str, Any] = {
        "plate": profiles.attrs.get("plate"), "n_cells": n, "n_wells": len(set(profiles["well"].values))
        if "well" in profiles.coords else None, "n_sites": len(site_order), "treatments": treatment_order,
        "layers": layers, "layer": layer, "cutoff": float(cutoff), "provenance": prov,
    }
    return _Report(profiles, layer, layers, cutoff, figures_dir, treatments, sites, treatment_order,
                   site_order, summary)


def _gradcamo_part(report: _Report, plate: Any) -> np.ndarray | None:
    """Counts, summary tables, distribution figures and the plain summary of the reported layer's
    Grad-CAMO; returns its scores (cell,) in [0, 1] or NaN, or None (parts marked missing) without."""
    from gradcamo_dask.profiles import report_figures as figs

    profiles, layer, cutoff = report.profiles, report.layer, report.cutoff
    if not (report.layers and report.n):
        reason = NO_SCORES if not report.layers else "the profiles hold no cells"
        for part in ("gradcamo_by_treatment", "gradcamo_by_site", "gallery", "umap_filtered", "summary_tables"):
            report.missing[part] = reason
        return None
    scores = np.asarray(profiles["gradcamo"].sel(layer=layer).values if "layer" in profiles["gradcamo"].dims
                        else profiles["gradcamo"].values, dtype=np.float64)
    report.summary["counts"] = gradcamo_counts(profiles, cutoff, layer)
    report.tables["Overall"] = summarize_gradcamo(profiles, cutoff=cutoff, layer=layer)
    for name, by in (("By treatment", ["treatment"]), ("By dose", ["dose"]), ("By well and site", ["well", "site"])):
        if all(b in profiles.coords for b in by):
            report.tables[name] = summarize_gradcamo(profiles, by=by, cutoff=cutoff, layer=layer)
    if len(report.layers) > 1:
        report.tables["Layers ranked by mean Grad-CAMO"] = rank_layers(profiles, cutoff)
    report.figures["gradcamo_by_treatment"] = figs.distribution_figure(
        report.figures_dir / "gradcamo_by_treatment.png", scores, report.treatments, report.treatment_order, cutoff,
        f"Grad-CAMO by treatment ({layer})", "treatment")
    report.figures["gradcamo_by_site"] = figs.distribution_figure(
        report.figures_dir / "gradcamo_by_site.png", scores, report.sites, report.site_order, cutoff,
        f"Grad-CAMO by site ({layer})", "well/site")
    prov = report.summary["provenance"]
    prov_plate, _labels, size = _paths_from_provenance(prov)
    report.summary["plain"] = plain_summary(profiles, scores, layer, prov, cutoff,
                                            _crop_grid(size, plate or prov_plate, profiles))
    return scores


def _umap_part(report: _Report, scores: np.ndarray | None, whitening: str, max_umap_cells: int, seed: int) -> None:
    """The UMAP of the whitened deep features of (a seeded subset of at most ``max_umap_cells``) cells,
    and again of the on-target cells only (Grad-CAMO >= the cut-off) when there are at least 10."""
    from gradcamo_dask.profiles import report_figures as figs

    n, cutoff = report.n, report.cutoff
    feats, which = _feature_matrix(report.profiles, report.layer)
    values, how = _whitened(feats, whitening, report.notes)
    rng = np.random.default_rng(seed)
    subset = np.sort(rng.choice(n, size=min(n, max_umap_cells), replace=False))
    if len(subset) < n:
        report.notes.append(f"UMAP of a random subset of {len(subset)} of {n} cells (max_umap_cells)")
    xy = _umap(values[subset], seed)
    report.figures["umap"] = figs.umap_figure(
        report.figures_dir / "umap.png", xy, report.treatments[subset], report.treatment_order, report.sites[subset],
        report.site_order, f"UMAP of deep features ({which}, {how})")
    report.summary["umap"] = {"features": which, "whitening": how, "n_cells": int(len(subset))}
    if scores is None:
        return
    on = subset[~np.isnan(scores[subset]) & (np.nan_to_num(scores[subset], nan=-1) >= cutoff)]
    if len(on) < 10:
        report.missing["umap_filtered"] = f"only {len(on)} cells have Grad-CAMO >= {cutoff:g}: too few for a UMAP"
        return
    xy_on = _umap(values[on], seed)
    report.figures["umap_filtered"] = figs.umap_figure(
        report.figures_dir / "umap_filtered.png", xy_on, report.treatments[on], report.treatment_order,
        report.sites[on], report.site_order,
        f"UMAP after filtering: {len(on)} cells with Grad-CAMO >= {cutoff:g} ({which}, {how})")
    report.summary["umap_filtered"] = {"n_cells": int(len(on))}


def _map_name(prov: dict) -> str:
    """The scored map's name: "Grad-CAM" (the paper's), or "HiResCAM" for stores scored with it."""
    return "HiResCAM" if (prov.get("parameters") or {}).get("cam_method") == "hirescam" else "Grad-CAM"


def _gallery_part(report: _Report, per_bin: int, channel: str | None, plate: Any, labels: Any) -> None:
    """The gallery of high, middle and low Grad-CAMO cells read back from the plate, with a note when
    the Grad-CAMO recomputed from those crops differs from the stored one by more than 1e-3."""
    from gradcamo_dask.profiles import report_figures as figs

    prov_plate, prov_labels, size = _paths_from_provenance(report.summary["provenance"])
    try:
        rows, shown, check = _gallery_examples(report.profiles, report.layer, per_bin, channel, plate or prov_plate,
                                               labels or prov_labels, size)
        report.summary["gallery"] = check
        if check["max_score_difference"] is not None and not check["max_score_difference"] <= 1e-3:
            report.notes.append(f"gallery: the Grad-CAMO recomputed from the crops read back differs from the stored "
                                f"scores by up to {check['max_score_difference']:.3g}; the plate, labels or crop size "
                                f"used for the gallery may not be those that were scored")
        report.figures["gallery"] = figs.gallery_figure(
            report.figures_dir / "gallery.png", rows, f"Example cells: {shown} channel, middle z slice; yellow "
            f"outline: the cell; right: {_map_name(report.summary['provenance'])} of {report.layer}")
    except _Missing as err:
        report.missing["gallery"] = str(err)
    except (GradcamoError, OSError, KeyError) as err:
        report.missing["gallery"] = f"could not read the example crops back ({type(err).__name__}: {err})"
