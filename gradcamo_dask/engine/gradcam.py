"""Grad-CAM on named layers of any PyTorch CNN: one forward pass, gradients only where needed.

For class ``k`` and a layer with activations ``A`` (``C'`` channels), Grad-CAM
(paper Eq. 3-4) is ``G~ = ReLU((1/C') sum_c w_c A_c)`` with
``w_c = mean over voxels of dY_k/dA_c`` and ``Y_k`` the logit.

``method="hirescam"`` (Draelos & Carin 2020; not the paper's) keeps the gradient
voxel by voxel instead of averaging it: ``ReLU((1/C') sum_c dY_k/dA_c * A_c)``. For
a layer followed only by global average pooling and a linear layer the gradient
is the same at every voxel, so both methods give the same map there.

Two routes to ``w_c``:

* autograd: the forward pass starts under ``torch.no_grad()``; the forward hook
  of the earliest traced layer switches gradient recording on (thread-locally)
  and hands the rest of the network a leaf copy of its output, so no graph
  exists before that layer; ``torch.autograd.grad(logit, activations)`` computes
  activation gradients only, never parameter gradients.
* forward-only: a layer followed only by global average pooling and a linear
  layer ``W`` (``_head_swish`` of EfficientNet-B0 3D) has ``dY_k/dA_c = W[k, c] / V``
  exactly, so its map needs no backward pass at all (:func:`head_cam`).

Hooks are released when the :class:`GradCAM` context exits, also on error; they
only act in the thread that called, so a model shared by threaded Dask workers
is safe.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from gradcamo_dask.arrays import to_numpy
from gradcamo_dask.errors import InputError
from gradcamo_dask.engine.layers import find_layer

__all__ = ["CAM_METHODS", "CAMResult", "GradCAM", "analytic_heads", "check_method", "grad_cam", "head_cam",
           "hires_cam", "resolve_targets", "widen"]

#: How a layer's map weighs its channels: "gradcam" (the paper) or "hirescam" (gradient kept per voxel).
CAM_METHODS = ("gradcam", "hirescam")


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
    def __init__(self, want_grad: bool | None) -> None:
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
        Takes ``(N, C, z, y, x)`` (a 2D model: ``(N, C, y, x)``) and returns logits ``(N, K)``. Used as it is (put
        it in eval mode yourself; :func:`explain` does).
    layers : str or list of str
        Names from ``model.named_modules()``; each must output ``(N, C, z, y, x)``
        (2D: ``(N, C, y, x)``) and run once per forward pass.
    cams : bool
        False: features and logits only, in one pass without any gradient.
    route : "auto", "autograd" or "analytic"
        How Grad-CAM weights are found. "auto": from the forward pass alone for
        layers followed only by global average pooling and a linear layer (the
        model says which, see :func:`analytic_heads`), by autograd for the others;
        "autograd": always by autograd; "analytic": forward-only, refused for a
        layer that does not allow it.
    method : "gradcam" or "hirescam"
        "gradcam" (paper): channel weights are the voxel mean of the gradient.
        "hirescam": the gradient times the activation, voxel by voxel (see the module
        docstring); the same map as "gradcam" at a pooled-linear layer.

    Examples
    --------
    >>> with GradCAM(model, ["_head_swish", "_blocks.4.8"]) as cam:  # doctest: +SKIP
    ...     result = cam(inputs, target="predicted")
    >>> result.cams["_head_swish"].shape  # doctest: +SKIP
    torch.Size([8, 1, 4, 4])
    """

    def __init__(self, model: nn.Module, layers: str | Sequence[str], *, cams: bool = True,
                 route: str = "auto", method: str = "gradcam") -> None:
        self.method = check_method(method)
        self.model = model
        self.layers = [layers] if isinstance(layers, str) else list(layers)
        if not self.layers:
            raise InputError("give at least one layer name for Grad-CAM")
        if len(set(self.layers)) != len(self.layers):
            raise InputError(f"layer names repeat: {self.layers}")
        self.modules = {name: find_layer(model, name) for name in self.layers}
        self.cams = cams
        self.heads = analytic_heads(model, self.layers, route)
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
            if not isinstance(output, torch.Tensor) or output.ndim not in (4, 5):
                shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
                state.bad_output[name] = str(shape)
                return None
            state.features[name] = widen(output.detach()).mean(dim=tuple(range(2, output.ndim)))
            state.grids[name] = tuple(int(n) for n in output.shape[2:])
            if name in self.heads and state.want_grad is not None:
                state.activations[name] = output.detach()
                return output.clone()  # downstream in-place ops cannot change the recorded activation
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
        # want_grad: None = no CAMs; False = CAMs from the forward pass only; True = autograd for some layer
        state = _CallState(want_grad=(len(self.heads) < len(self.layers)) if self.cams else None)
        self._local.state = state
        try:
            with torch.no_grad():  # the earliest hook switches recording on
                logits = self.model(inputs)
            self._check_run(state, logits, inputs)
            features = dict(state.features)
            if not self.cams:
                return CAMResult(widen(logits.detach()), None, features, {}, dict(state.grids))
            targets = resolve_targets(target, logits)
            cams = self._cams(state, logits, targets)
            return CAMResult(widen(logits.detach()), targets, features, cams, dict(state.grids))
        finally:
            self._local.state = None

    def _cams(self, state: _CallState, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        cams = {name: head_cam(state.activations[name], self.heads[name].weight, targets) for name in self.heads}
        traced = [name for name in self.layers if name not in self.heads]
        if not traced:
            return {name: cams[name] for name in self.layers}
        if not logits.requires_grad:
            raise InputError(f"layers {traced} do not feed the logits; pick layers on the path to the output")
        with torch.enable_grad():  # the caller may be under no_grad
            selected = logits.gather(1, targets[:, None]).sum()
            grads = torch.autograd.grad(selected, [state.activations[name] for name in traced], allow_unused=True)
        for name, grad in zip(traced, grads):
            if grad is None:
                raise InputError(f"layer {name!r} does not feed the logits; pick a layer on the path to the output")
            make = hires_cam if self.method == "hirescam" else grad_cam
            cams[name] = make(state.activations[name].detach(), grad)
        return {name: cams[name] for name in self.layers}

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
                    f"layer {name!r} outputs {state.bad_output[name]}, not a spatial map (N, C, z, y, x) or "
                    "(N, C, y, x); "
                    "Grad-CAM needs a convolutional layer: see gradcamo_dask.layer_grids(model)"
                )
        if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != inputs.shape[0]:
            raise InputError(f"the model must return logits (N, K); it returned {type(logits).__name__}")


def widen(tensor: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 (autocast) as float32; float32 and float64 unchanged."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


def grad_cam(activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """``ReLU((1/C') sum_c w_c A_c)`` with ``w_c`` the voxel mean of the gradients.

    ``activations`` and ``gradients``: ``(N, C', z, y, x)`` or, in 2D, ``(N, C', y, x)``;
    returns ``(N, z, y, x)`` (2D: ``(N, y, x)``) in float32 (float64 for float64 inputs).
    """
    a, g = widen(activations), widen(gradients)
    weights = g.mean(dim=tuple(range(2, g.ndim)), keepdim=True)
    return torch.relu((weights * a).sum(dim=1) / a.shape[1])


def hires_cam(activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """``ReLU((1/C') sum_c dY/dA_c * A_c)``, the gradient kept voxel by voxel (HiResCAM).

    Shapes and dtypes as :func:`grad_cam`. Written here, not taken from pytorch-grad-cam,
    because that package imports torchvision (kept out of CPU installs) and works from
    its own hooks, while this engine reuses the one backward pass of :class:`GradCAM`.
    """
    a, g = widen(activations), widen(gradients)
    return torch.relu((g * a).sum(dim=1) / a.shape[1])


def check_method(method: str) -> str:
    """``method`` if it is one of :data:`CAM_METHODS`, else InputError."""
    if method not in CAM_METHODS:
        raise InputError(f"CAM method must be one of {CAM_METHODS}, got {method!r}")
    return method


def analytic_heads(model: nn.Module, layers: Sequence[str], route: str = "auto") -> dict[str, nn.Linear]:
    """``{layer: linear}`` for the layers whose Grad-CAM needs no backward pass.

    A layer followed only by global average pooling and a linear layer ``W`` has
    ``dY_k/dA_c = W[k, c] / V`` exactly (``V`` voxels of the layer's grid). The model
    names such layers through a ``pooled_linear(layer)`` method returning the linear
    layer, or None (:class:`~gradcamo_dask.engine.models.EfficientNet3D` does, for
    ``_head_swish``); models without the method get autograd everywhere.
    """
    if route not in ("auto", "autograd", "analytic"):
        raise InputError(f"route must be 'auto', 'autograd' or 'analytic', got {route!r}")
    if route == "autograd":
        return {}
    lookup = getattr(model, "pooled_linear", None)
    heads = {name: lookup(name) for name in layers} if callable(lookup) else {}
    heads = {name: linear for name, linear in heads.items() if isinstance(linear, nn.Linear)}
    if route == "analytic" and len(heads) < len(layers):
        others = [name for name in layers if name not in heads]
        raise InputError(f"layers {others} are not followed by global average pooling and a linear layer alone, so "
                         f"their Grad-CAM needs a backward pass; use route='auto' or 'autograd'")
    return heads


def head_cam(activations: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Grad-CAM of a layer followed by global average pooling and a linear layer, from the forward pass.

    ``w_c = W[k, c] / V`` for class ``k``, so ``ReLU((1/C') sum_c W[k, c] A_c / V)``.
    ``activations (N, C', z, y, x)`` (2D: ``(N, C', y, x)``), ``weight (K, C')``, ``targets (N,)``;
    returns ``(N, z, y, x)`` (2D: ``(N, y, x)``) in float32 (float64 for float64 activations),
    like :func:`grad_cam`.
    """
    a = widen(activations)
    voxels = math.prod(a.shape[2:])
    with torch.autocast(device_type=a.device.type, enabled=False):  # a caller's autocast would make it bf16
        rows = weight.detach()[targets].to(a.dtype)  # (N, C')
        return torch.relu(torch.einsum("nc,nc...->n...", rows, a) / (voxels * a.shape[1]))


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
        targets = torch.as_tensor(to_numpy(target), device=logits.device).reshape(-1)
        if targets.dtype.is_floating_point or targets.dtype == torch.bool:
            raise InputError(f"per-cell targets must be integer class indices, got dtype {targets.dtype}")
        targets = targets.long()
        if targets.numel() != n:
            raise InputError(f"got {targets.numel()} targets for {n} cells; give one class index per cell")
    if n and (int(targets.min()) < 0 or int(targets.max()) >= k):
        raise InputError(f"target class indices must be in [0, {k - 1}] (the model has {k} classes)")
    return targets
