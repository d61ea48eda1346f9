"""A tiny synthetic plate and an untrained model bundle for cluster tests (seconds on 2 cores)."""

from __future__ import annotations

from pathlib import Path


def write_tiny_plate_and_bundle(directory: Path, *, seed: int = 0) -> dict[str, Path]:
    """``plate.zarr`` (2 wells x 2 sites, ground-truth labels inside) and ``bundle/``.

    The bundle is an untrained EfficientNet-B0 3D with fixed seed at a small input grid:
    scores are not meaningful, but deterministic, which is all a cluster test compares.
    """
    import torch

    from gradcamo_dask.engine.bundles import save_bundle
    from gradcamo_dask.engine.models import efficientnet3d
    from gradcamo_dask.io.plate import write_plate
    from gradcamo_dask.io.synthetic import synthetic_plate

    directory.mkdir(parents=True, exist_ok=True)
    plate = synthetic_plate(doses_um=(0.0, 10.0), wells_per_treatment=1, sites_per_well=2,
                            site_shape=(8, 64, 64), cell_radius=9.0, seed=seed, plate="tiny")
    plate_path = directory / "plate.zarr"
    write_plate(plate_path, plate.image, plate.labels, platemap=plate.platemap, overwrite=True)
    channels = [str(c) for c in plate.image["c"].values]
    classes = sorted(str(t) for t in plate.platemap["treatment"].unique())
    torch.manual_seed(seed)
    model = efficientnet3d(len(channels), len(classes), (8, 32, 32)).eval()
    bundle = save_bundle(directory / "bundle", model, channels=channels, classes=classes, crop_shape=(None, 32, 32),
                         input_shape=(8, 32, 32),
                         normalization={"mean": [0.5] * len(channels), "std": [0.25] * len(channels)})
    return {"plate": plate_path, "bundle": Path(bundle)}


def _tiny(tmp_path_factory) -> dict[str, Path]:
    from gradcamo_dask.jobs.score import score_plate
    from gradcamo_dask.profiles.store import write_profiles
    from gradcamo_dask.io.plate import open_labels, open_plate

    directory = tmp_path_factory.mktemp("tiny")
    paths = write_tiny_plate_and_bundle(directory)
    image = open_plate(paths["plate"])
    labels = open_labels(paths["plate"], like=image)
    paths["local"] = directory / "local.zarr"
    write_profiles(score_plate(image, labels, paths["bundle"]), paths["local"])
    return paths


try:
    import pytest

    @pytest.fixture(scope="session")
    def tiny_plate(tmp_path_factory):
        """Tiny plate, bundle, and its profiles scored locally (Dask threads, no cluster): ``local``."""
        return _tiny(tmp_path_factory)
except ImportError:  # pragma: no cover - only tests import this module
    pass
