"""Segmenters: a method name plus its checked settings, runnable on one site's arrays.

A :class:`Segmenter` is the small, picklable object that segmentation tasks
carry (never a model): Cellpose settings hold the path of the weights, which each
worker process loads once (:mod:`gradcamo_dask.segment.cellpose_adapter`); the watershed
baseline needs nothing (:mod:`gradcamo_dask.segment.watershed`). :func:`make_segmenter`
checks the options and, for Cellpose, finds and checks the weights before any
work is scheduled.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from gradcamo_dask.errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    from gradcamo_dask.segment.cellpose_adapter import CellposeSettings

__all__ = ["METHODS", "PAPER_ANISOTROPY", "Segmenter", "WatershedSettings", "make_segmenter"]

METHODS = ("cellpose", "watershed")
#: z step over xy pixel size of the paper's stacks, used when a plate records no voxel size.
PAPER_ANISOTROPY = 1.71


@dataclass(frozen=True)
class WatershedSettings:
    """Parameters of the classical baseline (see :mod:`gradcamo_dask.segment.watershed`); voxels in xy."""

    anisotropy: float = PAPER_ANISOTROPY
    nucleus_diameter: float | None = None
    smoothing: float = 1.0
    seed_height: float = 0.1
    min_size: int = 30


@dataclass(frozen=True)
class Segmenter:
    """A method plus its settings: small, picklable, and the only thing tasks carry.

    Call it on one site's (or tile window's) ``(z, y, x)`` nucleus and cytoplasm
    intensities to get ``(z, y, x)`` int32 labels.
    """

    method: str
    settings: Any  # CellposeSettings or WatershedSettings

    def statistics(self, nucleus: np.ndarray, cytoplasm: np.ndarray | None, voxel_stride: int = 1) -> dict:
        """Site-level numbers shared by all tiles of a site (normalisation ranges, thresholds)."""
        if self.method == "cellpose":
            from gradcamo_dask.segment.cellpose_adapter import cellpose_statistics

            return cellpose_statistics(nucleus, cytoplasm)
        from gradcamo_dask.segment.watershed import watershed_statistics

        s = self.settings
        return watershed_statistics(
            nucleus,
            cytoplasm,
            anisotropy=s.anisotropy,
            smoothing=s.smoothing,
            min_size=s.min_size,
            voxel_stride=voxel_stride,
        )

    def __call__(
        self, nucleus: np.ndarray, cytoplasm: np.ndarray | None = None, statistics: dict | None = None
    ) -> np.ndarray:
        if statistics is None:
            statistics = self.statistics(nucleus, cytoplasm)
        if self.method == "cellpose":
            from gradcamo_dask.segment.cellpose_adapter import run_cellpose

            return run_cellpose(nucleus, cytoplasm, self.settings, statistics)
        from gradcamo_dask.segment.watershed import watershed_site

        s = self.settings
        return watershed_site(
            nucleus,
            cytoplasm,
            anisotropy=s.anisotropy,
            nucleus_diameter=s.nucleus_diameter,
            smoothing=s.smoothing,
            seed_height=s.seed_height,
            min_size=s.min_size,
            statistics=statistics,
        )

    def provenance(self) -> dict[str, Any]:
        """JSON-ready description: method, every setting, Cellpose version and weights hash."""
        out: dict[str, Any] = {"method": self.method, "settings": asdict(self.settings)}
        if self.method == "cellpose":
            from importlib.metadata import version

            from gradcamo_dask.segment.cellpose_adapter import weights_sha256

            out["settings"]["eval_options"] = {k: repr(v) for k, v in self.settings.eval_options}
            out["cellpose_version"] = version("cellpose")
            out["weights_sha256"] = weights_sha256(self.settings.weights)
        return out


def make_segmenter(
    method: str = "cellpose",
    *,
    model: str | os.PathLike[str] | None = None,
    diameter: float | None = None,
    stitch_threshold: float = 0.05,
    flow_threshold: float = 0.75,
    cellprob_threshold: float = 0.0,
    anisotropy: float = PAPER_ANISOTROPY,
    min_size: int = 30,
    do_3D: bool = False,
    device: str = "auto",
    batch_size: int = 8,
    normalize: bool = True,
    allow_download: bool = False,
    cellpose_options: Mapping[str, Any] | None = None,
    nucleus_diameter: float | None = None,
    smoothing: float = 1.0,
    seed_height: float = 0.1,
) -> Segmenter:
    """Check the options of a method and, for Cellpose, find and check its weights now.

    Parameters are those of :func:`segment`. Raises before any work is scheduled:
    :class:`~gradcamo_dask.errors.WeightsNotFoundError` (missing weights, says
    where to put them), :class:`~gradcamo_dask.errors.WeightsFormatError` (not a
    Cellpose model), :class:`~gradcamo_dask.errors.InputError` (bad options).
    """
    if method not in METHODS:
        raise InputError(f"unknown segmentation method {method!r}; use one of {', '.join(METHODS)}")
    if not anisotropy > 0:
        raise InputError(f"anisotropy must be > 0 (z step over xy pixel size), got {anisotropy}")
    if int(min_size) < 0:
        raise InputError(f"min_size must be >= 0 voxels, got {min_size}")
    if method == "watershed":
        return Segmenter(
            "watershed",
            WatershedSettings(
                anisotropy=float(anisotropy),
                nucleus_diameter=None if nucleus_diameter is None else float(nucleus_diameter),
                smoothing=float(smoothing),
                seed_height=float(seed_height),
                min_size=int(min_size),
            ),
        )
    from gradcamo_dask.segment.cellpose_adapter import (
        CellposeSettings,
        cellpose_major_version,
        check_cellpose_weights,
        resolve_cellpose_weights,
    )

    if not do_3D and not stitch_threshold > 0:
        raise InputError(
            "stitch_threshold must be > 0 in per-slice mode (do_3D=False): without stitching Cellpose "
            "returns per-slice ids, not 3D cells (the paper uses 0.05)"
        )
    if diameter is not None and not diameter > 0:
        raise InputError(f"diameter must be > 0 xy voxels or None (the model's own), got {diameter}")
    major = cellpose_major_version()
    weights = resolve_cellpose_weights(model, major=major, allow_download=allow_download)
    check_cellpose_weights(weights, major)
    settings: CellposeSettings = CellposeSettings(
        weights=str(weights),
        major=major,
        device=str(device),
        diameter=None if diameter is None else float(diameter),
        flow_threshold=float(flow_threshold),
        cellprob_threshold=float(cellprob_threshold),
        stitch_threshold=float(stitch_threshold),
        anisotropy=float(anisotropy),
        min_size=int(min_size),
        do_3D=bool(do_3D),
        batch_size=int(batch_size),
        normalize=bool(normalize),
        eval_options=tuple(sorted((cellpose_options or {}).items())),
    )
    return Segmenter("cellpose", settings)
