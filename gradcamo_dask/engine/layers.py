"""Layer lookup for any PyTorch CNN: names, grids, the default Grad-CAM layer.

A "spatial" layer outputs ``(N, C, z, y, x)`` and runs once per forward pass;
only those can be Grad-CAM layers. Grids are found by running the model once on
PyTorch's ``meta`` device (no computation), or on zeros where that fails.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from gradcamo_dask.errors import InputError

__all__ = ["default_layer", "find_layer", "first_conv_channels", "layer_grids", "model_spatial_dims", "probe_layers",
           "trace_layers"]


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


def model_spatial_dims(model: nn.Module) -> int | None:
    """2 or 3: the spatial axes of the model's first convolution (``None`` if it has none).

    A model may say it itself with a ``spatial_dims`` attribute (the ViT does).
    """
    said = getattr(model, "spatial_dims", None)
    if isinstance(said, int):
        return said
    for module in model.modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            return len(module.kernel_size)
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


def _meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode whose tensors live on the ``meta`` device.

    The deep copy is told the meta twin of every parameter and buffer up front, so
    no weight is ever copied (a model on a GPU allocates nothing there).
    """
    memo: dict[int, object] = {}
    for tensor in (*model.parameters(), *model.buffers()):
        twin = torch.empty_like(tensor, device="meta")
        if isinstance(tensor, nn.Parameter):
            twin = nn.Parameter(twin, requires_grad=tensor.requires_grad)
        memo[id(tensor)] = twin
    return copy.deepcopy(model, memo).eval()


def probe_layers(model: nn.Module, shape: tuple[int, ...]) -> list:
    """:func:`trace_layers` for one cell at ``shape``: on a ``meta`` copy, or on zeros."""
    channels = first_conv_channels(model)
    if channels is None:
        raise InputError(f"{type(model).__name__} has no convolution; cannot tell its input channels")
    try:
        return trace_layers(_meta_copy(model), torch.empty((1, channels, *shape), device="meta"))
    except Exception:  # noqa: BLE001 - some custom ops have no meta kernel
        was_training = model.training
        model.eval()
        try:
            return trace_layers(model, torch.zeros((1, channels, *shape), device=_model_device(model)))
        finally:
            model.train(was_training)


def layer_grids(model: nn.Module, input_shape: Sequence[int] | None = None) -> dict[str, tuple[int, int, int]]:
    """Grid ``(z, y, x)`` (2D model: ``(y, x)``) in voxels of every spatial layer for one input grid.

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
    shape = _input_shape_of(model, input_shape)
    trace = probe_layers(model, shape)
    return {name: tuple(out[2:]) for name, _m, calls, out in trace if calls == 1 and len(out) == 2 + len(shape)}


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
    shape = _input_shape_of(model, input_shape)
    trace = probe_layers(model, shape)
    candidates = [
        n for n, module, calls, out in trace
        if calls == 1 and len(out) == 2 + len(shape) and not list(module.children()) and not isinstance(module, _NOT_ACTIVATIONS)
    ]
    if not candidates:
        raise InputError(f"{type(model).__name__} has no spatial layer that runs once; name the layers explicitly")
    return candidates[-1]


def _input_shape_of(model: nn.Module, input_shape: Sequence[int] | None) -> tuple[int, ...]:
    if input_shape is None:
        input_shape = getattr(model, "input_shape", None)
    if input_shape is None:
        raise InputError(
            f"{type(model).__name__} does not say its input grid; pass input_shape=(z, y, x) in voxels"
        )
    shape = tuple(int(n) for n in input_shape)
    if len(shape) not in (2, 3) or min(shape) < 1:
        raise InputError(f"input_shape must be 3 positive voxel counts (z, y, x), or 2 (y, x) for a 2D model, "
                         f"got {tuple(input_shape)}")
    return shape  # type: ignore[return-value]
