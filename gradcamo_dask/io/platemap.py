"""Platemaps and well names: one row per well with treatment, dose and control flag.

A platemap is a ``pandas.DataFrame`` with ``well`` ("B02"), ``treatment`` (str),
``dose`` (float, µM) and ``is_control`` (bool), plus any extra columns. Wells are
written as row letters and a two-digit column ("B02"); "B2" and "b002" are read as
the same well.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from gradcamo_dask.errors import MetadataError, PlateLayoutError

PathLike = str | Path
PLATEMAP_FILE = "platemap.csv"
_WELL_RE = re.compile(r"^\s*([A-Za-z]{1,2})\s*0*(\d{1,3})\s*$")
_CONTROL_NAMES = {"control", "dmso", "negcon", "neg_control", "vehicle", "untreated", "mock"}
_ALIASES = {
    "well": ("well", "Metadata_Well", "well_position", "Metadata_well_position"),
    "treatment": ("treatment", "Metadata_Treatment", "compound", "Metadata_Compound"),
    "dose": ("dose", "Metadata_Dose", "concentration", "Metadata_Concentration", "dose_um"),
    "is_control": ("is_control", "Metadata_IsControl", "control"),
}


# --------------------------------------------------------------------------- wells


def well_name(row: str, column: int | str) -> str:
    """Canonical well name: row letters plus a two-digit column, e.g. ``("B", 2) -> "B02"``."""
    return f"{str(row).upper()}{int(column):02d}"


def split_well(name: str) -> tuple[str, int]:
    """``"B02"`` (or ``"b2"``) -> ``("B", 2)``; raises ValueError for anything else."""
    match = _WELL_RE.match(str(name))
    if match is None:
        raise ValueError(f"{name!r} is not a well name like 'B02'")
    return match.group(1).upper(), int(match.group(2))


def normalize_well(name: str) -> str:
    """``"b2"``, ``"B2"``, ``"B002"`` -> ``"B02"``."""
    return well_name(*split_well(name))


def row_order(row: str) -> tuple[int, str]:
    """Sort key of a plate row name: A..Z before AA..AF, as on a 1536-well plate."""
    return (len(row), row)


def plate_order(wells: Sequence[str]) -> list[str]:
    """Wells sorted row by row, then by column number (plate reading order)."""
    return sorted(wells, key=lambda w: (row_order(split_well(w)[0]), split_well(w)[1]))



# ----------------------------------------------------------------------- platemap


def _find_column(frame: pd.DataFrame, field: str) -> str | None:
    lower = {str(c).lower(): c for c in frame.columns}
    for alias in _ALIASES[field]:
        if alias.lower() in lower:
            return lower[alias.lower()]
    return None


def _as_bool(values: pd.Series, source: str, column: str) -> np.ndarray:
    table = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False, "t": True, "f": False}
    out = []
    for v in values:
        key = str(v).strip().lower()
        if isinstance(v, (bool, np.bool_)):
            out.append(bool(v))
        elif key in table:
            out.append(table[key])
        else:
            raise MetadataError(f"platemap {source}: column {column!r} holds {v!r}; use true/false (or 1/0)")
    return np.asarray(out, dtype=bool)


def validate_platemap(frame: pd.DataFrame, source: str = "<DataFrame>") -> pd.DataFrame:
    """Check and normalise a platemap table: one row per well with ``well, treatment, dose,
    is_control`` (+ extras).

    Column aliases from CellProfiler/pycytominer naming are accepted (``Metadata_Well``,
    ``Metadata_Treatment``, ``concentration`` ...). ``dose`` defaults to NaN, and a
    missing ``is_control`` is inferred: dose 0 or a treatment named like a control
    (control, DMSO, negcon, vehicle, untreated, mock).
    """
    frame = frame.copy()
    found = {field: _find_column(frame, field) for field in _ALIASES}
    for field in ("well", "treatment"):
        if found[field] is None:
            raise MetadataError(
                f"platemap {source}: no {field!r} column (columns: {list(frame.columns)}); "
                f"a platemap needs at least 'well' and 'treatment'"
            )
    out = pd.DataFrame(index=frame.index)
    try:
        out["well"] = [normalize_well(w) for w in frame[found["well"]]]
    except ValueError as err:
        raise MetadataError(f"platemap {source}: column {found['well']!r}: {err}") from None
    out["treatment"] = frame[found["treatment"]].astype(str).to_numpy()
    if found["dose"] is not None:
        try:
            out["dose"] = pd.to_numeric(frame[found["dose"]]).astype(float).to_numpy()
        except (ValueError, TypeError) as err:
            raise MetadataError(f"platemap {source}: column {found['dose']!r} is not numeric ({err})") from None
    else:
        out["dose"] = np.nan
    if found["is_control"] is not None:
        out["is_control"] = _as_bool(frame[found["is_control"]], source, found["is_control"])
    else:
        named = out["treatment"].str.lower().isin(_CONTROL_NAMES)
        out["is_control"] = (named | (out["dose"] == 0)).to_numpy(bool)
    for column in frame.columns:
        if column not in found.values() and column not in out.columns:
            out[column] = frame[column].to_numpy()
    duplicated = out["well"][out["well"].duplicated()].unique().tolist()
    if duplicated:
        raise MetadataError(f"platemap {source}: wells {duplicated} appear more than once; one row per well")
    return out.reset_index(drop=True)


def open_platemap(path: PathLike) -> pd.DataFrame:
    """Read a platemap (CSV, TSV or Parquet): one row per well.

    Parameters
    ----------
    path : str or Path
        ``.csv``, ``.tsv``/``.txt`` (tab-separated) or ``.parquet`` file with at least
        the columns ``well`` and ``treatment``; ``dose`` (µM) and ``is_control`` are
        optional, any other column is kept.

    Returns
    -------
    pandas.DataFrame
        Columns ``well`` ("B02"), ``treatment`` (str), ``dose`` (float),
        ``is_control`` (bool), then the extra columns.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"platemap {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            frame = pd.read_parquet(path)
        else:
            frame = pd.read_csv(path, sep="\t" if suffix in (".tsv", ".txt") else ",", encoding="utf-8")
    except UnicodeDecodeError as err:
        raise MetadataError(f"platemap {path} is not UTF-8 text (byte {err.start}: {err.reason}); save it as "
                            "UTF-8 CSV") from None
    except pd.errors.EmptyDataError:
        raise MetadataError(f"platemap {path} is empty; it needs a header line (well, treatment, ...) and one "
                            "row per well") from None
    except (pd.errors.ParserError, ValueError, OSError) as err:
        raise MetadataError(f"platemap {path} cannot be read as a table ({type(err).__name__}: {err}); give a "
                            "CSV, TSV or Parquet file") from None
    return validate_platemap(frame, str(path))


def attach_platemap(image: xr.DataArray, platemap: pd.DataFrame | PathLike) -> xr.DataArray:
    """Add the platemap's columns as coords on ``well`` (``treatment``, ``dose``, ...).

    Every well of the plate needs a platemap row (wells only in the platemap are
    ignored). Columns that clash with existing coords (``row``, ``column``, ``site``,
    ``c``) or with ``plate`` are not copied.
    """
    platemap = validate_platemap(platemap) if isinstance(platemap, pd.DataFrame) else open_platemap(platemap)
    table = platemap.set_index("well")
    wells = [str(w) for w in image["well"].values]
    missing = [w for w in wells if w not in table.index]
    if missing:
        raise PlateLayoutError(
            f'plate "{image.attrs.get("plate", "?")}": wells {missing} have no row in the platemap; '
            f"add them to the platemap or select the mapped wells with image.sel(well=[...])"
        )
    rows = table.loc[wells]
    skip = set(image.dims) | {"row", "column", "plate"}
    coords = {col: ("well", rows[col].to_numpy()) for col in rows.columns if col not in skip}
    return image.assign_coords(coords)


def platemap_of(image: xr.DataArray) -> pd.DataFrame | None:
    """The platemap carried as coords on ``well`` (None when there is none)."""
    if "treatment" not in image.coords:
        return None
    names = [n for n, c in image.coords.items() if c.dims == ("well",) and n not in ("row", "column")]
    return pd.DataFrame({n: image.coords[n].values for n in ["well", *[m for m in names if m != "well"]]})
