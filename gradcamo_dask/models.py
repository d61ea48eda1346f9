"""The 3D EfficientNet-B0, model bundles, checkpoint conversion and layer lookup.

The network is MONAI's :class:`monai.networks.nets.EfficientNet` built from the
seven EfficientNet-B0 block strings with every stage's stride as in the
``efficientnet_pytorch_3d`` project (the first MBConv stage downsamples too), with
two repairs (DESIGN §3):

* MONAI derives its fixed "same" padding from one ``image_size`` for all three
  axes. Here the padding of every convolution is derived per axis from the model
  input grid ``input_shape = (z, y, x)`` (TensorFlow "same" rule), so any input grid
  works and the numbers do not silently change.
* MONAI calls one ``_swish`` module for the stem and for the head, so the head
  activation cannot be hooked by name. It is its own module, ``_head_swish``, and
  it is the default Grad-CAM layer.

A bundle is a directory with ``model.safetensors`` and ``config.json``; loading
it never unpickles anything.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from monai.networks.layers.factories import Act
from monai.networks.nets import EfficientNet
from torch import nn

from gradcamo_dask.errors import BundleMismatchError, InputError

__all__ = [
    "EFFICIENTNET_B0_BLOCKS",
    "Bundle",
    "BundleConfig",
    "EfficientNet3D",
    "conv_padding",
    "convert_efficientnet_pytorch_3d",
    "default_layer",
    "efficientnet3d",
    "find_layer",
    "first_conv_channels",
    "from_efficientnet_pytorch_3d",
    "layer_grids",
    "load_bundle",
    "save_bundle",
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

BUNDLE_FORMAT = "gradcamo-dask-bundle"
BUNDLE_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


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
        x = self._swish(self._bn0(self._conv_stem(self._conv_stem_padding(inputs))))
        x = self._blocks(x)
        x = self._head_swish(self._bn1(self._conv_head(self._conv_head_padding(x))))
        x = self._avg_pooling(x).flatten(start_dim=1)
        return self._fc(self._dropout(x))

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


# ------------------------------------------------------------------ layers
def find_layer(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name``; :class:`InputError` listing valid names otherwise."""
    modules = dict(model.named_modules())
    if name and name in modules:
        return modules[name]
    valid = [n for n in modules if n]
    raise InputError(
        f"layer {name!r} does not exist in {type(model).__name__}; valid layer names are: "
        + ", ".join(valid)
    )


def first_conv_channels(model: nn.Module) -> int | None:
    """Input channels of the model's first convolution (``None`` if it has none)."""
    for module in model.modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            return int(module.in_channels)
    return None


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def trace_layers(model: nn.Module, inputs: torch.Tensor) -> list[tuple[str, nn.Module, int, tuple[int, ...]]]:
    """Run ``model(inputs)`` once and record every submodule's calls.

    Returns ``(name, module, number_of_calls, output_shape)`` in first-call
    order; the shape is that of the last call's output (``()`` when it is not a
    tensor).
    """
    records: dict[str, list] = {}
    handles = []

    def make_hook(name: str, module: nn.Module):
        def hook(_module, _args, output):
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else ()
            if name in records:
                records[name][2] += 1
                records[name][3] = shape
            else:
                records[name] = [name, module, 1, shape]

        return hook

    try:
        for name, module in model.named_modules():
            if name:
                handles.append(module.register_forward_hook(make_hook(name, module)))
        with torch.no_grad():
            model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    return [tuple(r) for r in records.values()]


def _probe(model: nn.Module, shape: tuple[int, int, int]) -> list:
    """:func:`trace_layers` for one cell at ``shape``: on a ``meta`` copy, or on zeros."""
    channels = first_conv_channels(model)
    if channels is None:
        raise InputError(f"{type(model).__name__} has no convolution; cannot tell its input channels")
    try:
        probe = copy.deepcopy(model).to("meta").eval()
        return trace_layers(probe, torch.empty((1, channels, *shape), device="meta"))
    except Exception:  # noqa: BLE001 - some custom ops have no meta kernel
        was_training = model.training
        model.eval()
        try:
            return trace_layers(model, torch.zeros((1, channels, *shape), device=_model_device(model)))
        finally:
            model.train(was_training)


def layer_grids(model: nn.Module, input_shape: Sequence[int] | None = None) -> dict[str, tuple[int, int, int]]:
    """Grid ``(z, y, x)`` in voxels of every spatial layer for one input grid.

    A layer is spatial when its output is ``(N, C, z, y, x)`` and it runs once per
    forward pass (only those can be Grad-CAM layers). The forward pass runs on a
    copy of the model on PyTorch's ``meta`` device (no computation); models that
    cannot run there are run once on zeros.

    Parameters
    ----------
    model : torch.nn.Module
    input_shape : (int, int, int), optional
        Model input grid; defaults to ``model.input_shape``.
    """
    trace = _probe(model, _input_shape_of(model, input_shape))
    return {name: tuple(out[2:]) for name, _m, calls, out in trace if calls == 1 and len(out) == 5}


_NOT_ACTIVATIONS = (
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.dropout._DropoutNd,
    nn.Identity,
    nn.Flatten,
)


def default_layer(model: nn.Module, input_shape: Sequence[int] | None = None) -> str:
    """Name of the model's last convolutional activation (the default Grad-CAM layer).

    ``model.default_cam_layer`` when the model says it (as :class:`EfficientNet3D`
    does); otherwise the last module, in forward order, without submodules, that
    runs once and outputs a spatial map ``(N, C, z, y, x)`` and is not a pooling,
    dropout, identity or flatten layer.
    """
    name = getattr(model, "default_cam_layer", None)
    if name:
        return str(name)
    trace = _probe(model, _input_shape_of(model, input_shape))
    candidates = [
        n for n, module, calls, out in trace
        if calls == 1 and len(out) == 5 and not list(module.children()) and not isinstance(module, _NOT_ACTIVATIONS)
    ]
    if not candidates:
        raise InputError(f"{type(model).__name__} has no spatial layer that runs once; name the layers explicitly")
    return candidates[-1]


def _input_shape_of(model: nn.Module, input_shape: Sequence[int] | None) -> tuple[int, int, int]:
    if input_shape is None:
        input_shape = getattr(model, "input_shape", None)
    if input_shape is None:
        raise InputError(
            f"{type(model).__name__} does not say its input grid; pass input_shape=(z, y, x) in voxels"
        )
    shape = tuple(int(n) for n in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(f"input_shape must be 3 positive voxel counts (z, y, x), got {tuple(input_shape)}")
    return shape  # type: ignore[return-value]


# ----------------------------------------------------------------- bundles
ARCHITECTURES = {"efficientnet3d": efficientnet3d}


@dataclass(frozen=True)
class BundleConfig:
    """What a bundle's ``config.json`` says (item access works too: ``config["channels"]``).

    Grids are ``(z, y, x)`` in voxels; a ``None`` entry of ``crop_shape`` means
    "any" (e.g. all z slices of a site).
    """

    architecture: dict
    channels: list[str]
    classes: list[str]
    crop_shape: list[int | None]
    input_shape: list[int]
    normalization: dict
    layers: list[str]
    provenance: dict = field(default_factory=dict)
    weights_sha256: str = ""
    format: str = BUNDLE_FORMAT
    version: int = BUNDLE_VERSION

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def to_dict(self) -> dict:
        return asdict(self)


def _names(kind: str, names: Sequence[str]) -> str:
    return f"{len(names)} {kind} ({', '.join(map(str, names))})"


@dataclass
class Bundle:
    """A loaded model bundle.

    Attributes
    ----------
    model : torch.nn.Module
        In eval mode on the requested device.
    config : BundleConfig
    hash : str
        ``"sha256:<hex>"`` over the weights file and ``config.json`` bytes.
    path : pathlib.Path
    """

    model: nn.Module
    config: BundleConfig
    hash: str
    path: Path

    def check_fits(
        self,
        channels: Sequence[str] | None = None,
        classes: Sequence[str] | None = None,
        crop_shape: Sequence[int | None] | None = None,
    ) -> None:
        """Refuse data that this model cannot score; the error names both sides.

        Parameters
        ----------
        channels : list of str, optional
            The plate's channel names; must equal the bundle's, in order.
        classes : list of str, optional
            Class (treatment) names the data will use as targets; each must be one
            of the bundle's classes.
        crop_shape : (z, y, x), optional
            The crop grid in voxels; ``None`` entries (here or in the bundle) match
            anything.

        Raises
        ------
        BundleMismatchError
        """
        cfg = self.config
        if channels is not None and list(channels) != list(cfg.channels):
            if len(channels) != len(cfg.channels):
                raise BundleMismatchError(
                    f"bundle expects {_names('channels', cfg.channels)}, plate has {len(channels)} "
                    f"({', '.join(map(str, channels))}); select the bundle's channels or use a "
                    "bundle trained on these"
                )
            raise BundleMismatchError(
                f"bundle expects channels ({', '.join(cfg.channels)}) in this order, plate has "
                f"({', '.join(map(str, channels))}); reorder the plate's channels or rename them"
            )
        if classes is not None:
            unknown = [c for c in classes if c not in cfg.classes]
            if unknown:
                raise BundleMismatchError(
                    f"bundle knows {_names('classes', cfg.classes)}, data has "
                    f"{_names('classes', list(classes))}; not in the bundle: {', '.join(map(str, unknown))}"
                )
        if crop_shape is not None:
            crop = list(crop_shape)
            ok = len(crop) == len(cfg.crop_shape) and all(
                a is None or b is None or int(a) == int(b) for a, b in zip(crop, cfg.crop_shape)
            )
            if not ok:
                raise BundleMismatchError(
                    f"bundle expects crops of {tuple(cfg.crop_shape)} voxels (z, y, x; None = any), "
                    f"data has {tuple(crop)}; crop the cells at the bundle's grid"
                )


def _jsonable_shape(shape: Sequence[int | None], what: str) -> list[int | None]:
    values = [None if n is None else int(n) for n in shape]
    if len(values) != 3:
        raise InputError(f"{what} must be (z, y, x) in voxels, got {tuple(shape)}")
    return values


def save_bundle(
    path: str | Path,
    model: nn.Module,
    *,
    channels: Sequence[str],
    classes: Sequence[str],
    crop_shape: Sequence[int | None],
    input_shape: Sequence[int],
    normalization: Mapping[str, Sequence[float]],
    provenance: Mapping[str, Any] | None = None,
    layers: Sequence[str] | None = None,
) -> Path:
    """Write ``model`` as a bundle directory: ``model.safetensors`` + ``config.json``.

    Parameters
    ----------
    path : str or Path
        Directory (created; existing bundle files in it are replaced).
    model : EfficientNet3D
        A model with an ``architecture`` attribute naming a known architecture.
    channels, classes : list of str
        Names in the order of the model's input channels and output logits.
    crop_shape : (z, y, x)
        Crop grid in voxels (``None`` for "all z").
    input_shape : (z, y, x)
        Model input grid in voxels; must be the grid the model was built for.
    normalization : dict
        ``{"mean": [...], "std": [...]}``, one value per channel (of rescaled
        intensities, see DESIGN §2).
    provenance : dict, optional
        Training provenance (data, parameters, versions); JSON-able.
    layers : list of str, optional
        Default Grad-CAM layers (default: the model's ``default_cam_layer``).

    Returns
    -------
    pathlib.Path
        The bundle directory.
    """
    from safetensors.torch import save_file

    arch = getattr(model, "architecture", None)
    if not isinstance(arch, dict) or arch.get("name") not in ARCHITECTURES:
        raise InputError(
            f"cannot bundle a {type(model).__name__}: bundles rebuild the network from its "
            f"architecture name, known ones are {sorted(ARCHITECTURES)}; build it with efficientnet3d()"
        )
    channels, classes = [str(c) for c in channels], [str(c) for c in classes]
    if len(channels) != arch["in_channels"]:
        raise InputError(f"model takes {arch['in_channels']} channels, got {_names('channel names', channels)}")
    if len(classes) != arch["num_classes"]:
        raise InputError(f"model has {arch['num_classes']} classes, got {_names('class names', classes)}")
    if list(_jsonable_shape(input_shape, "input_shape")) != list(arch["input_shape"]):
        raise InputError(
            f"input_shape {tuple(input_shape)} differs from the grid the model was built for "
            f"{tuple(arch['input_shape'])}; rebuild the model with efficientnet3d(input_shape=...)"
        )
    norm = {key: [float(v) for v in normalization[key]] for key in ("mean", "std")}
    if any(len(v) != len(channels) for v in norm.values()):
        raise InputError(f"normalization needs one mean and one std per channel ({len(channels)})")
    layers = list(layers) if layers is not None else [getattr(model, "default_cam_layer", "")]
    for name in layers:
        find_layer(model, name)

    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": BUNDLE_FORMAT})
    weights_hash = hashlib.sha256((directory / WEIGHTS_FILE).read_bytes()).hexdigest()
    config = BundleConfig(
        architecture=dict(arch),
        channels=channels,
        classes=classes,
        crop_shape=_jsonable_shape(crop_shape, "crop_shape"),
        input_shape=list(arch["input_shape"]),
        normalization=norm,
        layers=layers,
        provenance=json.loads(json.dumps(dict(provenance or {}))),
        weights_sha256=weights_hash,
    )
    (directory / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    return directory


def load_bundle(path: str | Path, device: str | torch.device = "cpu") -> Bundle:
    """Load a bundle written by :func:`save_bundle`; never unpickles anything.

    The network is rebuilt from the config's architecture, the weights come from
    safetensors, and the model is returned in eval mode on ``device``.

    Raises
    ------
    FileNotFoundError
        When the directory lacks ``config.json`` or ``model.safetensors``.
    BundleMismatchError
        When the weights do not match the config (hash or tensor names).
    """
    from safetensors.torch import load_file

    directory = Path(path)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory} is not a model bundle: {name} is missing")
    config_bytes = (directory / CONFIG_FILE).read_bytes()
    weights_bytes = (directory / WEIGHTS_FILE).read_bytes()
    raw = json.loads(config_bytes)
    if raw.get("format") != BUNDLE_FORMAT:
        raise BundleMismatchError(f"{directory / CONFIG_FILE} is not a {BUNDLE_FORMAT} config")
    config = BundleConfig(**{k: raw[k] for k in BundleConfig.__dataclass_fields__ if k in raw})
    weights_hash = hashlib.sha256(weights_bytes).hexdigest()
    if config.weights_sha256 and config.weights_sha256 != weights_hash:
        raise BundleMismatchError(
            f"{directory / WEIGHTS_FILE} has sha256 {weights_hash[:12]}..., config.json expects "
            f"{config.weights_sha256[:12]}...; the weights were replaced, save the bundle again"
        )
    arch = dict(config.architecture)
    builder = ARCHITECTURES.get(arch.pop("name", None))
    if builder is None:
        raise BundleMismatchError(f"unknown architecture {config.architecture.get('name')!r} in {directory}")
    model = builder(arch.pop("in_channels"), arch.pop("num_classes"), arch.pop("input_shape"), **arch)
    state = load_file(str(directory / WEIGHTS_FILE), device="cpu")
    missing, unexpected = set(model.state_dict()) - set(state), set(state) - set(model.state_dict())
    if missing or unexpected:
        raise BundleMismatchError(
            f"weights in {directory} do not fit {config.architecture['name']}: missing "
            f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    model.load_state_dict(state)
    model.to(device).eval()
    digest = hashlib.sha256(weights_bytes + b"\0" + config_bytes).hexdigest()
    return Bundle(model=model, config=config, hash=f"sha256:{digest}", path=directory)
