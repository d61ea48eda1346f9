"""One adapter for Cellpose 3.x (cyto3, nuclei and custom CPnet models) and 4.x (Cellpose-SAM).

What it guarantees, whichever Cellpose is installed:

- Weights are resolved by this module, never by Cellpose: a file path, a model
  name looked up in ``CELLPOSE_LOCAL_MODELS_PATH`` and then in Cellpose's default
  cache ``~/.cellpose/models``. A missing file raises
  :class:`~gradcamo_dask.errors.WeightsNotFoundError` at once, saying where to put
  it; no download is attempted unless asked (``allow_download=True``). Cellpose
  is only ever handed an existing absolute path, so its silent fallback to its
  default model (which it takes when a given path does not exist) cannot happen.
- A file that is not a Cellpose model, or one made for the other major version,
  raises :class:`~gradcamo_dask.errors.WeightsFormatError` before Cellpose
  (which loads state dicts with ``strict=False``) can half-load it.
- The model is loaded once per process and device (a module-level cache keyed by
  weights path, device and Cellpose major version) and never travels in a Dask
  graph: tasks carry a small :class:`CellposeSettings` with the path only. Calls
  to one model are serialised by a lock: torch already uses every core of a CPU
  worker, and one GPU runs one batch at a time.
- ``device="auto"`` picks CUDA (or Apple MPS) when the worker process sees one.

The mapping of our arguments to ``CellposeModel.eval`` differs by version:
3.x takes ``channels=[cytoplasm, nucleus]`` (1-based, 0 = none); 4.x has no
``channels`` argument and reads the first three channels of the array in any
order, so it gets ``[cytoplasm, nucleus, zeros]`` and no ``channels``.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gradcamo_dask.errors import InputError, WeightsFormatError, WeightsNotFoundError

__all__ = [
    "CellposeSettings",
    "cellpose_major_version",
    "resolve_cellpose_weights",
    "check_cellpose_weights",
    "cellpose_statistics",
    "cellpose_inputs",
    "run_cellpose",
    "get_cellpose_model",
    "clear_cellpose_cache",
]

#: Built-in model names and the file each is cached under by Cellpose 3.x.
CELLPOSE3_FILES = {"cyto": "cytotorch_0", "cyto2": "cyto2torch_0", "nuclei": "nucleitorch_0"}
CELLPOSE3_URL = "https://www.cellpose.org/models/{name}"
CELLPOSE4_URL = "https://huggingface.co/mouseland/cellpose-sam/resolve/main/cpsam"
DEFAULT_MODEL = {3: "cyto3", 4: "cpsam"}


def cellpose_major_version() -> int:
    """Major version of the installed ``cellpose`` package (3 or 4), read without importing it."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        text = version("cellpose")
    except PackageNotFoundError as error:
        raise InputError(
            "method='cellpose' needs the cellpose package: pip install 'cellpose>=3.1' "
            "(or use method='watershed', which needs no weights)"
        ) from error
    return int(text.split(".")[0])


def model_directories() -> list[Path]:
    """Folders searched for a model name: ``CELLPOSE_LOCAL_MODELS_PATH`` (read now), then ``~/.cellpose/models``."""
    folders = []
    env = os.environ.get("CELLPOSE_LOCAL_MODELS_PATH")
    if env:
        folders.append(Path(env).expanduser())
    default = Path.home() / ".cellpose" / "models"
    if default not in folders:
        folders.append(default)
    return folders


def _file_names(name: str, major: int) -> list[str]:
    names = [name]
    if major < 4 and name in CELLPOSE3_FILES:
        names.insert(0, CELLPOSE3_FILES[name])
    return names


def _looks_like_path(model: str) -> bool:
    return (
        os.sep in model
        or (os.altsep is not None and os.altsep in model)
        or model.startswith(("~", "."))
        or Path(model).suffix in {".pth", ".pt", ".ckpt", ".bin"}
    )


def resolve_cellpose_weights(
    model: str | os.PathLike[str] | None = None,
    *,
    major: int | None = None,
    allow_download: bool = False,
) -> Path:
    """Absolute path of the Cellpose weights named by ``model``, checked to exist.

    Parameters
    ----------
    model : str or path-like, optional
        A weights file, or a model name (``"cyto3"``, ``"nuclei"``, ``"cpsam"``, a
        custom model's file name) looked up in ``CELLPOSE_LOCAL_MODELS_PATH`` and
        then in ``~/.cellpose/models``. None: the installed Cellpose's default
        (``cyto3`` for 3.x, ``cpsam`` for 4.x).
    major : int, optional
        Cellpose major version; detected when None.
    allow_download : bool
        Let Cellpose download a missing built-in model into its cache. Off by
        default: an offline machine must fail at once, not hang on the network.

    Raises
    ------
    WeightsNotFoundError
        The file or name cannot be found; the message says where to put it.
    """
    major = cellpose_major_version() if major is None else major
    if model is None:
        model = DEFAULT_MODEL.get(major, "cyto3")
    text = os.fspath(model)
    path = Path(text).expanduser()
    if path.is_file():
        return path.resolve()
    if isinstance(model, os.PathLike) or _looks_like_path(text):
        if path.is_dir():
            raise WeightsNotFoundError(
                f"Cellpose weights {text!r} is a folder; pass the weights file inside it "
                "(Cellpose saves a single file per model, e.g. models/<name>)"
            )
        raise WeightsNotFoundError(
            f"Cellpose weights file {text!r} does not exist. Pass the path of an existing weights file, "
            "or a model name found in CELLPOSE_LOCAL_MODELS_PATH or ~/.cellpose/models "
            "(Cellpose itself would silently use its default model instead; gradcamo-dask refuses to)."
        )
    folders = model_directories()
    tried = [folder / name for folder in folders for name in _file_names(text, major)]
    for candidate in tried:
        if candidate.is_file():
            return candidate.resolve()
    if allow_download and (text == "cpsam" if major >= 4 else text in _cellpose3_builtin_names()):
        return _download_builtin(text, major)
    if major >= 4:
        url = CELLPOSE4_URL if text == "cpsam" else None
    else:
        url = CELLPOSE3_URL.format(name=_file_names(text, major)[0]) if text in _cellpose3_builtin_names() else None
    where = folders[0]
    how = (
        f"download {url} on a machine with internet access and copy it to {where / _file_names(text, major)[0]}"
        if url
        else f"copy the weights file to {where / text}"
    )
    raise WeightsNotFoundError(
        f"Cellpose weights {text!r} not found (Cellpose {major}.x); looked for "
        + ", ".join(str(t) for t in tried)
        + f". No download was attempted. To fix: {how}; or set CELLPOSE_LOCAL_MODELS_PATH to the folder "
        "that holds it; or pass the file's path as model=...; or pass allow_download=True on a machine "
        "with internet access. method='watershed' needs no weights."
    )


def _cellpose3_builtin_names() -> set[str]:
    return {
        "cyto3", "nuclei", "cyto2_cp3", "tissuenet_cp3", "livecell_cp3", "yeast_PhC_cp3",
        "yeast_BF_cp3", "bact_phase_cp3", "bact_fluor_cp3", "deepbacs_cp3", "cyto2", "cyto",
    }  # fmt: skip


def _download_builtin(name: str, major: int) -> Path:  # pragma: no cover - needs the network
    models = importlib.import_module("cellpose.models")
    if major >= 4:
        return Path(models.cache_CPSAM_model_path()).resolve()
    return Path(models.model_path(name)).resolve()


def _state_dict_keys(path: Path) -> list[str]:
    import torch

    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:
            # mmap needs the zip format of torch.save; older files load without it
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a file that is not a state dict
        raise WeightsFormatError(
            f"{path} is not a Cellpose model: torch cannot read it as a weights file "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). "
            "Pass a file saved by Cellpose (training or its model cache)."
        ) from error
    if not isinstance(state, Mapping) or not state:
        raise WeightsFormatError(
            f"{path} is not a Cellpose model: it holds a {type(state).__name__}, not a state dict of tensors"
        )
    keys = [str(k)[7:] if str(k).startswith("module.") else str(k) for k in state]
    del state
    return keys


def check_cellpose_weights(path: str | os.PathLike[str], major: int | None = None) -> str:
    """Check that ``path`` holds Cellpose weights for the installed major version.

    Returns the weights' family: ``"cpnet"`` (Cellpose 1-3 networks) or
    ``"cellpose-sam"`` (Cellpose 4). Reads the tensor names only (memory-mapped).

    Raises
    ------
    WeightsNotFoundError
        The file does not exist.
    WeightsFormatError
        The file is not a Cellpose model, or is one for the other major version.
    """
    major = cellpose_major_version() if major is None else major
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(f"Cellpose weights file {path} does not exist")
    if path.stat().st_size == 0:
        raise WeightsFormatError(f"{path} is not a Cellpose model: the file is empty")
    keys = set(_state_dict_keys(path))
    if "output.2.weight" in keys and "diam_mean" in keys:
        family = "cpnet"
    elif "W2" in keys and "out.weight" in keys:
        family = "cellpose-sam"
    else:
        shown = ", ".join(sorted(keys)[:5])
        raise WeightsFormatError(
            f"{path} is not a Cellpose model: its tensors ({shown}, ...) are neither a Cellpose 3 network "
            "(output.2.weight, diam_mean) nor a Cellpose-SAM network (W2, out.weight)"
        )
    if family == "cellpose-sam" and major < 4:
        raise WeightsFormatError(
            f"{path} holds Cellpose-SAM (Cellpose 4) weights but cellpose {major}.x is installed: "
            "install cellpose>=4 or pass Cellpose 3 weights (e.g. cyto3)"
        )
    if family == "cpnet" and major >= 4:
        raise WeightsFormatError(
            f"{path} holds Cellpose 3 (CPnet) weights but cellpose {major}.x is installed, which runs "
            "Cellpose-SAM networks only: pass Cellpose-SAM weights (cpsam) or install cellpose<4"
        )
    return family


_HASHES: dict[tuple[str, int, int], str] = {}


def weights_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a weights file (cached per path, size and modification time)."""
    path = Path(path)
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]


@dataclass(frozen=True)
class CellposeSettings:
    """Everything a worker needs to run Cellpose on one site; small and picklable.

    Distances are in xy voxels; ``anisotropy`` is the z step over the xy pixel size.
    ``eval_options`` are passed to ``CellposeModel.eval`` as they are (any
    option of the installed Cellpose, e.g. ``niter`` or ``augment``).
    """

    weights: str
    major: int
    device: str = "auto"
    diameter: float | None = None
    flow_threshold: float = 0.75
    cellprob_threshold: float = 0.0
    stitch_threshold: float = 0.05
    anisotropy: float = 1.71
    min_size: int = 30
    do_3D: bool = False
    batch_size: int = 8
    normalize: bool = True
    eval_options: tuple[tuple[str, Any], ...] = field(default_factory=tuple)


def cellpose_statistics(
    nucleus: np.ndarray, cytoplasm: np.ndarray | None = None, *, percentiles: tuple[float, float] = (1.0, 99.0)
) -> dict[str, Any]:
    """Per-channel intensity range of a whole site, as Cellpose's own normalisation computes it.

    Cellpose maps the 1st and 99th percentiles of each channel of the stack it
    is given to 0 and 1. Given these site-level numbers, every tile of a tiled
    site is normalised the same way as the untiled site would be.
    """

    def low_high(values: np.ndarray) -> list[float]:
        low, high = (float(v) for v in np.percentile(np.asarray(values, dtype=np.float32), percentiles))
        if not high > low:
            high = low + 1.0
        return [low, high]

    constant = all(
        a is None or float(np.min(a)) == float(np.max(a)) for a in (nucleus, cytoplasm)
    )
    return {
        "nucleus_range": low_high(nucleus),
        "cytoplasm_range": None if cytoplasm is None else low_high(cytoplasm),
        "constant": constant,
    }


def cellpose_inputs(
    nucleus: np.ndarray,
    cytoplasm: np.ndarray | None,
    settings: CellposeSettings,
    statistics: Mapping[str, Any] | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """The array and keyword arguments for ``CellposeModel.eval`` of the installed major version.

    Parameters
    ----------
    nucleus, cytoplasm : numpy.ndarray
        ``(z, y, x)`` intensities; ``cytoplasm`` may be None (nucleus-only).
    settings : CellposeSettings
    statistics : mapping, optional
        From :func:`cellpose_statistics` on the whole site; used as fixed
        normalisation ranges when ``settings.normalize``.

    Returns
    -------
    x : numpy.ndarray
        float32, ``(z, channel, y, x)``, or ``(channel, y, x)`` for a single slice.
    kwargs : dict
    """
    n_z = nucleus.shape[0]
    planes = [cytoplasm, nucleus] if cytoplasm is not None else [nucleus]
    ranges = []
    if statistics is not None:
        ranges = [statistics["cytoplasm_range"], statistics["nucleus_range"]] if cytoplasm is not None else [
            statistics["nucleus_range"]
        ]
    n_channels = 3 if settings.major >= 4 else 2
    zeros = np.zeros(nucleus.shape, np.float32)
    while len(planes) < n_channels:
        planes.append(zeros)
        ranges.append([0.0, 1.0])
    x = np.stack([np.asarray(p, dtype=np.float32) for p in planes], axis=1)  # (z, c, y, x)
    single = n_z == 1
    kwargs: dict[str, Any] = {
        "diameter": settings.diameter,
        "flow_threshold": settings.flow_threshold,
        "cellprob_threshold": settings.cellprob_threshold,
        "min_size": settings.min_size,
        "batch_size": settings.batch_size,
        "do_3D": bool(settings.do_3D and not single),
        "anisotropy": settings.anisotropy,
        "stitch_threshold": 0.0 if (single or settings.do_3D) else settings.stitch_threshold,
    }
    if single:
        x = x[0]
        kwargs.update(channel_axis=0, z_axis=None)
    else:
        kwargs.update(channel_axis=1, z_axis=0)
    if settings.major < 4:
        kwargs["channels"] = [1, 2] if cytoplasm is not None else [1, 0]
    if settings.normalize and statistics is not None:
        # per-channel [low, high] after Cellpose moved channels last; the 3.x
        # reshape keeps [cytoplasm, nucleus] (or [nucleus, zeros]) in this order
        kwargs["normalize"] = {"lowhigh": np.asarray(ranges[:n_channels], dtype=np.float64)}
    else:
        kwargs["normalize"] = bool(settings.normalize)
    kwargs.update(dict(settings.eval_options))
    return x, kwargs


_CACHE: dict[tuple[str, str, int], tuple[Any, threading.Lock]] = {}
_CACHE_LOCK = threading.Lock()


def _torch_device(device: str) -> Any:
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


def _load_model(weights: str, device: Any, major: int) -> Any:
    """Build a ``CellposeModel`` from an existing weights file on ``device``."""
    models = importlib.import_module("cellpose.models")
    # both major versions take the same constructor arguments for a weights file
    return models.CellposeModel(gpu=device.type != "cpu", pretrained_model=weights, device=device)


def get_cellpose_model(settings: CellposeSettings) -> tuple[Any, threading.Lock]:
    """The process's Cellpose model for these weights and device, loaded on first use.

    Returns the model and the lock that serialises its ``eval`` calls.
    """
    device = _torch_device(settings.device)
    key = (settings.weights, str(device), settings.major)
    with _CACHE_LOCK:
        if key not in _CACHE:
            if not Path(settings.weights).is_file():  # the guard against Cellpose's silent fallback
                raise WeightsNotFoundError(
                    f"Cellpose weights file {settings.weights} does not exist on this worker "
                    f"(pid {os.getpid()}); workers need the same path as the client (shared file system "
                    "or the same container image)"
                )
            _CACHE[key] = (_load_model(settings.weights, device, settings.major), threading.Lock())
        return _CACHE[key]


def clear_cellpose_cache() -> None:
    """Forget the models loaded by this process (frees their memory)."""
    with _CACHE_LOCK:
        _CACHE.clear()


def run_cellpose(
    nucleus: np.ndarray,
    cytoplasm: np.ndarray | None,
    settings: CellposeSettings,
    statistics: Mapping[str, Any] | None = None,
) -> np.ndarray:
    """Segment one site (or tile window) with Cellpose; ``(z, y, x)`` int32 labels, ids 1..N.

    An all-constant input (e.g. an all-zero site) gives no cells without running the network.
    """
    nucleus = np.asarray(nucleus)
    if statistics is None:
        statistics = cellpose_statistics(nucleus, cytoplasm)
    if statistics.get("constant"):
        return np.zeros(nucleus.shape, np.int32)
    model, lock = get_cellpose_model(settings)
    x, kwargs = cellpose_inputs(nucleus, cytoplasm, settings, statistics)
    with lock:
        result = model.eval(x, **kwargs)
    masks = np.asarray(result[0])
    if masks.ndim == 2:
        masks = masks[np.newaxis]
    if masks.shape != nucleus.shape:
        raise InputError(f"Cellpose returned labels of shape {masks.shape} for an image of shape {nucleus.shape}")
    if masks.size and int(masks.max()) >= np.iinfo(np.int32).max:
        raise InputError("Cellpose returned more objects than int32 labels can hold")
    ids = np.unique(masks)
    ids = ids[ids != 0]
    lut = np.zeros(int(masks.max()) + 1 if masks.size else 1, np.int32)
    lut[ids] = np.arange(1, ids.size + 1, dtype=np.int32)
    return lut[masks]
