"""Whitening (sphering) of profiles, fit on control cells: ZCA, PCA and their correlation forms.

The paper whitens deep features with ``W = Σ^-1/2`` estimated on control cells before
UMAP and downstream comparisons. With ``Σ = U Λ Uᵀ`` the eigendecomposition
of the controls' covariance (or correlation) matrix and ``ε`` a small ``epsilon``:

* ``"ZCA"``:     ``W = U (Λ + εI)^-1/2 Uᵀ`` on centred features (Mahalanobis / ZCA:
  the whitened features stay as close as possible to the original ones, names kept);
* ``"PCA"``:     ``W = (Λ + εI)^-1/2 Uᵀ`` (principal components scaled to unit variance,
  largest first; ``n_components`` truncates);
* ``"ZCA-cor"``, ``"PCA-cor"``: the same on features first standardised by the
  controls' standard deviation, i.e. from the correlation matrix (Kessy, Lewin and
  Strimmer 2018, "Optimal whitening and decorrelation").

Written with NumPy's ``eigh`` rather than taken from pycytominer: its ``Spherize`` in
releases up to 1.6.1 does not whiten (pycytominer issue #747), and we want the fitted
transform as an object that can be applied to any cells (all wells, other plates) and
to lazy xarray profiles.

Regularisation: when there are not more control cells than features, the sample
covariance is singular and ``Σ^-1/2`` is not defined by the data. Then, unless
``shrinkage`` says otherwise, the covariance is shrunk towards a scaled identity with
the Ledoit-Wolf optimal intensity (``Σ_s = (1 - α) Σ + α (tr Σ / p) I``, α from
scikit-learn's ``ledoit_wolf_shrinkage``) and a warning says so; the whitened controls
then have covariance ``Σ_s^-1/2 Σ Σ_s^-1/2`` (eigenvalues below 1), not exactly I.
``shrinkage=0`` refuses such data with an error instead. Features that are constant
among the controls cannot be scaled and are left out of the whitened output (with a
warning naming how many).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from gradcamo_dask.errors import InputError
from gradcamo_dask.profiles.export import str_values

__all__ = ["METHODS", "Whitening", "apply_whitening", "fit_whitening"]

METHODS = ("ZCA", "PCA", "ZCA-cor", "PCA-cor")
_CP_COMPARTMENTS = ("Cells_", "Nuclei_", "Cytoplasm_")


@dataclass
class Whitening:
    """A whitening transform fit on control cells: ``y = W ((x - mean) / scale)``.

    Attributes
    ----------
    method : str
        One of ``"ZCA", "PCA", "ZCA-cor", "PCA-cor"``.
    mean, scale : ndarray (p,)
        Controls' mean and, for the ``-cor`` forms, standard deviation (else 1), of
        the ``p`` features used.
    matrix : ndarray (k, p)
        ``W``; ``k = p`` except for a truncated PCA.
    eigenvalues : ndarray (p,)
        Eigenvalues of the (shrunk) covariance or correlation matrix, largest first.
    epsilon : float
        Added to the eigenvalues before the inverse square root.
    shrinkage : float
        Ledoit-Wolf intensity used (0 = none).
    n_controls : int
        Control cells the transform was fit on.
    feature_names : list of str
        The input features used, in order (constant ones left out).
    output_names : list of str
        Names of the whitened features (the input names for ZCA; ``<method>_<i>`` for PCA).
    dropped_features : list of str
        Input features left out because they are constant among the controls.
    variable : str or None
        The Dataset variable it was fit on (``"deep"``) when fit on xarray profiles.
    """

    method: str
    mean: np.ndarray
    scale: np.ndarray
    matrix: np.ndarray
    eigenvalues: np.ndarray
    epsilon: float
    shrinkage: float
    n_controls: int
    feature_names: list[str]
    output_names: list[str]
    dropped_features: list[str] = field(default_factory=list)
    variable: str | None = None

    @property
    def regularised(self) -> bool:
        """True when the covariance was shrunk (fewer controls than features, or asked)."""
        return self.shrinkage > 0

    def summary(self) -> dict[str, Any]:
        """JSON-ready description (no matrices): method, epsilon, shrinkage, counts."""
        return {
            "method": self.method, "epsilon": self.epsilon, "shrinkage": self.shrinkage,
            "regularised": self.regularised, "n_controls": self.n_controls,
            "n_features_in": len(self.feature_names) + len(self.dropped_features),
            "n_features_out": len(self.output_names), "n_dropped_constant": len(self.dropped_features),
            "variable": self.variable,
        }

    def transform_array(self, x: Any) -> Any:
        """Whiten a ``(n, p)`` NumPy or Dask array of the fitted features (in order)."""
        if x.shape[-1] != self.mean.shape[0]:
            raise InputError(f"the whitening was fit on {self.mean.shape[0]} features, the data have {x.shape[-1]}")
        z = (x - self.mean) / self.scale
        return z @ self.matrix.T

    def __call__(self, data: Any) -> Any:
        return apply_whitening(self, data)


# ----------------------------------------------------------------- inputs


def _dataframe_features(frame: pd.DataFrame) -> list[str]:
    cp = [c for c in frame.columns if str(c).startswith(_CP_COMPARTMENTS)]
    if cp:
        return cp
    skip = {"is_control", "dose", "site", "object_number"}
    return [c for c in frame.columns if pd.api.types.is_numeric_dtype(frame[c]) and not pd.api.types.is_bool_dtype(frame[c])
            and not str(c).startswith("Metadata_") and c not in skip]


def _default_controls(data: Any) -> Any:
    if isinstance(data, (xr.Dataset, xr.DataArray)):
        if "is_control" in data.coords:
            return np.asarray(data["is_control"].values, dtype=bool)
        return None
    if isinstance(data, pd.DataFrame):
        for col in ("is_control", "Metadata_is_control"):
            if col in data.columns:
                return data[col].astype(bool).to_numpy()
    return None


def _treatments(data: Any) -> np.ndarray | None:
    if isinstance(data, (xr.Dataset, xr.DataArray)) and "treatment" in data.coords:
        return str_values(data["treatment"].values)
    if isinstance(data, pd.DataFrame):
        for col in ("treatment", "Metadata_treatment", "Metadata_Treatment"):
            if col in data.columns:
                return str_values(data[col].to_numpy())
    return None


def _features_of(data: Any, variable: str, features: Sequence[str] | None) -> tuple[Any, list[str]]:
    """``(matrix (n, p) NumPy or Dask, feature names)``."""
    if isinstance(data, xr.Dataset):
        if variable not in data:
            raise InputError(f"the profiles have no variable {variable!r} (they have {list(data.data_vars)}); "
                             f"pass variable=... ")
        data = data[variable]
    if isinstance(data, xr.DataArray):
        if data.ndim != 2:
            raise InputError(f"{data.name or 'the array'} must be 2D (cell, feature), got dims {data.dims}")
        feature_dim = data.dims[1]
        names = [str(v) for v in data[feature_dim].values] if feature_dim in data.coords else \
            [f"feature_{i}" for i in range(data.shape[1])]
        return data.data, names
    if isinstance(data, pd.DataFrame):
        cols = list(features) if features is not None else _dataframe_features(data)
        missing = [c for c in cols if c not in data.columns]
        if missing or not cols:
            raise InputError(f"feature columns {missing or '(none found)'} are not in the table; pass features=[...]")
        return data[cols].to_numpy(dtype=np.float64), [str(c) for c in cols]
    array = np.asarray(data)
    if array.ndim != 2:
        raise InputError(f"profiles must be a 2D array (cell, feature), got shape {array.shape}")
    return array, [f"feature_{i}" for i in range(array.shape[1])]


def _control_mask(data: Any, controls: Any, n: int) -> np.ndarray:
    if controls is None:
        controls = _default_controls(data)
        if controls is None:
            raise InputError("no control cells given: pass controls= (a boolean per cell, or a treatment name); "
                             "profiles datasets use their `is_control` coord and tables an `is_control` column")
    elif isinstance(controls, str):
        treatments = _treatments(data)
        if treatments is None:
            raise InputError(f"controls={controls!r} names a treatment, but the data carry no treatment labels; "
                             f"pass a boolean per cell instead")
        if controls not in set(treatments):
            raise InputError(f"no cell has treatment {controls!r}; treatments present: {sorted(set(treatments))}")
        controls = treatments == controls
    mask = np.asarray(controls)
    if mask.dtype != bool or mask.shape != (n,):
        raise InputError(f"controls must be one boolean per cell ({n} cells), got dtype {mask.dtype} shape {mask.shape}")
    return mask


# -------------------------------------------------------------------- fit


def fit_whitening(
    profiles: Any,
    controls: Any = None,
    method: str = "ZCA",
    epsilon: float = 1e-6,
    *,
    variable: str = "deep",
    features: Sequence[str] | None = None,
    shrinkage: float | str | None = None,
    n_components: int | None = None,
) -> Whitening:
    """Fit a whitening transform ``W = Σ^-1/2`` on control cells.

    Parameters
    ----------
    profiles : xarray.Dataset, xarray.DataArray, pandas.DataFrame or array (cell, feature)
        Profiles (variable ``variable`` of a Dataset, e.g. ``"deep"`` or ``"classic"``),
        a table (CellProfiler-style ``Cells_*`` columns, or ``features``), or a matrix.
    controls : bool array (cell,), str or None
        Which cells are controls: one boolean per cell, or a treatment name (matched
        against the ``treatment`` coord or column). Default: the ``is_control`` coord of
        profiles, or the ``is_control`` / ``Metadata_is_control`` column of a table.
    method : "ZCA", "PCA", "ZCA-cor" or "PCA-cor"
        See the module notes.
    epsilon : float
        Added to every eigenvalue before ``^-1/2`` (guards tiny eigenvalues).
    variable : str
        Dataset variable to whiten.
    features : list of str, optional
        Table columns to whiten (default: ``Cells_*``/``Nuclei_*``/``Cytoplasm_*``
        columns, else every numeric column that is not metadata).
    shrinkage : None, "auto" or float in [0, 1]
        Ledoit-Wolf shrinkage of the covariance. None: none when there are more
        control cells than features, else "auto" with a warning. 0: never (fewer
        controls than features is then an error).
    n_components : int, optional
        PCA forms only: keep the first ``n_components`` components.

    Returns
    -------
    Whitening

    Raises
    ------
    InputError
        No control cells, fewer than 2, NaN or inf among the controls' features, an
        unknown method, or (with ``shrinkage=0``) fewer control cells than features.
    """
    if method not in METHODS:
        raise InputError(f"method must be one of {list(METHODS)}, got {method!r}")
    if not epsilon >= 0:
        raise InputError(f"epsilon must be >= 0, got {epsilon}")
    x, names = _control_rows(profiles, controls, variable, features)
    n_controls = x.shape[0]
    centred, mean, std, kept_names, dropped = _without_constant_features(x, names)
    p_kept = len(kept_names)
    scale = std if method.endswith("-cor") else np.ones_like(std)
    z = centred / scale
    cov = z.T @ z / (n_controls - 1)

    alpha = _shrinkage(shrinkage, z, n_controls, p_kept)
    if alpha > 0:
        mu = np.trace(cov) / p_kept
        cov = (1 - alpha) * cov + alpha * mu * np.eye(p_kept)
    eigenvalues, vectors = _signed_eigenbasis(cov)
    if not (eigenvalues + epsilon > 0).all():
        raise InputError(f"the control covariance has zero eigenvalues and epsilon is 0; use epsilon > 0 or "
                         f"shrinkage='auto' ({n_controls} control cells, {p_kept} features)")
    w, out_names = _whitening_matrix(method, eigenvalues, vectors, epsilon, n_components, kept_names)
    return Whitening(method=method, mean=mean, scale=scale, matrix=w, eigenvalues=eigenvalues,
                     epsilon=float(epsilon), shrinkage=float(alpha), n_controls=n_controls,
                     feature_names=kept_names, output_names=out_names, dropped_features=dropped,
                     variable=variable if isinstance(profiles, xr.Dataset) else None)


def _control_rows(profiles: Any, controls: Any, variable: str,
                  features: Sequence[str] | None) -> tuple[np.ndarray, list[str]]:
    """The control cells' features as a float64 ``(n_controls, p)`` matrix (only those rows of a lazy
    array are computed) and the feature names; at least 2 controls, all finite, or :class:`InputError`."""
    matrix, names = _features_of(profiles, variable, features)
    n = int(matrix.shape[0])
    mask = _control_mask(profiles, controls, n)
    n_controls = int(mask.sum())
    if n_controls == 0:
        raise InputError(f"there are no control cells among the {n} cells; whitening is fit on controls: check "
                         f"controls= / the is_control flags (the platemap's control wells)")
    if n_controls < 2:
        raise InputError(f"only {n_controls} control cell: at least 2 are needed to estimate a covariance")
    x = np.asarray(matrix[np.flatnonzero(mask)], dtype=np.float64)  # computes a lazy array's control rows only
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise InputError(f"{int(bad.sum())} of {n_controls} control cells have NaN or inf features; drop or impute "
                         f"them (or the features) before whitening")
    return x, names


def _without_constant_features(x: np.ndarray, names: list[str]) -> tuple:
    """``(centred, mean, std, kept_names, dropped_names)`` of the controls ``x`` (n_controls, p) after
    leaving out the features constant among them (with a warning); all constant is an InputError."""
    mean = x.mean(axis=0)
    centred = x - mean
    std = centred.std(axis=0, ddof=1)
    constant = std <= 1e-12 * max(float(std.max(initial=0.0)), 1e-300)
    if constant.all():
        raise InputError("every feature is constant among the control cells; nothing to whiten")
    dropped = [names[j] for j in np.flatnonzero(constant)]
    if dropped:  # stacklevel 3: the warning points at fit_whitening's caller
        warnings.warn(f"{len(dropped)} of {x.shape[1]} features are constant among the {x.shape[0]} control cells "
                      f"and are left out of the whitened output (e.g. {dropped[:3]})", UserWarning, stacklevel=3)
    keep = ~constant
    kept_names = [nm for nm, k in zip(names, keep) if k]
    return centred[:, keep], mean[keep], std[keep], kept_names, dropped


def _signed_eigenbasis(cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues of ``cov`` (p, p) in decreasing order, clipped at 0, and their eigenvectors as
    columns, each signed so that its largest entry is positive (a deterministic basis)."""
    eigenvalues, vectors = np.linalg.eigh(cov)
    order = np.argsort(eigenvalues)[::-1]
    eigenvalues, vectors = np.clip(eigenvalues[order], 0.0, None), vectors[:, order]
    signs = np.sign(vectors[np.argmax(np.abs(vectors), axis=0), np.arange(vectors.shape[1])])
    return eigenvalues, vectors * np.where(signs == 0, 1.0, signs)


def _whitening_matrix(method: str, eigenvalues: np.ndarray, vectors: np.ndarray, epsilon: float,
                      n_components: int | None, kept_names: list[str]) -> tuple[np.ndarray, list[str]]:
    """``W`` (out, p) and the output feature names: ``V diag(λ+ε)^-1/2 V^T`` for ZCA (names kept), the
    first ``n_components`` rows of ``diag(λ+ε)^-1/2 V^T`` for PCA (named ``PCA_<i>``/``PCAcor_<i>``)."""
    p_kept = len(kept_names)
    inv_sqrt = 1.0 / np.sqrt(eigenvalues + epsilon)
    if method.startswith("PCA"):
        k = p_kept if n_components is None else int(n_components)
        if not 1 <= k <= p_kept:
            raise InputError(f"n_components must be in [1, {p_kept}], got {n_components}")
        tag = method.replace("-", "")
        return inv_sqrt[:k, None] * vectors[:, :k].T, [f"{tag}_{i}" for i in range(k)]
    if n_components is not None:
        raise InputError("n_components applies to the PCA forms only; ZCA keeps every feature")
    return (vectors * inv_sqrt) @ vectors.T, list(kept_names)


def _shrinkage(shrinkage: float | str | None, z: np.ndarray, n_controls: int, p: int) -> float:
    underdetermined = n_controls <= p
    if shrinkage is None:
        if not underdetermined:
            return 0.0
        alpha = _ledoit_wolf(z)
        warnings.warn(
            f"{n_controls} control cells for {p} features: the covariance is singular, so it is regularised by "
            f"Ledoit-Wolf shrinkage towards a scaled identity (intensity {alpha:.3g}); the whitened controls' "
            f"covariance is then close to, not exactly, the identity. Pass shrinkage=0 to refuse instead, or "
            f"use more control cells / fewer features", UserWarning, stacklevel=3)
        return alpha
    if isinstance(shrinkage, str):
        if shrinkage != "auto":
            raise InputError(f"shrinkage must be None, 'auto' or a number in [0, 1], got {shrinkage!r}")
        return _ledoit_wolf(z)
    alpha = float(shrinkage)
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"shrinkage must be in [0, 1], got {shrinkage}")
    if alpha == 0.0 and underdetermined:
        raise InputError(
            f"{n_controls} control cells for {p} features: the covariance is singular (rank < {p}) and cannot be "
            f"whitened without regularisation; use shrinkage='auto' (Ledoit-Wolf), more control cells, or fewer "
            f"features (e.g. PCA first, or the classic features after feature selection)")
    return alpha


def _ledoit_wolf(z: np.ndarray) -> float:
    from sklearn.covariance import ledoit_wolf_shrinkage

    return float(ledoit_wolf_shrinkage(z, assume_centered=True))


# ------------------------------------------------------------------ apply


def _compartment_prefix(names: Sequence[str]) -> str:
    prefixes = {n.split("_", 1)[0] for n in names}
    if len(prefixes) == 1 and f"{next(iter(prefixes))}_" in _CP_COMPARTMENTS:
        return f"{next(iter(prefixes))}_"
    return ""


def apply_whitening(whitening: Whitening, profiles: Any, *, variable: str | None = None) -> Any:
    """Whiten profiles (any cells, not only the controls) with a fitted transform.

    Parameters
    ----------
    whitening : Whitening
        From :func:`fit_whitening`.
    profiles : xarray.Dataset, xarray.DataArray, pandas.DataFrame or array (cell, feature)
        The same kind of data it was fit on, with the fitted features.
    variable : str, optional
        Dataset variable (default: the one it was fit on, else ``"deep"``).

    Returns
    -------
    Same kind as ``profiles``
        Dataset: a copy whose ``variable`` holds the whitened features (lazy when the
        input is), with the feature coord replaced for PCA forms (``PCA_0``, ...;
        ``feature_layer`` = the method, ``feature_index`` = the component) and attr
        ``whitening`` (JSON summary). DataArray: likewise. Table: the fitted feature
        columns replaced by the whitened ones (PCA columns named
        ``<compartment>_<method>_<i>`` when the inputs share a CellProfiler
        compartment). Array: ``(cell, k)``.
    """
    if isinstance(profiles, (xr.Dataset, xr.DataArray)):
        profiles = _object_text_coords(profiles)
    if isinstance(profiles, xr.Dataset):
        var = variable or whitening.variable or "deep"
        if var not in profiles:
            raise InputError(f"the profiles have no variable {var!r}; they have {list(profiles.data_vars)}")
        out = profiles.copy()
        arr = _apply_dataarray(whitening, profiles[var])
        feature_dim = profiles[var].dims[1]
        drop = [name for name, c in profiles.coords.items() if feature_dim in c.dims]
        out = out.drop_vars([var, *drop])
        out[var] = arr
        out.attrs["whitening"] = json.dumps(whitening.summary())
        return out
    if isinstance(profiles, xr.DataArray):
        return _apply_dataarray(whitening, profiles)
    if isinstance(profiles, pd.DataFrame):
        missing = [c for c in whitening.feature_names if c not in profiles.columns]
        if missing:
            raise InputError(f"the table lacks {len(missing)} fitted feature columns, e.g. {missing[:3]}")
        values = whitening.transform_array(profiles[whitening.feature_names].to_numpy(dtype=np.float64))
        names = whitening.output_names
        if whitening.method.startswith("PCA"):
            prefix = _compartment_prefix(whitening.feature_names)
            names = [f"{prefix}{n}" for n in names]
        first = min(profiles.columns.get_loc(c) for c in whitening.feature_names)
        drop = set(whitening.feature_names) | set(whitening.dropped_features)
        before = [c for c in profiles.columns[:first] if c not in drop]
        after = [c for c in profiles.columns[first:] if c not in drop]
        whitened = pd.DataFrame(values, index=profiles.index, columns=names)
        return pd.concat([profiles[before], whitened, profiles[after]], axis=1)
    array = np.asarray(profiles, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] != len(whitening.feature_names) + len(whitening.dropped_features):
        raise InputError(f"profiles must be (cell, {len(whitening.feature_names) + len(whitening.dropped_features)}) "
                         f"as fitted, got shape {array.shape}")
    if whitening.dropped_features:
        keep = [i for i in range(array.shape[1]) if f"feature_{i}" not in set(whitening.dropped_features)]
        array = array[:, keep]
    return whitening.transform_array(array)


def _object_text_coords(data: Any) -> Any:
    """``data`` with text coords of NumPy's ``StringDType`` (how Zarr v3 stores read back) as object
    arrays: copying such coords crashes the interpreter under numpy 2.0."""
    text = {k: c.values.astype(object) for k, c in data.coords.items() if c.dtype.kind == "T"}
    if not text:
        return data
    return data.assign_coords({k: (data.coords[k].dims, v) for k, v in text.items()})


def _apply_dataarray(whitening: Whitening, arr: xr.DataArray) -> xr.DataArray:
    feature_dim = arr.dims[1]
    names = [str(v) for v in arr[feature_dim].values] if feature_dim in arr.coords else \
        [f"feature_{i}" for i in range(arr.shape[1])]
    index = {n: i for i, n in enumerate(names)}
    missing = [n for n in whitening.feature_names if n not in index]
    if missing:
        raise InputError(f"the profiles lack {len(missing)} fitted features, e.g. {missing[:3]}; apply the whitening "
                         f"to the same features it was fit on")
    cols = [index[n] for n in whitening.feature_names]
    data = arr.data[:, cols] if cols != list(range(arr.shape[1])) else arr.data
    values = whitening.transform_array(data.astype(np.float64))
    values = values.astype(arr.dtype) if np.issubdtype(arr.dtype, np.floating) else values
    cell_coords = {k: c for k, c in arr.coords.items() if feature_dim not in c.dims}
    coords: dict[str, Any] = dict(cell_coords)
    if whitening.method.startswith("PCA"):
        coords[feature_dim] = np.asarray(whitening.output_names, dtype=str)
        coords["feature_layer"] = (feature_dim, np.full(len(whitening.output_names), whitening.method.replace("-", "")))
        coords["feature_index"] = (feature_dim, np.arange(len(whitening.output_names)))
    else:
        coords[feature_dim] = arr[feature_dim].values[cols] if feature_dim in arr.coords else np.asarray(
            whitening.output_names)
        for k, c in arr.coords.items():
            if k != feature_dim and c.dims == (feature_dim,):
                coords[k] = (feature_dim, c.values[cols])
    out = xr.DataArray(values, dims=arr.dims, coords=coords, name=arr.name, attrs=dict(arr.attrs))
    out.attrs["whitening"] = json.dumps(whitening.summary())
    return out

