"""The profiles store's template at planning: text coords as written and read back, done markers not read."""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr

from gradcamo_dask.io.virtual import VirtualPlate
from gradcamo_dask.jobs.profile_layout import table_coords
from gradcamo_dask.profiles import store as store_module
from gradcamo_dask.profiles.export import cellprofiler_table
from gradcamo_dask.errors import OutputStoreError
from gradcamo_dask.profiles.store import open_profiles, write_profiles


class _PlanOnly:
    """A client that keeps the write tasks and runs none (planning alone)."""

    def compute(self, tasks: list, optimize_graph: bool = False) -> list:
        self.tasks = list(tasks)
        return []


@pytest.fixture()
def profiles() -> xr.Dataset:
    """Profiles of a small virtual plate: one block per site, the cell table as coords (as score_plate makes them)."""
    cells = VirtualPlate(n_wells=3, n_sites=2, shape_zyx=(5, 200, 200)).cell_table(size=(None, 64, 64))
    counts = tuple(int(n) for n in cells.groupby(["well", "site"], sort=False).size())
    deep = da.from_array(np.arange(len(cells) * 4, dtype=np.float32).reshape(-1, 4), chunks=(counts, 4))
    return xr.Dataset({"deep": (("cell", "feature"), deep)},
                      coords={"cell": np.arange(len(cells)), "feature": np.asarray([f"f_{i}" for i in range(4)], dtype=object),
                              **table_coords(cells)},
                      attrs={"plate": "virtual", "provenance": '{"plate": "virtual", "layers": ["f"]}'})


def test_a_new_store_is_planned_without_reading_its_done_markers(profiles, tmp_path, monkeypatch):
    reads = []
    real = store_module._done_markers
    monkeypatch.setattr(store_module, "_done_markers", lambda path: reads.append(path) or real(path))
    client = _PlanOnly()
    out = write_profiles(profiles, tmp_path / "p.zarr", client=client, check=False, chunk_cells=8)
    assert out["written"] == out["chunks"] == len(client.tasks) == -(-profiles.sizes["cell"] // 8)
    assert reads == []  # none written yet: no marker file is opened, at planning or at the end
    with pytest.raises(OutputStoreError, match="did not finish"):
        open_profiles(tmp_path / "p.zarr")
    with dask.config.set(scheduler="sync"):  # the same plan, run: every marker read once, at the end
        assert write_profiles(profiles, tmp_path / "p.zarr", check=False, chunk_cells=8)["skipped"] == 0
    assert len(reads) == 2  # the resume's check (no marker on disk: no file read) and the end's
    assert open_profiles(tmp_path / "p.zarr").sizes["cell"] == profiles.sizes["cell"]  # complete


def test_text_coords_read_back_as_the_same_text_and_export(profiles, tmp_path):
    with dask.config.set(scheduler="sync"):
        write_profiles(profiles, tmp_path / "p.zarr", check=False, chunk_cells=8)
    stored = open_profiles(tmp_path / "p.zarr")
    for name in ("plate", "well", "treatment"):
        assert [str(v) for v in stored[name].values] == [str(v) for v in profiles[name].values], name
    assert np.array_equal(stored["deep"].values, profiles["deep"].values)
    table = cellprofiler_table(stored)
    assert list(table["Metadata_Well"]) == [str(v) for v in profiles["well"].values]
    assert list(table["Metadata_Site"]) == list(profiles["site"].values)


def test_a_chunk_already_marked_done_is_not_written_again(profiles, tmp_path):
    # A worker can leave after writing a chunk but before the client hears of it; Dask then runs the write again.
    path = str(tmp_path / "p.zarr")
    write_profiles(profiles, path, client=_PlanOnly(), check=False, chunk_cells=8)  # the template, nothing written
    first, second = np.ones((8, 4), np.float32), np.full((8, 4), 2, np.float32)
    assert store_module._write_chunk(path, 0, 0, 8, ["deep"], [[first]], [[(0, 8)]]) == 8
    marker = next((tmp_path / "p.zarr" / store_module.DONE_ARRAY / "c").iterdir())
    written_at = marker.stat().st_mtime_ns
    assert store_module._write_chunk(path, 0, 0, 8, ["deep"], [[second]], [[(0, 8)]]) == 8
    group = store_module._open_group(path, "r")
    assert np.array_equal(group["deep"][0:8], first)
    assert marker.stat().st_mtime_ns == written_at
    store_module._write_chunk(path, 1, 8, 16, ["deep"], [[second]], [[(0, 8)]])  # a chunk not yet done is written
    assert np.array_equal(group["deep"][8:16], second)
