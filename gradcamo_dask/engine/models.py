"""The 3D EfficientNet-B0 and the conversion of ``efficientnet_pytorch_3d`` checkpoints.

The network is MONAI's :class:`monai.networks.nets.EfficientNet` built from the
seven EfficientNet-B0 block strings with every stage's stride as in the
``efficientnet_pytorch_3d`` project (the first MBConv stage downsamples too), with
two repairs:

* MONAI derives its fixed "same" padding from one ``image_size`` for all three
  axes. Here the padding of every convolution is derived per axis from the model
  input grid ``input_shape = (z, y, x)`` (TensorFlow "same" rule), so any input grid
  works and the numbers do not silently change.
* MONAI calls one ``_swish`` module for the stem and for the head, so the head
  activation cannot be hooked by name. It is its own module, ``_head_swish``, and
  it is the default Grad-CAM layer.

Bundles (:mod:`gradcamo_dask.engine.bundles`) and layer lookup for any CNN
(:mod:`gradcamo_dask.engine.layers`) have their own modules.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.networks.layers.factories import Act
from monai.networks.nets import EfficientNet
from torch import nn

from gradcamo_dask.errors import InputError

__all__ = [
    "EFFICIENTNET_B0_BLOCKS",
    "EfficientNet3D",
    "conv_padding",
    "convert_efficientnet_pytorch_3d",
    "efficientnet3d",
    "from_efficientnet_pytorch_3d",
    "same_padding",
]

#: EfficientNet-B0 stages (repeats, kernel, stride, expansion, in/out channels, SE
#: ratio) with the strides of ``efficientnet_pytorch_3d``: stage 0 has stride 2.
EFFICIENTNET_B0_BLOCKS: tuple[str, ...] = (
    "r1_k3_s2_e1_i32_o16_se0.25",
    "r2_k3_s2_e6_i16_o24_se0.25",
    "r2_k5_s2_e6_i24_o40_se0.25",
    "r3_k3_s2_e6_i40_o80_se0.25",
    "r3_k5_s1_e6_i80_o112_se0.25",
    "r4_k5_s2_e6_i112_o192_se0.25",
    "r1_k3_s1_e6_i192_o320_se0.25",
)

#: Padding rules: ``"same"`` is TensorFlow "same" padding computed per axis from
#: the grid each convolution really sees; ``"efficientnet_pytorch_3d"`` reproduces
#: that project's default static padding, computed for a ``reference_image_size``
#: cube at *every* convolution (what ``EfficientNet3D.from_name`` builds), for
#: loading its checkpoints with identical numbers.
PADDING_RULES = ("same", "efficientnet_pytorch_3d")


def same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow "same" padding of one axis: ``(before, after)`` in voxels.

    The output has ``ceil(size / stride)`` voxels; the odd voxel of padding goes
    after. Written out here because MONAI's helper is private.
    """
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def _apply_padding(conv: nn.Conv3d, pads: Sequence[tuple[int, int]]) -> nn.Module:
    """Give ``conv`` the padding ``pads`` ((before, after) per axis z, y, x).

    The symmetric part goes into the convolution itself (``conv.padding``), which
    pads on the fly; only the odd voxel of "same" padding at stride 2 remains for a
    :class:`torch.nn.ConstantPad3d` in front of it. The numbers are those of one
    zero-padding module, but no padded copy of the activation is made, and the
    input gradient is computed for the real voxels only (on small grids, such as
    the 1 x 2 x 2 maps of stage 5, a fully padded copy was 10-45x larger).
    Returns the module that goes in front (the padder, or ``nn.Identity``).
    """
    conv.padding = tuple(int(lo) for lo, _hi in pads)
    rest = [int(hi - lo) for lo, hi in pads]
    if any(r < 0 for r in rest):  # never for "same" padding: the odd voxel goes after
        raise ValueError(f"padding {pads} is larger before than after")
    flat = [p for r in reversed(rest) for p in (0, r)]  # F.pad order: x first
    return nn.ConstantPad3d(tuple(flat), 0.0) if any(flat) else nn.Identity()


def conv_padding(conv: nn.Conv3d, padder: nn.Module) -> tuple[tuple[int, int], ...]:
    """Zero padding ``(before, after)`` in voxels per axis (z, y, x) that ``padder`` + ``conv`` apply."""
    extra = getattr(padder, "padding", (0,) * 6)
    after = (extra[5], extra[3], extra[1])  # F.pad order is x, y, z
    before = (extra[4], extra[2], extra[0])
    return tuple((int(p) + b, int(p) + a) for p, b, a in zip(conv.padding, before, after))


class EfficientNet3D(EfficientNet):
    """EfficientNet-B0 in 3D for single-cell crops (see :func:`efficientnet3d`).

    Attributes
    ----------
    input_shape : tuple of int
        Model input grid ``(z, y, x)`` in voxels that the padding was derived for.
    output_grid : tuple of int
        Grid ``(z, y, x)`` of the last convolutional map (paper grid, "same"
        padding: ``(1, 4, 4)``).
    default_cam_layer : str
        ``"_head_swish"``, the last convolutional activation.
    architecture : dict
        JSON-able arguments that rebuild this network (stored in bundles).
    """

    default_cam_layer = "_head_swish"

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        input_shape: Sequence[int] = (64, 224, 224),
        *,
        padding: str = "same",
        reference_image_size: int = 224,
        dropout_rate: float = 0.2,
        drop_connect_rate: float = 0.2,
    ) -> None:
        input_shape = tuple(int(n) for n in input_shape)
        if len(input_shape) != 3 or min(input_shape) < 1:
            raise InputError(f"input_shape must be 3 positive voxel counts (z, y, x), got {input_shape}")
        if padding not in PADDING_RULES:
            raise InputError(f"padding must be one of {PADDING_RULES}, got {padding!r}")
        super().__init__(
            list(EFFICIENTNET_B0_BLOCKS),
            spatial_dims=3,
            in_channels=in_channels,
            num_classes=num_classes,
            dropout_rate=dropout_rate,
            drop_connect_rate=drop_connect_rate,
            image_size=reference_image_size,
        )
        self.input_shape = input_shape
        self.architecture = {
            "name": "efficientnet3d",
            "in_channels": int(in_channels),
            "num_classes": int(num_classes),
            "input_shape": list(input_shape),
            "padding": padding,
            "reference_image_size": int(reference_image_size),
            "dropout_rate": float(dropout_rate),
            "drop_connect_rate": float(drop_connect_rate),
        }
        self._head_swish = Act["memswish"]()
        self._set_padding(padding, input_shape, reference_image_size)

    def _set_padding(self, padding: str, input_shape: tuple[int, ...], cube: int) -> None:
        # Walk the convolutions that pad (stem and depthwise; 1x1x1 convolutions
        # never do) in forward order, tracking the grid each one sees.
        sizes = list(input_shape)

        def pad_for(conv: nn.Conv3d) -> nn.Module:
            nonlocal sizes
            seen = sizes if padding == "same" else [cube] * 3
            pads = [same_padding(n, k, s, d) for n, k, s, d in
                    zip(seen, conv.kernel_size, conv.stride, conv.dilation)]
            sizes = [
                (n + lo + hi - d * (k - 1) - 1) // s + 1
                for n, (lo, hi), k, s, d in zip(sizes, pads, conv.kernel_size, conv.stride, conv.dilation)
            ]
            return _apply_padding(conv, pads)

        self._conv_stem_padding = pad_for(self._conv_stem)
        for stage in self._blocks:
            for block in stage:
                block._depthwise_conv_padding = pad_for(block._depthwise_conv)
        self.output_grid = tuple(sizes)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` of inputs ``(N, C, z, y, x)`` at ``input_shape``."""
        return self.head_and_logits(inputs)[1]

    def head_and_logits(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(_head_swish activation (N, 1280, z, y, x), logits (N, num_classes))`` in one pass.

        A hook-free form of the forward pass (for ``torch.compile``): with
        :func:`~gradcamo_dask.engine.gradcam.head_cam` it gives the head's Grad-CAM.
        """
        x = self._swish(self._bn0(self._conv_stem(self._conv_stem_padding(inputs))))
        x = self._blocks(x)
        head = self._head_swish(self._bn1(self._conv_head(self._conv_head_padding(x))))
        x = self._avg_pooling(head).flatten(start_dim=1)
        return head, self._fc(self._dropout(x))

    def pooled_linear(self, layer: str) -> nn.Linear | None:
        """The linear layer that ``layer`` feeds through global average pooling alone, or None.

        ``_head_swish`` -> ``_fc`` (dropout in between is the identity in eval mode):
        its Grad-CAM then needs no backward pass (see :func:`~gradcamo_dask.engine.explain.head_cam`).
        """
        return self._fc if layer == "_head_swish" else None

    def set_swish(self, memory_efficient: bool = True) -> None:
        """Switch every swish, the head's included, between MONAI's two forms."""
        super().set_swish(memory_efficient)
        self._head_swish = Act["memswish"]() if memory_efficient else Act["swish"](alpha=1.0)


def efficientnet3d(
    in_channels: int,
    num_classes: int,
    input_shape: Sequence[int] = (64, 224, 224),
    **options: Any,
) -> EfficientNet3D:
    """EfficientNet-B0 3D, architecture-identical to ``efficientnet_pytorch_3d``.

    Parameters
    ----------
    in_channels : int
        Image channels (Cell Painting: 6).
    num_classes : int
        Classes of the classification head (treatments).
    input_shape : (int, int, int)
        Model input grid ``(z, y, x)`` in voxels; the "same" padding of every
        convolution is derived from it per axis. Paper: ``(64, 224, 224)``.
    **options
        ``padding`` (``"same"`` or ``"efficientnet_pytorch_3d"``, see
        :data:`PADDING_RULES`), ``reference_image_size`` (224), ``dropout_rate``
        (0.2), ``drop_connect_rate`` (0.2).

    Returns
    -------
    EfficientNet3D
        In training mode, freshly initialised (4,700,386 parameters for 6
        channels and 6 classes).
    """
    return EfficientNet3D(in_channels, num_classes, input_shape, **options)


# ----------------------------------------------------------------- checkpoints
def _stage_of_block() -> list[int]:
    repeats = [int(re.match(r"r(\d+)", s).group(1)) for s in EFFICIENTNET_B0_BLOCKS]
    return [stage for stage, r in enumerate(repeats) for _ in range(r)]


def convert_efficientnet_pytorch_3d(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an ``efficientnet_pytorch_3d`` EfficientNet-B0 state dict for :func:`efficientnet3d`.

    That project numbers blocks flat (``_blocks.<i>.``); MONAI nests them by stage
    (``_blocks.<stage>.<i>.``, ``i`` still counting over all blocks). A leading
    ``module.`` (DataParallel) is dropped. Tensors are not copied.

    Raises
    ------
    InputError
        When a block index does not exist in EfficientNet-B0 (another variant).
    """
    stages = _stage_of_block()
    converted: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        key = key[len("module."):] if key.startswith("module.") else key
        match = re.match(r"_blocks\.(\d+)\.(.+)$", key)
        if match:
            index = int(match.group(1))
            if index >= len(stages):
                raise InputError(
                    f"checkpoint key {key!r} names block {index}, but EfficientNet-B0 has "
                    f"{len(stages)} blocks (0-{len(stages) - 1}); is it another EfficientNet variant?"
                )
            if re.match(r"\d+\.", match.group(2)):
                raise InputError(
                    f"checkpoint key {key!r} is already nested by stage; load it without conversion"
                )
            key = f"_blocks.{stages[index]}.{index}.{match.group(2)}"
        converted[key] = value
    return converted


def from_efficientnet_pytorch_3d(
    state_dict: Mapping[str, torch.Tensor],
    input_shape: Sequence[int] = (64, 224, 224),
    *,
    image_size: int | None = 224,
) -> EfficientNet3D:
    """An :class:`EfficientNet3D` carrying an ``efficientnet_pytorch_3d`` checkpoint, in eval mode.

    Channels and classes are read from the weights. ``image_size`` is the
    ``image_size`` that project was built with: 224 (its ``from_name`` default)
    gives its static padding, computed for a 224-voxel cube at every convolution,
    so that the logits are identical to that project's (at 64 x 224 x 224 its last
    map is then 1 x 3 x 3). ``None`` (its dynamic padding) maps to per-axis "same"
    padding, which matches that project only for cubic inputs.
    """
    converted = convert_efficientnet_pytorch_3d(state_dict)
    in_channels = int(converted["_conv_stem.weight"].shape[1])
    num_classes = int(converted["_fc.weight"].shape[0])
    if image_size is None:
        model = efficientnet3d(in_channels, num_classes, input_shape, padding="same")
    else:
        model = efficientnet3d(
            in_channels, num_classes, input_shape, padding="efficientnet_pytorch_3d",
            reference_image_size=image_size,
        )
    model.load_state_dict(converted)
    return model.eval()
