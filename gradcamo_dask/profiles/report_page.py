"""The report's HTML page: the summary, the figures, the tables and the notes laid out as one page.

:func:`report_html` only lays out what :func:`gradcamo_dask.profiles.report.write_report`
computed; :func:`jsonable` makes the same summary fit for ``summary.json``.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gradcamo_dask.profiles.report_summary import details_html, summary_html

__all__ = ["FIGURES", "jsonable", "report_html"]

FIGURES = {
    "gradcamo_by_treatment": "Grad-CAMO by treatment",
    "gradcamo_by_site": "Grad-CAMO by site",
    "umap": "UMAP of whitened deep features",
    "gallery": "Example cells: high, middle and low Grad-CAMO",
    "umap_filtered": "UMAP after Grad-CAMO filtering",
}


def jsonable(value: Any) -> Any:
    """``value`` with dicts, lists, tables and NumPy scalars made JSON-ready; NaN and inf become None."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, pd.DataFrame):
        return [jsonable(r) for r in value.to_dict(orient="records")]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def _table_html(frame: pd.DataFrame) -> str:
    return frame.to_html(index=False, float_format=lambda v: f"{v:.3f}", na_rep="–", border=0, classes="t")


def report_html(summary: dict, figures: dict[str, Path], tables: dict[str, pd.DataFrame], missing: dict[str, str],
                notes: Sequence[str], out: Path) -> str:
    """The report page: ``figures`` (paths under ``out``) and ``tables`` in a fixed order, the parts
    ``missing`` with their reasons, ``notes`` and the provenance from ``summary``."""
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
    if summary.get("plain"):
        parts.append(summary_html(summary["plain"]))
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
    order = [("gradcamo_by_treatment", "How Grad-CAMO is distributed, by treatment and by site"),
             ("gradcamo_by_site", None), ("umap", "Map of the cells' deep profiles (UMAP)"),
             ("gallery", "Example cells with their Grad-CAM heatmaps"),
             ("umap_filtered", "The same map with on-target cells only")]
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
    parts.append(details_html(jsonable(summary.get("provenance"))))
    parts.append("<p class='note'>Machine-readable summary: <a href='summary.json'>summary.json</a></p></body></html>")
    return "\n".join(parts)
