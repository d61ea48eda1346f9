"""The granules knob: a strong, local phenotype (bright RNA puncta) only inside responding cells,
and plates without it stay exactly as they were."""

from __future__ import annotations

import numpy as np
import pytest

from gradcamo_dask import synthetic_plate
from gradcamo_dask.cli import main
from gradcamo_dask.errors import InputError
from gradcamo_dask.io.synthetic_site import CHANNELS, site_geometry, site_signal

SMALL = dict(doses_um=(0.0, 10.0), wells_per_treatment=1, sites_per_well=1, site_shape=(8, 96, 96),
             cell_radius=12.0, mosaic=True, seed=2)


def test_granules_zero_leaves_the_plate_unchanged():
    plain = synthetic_plate(**SMALL)
    zero = synthetic_plate(**SMALL, granules=0.0)
    assert plain.image.data.name == zero.image.data.name  # same recipe, same Dask graph
    np.testing.assert_array_equal(plain.image.data.compute(), zero.image.data.compute())
    some = synthetic_plate(**SMALL, granules=1.0)
    assert some.image.data.name != plain.image.data.name and '"granules": 1.0' in some.image.attrs["synthetic"]
    np.testing.assert_array_equal(plain.labels.data.compute(), some.labels.data.compute())  # same cells


def test_granules_are_bright_rna_puncta_inside_responders_only():
    geo = site_geometry(np.random.default_rng(0), (8, 96, 96), 0.9, 12.0, mosaic=True)
    base = site_signal(np.random.default_rng(1), geo)
    with_granules = site_signal(np.random.default_rng(1), geo, granules=1.0)
    added = with_granules - base
    rna = CHANNELS.index("RNA")
    assert np.all(added[np.arange(len(CHANNELS)) != rna] == 0)  # other stains untouched
    responders = np.isin(geo.labels, np.flatnonzero(geo.responder) + 1)
    cytoplasm = responders & ~geo.nucleus
    assert np.all(added[rna][~cytoplasm] == 0)  # nothing outside responders' cytoplasm
    lit = added[rna][cytoplasm] > 0
    assert 0.01 < lit.mean() < 0.2  # puncta: a few per cent of the cytoplasm, not a wash
    typical = np.median(base[rna][cytoplasm])
    assert np.percentile(added[rna][cytoplasm][lit], 90) > 5 * typical  # and far brighter than the stain


def test_granules_outside_0_1_is_a_named_error_and_synth_takes_the_knob(tmp_path, capsys):
    with pytest.raises(InputError, match="granules must be in"):
        synthetic_plate(**SMALL, granules=1.5)
    out = tmp_path / "g.zarr"
    assert main(["synth", str(out), "--doses", "0", "10", "--wells-per-treatment", "1", "--sites", "1",
                 "--site-shape", "8", "64", "64", "--cell-radius", "10", "--mosaic", "--granules", "0.5",
                 "--quiet"]) == 0
    assert (out / "cell_truth.csv").is_file()
    assert main(["synth", str(tmp_path / "bad.zarr"), "--granules", "2", "--quiet"]) == 1
    assert "granules must be in" in capsys.readouterr().err
