"""Whitening fit on control cells: ZCA / PCA and their correlation forms, regularisation, bad input."""

from __future__ import annotations

import json
import warnings

import dask.array as da
import numpy as np
import pandas as pd
import pytest

from gradcamo_dask import InputError, apply_whitening, fit_whitening
from tests.helpers.feature_profiles import make_profiles, synthetic_cells

# Tolerance for "covariance ≈ I". With epsilon = 0, W = Σ^-1/2 exactly and the whitened
# controls' covariance is I to rounding (< 1e-6 here). With epsilon ε > 0 it is
# U diag(λ / (λ + ε)) Uᵀ, which deviates from I by at most ε / λ_min: checked as such.
TOL = 1e-4


def _correlated(n: int, p: int, seed: int = 0, scales=None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rotation, _ = np.linalg.qr(rng.normal(size=(p, p)))
    mixing = np.sqrt(np.geomspace(0.2, 5.0, p))[:, None] * rotation.T  # covariance eigenvalues 0.2 .. 5
    x = rng.normal(size=(n, p)) @ mixing + rng.normal(size=p) * 5
    if scales is not None:
        x = x * np.asarray(scales)
    return x


@pytest.mark.parametrize("method", ["ZCA", "PCA", "ZCA-cor", "PCA-cor"])
def test_whitened_controls_have_identity_covariance(method):
    x = _correlated(3000, 12, scales=np.geomspace(0.1, 100, 12))  # very different feature scales
    controls = np.zeros(len(x), bool)
    controls[:2000] = True
    exact = fit_whitening(x, controls=controls, method=method, epsilon=0.0)
    cov = np.cov(apply_whitening(exact, x)[controls], rowvar=False)
    assert np.abs(cov - np.eye(12)).max() < 1e-6  # rounding; the covariance has condition number ~1e8
    w = fit_whitening(x, controls=controls, method=method)  # default epsilon 1e-6
    y = apply_whitening(w, x)
    cov = np.cov(y[controls], rowvar=False)
    bound = w.epsilon / w.eigenvalues.min()
    assert np.abs(cov - np.eye(12)).max() <= bound * 1.01 + 1e-10
    if method.endswith("-cor"):  # correlation eigenvalues are O(1): the default epsilon is negligible
        assert np.abs(cov - np.eye(12)).max() < TOL
    assert np.abs(y[controls].mean(axis=0)).max() < 1e-8
    # the raw covariance was far from I (the test could fail)
    assert np.abs(np.cov(x[controls], rowvar=False) - np.eye(12)).max() > 10
    # W^T W = Σ^-1 for every form (on the standardised scale for -cor)
    z = (x[controls] - exact.mean) / exact.scale
    sigma = np.cov(z, rowvar=False)
    np.testing.assert_allclose(exact.matrix.T @ exact.matrix, np.linalg.inv(sigma), rtol=1e-6, atol=1e-10)
    assert not w.regularised and w.n_controls == 2000


def test_zca_is_symmetric_and_pca_ranks_components():
    x = _correlated(1500, 6, seed=1)
    zca = fit_whitening(x, controls=np.ones(len(x), bool), method="ZCA")
    np.testing.assert_allclose(zca.matrix, zca.matrix.T, atol=1e-10)
    pca = fit_whitening(x, controls=np.ones(len(x), bool), method="PCA", n_components=3)
    assert pca.matrix.shape == (3, 6) and pca.output_names == ["PCA_0", "PCA_1", "PCA_2"]
    assert (np.diff(pca.eigenvalues) <= 0).all()
    y = apply_whitening(pca, x)
    assert y.shape == (1500, 3)
    np.testing.assert_allclose(np.cov(y, rowvar=False), np.eye(3), atol=TOL)
    # ZCA-cor keeps whitened features closest to the standardised originals (Kessy et al.):
    # each whitened feature correlates more with its own original than PCA-cor's component i does
    zcor = apply_whitening(fit_whitening(x, controls=np.ones(len(x), bool), method="ZCA-cor"), x)
    own = [np.corrcoef(zcor[:, j], x[:, j])[0, 1] for j in range(6)]
    assert min(own) > 0.3


def test_profiles_dataset_uses_is_control_and_stays_lazy():
    ds = make_profiles(synthetic_cells(n_wells=4, sites=2, cells_per_site=30))  # 120 controls, 32 features
    w = fit_whitening(ds)  # controls from the is_control coord
    assert w.n_controls == int(ds["is_control"].sum()) == 120 and w.variable == "deep"
    lazy = ds.copy()
    lazy["deep"] = lazy["deep"].chunk({"cell": 50})
    out = apply_whitening(w, lazy)
    assert isinstance(out["deep"].data, da.Array)  # lazy in, lazy out
    white = out["deep"].values
    assert white.dtype == np.float32 and white.shape == ds["deep"].shape
    controls = ds["is_control"].values
    deviation = np.abs(np.cov(white[controls], rowvar=False) - np.eye(white.shape[1])).max()
    assert deviation <= w.epsilon / w.eigenvalues.min() + 1e-4  # epsilon's share, plus float32 storage
    assert list(out["feature"].values) == list(ds["feature"].values)  # ZCA keeps names and feature coords
    assert list(out["feature_layer"].values) == list(ds["feature_layer"].values)
    assert json.loads(out.attrs["whitening"])["method"] == "ZCA"
    assert "gradcamo" in out and out["treatment"].values.tolist() == ds["treatment"].values.tolist()
    # treated cells moved away from the controls along the treatment axis
    treated = ds["dose"].values == 10
    assert np.linalg.norm(white[treated].mean(0)) > 3 * np.linalg.norm(white[controls].mean(0))
    pca = apply_whitening(fit_whitening(ds, method="PCA", n_components=5), ds)
    assert pca["deep"].shape == (len(ds["cell"]), 5)
    assert list(pca["feature"].values) == [f"PCA_{i}" for i in range(5)]
    assert list(pca["feature_layer"].values) == ["PCA"] * 5
    # by treatment name
    assert fit_whitening(ds, controls="control").n_controls == 120


def test_dataframe_of_cellprofiler_columns():
    x = _correlated(800, 4, seed=2)
    frame = pd.DataFrame(x, columns=[f"Cells_F_{i}" for i in range(4)])
    frame.insert(0, "Metadata_Well", ["B02"] * 800)
    frame["Metadata_is_control"] = np.arange(800) < 500
    w = fit_whitening(frame, method="PCA-cor")
    out = apply_whitening(w, frame)
    assert list(out.columns) == ["Metadata_Well", "Cells_PCAcor_0", "Cells_PCAcor_1", "Cells_PCAcor_2",
                                 "Cells_PCAcor_3", "Metadata_is_control"]
    values = out.filter(like="Cells_").to_numpy()
    np.testing.assert_allclose(np.cov(values[:500], rowvar=False), np.eye(4), atol=TOL)


def test_no_controls_is_a_clear_error():
    x = _correlated(100, 3)
    with pytest.raises(InputError, match="no control cells"):
        fit_whitening(x, controls=np.zeros(100, bool))
    with pytest.raises(InputError, match="controls="):
        fit_whitening(x)  # an array carries no is_control flags
    ds = make_profiles(synthetic_cells(n_wells=4, cells_per_site=3))
    ds = ds.assign_coords(is_control=("cell", np.zeros(ds.sizes["cell"], bool)))
    with pytest.raises(InputError, match="no control cells among the 24 cells"):
        fit_whitening(ds)
    with pytest.raises(InputError, match="no cell has treatment 'DMSO'"):
        fit_whitening(ds, controls="DMSO")
    with pytest.raises(InputError, match="at least 2"):
        fit_whitening(x, controls=np.arange(100) == 3)
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(InputError, match="NaN or inf"):
        fit_whitening(bad, controls=np.ones(100, bool))
    with pytest.raises(InputError, match="method"):
        fit_whitening(x, controls=np.ones(100, bool), method="cholesky")


def test_fewer_controls_than_features_is_regularised_with_a_warning_or_refused():
    x = _correlated(300, 40, seed=3)
    controls = np.arange(300) < 25  # 25 controls, 40 features: singular covariance
    with pytest.warns(UserWarning, match="25 control cells for 40 features.*Ledoit-Wolf"):
        w = fit_whitening(x, controls=controls)
    assert w.regularised and 0 < w.shrinkage <= 1
    y = apply_whitening(w, x)
    assert np.isfinite(y).all()
    # shrunk: the controls' whitened covariance has eigenvalues in (0, 1/(1 - α)], not blown up by 1/sqrt(ε)
    eig = np.linalg.eigvalsh(np.cov(y[controls], rowvar=False))
    assert eig.max() <= 1 / (1 - w.shrinkage) + 1e-6 and eig.max() < 50
    with pytest.raises(InputError, match="singular.*shrinkage='auto'"):
        fit_whitening(x, controls=controls, shrinkage=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        explicit = fit_whitening(x, controls=controls, shrinkage="auto")  # asked for: no warning
    assert explicit.shrinkage == pytest.approx(w.shrinkage)


def test_constant_control_features_are_dropped_with_a_warning():
    x = _correlated(400, 5, seed=4)
    x[:, 2] = 7.0  # constant among the controls
    x[300:, 2] = 9.0  # ... but not for treated cells: scaling it would explode
    controls = np.arange(400) < 300
    with pytest.warns(UserWarning, match="1 of 5 features are constant"):
        w = fit_whitening(x, controls=controls)
    assert w.feature_names == ["feature_0", "feature_1", "feature_3", "feature_4"]
    y = apply_whitening(w, x)
    assert y.shape == (400, 4) and np.abs(y).max() < 100


def test_whitening_a_zarr_v3_store_with_text_coords(tmp_path):
    """Zarr v3 stores read text coords back as NumPy StringDType; copying them used to crash Python
    (segmentation fault), so this runs in a child process and checks it exits cleanly."""
    import subprocess
    import sys

    from tests.helpers.paths import REPO

    script = f"""
import numpy as np, xarray as xr
import gradcamo_dask as gd
from tests.helpers.feature_profiles import make_profiles, synthetic_cells
p = make_profiles(synthetic_cells())
text = np.dtypes.StringDType()
p = p.assign_coords({{k: (c.dims, c.values.astype(text)) for k, c in p.coords.items() if c.dtype.kind in "UO"}})
p.to_zarr({str(tmp_path / "p.zarr")!r}, mode="w", zarr_format=3)
stored = gd.open_profiles({str(tmp_path / "p.zarr")!r})
assert stored["feature"].dtype.kind == "T"
white = gd.apply_whitening(gd.fit_whitening(stored, method="ZCA"), stored)
print("whitened", white["deep"].shape, white["treatment"].dtype)
"""
    run = subprocess.run([sys.executable, "-W", "ignore", "-c", script], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "whitened (120, 32) object" in run.stdout
