"""The responder_growth knob: with it off, responders of a mosaic plate keep the bystanders' size, so
cell size carries no treatment information; with it on (default), plates stay exactly as they were."""

from __future__ import annotations

import numpy as np

from gradcamo_dask import cell_truth, synthetic_plate

SMALL = dict(doses_um=(0.0, 10.0), wells_per_treatment=1, sites_per_well=3, site_shape=(8, 128, 128),
             cell_radius=12.0, mosaic=True, granules=1.0, seed=4)


def _volumes(plate) -> np.ndarray:
    """Voxels of each cell, in cell_truth's order."""
    truth = cell_truth(plate)
    labels = plate.labels.values
    wells = {str(w): i for i, w in enumerate(plate.labels.well.values)}
    counts = {(w, s): np.bincount(labels[i, s].ravel()) for w, i in wells.items() for s in range(labels.shape[1])}
    return truth, np.array([counts[(r.well, r.site)][r.object_number] for r in truth.itertuples()])


def test_default_keeps_the_plate_and_its_dask_names():
    plain = synthetic_plate(**SMALL)
    grown = synthetic_plate(**SMALL, responder_growth=True)
    assert plain.image.data.name == grown.image.data.name and plain.labels.data.name == grown.labels.data.name
    assert "responder_growth" not in plain.image.attrs["synthetic"]
    same = synthetic_plate(**SMALL, responder_growth=False)
    assert same.image.data.name != plain.image.data.name and '"responder_growth": false' in same.image.attrs["synthetic"]


def test_without_growth_responders_are_as_large_as_bystanders():
    ratios = {}
    for growth in (True, False):
        truth, volume = _volumes(synthetic_plate(**SMALL, responder_growth=growth))
        treated = (truth.treatment != "control").to_numpy()
        responder = truth.responder.to_numpy()
        assert responder[treated].any() and (~responder[treated]).any()
        ratios[growth] = np.median(volume[treated & responder]) / np.median(volume[treated & ~responder])
    assert ratios[True] > 1.4  # growing responders: radius up to +45 % at 10 µM
    assert 0.8 < ratios[False] < 1.25  # same size distribution (the lattice's jitter and neighbours remain)


def test_cell_truth_follows_the_knob():
    plate = synthetic_plate(**SMALL, responder_growth=False)
    truth = cell_truth(plate)
    labels = plate.labels.values
    for wi, w in enumerate(plate.labels.well.values):
        for s in range(labels.shape[1]):
            rows = truth[(truth.well == str(w)) & (truth.site == s)]
            assert sorted(rows.object_number) == sorted(set(np.unique(labels[wi, s])) - {0})
    treated = truth[truth.treatment != "control"]
    assert (treated.loc[treated.responder, "strength"] > 0.5).all()  # the response itself is unchanged
