"""bf16 autocast only where torch and cuDNN compute bf16 conv3d right; float32 with a warning elsewhere."""

from __future__ import annotations

import warnings

import pytest
import torch

from gradcamo_dask.engine import precision
from gradcamo_dask.engine.precision import bf16_conv3d_problem, resolve_autocast

CUDA = torch.device("cuda")


@pytest.mark.parametrize("torch_version, cudnn, bad", [
    ("2.9.0", 91200, True), ("2.9.0+cu128", None, True), ("2.9.1", 91200, False), ("2.11.0+cu130", 90800, True),
    ("2.11.0", 91099, True), ("2.11.0", 91100, False), ("2.11.0", 90799, False), ("2.13.0", None, False),
])
def test_known_bad_versions(torch_version, cudnn, bad):
    assert (bf16_conv3d_problem(torch_version, cudnn) is not None) is bad


def test_bad_cudnn_falls_back_to_float32_with_a_warning(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.11.0+cu130")
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 90900)
    with pytest.warns(RuntimeWarning, match="cuDNN 90900"):
        assert resolve_autocast(CUDA, None) is False
    with pytest.warns(RuntimeWarning, match="float32"):
        assert resolve_autocast(CUDA, torch.bfloat16) is False
    assert resolve_autocast(CUDA, torch.float16) == torch.float16  # the check is about bf16
    assert resolve_autocast(torch.device("cpu"), torch.bfloat16) == torch.bfloat16  # no cuDNN on the CPU path


def test_bad_torch_falls_back_and_good_versions_keep_bf16(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 91300)
    monkeypatch.setattr(torch, "__version__", "2.9.0+cu129")
    with pytest.warns(RuntimeWarning, match="torch 2.9.0"):
        assert resolve_autocast(CUDA, True) is False
    monkeypatch.setattr(torch, "__version__", "2.11.0+cu130")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_autocast(CUDA, None) == torch.bfloat16
        assert resolve_autocast(CUDA, False) is False
        assert resolve_autocast(torch.device("cpu"), None) is False


def test_explain_and_training_share_the_check(monkeypatch):
    from gradcamo_dask.jobs.epochs import autocast_context as _autocast  # what training steps use

    monkeypatch.setattr(torch, "__version__", "2.9.0")
    monkeypatch.setattr(precision.torch, "__version__", "2.9.0")
    with pytest.warns(RuntimeWarning, match="torch 2.9.0"):
        context = _autocast(CUDA, None)
    assert not isinstance(context, torch.autocast)
