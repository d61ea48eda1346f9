"""The report's figures (matplotlib, no pyplot state): UMAPs, Grad-CAMO distributions, the gallery.

Every function draws one PNG from plain arrays and returns its path; data preparation
(whitening, filtering, reading crops back) lives in :mod:`gradcamo_dask.profiles.report`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["distribution_figure", "gallery_figure", "umap_figure"]

DPI = 110
MAX_LEGEND = 20


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


def _palette(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _scatter_by(ax: Any, xy: np.ndarray, labels: np.ndarray, order: Sequence[str], title: str) -> None:
    colors = _palette(len(order))
    size = max(2.0, min(18.0, 4000.0 / max(len(xy), 1)))
    for color, label in zip(colors, order):
        pick = labels == label
        ax.scatter(xy[pick, 0], xy[pick, 1], s=size, color=color, label=str(label) or "(none)", alpha=0.8,
                   linewidths=0)
    ax.set_title(title)
    ax.set_xlabel("UMAP 1")
    ax.set_ylabel("UMAP 2")
    ax.set_xticks([])
    ax.set_yticks([])
    if len(order) <= MAX_LEGEND:
        ax.legend(fontsize=7, markerscale=2, loc="best", frameon=False)
    else:
        ax.text(0.01, 0.01, f"{len(order)} groups (legend omitted)", transform=ax.transAxes, fontsize=7)


def umap_figure(
    path: Path,
    xy: np.ndarray,
    treatments: np.ndarray,
    treatment_order: Sequence[str],
    sites: np.ndarray,
    site_order: Sequence[str],
    title: str,
) -> Path:
    """Two panels: the embedding coloured by treatment and by site (paper Fig. 4A)."""
    fig = _figure(11, 4.8)
    left, right = fig.subplots(1, 2)
    _scatter_by(left, xy, treatments, treatment_order, "by treatment")
    _scatter_by(right, xy, sites, site_order, "by site (well/site)")
    fig.suptitle(title)
    return _save(fig, path)


def distribution_figure(
    path: Path,
    scores: np.ndarray,
    groups: np.ndarray,
    order: Sequence[str],
    cutoff: float,
    title: str,
    xlabel: str,
) -> Path:
    """Grad-CAMO per group (paper Fig. 5B): box and strip per group with the cut-off line, and the
    share of undefined scores written under each group. Many groups: per-group mean ± sd."""
    fig = _figure(max(6.0, min(16.0, 0.55 * len(order) + 3)), 4.4)
    ax = fig.subplots()
    defined = ~np.isnan(scores)
    positions = np.arange(len(order))
    if len(order) <= 40:
        data = [scores[(groups == g) & defined] for g in order]
        ax.boxplot([d if len(d) else [np.nan] for d in data], positions=positions, widths=0.6, showfliers=False)
        rng = np.random.default_rng(0)
        for i, d in enumerate(data):
            ax.scatter(i + rng.uniform(-0.18, 0.18, len(d)), d, s=5, alpha=0.5, color="tab:blue", linewidths=0)
    else:
        means = [np.nanmean(scores[groups == g]) if ((groups == g) & defined).any() else np.nan for g in order]
        sds = [np.nanstd(scores[groups == g]) if ((groups == g) & defined).sum() > 1 else 0.0 for g in order]
        ax.errorbar(positions, means, yerr=sds, fmt="o", ms=3, lw=0.8)
    ax.axhline(cutoff, color="tab:red", ls="--", lw=1, label=f"cut-off {cutoff:g}")
    ax.set_xticks(positions)
    ax.set_xticklabels([str(g) for g in order], rotation=45 if len(order) > 6 else 0, ha="right" if len(order) > 6
                       else "center", fontsize=8)
    undefined = [int(((groups == g) & ~defined).sum()) for g in order]
    if any(undefined):
        for i, k in enumerate(undefined):
            if k:
                ax.annotate(f"{k} undef.", (i, 0), xytext=(0, -2), textcoords="offset points", ha="center",
                            va="top", fontsize=6, color="tab:gray")
    ax.set_ylim(-0.08, 1.02)
    ax.set_ylabel("Grad-CAMO (share of attention inside the cell)")
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper right", frameon=False)
    return _save(fig, path)


def gallery_figure(path: Path, rows: Sequence[tuple[str, Sequence[dict]]], title: str) -> Path:
    """Example cells (paper Figs. 4B, 5A): per example the central slice of the crop with the
    cell's outline, and the same slice under the upsampled Grad-CAM map, scaled to its own peak
    (display only) with one colour bar for all.

    ``rows``: ``(label, examples)`` with examples ``{"image": (y, x), "cam": (y, x),
    "mask": (y, x) bool, "caption": str}``.
    """
    n_cols = max((len(examples) for _, examples in rows), default=1)
    fig = _figure(2.0 * 2 * n_cols + 1.4, 2.4 * len(rows) + 0.6)
    heat = None
    axes = np.asarray(fig.subplots(len(rows), 2 * n_cols, squeeze=False))
    for r, (label, examples) in enumerate(rows):
        for c in range(n_cols):
            left, right = axes[r, 2 * c], axes[r, 2 * c + 1]
            for ax in (left, right):
                ax.set_xticks([])
                ax.set_yticks([])
            if c >= len(examples):
                left.set_axis_off()
                right.set_axis_off()
                continue
            ex = examples[c]
            image = ex["image"].astype(float)
            lo, hi = np.percentile(image, [1, 99.5]) if image.size else (0.0, 1.0)
            shown = np.clip((image - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
            left.imshow(shown, cmap="gray", interpolation="nearest")
            right.imshow(shown, cmap="gray", interpolation="nearest")
            cam = np.asarray(ex["cam"], dtype=float)
            peak = float(cam.max()) if cam.size and cam.max() > 0 else 1.0
            heat = right.imshow(cam / peak, cmap="jet", alpha=0.45, vmin=0, vmax=1, interpolation="bilinear")
            for ax in (left, right):
                if ex["mask"].any():
                    ax.contour(ex["mask"].astype(float), levels=[0.5], colors="yellow", linewidths=0.8)
            left.set_title(ex["caption"], fontsize=8)
            right.set_title("Grad-CAM heatmap", fontsize=8)
        axes[r, 0].set_ylabel(label, fontsize=10)
    if heat is not None:
        bar = fig.colorbar(heat, ax=axes.ravel().tolist(), shrink=0.6, pad=0.01)
        bar.set_label("Grad-CAM attention (share of the cell's peak)", fontsize=9)
    fig.suptitle(title, fontsize=11)
    return _save(fig, path)
