"""Fine-tuning: a training run that starts from a model bundle's weights.

A run with ``Recipe(init_from=BUNDLE)`` loads the bundle's weights into the freshly
built network and keeps the bundle's normalisation (the weights were learned on
inputs scaled that way), then trains as usual with a fresh optimiser. Use it to
regularise a converged model (``regularizer > 0`` after a plain run) or to adapt a
model to another plate with the same channels and classes. The bundle is only read.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from gradcamo_dask.errors import BundleMismatchError

__all__ = ["load_start_weights"]


def load_start_weights(bundle_path: str | Path, model: nn.Module, channels: list[str], classes: list[str],
                       intensity_scaling: str) -> tuple[dict, str]:
    """Copy a bundle's weights into ``model``; returns the bundle's normalisation and its hash.

    Parameters
    ----------
    bundle_path : path
        A bundle written by ``gradcamo-dask train`` (or :func:`~gradcamo_dask.write_bundle`).
    model : nn.Module
        The run's network, built from the recipe; its tensors must have the bundle's names and shapes.
    channels, classes : list of str
        The run's channels and classes, which must equal the bundle's in order (the first
        convolution reads channels by position, the head scores classes by position).
    intensity_scaling : {"crop", "plate"}
        The recipe's; must be the one the bundle was trained with.

    Raises
    ------
    BundleMismatchError
        Other channels, classes, intensity scaling or tensor shapes than the bundle's.
    """
    from gradcamo_dask.engine.bundles import open_bundle

    bundle = open_bundle(bundle_path)
    config = bundle.config
    bundle.check_fits(channels=channels)
    if list(config.classes) != list(classes):
        raise BundleMismatchError(f"init_from bundle {bundle_path} scores classes {list(config.classes)}, this run "
                                  f"trains {list(classes)}; the head reads classes by position, so they must be "
                                  "equal and in the same order")
    bundle_scaling = "plate" if "low" in config.normalization else "crop"
    if bundle_scaling != intensity_scaling:
        raise BundleMismatchError(f"init_from bundle {bundle_path} was trained with intensity_scaling="
                                  f"{bundle_scaling!r}, this recipe has {intensity_scaling!r}; use the bundle's")
    try:
        model.load_state_dict(bundle.model.state_dict())
    except RuntimeError as err:  # torch names each tensor whose name or shape differs
        raise BundleMismatchError(f"init_from bundle {bundle_path} does not fit this recipe's network "
                                  f"(architecture or model_options differ): {str(err)[:400]}") from None
    return dict(config.normalization), bundle.hash
