"""A differentiable Grad-CAMO: the regulariser ``loss = CE - lambda * mean Grad-CAMO``.

From ONE forward pass: a forward hook keeps the chosen layer's activation ``A`` in
the graph; the logits give the cross-entropy; ``torch.autograd.grad(Y_k, A,
create_graph=True)`` gives ``dY_k/dA`` as a differentiable function of the
parameters, so the Grad-CAM weights ``w_c = mean dY_k/dA_c`` and the map
``G~ = ReLU(mean_c w_c A_c)`` both carry gradients (second derivatives of the
network). The score uses the exact low-resolution route of
:mod:`gradcamo_dask.engine.gradcamo`: ``inside = <G~, Uzᵀ Uyᵀ Uxᵀ M>`` and
``total = <G~, (Uzᵀ1) ⊗ (Uyᵀ1) ⊗ (Uxᵀ1)>``, with the mask contracted once per batch
(a constant), so no full-resolution map exists, and ``score = inside / total``.

Undefined scores: a cell whose map is all zero (``total == 0``, every weighted
activation negative) has no Grad-CAMO (NaN in the audit). Such cells are left out
of the mean (the mean runs over cells with ``total > 0``; with none the term is 0),
and the ratio is computed with a safe denominator so that neither the value nor
its gradient is NaN. They still get the cross-entropy gradient. Their count is
returned so that training can report it.

Explained class: the true label by default (what the model should look at the cell
for); ``"predicted"`` follows the paper's audit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gradcamo_dask.errors import InputError
from gradcamo_dask.engine.gradcam import check_method, widen
from gradcamo_dask.engine.gradcamo import contract_mask, total_weights
from gradcamo_dask.engine.layers import find_layer

__all__ = ["RegularizedLoss", "gradcamo_loss", "mask_weights"]


@dataclass
class RegularizedLoss:
    """What :func:`gradcamo_loss` returns (tensors keep their graph).

    Attributes
    ----------
    loss : scalar tensor, ``cross_entropy - lam * mean_gradcamo``
    cross_entropy : scalar tensor
    mean_gradcamo : scalar tensor (0 when no cell has a defined score)
    logits : (N, K) tensor
    scores : (N,) tensor, NaN where undefined (detached)
    n_undefined : int
    """

    loss: torch.Tensor
    cross_entropy: torch.Tensor
    mean_gradcamo: torch.Tensor
    logits: torch.Tensor
    scores: torch.Tensor
    n_undefined: int


def mask_weights(masks: Any, grid: tuple[int, int, int], dtype: torch.dtype, device: torch.device
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inside weights (N, z, y, x), total weights (z, y, x))`` of masks at the crop grid
    for a CAM at ``grid`` (the two constants of the low-resolution route)."""
    m = torch.as_tensor(masks, device=device)
    with torch.autocast(device_type=m.device.type, enabled=False):  # never bf16, also under a caller's autocast
        inside = contract_mask(m, grid).to(dtype)
        total = total_weights(grid, tuple(m.shape[1:]), m.to(torch.float64)).to(dtype)
    return inside, total


def gradcamo_loss(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    masks: Any,
    *,
    layer: str,
    lam: float = 0.0,
    target: str = "label",
    evidence: str = "positive",
    method: str = "gradcam",
) -> RegularizedLoss:
    """Cross-entropy minus ``lam`` times the batch's mean Grad-CAMO at ``layer``.

    Parameters
    ----------
    model : torch.nn.Module
        Returns logits ``(N, K)`` for inputs ``(N, C, z, y, x)``.
    inputs : tensor (N, C, z, y, x)
        Model inputs (at the model grid).
    labels : tensor (N,) int64
        True classes (cross-entropy targets).
    masks : array or tensor (N, Z, Y, X) bool
        Central-cell masks at the crop grid (the grid Grad-CAMO is defined on).
    layer : str
        Named layer of ``model`` with a 5D output ``(N, C', z, y, x)``.
    lam : float
        Weight of the Grad-CAMO term; 0 gives the plain cross-entropy (and skips
        the Grad-CAM computation entirely).
    target : ``"label"`` or ``"predicted"``
        Class whose Grad-CAM is scored.
    evidence : ``"positive"`` or ``"both"``
        ``"positive"`` (the paper's): the score of Grad-CAM, ``ReLU(mean_c w_c A_c)``. ``"both"``: the score
        of ``|mean_c w_c A_c|``, so that evidence *against* the class, which the ReLU hides, must lie in the
        cell too (a model cannot raise the score by turning its reading of the neighbours negative;
        ``benchmarks/diagnose_maps.py``). Audits always score the paper's map.
    method : ``"gradcam"`` or ``"hirescam"``
        ``"gradcam"`` (the paper's): channel weights ``w_c`` are the voxel mean of the gradient.
        ``"hirescam"``: the gradient is kept voxel by voxel, ``mean_c dY_k/dA_c * A_c``, so the score counts
        where each voxel's contribution to the logit lies, not where a channel is active.

    Returns
    -------
    RegularizedLoss
    """
    _check_options(target, evidence, method)
    if lam == 0:
        logits = model(inputs)
        ce = F.cross_entropy(widen(logits), labels)
        nan = torch.full((inputs.shape[0],), float("nan"), device=inputs.device)
        return RegularizedLoss(ce, ce, torch.zeros((), device=inputs.device), logits, nan, 0)

    captured: list[torch.Tensor] = []

    def hook(_module: nn.Module, _args: Any, output: Any) -> None:
        captured.append(output)

    handle = find_layer(model, layer).register_forward_hook(hook)
    try:
        with torch.enable_grad():  # the Grad-CAM weights need a graph, also for evaluation under no_grad
            logits = model(inputs)
    finally:
        handle.remove()
    if len(captured) != 1 or not isinstance(captured[0], torch.Tensor) or captured[0].ndim != 5:
        raise InputError(f"layer {layer!r} must run once per forward pass and give (N, C, z, y, x) activations")
    activation = captured[0]
    ce = F.cross_entropy(widen(logits), labels)
    classes = labels if target == "label" else logits.detach().argmax(dim=1)
    chosen = logits.gather(1, classes.view(-1, 1)).sum()
    with torch.enable_grad():
        (gradient,) = torch.autograd.grad(chosen, activation, create_graph=True)
    inside, total = _map_sums(activation, gradient, masks, evidence, method)
    defined = total > 0
    safe_total = torch.where(defined, total, torch.ones_like(total))
    ratio = torch.where(defined, inside / safe_total, torch.zeros_like(total))
    n_defined = int(defined.sum())
    mean_score = ratio.sum() / n_defined if n_defined else ratio.sum() * 0.0
    scores = torch.where(defined, ratio, torch.full_like(ratio, float("nan"))).detach()
    loss = ce - lam * mean_score
    return RegularizedLoss(loss, ce, mean_score, logits, scores, int(defined.numel() - n_defined))


def _check_options(target: str, evidence: str, method: str) -> None:
    if target not in ("label", "predicted"):
        raise InputError(f"target must be 'label' or 'predicted', got {target!r}")
    if evidence not in ("positive", "both"):
        raise InputError(f"evidence must be 'positive' (Grad-CAM, the paper's) or 'both' (|map|), got {evidence!r}")
    check_method(method)


def _map_sums(activation: torch.Tensor, gradient: torch.Tensor, masks: Any, evidence: str,
              method: str = "gradcam") -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 5's two sums ``(inside, total)`` per cell of the map ``ReLU`` (``evidence="positive"``) or ``|.|``
    (``"both"``) of ``mean_c w_c A_c`` (``method="hirescam"``: of ``mean_c dY/dA_c * A_c``), by the
    low-resolution route; both keep their graph."""
    # The map and the mask contractions in float32 (float64 for a float64 model), outside any autocast:
    # bf16 matmuls would round the interpolation weights and the scores.
    with torch.autocast(device_type=activation.device.type, enabled=False):
        a, g = widen(activation), widen(gradient)
        weights = g if method == "hirescam" else g.mean(dim=(2, 3, 4), keepdim=True)
        signed = (weights * a).sum(dim=1) / a.shape[1]  # (N, z, y, x)
        cam = torch.relu(signed) if evidence == "positive" else signed.abs()
        inside_w, total_w = mask_weights(masks, tuple(cam.shape[1:]), cam.dtype, cam.device)
        return (cam * inside_w).sum(dim=(1, 2, 3)), (cam * total_w[None]).sum(dim=(1, 2, 3))
