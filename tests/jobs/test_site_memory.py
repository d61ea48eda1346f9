"""Memory per site: scoring a site adds a few micro-batches to the site it is given, never a copy of the site.

Issue #15: a 2160 x 2160 site must be scored within bounded worker memory. The site
itself (uint16 image + int32 labels) is the worker's; what scoring allocates on top
of it (NumPy buffers, traced by :mod:`tracemalloc`) must stay a small fraction of the
site's raw bytes. Crops of the whole site in float32, or a float copy of the image,
would exceed the bound below (checked in the test, so the bound means something).
"""

from __future__ import annotations

import tracemalloc

import pytest

from gradcamo_dask.engine.bundles import open_bundle
from gradcamo_dask.io.virtual import VirtualPlate
from gradcamo_dask.jobs.score import score_site, score_site_group
from tests.helpers.plate_fixtures import CROP_SHAPE, make_bundle

#: Scoring may allocate at most this share of the site's raw bytes above the site (NumPy buffers).
BOUND = 0.5
BATCH = 2  # cells per micro-batch


@pytest.fixture(scope="module")
def site_setup(tmp_path_factory):
    path = make_bundle(tmp_path_factory.mktemp("site_memory") / "bundle")
    bundle = open_bundle(path)
    spec = {"bundle_path": str(path), "bundle_hash": bundle.hash, "layers": ["_head_swish"], "crop_size": CROP_SHAPE,
            "batch_size": BATCH, "target": "predicted", "plate": "virtual", "device": "cpu"}
    warm = VirtualPlate(n_wells=1, n_sites=1, shape_zyx=(5, 96, 96), seed=3)  # imports and model folding, once
    score_site(warm.site_image(0, 0), warm.site_labels(0, 0), _rows(warm), {**spec, "well": "A01", "site": 0})
    return spec


def _rows(plate: VirtualPlate, site: int = 0):
    table = plate.cell_table(size=CROP_SHAPE)
    return table[table["site"] == site][["object_number", "center_z", "center_y", "center_x"]].reset_index(drop=True)


def _traced_peak_above(func) -> int:
    """Peak bytes traced by :mod:`tracemalloc` while ``func()`` runs, above what was traced when it started."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        func()
        return tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()


def _float32_crops_bytes(n_cells: int, depth: int) -> int:
    """Bytes of all of a site's crops at once in float32 (6 channels)."""
    return n_cells * 6 * depth * CROP_SHAPE[1] * CROP_SHAPE[2] * 4


def test_scoring_a_site_allocates_a_bounded_share_of_its_raw_bytes(site_setup):
    plate = VirtualPlate(n_wells=1, n_sites=1, shape_zyx=(9, 384, 384), seed=1)
    image, labels, rows = plate.site_image(0, 0), plate.site_labels(0, 0), _rows(plate)
    raw = image.nbytes + labels.nbytes
    # the bound would catch a float copy of the image or all the site's crops at once
    assert image.size * 4 > BOUND * raw and _float32_crops_bytes(len(rows), 9) > BOUND * raw
    peak = _traced_peak_above(lambda: score_site(image, labels, rows, {**site_setup, "well": "A01", "site": 0}))
    assert peak < BOUND * raw, f"scoring allocated {peak / 2**20:.1f} MiB above a {raw / 2**20:.1f} MiB site"


def test_scoring_does_not_grow_with_the_site(site_setup):
    """Twice the width: the allocation above the site stays about the same (micro-batches), not 4x."""
    peaks = []
    for width in (192, 384):
        plate = VirtualPlate(n_wells=1, n_sites=1, shape_zyx=(9, width, width), seed=1)
        image, labels, rows = plate.site_image(0, 0), plate.site_labels(0, 0), _rows(plate)
        peaks.append(_traced_peak_above(
            lambda: score_site(image, labels, rows, {**site_setup, "well": "A01", "site": 0})))
    assert peaks[1] < 2 * peaks[0], f"peaks above the site at widths 192, 384: {peaks} bytes"


def test_a_group_of_sites_adds_no_copy_of_its_sites(site_setup):
    """Several sites per task, the next one cut ahead in a thread: still only micro-batches above the sites."""
    plate = VirtualPlate(n_wells=1, n_sites=2, shape_zyx=(9, 384, 384), seed=1)
    images = [plate.site_image(0, s) for s in range(2)]
    labels = [plate.site_labels(0, s) for s in range(2)]
    rows = [_rows(plate, s) for s in range(2)]
    specs = [{**site_setup, "well": "A01", "site": s} for s in range(2)]
    raw = images[0].nbytes + labels[0].nbytes  # one site's
    peak = _traced_peak_above(lambda: score_site_group(images, labels, rows, specs))
    assert peak < BOUND * raw, f"a group of 2 sites allocated {peak / 2**20:.1f} MiB above its sites"
