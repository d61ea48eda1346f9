"""score_plate and write_profiles on a real OME-Zarr plate, real bundles and real Zarr stores.

These run on Dask's in-process schedulers; the multi-process cluster runs (killed
workers, 1 vs 2 workers) are in test_cluster.py.
"""

from __future__ import annotations

import json

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr

from gradcamo_dask.jobs import score as pipeline
from gradcamo_dask.profiles import store as store_module
from gradcamo_dask.cells import cell_table, extract_crops
from gradcamo_dask.errors import BundleMismatchError, InputError, LabelsError, OutputStoreError, PlateLayoutError
from gradcamo_dask.engine.explain import explain
from gradcamo_dask.engine.bundles import open_bundle
from gradcamo_dask.normalize import normalize_crops
from gradcamo_dask.jobs.score import score_plate
from gradcamo_dask.profiles.store import describe_profiles, done_sites, open_profiles, write_profiles
from gradcamo_dask.io.platemap import platemap_of
from tests.helpers.plate_fixtures import (CROP_SHAPE, LAYERS, assert_same_profiles, make_bundle,
                                          strings)


@pytest.fixture(scope="module")
def tiny(scored_tiny):
    return scored_tiny  # the session's scored tiny plate, shared with test_cluster.py


def test_dataset_is_lazy_labeled_and_matches_explain_on_the_same_crops(tiny):
    image, labels = tiny["image"], tiny["labels"]
    ds = score_plate(image, labels, tiny["bundle"])
    assert all(isinstance(ds[v].data, da.Array) for v in ds.data_vars)
    cells = cell_table(labels, platemap_of(image), size=CROP_SHAPE)
    per_site = cells.groupby(["well", "site"], sort=False).size().tolist()
    assert ds["deep"].chunks[0] == tuple(per_site)  # one block per site along cell
    assert ds.sizes["cell"] == len(cells) > 10
    for column in cells.columns:  # every cell-table column is a coord, in cell-table order
        np.testing.assert_array_equal(strings(ds[column].values), strings(cells[column].astype(str)))
    assert list(ds["layer"].values) == LAYERS
    assert list(ds["class"].values) == ["control", "compound_10uM"]
    prov = json.loads(ds.attrs["provenance"])
    assert prov["bundle_hash"] == open_bundle(tiny["bundle"]).hash and prov["layers"] == LAYERS
    assert "torch" in prov["versions"] and prov["parameters"]["crop_size"] == [None, 48, 48]

    # the same numbers as the engine on crops built the documented way (extract_crops + normalize + explain)
    ref = tiny["reference"]
    bundle = open_bundle(tiny["bundle"])
    crops, masks = extract_crops(image, labels, cells, CROP_SHAPE)
    crops, masks = dask.compute(crops, masks, scheduler="sync")
    result = explain(bundle.model, normalize_crops(crops, bundle.config.normalization), masks, layers=LAYERS)
    np.testing.assert_allclose(ref["logits"].values, result.logits, atol=1e-5)
    for k, name in enumerate(LAYERS):
        np.testing.assert_allclose(ref["gradcamo"].sel(layer=name).values, result.gradcamo[name], atol=1e-6)
        np.testing.assert_allclose(ref["cam_total"].sel(layer=name).values, result.cam_total[name], rtol=1e-5)
        np.testing.assert_allclose(ref[f"cam_lowres_{k}"].values, result.cams[name], atol=1e-6)
        assert ref[f"cam_lowres_{k}"].attrs["layer"] == name
    n_feat = ref.sizes["feature"]
    assert n_feat == sum(result.features[n].shape[1] for n in LAYERS)
    np.testing.assert_allclose(ref["deep"].values, np.concatenate([result.features[n] for n in LAYERS], 1), atol=1e-5)
    score = ref["gradcamo"].values
    assert np.all((score[~np.isnan(score)] >= 0) & (score[~np.isnan(score)] <= 1))
    np.testing.assert_array_equal(ref["predicted"].values, ref["logits"].values.argmax(1))


def test_write_then_open_zarr_gives_the_same_dataset(tiny, tmp_path):
    ds = score_plate(tiny["image"], tiny["labels"], tiny["bundle"])
    with dask.config.set(scheduler="threads"):
        report = write_profiles(ds, tmp_path / "p.zarr", chunk_cells=6)
    assert report["written"] == report["chunks"] == -(-ds.sizes["cell"] // 6) and report["skipped"] == 0
    back = xr.open_zarr(tmp_path / "p.zarr", consolidated=False)
    assert_same_profiles(tiny["reference"], back)
    for column in ("treatment", "dose", "center_y", "touches_border", "plate"):
        np.testing.assert_array_equal(strings(back[column].values), strings(tiny["reference"][column].values))
    assert back.attrs["provenance"] == ds.attrs["provenance"] and back.attrs[store_module.COMPLETE_ATTR] is True
    assert_same_profiles(tiny["reference"], open_profiles(tmp_path / "p.zarr"))
    info = describe_profiles(tmp_path / "p.zarr")
    assert info["kind"] == "profiles" and info["cells"] == ds.sizes["cell"] and info["complete"]
    assert info["layers"] == LAYERS and not info["sites_pending"] and len(info["sites_done"]) == 8


def test_interrupted_write_resumes_skipping_done_sites_and_equals_an_uninterrupted_run(tiny, tmp_path, monkeypatch):
    ds = score_plate(tiny["image"], tiny["labels"], tiny["bundle"])
    cells = strings(ds["well"].values), ds["site"].values
    failing = (str(cells[0][-1]), int(cells[1][-1]))  # the last site fails on purpose
    real = pipeline.score_site

    def flaky(image_site, labels_site, cells_site, spec):
        if (spec["well"], spec["site"]) == failing:
            raise RuntimeError("disk went away")
        return real(image_site, labels_site, cells_site, spec)

    chunk = 5
    store = tmp_path / "resume.zarr"
    monkeypatch.setattr(pipeline, "score_site", flaky)
    with dask.config.set(scheduler="sync"), pytest.raises(RuntimeError, match="disk went away"):
        write_profiles(ds, store, chunk_cells=chunk)
    with pytest.raises(OutputStoreError, match="did not finish"):  # an interrupted store never looks complete
        open_profiles(store)
    partial = done_sites(store)
    assert not partial["done"].all() and partial["done"].any()
    assert describe_profiles(store)["complete"] is False

    # which sites does the rerun need? those with a cell in a chunk that is not done
    import zarr

    done = np.asarray(zarr.open_group(str(store), mode="r")[store_module.DONE_ARRAY][:]).astype(bool)
    site_of_cell = [f"{w}/{s}" for w, s in zip(*cells)]
    needed = {site_of_cell[c] for c in range(len(site_of_cell)) if not done[c // chunk]}
    calls = []

    def counted(image_site, labels_site, cells_site, spec):
        calls.append((spec["well"], spec["site"]))
        return real(image_site, labels_site, cells_site, spec)

    monkeypatch.setattr(pipeline, "score_site", counted)
    with dask.config.set(scheduler="sync"):
        report = write_profiles(score_plate(tiny["image"], tiny["labels"], tiny["bundle"]), store, chunk_cells=chunk)
    assert len(calls) == len(needed) < 8  # done sites were skipped
    assert report["skipped"] == int(done.sum()) and report["written"] == len(done) - int(done.sum())
    assert_same_profiles(tiny["reference"], open_profiles(store))
    assert done_sites(store)["done"].all()


def test_store_of_another_bundle_or_plate_is_refused_unless_overwrite(tiny, tmp_path):
    store = tmp_path / "out.zarr"
    with dask.config.set(scheduler="threads"):
        write_profiles(score_plate(tiny["image"], tiny["labels"], tiny["bundle"]), store)
        other = make_bundle(tmp_path / "other", seed=1)
        ds_other = score_plate(tiny["image"], tiny["labels"], other)
        with pytest.raises(OutputStoreError, match="another plate, bundle"):
            write_profiles(ds_other, store)
        # the refused store is untouched
        assert_same_profiles(tiny["reference"], open_profiles(store))
        fewer = score_plate(tiny["image"].isel(well=[0, 1]), tiny["labels"].isel(well=[0, 1]), tiny["bundle"])
        with pytest.raises(OutputStoreError):
            write_profiles(fewer, store)
        with pytest.raises(OutputStoreError, match="not a gradcamo-dask profiles store"):
            write_profiles(ds_other, tiny["plate"])  # a plate is never written over
        write_profiles(ds_other, store, overwrite=True)
    back = open_profiles(store)
    assert json.loads(back.attrs["provenance"])["bundle_hash"] == open_bundle(other).hash
    assert not np.allclose(back["logits"].values, tiny["reference"]["logits"].values)


def test_bundle_that_does_not_fit_the_plate_is_refused(tiny, tmp_path):
    wrong_channels = make_bundle(tmp_path / "ch", channels=["DNA", "ER", "RNA", "AGP", "Mito", "Actin"])
    with pytest.raises(BundleMismatchError, match="in this order"):
        score_plate(tiny["image"], tiny["labels"], wrong_channels)
    five = make_bundle(tmp_path / "five", channels=["DNA", "ER", "RNA", "AGP", "Actin"])
    with pytest.raises(BundleMismatchError, match="5 channels"):
        score_plate(tiny["image"], tiny["labels"], five)
    wrong_classes = make_bundle(tmp_path / "cl", classes=["control", "compound_3uM"])
    with pytest.raises(BundleMismatchError, match="compound_10uM"):
        score_plate(tiny["image"], tiny["labels"], wrong_classes)
    # new compounds can be scored on purpose
    ds = score_plate(tiny["image"], tiny["labels"], wrong_classes, check_classes=False)
    assert ds.sizes["cell"] == tiny["reference"].sizes["cell"]
    with pytest.raises(Exception, match="not spatial layers|does not exist"):
        score_plate(tiny["image"], tiny["labels"], tiny["bundle"], layers=["_fc"])


def test_site_without_labels_is_refused(tiny):
    with pytest.raises((LabelsError, PlateLayoutError)):
        score_plate(tiny["image"], tiny["labels"].isel(site=[0]), tiny["bundle"])
    with pytest.raises(LabelsError):
        score_plate(tiny["image"], None, tiny["bundle"])


def test_zero_cell_sites_give_zero_rows_and_a_plate_without_cells_an_empty_dataset(tiny, tmp_path):
    labels = tiny["labels"]
    site_mask = xr.zeros_like(labels.isel(z=0, y=0, x=0), dtype=bool)
    site_mask[1, 0] = True  # well 1 site 0 loses its cells
    emptied = labels.where(~site_mask, 0).astype("int32")
    with dask.config.set(scheduler="sync"):
        ds = score_plate(tiny["image"], emptied, tiny["bundle"]).compute()
    ref = tiny["reference"]
    wells = strings(ref["well"].values)
    well1 = str(wells[wells != wells[0]][0])
    lost = (wells == well1) & (ref["site"].values == 0)
    assert lost.sum() > 0 and ds.sizes["cell"] == ref.sizes["cell"] - lost.sum()
    np.testing.assert_allclose(ds["logits"].values, ref["logits"].values[~lost], atol=1e-6)

    nothing = (labels * 0).astype("int32")
    with dask.config.set(scheduler="sync"):
        empty = score_plate(tiny["image"], nothing, tiny["bundle"])
        assert empty.sizes["cell"] == 0 and empty["deep"].shape == (0, ref.sizes["feature"])
        report = write_profiles(empty, tmp_path / "empty.zarr")
    assert report["n_cells"] == 0
    back = open_profiles(tmp_path / "empty.zarr")
    assert back.sizes["cell"] == 0 and set(back.data_vars) == set(ref.data_vars)


def test_model_cache_loads_once_per_process_and_refuses_a_changed_bundle(tiny, tmp_path):
    bundle = open_bundle(tiny["bundle"])
    first = pipeline.cached_bundle(str(tiny["bundle"]), bundle.hash, "cpu")
    assert pipeline.cached_bundle(str(tiny["bundle"]), bundle.hash, "cpu") is first
    copy = make_bundle(tmp_path / "b", seed=0)
    h = open_bundle(copy).hash
    make_bundle(tmp_path / "b", seed=3)  # replaced on disk after planning
    with pytest.raises(BundleMismatchError, match="changed on disk"):
        pipeline.cached_bundle(str(copy), h, "cpu")


@pytest.mark.gpu
def test_gpu_worker_path_agrees_with_cpu(tiny):
    """On a CUDA machine: crops built with CuPy on the device, explain on the GPU (float32, no autocast
    differences beyond bf16 tolerance), same cells and close scores as the CPU reference."""
    pytest.importorskip("cupy")
    with dask.config.set(scheduler="sync"):
        gpu = score_plate(tiny["image"], tiny["labels"], tiny["bundle"], device="cuda").compute()
    ref = tiny["reference"]
    np.testing.assert_array_equal(strings(gpu["object_number"].values), strings(ref["object_number"].values))
    assert np.nanmax(np.abs(gpu["gradcamo"].values - ref["gradcamo"].values)) < 0.05  # bf16 autocast on CUDA
    agree = (gpu["predicted"].values == ref["predicted"].values).mean()
    assert agree > 0.9
    from gradcamo_dask.jobs.devices import share_cuda_memory

    assert share_cuda_memory() is True


def test_classic_features_ride_along_in_the_site_task(tiny, tmp_path):
    from gradcamo_dask.profiles.classic import classic_features

    image, labels = tiny["image"], tiny["labels"]
    cells = cell_table(labels, platemap_of(image), size=CROP_SHAPE).iloc[:4]
    ds = score_plate(image, labels, tiny["bundle"], cells=cells, classic=True)
    assert ds["classic"].dims == ("cell", "classic_feature") and isinstance(ds["classic"].data, da.Array)
    assert json.loads(ds.attrs["provenance"])["parameters"]["classic"]["options"]["intensity_max"] == 65535.0
    with dask.config.set(scheduler="sync"):
        got = ds.compute()
        want = classic_features(image, labels, cells, CROP_SHAPE).compute()
    # the same CellProfiler measurements as the standalone route, on the crops the model saw
    assert strings(got["classic_feature"].values).tolist() == strings(want["classic_feature"].values).tolist()
    assert got.sizes["classic_feature"] > 100
    np.testing.assert_allclose(got["classic"].values, want.values, rtol=1e-5, equal_nan=True)
    np.testing.assert_allclose(got["deep"].values, tiny["reference"]["deep"].values[:4], atol=1e-5)
    with dask.config.set(scheduler="threads"):
        write_profiles(ds, tmp_path / "classic.zarr")
    back = open_profiles(tmp_path / "classic.zarr")
    np.testing.assert_allclose(back["classic"].values, got["classic"].values, equal_nan=True)


def test_hirescam_scores_equal_explain_and_are_recorded_and_kept_apart_from_gradcam(tiny, tmp_path):
    """cam_method="hirescam": the plate's scores equal explain(method="hirescam") on the same crops; the method is
    in the provenance, and a store of Grad-CAM scores is not resumed with HiResCAM ones."""
    image, labels = tiny["image"], tiny["labels"]
    layers = ["_head_swish", "_blocks.1.1"]  # the pooled head (both maps equal) and a layer inside the network
    with pytest.raises(InputError, match="CAM method must be one of"):
        score_plate(image, labels, tiny["bundle"], cam_method="gradcam++")
    ds = {m: score_plate(image, labels, tiny["bundle"], layers=layers, cam_method=m) for m in ("gradcam", "hirescam")}
    assert json.loads(ds["hirescam"].attrs["provenance"])["parameters"]["cam_method"] == "hirescam"
    assert "cam_method" not in json.loads(ds["gradcam"].attrs["provenance"])["parameters"]  # the paper's default
    got = {m: d.compute(scheduler="sync") for m, d in ds.items()}
    bundle = open_bundle(tiny["bundle"])
    cells = cell_table(labels, platemap_of(image), size=CROP_SHAPE)
    crops, masks = dask.compute(*extract_crops(image, labels, cells, CROP_SHAPE), scheduler="sync")
    x = normalize_crops(crops, bundle.config.normalization)
    for method, scored in got.items():
        want = explain(bundle.model, x, masks, layers=layers, method=method)
        for name in layers:
            assert np.isfinite(want.gradcamo[name]).mean() > 0.5, (method, name)
            np.testing.assert_allclose(scored["gradcamo"].sel(layer=name).values, want.gradcamo[name], atol=1e-6)
    score = {m: got[m]["gradcamo"].values for m in got}
    np.testing.assert_allclose(score["hirescam"][:, 0], score["gradcam"][:, 0], atol=1e-6)
    assert np.nanmax(np.abs(score["hirescam"][:, 1] - score["gradcam"][:, 1])) > 1e-3
    store = tmp_path / "out.zarr"
    with dask.config.set(scheduler="threads"):
        write_profiles(ds["gradcam"], store)
        with pytest.raises(OutputStoreError):
            write_profiles(ds["hirescam"], store)
