"""Segmenters: one frozen options object per method, checked once, runnable on one site.

A segmenter is the small, picklable object that segmentation tasks carry (never
a model). :class:`CellposeSegmenter` finds and checks its weights when it is
built, so a missing or wrong file fails on the client before any work is
scheduled; each worker process then loads the model once
(:mod:`gradcamo_dask.segment.cellpose_adapter`). :class:`WatershedSegmenter`,
the classical baseline, needs nothing (:mod:`gradcamo_dask.segment.watershed`).

Build one and hand it to :func:`gradcamo_dask.segment_plate`::

    segmenter = CellposeSegmenter(model="cyto3", diameter=56)
    labels = segment_plate(plate, segmenter)
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from gradcamo_dask.errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    from gradcamo_dask.segment.cellpose_adapter import CellposeSettings

__all__ = ["METHODS", "PAPER_ANISOTROPY", "Segmenter", "CellposeSegmenter", "WatershedSegmenter", "segmenter_for"]

#: z step over xy pixel size of the paper's stacks, used when a plate records no voxel size.
PAPER_ANISOTROPY = 1.71


def _check_common(anisotropy: float | None, min_size: int) -> None:
    if anisotropy is not None and not anisotropy > 0:
        raise InputError(f"anisotropy must be > 0 (z step over xy pixel size) or None (from the plate), got {anisotropy}")
    if int(min_size) != min_size or int(min_size) < 0:
        raise InputError(f"min_size must be a whole number of voxels >= 0, got {min_size}")


class Segmenter:
    """Base of the segmenters: call one on a site's ``(z, y, x)`` nucleus and cytoplasm
    intensities to get ``(z, y, x)`` int32 labels (0 background, ids 1..N).

    Subclasses are frozen dataclasses with an ``anisotropy`` field (None: taken
    from the plate by :func:`segment_plate`, else the paper's 1.71).
    """

    method: ClassVar[str] = ""
    anisotropy: float | None

    @property
    def z_anisotropy(self) -> float:
        """The anisotropy in use: the field's value, else the paper's 1.71."""
        return PAPER_ANISOTROPY if self.anisotropy is None else float(self.anisotropy)

    def with_anisotropy(self, anisotropy: float) -> Segmenter:
        """A copy whose ``anisotropy`` is set (already checked: no weights lookup again)."""
        clone = copy.copy(self)
        object.__setattr__(clone, "anisotropy", float(anisotropy))
        return clone

    def statistics(self, nucleus: np.ndarray, cytoplasm: np.ndarray | None, voxel_stride: int = 1) -> dict:
        """Site-level numbers shared by all tiles of a site (normalisation ranges, thresholds)."""
        raise NotImplementedError

    def __call__(
        self, nucleus: np.ndarray, cytoplasm: np.ndarray | None = None, statistics: dict | None = None
    ) -> np.ndarray:
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        """The options as given (JSON-ready)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init}  # type: ignore[arg-type]

    def provenance(self) -> dict[str, Any]:
        """JSON-ready description: the method and every option."""
        return {"method": self.method, "settings": {**self.options(), "anisotropy": self.z_anisotropy}}


@dataclass(frozen=True)
class WatershedSegmenter(Segmenter):
    """The classical baseline: smoothed nucleus seeds grown by watershed into the cytoplasm.

    Parameters
    ----------
    anisotropy : float, optional
        z step over xy pixel size (default None: from the plate, else 1.71).
    min_size : int
        Smallest cell kept, voxels (default 30).
    nucleus_diameter : float, optional
        Typical nucleus diameter, xy voxels (default None: estimated per site).
    smoothing : float
        Gaussian smoothing sigma, xy voxels (default 1.0).
    seed_height : float
        Height of the distance maxima kept as seeds, share of the nucleus radius (default 0.1).
    """

    method: ClassVar[str] = "watershed"
    anisotropy: float | None = None
    min_size: int = 30
    nucleus_diameter: float | None = None
    smoothing: float = 1.0
    seed_height: float = 0.1

    def __post_init__(self) -> None:
        _check_common(self.anisotropy, self.min_size)
        if self.nucleus_diameter is not None and not self.nucleus_diameter > 0:
            raise InputError(f"nucleus_diameter must be > 0 xy voxels or None (estimated), got {self.nucleus_diameter}")
        if not self.smoothing >= 0:
            raise InputError(f"smoothing must be >= 0 xy voxels, got {self.smoothing}")
        if not self.seed_height > 0:
            raise InputError(f"seed_height must be > 0 (share of the nucleus radius), got {self.seed_height}")

    def statistics(self, nucleus: np.ndarray, cytoplasm: np.ndarray | None, voxel_stride: int = 1) -> dict:
        from gradcamo_dask.segment.watershed import watershed_statistics

        return watershed_statistics(
            nucleus, cytoplasm, anisotropy=self.z_anisotropy, smoothing=self.smoothing,
            min_size=self.min_size, voxel_stride=voxel_stride,
        )

    def __call__(
        self, nucleus: np.ndarray, cytoplasm: np.ndarray | None = None, statistics: dict | None = None
    ) -> np.ndarray:
        from gradcamo_dask.segment.watershed import watershed_site

        if statistics is None:
            statistics = self.statistics(nucleus, cytoplasm)
        return watershed_site(
            nucleus, cytoplasm, anisotropy=self.z_anisotropy, nucleus_diameter=self.nucleus_diameter,
            smoothing=self.smoothing, seed_height=self.seed_height, min_size=self.min_size, statistics=statistics,
        )


@dataclass(frozen=True)
class CellposeSegmenter(Segmenter):
    """Cellpose 3.x or 4.x, per z-slice and stitched across z (the paper's setting) or in 3D.

    Built on the client: the weights are found and checked at once.

    Parameters
    ----------
    model : str, optional
        Weights: a file, or a model name looked up in ``CELLPOSE_LOCAL_MODELS_PATH``
        then ``~/.cellpose/models`` (default None: ``cyto3`` on Cellpose 3, ``cpsam`` on 4).
    diameter : float, optional
        Typical cell diameter, xy voxels (default None: the model's own).
    stitch_threshold : float
        IoU needed to join masks of neighbouring slices (default 0.05, the paper's).
    flow_threshold : float
        Flow error allowed per mask (default 0.75, the paper's).
    cellprob_threshold : float
        Cell-probability threshold (default 0.0, Cellpose's).
    anisotropy : float, optional
        z step over xy pixel size, used in 3D mode (default None: from the plate, else 1.71).
    min_size : int
        Smallest cell kept, voxels (default 30).
    do_3D : bool
        Cellpose's 3D mode instead of per-slice 2D plus stitching (default False).
    device : str
        ``"auto"`` (a GPU when the worker has one), ``"cpu"``, ``"cuda"``, ``"cuda:1"`` (default "auto").
    batch_size : int
        Network tiles (224 or 256 px) per batch (default 8).
    normalize : bool
        1st-99th percentile normalisation with site-level ranges (default True).
    allow_download : bool
        Let Cellpose download a missing built-in model (default False: fail at once offline).
    cellpose_options : mapping, optional
        Extra keyword arguments for ``CellposeModel.eval`` (e.g. ``{"niter": 200}``).

    Raises
    ------
    WeightsNotFoundError
        The weights cannot be found (the message says where to put them).
    WeightsFormatError
        The file is not a Cellpose model of the installed major version.
    InputError
        An option is out of range.
    """

    method: ClassVar[str] = "cellpose"
    model: str | None = None
    diameter: float | None = None
    stitch_threshold: float = 0.05
    flow_threshold: float = 0.75
    cellprob_threshold: float = 0.0
    anisotropy: float | None = None
    min_size: int = 30
    do_3D: bool = False
    device: str = "auto"
    batch_size: int = 8
    normalize: bool = True
    allow_download: bool = False
    cellpose_options: Mapping[str, Any] | None = None
    weights: str = field(init=False, default="", compare=False)
    major: int = field(init=False, default=0, compare=False)

    def __post_init__(self) -> None:
        from gradcamo_dask.segment.cellpose_adapter import (
            cellpose_major_version,
            check_cellpose_weights,
            resolve_cellpose_weights,
        )

        _check_common(self.anisotropy, self.min_size)
        if not self.do_3D and not self.stitch_threshold > 0:
            raise InputError(
                "stitch_threshold must be > 0 in per-slice mode (do_3D=False): without stitching Cellpose "
                "returns per-slice ids, not 3D cells (the paper uses 0.05)"
            )
        if self.diameter is not None and not self.diameter > 0:
            raise InputError(f"diameter must be > 0 xy voxels or None (the model's own), got {self.diameter}")
        if int(self.batch_size) < 1:
            raise InputError(f"batch_size must be >= 1 network tiles, got {self.batch_size}")
        options = dict(self.cellpose_options or {})
        object.__setattr__(self, "cellpose_options", tuple(sorted(options.items())) or None)
        major = cellpose_major_version()
        weights = resolve_cellpose_weights(self.model, major=major, allow_download=self.allow_download)
        check_cellpose_weights(weights, major)
        object.__setattr__(self, "weights", str(weights))
        object.__setattr__(self, "major", major)

    @property
    def settings(self) -> CellposeSettings:
        """What a worker needs to run Cellpose (weights path, not the model)."""
        from gradcamo_dask.segment.cellpose_adapter import CellposeSettings

        return CellposeSettings(
            weights=self.weights, major=self.major, device=str(self.device),
            diameter=None if self.diameter is None else float(self.diameter),
            flow_threshold=float(self.flow_threshold), cellprob_threshold=float(self.cellprob_threshold),
            stitch_threshold=float(self.stitch_threshold), anisotropy=self.z_anisotropy,
            min_size=int(self.min_size), do_3D=bool(self.do_3D), batch_size=int(self.batch_size),
            normalize=bool(self.normalize), eval_options=tuple(self.cellpose_options or ()),
        )

    def statistics(self, nucleus: np.ndarray, cytoplasm: np.ndarray | None, voxel_stride: int = 1) -> dict:
        from gradcamo_dask.segment.cellpose_adapter import cellpose_statistics

        return cellpose_statistics(nucleus, cytoplasm)

    def __call__(
        self, nucleus: np.ndarray, cytoplasm: np.ndarray | None = None, statistics: dict | None = None
    ) -> np.ndarray:
        from gradcamo_dask.segment.cellpose_adapter import run_cellpose

        if statistics is None:
            statistics = self.statistics(nucleus, cytoplasm)
        return run_cellpose(nucleus, cytoplasm, self.settings, statistics)

    def provenance(self) -> dict[str, Any]:
        """Method, every setting, the weights path and SHA-256, the Cellpose version."""
        from importlib.metadata import version

        from gradcamo_dask.segment.cellpose_adapter import weights_sha256

        settings = asdict(self.settings)
        settings["eval_options"] = {k: repr(v) for k, v in self.settings.eval_options}
        return {"method": self.method, "settings": settings, "cellpose_version": version("cellpose"),
                "weights_sha256": weights_sha256(self.weights)}


METHODS: dict[str, type[Segmenter]] = {"cellpose": CellposeSegmenter, "watershed": WatershedSegmenter}


def segmenter_for(method: str | Segmenter) -> Segmenter:
    """A segmenter as given, or the default one of a method named ``"cellpose"`` or ``"watershed"``."""
    if isinstance(method, Segmenter):
        return method
    if method not in METHODS:
        raise InputError(f"unknown segmentation method {method!r}; use one of {', '.join(METHODS)} or pass a Segmenter")
    return METHODS[method]()
