"""Attention maps of a vision transformer as the map G of Grad-CAMO, one pass per batch.

Three sources, chosen by name:

* ``"cls_attention"``: the last block's self-attention from the CLS token to the
  patches, ``softmax(QKᵀ/√d)[CLS, patches]``, averaged over heads.
* ``"rollout"``: attention rollout (Abnar & Zuidema 2020): per block the
  head-averaged attention plus the identity (the residual), rows renormalised,
  multiplied over blocks; the CLS row over the patches.
* ``"gradcam_tokens"``: Grad-CAM on the patch tokens entering the last block's
  attention (its ``norm1`` output; the last block's own output reaches the logits
  through the CLS token alone, so its patch tokens have zero gradient): tokens are
  channels-by-patches activations, weights the patch mean of the gradients.

Each map lives on the patch grid and is non-negative; it is scored with the
exact low-resolution route (:func:`~gradcamo_dask.engine.gradcamo.gradcamo_lowres`).
Features come from the same pass: the CLS token after the final layer norm.
Attention matrices are captured per call, never stored on the shared model: a
forward hook on each ``SABlock``'s ``drop_weights`` (the dropout MONAI applies to the
softmax attention) reads its input, and every hook of an :class:`AttentionCAM` records
only the forwards of the thread that entered it. MONAI's ``save_attn`` / ``att_mat``
are left alone, so threads (a threaded Dask worker, a ``ThreadPoolExecutor``) can
explain one model at once, each with its own ``AttentionCAM``; hooks are released on exit.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from gradcamo_dask.errors import InputError
from gradcamo_dask.engine.gradcam import CAMResult, grad_cam, resolve_targets, widen

__all__ = ["ATTENTION_SOURCES", "AttentionCAM", "attention_rollout", "cls_rollout", "is_attention_request"]

ATTENTION_SOURCES = ("cls_attention", "rollout", "gradcam_tokens")


def is_attention_request(layers: Sequence[str]) -> bool:
    """True when every name is an attention source; mixing them with layer names is refused."""
    chosen = [name in ATTENTION_SOURCES for name in layers]
    if any(chosen) and not all(chosen):
        raise InputError(f"attention sources {ATTENTION_SOURCES} and layer names cannot be mixed in one call, got "
                         f"{list(layers)}; explain them in two calls")
    return bool(chosen) and all(chosen)


def attention_rollout(attentions: Sequence[torch.Tensor]) -> torch.Tensor:
    """Rollout ``(N, T, T)`` of per-block attentions ``(N, heads, T, T)``, first block first.

    Hand-written: MONAI has no rollout, and it is four lines of algebra.
    """
    rollout = None
    for att in attentions:
        a = widen(att).mean(dim=1)
        a = 0.5 * a + 0.5 * torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        a = a / a.sum(dim=-1, keepdim=True)
        rollout = a if rollout is None else a @ rollout
    return rollout


def cls_rollout(attentions: Sequence[torch.Tensor]) -> torch.Tensor:
    """Row 0 (CLS) of :func:`attention_rollout`, ``(N, T)``, without forming the ``T x T`` products.

    ``e0ᵀ A_L ... A_1`` from the last block down: vector-matrix products, ``O(T²)`` per
    block instead of ``O(T³)`` (785 tokens of a 3D ViT: the full product cost ~0.4x a forward pass).
    """
    row = None
    for att in reversed(list(attentions)):
        a = widen(att).mean(dim=1)
        a = 0.5 * a + 0.5 * torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        a = a / a.sum(dim=-1, keepdim=True)
        row = a[:, 0] if row is None else torch.einsum("nt,nts->ns", row, a)
    return row


class AttentionCAM:
    """Attention maps and CLS features of a :class:`~gradcamo_dask.engine.vit.VisionTransformer`.

    Same interface as :class:`~gradcamo_dask.engine.gradcam.GradCAM`: a context
    manager that, called on inputs at the model grid, returns a
    :class:`~gradcamo_dask.engine.gradcam.CAMResult` whose cams, features and grids
    are keyed by source name.

    Parameters
    ----------
    model : VisionTransformer (or a module with a MONAI ``ViT`` as ``.vit``)
    sources : str or list of str
        Names from :data:`ATTENTION_SOURCES`.
    cams : bool
        False: logits and features only.
    """

    def __init__(self, model: nn.Module, sources: str | Sequence[str], *, cams: bool = True) -> None:
        self.model = model
        self.sources = [sources] if isinstance(sources, str) else list(sources)
        unknown = [s for s in self.sources if s not in ATTENTION_SOURCES]
        if unknown or not self.sources:
            raise InputError(f"attention sources must be among {ATTENTION_SOURCES}, got {self.sources}")
        self.net = getattr(model, "vit", model)
        blocks = getattr(self.net, "blocks", None)
        if blocks is None or not hasattr(self.net, "cls_token") or not hasattr(self.net, "norm"):
            raise InputError(f"{type(model).__name__} is not a MONAI ViT classifier with a CLS token; build it "
                             "with gradcamo_dask.engine.vit.vit()")
        if any(getattr(b.attn, "use_flash_attention", False) for b in blocks):
            raise InputError("the ViT uses flash attention, which never forms the attention matrix; rebuild it "
                             "with use_flash_attention=False")
        self.blocks = list(blocks)
        self.grid = tuple(int(n) for n in getattr(model, "patch_grid"))
        self.cams = cams
        self._handles: list = []
        self._seen: dict[str, torch.Tensor] = {}
        self._thread: int | None = None

    def __enter__(self) -> AttentionCAM:
        self._thread = threading.get_ident()  # hooks fire for every thread's forwards; record this one's only
        wanted = range(len(self.blocks)) if "rollout" in self.sources else [len(self.blocks) - 1]
        for i in wanted if self.cams else []:
            self._handles.append(self.blocks[i].attn.drop_weights.register_forward_hook(self._keep_attention(i)))
        self._handles.append(self.net.norm.register_forward_hook(self._keep("final")))
        if self.cams and "gradcam_tokens" in self.sources:
            self._handles.append(self.blocks[-1].norm1.register_forward_hook(self._trace_tokens))
        return self

    def __exit__(self, *exc_info: Any) -> None:
        while self._handles:
            self._handles.pop().remove()
        self._seen.clear()
        self._thread = None

    def _mine(self) -> bool:
        return threading.get_ident() == self._thread

    def _keep(self, key: str):
        def hook(_module: nn.Module, _args: Any, output: torch.Tensor) -> None:
            if self._mine():
                self._seen[key] = output

        return hook

    def _keep_attention(self, index: int):
        # The input of SABlock.drop_weights is the softmax attention (N, heads, T, T) of this very call.
        def hook(_module: nn.Module, args: Any, _output: torch.Tensor) -> None:
            if self._mine():
                self._seen[f"attention_{index}"] = args[0].detach()

        return hook

    def _trace_tokens(self, _module: nn.Module, _args: Any, output: torch.Tensor) -> torch.Tensor | None:
        if not self._mine():
            return None  # another thread's forward: leave its tokens alone
        # Gradients from here on only (as GradCAM does): a leaf copy of the tokens.
        torch.set_grad_enabled(True)
        tokens = output.detach().requires_grad_()
        self._seen["tokens"] = tokens
        return tokens.clone()

    def __call__(self, inputs: torch.Tensor, target: Any = "predicted") -> CAMResult:
        """One pass over ``inputs`` ``(N, C, [z,] y, x)`` at the model grid; ``target`` as for GradCAM."""
        if not self._handles:
            raise RuntimeError("use AttentionCAM as a context manager: `with AttentionCAM(model, sources) as cam:`")
        self._seen.clear()
        with torch.no_grad():
            logits = self.model(inputs)
        features = widen(self._seen["final"][:, 0].detach())
        grids = {s: self.grid for s in self.sources}
        feats = {s: features for s in self.sources}
        if not self.cams:
            return CAMResult(widen(logits.detach()), None, feats, {}, grids)
        targets = resolve_targets(target, logits)
        maps = {s: self._map(s, logits, targets).reshape(-1, *self.grid) for s in self.sources}
        return CAMResult(widen(logits.detach()), targets, feats, maps, grids)

    def _map(self, source: str, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``(N, patches)`` map of one source."""
        if source == "cls_attention":
            return widen(self._seen[f"attention_{len(self.blocks) - 1}"]).mean(dim=1)[:, 0, 1:]
        if source == "rollout":
            return cls_rollout([self._seen[f"attention_{i}"] for i in range(len(self.blocks))])[:, 1:]
        tokens = self._seen["tokens"]
        with torch.enable_grad():
            selected = logits.gather(1, targets[:, None]).sum()
            (grad,) = torch.autograd.grad(selected, [tokens])
        # Patch tokens as a (N, D, patches) activation map: Grad-CAM's channels are the D features.
        return grad_cam(tokens.detach()[:, 1:].transpose(1, 2), grad[:, 1:].transpose(1, 2))
