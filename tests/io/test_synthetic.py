"""Synthetic 3D Cell Painting plates: layout, laziness, determinism, ground truth, phenotypes, confounder."""

from __future__ import annotations

import time
import warnings

import dask
import numpy as np
import pytest
import zarr
from scipy import ndimage as ndi

from gradcamo_dask import InputError, open_labels, open_plate, synthetic_plate
from gradcamo_dask.cli import main
from gradcamo_dask.io.synthetic import SPACING_ZYX_UM, dose_response, synthetic_platemap
from gradcamo_dask.io.synthetic_site import (
    CHANNELS,
    apply_camera,
    apply_optics,
    render_site,
    site_geometry,
    site_signal,
    treatment_grating,
)

SMALL = dict(site_shape=(9, 96, 96), cell_radius=14.0)


def test_default_layout_is_the_papers():
    plate = synthetic_plate()
    image, labels, platemap = plate
    assert image.dims == ("well", "site", "c", "z", "y", "x")
    assert image.sizes == {"well": 12, "site": 4, "c": 6, "z": 21, "y": 256, "x": 256}
    assert list(image["c"].values) == list(CHANNELS) == ["DNA", "ER", "RNA", "AGP", "Actin", "Mito"]
    assert image.dtype == np.uint16 and labels.dtype == np.int32
    assert labels.sizes == {"well": 12, "site": 4, "z": 21, "y": 256, "x": 256}
    spacing = image.attrs["spacing_zyx_um"]
    assert spacing == list(SPACING_ZYX_UM) and spacing[0] / spacing[1] == pytest.approx(1.71, abs=0.001)
    assert platemap["treatment"].nunique() == 6 and platemap.groupby("treatment").size().eq(2).all()
    assert platemap.loc[platemap.is_control, "treatment"].unique().tolist() == ["control"]
    assert list(image["treatment"].values) == list(platemap["treatment"])
    # replicate wells share a column and differ in row (leave-wells-out = leave a row out)
    assert platemap.groupby("treatment")["well"].apply(lambda w: len({x[1:] for x in w})).eq(1).all()
    assert np.all(np.diff(platemap.loc[platemap.replicate == 0, "response"]) > 0)  # grows with dose


def test_generation_is_lazy_one_task_per_site():
    start = time.perf_counter()
    big = synthetic_plate(doses_um=[0, 1, 2, 3], wells_per_treatment=14, sites_per_well=9,
                          site_shape=(21, 2048, 2048))
    assert time.perf_counter() - start < 5.0
    assert big.image.nbytes > 500e9  # half a terabyte described, nothing computed
    layer = big.image.data.__dask_graph__().layers[big.image.data.name]
    assert len(layer) == 4 * 14 * 9
    assert big.image.data.chunksize == (1, 1, 6, 21, 2048, 2048)


def test_sites_are_deterministic_and_independent_of_what_else_is_computed():
    plate = synthetic_plate(doses_um=(0, 10), wells_per_treatment=1, sites_per_well=2, seed=7, **SMALL)
    alone = plate.image.isel(well=1, site=1).values
    together = plate.image.values[1, 1]
    np.testing.assert_array_equal(alone, together)
    again = synthetic_plate(doses_um=(0, 10), wells_per_treatment=1, sites_per_well=2, seed=7, **SMALL)
    np.testing.assert_array_equal(again.image.isel(well=1, site=1).values, alone)
    other = synthetic_plate(doses_um=(0, 10), wells_per_treatment=1, sites_per_well=2, seed=8, **SMALL)
    assert not np.array_equal(other.image.isel(well=1, site=1).values, alone)
    # the documented recipe: site (w, s) comes from default_rng([seed, w, s])
    direct, direct_labels = render_site(np.random.default_rng([7, 1, 1]), (9, 96, 96), dose_response(10.0), 1, 2,
                                        cell_radius=14.0)
    np.testing.assert_array_equal(direct, alone)
    np.testing.assert_array_equal(plate.labels.isel(well=1, site=1).values, direct_labels)


def test_ground_truth_labels_are_int32_unique_connected_cells():
    image, labels = render_site(np.random.default_rng(4), (21, 256, 256), 0.5, 0, 6)
    assert labels.dtype == np.int32 and labels.shape == (21, 256, 256)
    ids = np.unique(labels)
    assert ids[0] == 0 and np.array_equal(ids[1:], np.arange(1, len(ids)))  # 1..n, unique within the site
    assert 25 <= len(ids) - 1 <= 60
    boxes = ndi.find_objects(labels)
    for i, box in enumerate(boxes, start=1):
        _, n_parts = ndi.label(labels[box] == i)
        assert n_parts == 1, f"cell {i} is in {n_parts} pieces"
    # cells sit inside the stack: nothing on the first or last slice
    assert not labels[0].any() and not labels[-1].any()
    # densely packed: most 128 x 128 windows around a cell hold a neighbour
    with_neighbour = 0
    for i, box in enumerate(boxes, start=1):
        cy, cx = (box[1].start + box[1].stop) // 2, (box[2].start + box[2].stop) // 2
        window = labels[:, max(cy - 64, 0):cy + 64, max(cx - 64, 0):cx + 64]
        with_neighbour += bool(np.setdiff1d(np.unique(window), [0, i]).size)
    assert with_neighbour == len(boxes)


def test_demo_sized_site_renders_quickly_with_15_to_30_whole_cells():
    rng = np.random.default_rng([0, 0, 0])
    start = time.perf_counter()
    image, labels = render_site(rng, (21, 256, 256), 0.0, 0, 6)
    elapsed = time.perf_counter() - start
    assert image.shape == (6, 21, 256, 256) and image.dtype == np.uint16
    boxes = [b for b in ndi.find_objects(labels) if b is not None]
    interior = [b for b in boxes if b[1].start > 0 and b[2].start > 0 and b[1].stop < 256 and b[2].stop < 256]
    assert 12 <= len(interior) <= 30
    assert elapsed < 6.0  # about 0.6 s on a quiet core; generous for 2 shared cores


def _cell_stats(strength: float, seed: int):
    rng = np.random.default_rng([seed, 1])
    geo = site_geometry(rng, (9, 96, 96), strength, 14.0)
    signal = site_signal(rng, geo)
    return geo, signal


def test_treatment_phenotypes_grow_with_dose():
    control = [_cell_stats(0.0, s) for s in range(3)]
    treated = [_cell_stats(1.0, s) for s in range(3)]

    def mean_over(sets, fn):
        return np.mean([fn(g, sig) for g, sig in sets])

    def cell_volume(g, sig):
        return (g.labels > 0).sum() / g.labels.max()

    def nucleus_volume(g, sig):
        return g.nucleus.sum() / g.labels.max()

    def dna_intensity(g, sig):
        return sig[0][g.nucleus].mean()

    def er_intensity(g, sig):
        cyto = (g.labels > 0) & ~g.nucleus
        return sig[1][cyto].mean()

    def elongation(g, sig):
        out = []
        footprint = g.labels.max(axis=0)
        for i, box in enumerate(ndi.find_objects(footprint), start=1):
            yy, xx = np.nonzero(footprint[box] == i)
            if box[0].start > 0 and box[1].start > 0 and box[0].stop < 96 and box[1].stop < 96:
                ev = np.linalg.eigvalsh(np.cov(np.stack([yy, xx])))
                out.append(np.sqrt(ev[1] / max(ev[0], 1e-6)))
        return np.mean(out)

    def mito_piece_size(g, sig):
        cyto = (g.labels > 0) & ~g.nucleus
        pieces, n = ndi.label((sig[5] > 0.3 * np.percentile(sig[5][cyto], 99)) & cyto)
        return np.bincount(pieces.ravel())[1:].mean()

    assert mean_over(treated, cell_volume) > 1.2 * mean_over(control, cell_volume)
    assert mean_over(treated, nucleus_volume) > 1.5 * mean_over(control, nucleus_volume)
    assert mean_over(treated, dna_intensity) > 1.2 * mean_over(control, dna_intensity)
    assert mean_over(treated, er_intensity) < 0.9 * mean_over(control, er_intensity)
    assert mean_over(treated, elongation) > 1.1 * mean_over(control, elongation)
    # mitochondria fragment: connected pieces get smaller
    assert mean_over(treated, mito_piece_size) < 0.7 * mean_over(control, mito_piece_size)


def test_channels_have_their_own_compartments():
    geo, sig = _cell_stats(0.0, 0)
    cyto = (geo.labels > 0) & ~geo.nucleus
    outside = geo.labels == 0
    assert sig[0][geo.nucleus].mean() > 5 * sig[0][cyto].mean()  # DNA in nuclei
    for c in (1, 5):  # ER and Mito in the cytoplasm
        assert sig[c][cyto].mean() > 3 * sig[c][geo.nucleus].mean()
    assert np.all(sig[:, outside] == 0)  # no stain outside cells before optics
    # textures: channels are not copies of each other inside the cytoplasm
    corr = np.corrcoef(sig[1:, cyto])  # DNA is 0 in the cytoplasm
    assert np.all(np.abs(corr[np.triu_indices(5, 1)]) < 0.8)


def test_camera_is_poisson_gaussian():
    rng = np.random.default_rng(0)
    for lam in (4.0, 300.0):
        counts = apply_camera(rng, np.full((200_000,), lam, np.float32)).astype(float)
        assert counts.mean() == pytest.approx(lam + 100.0, rel=0.01)
        assert counts.var() == pytest.approx(lam + 2.5**2 + 1 / 12, rel=0.05)  # shot + read + rounding
    assert apply_camera(rng, np.full(10, 1e6, np.float32)).max() == 65535  # clips


def test_optics_blur_grows_away_from_focus_and_illumination_varies_by_site():
    signal = np.zeros((1, 21, 64, 64), np.float32)
    signal[0, :, 32, 32] = 1000.0  # a thin vertical line
    blurred, illum = apply_optics(np.random.default_rng(0), signal, bottom=4.0, height=8.0)
    spread = [(blurred[0, z] - 20 > 1).sum() for z in range(21)]
    assert spread[0] > spread[8] and spread[20] > spread[8]  # out-of-focus slices are blurrier
    _, illum2 = apply_optics(np.random.default_rng(1), signal, bottom=4.0, height=8.0)
    assert illum.shape == (1, 64, 64)
    assert illum.std() > 0.005  # a gradient, not flat
    assert not np.allclose(illum, illum2)  # site-level batch effect


def test_confounder_plants_treatment_outside_cells_only():
    args = (np.random.default_rng(11), (9, 96, 96), 0.5, 3, 6)
    clean, labels = render_site(*args, confounder=0.0, cell_radius=14.0, noise=False)
    args = (np.random.default_rng(11), (9, 96, 96), 0.5, 3, 6)
    cheat, labels2 = render_site(*args, confounder=1.0, cell_radius=14.0, noise=False)
    np.testing.assert_array_equal(labels, labels2)
    inside = labels > 0
    np.testing.assert_array_equal(clean[:, inside], cheat[:, inside])
    assert (cheat[:, ~inside] > clean[:, ~inside]).mean() > 0.3

    def grating_scores(image, labels):
        bg = labels == 0
        values = image.astype(np.float32)[:, bg].mean(axis=0)
        return [np.corrcoef(values, treatment_grating(labels.shape, j, 6)[bg])[0, 1] for j in range(6)]

    for k in (0, 3, 5):
        noisy, lab = render_site(np.random.default_rng(k), (9, 96, 96), 0.5, k, 6, confounder=1.0, cell_radius=14.0)
        scores = grating_scores(noisy, lab)
        assert int(np.argmax(scores)) == k and scores[k] > 0.5
        plain, lab = render_site(np.random.default_rng(k), (9, 96, 96), 0.5, k, 6, confounder=0.0, cell_radius=14.0)
        assert max(abs(s) for s in grating_scores(plain, lab)) < 0.1


def test_bad_recipes_are_refused():
    with pytest.raises(InputError, match="confounder must be in"):
        synthetic_plate(confounder=1.5)
    with pytest.raises(InputError, match="site_shape"):
        synthetic_plate(site_shape=(21, 16, 256))
    with pytest.raises(InputError, match="distinct"):
        synthetic_platemap(doses_um=(0, 1, 1))


def test_synth_command_writes_a_valid_plate_with_labels_and_platemap(tmp_path, capsys):
    from ome_zarr_models.v05.hcs import HCS

    out = tmp_path / "synth.zarr"
    args = ["synth", str(out), "--doses", "0", "1", "--wells-per-treatment", "1", "--sites", "2",
            "--site-shape", "7", "64", "64", "--seed", "5", "--confounder", "0.5", "--quiet"]
    assert main(args) == 0
    assert "wrote" in capsys.readouterr().out
    assert (out / "platemap.csv").is_file()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert HCS.from_zarr(zarr.open_group(out, mode="r")).n_wells == 2
    image = open_plate(out)
    labels = open_labels(out, like=image)
    expected = synthetic_plate(doses_um=(0, 1), wells_per_treatment=1, sites_per_well=2, site_shape=(7, 64, 64),
                               seed=5, confounder=0.5)
    np.testing.assert_array_equal(*dask.compute(image.data, expected.image.data))
    np.testing.assert_array_equal(*dask.compute(labels.data, expected.labels.data))
    assert list(image["treatment"].values) == ["control", "compound_1uM"]
    assert main(args) == 1  # refuses to overwrite
    assert "already exists" in capsys.readouterr().err
