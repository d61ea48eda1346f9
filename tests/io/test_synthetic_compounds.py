"""The compounds knob: several compounds whose only difference is where their granules show, so that
both classes of a two-compound plate carry local evidence; one compound leaves plates as they were."""

from __future__ import annotations

import numpy as np
import pytest

from gradcamo_dask import synthetic_plate
from gradcamo_dask.cli import main
from gradcamo_dask.errors import InputError
from gradcamo_dask.io.synthetic import cell_truth, synthetic_platemap
from gradcamo_dask.io.synthetic_site import CHANNELS

SMALL = dict(wells_per_treatment=1, sites_per_well=1, site_shape=(8, 96, 96), cell_radius=12.0, mosaic=True,
             granules=1.0, seed=3)


def test_one_compound_leaves_the_plate_and_platemap_unchanged():
    plain = synthetic_plate(doses_um=(0.0, 10.0), **SMALL)
    one = synthetic_plate(doses_um=(0.0, 10.0), compounds=1, **SMALL)
    assert plain.image.data.name == one.image.data.name
    assert list(plain.platemap.columns) == list(one.platemap.columns) and "compound" not in one.platemap
    assert list(one.platemap["treatment"]) == ["control", "compound_10uM"]


def test_platemap_gives_each_compound_its_own_column_and_shares_the_control():
    pm = synthetic_platemap((0.0, 1.0, 10.0), wells_per_treatment=2, compounds=2)
    assert list(pm["treatment"][:5]) == ["control", "compoundA_1uM", "compoundB_1uM", "compoundA_10uM",
                                         "compoundB_10uM"]
    assert list(pm["well"][:5]) == ["B02", "B03", "B04", "B05", "B06"] and len(pm) == 10
    assert list(pm["compound"][:3]) == ["", "compoundA", "compoundB"]
    with pytest.raises(InputError, match="compounds must be 1-3"):
        synthetic_platemap((10.0,), compounds=4)


def test_each_compound_shows_its_granules_in_its_own_channel_inside_responders():
    plate = synthetic_plate(doses_um=(10.0,), compounds=2, **SMALL)
    image, labels = plate.image.values[:, 0].astype(float), plate.labels.values[:, 0]
    rna, agp = CHANNELS.index("RNA"), CHANNELS.index("AGP")
    cells = labels > 0
    truth = cell_truth(plate)
    responders = [np.isin(labels[w], truth.loc[(truth.well == well) & truth.responder, "object_number"])
                  for w, well in enumerate(plate.platemap["well"])]
    bright = {ch: [np.percentile(image[w, ch][responders[w]], 99.5) for w in range(2)] for ch in (rna, agp)}
    # compound A lights RNA puncta and B AGP puncta, each far above the other compound's level
    assert bright[rna][0] > 1.6 * bright[rna][1]
    assert bright[agp][1] > 1.6 * bright[agp][0]
    # nothing planted outside cells: the background of both wells has the same level in both channels
    for ch in (rna, agp):
        bg = [np.median(image[w, ch][~cells[w]]) for w in range(2)]
        assert abs(bg[0] - bg[1]) < 0.1 * max(bg)


def test_synth_takes_the_compounds_knob(tmp_path):
    out = tmp_path / "two.zarr"
    assert main(["synth", str(out), "--doses", "10", "--compounds", "2", "--wells-per-treatment", "1", "--sites",
                 "1", "--site-shape", "8", "64", "64", "--cell-radius", "10", "--mosaic", "--granules", "1",
                 "--quiet"]) == 0
    text = (out / "platemap.csv").read_text()
    assert "compoundA_10uM" in text and "compoundB_10uM" in text
