"""Small synthetic 3D sites with ground truth for the segmentation tests.

Cells are ellipsoids (radius ``radius`` in xy voxels, squashed in z by the
anisotropy) cut against each other like a Voronoi diagram, each with a bright
ellipsoidal nucleus at its centre; boundaries between touching cells are dimmer
in the cytoplasm channel, and both channels carry Poisson noise.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi


def blob_site(
    shape: tuple[int, int, int] = (8, 96, 96),
    n_cells: int = 9,
    radius: float = 9.0,
    seed: int = 0,
    anisotropy: float = 1.71,
    margin: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One site: ``((2, z, y, x) uint16 [nucleus, cytoplasm], (z, y, x) int32 ground truth)``.

    Cell centres lie at least ``margin`` voxels (default ``radius``) from the
    y/x border and at least 1.6 radii from each other.
    """
    rng = np.random.default_rng(seed)
    n_z, n_y, n_x = shape
    margin = radius if margin is None else margin
    centres: list[np.ndarray] = []
    for _ in range(20000):
        if len(centres) == n_cells:
            break
        c = np.array(
            [rng.uniform(n_z * 0.35, n_z * 0.65), rng.uniform(margin, n_y - margin), rng.uniform(margin, n_x - margin)]
        )
        if all(np.hypot(*(c[1:] - d[1:])) > 1.6 * radius for d in centres):
            centres.append(c)
    zz, yy, xx = np.meshgrid(np.arange(n_z), np.arange(n_y), np.arange(n_x), indexing="ij")
    truth = np.zeros(shape, np.int32)
    nearest = np.full(shape, np.inf)
    nucleus = np.zeros(shape, np.float32)
    for i, c in enumerate(centres, 1):
        d = np.sqrt(((zz - c[0]) * anisotropy) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2)
        inside = (d < radius) & (d < nearest)
        truth[inside] = i
        nearest = np.where(inside, d, nearest)
        nucleus += (d < radius * 0.5).astype(np.float32)
    cytoplasm = (truth > 0).astype(np.float32)
    edges = ndi.morphological_gradient(truth, size=(1, 3, 3)) > 0
    cytoplasm[edges & (truth > 0)] *= 0.5
    cyto = ndi.gaussian_filter(cytoplasm * 800 + nucleus * 200, (0.5, 1, 1)) + 100
    nuc = ndi.gaussian_filter(nucleus * 1000, (0.5, 1, 1)) + 100
    image = np.stack([rng.poisson(nuc), rng.poisson(cyto)]).astype(np.uint16)
    return image, truth


def blob_plate(n_wells: int = 1, n_sites: int = 2, shape=(8, 96, 96), seed: int = 0, channels=("DNA", "RNA"), **kwargs):
    """A lazy plate ``(well, site, c, z, y, x)`` of blob sites and its ground truth ``(well, site, z, y, x)``."""
    import dask.array as da
    import xarray as xr

    images, truths = [], []
    for w in range(n_wells):
        row_i, row_t = [], []
        for s in range(n_sites):
            image, truth = blob_site(shape, seed=seed + 100 * w + s, **kwargs)
            planes = {"DNA": image[0], "RNA": image[1]}
            stack = np.stack([planes.get(name, np.zeros_like(image[0])) for name in channels])
            row_i.append(stack)
            row_t.append(truth)
        images.append(row_i)
        truths.append(row_t)
    data = da.from_array(np.array(images), chunks=(1, 1, len(channels), *shape))
    wells = [f"B{2 + w:02d}" for w in range(n_wells)]
    image = xr.DataArray(
        data,
        dims=("well", "site", "c", "z", "y", "x"),
        coords={
            "well": wells,
            "row": ("well", ["B"] * n_wells),
            "column": ("well", [2 + w for w in range(n_wells)]),
            "site": list(range(n_sites)),
            "c": list(channels),
        },
        name="image",
        attrs={"plate": "blobs", "spacing_zyx_um": [1.71, 1.0, 1.0]},
    )
    return image, np.array(truths)


def matched_iou(truth: np.ndarray, labels: np.ndarray) -> tuple[int, int, int]:
    """Greedy one-to-one IoU > 0.5 matching: ``(matches, n_truth, n_predicted)``."""
    t_ids = np.unique(truth)
    t_ids = t_ids[t_ids != 0]
    p_ids = np.unique(labels)
    p_ids = p_ids[p_ids != 0]
    both = (truth > 0) | (labels > 0)
    pairs, counts = np.unique(np.stack([truth[both], labels[both]]), axis=1, return_counts=True)
    t_size = {i: int((truth == i).sum()) for i in t_ids}
    p_size = {i: int((labels == i).sum()) for i in p_ids}
    matches = 0
    for (t, p), n in zip(pairs.T, counts):
        if t and p and n / (t_size[t] + p_size[p] - n) > 0.5:
            matches += 1  # IoU > 0.5 pairs are unique on both sides
    return matches, len(t_ids), len(p_ids)


def as_voxel_sets(labels: np.ndarray) -> set[frozenset[int]]:
    """Each object as the frozenset of its flat voxel indices (ids forgotten)."""
    flat = labels.ravel()
    order = np.argsort(flat, kind="stable")
    ids, starts = np.unique(flat[order], return_index=True)
    out = set()
    for k, i in enumerate(ids):
        if i == 0:
            continue
        stop = starts[k + 1] if k + 1 < len(starts) else len(order)
        out.add(frozenset(order[starts[k] : stop].tolist()))
    return out
