"""A vision transformer for single-cell crops, 2D or 3D: MONAI's ViT returning logits.

MONAI's :class:`monai.networks.nets.ViT` returns ``(logits, hidden states)`` and, by
default, puts a Tanh on the logits; :class:`VisionTransformer` wraps it so that it
returns plain logits ``(N, K)`` like every model of the engine, records its grids
and rebuilds from a JSON architecture (bundles). Its attention maps for Grad-CAMO
come from :mod:`gradcamo_dask.engine.attention`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.networks.nets import ViT
from torch import nn

from gradcamo_dask.errors import InputError

__all__ = ["VisionTransformer", "vit"]


def _per_axis(value: int | Sequence[int], dims: int, what: str) -> tuple[int, ...]:
    values = (int(value),) * dims if isinstance(value, (int, float)) else tuple(int(n) for n in value)
    if len(values) != dims or min(values) < 1:
        raise InputError(f"{what} must be one positive int or {dims} of them, got {value}")
    return values


class VisionTransformer(nn.Module):
    """MONAI ViT classifier on crops ``(N, C, [z,] y, x)`` at ``input_shape`` (see :func:`vit`).

    Attributes
    ----------
    vit : monai.networks.nets.ViT
        The network (``vit.blocks[i].attn`` are MONAI ``SABlock`` s).
    input_shape : tuple of int
        Model grid ``(z, y, x)`` or ``(y, x)`` in voxels.
    spatial_dims : int
        2 or 3.
    patch_grid : tuple of int
        Patches per axis: the grid of every attention map.
    default_cam_layer : str
        ``"cls_attention"``: the default map is the last block's CLS-to-patch attention.
        The other sources are ``"rollout"`` and ``"gradcam_tokens"``; Grad-CAM on a
        named module with a spatial output (``"vit.patch_embedding.patch_embeddings"``,
        on the patch grid) works too.
    architecture : dict
        JSON-able arguments that rebuild this network.
    """

    default_cam_layer = "cls_attention"

    def __init__(self, in_channels: int, num_classes: int, input_shape: Sequence[int], *,
                 patch_size: int | Sequence[int] = 16, hidden_size: int = 192, mlp_dim: int = 768,
                 num_layers: int = 6, num_heads: int = 3, dropout_rate: float = 0.0, qkv_bias: bool = True) -> None:
        super().__init__()
        grid = tuple(int(n) for n in input_shape)
        if len(grid) not in (2, 3) or min(grid) < 1:
            raise InputError(f"input_shape must be (z, y, x) or (y, x) positive voxels, got {tuple(input_shape)}")
        patch = _per_axis(patch_size, len(grid), "patch_size")
        if any(n % p for n, p in zip(grid, patch)):
            raise InputError(f"input_shape {grid} is not a whole number of patches {patch} per axis; "
                             "pick a patch_size that divides each axis")
        self.vit = ViT(in_channels, grid, patch, hidden_size=hidden_size, mlp_dim=mlp_dim, num_layers=num_layers,
                       num_heads=num_heads, classification=True, num_classes=num_classes,
                       dropout_rate=dropout_rate, spatial_dims=len(grid), post_activation="none", qkv_bias=qkv_bias)
        self.input_shape = grid
        self.spatial_dims = len(grid)
        self.patch_grid = tuple(n // p for n, p in zip(grid, patch))
        self.architecture = {
            "name": "vit", "in_channels": int(in_channels), "num_classes": int(num_classes),
            "input_shape": list(grid), "patch_size": list(patch), "hidden_size": int(hidden_size),
            "mlp_dim": int(mlp_dim), "num_layers": int(num_layers), "num_heads": int(num_heads),
            "dropout_rate": float(dropout_rate), "qkv_bias": bool(qkv_bias),
        }

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` (no Tanh) of inputs at ``input_shape``."""
        return self.vit(inputs)[0]


def vit(in_channels: int, num_classes: int, input_shape: Sequence[int] = (224, 224), **options: Any
        ) -> VisionTransformer:
    """A MONAI ViT classifier for crops of ``input_shape`` ((y, x): 2D, (z, y, x): 3D).

    Parameters
    ----------
    in_channels, num_classes : int
        Image channels and classes (treatments).
    input_shape : (y, x) or (z, y, x)
        Model grid in voxels; each axis a whole number of patches.
    **options
        ``patch_size`` (16, or one per axis), ``hidden_size`` (192), ``mlp_dim``
        (768), ``num_layers`` (6), ``num_heads`` (3), ``dropout_rate`` (0),
        ``qkv_bias`` (True): a ViT-Tiny-like default.

    Returns
    -------
    VisionTransformer
        In training mode, freshly initialised.
    """
    return VisionTransformer(in_channels, num_classes, input_shape, **options)
