"""One pass of a CNN over single-cell crops: logits, pooled features, Grad-CAM, Grad-CAMO.

For class ``k`` and a layer with activations ``A`` (``C'`` channels), Grad-CAM
(paper Eq. 3-4) is ``G~ = ReLU((1/C') sum_c w_c A_c)`` with
``w_c = mean over voxels of dY_k/dA_c`` and ``Y_k`` the logit. Grad-CAMO (Eq. 5)
is then scored on the mask's grid with the exact low-resolution route of
:mod:`gradcamo_dask.engine.gradcamo`.

Why it costs little more than feature extraction: the forward pass starts under
``torch.no_grad()``; the forward hook of the earliest hooked layer switches
gradient recording on (thread-locally) and hands the rest of the network a leaf
copy of its output. No graph exists before that layer, and
``torch.autograd.grad(logit, activations)`` computes activation gradients only,
never parameter gradients, so frozen parameters work and nothing accumulates in
``.grad``. Hooks are released when the :class:`GradCAM` context exits, also on
error; they only act in the thread that called, so a model shared by threaded
Dask workers is safe.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gradcamo_dask.arrays import array_module, from_torch, is_cupy_array, is_torch_tensor, to_torch
from gradcamo_dask.errors import InputError
from gradcamo_dask.engine.gradcamo import gradcamo_lowres
from gradcamo_dask.engine.layers import default_layer, find_layer, first_conv_channels

__all__ = ["CAMResult", "Explanation", "GradCAM", "explain"]

DEFAULT_BATCH_SIZE = 8


@dataclass
class CAMResult:
    """What one :class:`GradCAM` call returns (torch tensors, detached, float32).

    Attributes
    ----------
    logits : (N, K)
    targets : (N,) int64, the class explained for each cell (``None`` without CAMs)
    features : {layer: (N, C)} activations averaged over voxels
    cams : {layer: (N, z, y, x)} Grad-CAM maps at each layer's grid (empty without CAMs)
    grids : {layer: (z, y, x)} layer grids in voxels
    """

    logits: torch.Tensor
    targets: torch.Tensor | None
    features: dict[str, torch.Tensor]
    cams: dict[str, torch.Tensor]
    grids: dict[str, tuple[int, int, int]]


class _CallState:
    def __init__(self, want_grad: bool) -> None:
        self.want_grad = want_grad
        self.grad_on = False
        self.calls: dict[str, int] = {}
        self.activations: dict[str, torch.Tensor] = {}
        self.features: dict[str, torch.Tensor] = {}
        self.grids: dict[str, tuple[int, int, int]] = {}
        self.bad_output: dict[str, str] = {}


class GradCAM:
    """Grad-CAM on named layers of any PyTorch CNN, hooks held in a context manager.

    Parameters
    ----------
    model : torch.nn.Module
        Takes ``(N, C, z, y, x)`` and returns logits ``(N, K)``. Used as it is (put
        it in eval mode yourself; :func:`explain` does).
    layers : str or list of str
        Names from ``model.named_modules()``; each must output ``(N, C, z, y, x)``
        and run once per forward pass.
    cams : bool
        False: features and logits only, in one pass without any gradient.

    Examples
    --------
    >>> with GradCAM(model, ["_head_swish", "_blocks.4.8"]) as cam:  # doctest: +SKIP
    ...     result = cam(inputs, target="predicted")
    >>> result.cams["_head_swish"].shape  # doctest: +SKIP
    torch.Size([8, 1, 4, 4])
    """

    def __init__(self, model: nn.Module, layers: str | Sequence[str], *, cams: bool = True) -> None:
        self.model = model
        self.layers = [layers] if isinstance(layers, str) else list(layers)
        if not self.layers:
            raise InputError("give at least one layer name for Grad-CAM")
        if len(set(self.layers)) != len(self.layers):
            raise InputError(f"layer names repeat: {self.layers}")
        self.modules = {name: find_layer(model, name) for name in self.layers}
        self.cams = cams
        self._handles: list = []
        self._local = threading.local()

    # -- hooks ----------------------------------------------------------------
    def __enter__(self) -> GradCAM:
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.remove()

    def remove(self) -> None:
        """Release every hook (idempotent)."""
        while self._handles:
            self._handles.pop().remove()

    def _hook(self, name: str):
        def hook(_module: nn.Module, _args: Any, output: Any) -> Any:
            state: _CallState | None = getattr(self._local, "state", None)
            if state is None:  # not our call (another thread, or a plain forward)
                return None
            state.calls[name] = state.calls.get(name, 0) + 1
            if not isinstance(output, torch.Tensor) or output.ndim != 5:
                shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
                state.bad_output[name] = str(shape)
                return None
            state.features[name] = _wide(output.detach()).mean(dim=(2, 3, 4))
            state.grids[name] = tuple(int(n) for n in output.shape[2:])
            if not state.want_grad:
                return None
            if not state.grad_on:
                # Earliest hooked layer: record gradients from here on only.
                torch.set_grad_enabled(True)
                state.grad_on = True
                output = output.detach().requires_grad_()
            state.activations[name] = output
            # Downstream gets a copy, so in-place ops after this layer (MONAI's
            # inplace swish) can neither change the recorded activation nor hit a leaf.
            return output.clone()

        return hook

    # -- one batch ------------------------------------------------------------
    def __call__(self, inputs: torch.Tensor, target: Any = "predicted") -> CAMResult:
        """Run the model once on ``inputs`` ``(N, C, z, y, x)`` at the model grid.

        ``target``: ``"predicted"`` (the argmax logit, paper), an int (one class for
        all cells) or a length-N sequence of class indices (e.g. true labels).
        """
        if not self._handles:
            raise RuntimeError("use GradCAM as a context manager: `with GradCAM(model, layers) as cam:`")
        state = _CallState(want_grad=self.cams)
        self._local.state = state
        try:
            with torch.no_grad():  # the earliest hook switches recording on
                logits = self.model(inputs)
            self._check_run(state, logits, inputs)
            features = dict(state.features)
            if not self.cams:
                return CAMResult(_wide(logits.detach()), None, features, {}, dict(state.grids))
            targets = resolve_targets(target, logits)
            acts = [state.activations[name] for name in self.layers]
            if not logits.requires_grad:
                raise InputError(f"layers {self.layers} do not feed the logits; pick layers on the path to the output")
            with torch.enable_grad():  # the caller may be under no_grad
                selected = logits.gather(1, targets[:, None]).sum()
                grads = torch.autograd.grad(selected, acts, allow_unused=True)
            cams = {}
            for name, act, grad in zip(self.layers, acts, grads):
                if grad is None:
                    raise InputError(f"layer {name!r} does not feed the logits; pick a layer on the path to the output")
                cams[name] = grad_cam(act.detach(), grad)
            return CAMResult(_wide(logits.detach()), targets, features, cams, dict(state.grids))
        finally:
            self._local.state = None

    def _check_run(self, state: _CallState, logits: Any, inputs: torch.Tensor) -> None:
        for name in self.layers:
            calls = state.calls.get(name, 0)
            if calls == 0:
                raise InputError(f"layer {name!r} did not run in the forward pass; pick a layer the model uses")
            if calls > 1:
                raise InputError(
                    f"layer {name!r} runs {calls} times per forward pass (a shared module); pick a layer "
                    "that runs once, e.g. a block output"
                )
            if name in state.bad_output:
                raise InputError(
                    f"layer {name!r} outputs {state.bad_output[name]}, not a spatial map (N, C, z, y, x); "
                    "Grad-CAM needs a convolutional layer: see gradcamo_dask.layer_grids(model)"
                )
        if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != inputs.shape[0]:
            raise InputError(f"the model must return logits (N, K); it returned {type(logits).__name__}")


def _wide(tensor: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 (autocast) as float32; float32 and float64 unchanged."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


def grad_cam(activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """``ReLU((1/C') sum_c w_c A_c)`` with ``w_c`` the voxel mean of the gradients.

    ``activations`` and ``gradients``: ``(N, C', z, y, x)``; returns ``(N, z, y, x)``
    in float32 (float64 for float64 inputs).
    """
    a, g = _wide(activations), _wide(gradients)
    weights = g.mean(dim=(2, 3, 4), keepdim=True)
    return torch.relu((weights * a).sum(dim=1) / a.shape[1])


def resolve_targets(target: Any, logits: torch.Tensor) -> torch.Tensor:
    """Class index per cell: ``"predicted"``, one int, or one index per cell."""
    n, k = logits.shape
    if isinstance(target, str):
        if target != "predicted":
            raise InputError(f"target must be 'predicted', a class index or one index per cell, got {target!r}")
        return logits.detach().float().argmax(dim=1)
    if isinstance(target, (int, np.integer)):
        targets = torch.full((n,), int(target), dtype=torch.long, device=logits.device)
    else:
        targets = torch.as_tensor(np.asarray(_host(target)), device=logits.device).reshape(-1)
        if targets.dtype.is_floating_point or targets.dtype == torch.bool:
            raise InputError(f"per-cell targets must be integer class indices, got dtype {targets.dtype}")
        targets = targets.long()
        if targets.numel() != n:
            raise InputError(f"got {targets.numel()} targets for {n} cells; give one class index per cell")
    if n and (int(targets.min()) < 0 or int(targets.max()) >= k):
        raise InputError(f"target class indices must be in [0, {k - 1}] (the model has {k} classes)")
    return targets


def _host(x: Any) -> Any:
    if is_torch_tensor(x):
        return x.detach().cpu().numpy()
    if is_cupy_array(x):
        return x.get()
    return x


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
    if len(shape) != 5:
        raise InputError(f"crops must be (cell, c, z, y, x), got shape {shape}")
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
                f"masks {mshape} do not match crops {shape}: expected (cell, z, y, x) = "
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
            suspects = np.flatnonzero(~np.asarray(_host(xp.isfinite(sums)))).tolist()
            bad.extend(start + i for i in suspects if not bool(xp.isfinite(flat[i]).all()))
    return bad


def _autocast(device: torch.device, autocast: Any) -> contextlib.AbstractContextManager:
    if autocast is None:
        autocast = torch.bfloat16 if device.type == "cuda" else False
    if autocast is False:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if autocast is True else autocast
    return torch.autocast(device_type=device.type, dtype=dtype)


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
) -> Explanation:
    """Logits, pooled features, Grad-CAM and Grad-CAMO of single-cell crops, in one pass.

    Parameters
    ----------
    model : torch.nn.Module
        A CNN returning logits ``(N, K)``, run on its own device in eval mode
        (modules in training mode are switched for the call; a model shared by
        threads should already be in eval mode, as :func:`open_bundle` returns it).
    crops : array (cell, c, z, y, x)
        NumPy, CuPy or torch; float, already normalised. Cast to the
        model's dtype (float32 normally).
    masks : array (cell, z, y, x), optional
        Central-cell masks on the crop grid (bool; nonzero = inside). With masks,
        Grad-CAMO and its two sums are returned per layer.
    layers : str or list of str, optional
        Grad-CAM layers (any number at once); default: the last convolutional
        activation (``_head_swish`` for :func:`~gradcamo_dask.efficientnet3d`).
        :func:`~gradcamo_dask.layer_grids` lists the candidates and their grids.
    target : "predicted", int or sequence of int
        Class explained: the predicted class (paper), one class for all cells, or
        one class index per cell (e.g. the true label).
    input_shape : (z, y, x), optional
        Model grid in voxels the crops are resampled to (trilinear,
        ``align_corners=False``). Default: ``model.input_shape`` if the model has
        one, else the crop grid.
    batch_size : int, optional
        Cells per forward pass (default 8).
    autocast : None, bool or torch.dtype
        Mixed precision; default bf16 on CUDA, float32 on CPU. CAMs, sums and
        features are always accumulated in float32/float64.
    channels_last : bool, optional
        Feed the model ``channels_last_3d`` inputs (default: on CUDA).
    cams : bool
        False: logits and features only, from one pass without gradients
        (masks and target are then ignored).

    Returns
    -------
    Explanation
        Arrays of the same kind as ``crops`` (CuPy in, CuPy out via DLPack).

    Raises
    ------
    InputError
        Wrong channel count, masks not matching crops, unknown or non-spatial
        layers (the message lists valid names), NaN or inf in crops (the message
        names the cells), bad targets. An empty batch returns empty results.
    """
    _check_crops(model, crops, masks)
    n_cells, _c, *crop_grid = (int(n) for n in crops.shape)
    batch_size = int(batch_size or DEFAULT_BATCH_SIZE)
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    model_shape = getattr(model, "input_shape", None)
    if input_shape is None:
        input_shape = model_shape if model_shape is not None else crop_grid
    input_shape = tuple(int(n) for n in input_shape)
    if len(input_shape) != 3:
        raise InputError(f"input_shape must be (z, y, x) in voxels, got {input_shape}")
    if model_shape is not None and tuple(model_shape) != input_shape:
        raise InputError(
            f"the model was built (padding derived) for input grid {tuple(model_shape)}, not {input_shape}; "
            "rebuild it with efficientnet3d(input_shape=...) or leave input_shape unset"
        )
    if layers is None:
        layers = [default_layer(model, input_shape)]
    layers = [layers] if isinstance(layers, str) else list(layers)
    bad = _nonfinite_cells(crops, batch_size)
    if bad:
        shown = ", ".join(map(str, bad[:20])) + (f" ... ({len(bad)} cells)" if len(bad) > 20 else "")
        raise InputError(f"crops contain NaN or inf in cell(s) {shown}; fix or drop these cells first")
    if not isinstance(target, str) and not isinstance(target, (int, np.integer)):
        if len(_host(target)) != n_cells:
            raise InputError(f"got {len(_host(target))} targets for {n_cells} cells; give one per cell")

    device = _model_device(model)
    dtype = _model_dtype(model)
    if channels_last is None:
        channels_last = device.type == "cuda"
    # Switching modes walks every module (~15 ms for an EfficientNet): only when needed.
    training = [m for m in model.modules() if m.training]
    for module in training:
        module.training = False
    parts: dict[str, list] = {}
    grids: dict[str, tuple[int, int, int]] = {}
    try:
        with GradCAM(model, layers, cams=cams) as cam:
            for start in range(0, max(n_cells, 1), batch_size):
                stop = min(start + batch_size, n_cells)
                x = to_torch(crops[start:stop], device=device).to(dtype)
                if tuple(x.shape[2:]) != input_shape:
                    x = F.interpolate(x, size=input_shape, mode="trilinear", align_corners=False)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last_3d)
                t = target if isinstance(target, (str, int, np.integer)) else _host(target)[start:stop]
                with _autocast(device, autocast):
                    result = cam(x, target=t)
                _collect(parts, grids, result, masks, start, stop, device, layers)
    finally:
        for module in training:
            module.training = True
    return _assemble(parts, grids, layers, input_shape, crops, masks is not None and cams)


def _collect(parts: dict, grids: dict, result: CAMResult, masks: Any, start: int, stop: int,
             device: torch.device, layers: list[str]) -> None:
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
                score, inside, total = gradcamo_lowres(cam, mask)
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
