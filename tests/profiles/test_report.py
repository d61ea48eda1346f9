"""The Grad-CAMO report: HTML with every figure on disk, JSON summary, missing parts named, CLI."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

from gradcamo_dask import InputError, OutputStoreError, cell_table, synthetic_plate, write_plate
from gradcamo_dask.cli import main
from gradcamo_dask.profiles.report import FIGURES, write_report
from tests.helpers.feature_profiles import profiles_from_model, tiny_cnn

SIZE = (None, 48, 48)
LAYERS = ("act1", "act2")


@pytest.fixture(scope="module")
def plate_and_profiles(tmp_path_factory):
    """A written 4-well plate (control and 10 µM, 2 sites each) and profiles scored on it with a tiny CNN
    (real Grad-CAM maps and scores from one explain pass), naming the plate in their provenance."""
    root = tmp_path_factory.mktemp("report")
    plate = synthetic_plate(doses_um=(0, 10), wells_per_treatment=2, sites_per_well=2, site_shape=(12, 96, 96),
                            cell_radius=14)
    path = root / "plate.zarr"
    write_plate(path, plate.image, plate.labels, platemap=plate.platemap, progress=False)
    cells = cell_table(plate.labels, plate.platemap, size=SIZE)
    profiles = profiles_from_model(plate.image, plate.labels, cells, SIZE, tiny_cnn(6, 2), LAYERS,
                                   provenance={"plate_path": str(path), "labels_path": str(path)})
    return root, profiles


@pytest.fixture(scope="module")
def full_report(plate_and_profiles):
    root, profiles = plate_and_profiles
    return write_report(profiles, root / "out", gallery_per_bin=3)


def _figure_files(html_path):
    text = html_path.read_text()
    return text, re.findall(r"<img src='([^']+)'", text)


def test_report_renders_every_figure(full_report, plate_and_profiles):
    _root, profiles = plate_and_profiles
    text, images = _figure_files(full_report)
    assert full_report.name == "index.html" and "<html>" in text
    assert len(images) == len(FIGURES) == 5
    for rel in images:
        path = full_report.parent / rel
        assert path.is_file() and path.stat().st_size > 1000, rel
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((full_report.parent / "summary.json").read_text())
    assert summary["missing"] == {}
    assert set(summary["figures"]) == set(FIGURES)
    assert summary["n_cells"] == profiles.sizes["cell"] and summary["layer"] == LAYERS[0]
    counts = summary["counts"]
    score = profiles["gradcamo"].sel(layer=LAYERS[0]).values
    assert counts["n_undefined"] == int(np.isnan(score).sum()) and counts["n_on_target"] == int((score >= 0.25).sum())
    by_treatment = summary["tables"]["By treatment"]
    assert {r["treatment"] for r in by_treatment} == {"control", "compound_10uM"}
    assert "Layers ranked by mean Grad-CAMO" in summary["tables"]
    assert summary["umap"]["whitening"].startswith("ZCA-whitened on")
    assert summary["umap_filtered"]["n_cells"] == int((score >= 0.25).sum())
    assert "Missing parts" not in text and "By well and site" in text
    # the gallery's crops read back from the plate are the ones that were scored: the Grad-CAMO
    # recomputed from the upsampled stored CAM and the read-back mask equals the stored score
    gallery = summary["gallery"]
    assert len(gallery["cells"]) == 9 and gallery["max_score_difference"] < 1e-6
    assert [c["bin"] for c in gallery["cells"]] == ["high"] * 3 + ["middle"] * 3 + ["low"] * 3
    shown = [c["gradcamo"] for c in gallery["cells"]]
    assert min(shown[:3]) >= max(shown[3:6]) >= max(shown[6:]) and shown[0] == np.nanmax(score)


def test_profiles_without_gradcamo_say_what_is_missing(plate_and_profiles, full_report):
    root, profiles = plate_and_profiles
    bare = profiles.drop_vars(["gradcamo", "cam_inside", "cam_total"])
    html_path = write_report(bare, root / "bare")
    text, images = _figure_files(html_path)
    summary = json.loads((html_path.parent / "summary.json").read_text())
    assert set(summary["missing"]) >= {"gradcamo_by_treatment", "gradcamo_by_site", "gallery", "umap_filtered"}
    assert all("no Grad-CAMO variables" in reason for reason in summary["missing"].values())
    assert "Missing parts" in text and "no Grad-CAMO variables" in text
    assert images == ["figures/umap.png"] and (html_path.parent / images[0]).stat().st_size > 1000
    assert sorted(p.name for p in (html_path.parent / "figures").iterdir()) == ["umap.png"]


def test_missing_plate_and_no_controls(plate_and_profiles, full_report):
    root, profiles = plate_and_profiles
    no_plate = profiles.copy()
    # score_plate's provenance when the image had no source path: "plate" is the plate's NAME, not a path
    no_plate.attrs["provenance"] = json.dumps({"bundle_path": "bundle", "plate": "P1", "plate_path": "",
                                               "labels_path": "", "layers": list(LAYERS),
                                               "parameters": {"crop_size": list(SIZE)}})
    no_plate = no_plate.assign_coords(is_control=("cell", np.zeros(no_plate.sizes["cell"], bool)))
    html_path = write_report(no_plate, root / "noplate")
    summary = json.loads((html_path.parent / "summary.json").read_text())
    assert list(summary["missing"]) == ["gallery"] and "no plate path" in summary["missing"]["gallery"]
    assert summary["umap"]["whitening"] == "standardised (not whitened)"
    assert any("no control cells" in note for note in summary["notes"])
    with pytest.raises(InputError, match="no Grad-CAMO scores"):
        write_report(profiles, root / "bad", layer="_blocks.3")


def test_report_command_on_a_zarr_store(plate_and_profiles, full_report, capsys):
    root, profiles = plate_and_profiles
    store = root / "profiles.zarr"
    profiles.to_zarr(store, mode="w")
    args = ["report", str(store), "--out", str(root / "cli"), "--layer", LAYERS[1], "--gallery", "2"]
    assert main(args) == 0
    out = capsys.readouterr().out
    summary = json.loads((root / "cli" / "summary.json").read_text())
    assert summary["layer"] == LAYERS[1] and f"({len(summary['figures'])} figures)" in out
    for part, reason in summary["missing"].items():  # e.g. too few on-target cells at this layer
        assert f"missing {part}: {reason}" in out
    assert main([*args, "--cutoff", "0"]) == 0  # every defined score is on target
    summary = json.loads((root / "cli" / "summary.json").read_text())
    assert summary["missing"] == {} and "5 figures" in capsys.readouterr().out
    assert summary["gallery"]["max_score_difference"] < 1e-6  # read back from the plate named in the store
    assert main(["report", str(root / "nothing.zarr"), "--out", str(root / "cli2")]) == 1
    assert "no profiles at" in capsys.readouterr().err


def test_open_profiles_drops_bookkeeping_and_refuses_unfinished_stores(plate_and_profiles, tmp_path):
    from gradcamo_dask.profiles.store import open_profiles as load_profiles

    _root, profiles = plate_and_profiles
    # as write_profiles leaves a store: a '_done_chunks' marker array and completion attrs
    store = profiles.assign(_done_chunks=("chunk", np.ones(3, bool)))
    store.attrs.update(gradcamo_fingerprint="f", gradcamo_complete=True)
    store.to_zarr(tmp_path / "done.zarr", mode="w")
    loaded = load_profiles(tmp_path / "done.zarr")
    assert "_done_chunks" not in loaded.variables and "chunk" not in loaded.dims
    assert loaded.sizes["cell"] == profiles.sizes["cell"] and "gradcamo" in loaded
    store.attrs["gradcamo_complete"] = False
    store.to_zarr(tmp_path / "half.zarr", mode="w")
    with pytest.raises(OutputStoreError, match="write did not finish"):
        load_profiles(tmp_path / "half.zarr")


def test_report_opens_with_a_plain_summary(full_report, plate_and_profiles):
    _root, profiles = plate_and_profiles
    text = full_report.read_text()
    summary = json.loads((full_report.parent / "summary.json").read_text())
    plain = summary["plain"]
    # the summary comes first, the provenance and glossary are folded away at the end
    assert text.index("In short") < text.index("Verdict:") < text.index("How Grad-CAMO is distributed")
    details = text[text.index("<details"):]
    assert "Glossary" in details and "Ledoit-Wolf" in details and "uniform baseline" in details
    assert text.index("<details") < text.index("<pre")  # the raw provenance JSON only inside the fold
    assert "paper Fig" not in text
    # accuracy: predicted class name = treatment, beside chance = 1 / classes
    classes = np.asarray([str(c) for c in profiles["class"].values])
    expected = np.mean(classes[profiles["predicted"].values.astype(int)] ==
                       np.asarray([str(t) for t in profiles["treatment"].values]))
    assert plain["accuracy"]["accuracy"] == pytest.approx(expected) and plain["accuracy"]["chance"] == 0.5
    score = profiles["gradcamo"].sel(layer=LAYERS[0]).values
    assert plain["gradcamo_mean"] == pytest.approx(np.nanmean(score))
    assert 0 < plain["uniform_mean"] < 1 and plain["level"] in ("good", "weak", "bad") and plain["next_steps"]


def test_uniform_baseline_is_the_masks_share_of_the_crop(plate_and_profiles):
    """The baseline from the cell table equals the mask's voxel share of the crop read back."""
    from gradcamo_dask import extract_crops, open_labels, open_plate
    from gradcamo_dask.profiles.report_summary import uniform_baseline

    root, profiles = plate_and_profiles
    image = open_plate(root / "plate.zarr")
    labels = open_labels(root / "plate.zarr", like=image)
    n_z = image.sizes["z"]
    table = pd.DataFrame({c: np.asarray(profiles[c].values) for c in (
        "well", "site", "object_number", "center_z", "center_y", "center_x")})
    table["well"] = table["well"].astype(str)
    _crops, masks = extract_crops(image, labels, table, SIZE)
    share = np.asarray(masks.sum(axis=(1, 2, 3)).compute(), dtype=float) / (n_z * SIZE[1] * SIZE[2])
    baseline = uniform_baseline(profiles, (n_z, SIZE[1], SIZE[2]))
    fits = ((profiles["bbox_y1"] - profiles["bbox_y0"]).values <= SIZE[1]) & \
        ((profiles["bbox_x1"] - profiles["bbox_x0"]).values <= SIZE[2])
    assert fits.sum() > 10
    np.testing.assert_allclose(baseline[fits], share[fits], rtol=1e-12)
    assert np.all(np.abs(baseline - share) < 0.05)


def test_coarse_layer_warning_and_verdict():
    from gradcamo_dask.profiles.report_summary import can_localise, plain_summary, summary_html
    from tests.helpers.feature_profiles import make_profiles, synthetic_cells

    profiles = make_profiles(synthetic_cells())
    scores = profiles["gradcamo"].sel(layer="_head_swish").values
    coarse = plain_summary(profiles, scores, "_head_swish", {"layer_grids": {"_head_swish": [1, 2, 2],
                                                                                "_blocks.10": [2, 7, 7]}},
                           0.25, (21, 48, 48))
    assert coarse["can_localise"] is False and coarse["level"] == "bad"
    assert coarse["layers_that_localise"] == ["_blocks.10"] and "_blocks.10" in coarse["next_steps"][0]
    page = summary_html(coarse)
    assert "Warning:" in page and "1 x 2 x 2" in page and "cannot localise" in page
    fine = plain_summary(profiles, scores, "_head_swish", {"layer_grids": {"_head_swish": [1, 4, 4]}}, 0.25,
                         (21, 48, 48))
    assert fine["can_localise"] is True and "Warning:" not in summary_html(fine)
    assert can_localise([1, 3, 3]) and not can_localise([2, 3, 2]) and can_localise(None) is None


def test_report_in_a_real_browser(full_report, tmp_path):
    """Headless Chromium loads the report: no console errors, every image decoded; a screenshot is kept."""
    import os

    from tests.helpers.browser import find_chromium, render_page

    browser = find_chromium()
    if browser is None:
        if os.environ.get("GRADCAMO_REQUIRE_BROWSER"):
            pytest.fail("GRADCAMO_REQUIRE_BROWSER is set but no chromium is on PATH (apt-get install chromium)")
        pytest.skip("no chromium on PATH: apt-get install chromium (.ci/run installs it)")
    shot = tmp_path / "report.png"
    page = render_page(browser, full_report, shot)
    assert page["loaded"] and page["title"] == "Grad-CAMO report"
    assert page["errors"] == []
    assert len(page["images"]) == len(FIGURES)
    for image in page["images"]:
        assert image["complete"] and image["width"] > 100, image
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    print(f"screenshot: {shot}")


def test_gallery_names_the_map_the_store_was_scored_with():
    from gradcamo_dask.profiles.report import _map_name

    assert _map_name({"parameters": {"cam_method": "hirescam"}}) == "HiResCAM"
    assert _map_name({"parameters": {"layers": ["_blocks.1.1"]}}) == "Grad-CAM"  # the paper's default, unrecorded
    assert _map_name({}) == "Grad-CAM"


def test_gallery_crops_are_filled_as_the_profiles_were_scored(plate_and_profiles):
    # A store scored with a background-fill bundle records crop_fill; the gallery cuts its crops the same way.
    from gradcamo_dask.profiles.report import _gallery_examples

    root, profiles = plate_and_profiles
    prov = json.loads(profiles.attrs["provenance"])
    shown = {}
    for fill in ("zero", "background"):
        scored = profiles.copy()
        scored.attrs["provenance"] = json.dumps({**prov, "parameters": {**prov.get("parameters", {}),
                                                                        "crop_fill": fill}})
        rows, channel, check = _gallery_examples(scored, LAYERS[0], 4, "DNA", prov["plate_path"],
                                                 prov["labels_path"], SIZE)
        assert check["max_score_difference"] < 1e-4  # the maps and masks read back are the scored ones
        shown[fill] = [example["image"] for _, examples in rows for example in examples]
    differing = 0
    for zero, background in zip(shown["zero"], shown["background"]):
        changed = zero != background
        if changed.any():  # the window runs past the site: only the fill differs, one level over all of it
            differing += 1
            assert (zero[changed] == 0).all() and np.unique(background[changed]).size == 1
            assert background[changed][0] > 0
    assert differing >= 1 and differing < len(shown["zero"])
