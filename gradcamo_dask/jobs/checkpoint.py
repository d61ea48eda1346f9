"""Training checkpoints without pickles: tensors in safetensors files, the rest in JSON.

Every file is written to a temporary name and moved into place, so a run cut off
mid-write leaves the previous checkpoint whole.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["CheckpointFiles", "differences", "load_tensors", "optimizer_from_files", "optimizer_to_files",
           "save_json", "save_tensors"]


class CheckpointFiles:
    """The file names of a checkpoint folder: state, last and best weights, optimizer."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.state = self.folder / "state.json"
        self.weights = self.folder / "model.safetensors"
        self.best = self.folder / "best.safetensors"
        self.optimizer = self.folder / "optimizer.safetensors"


def save_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write tensors (moved to the CPU) as a safetensors file, atomically."""
    from safetensors.torch import save_file

    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp))
    from gradcamo_dask.engine.bundles import honour_umask

    honour_umask(tmp)  # safetensors writes 0600 whatever the umask
    os.replace(tmp, path)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file onto the CPU; anything else is a :class:`WeightsFormatError` naming the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from gradcamo_dask.errors import WeightsFormatError

    try:
        return load_file(str(path))
    except (SafetensorError, ValueError, OSError) as err:
        raise WeightsFormatError(f"{path} is not a readable safetensors checkpoint ({err}); it may be truncated or "
                                 "of another format (pickled checkpoints are never loaded). Delete the checkpoint "
                                 "folder to train from the start, or resume from an intact one") from None


def optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state as (tensors for safetensors, JSON-able rest): no pickle."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entries in state["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value
            else:
                scalars[f"{index}.{name}"] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in state["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_from_files(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Inverse of :func:`optimizer_to_files` (loads into ``optimizer``)."""
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for key, value in meta.get("scalars", {}).items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def differences(saved: dict, current: dict) -> list[str]:
    """``"key: checkpoint X, now Y"`` for every key whose value differs."""
    out = []
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            out.append(f"{key}: checkpoint {saved.get(key)!r}, now {current.get(key)!r}")
    return out
