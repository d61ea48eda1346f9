"""The 2D EfficientNet-B0 (MONAI) for single-cell crops of 2D plates.

MONAI's :class:`monai.networks.nets.EfficientNet` with ``spatial_dims=2`` and the
block strings of :class:`monai.networks.nets.EfficientNetBN` ``"efficientnet-b0"``
(the stock 2D B0: first MBConv stage at stride 1), with the one repair the 3D model
needs too: the head activation is its own module, ``_head_swish``, so it can be
hooked by name (MONAI calls one ``_swish`` for the stem and the head). MONAI's
static "same" padding is computed for a square ``image_size``; the model grid is
therefore square and that padding is exact for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.networks.layers.factories import Act
from monai.networks.nets import EfficientNet
from torch import nn

from gradcamo_dask.errors import InputError

__all__ = ["EFFICIENTNET_B0_BLOCKS_2D", "EfficientNet2D", "efficientnet2d"]

#: The stock EfficientNet-B0 stages (MONAI's ``EfficientNetBN("efficientnet-b0")``).
EFFICIENTNET_B0_BLOCKS_2D: tuple[str, ...] = (
    "r1_k3_s11_e1_i32_o16_se0.25",
    "r2_k3_s22_e6_i16_o24_se0.25",
    "r2_k5_s22_e6_i24_o40_se0.25",
    "r3_k3_s22_e6_i40_o80_se0.25",
    "r3_k5_s11_e6_i80_o112_se0.25",
    "r4_k5_s22_e6_i112_o192_se0.25",
    "r1_k3_s11_e6_i192_o320_se0.25",
)


class EfficientNet2D(EfficientNet):
    """EfficientNet-B0 in 2D (see :func:`efficientnet2d`).

    Attributes
    ----------
    input_shape : (y, x)
        Model input grid in pixels (square).
    spatial_dims : int
        2.
    default_cam_layer : str
        ``"_head_swish"``, the last convolutional activation.
    architecture : dict
        JSON-able arguments that rebuild this network (stored in bundles).
    """

    default_cam_layer = "_head_swish"
    spatial_dims = 2

    def __init__(self, in_channels: int, num_classes: int, input_shape: Sequence[int] = (224, 224), *,
                 dropout_rate: float = 0.2, drop_connect_rate: float = 0.2) -> None:
        input_shape = tuple(int(n) for n in input_shape)
        if len(input_shape) != 2 or min(input_shape) < 1 or input_shape[0] != input_shape[1]:
            raise InputError(f"input_shape of efficientnet2d must be a square (y, x) in pixels, e.g. (224, 224); "
                             f"got {input_shape}")
        super().__init__(list(EFFICIENTNET_B0_BLOCKS_2D), spatial_dims=2, in_channels=in_channels,
                         num_classes=num_classes, dropout_rate=dropout_rate, drop_connect_rate=drop_connect_rate,
                         image_size=input_shape[0])
        self.input_shape = input_shape
        self.architecture = {
            "name": "efficientnet2d",
            "in_channels": int(in_channels),
            "num_classes": int(num_classes),
            "input_shape": list(input_shape),
            "dropout_rate": float(dropout_rate),
            "drop_connect_rate": float(drop_connect_rate),
        }
        self._head_swish = Act["memswish"]()

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` of inputs ``(N, C, y, x)`` at ``input_shape``."""
        x = self._swish(self._bn0(self._conv_stem(self._conv_stem_padding(inputs))))
        x = self._blocks(x)
        x = self._head_swish(self._bn1(self._conv_head(self._conv_head_padding(x))))
        x = self._avg_pooling(x).flatten(start_dim=1)
        return self._fc(self._dropout(x))

    def pooled_linear(self, layer: str) -> nn.Linear | None:
        """``_fc`` for ``_head_swish`` (global average pooling then linear: forward-only Grad-CAM), else None."""
        return self._fc if layer == "_head_swish" else None

    def set_swish(self, memory_efficient: bool = True) -> None:
        """Switch every swish, the head's included, between MONAI's two forms."""
        super().set_swish(memory_efficient)
        self._head_swish = Act["memswish"]() if memory_efficient else Act["swish"](alpha=1.0)


def efficientnet2d(in_channels: int, num_classes: int, input_shape: Sequence[int] = (224, 224),
                   **options: Any) -> EfficientNet2D:
    """EfficientNet-B0 in 2D, MONAI's ``EfficientNetBN("efficientnet-b0", spatial_dims=2)`` layout.

    Parameters
    ----------
    in_channels : int
        Image channels (Cell Painting: 5 or 6).
    num_classes : int
        Classes of the classification head (treatments).
    input_shape : (int, int)
        Square model input grid ``(y, x)`` in pixels (default 224 x 224).
    **options
        ``dropout_rate`` (0.2), ``drop_connect_rate`` (0.2).

    Returns
    -------
    EfficientNet2D
        In training mode, freshly initialised; same weight names and shapes as
        MONAI's ``EfficientNetBN`` B0, so its state dicts load.
    """
    return EfficientNet2D(in_channels, num_classes, input_shape, **options)
