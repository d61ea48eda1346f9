"""A tiny synthetic plate and an untrained model bundle for cluster tests (seconds on 2 cores)."""

from __future__ import annotations

from pathlib import Path


def write_tiny_plate_and_bundle(directory: Path, *, seed: int = 0, wells_per_treatment: int = 1,
                                sites: int = 2) -> dict[str, Path]:
    """``plate.zarr`` (2 wells x 2 sites by default, ~5 cells a site, ground-truth labels inside) and ``bundle/``.

    The bundle is an untrained EfficientNet-B0 3D with fixed seed at a small input grid:
    scores are not meaningful, but deterministic, which is all a cluster test compares.
    """
    from tests.helpers.plate_fixtures import CHANNELS, CLASSES, make_bundle, make_plate

    directory.mkdir(parents=True, exist_ok=True)
    plate_path = make_plate(directory / "plate.zarr", wells_per_treatment=wells_per_treatment, sites=sites,
                            site_shape=(8, 64, 64), cell_radius=9.0,
                            seed=seed, with_platemap=True, overwrite=True)
    bundle = make_bundle(directory / "bundle", seed=seed, channels=CHANNELS, classes=sorted(CLASSES),
                         crop_shape=(None, 32, 32), input_shape=(8, 32, 32), mean=0.5, std=0.25, layers=None,
                         lively_weights=False)
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

    @pytest.fixture(scope="session")
    def scored_tiny(tmp_path_factory):
        """:func:`tests.helpers.plate_fixtures.scored_tiny_plate`, made once for the pipeline and cluster tests
        (read-only for them: they write their own stores under ``tmp_path``)."""
        from tests.helpers.plate_fixtures import scored_tiny_plate

        return scored_tiny_plate(tmp_path_factory.mktemp("scored-tiny"))
except ImportError:  # pragma: no cover - only tests import this module
    pass
