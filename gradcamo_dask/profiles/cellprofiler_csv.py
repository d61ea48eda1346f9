"""CellProfiler's own per-compartment layout: ``Image.csv`` and ``Cells.csv``, for CytoTable.

CellProfiler's ExportToSpreadsheet writes one CSV per object type, keyed by
``ImageNumber`` and ``ObjectNumber``, with the image's metadata in ``Image.csv``.
:func:`write_cellprofiler_csv` writes the profiles that way, beside the joined table of
:func:`~gradcamo_dask.to_cellprofiler_table` (same names, same values; one home for
naming: the joined table is built first and split):

``Image.csv``, one row per site, in the store's order:
  ``ImageNumber`` (1, 2, ...), ``Metadata_Plate``, ``Metadata_Well``, ``Metadata_Site``
  (**1-based**, as CellProfiler numbers fields; the store's 0-based site plus 1), the
  platemap's columns (``Metadata_treatment``, ``Metadata_dose``, ``Metadata_is_control``,
  ...) and ``Count_Cells``.
``Cells.csv``, one row per cell:
  ``ImageNumber``, ``ObjectNumber`` (the label id), ``Number_Object_Number``,
  ``Location_Center_X/Y/Z`` (voxels), classic features (``AreaShape_Volume``, ...) and
  deep features (``<Model>_<Layer>_<i>``) without the ``Cells_`` prefix, as CellProfiler
  writes them; then the per-object metadata, which keep their ``Metadata_`` names:
  Grad-CAMO (``Metadata_GradCAMO``, its sums and layer), the QC flags
  (``Metadata_cqc_*``), the model's output and the cell table's geometry columns.

No nuclei table is written: the profiles hold one object type, the cells.

CytoTable reads the folder with its ``cellprofiler_csv`` preset plus the options of
:func:`cytotable_options`: its preset joins ``Cytoplasm`` to ``Cells`` and ``Nuclei``,
which a cells-only folder lacks, and it prefixes every column that it does not know as
an identifier with the compartment's name (``Metadata_GradCAMO`` would become
``Cells_Metadata_GradCAMO``, a feature to pycytominer). The options join ``Image`` to
``Cells`` and name our ``Metadata_*`` columns as identifiers, so they stay metadata.

CytoTable loads DuckDB's ``sqlite_scanner`` and ``httpfs`` extensions on every
connection, which DuckDB downloads on first use; :func:`install_duckdb_extensions`
puts them in place from the PyPI packages ``duckdb-ext-sqlite`` and ``duckdb-ext-httpfs``
for machines without that download.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from gradcamo_dask.cells import GEOMETRY_COLUMNS
from gradcamo_dask.errors import InputError, OutputStoreError
from gradcamo_dask.profiles.export import cellprofiler_table

__all__ = ["cytotable_options", "install_duckdb_extensions", "write_cellprofiler_csv"]

COMPARTMENT = "Cells"
IMAGE_KEYS = ["Metadata_Plate", "Metadata_Well", "Metadata_Site"]
# CytoTable's cellprofiler_csv identifiers, kept as they are in its output
PRESET_IDENTIFIERS = ("ImageNumber", "ObjectNumber", "Metadata_Well", "Metadata_Plate", "Parent_Cells",
                      "Parent_Nuclei")
CYTOTABLE_JOINS = """
    SELECT image.*, cells.* EXCLUDE (Metadata_ImageNumber)
    FROM read_parquet('cells.parquet') AS cells
    LEFT JOIN read_parquet('image.parquet') AS image USING (Metadata_ImageNumber)
"""


def _image_columns(profiles: xr.Dataset, table: pd.DataFrame) -> list[str]:
    """Metadata of the site or well (plate, well, site, platemap columns): constant within each site."""
    per_cell = set(GEOMETRY_COLUMNS) | {"plate", "well", "site", "cell"}
    candidates = sorted(f"Metadata_{c}" for c, v in profiles.coords.items()
                        if v.dims == ("cell",) and c not in per_cell and not c.startswith("center_"))
    groups = table.groupby(IMAGE_KEYS, sort=False, dropna=False)
    constant = [c for c in candidates if c in table and (groups[c].nunique(dropna=False) <= 1).all()]
    return IMAGE_KEYS + constant


def _split(profiles: xr.Dataset, table: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    image_cols = _image_columns(profiles, table)
    sites = table[IMAGE_KEYS].astype(str).agg("\x1f".join, axis=1)
    number = pd.Series(pd.factorize(sites)[0] + 1, index=table.index)  # 1-based, in order of appearance
    image = table[image_cols].assign(ImageNumber=number).drop_duplicates("ImageNumber")
    image = image[["ImageNumber", *image_cols]].reset_index(drop=True)
    image["Metadata_Site"] = image["Metadata_Site"].astype(np.int64) + 1
    image["Count_Cells"] = number.value_counts().reindex(image["ImageNumber"]).to_numpy()

    prefix = f"{COMPARTMENT}_"
    features = [c for c in table if c.startswith(prefix)]
    metadata = [c for c in table if c.startswith("Metadata_") and c not in image_cols
                and c != "Metadata_ObjectNumber"]
    objects = table["Metadata_ObjectNumber"].astype(np.int64)
    cells = pd.concat([
        pd.DataFrame({"ImageNumber": number, "ObjectNumber": objects, "Number_Object_Number": objects}),
        table[features].rename(columns=lambda c: c[len(prefix):]),
        table[metadata],
    ], axis=1).reset_index(drop=True)
    return image, cells


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(path.name + ".partial")
    frame.to_csv(tmp, index=False)
    tmp.replace(path)  # never a half-written file under the final name


def write_cellprofiler_csv(profiles: xr.Dataset, folder: str | Path, **options: Any) -> dict[str, Path]:
    """Write ``Image.csv`` and ``Cells.csv`` as CellProfiler's ExportToSpreadsheet does.

    Parameters
    ----------
    profiles : xarray.Dataset
        Profiles as written by the pipeline (a 'cell' dim with plate, well, site and
        object_number coords).
    folder : str or Path
        Output folder, created if needed. Existing ``Image.csv``/``Cells.csv`` in it
        are refused (pass a new folder), so an input is never replaced.
    **options
        Passed to :func:`~gradcamo_dask.cellprofiler_table` (``model_name``, ``layer``,
        ``cutoff``, ``deep``, ``classic``).

    Returns
    -------
    dict
        ``{"image": Path, "cells": Path}``.
    """
    if options.get("compartment", COMPARTMENT) != COMPARTMENT:
        raise InputError(f"the CellProfiler layout writes one object type, {COMPARTMENT!r}; leave compartment= out")
    options.pop("compartment", None)
    folder = Path(folder)
    paths = {"image": folder / "Image.csv", "cells": folder / f"{COMPARTMENT}.csv"}
    taken = [str(p) for p in paths.values() if p.exists()]
    if taken:
        raise OutputStoreError(f"{', '.join(taken)} already exist; write the CellProfiler layout into a new folder")
    table = cellprofiler_table(profiles, compartment=COMPARTMENT, **options)
    image, cells = _split(profiles, table)
    folder.mkdir(parents=True, exist_ok=True)
    _write_csv(image, paths["image"])
    _write_csv(cells, paths["cells"])
    return paths


def _header(path: Path) -> list[str]:
    with open(path, newline="") as f:
        return next(csv.reader(f))


def cytotable_options(folder: str | Path) -> dict[str, Any]:
    """Options for ``cytotable.convert(source_path=folder, ...)`` on a folder of :func:`write_cellprofiler_csv`.

    Completes CytoTable's ``cellprofiler_csv`` preset for a cells-only folder: the
    join of ``Image`` and ``Cells``, its pagination key, and identifiers that keep
    every ``Metadata_*`` column of both files as metadata.

    Returns
    -------
    dict
        ``preset``, ``compartments``, ``metadata``, ``identifying_columns``,
        ``joins`` and ``page_keys``.
    """
    folder = Path(folder)
    paths = [folder / "Image.csv", folder / f"{COMPARTMENT}.csv"]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise InputError(f"{', '.join(missing)} not found; write the folder with write_cellprofiler_csv first")
    metadata = [c for p in paths for c in _header(p) if c.startswith("Metadata_")]
    identifiers = list(dict.fromkeys([*PRESET_IDENTIFIERS, *metadata]))
    return {
        "preset": "cellprofiler_csv",
        "compartments": [COMPARTMENT.lower()],
        "metadata": ["image"],
        "identifying_columns": identifiers,
        "joins": CYTOTABLE_JOINS,
        "page_keys": {"image": "ImageNumber", "cells": "ObjectNumber", "join": "Metadata_ObjectNumber"},
    }


def install_duckdb_extensions(home: str | Path | None = None) -> Path:
    """Put DuckDB's ``sqlite_scanner`` and ``httpfs`` extensions where DuckDB finds them, without a download.

    CytoTable runs ``INSTALL sqlite_scanner; INSTALL httpfs`` on every DuckDB
    connection; DuckDB skips the download when the files are already in its extension
    folder, ``<home>/.duckdb/extensions/v<version>/<platform>/``. The files come from
    the PyPI packages ``duckdb-ext-sqlite`` and ``duckdb-ext-httpfs``, built for one
    DuckDB version (``pip install duckdb==1.4.4 duckdb-ext-sqlite duckdb-ext-httpfs``).

    Parameters
    ----------
    home : str or Path, optional
        The home folder DuckDB resolves ``~`` to (default: the user's home).

    Returns
    -------
    Path
        The extension folder, holding links to (or copies of) the two files.
    """
    try:
        import duckdb
        import duckdb_ext
    except ImportError as err:
        raise InputError(f"{err.name} is not installed: pip install duckdb==1.4.4 duckdb-ext-sqlite duckdb-ext-httpfs "
                         f"(the extension packages are built for that DuckDB version)") from err
    version = f"v{duckdb.__version__}"
    platform = duckdb.execute("PRAGMA platform").fetchone()[0]
    # the wheels put their files under duckdb_ext/extensions/ and ship no __init__.py, so duckdb_ext is a
    # namespace package: look in every folder of its __path__ (the files of the two wheels may lie apart)
    roots = [Path(p) / "extensions" for p in duckdb_ext.__path__]
    names = ["sqlite_scanner.duckdb_extension", "httpfs.duckdb_extension"]
    found = {n: next((r / version / platform / n for r in roots if (r / version / platform / n).is_file()), None)
             for n in names}
    missing = [n for n, f in found.items() if f is None]
    if missing:
        shipped = sorted({p.name for r in roots for p in r.glob("v*")})
        raise InputError(f"no {missing} for DuckDB {version} on {platform} under {[str(r) for r in roots]}: the "
                         f"duckdb-ext packages ship extensions for DuckDB {shipped}; pip install duckdb-ext-sqlite "
                         f"duckdb-ext-httpfs and the duckdb version they require")
    target = Path(home if home is not None else Path.home()) / ".duckdb" / "extensions" / version / platform
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
        dest = target / name
        if dest.exists():
            continue
        try:
            dest.symlink_to(found[name])
        except OSError:
            shutil.copy2(found[name], dest)
    return target
