"""Checkpoint files: written with the umask's mode, read back only as safetensors."""

from __future__ import annotations

import pickle

import pytest
import torch

from gradcamo_dask.errors import WeightsFormatError
from gradcamo_dask.jobs.checkpoint import load_tensors, save_tensors


def test_tensors_round_trip(tmp_path):
    path = tmp_path / "model.safetensors"
    save_tensors(path, {"w": torch.arange(6.0).reshape(2, 3)})
    assert torch.equal(load_tensors(path)["w"], torch.arange(6.0).reshape(2, 3))


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", pickle.dumps({"w": [1.0, 2.0]})])
def test_a_checkpoint_that_is_not_safetensors_is_named(tmp_path, content):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(WeightsFormatError, match="model.safetensors is not a readable safetensors checkpoint"):
        load_tensors(path)


def test_a_truncated_checkpoint_is_named(tmp_path):
    path = tmp_path / "optimizer.safetensors"
    save_tensors(path, {"m": torch.ones(64, 64)})
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(WeightsFormatError, match="optimizer.safetensors"):
        load_tensors(path)
