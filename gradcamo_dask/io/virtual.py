"""A virtual plate of real size: every site synthesised on demand from a seed, nothing written.

A 384-well plate of 9 fields of 6 x 21 x 2160 x 2160 uint16 holds about 4 TB of
pixels. :class:`VirtualPlate` describes such a plate with a few numbers; its
:meth:`~VirtualPlate.image` and :meth:`~VirtualPlate.labels` are lazy DataArrays
(one Dask task per site, as :func:`~gradcamo_dask.io.plate.open_plate` makes) whose
tasks render their site when computed. A site is a pure function of
``(seed, well index, site index)`` and the plate's parameters, so any worker can
make any site and two renders agree voxel for voxel.

Cells are ellipsoids with integer semi-axes, centred on integer voxels of a jittered
square lattice, all strictly inside the site (none touches the border). Their
geometry is known without rendering: :meth:`~VirtualPlate.cell_table` returns the
table that :func:`~gradcamo_dask.cell_table` computes from the labels, without a
pass over any voxel, so that a whole plate can be planned in seconds. The image is
cheap texture (cells brighter than the background, uniform noise): it is for
measuring time and memory, not biology; :mod:`gradcamo_dask.io.synthetic` makes
realistic sites.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr
from dask.base import tokenize

from gradcamo_dask.errors import InputError
from gradcamo_dask.io.layout import lazy_sites, plate_dataarray
from gradcamo_dask.io.platemap import well_name

__all__ = ["VirtualPlate", "plate_wells"]

#: Channel names (Cell Painting) and each channel's cell and background level (ADU).
CHANNELS = ("DNA", "ER", "RNA", "AGP", "Actin", "Mito")
_CELL_LEVEL = np.array([1400, 550, 450, 500, 650, 750], dtype=np.uint16)
_BACKGROUND = 100
_NOISE = 64  # uniform noise in [0, _NOISE) ADU (a power of two)
_RADIUS_YX = (18, 28)  # semi-axes in y and x, voxels (inclusive range)
_RADIUS_Z = (3, 8)  # semi-axis in z, voxels (inclusive range, capped by the stack depth)


def plate_wells(n_wells: int) -> list[str]:
    """The first ``n_wells`` wells of a 384-well plate in reading order (A01, A02, ... P24)."""
    if not 1 <= n_wells <= 384:
        raise InputError(f"a 384-well plate holds 1-384 wells, got {n_wells}")
    return [well_name(chr(ord("A") + i // 24), 1 + i % 24) for i in range(n_wells)]


@functools.lru_cache(maxsize=512)
def _ellipsoid(rz: int, ry: int, rx: int) -> np.ndarray:
    """Boolean ellipsoid ``(2rz+1, 2ry+1, 2rx+1)`` with integer semi-axes (voxels)."""
    z, y, x = np.ogrid[-rz:rz + 1, -ry:ry + 1, -rx:rx + 1]
    return (z / rz) ** 2 + (y / ry) ** 2 + (x / rx) ** 2 <= 1.0


@dataclass(frozen=True)
class VirtualPlate:
    """A plate whose sites are rendered on demand (see the module docstring).

    Parameters
    ----------
    n_wells : int
        Wells, in 384-well reading order (default 384).
    n_sites : int
        Fields per well (default 9).
    shape_zyx : (int, int, int)
        Site grid, voxels (default 21 x 2160 x 2160).
    cells_per_site : int
        Target cells per 2160 x 2160 field; smaller sites keep the same density
        (default 1,000).
    seed : int
        Everything random derives from it.
    plate : str
        Plate name.
    treatments : sequence of str
        Assigned to wells column by column, in turn (default control and one compound).
    """

    n_wells: int = 384
    n_sites: int = 9
    shape_zyx: tuple[int, int, int] = (21, 2160, 2160)
    cells_per_site: int = 1000
    seed: int = 0
    plate: str = "virtual"
    treatments: tuple[str, ...] = ("control", "compound_10uM")

    def __post_init__(self) -> None:
        z, y, x = (int(n) for n in self.shape_zyx)
        if z < 3 or min(y, x) < 2 * _RADIUS_YX[1] + 8:
            raise InputError(f"virtual sites need at least 3 z-slices and {2 * _RADIUS_YX[1] + 8} pixels in y and x, "
                             f"got {self.shape_zyx}")
        if self.n_sites < 1 or self.cells_per_site < 1:
            raise InputError("n_sites and cells_per_site must be >= 1")
        plate_wells(self.n_wells)

    # ------------------------------------------------------------ description

    @property
    def wells(self) -> list[str]:
        """Well names in plate order."""
        return plate_wells(self.n_wells)

    @property
    def site_bytes(self) -> dict[str, int]:
        """Raw bytes of one site: ``image`` (uint16, all channels), ``labels`` (int32)."""
        voxels = int(np.prod(self.shape_zyx))
        return {"image": voxels * len(CHANNELS) * 2, "labels": voxels * 4}

    def platemap(self) -> pd.DataFrame:
        """``well, treatment, dose, is_control``: treatments alternate by column."""
        names = list(self.treatments)
        rows = []
        for well in self.wells:
            treatment = names[(int(well[1:]) - 1) % len(names)]
            control = treatment == "control"
            rows.append({"well": well, "treatment": treatment, "dose": 0.0 if control else 10.0,
                         "is_control": control})
        return pd.DataFrame(rows)

    # ------------------------------------------------------------ geometry

    def _lattice(self) -> tuple[np.ndarray, np.ndarray]:
        """Lattice node coordinates along y and x (same for every site)."""
        _, height, width = self.shape_zyx
        spacing = np.sqrt(2160.0 * 2160.0 / self.cells_per_site)
        ny, nx = max(1, int(round(height / spacing))), max(1, int(round(width / spacing)))
        return (np.arange(ny) + 0.5) * height / ny, (np.arange(nx) + 0.5) * width / nx

    def _site_geometry(self, well: int, site: int) -> dict[str, np.ndarray]:
        """Cells of one site as int32 arrays ``cz, cy, cx, rz, ry, rx`` (centre and semi-axes, voxels)."""
        z_size, height, width = self.shape_zyx
        ys, xs = self._lattice()
        rng = np.random.default_rng([self.seed, well, site, 0])
        gy, gx = (a.ravel() for a in np.meshgrid(ys, xs, indexing="ij"))
        n = gy.size
        step = min(height / len(ys), width / len(xs))
        r_max = int(min(_RADIUS_YX[1], max(_RADIUS_YX[0], step / 2 - 4)))
        ry = rng.integers(min(_RADIUS_YX[0], r_max), r_max + 1, n)
        rx = rng.integers(min(_RADIUS_YX[0], r_max), r_max + 1, n)
        rz_max = max(1, min(_RADIUS_Z[1], (z_size - 1) // 2))
        rz = rng.integers(min(_RADIUS_Z[0], rz_max), rz_max + 1, n)
        jitter = max(0, int(step / 2 - r_max - 1))
        cy = np.round(gy).astype(np.int64) + rng.integers(-jitter, jitter + 1, n)
        cx = np.round(gx).astype(np.int64) + rng.integers(-jitter, jitter + 1, n)
        cz = rng.integers(rz, z_size - rz, n)
        inside = (cy - ry >= 1) & (cy + ry <= height - 2) & (cx - rx >= 1) & (cx + rx <= width - 2)
        return {k: v[inside].astype(np.int32) for k, v in
                {"cz": cz, "cy": cy, "cx": cx, "rz": rz, "ry": ry, "rx": rx}.items()}

    def site_cells(self, well: int, site: int) -> pd.DataFrame:
        """Cells of one site: ``object_number``, centre and semi-axes (voxels), from the seed alone."""
        geometry = self._site_geometry(well, site)
        frame = pd.DataFrame({k: v.astype(np.int64) for k, v in geometry.items()})
        frame.insert(0, "object_number", np.arange(1, len(frame) + 1, dtype=np.int64))
        return frame

    # ------------------------------------------------------------ voxels

    def site_labels(self, well: int, site: int) -> np.ndarray:
        """Labels of one site, ``(z, y, x)`` int32, 0 = background."""
        labels = np.zeros(self.shape_zyx, dtype=np.int32)
        for cell in self.site_cells(well, site).itertuples(index=False):
            mask = _ellipsoid(int(cell.rz), int(cell.ry), int(cell.rx))
            box = (slice(cell.cz - cell.rz, cell.cz + cell.rz + 1), slice(cell.cy - cell.ry, cell.cy + cell.ry + 1),
                   slice(cell.cx - cell.rx, cell.cx + cell.rx + 1))
            labels[box][mask] = cell.object_number
        return labels

    def site_image(self, well: int, site: int) -> np.ndarray:
        """Image of one site, ``(c, z, y, x)`` uint16: noise plus a per-channel level inside cells.

        One draw of noise per site, decorrelated per channel by a bit pattern (cheap:
        about a second per 1.2 GB site on one core).
        """
        inside = (self.site_labels(well, site) > 0).view(np.uint8)
        rng = np.random.default_rng([self.seed, well, site, 1])
        noise = np.frombuffer(rng.bytes(inside.size), dtype=np.uint8).reshape(self.shape_zyx) & (_NOISE - 1)
        image = np.empty((len(CHANNELS), *self.shape_zyx), dtype=np.uint16)
        level = np.empty(self.shape_zyx, dtype=np.uint16)
        for c in range(len(CHANNELS)):
            np.bitwise_xor(noise, (17 * c) & (_NOISE - 1), out=image[c], casting="unsafe")
            image[c] += _BACKGROUND
            np.multiply(inside, _CELL_LEVEL[c], out=level, casting="unsafe")
            image[c] += level
        return image

    # ------------------------------------------------------------ lazy plate

    def image(self) -> xr.DataArray:
        """The plate ``(well, site, c, z, y, x)`` uint16, lazy: one task per site renders it."""
        return self._lazy("image")

    def labels(self) -> xr.DataArray:
        """The labels ``(well, site, z, y, x)`` int32, lazy: one task per site renders them."""
        return self._lazy("labels")

    def _lazy(self, what: str) -> xr.DataArray:
        sources = {(w, s): (self, what, w, s) for w in range(self.n_wells) for s in range(self.n_sites)}
        shape = (len(CHANNELS), *self.shape_zyx) if what == "image" else tuple(self.shape_zyx)
        name = f"virtual-{what}-{tokenize(repr(self), what)}"
        data = lazy_sites(_render, sources, self.n_wells, self.n_sites, shape,
                          np.uint16 if what == "image" else np.int32, name)
        array = plate_dataarray(data, wells=self.wells, channels=CHANNELS if what == "image" else None,
                                plate=self.plate, spacing_zyx_um=(1.0, 0.325, 0.325),
                                attrs={"source": f"virtual://{self.plate}?seed={self.seed}"})
        pm = self.platemap().set_index("well")
        return array.assign_coords({k: ("well", pm[k].to_numpy()) for k in ("treatment", "dose", "is_control")})

    # ------------------------------------------------------------ cell table

    def cell_table(self, size: Sequence[int | None] = (None, 128, 128)) -> pd.DataFrame:
        """The plate's cell table from the geometry alone, equal to ``cell_table(self.labels(), size=size)``.

        Built column by column from per-site int32 geometry, with text columns taken from
        the few distinct names by code (no Python object per cell): a 384 x 9 plate's
        3.5 M rows cost about the table's own size in client memory (bench_scale).

        Parameters
        ----------
        size : (int or None, int or None, int or None)
            Crop size ``(z, y, x)``, voxels, used for the ``crop_padded`` flag.
        """
        from gradcamo_dask.crop_geometry import crop_windows

        geometry, padded = [], []
        for w in range(self.n_wells):
            for s in range(self.n_sites):
                cells = self._site_geometry(w, s)
                start, stop = crop_windows(np.stack([cells["cz"], cells["cy"], cells["cx"]], axis=1), size,
                                           self.shape_zyx)
                padded.append(((start < 0) | (stop > np.asarray(self.shape_zyx))).any(axis=1))
                geometry.append(cells)
        counts = np.asarray([len(p) for p in padded], dtype=np.int64)
        columns = {"plate": _text_column([self.plate], np.zeros(int(counts.sum()), np.int32)),
                   "well": _text_column(self.wells, np.repeat(np.arange(self.n_wells), counts.reshape(
                       self.n_wells, self.n_sites).sum(axis=1))),
                   "site": np.repeat(np.tile(np.arange(self.n_sites, dtype=np.int64), self.n_wells), counts),
                   "object_number": np.concatenate([np.arange(1, n + 1, dtype=np.int64) for n in counts])}
        columns.update(_geometry_columns(geometry))
        del geometry
        columns["touches_border"] = np.zeros(int(counts.sum()), bool)
        columns["crop_padded"] = np.concatenate(padded)
        platemap = self.platemap()  # one row per well, in plate order: the cells' well codes index it
        wells = np.repeat(np.arange(self.n_wells), counts.reshape(self.n_wells, self.n_sites).sum(axis=1))
        for column in platemap.columns.drop("well"):
            values = platemap[column]
            columns[column] = _text_column([str(v) for v in values], wells) if values.dtype == object or \
                pd.api.types.is_string_dtype(values) else values.to_numpy()[wells]
        # copy=False: each column its own block, no stacked copy of the whole table (client memory)
        return pd.DataFrame(columns, copy=False)


def _geometry_columns(geometry: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """``center_*``, ``bbox_*`` and ``volume_voxels`` of the cells of every site, in table column order."""
    out: dict[str, np.ndarray] = {}
    radius = {}
    for axis in "zyx":
        center = np.concatenate([g[f"c{axis}"] for g in geometry]).astype(np.int64)
        radius[axis] = np.concatenate([g[f"r{axis}"] for g in geometry])
        out[f"center_{axis}"] = center.astype(float)
        out[f"bbox_{axis}0"], out[f"bbox_{axis}1"] = center - radius[axis], center + radius[axis] + 1
    order = ["center_z", "center_y", "center_x", "bbox_z0", "bbox_z1", "bbox_y0", "bbox_y1", "bbox_x0", "bbox_x1"]
    out = {k: out[k] for k in order}
    codes = (radius["z"] * 1000 + radius["y"]) * 1000 + radius["x"]  # one int per (rz, ry, rx); radii < 1000
    kinds, which = np.unique(codes, return_inverse=True)
    out["volume_voxels"] = np.asarray([int(_ellipsoid(k // 10**6, k // 1000 % 1000, k % 1000).sum()) for k in kinds],
                                      np.int64)[which.reshape(-1)]
    return out


def _text_column(names: Sequence[str], codes: np.ndarray) -> Any:
    """``names[codes]`` as the text column pandas makes by default, without a Python str per row.

    Arrow-backed text (pandas >= 3) is one ``take`` of the few names; object text
    (pandas 2) holds references to the same few ``str``.
    """
    import pyarrow as pa

    dtype = pd.Series(["x"]).dtype
    if getattr(dtype, "storage", None) == "pyarrow":
        return pd.array(pa.array(list(names), pa.string()).take(pa.array(np.asarray(codes))), dtype=dtype)
    return pd.array(np.asarray(list(names), dtype=object)[codes], dtype=dtype)


def _render(plate: VirtualPlate, what: str, well: int, site: int) -> np.ndarray:
    """One site as a Dask block: ``(1, 1, c, z, y, x)`` image or ``(1, 1, z, y, x)`` labels."""
    data = plate.site_image(well, site) if what == "image" else plate.site_labels(well, site)
    return data[None, None]
