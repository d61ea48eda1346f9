"""Provenance: what produced a result, recorded the same way by scoring, training and export."""

from __future__ import annotations

import importlib.metadata as md
import json
import platform
from typing import Any

__all__ = ["PACKAGES", "package_versions", "read_provenance"]

#: Distributions whose versions every result records (those that can change a number).
PACKAGES = ("gradcamo-dask", "torch", "monai", "numpy", "dask", "distributed", "xarray", "zarr", "cupy-cuda12x",
            "cupy-cuda13x", "cellpose")


def package_versions() -> dict[str, str]:
    """``{distribution: version}`` of :data:`PACKAGES` that are installed, plus ``python``."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    if "gradcamo-dask" not in out:  # a source checkout that is not installed
        from gradcamo_dask import __version__

        out["gradcamo-dask"] = __version__
    out["python"] = platform.python_version()
    return out


def read_provenance(ds: Any) -> dict:
    """The ``provenance`` attribute of a profiles Dataset (JSON text or a dict) as a dict; ``{}`` when absent."""
    raw = getattr(ds, "attrs", {}).get("provenance")
    if not raw:
        return {}
    try:
        return json.loads(raw) if isinstance(raw, str) else dict(raw)
    except (TypeError, ValueError):
        return {}
