"""The bystanders knob: a mosaic plate drawn without its non-responding cells, so each responder stands alone
(the clean plate of the ground-truth benchmark), with the same responders as the full mosaic plate."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from gradcamo_dask import cell_truth, synthetic_plate
from gradcamo_dask.cli import main
from gradcamo_dask.errors import InputError

SMALL = dict(doses_um=(0.0, 10.0), wells_per_treatment=1, sites_per_well=2, site_shape=(8, 96, 96),
             cell_radius=12.0, mosaic=True, granules=1.0, seed=5)


def test_alone_plate_holds_exactly_the_full_plates_responders():
    full, alone = synthetic_plate(**SMALL), synthetic_plate(**SMALL, bystanders=False)
    assert full.image.data.name == synthetic_plate(**SMALL, bystanders=True).image.data.name  # default unchanged
    assert alone.image.data.name != full.image.data.name and '"bystanders": false' in alone.image.attrs["synthetic"]
    truth_full, truth_alone = cell_truth(full), cell_truth(alone)
    assert truth_alone["responder"].all() and (~truth_full["responder"]).any()
    key = ["well", "site", "object_number"]
    pd.testing.assert_frame_equal(truth_alone, truth_full[truth_full["responder"]].reset_index(drop=True))
    labels_full, labels_alone = full.labels.values, alone.labels.values
    image_full, image_alone = full.image.values, alone.image.values
    for wi, well in enumerate(full.labels.well.values):
        for site in range(labels_full.shape[1]):
            ids = truth_alone.loc[(truth_alone.well == str(well)) & (truth_alone.site == site), "object_number"]
            expected = np.where(np.isin(labels_full[wi, site], ids.to_numpy()), labels_full[wi, site], 0)
            np.testing.assert_array_equal(labels_alone[wi, site], expected)
            gone = (labels_full[wi, site] > 0) & (labels_alone[wi, site] == 0)
            if gone.any():  # a bystander's footprint is as dim as the background now
                stain = image_full[wi, site][:, gone].mean()
                assert image_alone[wi, site][:, gone].mean() < 0.8 * stain
    assert set(map(tuple, truth_alone[key].to_numpy())) <= set(map(tuple, truth_full[key].to_numpy()))


def test_bystanders_knob_needs_a_mosaic_plate():
    with pytest.raises(InputError, match="mosaic=True"):
        synthetic_plate(**{**SMALL, "mosaic": False}, bystanders=False)


def test_synth_cli_writes_the_alone_plate(tmp_path):
    out = tmp_path / "alone.zarr"
    assert main(["synth", str(out), "--mosaic", "--no-bystanders", "--doses", "0", "10", "--wells-per-treatment", "1",
                 "--sites", "1", "--site-shape", "6", "64", "64", "--cell-radius", "10", "--quiet"]) == 0
    truth = pd.read_csv(out / "cell_truth.csv")
    assert len(truth) and truth.responder.all()
    assert main(["synth", str(tmp_path / "bad.zarr"), "--no-bystanders", "--quiet"]) == 1
    assert not (tmp_path / "bad.zarr").exists()
