"""Training data: leave-wells-out splits and crops streamed per site from the plate.

Splits: cells are split by WELL into training and test wells (the paper
trained on column 2 and tested on column 3); a random share of the training cells
(seeded) becomes the validation subset used for early stopping.

Crops are read one site at a time (the site's image and labels chunks, then
:func:`gradcamo_dask.cells.crop_site`), rescaled to [0, 1] per crop and channel and
resampled trilinearly to the model grid (linear, so it commutes exactly with the
per-channel standardisation applied later). The next sites are read by a
background thread while the model trains. Sites can be cached in memory at the
model grid (a few hundred KiB per cell at small grids), which saves re-reading the
plate each epoch; the cache never changes the results.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from gradcamo_dask.cells import crop_site, fit_normalization, rescale_crops
from gradcamo_dask.errors import PlateLayoutError, TrainingError
from gradcamo_dask.io.platemap import split_well
from gradcamo_dask.jobs.recipe import Split

__all__ = ["SiteData", "SiteReader", "assign_split", "check_wells", "combine_normalization"]


def check_wells(plate_wells: Sequence[str], platemap: pd.DataFrame, plate: str = "plate") -> None:
    """Refuse a platemap that does not describe exactly the plate's wells (both ways)."""
    wells, mapped = list(plate_wells), list(platemap["well"])
    not_in_plate = [w for w in mapped if w not in set(wells)]
    not_in_map = [w for w in wells if w not in set(mapped)]
    if not_in_plate or not_in_map:
        parts = []
        if not_in_plate:
            parts.append(f"platemap wells missing from the plate: {not_in_plate}")
        if not_in_map:
            parts.append(f"plate wells missing from the platemap: {not_in_map}")
        raise PlateLayoutError(
            f'plate "{plate}": ' + "; ".join(parts) + ". Give the platemap of this plate, or select the wells you "
            "mean to use on both sides (image.sel(well=[...]) and platemap[platemap.well.isin([...])])"
        )


def _select(wells: Sequence[str], *, names: Sequence[str] | None, columns: Sequence[int] | None,
            rows: Sequence[str] | None) -> list[str]:
    out = []
    for w in wells:
        row, col = split_well(w)
        if (names is not None and w in set(names)) or (columns is not None and col in {int(c) for c in columns}) \
                or (rows is not None and row in {str(r) for r in rows}):
            out.append(w)
    return out


def assign_split(table: pd.DataFrame, platemap: pd.DataFrame, split: Split | None = None, *,
                 seed: int = 0) -> tuple[pd.Series, dict]:
    """Leave-wells-out split: ``"train"``, ``"val"``, ``"test"`` or ``""`` (unused) per cell.

    Test wells are those named in ``split``, or in its columns or rows; training wells
    the same through ``train_*`` (default: every other well). Without any ``test_*``
    option, each treatment's last well in plate order is its test well (the paper's
    "train on one column, test on the next" for replicate layouts; the synthetic
    plates put replicates down the rows, so this holds out row C there).
    ``val_fraction`` of the training cells (at least one) becomes the validation set;
    ``max_train_cells`` keeps a seeded random subset of the remaining training cells.

    Parameters
    ----------
    table : pandas.DataFrame
        Cell table with a ``well`` column.
    platemap : pandas.DataFrame
        ``well, treatment, ...``.
    split : Split, optional
        The split's options (default ``Split()``).
    seed : int
        Seed of the validation subset and of ``max_train_cells``.

    Returns
    -------
    split : pandas.Series of str, aligned with ``table``
    wells : dict ``{"train": [...], "test": [...]}``
    """
    split = Split() if split is None else split
    test_wells, test_columns, test_rows = split.test_wells, split.test_columns, split.test_rows
    train_wells, train_columns, train_rows = split.train_wells, split.train_columns, split.train_rows
    val_fraction, max_train_cells = split.val_fraction, split.max_train_cells
    plate_wells = list(dict.fromkeys(table["well"])) if len(table) else []
    wells = [w for w in platemap["well"] if w in set(plate_wells)] or plate_wells
    if test_wells is None and test_columns is None and test_rows is None:
        last = platemap[platemap["well"].isin(wells)].groupby("treatment", sort=False)["well"].agg(list)
        single = [t for t, ws in last.items() if len(ws) < 2]
        if single:
            raise TrainingError(
                f"treatments {single} have one well only, so the default leave-wells-out split (each treatment's "
                "last well is its test well) cannot hold one out; pass test_wells / test_columns / test_rows"
            )
        test = [ws[-1] for ws in last]
    else:
        test = _select(wells, names=test_wells, columns=test_columns, rows=test_rows)
    if train_wells is None and train_columns is None and train_rows is None:
        train = [w for w in wells if w not in set(test)]
    else:
        train = _select(wells, names=train_wells, columns=train_columns, rows=train_rows)
    both = sorted(set(train) & set(test))
    if both:
        raise TrainingError(f"wells {both} are both training and test wells; leave-wells-out needs disjoint wells")
    unknown = sorted(set(test_wells or []) - set(wells)) + sorted(set(train_wells or []) - set(wells))
    if unknown:
        raise TrainingError(f"wells {unknown} are not on the plate (plate wells: {wells})")
    out = pd.Series("", index=table.index, dtype=object)
    out[table["well"].isin(test)] = "test"
    train_idx = np.flatnonzero(table["well"].isin(train).to_numpy())
    rng = np.random.default_rng([int(seed), 7])
    order = rng.permutation(train_idx)
    n_val = max(1, int(round(val_fraction * len(order)))) if val_fraction > 0 else 0
    val_idx, fit_idx = order[:n_val], order[n_val:]
    if max_train_cells is not None and len(fit_idx) > max_train_cells:
        fit_idx = fit_idx[:int(max_train_cells)]
    out.iloc[np.sort(val_idx)] = "val"
    out.iloc[np.sort(fit_idx)] = "train"
    return out, {"train": train, "test": test}


def combine_normalization(parts: list[tuple[int, dict]]) -> dict[str, list[float]]:
    """Pool per-site :func:`~gradcamo_dask.cells.fit_normalization` results (weights: cells per site)."""
    counts = np.array([n for n, _ in parts], dtype=float)
    means = np.array([p["mean"] for _, p in parts], dtype=float)
    stds = np.array([p["std"] for _, p in parts], dtype=float)
    w = counts / counts.sum()
    mean = (w[:, None] * means).sum(axis=0)
    sq = (w[:, None] * (stds**2 + means**2)).sum(axis=0)
    std = np.sqrt(np.maximum(sq - mean**2, 0.0))
    return {"mean": [float(v) for v in mean], "std": [float(v) if v > 0 else 1.0 for v in std]}


@dataclass
class SiteData:
    """One site's cells, ready for the model.

    ``inputs`` (n, C, z, y, x) float32 in [0, 1] at the model grid (rescaled, not yet
    standardised); ``masks`` (n, Z, Y, X) bool at the crop grid; ``rows`` the cells'
    positions in the training table; ``normalization`` the site's
    :func:`fit_normalization` over its training cells (None without any).
    """

    inputs: torch.Tensor
    masks: torch.Tensor
    rows: np.ndarray
    normalization: dict | None


class SiteReader:
    """Reads sites' crops from the (lazy) plate, with an optional cache and read-ahead.

    Parameters
    ----------
    image, labels : DataArray
        The plate and its labels (Dask-backed; one site is computed at a time).
    table : DataFrame
        Cells to read (with ``well, site, object_number, center_*`` and ``split``).
    crop_size : (z or None, y, x)
        Crop size in voxels.
    input_shape : (z, y, x)
        Model grid in voxels.
    cache : bool
        Keep every site read in memory (at the model grid) for later epochs.
    outside : {"zero", "background"}
        What fills a crop window past the site (:func:`~gradcamo_dask.cells.crop_site`).
    """

    def __init__(self, image: Any, labels: Any, table: pd.DataFrame, crop_size: Sequence[int | None],
                 input_shape: Sequence[int], cache: bool = True, outside: str = "zero") -> None:
        self.image, self.labels, self.table, self.outside = image, labels, table, outside
        self.crop_size = tuple(crop_size)
        self.input_shape = tuple(int(n) for n in input_shape)
        self.cache = cache
        self._cache: dict[tuple[str, int], SiteData] = {}
        self._wells = {str(w): i for i, w in enumerate(image["well"].values)}
        self._sites = {int(s): i for i, s in enumerate(image["site"].values)}
        self.groups: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
        for (w, s), idx in table.groupby(["well", "site"], sort=False).indices.items():
            self.groups[(str(w), int(s))] = np.asarray(idx)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gradcamo-train-read")
        self.intensity_range: dict | None = None  # {"low", "high"}: fixed rescaling (scaling="plate")

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def sites(self, splits: Sequence[str]) -> list[tuple[str, int]]:
        """Sites holding at least one cell of the given splits, in table order."""
        wanted = set(splits)
        split = self.table["split"].to_numpy()
        return [key for key, idx in self.groups.items() if any(split[i] in wanted for i in idx)]

    def read(self, key: tuple[str, int]) -> SiteData:
        """One site's :class:`SiteData` (from the cache when there)."""
        if key in self._cache:
            return self._cache[key]
        w, s = key
        idx = self.groups[key]
        wi, si = self._wells[w], self._sites[s]
        image_site = self.raw_site(key)
        labels_site = np.asarray(self.labels.data[wi, si].compute())
        cells = self.table.iloc[idx]
        crops, masks = crop_site(image_site, labels_site, cells, self.crop_size,
                                 plate=str(self.image.attrs.get("plate", "plate")), well=w, site=s,
                                 outside=self.outside)
        crops = rescale_crops(crops, intensity_range=self.intensity_range)
        is_train = (cells["split"] == "train").to_numpy()
        norm = fit_normalization(crops[is_train], rescaled=True) if is_train.any() else None
        x = torch.from_numpy(np.ascontiguousarray(crops))
        if tuple(x.shape[2:]) != self.input_shape:
            mode = "trilinear" if x.ndim == 5 else "bilinear"  # 2D plates: (n, c, y, x) crops
            x = F.interpolate(x, size=self.input_shape, mode=mode, align_corners=False)
        data = SiteData(x.contiguous(), torch.from_numpy(np.ascontiguousarray(masks)), idx, norm)
        if self.cache:
            self._cache[key] = data
        return data

    def raw_site(self, key: tuple[str, int]) -> np.ndarray:
        """One site's raw image ``(c, z, y, x)``, as stored (read from the plate, not cached)."""
        return np.asarray(self.image.data[self._wells[key[0]], self._sites[key[1]]].compute())

    def stream(self, keys: Sequence[tuple[str, int]]) -> Iterator[tuple[tuple[str, int], SiteData]]:
        """Sites in the given order, the next one read in the background meanwhile."""
        keys = list(keys)
        if not keys:
            return
        pending = self._pool.submit(self.read, keys[0])
        for i, key in enumerate(keys):
            data = pending.result()
            if i + 1 < len(keys):
                pending = self._pool.submit(self.read, keys[i + 1])
            yield key, data
