"""Render one site of a synthetic 3D Cell Painting plate, with its ground-truth labels.

A site is made in four steps, each a small function over NumPy arrays:

1. **Geometry** (:func:`site_geometry`): densely packed, jittered cells on a hexagonal
   lattice that runs past the site's edges (so that some cells are cut by the border),
   each cell a dome on the coverslip whose footprint is an irregular ellipse; a
   nucleus, an ellipsoid with a wobbly outline, inside each cell. The result is an
   int32 label volume (ids 1..n, unique within the site) and per-cell parameters.
2. **Stains** (:func:`site_signal`): the six Cell Painting channels (DNA, ER, RNA,
   AGP, Actin, Mito) as expected photon counts, each with its own texture:
   chromatin speckle, a reticular ER network with perinuclear enrichment, nucleoli,
   plasma membrane and a Golgi patch, cortical actin and stress fibres, and a
   tubular mitochondrial network that fragments into puncta with dose.
3. **Optics** (:func:`apply_optics`): a Gaussian point-spread function that is
   longer along z, extra out-of-focus blur that grows with the distance from the
   site's focal plane, and a smooth illumination gradient with vignetting.
4. **Camera** (:func:`apply_camera`): Poisson shot noise, Gaussian read noise,
   camera offset, clipping to uint16.

Treatment enters through one number per cell, the response ``strength`` in [0, 1]
(the well's dose response times a per-cell factor, with some non-responders). It
grows cell and nuclear size, elongation and outline irregularity, DNA and nucleolar
intensity, lowers ER intensity and stress fibres, disperses the Golgi and turns
tubular mitochondria into fragments.

The ``mosaic`` knob makes a well where only some cells respond: the responders form
a maximal independent set of the lattice's neighbour graph (no two responders touch;
every other cell, a *bystander*, touches at least one responder), chosen alike in
every well, and cell density no longer depends on the dose. A responder's crop then
carries the treatment only inside its own cell (its neighbours are bystanders, which
look like controls); a bystander's crop carries it only through its responding
neighbours. :class:`SiteGeometry` holds who is who.

The ``granules`` knob (in [0, 1]) adds a strong, *local* phenotype, bright RNA puncta in responders.

The ``confounder`` knob (in [0, 1]) adds, strictly outside every cell (label 0), a
faint grating whose orientation encodes the treatment: information a model can use
to guess the treatment without looking at the cell. With ``confounder=0`` the
background carries no treatment information.

Every random draw comes from the one ``numpy.random.Generator`` handed in, so a site is a pure
function of ``(seed, well index, site index)`` and the recipe; a 21 x 256 x 256 site takes ~0.3 s.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from gradcamo_dask.io.synthetic_geometry import CHANNELS, SiteGeometry, site_geometry


# Expected photons per voxel for a typical stained structure, per channel.
_LEVELS = np.array([1400.0, 550.0, 450.0, 500.0, 650.0, 750.0], dtype=np.float32)
_MEDIUM_PHOTONS = 20.0  # autofluorescence of the medium, photons per voxel
_CAMERA_OFFSET = 100.0  # ADU
_READ_NOISE = 2.5  # ADU, standard deviation
_EXACT_POISSON_BELOW = 10.0  # above this mean, shot noise uses the normal approximation


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma) -> np.ndarray:
    """Gaussian-filtered white noise scaled to unit standard deviation (float32)."""
    field = ndi.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma, mode="wrap")
    return field / max(float(field.std()), 1e-6)


def _per_voxel(values: np.ndarray, owner: np.ndarray) -> np.ndarray:
    """A per-cell value painted on each pixel of its footprint (0 outside cells), float32."""
    return np.concatenate([[0.0], values]).astype(np.float32)[owner]


def _ridges(field: np.ndarray, width: float) -> np.ndarray:
    """Thin network along the zero crossings of a smooth field, in [0, 1]."""
    return np.exp(-((field / width) ** 2))


def site_signal(rng: np.random.Generator, geo: SiteGeometry, granules: float = 0.0, granule_channel: int = 2) -> np.ndarray:
    """Expected photon counts of the six stains before optics, ``(6, z, y, x)`` float32; ``granules`` in
    [0, 1]: puncta in responders' cytoplasm (:func:`granule_field`), at 1 about 10x the channel's level, in
    channel ``granule_channel`` (index into CHANNELS; 2 = RNA)."""
    labels, owner, radial = geo.labels, geo.owner, geo.radial
    nz, ny, nx = labels.shape
    cell = labels > 0
    nucleus = geo.nucleus
    cyto = cell & ~nucleus
    s2 = _per_voxel(geo.strength, owner)  # response on each pixel's cell
    bright = [_per_voxel(geo.brightness[:, c], owner) for c in range(len(CHANNELS))]
    perinuclear = np.where(owner > 0, 1.35 - 0.75 * radial, 0).astype(np.float32)

    # Textures are only needed in the slab of slices that hold cells.
    zs = np.flatnonzero(cell.any(axis=(1, 2)))
    slab = slice(int(zs[0]), int(zs[-1]) + 1) if len(zs) else slice(0, 0)
    shape = (slab.stop - slab.start, ny, nx)
    sig = np.zeros((len(CHANNELS), nz, ny, nx), dtype=np.float32)
    if not len(zs):
        return sig
    cell_s, nuc_s, cyto_s = cell[slab], nucleus[slab], cyto[slab]

    # DNA: chromatin speckle plus chromocentres; brighter and more condensed with dose.
    chromatin = _smooth_noise(rng, shape, (0.7, 1.2, 1.2))
    condensed = 0.7 + 0.12 * (1 + s2) * np.clip(chromatin, -2.5, 2.5) + 0.5 * (chromatin > 1.9)
    sig[0, slab] = nuc_s * condensed * (1 + 0.5 * s2) * bright[0]

    # ER: reticular network, enriched around the nucleus, dimmer with dose.
    er = _ridges(_smooth_noise(rng, shape, (0.8, 1.6, 1.6)), 0.45)
    sig[1, slab] = cyto_s * (0.3 + er) * perinuclear * (1 - 0.5 * s2) * bright[1] + 0.15 * nuc_s * bright[1]

    # RNA: nucleoli (brighter with dose) and diffuse cytoplasm.
    nucleoli = nuc_s & (_smooth_noise(rng, shape, (0.8, 2.0, 2.0)) > 1.3)
    sig[2, slab] = (0.45 * cyto_s + 0.25 * nuc_s + 1.8 * (1 + 0.6 * s2) * nucleoli) * bright[2]

    # Membrane: pixels next to another cell or the cell's own edge, softened.
    edge = (radial > 0.86) & (owner > 0)
    for axis in (0, 1):
        for step in (1, -1):
            edge |= (owner != np.roll(owner, step, axis=axis)) & (owner > 0)
    membrane = ndi.gaussian_filter(edge.astype(np.float32), 0.8)

    # AGP: plasma membrane plus a Golgi patch beside the nucleus that disperses with dose.
    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float32)
    direction = rng.uniform(0, 2 * np.pi, len(geo.strength))
    reach = 1.15 * geo.nucleus_radius
    g_y = geo.nucleus_centre[:, 1] + reach * np.sin(direction)
    g_x = geo.nucleus_centre[:, 2] + reach * np.cos(direction)
    g_sigma = 3.0 * (1 + 1.2 * geo.strength)
    inside = owner > 0
    golgi = np.zeros((ny, nx), np.float32)
    o = owner[inside] - 1
    golgi[inside] = np.exp(-((yy[inside] - g_y[o]) ** 2 + (xx[inside] - g_x[o]) ** 2) / (2 * g_sigma[o] ** 2))
    golgi *= 1.0 / (1 + 1.2 * s2)  # same total, spread wider
    puncta = _smooth_noise(rng, (ny, nx), 1.0) > 0.3
    sig[3, slab] = cell_s * (0.9 * membrane + 1.6 * golgi * puncta + 0.12) * bright[3]

    # Actin: cortex plus stress fibres along the cell's long axis in the bottom slices.
    ang = _per_voxel(geo.angle, owner)
    wiggle = _smooth_noise(rng, (ny, nx), 3.0)
    phase = 2 * np.pi * (xx * np.sin(ang) - yy * np.cos(ang)) / 6.0 + 0.8 * wiggle
    fibres = _ridges(np.sin(phase), 0.35) * (1 - 0.75 * s2)
    z = np.arange(nz, dtype=np.float32)[slab, None, None]
    basal = np.exp(-((z - geo.bottom - 0.5) ** 2) / 2.0)
    sig[4, slab] = cell_s * (0.8 * membrane + 0.9 * fibres * basal + 0.15) * bright[4]

    # Mito: tubular network that fragments into puncta with dose, perinuclear.
    # Tubes: where the zero sets of two smooth fields meet (curves in 3D); fragments: small blobs.
    tubes = _ridges(_smooth_noise(rng, shape, (0.8, 2.0, 2.0)), 0.5) * _ridges(_smooth_noise(rng, shape, (0.8, 2.0, 2.0)), 0.5)
    dots = (_smooth_noise(rng, shape, (0.6, 0.9, 0.9)) > 1.5).astype(np.float32) * 1.3
    sig[5, slab] = cyto_s * ((1 - s2) * tubes + s2 * dots) * perinuclear * bright[5]

    if granules > 0:  # drawn last, so that granules=0 keeps every earlier draw (and plate) unchanged
        g = int(granule_channel)
        sig[g, slab] += granule_field(rng, shape) * cyto_s * s2 * (10.0 * granules) * bright[g] * (_LEVELS[2] / _LEVELS[g])

    sig *= _LEVELS[:, None, None, None]
    return sig


def granule_field(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    """Sparse bright puncta in [0, 1], float32 ``(z, y, x)``: about 4 % of voxels, blobs 2-4 px across."""
    field = _smooth_noise(rng, shape, (0.8, 1.5, 1.5))
    return np.clip((field - 1.7) / 0.5, 0.0, 1.0).astype(np.float32)


def treatment_grating(shape: tuple[int, int, int], treatment_index: int, n_treatments: int) -> np.ndarray:
    """The confounder pattern of one treatment: a grating in [0, 1], float32 ``(z, y, x)``.

    Its orientation (``pi * index / n``) and period (7 to 11 px) identify the treatment.
    """
    nz, ny, nx = shape
    theta = np.pi * treatment_index / max(n_treatments, 1)
    period = 7.0 + 4.0 * treatment_index / max(n_treatments - 1, 1)
    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float32)
    wave = 0.5 + 0.5 * np.sin(2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / period)
    return np.broadcast_to(wave, (nz, ny, nx))


def apply_optics(
    rng: np.random.Generator, signal: np.ndarray, bottom: float, height: float
) -> tuple[np.ndarray, np.ndarray]:
    """Blur with a z-elongated PSF plus depth-dependent defocus; returns (blurred, illumination).

    The illumination field ``(channel, y, x)`` is returned separately so that it can be
    applied after the confounder (it scales the whole field of view).
    """
    nc, nz, ny, nx = signal.shape
    out = ndi.gaussian_filter(signal, (0, 1.0, 1.0, 1.0), mode="constant", truncate=3.0)
    focus = bottom + 0.5 * height + rng.normal(0, 1.0)  # site-level focus batch effect
    weight = np.clip(np.abs(np.arange(nz) - focus) / (0.5 * nz), 0, 1).astype(np.float32) * 0.8
    # A defocused widefield PSF is close to a disk; a 7 x 7 box is a cheap stand-in.
    defocused = ndi.uniform_filter(out, size=(1, 1, 7, 7), mode="nearest")
    out += weight[None, :, None, None] * (defocused - out)
    out += _MEDIUM_PHOTONS

    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float32)
    yy, xx = yy / ny - 0.5, xx / nx - 0.5
    slope = rng.normal(0, 0.15, 2)
    vignette = rng.uniform(0.15, 0.35)
    base = (1 + slope[0] * yy + slope[1] * xx) * (1 - vignette * (yy**2 + xx**2) * 2)
    per_channel = 1 + rng.normal(0, 0.03, (nc, 1, 1)) * (yy + xx)[None]
    gain = np.exp(rng.normal(0, 0.12, (nc, 1, 1)))  # site-level batch effect per channel
    illumination = (base[None] * per_channel * gain).astype(np.float32)
    return out, illumination


def apply_camera(rng: np.random.Generator, photons: np.ndarray) -> np.ndarray:
    """Poisson-Gaussian camera: shot noise, read noise, offset, uint16 clipping.

    Means below 10 photons draw exact Poisson counts; larger means use the normal
    approximation ``N(lam, lam)`` (same mean and variance, skew below 0.32, and several
    times faster).
    """
    lam = np.maximum(photons, 0, dtype=np.float32)
    low = lam < _EXACT_POISSON_BELOW
    # Shot and read noise of bright voxels in one normal draw: N(lam, lam + read^2).
    counts = rng.standard_normal(lam.shape, dtype=np.float32)
    counts *= np.sqrt(lam + _READ_NOISE**2)
    counts += lam
    n_low = int(low.sum())
    if n_low:
        counts[low] = rng.poisson(lam[low]) + _READ_NOISE * rng.standard_normal(n_low, dtype=np.float32)
    counts += _CAMERA_OFFSET
    return np.clip(np.rint(counts), 0, np.iinfo(np.uint16).max).astype(np.uint16)


def render_site(
    rng: np.random.Generator,
    shape: tuple[int, int, int],
    strength: float,
    treatment_index: int,
    n_treatments: int,
    confounder: float = 0.0,
    cell_radius: float = 28.0,
    noise: bool = True,
    mosaic: bool = False,
    granules: float = 0.0,
    granule_channel: int = 2,
    responder_growth: bool = True,
    bystanders: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """One site: ``(image (6, z, y, x) uint16, labels (z, y, x) int32)``.

    Parameters
    ----------
    rng : numpy.random.Generator
        Source of every random draw (the caller seeds it from seed, well and site).
    shape : (int, int, int)
        ``(z, y, x)``, voxels.
    strength : float
        The well's treatment response in [0, 1].
    treatment_index, n_treatments : int
        Which treatment this well got, out of how many (for the confounder grating).
    confounder : float
        Amplitude of the treatment grating outside cells, in [0, 1]; at 1 its peaks are
        a third of each channel's typical stain level.
    cell_radius : float
        Typical cell radius in y and x, pixels.
    noise : bool
        If False, return the noise-free expected intensity (float32) instead of uint16
        camera counts, for tests.
    mosaic : bool
        Only some cells respond (see :func:`site_geometry`).
    granules : float
        In [0, 1]: granules in responding cells (:func:`site_signal`).
    granule_channel : int
        Channel of the granules (index into CHANNELS; 2 = RNA).
    responder_growth : bool
        Responding cells grow (see :func:`site_geometry`); False: same sizes as the others.
    bystanders : bool
        False: a mosaic site's non-responding cells are left out (see :func:`site_geometry`).
    """
    geo = site_geometry(rng, shape, strength, cell_radius, mosaic=mosaic, responder_growth=responder_growth,
                        bystanders=bystanders)
    signal = site_signal(rng, geo, granules=granules, granule_channel=granule_channel)
    height = float(np.median(geo.height)) if len(geo.height) else 8.0
    blurred, illumination = apply_optics(rng, signal, geo.bottom, height)
    if confounder > 0:
        grating = treatment_grating(shape, treatment_index, n_treatments)
        background = geo.labels == 0
        blurred += (confounder * _LEVELS[:, None, None, None] / 3) * (grating * background)[None]
    photons = blurred * illumination[:, None]
    if not noise:
        return photons + _CAMERA_OFFSET, geo.labels
    return apply_camera(rng, photons), geo.labels
