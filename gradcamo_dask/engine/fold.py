"""Batch-norm folded into the convolution before it, for inference: one layer fewer per conv, same numbers.

In eval mode a batch norm is an affine map per channel, so ``bn(conv(x))`` equals a
convolution with rescaled weights and a shifted bias. :func:`fold_batch_norm` returns a
folded copy of a model (the original is untouched) using PyTorch's own
``torch.nn.utils.fusion.fuse_conv_bn_eval``; which batch norm follows which
convolution is found by tracing one forward pass, so any CNN works, not only
EfficientNet.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

__all__ = ["fold_batch_norm", "foldable_pairs"]


def foldable_pairs(model: Any, input_shape: Sequence[int], keep: Sequence[str] = ()) -> list[tuple[str, str]]:
    """``(conv name, batch-norm name)`` pairs where the batch norm's input is the convolution's output.

    Traced with one forward pass on PyTorch's meta device (no memory, no compute) of a
    ``(1, channels, *input_shape)`` input, ``input_shape`` ``(z, y, x)`` voxels. A
    convolution named in ``keep`` (a Grad-CAM or feature layer: folding would change its
    activation) is never paired. Assumes, as conv -> batch-norm CNNs are built, that such a
    convolution's output feeds only its batch norm (the tests check the folded outputs).
    """
    import torch

    convs = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    norms = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)
    probe = copy.deepcopy(model).to("meta")
    produced: dict[int, str] = {}
    pairs: list[tuple[str, str]] = []

    def hook(name: str, module: Any, args: tuple, output: Any) -> None:
        if isinstance(module, norms) and args and id(args[0]) in produced:
            pairs.append((produced[id(args[0])], name))
        if isinstance(module, convs) and isinstance(output, torch.Tensor):
            produced[id(output)] = name

    first = next(m for m in probe.modules() if isinstance(m, convs))
    handles = [m.register_forward_hook(lambda mod, a, o, n=n: hook(n, mod, a, o))
               for n, m in probe.named_modules() if isinstance(m, (*convs, *norms))]
    try:
        with torch.no_grad():
            probe.eval()(torch.zeros((1, first.in_channels, *input_shape), device="meta"))
    finally:
        for h in handles:
            h.remove()
    keep = set(keep)
    return [(c, b) for c, b in pairs if c not in keep]


def fold_batch_norm(model: Any, input_shape: Sequence[int], keep: Sequence[str] = ()) -> Any:
    """A copy of ``model`` in eval mode with every foldable batch norm merged into its convolution.

    The batch norm becomes ``torch.nn.Identity`` (its name stays, so hooks by name still
    find a module with the same output). ``input_shape``: the model's input grid ``(z, y,
    x)``, voxels; ``keep``: layer names whose activations must not change (see
    :func:`foldable_pairs`). Outputs equal the unfolded model's in eval mode to float
    rounding (about 1e-6 relative).
    """
    import torch
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = copy.deepcopy(model).eval()
    pairs = foldable_pairs(folded, input_shape, keep)
    modules = dict(folded.named_modules())
    for conv_name, bn_name in pairs:
        _replace(folded, conv_name, fuse_conv_bn_eval(modules[conv_name], modules[bn_name]))
        _replace(folded, bn_name, torch.nn.Identity())
    return folded


def _replace(model: Any, name: str, module: Any) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
