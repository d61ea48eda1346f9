"""Inputs that used to give quiet wrong answers or misleading errors, and now say what they are."""

from __future__ import annotations

import json

import dask
import numpy as np
import tifffile
import zarr

from gradcamo_dask import cli
from gradcamo_dask.io.plate import open_labels, open_plate
from gradcamo_dask.jobs.score import score_plate
from tests.helpers.plate_fixtures import make_bundle, make_plate


def test_blank_site_is_flagged_and_warned_about(tmp_path, caplog):
    plate = make_plate(tmp_path / "plate.zarr", wells_per_treatment=1, sites=1)
    bundle = make_bundle(tmp_path / "bundle")
    field = zarr.open_group(plate / "B" / "2" / "0", mode="r+")["0"]
    field[...] = 0  # an all-zero (blank) site that still has labels
    image = open_plate(plate)
    labels = open_labels(plate, like=image)
    with dask.config.set(scheduler="synchronous"), caplog.at_level("WARNING"):
        ds = score_plate(image, labels, bundle)
        blank = ds["blank_site"].values
    wells = ds["well"].values.astype(str)
    assert blank.dtype == bool and blank.any() and not blank.all()
    assert set(wells[blank]) == {"B02"} and not blank[wells != "B02"].any()
    assert "blank (all zero)" in caplog.text and "B02" in caplog.text


def test_info_reads_a_tiff_plate(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for site in (0, 1):
        tifffile.imwrite(tmp_path / f"B02_s{site}.tif", rng.integers(0, 9, (4, 2, 16, 16), dtype=np.uint16),
                         imagej=True, metadata={"axes": "ZCYX"})
    assert cli.main(["info", str(tmp_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "plate" and info["wells"] == ["B02"] and info["sites"] == [0, 1]
    assert info["labels"] is False


def test_info_on_a_store_whose_setup_was_interrupted_says_so(tmp_path, capsys):
    from tests.corpus.cases import _interrupted_store

    store = _interrupted_store(tmp_path)
    assert cli.main(["info", str(store), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "profiles" and info["complete"] is False
    assert "setup interrupted" in info["chunks_done"]
