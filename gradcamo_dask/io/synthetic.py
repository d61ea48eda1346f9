"""Synthetic 3D Cell Painting plates with ground truth and a confounder knob.

:func:`synthetic_plate` returns a lazy plate (image, ground-truth labels, platemap)
whose every site is one Dask task, rendered on demand by
:func:`gradcamo_dask.io.synthetic_site.render_site` from a generator seeded with
``[seed, well_index, site]``: a plate of any size costs no memory until computed, a
site is the same whether computed alone or with the whole plate, and a plate is the
same on every machine.

Default layout, like the paper's: one compound at six doses (control included) x 2
wells x 4 sites; treatment names are the class names. Wells of one dose share a
column; replicate wells go down the rows (B, C, ...), so "leave wells out" means
"leave a row out". Each well's response is a Hill curve of its dose (EC50 1 µM, Hill
slope 1), and each cell draws its own response around it.

Mosaic plates (``mosaic=True``) say where the treatment information is: only a
maximal independent set of cells responds, so a *responder* carries the treatment in
its own cell only and a *bystander* (every other cell) only through its responding
neighbours. :func:`cell_truth` lists each cell's role and :func:`population_labels`
keeps one population's labels, to train or audit a model on it. ``bystanders=False``
draws the same mosaic without its bystanders: each responder alone, its crop holding
no other cell (the clean plate).

Voxel size: 0.65 µm in y and x, 1.1115 µm in z (anisotropy 1.71, as in the paper).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, NamedTuple

import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr
from dask.base import tokenize

from gradcamo_dask.errors import InputError
from gradcamo_dask.io.layout import plate_dataarray
from gradcamo_dask.io.platemap import attach_platemap, well_name
from gradcamo_dask.io.synthetic_site import CHANNELS, render_site, site_geometry

DEFAULT_DOSES_UM: tuple[float, ...] = (0.0, 0.1, 0.3, 1.0, 3.0, 10.0)
RENDER_Z_2D = 8  # slices a 2D site is rendered at before its focal plane is kept
SPACING_ZYX_UM: tuple[float, float, float] = (1.1115, 0.65, 0.65)  # z / xy = 1.71
CONTROL = "control"


class SyntheticPlate(NamedTuple):
    """A synthetic plate: lazy image and labels DataArrays and the platemap."""

    image: xr.DataArray
    labels: xr.DataArray
    platemap: pd.DataFrame


#: Granule channel of each compound (``compounds`` knob): A in RNA, B in AGP (Golgi/membrane), C in Mito.
GRANULE_CHANNELS: tuple[str, ...] = ("RNA", "AGP", "Mito")


def compound_name(index: int, compounds: int = 1) -> str:
    """Name of compound ``index`` of ``compounds``: ``"compound"`` alone, else ``"compoundA"``, ``"compoundB"``..."""
    return "compound" if compounds == 1 else f"compound{chr(ord('A') + index)}"


def treatment_name(dose_um: float, compound: str = "compound") -> str:
    """Class name of a dose: ``"control"`` for 0, else e.g. ``"compound_0.3uM"``."""
    return CONTROL if dose_um == 0 else f"{compound}_{dose_um:g}uM"


def dose_response(dose_um: float | np.ndarray, ec50_um: float = 1.0, hill: float = 1.0) -> np.ndarray:
    """Hill curve ``d^h / (d^h + EC50^h)`` in [0, 1]; 0 at dose 0."""
    d = np.asarray(dose_um, dtype=float)
    return d**hill / (d**hill + ec50_um**hill)


def synthetic_platemap(
    doses_um: Sequence[float] = DEFAULT_DOSES_UM,
    wells_per_treatment: int = 2,
    ec50_um: float = 1.0,
    compounds: int = 1,
) -> pd.DataFrame:
    """Platemap of the synthetic layout: one column per dose (and compound), one row per replicate.

    ``compounds`` > 1 gives every non-zero dose one column per compound (the control
    column is shared) and adds a ``compound`` column (``""`` for the control).

    Returns
    -------
    pandas.DataFrame
        ``well, treatment, dose, is_control`` plus ``response`` (the well's mean
        response in [0, 1]) and ``replicate`` (0-based), in plate order.
    """
    doses = [float(d) for d in doses_um]
    if len(set(doses)) != len(doses) or any(d < 0 for d in doses):
        raise InputError(f"doses must be distinct and >= 0 (µM), got {doses}")
    if not 1 <= compounds <= len(GRANULE_CHANNELS):
        raise InputError(f"compounds must be 1-{len(GRANULE_CHANNELS)}, got {compounds}")
    columns = [(dose, k) for dose in sorted(doses) for k in (range(1) if dose == 0 else range(compounds))]
    if not 1 <= wells_per_treatment <= 14 or not 1 <= len(columns) <= 22:
        raise InputError("the synthetic layout fits 1-14 wells per treatment and 1-22 treatments on a 384-well plate")
    rows = []
    for rep in range(wells_per_treatment):
        for i, (dose, k) in enumerate(columns):
            name = compound_name(k, compounds)
            row = {"well": well_name(chr(ord("B") + rep), 2 + i), "treatment": treatment_name(dose, name),
                   "dose": dose, "is_control": dose == 0, "response": float(dose_response(dose, ec50_um)),
                   "replicate": rep}
            if compounds > 1:
                row["compound"] = "" if dose == 0 else name
            rows.append(row)
    return pd.DataFrame(rows)


def _render_block(
    what: str,
    seed: int,
    responses: tuple[float, ...],
    treatment_index: tuple[int, ...],
    n_treatments: int,
    site_shape: tuple[int, int, int],
    confounder: float,
    cell_radius: float,
    mosaic: bool = False,
    granules: float = 0.0,
    granule_channel: tuple[int, ...] | None = None,
    spatial_dims: int = 3,
    responder_growth: bool = True,
    bystanders: bool = True,
    block_id: tuple[int, ...] | None = None,
) -> np.ndarray:
    """One site as a Dask block: ``(1, 1, 6, z, y, x)`` image or ``(1, 1, z, y, x)`` labels (z = 1 in 2D)."""
    well, site = block_id[0], block_id[1]
    rng = np.random.default_rng([seed, well, site])
    if what == "labels":  # geometry is the first thing render_site draws: same labels, a tenth of the work
        labels = site_geometry(rng, site_shape, responses[well], cell_radius, mosaic=mosaic,
                               responder_growth=responder_growth, bystanders=bystanders).labels
        return (labels[focal_plane(labels)][None] if spatial_dims == 2 else labels)[None, None]
    channel = {} if granule_channel is None else {"granule_channel": granule_channel[well]}
    image, labels = render_site(rng, site_shape, responses[well], treatment_index[well], n_treatments,
                                confounder=confounder, cell_radius=cell_radius, mosaic=mosaic, granules=granules,
                                responder_growth=responder_growth, bystanders=bystanders, **channel)
    return (image[:, focal_plane(labels)][:, None] if spatial_dims == 2 else image)[None, None]


def focal_plane(labels: np.ndarray) -> int:
    """The z index of a rendered site's 2D plane: the slice with the most cell voxels.

    Cells are domes on the coverslip, every dome at least 2 slices high, so the slice just
    above the coverslip holds every cell's whole footprint (the plane a widefield 2D screen
    focuses on). A maximum projection would not do: the confounder grating fills every
    voxel outside the cells, above the domes too, so a projection would carry it into the
    cells' footprints; in this plane it stays strictly outside every cell, as in 3D.
    """
    return int(np.argmax((labels > 0).sum(axis=(1, 2))))


def _checked_knobs(confounder: float, granules: float, site_shape: Sequence[int], sites_per_well: int,
                   spatial_dims: int = 3, mosaic: bool = False, bystanders: bool = True) -> tuple:
    """The site shape ``(z, y, x)`` as ints, after checking the plate's knobs; InputError names a bad one.

    A 2D plate's ``(y, x)`` becomes ``(RENDER_Z_2D, y, x)``: rendered in 3D, then one plane kept."""
    if spatial_dims not in (2, 3):
        raise InputError(f"spatial_dims must be 2 (one z plane) or 3 (a z-stack), got {spatial_dims}")
    if spatial_dims == 2:
        site_shape = (256, 256) if tuple(site_shape) == (21, 256, 256) else site_shape  # the 3D default, as (y, x)
        if len(site_shape) != 2:
            raise InputError(f"a 2D plate's site_shape is (y, x), got {tuple(site_shape)}")
        site_shape = (RENDER_Z_2D, *site_shape)
    if not 0.0 <= float(confounder) <= 1.0:
        raise InputError(f"confounder must be in [0, 1], got {confounder}")
    if not 0.0 <= float(granules) <= 1.0:
        raise InputError(f"granules must be in [0, 1], got {granules}")
    site_shape = tuple(int(n) for n in site_shape)
    if len(site_shape) != 3 or site_shape[0] < 3 or min(site_shape[1:]) < 32:
        raise InputError(f"site_shape must be (z, y, x) with z >= 3 and y, x >= 32 voxels, got {site_shape}")
    if sites_per_well < 1:
        raise InputError(f"sites_per_well must be >= 1, got {sites_per_well}")
    if not bystanders and not mosaic:
        raise InputError("bystanders=False leaves out a mosaic plate's non-responding cells: it needs mosaic=True")
    return site_shape


def _lazy_sites(common: dict, n_wells: int, sites_per_well: int, token: str) -> tuple[da.Array, da.Array]:
    """``(image (well, site, c, z, y, x) uint16, labels (well, site, z, y, x) int32)``: one task per site."""
    well_site = ((1,) * n_wells, (1,) * sites_per_well)
    z, y, x = common["site_shape"]
    z = 1 if common.get("spatial_dims", 3) == 2 else z
    image = da.map_blocks(
        _render_block, "image", **common, chunks=(*well_site, (len(CHANNELS),), (z,), (y,), (x,)),
        dtype=np.uint16, meta=np.empty((0,) * 6, np.uint16), name=f"synthetic-image-{token}",
    )
    labels = da.map_blocks(
        _render_block, "labels", **common, chunks=(*well_site, (z,), (y,), (x,)),
        dtype=np.int32, meta=np.empty((0,) * 5, np.int32), name=f"synthetic-labels-{token}",
    )
    return image, labels


def _site_settings(platemap: pd.DataFrame, *, seed: int, site_shape: tuple, confounder: float, cell_radius: float,
                   mosaic: bool, granules: float, spatial_dims: int = 3, responder_growth: bool = True,
                   bystanders: bool = True) -> dict:
    """What every site task needs: seed, each well's response and treatment index, the knobs."""
    treatments = sorted(set(platemap["treatment"]),
                        key=lambda t: (platemap.loc[platemap.treatment == t, "dose"].iloc[0], t))  # ties: by name
    common = dict(
        seed=int(seed), responses=tuple(platemap["response"]),
        treatment_index=tuple(treatments.index(t) for t in platemap["treatment"]), n_treatments=len(treatments),
        site_shape=site_shape, confounder=float(confounder), cell_radius=float(cell_radius),
    )
    if mosaic:  # today's plates keep today's recipe (and Dask names)
        common["mosaic"] = True
    if granules > 0:
        common["granules"] = float(granules)
    if "compound" in platemap:  # several compounds: each shows its granules in its own channel
        common["granule_channel"] = tuple(
            CHANNELS.index(GRANULE_CHANNELS[ord(c[-1]) - ord("A")]) if c else CHANNELS.index(GRANULE_CHANNELS[0])
            for c in platemap["compound"])
    if spatial_dims == 2:  # 3D plates keep their recipe (and Dask names)
        common["spatial_dims"] = 2
    if not responder_growth:  # growing responders keep today's recipe (and Dask names)
        common["responder_growth"] = False
    if not bystanders:  # full mosaic sites keep today's recipe (and Dask names)
        common["bystanders"] = False
    return common


def synthetic_plate(
    *,
    doses_um: Sequence[float] = DEFAULT_DOSES_UM,
    wells_per_treatment: int = 2,
    sites_per_well: int = 4,
    site_shape: Sequence[int] = (21, 256, 256),
    cell_radius: float = 28.0,
    seed: int = 0,
    confounder: float = 0.0,
    ec50_um: float = 1.0,
    mosaic: bool = False,
    granules: float = 0.0,
    compounds: int = 1,
    plate: str = "synthetic",
    spatial_dims: int = 3,
    responder_growth: bool = True,
    bystanders: bool = True,
) -> SyntheticPlate:
    """A lazy synthetic 3D (or 2D) Cell Painting plate with ground-truth labels.

    Parameters
    ----------
    doses_um : sequence of float
        Doses of the one compound, µM; 0 is the control. Each dose is a treatment
        (class) named by :func:`treatment_name`.
    wells_per_treatment, sites_per_well : int
        Replicate wells per dose (rows B, C, ...); fields per well.
    site_shape : (int, int, int) or (int, int)
        ``(z, y, x)`` voxels (``(y, x)`` with ``spatial_dims=2``); the default
        (21, 256, 256) holds about 35 cells, about 16 not touching the border.
    cell_radius : float
        Typical radius of a control cell in y and x, pixels (28 px = 18 µm).
    seed : int
        Site ``(w, s)`` is rendered from ``numpy.random.default_rng([seed, w, s])``.
    confounder : float
        In [0, 1]: strength of a treatment-specific grating planted outside the cells
        (label 0), i.e. label information a model can use to cheat. 0 = none.
    ec50_um : float
        Dose of half-maximal response, µM.
    mosaic : bool
        Only a maximal independent set of cells (about a quarter) responds, the same
        cells in every well, at a density independent of dose: responders carry the
        treatment only in their own cell, bystanders only through their neighbours
        (:func:`cell_truth`). False (default): about 88 % of cells respond.
    granules : float
        In [0, 1]: responding cells show bright granules (puncta 2-4 px, at 1 about 10x
        the RNA stain's level), a strong local phenotype; 0 leaves plates as before.
    compounds : int
        1-3 compounds at every non-zero dose (control shared), whose granules show in
        RNA, AGP and Mito (:data:`GRANULE_CHANNELS`): with two, both classes of a
        ``doses_um=(10,)`` plate have local evidence (a control prediction has none).
    plate : str
        Plate name.
    spatial_dims : 2 or 3
        2: a 2D plate (``z`` of length 1): each site rendered in 3D at ``RENDER_Z_2D``
        slices, every knob as above, then its :func:`focal_plane` kept (image and labels).
    responder_growth : bool
        False: responding cells keep the others' size (size cannot tell a responder).
    bystanders : bool
        False (needs ``mosaic``): the non-responding cells are not drawn, so each responder
        stands alone with its geometry in the full mosaic plate (the clean plate).

    Returns
    -------
    SyntheticPlate
        ``image`` (well, site, c, z, y, x) uint16 with the platemap as coords,
        ``labels`` (well, site, z, y, x) int32, ``platemap``; all lazy, one task per site.
    """
    site_shape = _checked_knobs(confounder, granules, site_shape, sites_per_well, spatial_dims, mosaic, bystanders)
    platemap = synthetic_platemap(doses_um, wells_per_treatment, ec50_um, compounds)
    common = _site_settings(platemap, seed=seed, site_shape=site_shape, confounder=confounder,
                            cell_radius=cell_radius, mosaic=mosaic, granules=granules, spatial_dims=spatial_dims,
                            responder_growth=responder_growth, bystanders=bystanders)
    recipe = _recipe_json(common, doses_um=[float(d) for d in doses_um], wells_per_treatment=wells_per_treatment,
                          **({"compounds": compounds} if compounds > 1 else {}), sites_per_well=sites_per_well,
                          ec50_um=ec50_um)
    image, labels = _lazy_sites(common, len(platemap), sites_per_well, tokenize(recipe))
    where = dict(wells=list(platemap["well"]), plate=plate, spacing_zyx_um=SPACING_ZYX_UM, attrs={"synthetic": recipe})
    return SyntheticPlate(attach_platemap(plate_dataarray(image, channels=list(CHANNELS), **where), platemap),
                          plate_dataarray(labels, channels=None, **where), platemap)


def _recipe_json(common: dict, **plate: Any) -> str:
    """The recipe stored in ``attrs["synthetic"]`` (what :func:`cell_truth` redraws a site from): the site
    settings but the per-well lists, then the plate's own knobs, in this order (its token names the Dask tasks)."""
    return json.dumps({**{k: v for k, v in common.items() if k not in ("responses", "treatment_index")}, **plate,
                       "generator": "gradcamo_dask.io.synthetic"})


def _recipe(data: xr.DataArray) -> dict:
    recipe = data.attrs.get("synthetic")
    if recipe is None:
        raise InputError(f"plate {data.attrs.get('plate', '?')!r} carries no synthetic recipe (attrs['synthetic']); "
                         "cell_truth needs a plate made by synthetic_plate")
    return json.loads(recipe) if isinstance(recipe, str) else dict(recipe)


def _site_truth(recipe: dict, response: float, well_index: int, site_index: int) -> pd.DataFrame:
    """Role of every cell of one site, from the same draws as its labels."""
    rng = np.random.default_rng([recipe["seed"], well_index, site_index])
    geo = site_geometry(rng, tuple(recipe["site_shape"]), response, recipe["cell_radius"],
                        mosaic=bool(recipe.get("mosaic", False)),
                        responder_growth=bool(recipe.get("responder_growth", True)))
    responder = np.asarray(geo.responder, dtype=bool)
    table = pd.DataFrame({
        "object_number": np.arange(1, len(responder) + 1, dtype=np.int32),
        "responder": responder, "strength": geo.strength.astype(np.float64),
        "responding_neighbours": (geo.neighbours & responder[None, :]).sum(axis=1).astype(np.int32),
        "neighbours": geo.neighbours.sum(axis=1).astype(np.int32),
    })
    # a plate drawn without bystanders holds only its responders (the counts stay the full site's geometry)
    return table if recipe.get("bystanders", True) else table[table["responder"]].reset_index(drop=True)


def cell_truth(plate: SyntheticPlate) -> pd.DataFrame:
    """Ground truth of every cell of a synthetic plate: who responds, and who touches whom.

    Recomputes each site's geometry (about a tenth of rendering it) from the recipe
    stored in ``plate.image.attrs["synthetic"]``.

    Returns
    -------
    pandas.DataFrame
        ``well, site, object_number`` (the label id) and ``responder`` (the cell
        responds in a treated well; in control wells, would respond), ``strength``
        (its response in [0, 1]), ``responding_neighbours`` and ``neighbours``
        (counts of cells whose footprints touch it), ``treatment``.
    """
    import dask

    recipe = _recipe(plate.image)
    pm = plate.platemap.set_index("well")
    wells = [str(w) for w in plate.image["well"].values]
    sites = [int(s) for s in plate.image["site"].values]
    index = {w: i for i, w in enumerate(pm.index)}
    parts = [dask.delayed(_site_truth)(recipe, float(pm.loc[w, "response"]), index[w], si)
             for w in wells for si in range(len(sites))]
    frames = dask.compute(*parts)
    out = []
    for k, frame in enumerate(frames):
        w, si = wells[k // len(sites)], k % len(sites)
        out.append(frame.assign(well=w, site=sites[si], treatment=str(pm.loc[w, "treatment"])))
    table = pd.concat(out, ignore_index=True)
    return table[["well", "site", "object_number", "treatment", "responder", "strength", "responding_neighbours",
                  "neighbours"]]


def _keep_block(block: np.ndarray, keep: np.ndarray, block_info: dict | None = None) -> np.ndarray:
    (w0, _w1), (s0, _s1) = block_info[0]["array-location"][:2]
    out = block.copy()
    for i in range(block.shape[0]):
        for j in range(block.shape[1]):
            lut = keep[w0 + i, s0 + j]
            ids = np.clip(block[i, j], 0, len(lut) - 1)
            out[i, j] = np.where(lut[ids] & (block[i, j] < len(lut)), block[i, j], 0)
    return out


def population_labels(labels: xr.DataArray, truth: pd.DataFrame, responder: bool) -> xr.DataArray:
    """Labels of one population only (lazy): the other cells become background (0).

    The image is untouched, so a crop still shows every neighbour; only which cells
    are cells of interest changes. Use it to train or audit on responders
    (``responder=True``, information inside the cell) or on bystanders
    (``responder=False``, information only in neighbours) of a mosaic plate.

    Parameters
    ----------
    labels : DataArray (well, site, z, y, x)
        The plate's labels (synthetic, from memory or from disk).
    truth : DataFrame
        :func:`cell_truth` of the same plate.
    responder : bool
        Which population to keep.
    """
    wells = [str(w) for w in labels["well"].values]
    sites = [int(s) for s in labels["site"].values]
    chosen = truth[truth["responder"] == bool(responder)]
    top = int(truth["object_number"].max()) + 1 if len(truth) else 1
    keep = np.zeros((len(wells), len(sites), top), dtype=bool)
    w_index, s_index = {w: i for i, w in enumerate(wells)}, {s: i for i, s in enumerate(sites)}
    for (w, s), group in chosen.groupby(["well", "site"]):
        if str(w) in w_index and int(s) in s_index:
            keep[w_index[str(w)], s_index[int(s)], group["object_number"].to_numpy()] = True
    data = da.map_blocks(_keep_block, labels.data, keep=keep, dtype=labels.dtype, meta=np.empty((0,) * 5, labels.dtype))
    out = labels.copy(data=data)
    out.attrs["population"] = "responders" if responder else "bystanders"
    return out
