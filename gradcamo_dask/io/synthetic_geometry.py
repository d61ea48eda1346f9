"""Geometry of one synthetic site: cells on a jittered lattice, domes on the coverslip, nuclei inside.

Step 1 of :mod:`gradcamo_dask.io.synthetic_site` (see its notes for the recipe and the
``mosaic`` knob). Every random draw comes from the generator handed in, in a fixed order,
so a site's geometry is a pure function of the seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

# The six Cell Painting channels; each cell draws one brightness factor per channel.
CHANNELS: tuple[str, ...] = ("DNA", "ER", "RNA", "AGP", "Actin", "Mito")

@dataclass(frozen=True)
class SiteGeometry:
    """Ground truth of one site: labels and the per-cell parameters the stains need.

    All per-cell arrays are indexed by ``label - 1``. Lengths in voxels.
    """

    labels: np.ndarray  # (z, y, x) int32, 0 = background
    owner: np.ndarray  # (y, x) int32: the cell whose footprint covers the pixel (0 = none)
    radial: np.ndarray  # (y, x) float32: 0 at a cell's centre, 1 at its nominal edge
    nucleus: np.ndarray  # (z, y, x) bool
    bottom: float  # z of the coverslip, voxels
    strength: np.ndarray  # (n,) response in [0, 1]
    centre: np.ndarray  # (n, 2) y, x of the cell centre
    nucleus_centre: np.ndarray  # (n, 3) z, y, x
    nucleus_radius: np.ndarray  # (n,) mean radius in y and x
    height: np.ndarray  # (n,) dome height in slices
    angle: np.ndarray  # (n,) orientation of the long axis, radians
    brightness: np.ndarray  # (n, 6) per-cell, per-channel intensity factors
    responder: np.ndarray | None = None  # (n,) bool: the cell would respond in a treated well
    neighbours: np.ndarray | None = None  # (n, n) bool: footprints touch (4-connected)


def _lattice(rng: np.random.Generator, shape_yx: tuple[int, int], radius: float, strength: float) -> np.ndarray:
    """Jittered hexagonal lattice of cell centres covering the site plus one radius around it.

    Treated wells hold fewer, larger cells: the spacing grows by up to 40 % with ``strength``.
    """
    spacing = 1.8 * radius * (1 + 0.4 * strength)
    ny, nx = shape_yx
    offset = rng.uniform(0, spacing, size=2)
    rows = np.arange(-radius - offset[0], ny + radius, spacing * np.sqrt(3) / 2)
    centres = []
    for i, y in enumerate(rows):
        xs = np.arange(-radius - offset[1] + (i % 2) * spacing / 2, nx + radius, spacing)
        centres.append(np.stack([np.full_like(xs, y), xs], axis=1))
    centres = np.concatenate(centres)
    centres += rng.normal(0, 0.16 * spacing, size=centres.shape)
    keep = rng.random(len(centres)) > 0.07  # a few gaps in the monolayer
    return centres[keep]


def _harmonics(rng: np.random.Generator, n: int, amplitude: np.ndarray) -> np.ndarray:
    """Per-cell coefficients of a wobbly outline: (n, 3 harmonics, 2) cos/sin weights."""
    return rng.normal(0, 1, size=(n, 3, 2)) * amplitude[:, None, None] / 2


def _outline(phi: np.ndarray, coeffs: np.ndarray) -> np.ndarray:
    """Relative radius ``1 + sum_k a_k cos(k phi) + b_k sin(k phi)`` for k = 2, 3, 4."""
    out = np.ones_like(phi)
    for k in range(3):
        out += coeffs[..., k, 0] * np.cos((k + 2) * phi) + coeffs[..., k, 1] * np.sin((k + 2) * phi)
    return out


def _largest_pieces(owner: np.ndarray) -> np.ndarray:
    """Keep, for every cell id, only its largest 4-connected piece (a neighbour can cut a
    footprint in two); the other pieces become background."""
    from skimage.measure import label

    pieces = label(owner, background=0, connectivity=1)
    sizes = np.bincount(pieces.ravel())
    piece_owner = np.zeros(len(sizes), dtype=np.int64)
    piece_owner[pieces.ravel()] = owner.ravel()
    ids = np.arange(1, len(sizes))
    order = np.lexsort((-sizes[1:], piece_owner[1:]))  # by owner, biggest piece first
    keep = np.zeros(len(sizes), dtype=bool)
    first_of_owner = np.r_[True, np.diff(piece_owner[1:][order]) != 0]
    keep[ids[order][first_of_owner]] = True
    return np.where(keep[pieces], owner, 0)


def _independent_set(rng: np.random.Generator, centres: np.ndarray, reach: float) -> np.ndarray:
    """Maximal independent set of the graph joining centres closer than ``reach`` (px),
    greedy in a random order: no two chosen cells are neighbours and every other cell
    has a chosen neighbour. Returns a bool array."""
    pairs = cKDTree(centres).query_pairs(reach, output_type="ndarray")
    adjacent = [[] for _ in range(len(centres))]
    for a, b in pairs:
        adjacent[a].append(b)
        adjacent[b].append(a)
    chosen = np.zeros(len(centres), dtype=bool)
    blocked = np.zeros(len(centres), dtype=bool)
    for i in rng.permutation(len(centres)):
        if not blocked[i]:
            chosen[i] = True
            blocked[i] = True
            blocked[adjacent[i]] = True
    return chosen


def _touching(owner: np.ndarray, m: int) -> np.ndarray:
    """(m, m) bool: cells whose footprints share an edge in the ``owner`` map."""
    touch = np.zeros((m + 1, m + 1), dtype=bool)
    for axis in (0, 1):
        a = np.moveaxis(owner, axis, 0)
        touch[a[1:].ravel(), a[:-1].ravel()] = True
    touch = touch | touch.T
    np.fill_diagonal(touch, False)
    return touch[1:, 1:]


def site_geometry(
    rng: np.random.Generator,
    shape: tuple[int, int, int],
    strength: float,
    cell_radius: float = 28.0,
    mosaic: bool = False,
    responder_growth: bool = True,
    bystanders: bool = True,
) -> SiteGeometry:
    """Cells and nuclei of one site.

    Parameters
    ----------
    rng : numpy.random.Generator
        Source of every random draw.
    shape : (int, int, int)
        Site shape ``(z, y, x)``, voxels.
    strength : float
        The well's treatment response in [0, 1] (0 for controls).
    cell_radius : float
        Typical radius of a cell's footprint in y and x, pixels (before treatment).
    mosaic : bool
        Only a maximal independent set of cells responds (see the module notes), at
        the same density in every well; False: about 88 % of cells respond.
    responder_growth : bool
        Responding cells grow (footprint radius up to +45 %, domes up to 10 % lower);
        False: every cell draws its size alike, so responders and bystanders have the
        same size distribution and size carries no treatment information.
    bystanders : bool
        False (mosaic only): the cells that do not respond are drawn as background
        after every draw is made, so each responder stands alone with exactly the
        geometry it has in the full mosaic site (a sparsely seeded well). Their
        per-cell entries stay (labels keep their numbers) but own no voxel.

    Returns
    -------
    SiteGeometry
    """
    nz, ny, nx = shape
    centres = _lattice(rng, (ny, nx), cell_radius, 0.0 if mosaic else strength)
    responder, s, radius, elongation, angle, wobble = _cell_traits(rng, centres, strength, cell_radius, mosaic,
                                                                  responder_growth)
    yy, xx = np.mgrid[0:ny, 0:nx]
    radial, owner = _footprints(yy, xx, centres, radius, elongation, angle, wobble)
    owner, pick = _present_cells(owner, len(centres))
    full_owner = owner  # who touches whom is the full site's, bystanders drawn or not
    s, radius, elongation, angle = s[pick], radius[pick], elongation[pick], angle[pick]
    centres, m, responder = centres[pick], len(pick), responder[pick]
    labels, bottom, height = _domes(rng, yy, xx, owner, radial, s if responder_growth else 0 * s, nz)
    nucleus, n_centre, n_radius = _nuclei(rng, yy, xx, owner, labels, centres, radius, angle, s, bottom, height)
    if not bystanders:  # after every geometry draw, so the responders are the full site's
        gone = np.flatnonzero(~responder) + 1
        owner = np.where(np.isin(owner, gone), 0, owner)
        labels = np.where(np.isin(labels, gone), 0, labels).astype(labels.dtype)
        nucleus = nucleus & (labels > 0)
    inside = owner > 0
    return SiteGeometry(
        labels=labels,
        owner=owner.astype(np.int32),
        radial=np.where(inside, radial, 1.0).astype(np.float32),
        nucleus=nucleus,
        bottom=float(bottom),
        strength=s,
        centre=centres,
        nucleus_centre=n_centre,
        nucleus_radius=n_radius,
        height=height,
        angle=angle,
        brightness=np.exp(rng.normal(0, 0.2, (m, len(CHANNELS)))).astype(np.float32),
        responder=responder,
        neighbours=_touching(full_owner, m),
    )


def _cell_traits(rng: np.random.Generator, centres: np.ndarray, strength: float, cell_radius: float,
                 mosaic: bool, growth: bool = True) -> tuple:
    """``(responder, response, radius px, elongation, angle rad, outline harmonics)`` of each cell centre."""
    n = len(centres)
    if mosaic:
        responder = _independent_set(rng, centres, 1.8 * cell_radius * 1.3)
        s = np.clip(strength * responder * rng.normal(1.0, 0.1, n), 0.0, 1.0)
    else:
        responder = rng.random(n) > 0.12
        s = np.clip(strength * responder * rng.normal(1.0, 0.25, n), 0.0, 1.0)
    radius = cell_radius * np.exp(rng.normal(0, 0.1, n)) * (1 + 0.45 * s * growth)
    elongation = 1 + np.abs(rng.normal(0, 0.15, n)) + 0.9 * s
    angle = rng.uniform(0, np.pi, n)
    wobble = _harmonics(rng, n, 0.10 + 0.15 * s)
    return responder, s, radius, elongation, angle, wobble


def _footprints(yy: np.ndarray, xx: np.ndarray, centres: np.ndarray, radius: np.ndarray, elongation: np.ndarray,
                angle: np.ndarray, wobble: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(radial, owner)`` in y, x: each pixel goes to the cell with the smallest scaled distance
    (a power diagram of irregular ellipses) if that distance is below 1; owner 0 is background."""
    ny, nx = yy.shape
    pixels = np.stack([yy.ravel(), xx.ravel()], axis=1).astype(np.float32)
    k = min(6, len(centres))
    _, near = cKDTree(centres).query(pixels, k=k)
    near = near.reshape(len(pixels), k)
    rel = pixels[:, None, :] - centres[near]
    cos, sin = np.cos(angle[near]), np.sin(angle[near])
    along = rel[..., 1] * cos + rel[..., 0] * sin
    across = -rel[..., 1] * sin + rel[..., 0] * cos
    a = radius[near] * np.sqrt(elongation[near])
    b = radius[near] / np.sqrt(elongation[near])
    scaled = np.hypot(along / a, across / b) / _outline(np.arctan2(across, along), wobble[near])
    best = np.argmin(scaled, axis=1)
    radial = scaled[np.arange(len(pixels)), best].reshape(ny, nx).astype(np.float32)
    owner = np.where(radial < 1.0, near[np.arange(len(pixels)), best].reshape(ny, nx) + 1, 0)
    return radial, _largest_pieces(owner)


def _present_cells(owner: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Keep only cells that show up in the site, renumbered 1..m in order of first appearance:
    ``(owner, pick)`` where ``pick`` indexes the kept cells' traits."""
    present, first = np.unique(owner.ravel(), return_index=True)
    present, first = present[present > 0], first[present > 0]
    order = present[np.argsort(first)]
    lut = np.zeros(n + 1, dtype=np.int32)
    lut[order] = np.arange(1, len(order) + 1, dtype=np.int32)
    return lut[owner], order - 1


def _domes(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, owner: np.ndarray, radial: np.ndarray,
           s: np.ndarray, nz: int) -> tuple[np.ndarray, float, np.ndarray]:
    """``(labels (z, y, x), coverslip bottom in slices, cell heights in slices)``: cells are domes on a
    slightly tilted coverslip, heights scaled to the stack depth."""
    ny, nx = owner.shape
    m = len(s)
    depth_scale = nz / 21.0
    bottom = (2.8 + rng.uniform(0, 1.2)) * depth_scale
    height = 8.5 * depth_scale * np.exp(rng.normal(0, 0.1, m)) * (1 - 0.1 * s)
    tilt = rng.normal(0, 0.4, 2) / max(ny, nx)
    floor = bottom + tilt[0] * (yy - ny / 2) + tilt[1] * (xx - nx / 2)
    inside = owner > 0
    h_cell = np.zeros((ny, nx), np.float32)
    h_cell[inside] = height[owner[inside] - 1] * np.sqrt(np.clip(1 - radial[inside] ** 2, 0, 1)) ** 0.7
    h_cell[inside] = np.maximum(h_cell[inside], 2.0)  # >= 2 slices: neighbouring columns overlap in z
    z = np.arange(nz, dtype=np.float32)[:, None, None]
    in_cell = (z >= floor) & (z < floor + h_cell)
    return np.where(in_cell, owner, 0).astype(np.int32), bottom, height


def _nuclei(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, owner: np.ndarray, labels: np.ndarray,
            centres: np.ndarray, radius: np.ndarray, angle: np.ndarray, s: np.ndarray, bottom: float,
            height: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(nucleus mask (z, y, x), nucleus centres (z, y, x) voxels, nucleus radii px)``: ellipsoids with
    wobbly outlines, off-centre, inside their cell."""
    nz, ny, nx = labels.shape
    m = len(s)
    n_radius = np.minimum(0.42 * radius * (1 + 0.3 * s), 0.7 * radius)
    n_elong = 1 + np.abs(rng.normal(0, 0.1, m)) + 0.3 * s
    n_angle = angle + rng.normal(0, 0.3, m)
    shift = rng.normal(0, 0.12, (m, 2)) * radius[:, None]
    n_centre_yx = centres + shift
    n_wobble = _harmonics(rng, m, 0.05 + 0.12 * s)
    n_z = bottom + 0.42 * height
    n_half = 0.3 * height
    inside = owner > 0
    quad = np.full((ny, nx), np.inf, dtype=np.float32)
    o = owner[inside] - 1
    rel_y = yy[inside] - n_centre_yx[o, 0]
    rel_x = xx[inside] - n_centre_yx[o, 1]
    c, sn = np.cos(n_angle[o]), np.sin(n_angle[o])
    u = (rel_x * c + rel_y * sn) / (n_radius[o] * np.sqrt(n_elong[o]))
    v = (-rel_x * sn + rel_y * c) / (n_radius[o] / np.sqrt(n_elong[o]))
    quad[inside] = (u**2 + v**2) / _outline(np.arctan2(v, u), n_wobble[o]) ** 2
    z = np.arange(nz, dtype=np.float32)[:, None, None]
    z_term = np.full((nz, ny, nx), np.inf, dtype=np.float32)
    z_term[:, inside] = ((z[:, :, 0] - n_z[o][None, :]) / n_half[o][None, :]) ** 2
    nucleus = (labels > 0) & (quad[None] + z_term < 1.0)
    return nucleus, np.column_stack([n_z, n_centre_yx]), n_radius
