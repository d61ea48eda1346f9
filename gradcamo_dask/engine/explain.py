"""One pass of a CNN over single-cell crops: logits, pooled features, Grad-CAM, Grad-CAMO.

:func:`explain` runs the model over crops in micro-batches, resampled on the
device to the model grid, and gets each layer's Grad-CAM map from
:class:`~gradcamo_dask.engine.gradcam.GradCAM` (forward-only where the layer
allows it, else one backward pass to the layer's activations). Grad-CAMO (Eq. 5)
is then scored on the mask's grid with the exact low-resolution route of
:mod:`gradcamo_dask.engine.gradcamo`.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gradcamo_dask.arrays import array_module, from_torch, is_cupy_array, is_torch_tensor, to_numpy, to_torch
from gradcamo_dask.errors import DimensionalityError, InputError
from gradcamo_dask.engine.attention import AttentionCAM, is_attention_request
from gradcamo_dask.engine.gradcam import (CAMResult, GradCAM, analytic_heads, check_method, grad_cam, head_cam,
                                          resolve_targets)
from gradcamo_dask.engine.gradcamo import gradcamo_lowres
from gradcamo_dask.engine.layers import default_layer, first_conv_channels, model_spatial_dims
from gradcamo_dask.engine.precision import autocast_context, resolve_autocast

__all__ = ["CAMResult", "Explanation", "GradCAM", "analytic_heads", "eval_mode", "explain", "grad_cam", "head_cam",
           "map_maker", "model_input", "resolve_targets"]

DEFAULT_BATCH_SIZE = 8
_AXES = {2: "(cell, c, y, x)", 3: "(cell, c, z, y, x)"}


# --------------------------------------------------------------------- explain
@dataclass
class Explanation:
    """Results of :func:`explain`, as arrays of the input crops' kind (NumPy, CuPy or torch).

    Attributes
    ----------
    logits : (N, K) float32 (float64 for a float64 model, likewise below)
    predicted : (N,) int64, argmax of the logits
    targets : (N,) int64, the class each CAM explains (empty without CAMs)
    features : {layer: (N, C) float32} activations averaged over voxels
    cams : {layer: (N, z, y, x) float32} Grad-CAM maps at the layer's grid (not upsampled)
    grids : {layer: (z, y, x)} layer grids in voxels
    gradcamo, cam_inside, cam_total : {layer: (N,) float64}
        Eq. 5 score (NaN where the map is all zero) and its two sums, on the crop
        grid; present when masks were given.
    layers : list of str
    input_shape : (z, y, x) the model grid the crops were resampled to
    """

    logits: Any
    predicted: Any
    targets: Any
    features: dict[str, Any]
    cams: dict[str, Any]
    grids: dict[str, tuple[int, int, int]]
    gradcamo: dict[str, Any] = field(default_factory=dict)
    cam_inside: dict[str, Any] = field(default_factory=dict)
    cam_total: dict[str, Any] = field(default_factory=dict)
    layers: list[str] = field(default_factory=list)
    input_shape: tuple[int, int, int] = (0, 0, 0)


def _model_device(model: nn.Module) -> torch.device:
    tensor = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _model_dtype(model: nn.Module) -> torch.dtype:
    """Crops are cast to the model's floating dtype (float32 unless the model was converted)."""
    tensor = next(model.parameters(), None)
    return tensor.dtype if tensor is not None and tensor.dtype.is_floating_point else torch.float32


def _check_crops(model: nn.Module, crops: Any, masks: Any) -> None:
    shape = tuple(getattr(crops, "shape", ()))
    if len(shape) not in (4, 5):
        raise InputError(f"crops must be (cell, c, z, y, x) or, in 2D, (cell, c, y, x); got shape {shape}")
    dims = model_spatial_dims(model)
    if dims is not None and dims != len(shape) - 2:
        raise DimensionalityError(
            f"the model is {dims}D (crops {_AXES.get(dims, '?')}) but the crops {shape} are {len(shape) - 2}D; use a "
            f"{len(shape) - 2}D model "
            f"(efficientnet{len(shape) - 2}d) or crops of {dims} spatial axes"
        )
    if dims == 3 and len(shape) == 5 and shape[2] == 1:
        warnings.warn(f"crops {shape} have one z slice (a 2D plate): the 3D model sees that slice stretched over "
                      "its z grid; use a 2D model (efficientnet2d, vit with a (y, x) grid) on crops[:, :, 0]",
                      UserWarning, stacklevel=4)
    channels = first_conv_channels(model)
    if channels is not None and shape[1] != channels:
        raise InputError(
            f"crops have {shape[1]} channels, the model's first convolution takes {channels}; "
            "select the model's channels in its order"
        )
    if masks is not None:
        mshape = tuple(getattr(masks, "shape", ()))
        if mshape != (shape[0], *shape[2:]):
            raise InputError(
                f"masks {mshape} do not match crops {shape}: expected (cell, [z,] y, x) = "
                f"{(shape[0], *shape[2:])}, one mask per crop on the crop grid"
            )


def _nonfinite_cells(crops: Any, batch_size: int) -> list[int]:
    """Indices of cells with a NaN or inf voxel.

    One summing pass per cell: a NaN or inf anywhere makes the sum non-finite.
    Only cells whose sum is not finite (also when finite values overflow it) get
    the exact, slower element-wise check (``torch.isfinite`` on CPU costs ~15 % of
    a forward pass at 21 x 128 x 128).
    """
    bad: list[int] = []
    for start in range(0, crops.shape[0], batch_size):
        chunk = crops[start:start + batch_size]
        flat = chunk.reshape(chunk.shape[0], -1)
        if is_torch_tensor(flat):
            suspects = torch.nonzero(~torch.isfinite(flat.sum(dim=1))).flatten().tolist()
            bad.extend(start + i for i in suspects if not bool(torch.isfinite(flat[i]).all()))
        else:
            xp = array_module(flat)
            with np.errstate(over="ignore", invalid="ignore"):  # inf/NaN sums are the point
                sums = flat.sum(axis=1)
            suspects = np.flatnonzero(~np.asarray(to_numpy(xp.isfinite(sums)))).tolist()
            bad.extend(start + i for i in suspects if not bool(xp.isfinite(flat[i]).all()))
    return bad


def _autocast(device: torch.device, autocast: Any) -> contextlib.AbstractContextManager:
    return autocast_context(device, autocast)


def explain(
    model: nn.Module,
    crops: Any,
    masks: Any = None,
    layers: str | Sequence[str] | None = None,
    target: Any = "predicted",
    input_shape: Sequence[int] | None = None,
    *,
    batch_size: int | None = None,
    autocast: Any = None,
    channels_last: bool | None = None,
    cams: bool = True,
    route: str = "auto",
    method: str = "gradcam",
    check_finite: bool = True,
) -> Explanation:
    """Logits, pooled features, Grad-CAM and Grad-CAMO of single-cell crops, in one pass.

    Parameters
    ----------
    model : torch.nn.Module
        A CNN returning logits ``(N, K)``, run on its own device in eval mode (a model
        shared by threads should already be in eval mode, as :func:`open_bundle` gives it).
    crops : array (cell, c, z, y, x), or (cell, c, y, x) for a 2D model
        NumPy, CuPy or torch; float, already normalised; cast to the model's dtype.
    masks : array (cell, z, y, x) (2D: (cell, y, x)), optional
        Central-cell masks on the crop grid (bool; nonzero = inside). With masks,
        Grad-CAMO and its two sums are returned per layer.
    layers : str or list of str, optional
        Grad-CAM layers (any number); default: the last convolutional activation
        (``_head_swish``); :func:`~gradcamo_dask.layer_grids` lists the candidates. A ViT's
        attention sources instead (:mod:`~gradcamo_dask.engine.attention`), e.g. ``"rollout"``.
    target : "predicted", int or sequence of int
        Class explained: predicted (paper), one for all cells, or one per cell.
    input_shape : (z, y, x) or (y, x), optional
        Model grid in voxels the crops are resampled to (trilinear or bilinear); default:
        ``model.input_shape``, else the crop grid.
    batch_size : int, optional
        Cells per forward pass (default 8).
    autocast : None, bool or torch.dtype
        Mixed precision; default bf16 on CUDA, float32 on CPU (CAMs, sums and
        features are accumulated in float32/float64).
    channels_last : bool, optional
        Feed the model ``channels_last_3d`` inputs (default: on CUDA).
    cams : bool
        False: logits and features only, without gradients (masks, target ignored).
    route, method : str
        As :class:`GradCAM`: ``route`` "auto" (forward-only where the layer allows it, else autograd),
        "autograd" or "analytic"; ``method`` "gradcam" (paper) or "hirescam" (gradient x activation per voxel).
    check_finite : bool
        Scan crops and maps for NaN and inf (host syncs on a GPU); False for crops
        that cannot hold them: then nothing waits for the device between batches.

    Returns
    -------
    Explanation
        Arrays of the same kind as ``crops`` (CuPy in, CuPy out via DLPack).

    Raises
    ------
    InputError
        Wrong channel count, masks not matching crops, unknown or non-spatial layers, NaN or
        inf in crops (naming the cells), bad targets; DimensionalityError: 2D crops, 3D model.
    """
    input_shape, layers, batch_size = _plan(model, crops, masks, layers, target, input_shape, batch_size,
                                            check_finite)
    n_cells, device, dtype = int(crops.shape[0]), _model_device(model), _model_dtype(model)
    channels_last = device.type == "cuda" if channels_last is None else channels_last
    autocast = resolve_autocast(device, autocast)  # once: a known-bad bf16 warns once per call
    parts: dict[str, list] = {}
    grids: dict[str, tuple[int, ...]] = {}
    with eval_mode(model), map_maker(model, layers, cams, route, method) as cam:
        for start in range(0, max(n_cells, 1), batch_size):
            stop = min(start + batch_size, n_cells)
            x = model_input(crops[start:stop], device, dtype, input_shape, channels_last)
            t = target if isinstance(target, (str, int, np.integer)) else to_numpy(target)[start:stop]
            with _autocast(device, autocast):
                result = cam(x, target=t)
            _collect(parts, grids, result, masks, start, stop, device, layers, check_finite)
    return _assemble(parts, grids, layers, input_shape, crops, masks is not None and cams)


def map_maker(model: nn.Module, layers: list[str], cams: bool, route: str,
              method: str = "gradcam") -> GradCAM | AttentionCAM:
    """The context manager that makes the maps: a ViT's attention sources, else Grad-CAM on layers."""
    if is_attention_request(layers):
        if check_method(method) != "gradcam":
            raise InputError(f"method={method!r} weighs a layer's gradients; attention sources {layers} have none")
        return AttentionCAM(model, layers, cams=cams)
    return GradCAM(model, layers, cams=cams, route=route, method=method)


def _plan(model: nn.Module, crops: Any, masks: Any, layers: Any, target: Any, input_shape: Any,
          batch_size: int | None, check_finite: bool = True) -> tuple[tuple[int, int, int], list[str], int]:
    """Check the inputs of :func:`explain`; returns the model grid, the layers and the batch size."""
    _check_crops(model, crops, masks)
    n_cells, _c, *crop_grid = (int(n) for n in crops.shape)
    batch_size = int(batch_size or DEFAULT_BATCH_SIZE)
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    model_shape = getattr(model, "input_shape", None)
    if input_shape is None:
        input_shape = model_shape if model_shape is not None else crop_grid
    input_shape = tuple(int(n) for n in input_shape)
    if len(input_shape) != len(crop_grid):
        raise InputError(f"input_shape must be {'(z, y, x)' if len(crop_grid) == 3 else '(y, x)'} in voxels "
                         f"like the crops, got {input_shape}")
    if model_shape is not None and tuple(model_shape) != input_shape:
        raise InputError(
            f"the model was built (padding derived) for input grid {tuple(model_shape)}, not {input_shape}; "
            "rebuild it with efficientnet3d(input_shape=...) or leave input_shape unset"
        )
    if layers is None:
        layers = [default_layer(model, input_shape)]
    layers = [layers] if isinstance(layers, str) else list(layers)
    bad = _nonfinite_cells(crops, batch_size) if check_finite else []
    if bad:
        shown = ", ".join(map(str, bad[:20])) + (f" ... ({len(bad)} cells)" if len(bad) > 20 else "")
        raise InputError(f"crops contain NaN or inf in cell(s) {shown}; fix or drop these cells first")
    if not isinstance(target, str) and not isinstance(target, (int, np.integer)):
        if len(to_numpy(target)) != n_cells:
            raise InputError(f"got {len(to_numpy(target))} targets for {n_cells} cells; give one per cell")
    return input_shape, layers, batch_size


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Modules in training mode are switched to eval for the block, and back after it.

    Switching walks every module (~15 ms for an EfficientNet): only modules that need it.
    """
    training = [m for m in model.modules() if m.training]
    for module in training:
        module.training = False
    try:
        yield model
    finally:
        for module in training:
            module.training = True


def model_input(chunk: Any, device: torch.device, dtype: torch.dtype, input_shape: Sequence[int],
                channels_last: bool) -> torch.Tensor:
    """Crops ``(n, c, z, y, x)`` (NumPy, CuPy or torch) as the model's input: on ``device``, in ``dtype``,
    resampled trilinearly to ``input_shape`` (voxels), ``channels_last_3d`` if asked. 2D crops
    ``(n, c, y, x)`` are resampled bilinearly (``channels_last``)."""
    x = to_torch(chunk, device=device).to(dtype)
    if tuple(x.shape[2:]) != tuple(input_shape):
        mode = "trilinear" if x.ndim == 5 else "bilinear"
        x = F.interpolate(x, size=tuple(input_shape), mode=mode, align_corners=False)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d if x.ndim == 5 else torch.channels_last)
    return x


def _collect(parts: dict, grids: dict, result: CAMResult, masks: Any, start: int, stop: int,
             device: torch.device, layers: list[str], check: bool = True) -> None:
    def put(key: str, value: torch.Tensor) -> None:
        parts.setdefault(key, []).append(value)

    put("logits", result.logits)
    put("predicted", result.logits.argmax(dim=1))
    if result.targets is not None:
        put("targets", result.targets)
    mask = None
    if masks is not None and result.cams:
        chunk = masks[start:stop]
        if is_cupy_array(chunk) and chunk.dtype == bool:
            chunk = chunk.view("uint8")  # DLPack support for bool varies across CuPy versions
        mask = to_torch(chunk, device=device)
    grids.update(result.grids)
    for name in layers:
        put(f"features/{name}", result.features[name])
        if name in result.cams:
            cam = result.cams[name]
            put(f"cams/{name}", cam)
            if mask is not None:
                score, inside, total = gradcamo_lowres(cam, mask, check=check)
                put(f"gradcamo/{name}", score)
                put(f"cam_inside/{name}", inside)
                put(f"cam_total/{name}", total)


def _assemble(parts: dict, grids: dict, layers: list[str], input_shape: tuple, crops: Any,
              scored: bool) -> Explanation:
    def out(key: str) -> Any:
        if key not in parts:
            return _convert(torch.zeros(0, dtype=torch.long), crops)
        return _convert(torch.cat(parts[key]), crops)

    per_layer = {kind: {name: out(f"{kind}/{name}") for name in layers}
                 for kind in ("features", "cams", "gradcamo", "cam_inside", "cam_total")}
    if "cams/" + layers[0] not in parts:
        per_layer["cams"] = {}
    if not scored:
        for kind in ("gradcamo", "cam_inside", "cam_total"):
            per_layer[kind] = {}
    return Explanation(
        logits=out("logits"),
        predicted=out("predicted"),
        targets=out("targets"),
        grids=dict(grids),
        layers=list(layers),
        input_shape=tuple(input_shape),
        **per_layer,
    )


def _convert(tensor: torch.Tensor, like: Any) -> Any:
    """Result tensor as the kind of array the crops came in."""
    if is_torch_tensor(like):
        return tensor.detach().to(like.device)
    if is_cupy_array(like):
        if not tensor.is_cuda:
            tensor = tensor.to(f"cuda:{like.device.id}")
        return from_torch(tensor, like=like)
    return from_torch(tensor)
