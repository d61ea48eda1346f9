"""The layer sweep: score several layers of one model on the same cells in ONE explain
pass (one forward pass, one backward pass to all requested layers) and rank them by
mean Grad-CAMO, the paper's proposed use of Grad-CAMO for choosing the feature layer.

It composes the engine (:func:`~gradcamo_dask.engine.explain.explain`) and the
profiles QC (:func:`~gradcamo_dask.profiles.qc.rank_layer_scores`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd

from gradcamo_dask.engine.gradcamo import DEFAULT_CUTOFF
from gradcamo_dask.errors import InputError

__all__ = ["layer_sweep"]


def layer_sweep(
    model: Any,
    crops: Any,
    masks: Any,
    layers: Sequence[str] | None = None,
    *,
    cutoff: float = DEFAULT_CUTOFF,
    target: Any = "predicted",
    input_shape: Sequence[int] | None = None,
    normalization: dict | None = None,
    batch_size: int | None = None,
) -> pd.DataFrame:
    """Score several layers in ONE explain pass and rank them by mean Grad-CAMO.

    Parameters
    ----------
    model : torch.nn.Module or Bundle
        A CNN (crops must then be model-ready, i.e. normalised) or a model bundle
        (raw crops are normalised with its statistics; its input grid is used).
    crops : array (cell, c, z, y, x)
        Crops of the cells to sweep (a few hundred are plenty).
    masks : array (cell, z, y, x)
        Their central-cell masks.
    layers : list of str, optional
        Layers to compare; default: every spatial layer of the model
        (:func:`~gradcamo_dask.engine.layers.layer_grids`).
    cutoff : float
        On-target cut-off for ``share_on_target``.
    target, input_shape, batch_size
        As for :func:`~gradcamo_dask.engine.explain.explain`.
    normalization : dict, optional
        ``{"mean", "std"}`` to normalise raw crops with (a bundle's by default).

    Returns
    -------
    pandas.DataFrame
        One row per layer, best first: ``rank, layer, grid, n, mean, sd,
        share_on_target, n_undefined``.
    """
    from gradcamo_dask.engine.explain import explain
    from gradcamo_dask.engine.layers import layer_grids
    from gradcamo_dask.profiles.qc import check_cutoff, rank_layer_scores

    cutoff = check_cutoff(cutoff)
    bundle = model if hasattr(model, "model") and hasattr(model, "config") else None
    net = bundle.model if bundle is not None else model
    if bundle is not None:
        input_shape = input_shape or tuple(bundle.config.input_shape)
        normalization = normalization or dict(bundle.config.normalization)
    if normalization is not None:
        from gradcamo_dask.normalize import normalize_crops

        crops = normalize_crops(crops, normalization)
    layers = list(layer_grids(net, input_shape)) if layers is None else list(layers)
    if not layers:
        raise InputError("no layers to sweep; name them or use a model with spatial layers")
    result = explain(net, crops, masks, layers=layers, target=target, input_shape=input_shape,
                     batch_size=batch_size)
    return rank_layer_scores({name: result.gradcamo[name] for name in layers}, result.grids, cutoff)
