"""A tiny plate on disk and tiny model bundles, shared by the pipeline, cluster and CLI tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from gradcamo_dask.engine.bundles import write_bundle
from gradcamo_dask.engine.models import efficientnet3d
from gradcamo_dask.io.plate import open_labels, open_plate, write_plate
from gradcamo_dask.io.synthetic import synthetic_plate
from tests.helpers.engine_models import lively

CHANNELS = ["DNA", "ER", "RNA", "AGP", "Actin", "Mito"]
CLASSES = ["control", "compound_10uM"]
INPUT_SHAPE = (8, 32, 32)
CROP_SHAPE = (None, 48, 48)
LAYERS = ["_head_swish", "_blocks.4.10"]


def make_plate(path: Path, *, wells_per_treatment: int = 2, sites: int = 2, site_shape=(9, 96, 96),
               cell_radius: float = 12.0, seed: int = 0, with_platemap: bool = False, overwrite: bool = False) -> Path:
    """The tests' tiny plate on disk: control and 10 µM wells (default 2 replicates) x ``sites`` sites of
    ``site_shape`` voxels (default 9 x 96 x 96, ~7 cells per site), ground-truth labels inside."""
    plate = synthetic_plate(doses_um=(0.0, 10.0), wells_per_treatment=wells_per_treatment, sites_per_well=sites,
                            site_shape=site_shape, cell_radius=cell_radius, seed=seed, plate="tiny")
    write_plate(path, plate.image, plate.labels, platemap=plate.platemap if with_platemap else None,
                overwrite=overwrite)
    return path


def make_bundle(path: Path, *, seed: int = 0, channels=CHANNELS, classes=CLASSES, crop_shape=CROP_SHAPE,
                input_shape=INPUT_SHAPE, mean: float = 0.3, std: float = 0.2, layers=LAYERS,
                lively_weights: bool = True) -> Path:
    """The tests' tiny model bundle: EfficientNet-B0 3D seeded with ``seed`` (weights spread by
    :func:`lively` unless ``lively_weights=False``), normalisation ``mean``/``std`` for every channel."""
    torch.manual_seed(seed)
    model = efficientnet3d(len(channels), len(classes), input_shape)
    model = lively(model, seed=seed) if lively_weights else model.eval()
    return write_bundle(path, model, channels=channels, classes=classes, crop_shape=crop_shape,
                        input_shape=input_shape, normalization={"mean": [mean] * len(channels),
                                                                "std": [std] * len(channels)},
                        layers=layers)


def open_tiny(path: Path):
    image = open_plate(path)
    return image, open_labels(path, like=image)


def scored_tiny_plate(root: Path) -> dict:
    """The tiny plate and bundle written under ``root``, opened, and scored once on the sync scheduler:
    ``root``, ``plate``, ``bundle`` (paths), ``image``, ``labels`` and the computed ``reference`` profiles."""
    import dask

    from gradcamo_dask.jobs.score import score_plate

    plate = make_plate(root / "plate.zarr")
    bundle = make_bundle(root / "bundle")
    image, labels = open_tiny(plate)
    with dask.config.set(scheduler="sync"):
        reference = score_plate(image, labels, bundle).compute()
    return {"root": root, "plate": plate, "bundle": bundle, "image": image, "labels": labels, "reference": reference}


def strings(values) -> np.ndarray:
    """Any array of strings (NumPy str, object or StringDType as Zarr v3 gives back) as a NumPy str array."""
    return np.asarray([str(v) for v in np.asarray(values).ravel()], dtype=str)


def assert_same_profiles(a, b, atol: float = 0.0) -> None:
    """Same cells (keys, order) and the same values in every data variable."""
    for key in ("well", "site", "object_number"):
        np.testing.assert_array_equal(strings(a[key].values), strings(b[key].values))
    assert set(a.data_vars) == set(b.data_vars)
    for name in a.data_vars:
        x, y = np.asarray(a[name].values), np.asarray(b[name].values)
        assert x.shape == y.shape, name
        if atol:
            np.testing.assert_allclose(x, y, atol=atol, rtol=0, equal_nan=True, err_msg=name)
        else:
            np.testing.assert_array_equal(x, y, err_msg=name)


def slow_sites(seconds: float) -> None:
    """Run on each worker (``client.run``): every site task takes ``seconds`` longer, room to kill a worker
    mid-run. Lives here, importable as ``tests.plate_fixtures`` by separately started workers."""
    import time

    from gradcamo_dask.jobs import score as p

    real = getattr(p, "_real_score_site", p.score_site)
    p._real_score_site = real

    def slow(*args, **kwargs):
        time.sleep(seconds)
        return real(*args, **kwargs)

    p.score_site = slow


class SlowSites:
    """Worker plugin: :func:`slow_sites` on every worker, those that join later included (a replaced job).

    Register with ``client.register_plugin(as_worker_plugin(SlowSites(seconds)))``
    (:func:`gradcamo_dask.jobs.worker_plugins.as_worker_plugin`); importable by worker processes.
    """

    name = "tests-slow-sites"

    def __init__(self, seconds: float) -> None:
        self.seconds = float(seconds)

    def setup(self, worker) -> None:
        slow_sites(self.seconds)
