"""Mosaic plates: only some cells respond, and the plate says which (ground truth of where the
treatment information is)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from gradcamo_dask import cell_truth, population_labels, synthetic_plate
from gradcamo_dask.cli import main
from gradcamo_dask.errors import InputError
from gradcamo_dask.io.synthetic import dose_response
from gradcamo_dask.io.synthetic_site import render_site, site_geometry

SMALL = dict(doses_um=(0.0, 10.0), wells_per_treatment=1, sites_per_well=2, site_shape=(8, 96, 96),
             cell_radius=12.0)


@pytest.fixture(scope="module")
def mosaic():
    plate = synthetic_plate(**SMALL, mosaic=True, seed=3)
    return plate, cell_truth(plate)


def test_responders_are_an_independent_set_and_the_only_responding_cells(mosaic):
    plate, truth = mosaic
    assert {"well", "site", "object_number", "responder", "strength", "responding_neighbours"} <= set(truth)
    treated = truth[truth.treatment != "control"]
    control = truth[truth.treatment == "control"]
    assert (control.strength == 0).all()
    assert (treated.loc[treated.responder, "strength"] > 0.5).all()  # 10 µM: response 0.91 x N(1, 0.1)
    assert (treated.loc[~treated.responder, "strength"] == 0).all()
    share = truth.responder.mean()
    assert 0.15 < share < 0.45
    # most bystanders touch a responder; most responders touch none (maximal independent set on the lattice)
    bystanders = truth[~truth.responder]
    assert (bystanders.responding_neighbours > 0).mean() > 0.6
    assert (truth[truth.responder].responding_neighbours == 0).mean() > 0.6
    # the table describes exactly the cells of the labels
    lab = plate.labels.isel(well=1, site=0).values
    rows = truth[(truth.well == str(plate.labels.well.values[1])) & (truth.site == 0)]
    assert sorted(rows.object_number) == sorted(set(np.unique(lab)) - {0})


def test_density_does_not_depend_on_dose_in_mosaic_wells():
    counts = {}
    for mosaic in (False, True):
        plate = synthetic_plate(**{**SMALL, "sites_per_well": 4}, mosaic=mosaic, seed=1)
        t = cell_truth(plate)
        counts[mosaic] = t.groupby("treatment").size()
    # plain plates: treated wells hold clearly fewer cells; mosaic: about as many as controls
    assert counts[False]["compound_10uM"] < 0.8 * counts[False]["control"]
    assert counts[True]["compound_10uM"] > 0.85 * counts[True]["control"]


def test_bystanders_look_like_controls_and_responders_do_not():
    geo = site_geometry(np.random.default_rng([0, 1, 0]), (8, 128, 128), float(dose_response(10.0)), 12.0,
                        mosaic=True)
    image, labels = render_site(np.random.default_rng([0, 1, 0]), (8, 128, 128), float(dose_response(10.0)), 1, 2,
                                cell_radius=12.0, mosaic=True, noise=False)
    np.testing.assert_array_equal(labels, geo.labels)
    mito = image[5]
    ids = np.arange(1, labels.max() + 1)
    # a cell's own DNA intensity rises with its response (+50 % at full response); bystanders stay at control level
    dna = np.array([image[0][labels == i].mean() for i in ids])
    assert dna[geo.responder].mean() > 1.15 * dna[~geo.responder].mean()
    assert mito.shape == labels.shape


def test_default_plates_are_unchanged_by_the_mosaic_knob():
    a = synthetic_plate(**SMALL, seed=5)
    b = synthetic_plate(**SMALL, seed=5, mosaic=False)
    np.testing.assert_array_equal(a.labels.values, b.labels.values)
    assert "mosaic" not in a.image.attrs["synthetic"]
    t = cell_truth(a)
    assert t.responder.mean() > 0.75  # about 88 % respond on plain plates


def test_population_labels_keep_one_population_and_are_lazy(mosaic):
    plate, truth = mosaic
    for responder in (True, False):
        kept = population_labels(plate.labels, truth, responder)
        assert kept.dims == plate.labels.dims and kept.chunks == plate.labels.chunks
        values, full = kept.values, plate.labels.values
        for wi, w in enumerate(kept.well.values):
            for si, s in enumerate(kept.site.values):
                expect = set(truth[(truth.well == str(w)) & (truth.site == int(s))
                                   & (truth.responder == responder)].object_number)
                assert set(np.unique(values[wi, si])) - {0} == expect
                # kept cells keep every voxel; the rest become background
                inside = np.isin(full[wi, si], list(expect))
                np.testing.assert_array_equal(values[wi, si][inside], full[wi, si][inside])
                assert (values[wi, si][~inside] == 0).all()


def test_cell_truth_needs_a_synthetic_plate(mosaic):
    plate, _ = mosaic
    stripped = plate._replace(image=plate.image.copy())
    stripped.image.attrs.pop("synthetic")
    with pytest.raises(InputError, match="synthetic recipe"):
        cell_truth(stripped)


def test_synth_cli_writes_the_mosaic_truth(tmp_path, capsys):
    out = tmp_path / "mosaic.zarr"
    assert main(["synth", str(out), "--mosaic", "--doses", "0", "10", "--wells-per-treatment", "1", "--sites", "1",
                 "--site-shape", "6", "64", "64", "--cell-radius", "10", "--quiet"]) == 0
    truth = pd.read_csv(out / "cell_truth.csv")
    assert truth.responder.any() and (~truth.responder).any()
    expected = cell_truth(synthetic_plate(doses_um=(0, 10), wells_per_treatment=1, sites_per_well=1,
                                          site_shape=(6, 64, 64), cell_radius=10.0, mosaic=True))
    pd.testing.assert_frame_equal(truth, expected, check_dtype=False)
    assert "cell_truth.csv" in capsys.readouterr().out
