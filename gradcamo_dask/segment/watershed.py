"""Classical baseline segmenter: nucleus seeds from the DNA channel, cytoplasm watershed.

Needs no weights, so the demo and the tests run anywhere. It works in true 3D
(one 3D watershed per site, distances and smoothing scaled by the anisotropy)
rather than per slice: cells of 3D Cell Painting stacks span many slices, a 3D
distance transform splits touching nuclei better than per-slice seeds, and 3D
ids need no stitching heuristic. A single-slice image runs the same steps in 2D.

Steps, per site (``nucleus`` and ``cytoplasm`` are ``(z, y, x)`` intensities):

1. Gaussian smoothing, sigma ``smoothing`` voxels in y, x and ``smoothing /
   anisotropy`` in z.
2. Nuclei: smoothed DNA above its Otsu threshold (of log intensities), holes filled per slice, specks
   under ``min_size`` removed; seeds are the h-maxima of the anisotropic
   Euclidean distance transform (h = ``seed_height`` x nucleus radius); a
   watershed of the negated distance splits touching nuclei.
3. Cells: the "cell body" image is the sum of both channels, each scaled to
   its site's 1st-99.5th percentile range and smoothed (sigma twice the
   nuclear one), so that the whole cell is bright even where a cytoplasm stain
   leaves the nucleus dark. Body above its Otsu threshold, united with the
   nuclei, is the cell mask; a watershed on the negated body, started from the
   nuclei, splits it between cells along the dim lines where cells touch.
4. Objects under ``min_size`` voxels are removed; ids are made 1..N.

The thresholds and the nucleus size come from :func:`watershed_statistics`,
computed once per site (not per tile), so that a tiled site uses the same
numbers everywhere.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import ndimage as ndi

__all__ = ["watershed_statistics", "watershed_site"]


def _otsu(values: np.ndarray) -> float | None:
    """Otsu's threshold of the log intensities (offset to start at 1), in the input's units.

    On a log scale dim nuclei next to bright ones still clear the threshold;
    None for a constant input (nothing to separate).
    """
    from skimage.filters import threshold_otsu

    values = np.asarray(values, dtype=np.float32).ravel()
    if values.size == 0 or float(values.min()) == float(values.max()):
        return None
    low = float(values.min())
    return float(np.exp(threshold_otsu(np.log(values - low + 1.0)))) + low - 1.0


def _smooth(volume: np.ndarray, sigma: float, anisotropy: float) -> np.ndarray:
    volume = np.asarray(volume, dtype=np.float32)
    if sigma <= 0:
        return volume
    if volume.ndim == 2:
        return ndi.gaussian_filter(volume, sigma)
    return ndi.gaussian_filter(volume, (sigma / anisotropy, sigma, sigma))


def watershed_statistics(
    nucleus: np.ndarray,
    cytoplasm: np.ndarray | None = None,
    *,
    anisotropy: float = 1.0,
    smoothing: float = 1.0,
    min_size: int = 30,
    voxel_stride: int = 1,
) -> dict[str, Any]:
    """Site-level numbers of the baseline: Otsu thresholds and the typical nucleus diameter.

    Parameters
    ----------
    nucleus, cytoplasm : numpy.ndarray
        ``(z, y, x)`` intensities of the whole site (or a subsample with every
        ``voxel_stride``-th voxel in y and x, for sites too large to hold).
    anisotropy : float
        z step over xy pixel size.
    smoothing : float
        Gaussian sigma in xy voxels (of the full-resolution site).
    min_size : int
        Smallest object in voxels.
    voxel_stride : int
        Subsampling step in y and x of the arrays given (diameters are scaled back).

    Returns
    -------
    dict
        ``nucleus_threshold`` (smoothed DNA, raw units; None for a constant
        channel), ``nucleus_range`` and ``cytoplasm_range`` (1st and 99.5th
        percentiles), ``cell_threshold`` (cell-body image) and
        ``nucleus_diameter`` (xy voxels, None when no nucleus is found).
    """
    stride = max(1, int(voxel_stride))
    nucleus = np.squeeze(nucleus, 0) if nucleus.shape[0] == 1 else nucleus
    smoothed = _smooth(nucleus, smoothing / stride, anisotropy)
    nucleus_threshold = _otsu(smoothed)
    nucleus_range = _range(nucleus)
    cytoplasm_range = cell_threshold = None
    if cytoplasm is not None:
        cyto = np.squeeze(cytoplasm, 0) if cytoplasm.shape[0] == 1 else cytoplasm
        cytoplasm_range = _range(cyto)
        body = _cell_body(nucleus, cyto, nucleus_range, cytoplasm_range, 2 * smoothing / stride, anisotropy)
        cell_threshold = _otsu(body)
    diameter = None
    if nucleus_threshold is not None:
        mask = smoothed > nucleus_threshold
        components, n = ndi.label(mask)
        if n:
            sizes = np.bincount(components.ravel())[1:]
            sizes = sizes[sizes * stride**2 >= min_size]
            if sizes.size:
                volume = float(np.median(sizes)) * stride**2  # voxels at full xy resolution
                if mask.ndim == 3:
                    # equivalent sphere in physical units where one xy voxel is 1
                    diameter = (6.0 * volume * anisotropy / math.pi) ** (1.0 / 3.0)
                else:
                    diameter = math.sqrt(4.0 * volume / math.pi)
    return {
        "nucleus_threshold": nucleus_threshold,
        "nucleus_range": nucleus_range,
        "cytoplasm_range": cytoplasm_range,
        "cell_threshold": cell_threshold,
        "nucleus_diameter": diameter,
    }


def _range(values: np.ndarray, percentiles: tuple[float, float] = (1.0, 99.5)) -> list[float]:
    low, high = (float(v) for v in np.percentile(np.asarray(values, dtype=np.float32), percentiles))
    return [low, high if high > low else low + 1.0]


def _cell_body(
    nucleus: np.ndarray, cytoplasm: np.ndarray, nucleus_range, cytoplasm_range, sigma: float, anisotropy: float
) -> np.ndarray:
    """Smoothed sum of the two channels, each scaled by its site range: bright over the whole cell
    (the nucleus is often dark in cytoplasm stains, the cytoplasm dark in DNA)."""
    n = (np.asarray(nucleus, np.float32) - nucleus_range[0]) / (nucleus_range[1] - nucleus_range[0])
    c = (np.asarray(cytoplasm, np.float32) - cytoplasm_range[0]) / (cytoplasm_range[1] - cytoplasm_range[0])
    return _smooth(n + c, sigma, anisotropy)


def _remove_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    if min_size <= 1 or labels.max() == 0:
        return labels
    sizes = np.bincount(labels.ravel())
    small = sizes < min_size
    small[0] = False
    if small.any():
        labels = labels.copy()
        labels[small[labels]] = 0
    return labels


def _nuclei(nucleus: np.ndarray, threshold: float, flat: bool, anisotropy: float, nucleus_diameter: float | None,
            smoothing: float, seed_height: float, min_size: int, statistics: dict[str, Any]) -> np.ndarray | None:
    """Nuclei: smoothed, thresholded, holes filled, split by watershed on the distance map; None: no nucleus."""
    from skimage.morphology import h_maxima
    from skimage.segmentation import watershed

    nuc = _smooth(nucleus, smoothing, anisotropy)
    nuclear_mask = nuc > threshold
    if flat:
        nuclear_mask = ndi.binary_fill_holes(nuclear_mask)
    else:
        nuclear_mask = np.stack([ndi.binary_fill_holes(s) for s in nuclear_mask])
    nuclear_mask = _remove_small(ndi.label(nuclear_mask)[0], min_size) > 0
    if not nuclear_mask.any():
        return None
    sampling = (1.0, 1.0) if flat else (anisotropy, 1.0, 1.0)
    distance = ndi.distance_transform_edt(nuclear_mask, sampling=sampling)
    diameter = nucleus_diameter or statistics.get("nucleus_diameter") or 2.0 * float(distance.max())
    seeds = ndi.label(h_maxima(distance, max(0.5, seed_height * diameter / 2.0)) & nuclear_mask)[0]
    return watershed(-distance, seeds, mask=nuclear_mask)


def _grow_cells(nucleus: np.ndarray, cytoplasm: np.ndarray, nuclei: np.ndarray, statistics: dict[str, Any],
                smoothing: float, anisotropy: float) -> np.ndarray:
    """Nuclei grown by watershed into the cell bodies seen in the cytoplasm channel."""
    from skimage.segmentation import watershed

    body = _cell_body(nucleus, cytoplasm, statistics["nucleus_range"], statistics["cytoplasm_range"],
                      2 * smoothing, anisotropy)
    cell_mask = nuclei > 0
    if statistics.get("cell_threshold") is not None:
        cell_mask = cell_mask | (body > statistics["cell_threshold"])
    return watershed(-body, nuclei, mask=cell_mask)


def _renumber(labels: np.ndarray) -> np.ndarray:
    """Ids 1..N in order, 0 kept as background."""
    ids = np.unique(labels)
    ids = ids[ids != 0]
    lut = np.zeros(int(labels.max()) + 1, np.int32)
    lut[ids] = np.arange(1, ids.size + 1, dtype=np.int32)
    return lut[labels]


def watershed_site(
    nucleus: np.ndarray,
    cytoplasm: np.ndarray | None = None,
    *,
    anisotropy: float = 1.0,
    nucleus_diameter: float | None = None,
    smoothing: float = 1.0,
    seed_height: float = 0.3,
    min_size: int = 30,
    statistics: dict[str, Any] | None = None,
) -> np.ndarray:
    """Segment one site (or one tile window) with the classical baseline.

    Parameters
    ----------
    nucleus : numpy.ndarray
        ``(z, y, x)`` DNA-channel intensities (any real dtype).
    cytoplasm : numpy.ndarray, optional
        ``(z, y, x)`` cytoplasm-channel intensities; without it the cells are the nuclei.
    anisotropy : float
        z step over xy pixel size (1.71 in the paper's stacks).
    nucleus_diameter : float, optional
        Typical nucleus diameter in xy voxels; estimated from the site when None.
    smoothing : float
        Gaussian sigma in xy voxels (z sigma is divided by the anisotropy).
    seed_height : float
        Height of the distance maxima kept as seeds, as a fraction of the
        nucleus radius; larger merges more, smaller splits more.
    min_size : int
        Objects under this many voxels are removed.
    statistics : dict, optional
        From :func:`watershed_statistics` on the whole site; computed from the
        arrays given when None (right for an untiled site, wrong for a tile).

    Returns
    -------
    numpy.ndarray
        ``(z, y, x)`` int32 labels, 0 background, ids 1..N.
    """
    nucleus = np.asarray(nucleus)
    if nucleus.ndim != 3:
        raise ValueError(f"nucleus must be (z, y, x), got shape {nucleus.shape}")
    out_shape = nucleus.shape
    flat = nucleus.shape[0] == 1  # single slice: handled as 2D
    if statistics is None:
        statistics = watershed_statistics(
            nucleus, cytoplasm, anisotropy=anisotropy, smoothing=smoothing, min_size=min_size
        )
    threshold = statistics["nucleus_threshold"]
    if threshold is None:  # constant (e.g. all-zero) site: no cells
        return np.zeros(out_shape, np.int32)
    nuclei = _nuclei(nucleus[0] if flat else nucleus, threshold, flat, anisotropy, nucleus_diameter, smoothing,
                     seed_height, min_size, statistics)
    if nuclei is None:
        return np.zeros(out_shape, np.int32)
    cells = nuclei
    if cytoplasm is not None:
        cytoplasm = np.asarray(cytoplasm)
        if cytoplasm.shape != out_shape:
            raise ValueError(f"cytoplasm shape {cytoplasm.shape} differs from nucleus shape {out_shape}")
        cells = _grow_cells(nucleus[0] if flat else nucleus, cytoplasm[0] if flat else cytoplasm, nuclei,
                            statistics, smoothing, anisotropy)
    cells = _renumber(_remove_small(cells.astype(np.int32, copy=False), min_size))
    return cells.reshape(out_shape)
