"""Classic CellProfiler measurements of single cells in 3D (or 2D), with ``cp_measure``.

Each cell is measured on its own crop and central-cell mask, the same arrays the
model sees (:func:`gradcamo_dask.cells.crop_site`), so classic and deep features
describe exactly the same voxels. The work is done by ``cp_measure`` (CellProfiler's
measurement modules as plain functions); this module chooses what to measure, trims
each crop to the cell, names the results the way CellProfiler does and lays them out
as one float32 row per cell.

Measurements (``cp_measure.bulk.get_core_measurements_3d``) and what each costs per
cell on one CPU core, for synthetic cells of about 11,800 voxels in 21 x 128 x 128
crops (``benchmarks/bench_classic.py --quick``, 2 shared and busy cores, so upper
bounds; see ``benchmarks/results/bench_classic.md``):

=============  ==========================================  =======================
name           features                                     cost per cell
=============  ==========================================  =======================
sizeshape      ``AreaShape_*`` (once per cell), 139          ~0.16 s
intensity      ``Intensity_*_<channel>``, 15 per channel     ~0.015 s per channel
texture        ``Texture_*_<channel>_<scale>_<dir>_256``,    ~0.034 s per channel
               13 Haralick x 13 directions per scale         and scale
granularity    ``Granularity_<k>_<channel>``, 16 per         ~0.76 s per channel
               channel
=============  ==========================================  =======================

The default set (``"default"``: size/shape, intensity and texture at scale 3, all
channels; 1,243 features for 6 channels) costs about 0.4 s per 6-channel cell;
``"full"`` adds granularity and texture at scales 5 and 10 (CellProfiler's JUMP
settings; 3,367 features) for about 6 s per cell, dominated by granularity's 16
grey-scale reconstructions per channel, each followed by a full-resolution
interpolation in cp_measure's 3D code. Trimming each crop to the cell's box (below)
makes granularity 4x and intensity 3x cheaper than on the whole crop.

Units and conventions
---------------------
* Intensities are divided by ``intensity_max`` first (CellProfiler reads a 16-bit
  image as ``value / 65535``), so intensity features of uint16 plates match
  CellProfiler's scale. Texture quantises ``[0, 1]`` to 256 grey levels (values above
  1 are clipped for texture only).
* ``AreaShape_Volume``, ``BoundingBoxVolume``, axis lengths and moments are in voxels;
  ``AreaShape_SurfaceArea`` is in µm² (marching cubes on the voxel grid scaled by
  ``spacing_zyx_um``).
* Measurements that only say where the cell sits in its crop are left out: centres,
  bounding-box corners, spatial (uncentred) moments, and the intensity-weighted and
  brightest-voxel locations. Positions come from the cell table instead
  (``Location_Center_X/Y/Z`` in the per-object export).
* Each crop is trimmed to the cell's bounding box plus ``margin`` voxels before
  measuring. Size/shape, intensity and texture do not look beyond the mask (they are
  the same as on the whole crop); granularity subtracts a background estimated inside
  the trimmed box, so it differs somewhat from CellProfiler's whole-image granularity.
* Names follow CellProfiler without the compartment prefix (``AreaShape_Volume``,
  ``Intensity_MeanIntensity_DNA``, ``Texture_Contrast_DNA_3_00_256``,
  ``Granularity_1_DNA``); the per-object export adds ``Cells_``.
* Thin and small cells (1-4 z-slices, a few voxels) get defined values; no measurement
  is ever infinite. NaN appears only where there is nothing to measure, which is where
  CellProfiler gives none either:

  - ``Texture_*_<dir>``: a direction with no pair of cell voxels ``scale`` apart (the 9
    directions with a z step for a cell thinner than ``scale + 1`` slices; any direction
    for a cell narrower than the scale; all for a cell whose voxels all quantise to 0).
    CellProfiler (mahotas) then gives NaN in all 13 directions; here the 4 in-plane
    directions (``_02_``, ``_04_``, ``_06_``, ``_10_``) keep their values, measured by the
    same mahotas functions one direction at a time.
  - ``Granularity_*``: crops with fewer than 8 voxels along an axis (granularity
    shrinks the image 4-fold and needs 2 samples per axis; CellProfiler gives NaN for
    such an image too). The box around each cell is widened to 8 voxels for this.
  - every feature of an empty mask.

  A flat cell (one z-slice) has a 3D convex hull of no volume: its
  ``AreaShape_ConvexArea`` is the voxel count of its 2D hull in its plane (the voxel hull
  of a flat object) and ``AreaShape_Solidity`` is volume over that, never inf.
* A cell larger than the crop is measured on its part inside the crop, the part the
  model sees: its ``AreaShape_Volume`` is then below the cell table's ``volume_voxels``.
  Choose a crop size that holds whole cells when classic features matter on their own.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import dask
import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr

from gradcamo_dask.arrays import to_numpy
from gradcamo_dask.errors import InputError

__all__ = [
    "ALL_MEASUREMENTS",
    "DEFAULT_MEASUREMENTS",
    "classic_feature_names",
    "classic_features",
    "site_classic_features",
]

ALL_MEASUREMENTS: tuple[str, ...] = ("sizeshape", "intensity", "texture", "granularity")
DEFAULT_MEASUREMENTS: tuple[str, ...] = ("sizeshape", "intensity", "texture")
DEFAULT_TEXTURE_SCALES: tuple[int, ...] = (3,)
FULL_TEXTURE_SCALES: tuple[int, ...] = (3, 5, 10)  # CellProfiler's JUMP Cell Painting settings
GRAY_LEVELS = 256
# Granularity shrinks the box 4-fold and needs 2 samples per axis: boxes are at least this wide.
MIN_BOX = 8
_HARALICK = ("AngularSecondMoment", "Contrast", "Correlation", "Variance", "InverseDifferenceMoment", "SumAverage",
             "SumVariance", "SumEntropy", "Entropy", "DifferenceVariance", "DifferenceEntropy", "InfoMeas1",
             "InfoMeas2")

# cp_measure names that only locate the cell inside its crop (see the module notes).
_POSITION_PREFIXES = (
    "Center_", "BoundingBoxMinimum_", "BoundingBoxMaximum_", "SpatialMoment_",
    "Location_CenterMassIntensity_", "Location_MaxIntensity_",
)


def _resolve(measurements: str | Sequence[str], texture_scales: Sequence[int] | None) -> tuple[tuple, tuple]:
    if isinstance(measurements, str):
        if measurements == "default":
            chosen, scales = DEFAULT_MEASUREMENTS, DEFAULT_TEXTURE_SCALES
        elif measurements in ("full", "all"):
            chosen, scales = ALL_MEASUREMENTS, FULL_TEXTURE_SCALES
        elif measurements in ALL_MEASUREMENTS:
            chosen, scales = (measurements,), DEFAULT_TEXTURE_SCALES
        else:
            raise InputError(f"measurements must be 'default', 'full' or a list among {list(ALL_MEASUREMENTS)}, "
                             f"got {measurements!r}")
    else:
        chosen = tuple(measurements)
        unknown = [m for m in chosen if m not in ALL_MEASUREMENTS]
        if unknown or not chosen or len(set(chosen)) != len(chosen):
            raise InputError(f"measurements must be distinct names among {list(ALL_MEASUREMENTS)}, got {list(chosen)}")
        scales = DEFAULT_TEXTURE_SCALES
        chosen = tuple(m for m in ALL_MEASUREMENTS if m in chosen)  # canonical order
    if texture_scales is not None:
        scales = tuple(int(s) for s in texture_scales)
        if not scales or min(scales) < 1 or len(set(scales)) != len(scales):
            raise InputError(f"texture_scales must be distinct distances >= 1 voxel, got {texture_scales}")
    return chosen, scales


def _keep(name: str) -> bool:
    if name.startswith(_POSITION_PREFIXES):
        return False
    if name.startswith("NormalizedMoment_"):  # orders 0 and 1 are undefined (always NaN)
        return sum(int(k) for k in name.split("_")[1:]) >= 2
    return True


def _rename(kind: str, name: str, channel: str | None) -> str:
    """cp_measure's key -> CellProfiler's feature name (no compartment prefix)."""
    if kind == "sizeshape":
        return f"AreaShape_{name}"
    if kind == "intensity":  # Intensity_MeanIntensity -> Intensity_MeanIntensity_DNA
        return f"{name}_{channel}"
    if kind == "texture":  # Contrast_3_00_256 -> Texture_Contrast_DNA_3_00_256
        feature, rest = name.split("_", 1)
        return f"Texture_{feature}_{channel}_{rest}"
    if kind == "granularity":  # Granularity_1 -> Granularity_1_DNA
        return f"{name}_{channel}"
    raise AssertionError(kind)


def _functions(spatial_dims: int = 3) -> dict[str, Any]:
    from cp_measure.bulk import get_core_measurements, get_core_measurements_3d

    # Our masks hold one object labelled 1: cp_measure's relabelling is not needed. 2D crops (one z slice)
    # get CellProfiler's 2D measurements (Area, Perimeter, 4 texture directions...), as its 2D pipelines do.
    return (get_core_measurements_3d if spatial_dims == 3 else get_core_measurements)(sanitize=False)


def _convex_voxels(mask: np.ndarray) -> float:
    """Voxels of the convex hull of a flat (or thin-line) cell, whose 3D hull has no volume.

    The voxel hull of a cell that lies in one plane is its 2D hull in that plane; of a
    cell on one line, the line itself (its own voxels).
    """
    from skimage.morphology import convex_hull_image

    flat = np.squeeze(mask.astype(bool))
    if flat.ndim == 2 and min(flat.shape) > 1:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # qhull's note on degenerate input
            hull = float(convex_hull_image(flat).sum())
        if hull > 0:
            return hull
    return float(mask.sum())


def _texture_by_direction(mask: np.ndarray, image: np.ndarray, scale: int) -> dict[str, float]:
    """Haralick features direction by direction, NaN only in directions without voxel pairs.

    mahotas (behind cp_measure and CellProfiler) gives NaN in all 13 directions as soon
    as one has no pair of voxels ``scale`` apart inside the cell (the z directions of a
    cell thinner than ``scale + 1`` slices). The same mahotas functions measure each
    direction alone here, so the directions that have pairs keep CellProfiler's values.
    """
    import mahotas.features.texture as texture
    from skimage.util import img_as_ubyte

    levels = img_as_ubyte(image)  # as cp_measure quantises: [0, 1] -> 0..255, 0 = ignored
    levels[mask == 0] = 0
    box = tuple(slice(int(idx.min()), int(idx.max()) + 1) for idx in np.nonzero(mask))
    levels = np.ascontiguousarray(levels[box])
    names = [f"{name}_{scale}_{{:02d}}_{GRAY_LEVELS}" for name in _HARALICK]
    out = {}
    size = int(levels.max()) + 1  # as mahotas.haralick (cooccurence's own default overflows uint8 at 255)
    for direction in range(13 if levels.ndim == 3 else 4):  # mahotas: 13 directions in 3D, 4 in 2D
        cmat = np.zeros((size, size), np.int32)
        texture.cooccurence(levels, direction, output=cmat, distance=scale, symmetric=True)
        cmat[0, :] = 0
        cmat[:, 0] = 0  # ignore_zeros, as mahotas does
        values = (texture.haralick_features([cmat], ignore_zeros=False)[0] if cmat.sum()
                  else np.full(len(names), np.nan))
        out.update({name.format(direction): float(v) for name, v in zip(names, values)})
    return out


def _measure_cell(
    functions: dict[str, Any],
    mask: np.ndarray,
    pixels: np.ndarray,
    channels: Sequence[str],
    spacing: tuple[float, float, float],
    chosen: tuple[str, ...],
    scales: tuple[int, ...],
    granularity_length: int,
) -> dict[str, float]:
    """All chosen measurements of one cell: ``mask`` ([z,] y, x) int32 of 0/1, ``pixels`` (c, [z,] y, x) in [0, ~1]."""
    out: dict[str, float] = {}

    def put(kind: str, result: dict, channel: str | None) -> None:
        for key, values in result.items():
            if _keep(key):
                value = np.asarray(values, dtype=float).reshape(-1)
                out[_rename(kind, key, channel)] = float(value[0]) if value.size else float("nan")

    if "sizeshape" in chosen:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a flat cell's 3D hull: qhull's note and a division by 0
            put("sizeshape", functions["sizeshape"](mask, None, spacing=spacing if mask.ndim == 3 else None), None)
        if mask.ndim == 3 and not out.get("AreaShape_ConvexArea", 1.0) > 0:  # flat cell: its hull is 2D
            out["AreaShape_ConvexArea"] = _convex_voxels(mask)
            out["AreaShape_Solidity"] = out["AreaShape_Volume"] / out["AreaShape_ConvexArea"]
    for c, channel in enumerate(channels):
        image = pixels[c]
        if "intensity" in chosen:
            put("intensity", functions["intensity"](mask, image), channel)
        if "texture" in chosen:
            clipped = np.clip(image, 0.0, 1.0)
            for scale in scales:
                result = functions["texture"](mask, clipped, scale=scale, gray_levels=GRAY_LEVELS)
                if all(np.isnan(np.asarray(v, dtype=float)).all() for v in result.values()):
                    result = _texture_by_direction(mask, clipped, scale)
                put("texture", result, channel)
        if "granularity" in chosen:
            put("granularity", functions["granularity"](mask, image, granular_spectrum_length=granularity_length),
                channel)
    return out


@lru_cache(maxsize=32)
def _raw_keys(kind: str, option: int, spatial_dims: int = 3) -> tuple[str, ...]:
    # The names come from cp_measure itself, measured once per kind on a small ball (a disk in 2D;
    # one channel), so that they always match what it returns and an empty site
    # still knows its columns. ``option``: the texture scale or the spectrum length.
    zz, yy, xx = np.mgrid[:12, :16, :16]
    mask = (((zz - 5.5) / 4.5) ** 2 + ((yy - 7.5) / 6) ** 2 + ((xx - 7.5) / 6) ** 2 <= 1).astype(np.int32)
    mask = mask if spatial_dims == 3 else mask[6]
    pixels = 0.2 + 0.6 * np.random.default_rng(0).random(mask.shape)
    functions = _functions(spatial_dims)
    if kind == "sizeshape":
        result = functions[kind](mask, None, spacing=(1.0, 1.0, 1.0) if spatial_dims == 3 else None)
    elif kind == "texture":
        result = functions[kind](mask, pixels, scale=option, gray_levels=GRAY_LEVELS)
    elif kind == "granularity":
        result = functions[kind](mask, pixels, granular_spectrum_length=option)
    else:
        result = functions[kind](mask, pixels)
    return tuple(key for key in result if _keep(key))


def _names(channels: tuple[str, ...], chosen: tuple[str, ...], scales: tuple[int, ...],
           granularity_length: int, dims: int = 3) -> list[str]:
    names = [_rename("sizeshape", k, None) for k in _raw_keys("sizeshape", 0, dims)] if "sizeshape" in chosen else []
    for channel in channels:
        if "intensity" in chosen:
            names += [_rename("intensity", k, channel) for k in _raw_keys("intensity", 0, dims)]
        if "texture" in chosen:
            for scale in scales:
                names += [_rename("texture", k, channel) for k in _raw_keys("texture", scale, dims)]
        if "granularity" in chosen:
            names += [_rename("granularity", k, channel) for k in _raw_keys("granularity", granularity_length, dims)]
    return names


def classic_feature_names(
    channels: Sequence[str],
    measurements: str | Sequence[str] = "default",
    *,
    texture_scales: Sequence[int] | None = None,
    granularity_length: int = 16,
    spatial_dims: int = 3,
) -> list[str]:
    """The feature names :func:`site_classic_features` returns for these options, in order
    (``spatial_dims=2``: CellProfiler's 2D measurements, for crops of 2D plates)."""
    chosen, scales = _resolve(measurements, texture_scales)
    return _names(tuple(str(c) for c in channels), chosen, scales, int(granularity_length), int(spatial_dims))


def site_classic_features(
    crops: Any,
    masks: Any,
    channels: Sequence[str],
    spacing_zyx_um: Sequence[float],
    *,
    measurements: str | Sequence[str] = "default",
    texture_scales: Sequence[int] | None = None,
    granularity_length: int = 16,
    intensity_max: float = 65535.0,
    margin: int = 4,
) -> tuple[list[str], np.ndarray]:
    """CellProfiler measurements of every cell of one site, on its crop and central mask.

    Parameters
    ----------
    crops : array (cell, c, z, y, x), or 2D (cell, c, y, x)
        Raw intensities as from :func:`~gradcamo_dask.cells.crop_site` (not normalised).
        CuPy arrays are copied to the host (cp_measure runs on the CPU). 2D crops get
        CellProfiler's 2D measurements (``AreaShape_Area``, 4 texture directions).
    masks : array (cell, z, y, x) of bool
        Central-cell masks on the crop grid.
    channels : sequence of str
        Channel names, one per crop channel (``"DNA"``, ``"ER"``, ...); they end
        the per-channel feature names.
    spacing_zyx_um : (float, float, float)
        Voxel size in µm (used for ``AreaShape_SurfaceArea``).
    measurements : "default", "full" or list of str
        ``"default"``: size/shape, intensity and texture at scale 3;
        ``"full"``: also granularity, texture at scales 3, 5 and 10; or a list
        among ``"sizeshape", "intensity", "texture", "granularity"``. Costs per cell
        are in the module notes.
    texture_scales : sequence of int, optional
        Texture distances in voxels (overrides the set's scales).
    granularity_length : int
        Length of the granular spectrum (CellProfiler: 16).
    intensity_max : float
        The value that maps to intensity 1.0 (65535 for uint16 plates, 255 for
        uint8, 1.0 for float images already in [0, 1]).
    margin : int
        Voxels kept around each cell's bounding box when trimming the crop.

    Returns
    -------
    names : list of str
        CellProfiler-style names without the compartment prefix, the same for every
        site with these options (:func:`classic_feature_names`).
    values : numpy.ndarray (cell, len(names)) float32
        One row per cell; NaN where a measurement is undefined or the mask is empty.
    """
    crops, masks, channels, spacing = _checked_site_inputs(crops, masks, channels, spacing_zyx_um,
                                                           intensity_max, margin)
    chosen, scales = _resolve(measurements, texture_scales)
    names = list(_names(tuple(channels), chosen, scales, int(granularity_length), crops.ndim - 2))
    values = np.full((crops.shape[0], len(names)), np.nan, dtype=np.float32)
    if crops.shape[0] == 0:
        return names, values
    options = {"chosen": chosen, "scales": scales, "granularity_length": int(granularity_length)}
    _fill_site_rows(values, names, crops, masks, channels, spacing, 1.0 / float(intensity_max), int(margin), options)
    return names, values


def _checked_site_inputs(crops: Any, masks: Any, channels: Sequence[str], spacing_zyx_um: Sequence[float],
                         intensity_max: float, margin: int) -> tuple[np.ndarray, np.ndarray, list[str], tuple]:
    """Host copies of ``crops`` (cell, c, z, y, x) and ``masks`` (cell, z, y, x), the channel names and the
    voxel spacing in µm, after checking that they fit together; raises :class:`InputError` otherwise."""
    crops = to_numpy(crops)
    masks = to_numpy(masks)
    channels = [str(c) for c in channels]
    if crops.ndim not in (4, 5):
        raise InputError(f"crops must be (cell, c, z, y, x) or 2D (cell, c, y, x), got shape {crops.shape}")
    if masks.shape != (crops.shape[0], *crops.shape[2:]):
        raise InputError(f"masks {masks.shape} do not match crops {crops.shape}: expected (cell, z, y, x) = "
                         f"{(crops.shape[0], *crops.shape[2:])}")
    if len(channels) != crops.shape[1]:
        raise InputError(f"crops have {crops.shape[1]} channels but {len(channels)} channel names were given "
                         f"({channels}); give one name per channel")
    if len(set(channels)) != len(channels):
        raise InputError(f"channel names repeat: {channels}")
    spacing = tuple(float(s) for s in spacing_zyx_um)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise InputError(f"spacing_zyx_um must be 3 positive voxel sizes in µm, got {spacing_zyx_um}")
    if not intensity_max > 0:
        raise InputError(f"intensity_max must be > 0, got {intensity_max}")
    if int(margin) < 1:
        raise InputError(f"margin must be >= 1 voxel (marching cubes and edge intensities need it), got {margin}")
    return crops, masks, channels, spacing


def _fill_site_rows(values: np.ndarray, names: list[str], crops: np.ndarray, masks: np.ndarray,
                    channels: list[str], spacing: tuple, scale: float, margin: int, options: dict) -> None:
    """Measure each cell of a site on its crop trimmed to the cell box plus ``margin`` voxels, intensities
    times ``scale`` (1 / intensity_max), writing row i of ``values`` (cell, feature) in place; cells with
    an empty mask stay NaN. ``options``: ``chosen``, ``scales`` and ``granularity_length``."""
    column = {name: j for j, name in enumerate(names)}
    functions = _functions(crops.ndim - 2)
    for i in range(crops.shape[0]):
        mask = masks[i] != 0
        if not mask.any():
            continue
        box = _cell_box(mask, margin)
        cell_mask = mask[box].astype(np.int32)
        pixels = crops[(i, slice(None), *box)].astype(np.float64) * scale
        result = _measure_cell(functions, cell_mask, pixels, channels, spacing, options["chosen"],
                               options["scales"], options["granularity_length"])
        for name, value in result.items():
            j = column.get(name)
            if j is not None:
                values[i, j] = value


def _cell_box(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    """The cell's bounding box plus ``margin``, at least ``MIN_BOX`` voxels per axis (within the crop)."""
    box = []
    for idx, n in zip(np.nonzero(mask), mask.shape):
        lo, hi = max(int(idx.min()) - margin, 0), min(int(idx.max()) + 1 + margin, n)
        short = MIN_BOX - (hi - lo)
        if short > 0:  # grow both ways, then shift into the crop
            lo, hi = lo - short // 2, hi + short - short // 2
            lo, hi = max(0, min(lo, n - MIN_BOX)), min(n, max(hi, MIN_BOX))
        box.append(slice(lo, hi))
    return tuple(box)


def _classic_block(crops: np.ndarray, masks: np.ndarray, channels: tuple, spacing: tuple, kwargs: dict) -> np.ndarray:
    return site_classic_features(crops, masks, channels, spacing, **kwargs)[1]


def classic_features(
    image: xr.DataArray,
    labels: xr.DataArray,
    cells: pd.DataFrame,
    size: Sequence[int | None] = (None, 128, 128),
    **options: Any,
) -> xr.DataArray:
    """Lazy classic features of every cell of a cell table, one Dask task per site.

    The standalone form of what the pipeline does on its workers with
    ``classic=True``: crops and masks of each site (:func:`~gradcamo_dask.extract_crops`)
    go straight into :func:`site_classic_features` inside the same task.

    Parameters
    ----------
    image, labels, cells, size
        As for :func:`~gradcamo_dask.extract_crops`.
    **options
        Passed to :func:`site_classic_features` (``measurements``, ``texture_scales``,
        ``intensity_max``, ...). ``intensity_max`` defaults to the largest value of
        the image's integer dtype (1.0 for float images).

    Returns
    -------
    xarray.DataArray (cell, classic_feature) float32, Dask-backed
        Named ``"classic"``, with the cell table's columns as coords on ``cell``.
    """
    from gradcamo_dask.cells import extract_crops

    channels = tuple(str(c) for c in image["c"].values)
    spacing = tuple(float(s) for s in image.attrs.get("spacing_zyx_um", (1.0, 1.0, 1.0)))
    if "intensity_max" not in options:
        options["intensity_max"] = float(np.iinfo(image.dtype).max) if np.issubdtype(image.dtype, np.integer) else 1.0
    names = classic_feature_names(channels, options.get("measurements", "default"),
                                  texture_scales=options.get("texture_scales"),
                                  granularity_length=options.get("granularity_length", 16),
                                  spatial_dims=2 if image.sizes["z"] == 1 else 3)
    crops, masks = extract_crops(image, labels, cells, size)
    blocks = []
    for crop_block, mask_block, n in zip(crops.to_delayed().ravel(), masks.to_delayed().ravel(), crops.chunks[0]):
        task = dask.delayed(_classic_block)(crop_block, mask_block, channels, spacing, dict(options))
        blocks.append(da.from_delayed(task, shape=(n, len(names)), dtype=np.float32))
    data = (da.concatenate(blocks, axis=0) if blocks
            else da.zeros((0, len(names)), dtype=np.float32, chunks=(0, len(names))))
    table = cells.reset_index(drop=True)
    coords = {col: ("cell", table[col].to_numpy()) for col in table.columns}
    coords["classic_feature"] = np.asarray(names, dtype=str)
    return xr.DataArray(data, dims=("cell", "classic_feature"), coords=coords, name="classic")

