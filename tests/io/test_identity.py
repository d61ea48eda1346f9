"""Input identity: changes with any rewritten chunk, not with reading; costs no pixel reads."""

from __future__ import annotations

import shutil
import time

import dask
import numpy as np
import zarr

from gradcamo_dask.io.identity import input_identity
from gradcamo_dask.io.plate import open_labels, open_plate
from gradcamo_dask.jobs.score import score_plate
from gradcamo_dask.profiles.store import profiles_fingerprint
from tests.helpers.plate_fixtures import make_bundle, make_plate


def test_identity_follows_the_files_and_ignores_reads(tmp_path):
    plate = make_plate(tmp_path / "plate.zarr")
    first = input_identity(plate)
    np.asarray(open_plate(plate).data[0, 0])  # reading changes nothing
    assert input_identity(str(plate)) == first == input_identity(f"file://{plate}")
    kept = shutil.copytree(plate, tmp_path / "kept.zarr")  # copy2 keeps modification times: the same input
    assert input_identity(kept) == first
    fresh = shutil.copytree(plate, tmp_path / "fresh.zarr", copy_function=shutil.copy)  # new times: not trusted
    assert input_identity(fresh) != first
    time.sleep(0.01)
    array = zarr.open_group(plate / "B" / "2" / "1", mode="r+")["0"]
    array[0] = np.asarray(array[0])  # same bytes rewritten: still a write, so another identity
    assert input_identity(plate) != first
    assert input_identity(None) is None and input_identity(None, "array-abc") == "dask:array-abc"


def test_fingerprint_sees_pixels_but_not_batch_size(tmp_path):
    plate = make_plate(tmp_path / "plate.zarr")
    bundle = make_bundle(tmp_path / "bundle")
    image = open_plate(plate)
    labels = open_labels(plate, like=image)
    with dask.config.set(scheduler="synchronous"):
        ds8 = score_plate(image, labels, bundle, batch_size=8, plate_path=str(plate), labels_path=str(plate))
        ds2 = score_plate(image, labels, bundle, batch_size=2, check_classes=False, plate_path=str(plate),
                          labels_path=str(plate))
        assert profiles_fingerprint(ds8) == profiles_fingerprint(ds2)
        array = zarr.open_group(plate / "B" / "2" / "0", mode="r+")["0"]
        array[0] = np.asarray(array[0]) // 2  # other pixels; same names, labels, cells
        moved = score_plate(open_plate(plate), labels, bundle, plate_path=str(plate), labels_path=str(plate))
        assert moved.sizes["cell"] == ds8.sizes["cell"]
        np.testing.assert_array_equal(moved["object_number"].values, ds8["object_number"].values)
        assert profiles_fingerprint(moved) != profiles_fingerprint(ds8)
