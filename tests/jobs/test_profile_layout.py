"""A plate's layout at scale: text coords, the cell-table digests and the virtual cell table without per-cell objects."""

from __future__ import annotations

import hashlib
import tracemalloc

import numpy as np
import pandas as pd
import pytest
from xarray.coding.strings import check_vlen_dtype

from gradcamo_dask.io.virtual import VirtualPlate
from gradcamo_dask.jobs.profile_layout import cells_key, per_cell_text, table_coords, table_hash


@pytest.fixture(scope="module")
def cells() -> pd.DataFrame:
    """A virtual plate's cell table with awkward text columns: missing values, mixed types, categories."""
    table = VirtualPlate(n_wells=5, n_sites=3, shape_zyx=(9, 300, 300)).cell_table(size=(None, 64, 64))
    n = len(table)
    table["mixed"] = pd.Series(([1, "a", None, 2.5, True] * n)[:n], dtype=object)
    table["with_missing"] = pd.Series((["x", None, np.nan, "y"] * n)[:n], dtype=object)
    table["category"] = pd.Categorical((["u", "v", None] * n)[:n])
    table["text_na"] = pd.Series((["p", None] * n)[:n], dtype="str")
    return table


def _cells_key_one_join(cells: pd.DataFrame) -> str:
    """The digest as first defined: every text column joined at once from its values' ``str``."""
    digest = hashlib.sha256()
    for column in ("well", "site", "object_number", "center_z", "center_y", "center_x", "volume_voxels"):
        values = cells[column].to_numpy()
        digest.update(f"\n{column}\n".encode())
        if np.issubdtype(values.dtype, np.number):
            kind = "<f8" if np.issubdtype(values.dtype, np.floating) else "<i8"
            digest.update(np.ascontiguousarray(values, dtype=kind).tobytes())
        else:
            digest.update("\n".join(map(str, values)).encode())
    return digest.hexdigest()


def test_text_coords_give_each_cell_the_str_of_its_value_shared_per_distinct_value(cells):
    coords = table_coords(cells)
    for column in ("plate", "well", "treatment", "mixed", "with_missing", "category", "text_na"):
        values = coords[column].values
        assert list(values) == [str(v) for v in cells[column].to_numpy()], column
        assert check_vlen_dtype(values.dtype) is str, column  # written as is: no scan, no copy by xarray
    wells = coords["well"].values
    assert len({id(v) for v in wells}) == cells["well"].nunique() == 5  # one str per well, not per cell
    assert coords["site"][1].dtype == np.int64 and per_cell_text(cells["center_x"]) is None


def test_text_coords_and_cells_key_make_no_python_object_per_cell():
    table = VirtualPlate(n_wells=64, n_sites=1).cell_table(size=(None, 64, 64))[["well", "site", "object_number"]]
    n = len(table)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        coords = table_coords(table)
        coords_peak = tracemalloc.get_traced_memory()[1] - base
        del coords
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        cells_key(table, rows_per_slice=4096)
        key_peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    # codes (8 B) and the coord (8 B) per cell; a str per cell alone is about 50 B (measured 124 B and 73 B
    # per cell before the codes)
    assert coords_peak / n < 40 and key_peak / n < 40, (coords_peak / n, key_peak / n)


@pytest.mark.parametrize("rows_per_slice", [1, 7, 2**18])
def test_cells_key_in_slices_equals_one_join(cells, rows_per_slice):
    assert cells_key(cells, rows_per_slice=rows_per_slice) == _cells_key_one_join(cells)
    objects = cells.assign(well=cells["well"].astype(object), site=cells["site"].astype("Int64"))
    assert cells_key(objects, rows_per_slice=rows_per_slice) == _cells_key_one_join(objects)
    assert cells_key(cells.iloc[:-1]) != cells_key(cells)


@pytest.mark.parametrize("rows_per_slice", [1, 7, 2**18])
def test_table_hash_in_slices_equals_the_whole_table_at_once(cells, rows_per_slice):
    whole = hashlib.sha256(pd.util.hash_pandas_object(cells, index=False).values).hexdigest()
    assert table_hash(cells, rows_per_slice=rows_per_slice) == whole  # mixed types (1, True): hashed at once
    plain = cells.drop(columns="mixed")  # text, numbers, categories, missing values: hashed in slices
    assert table_hash(plain, rows_per_slice=rows_per_slice) == hashlib.sha256(
        pd.util.hash_pandas_object(plain, index=False).values).hexdigest()
    assert table_hash(cells.iloc[:0]) == hashlib.sha256(b"").hexdigest()
    changed = cells.assign(treatment=cells["treatment"].where(cells.index != 3, "other"))
    assert table_hash(changed, rows_per_slice=rows_per_slice) != whole


def test_virtual_cell_table_builds_with_little_memory_beyond_the_table():
    plate = VirtualPlate(n_wells=32, n_sites=2)
    plate.cell_table(size=(None, 64, 64))  # the ellipsoid cache filled, as far as it holds
    tracemalloc.start()
    try:
        table = plate.cell_table(size=(None, 64, 64))
        kept, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    n = len(table)
    # transient memory above what is kept: 48 B per cell measured (209 B with per-site frames and a stacked copy)
    assert (peak - kept) / n < 100, (peak - kept) / n
    assert table["well"].nunique() == 32 and table["well"].iloc[-1] == "B08"
