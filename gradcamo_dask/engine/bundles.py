"""Model bundles: ``model.safetensors`` + ``config.json``; loading never unpickles.

The config names the architecture (rebuilt from :data:`ARCHITECTURES`), the
channel and class names, the crop and model grids, the normalisation statistics,
the default Grad-CAM layers and the training provenance. A content hash over both
files identifies the bundle in output provenance.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradcamo_dask.errors import (BundleMismatchError, DimensionalityError, InputError, MetadataError,
                                  WeightsFormatError, WeightsNotFoundError)
from gradcamo_dask.engine.attention import ATTENTION_SOURCES
from gradcamo_dask.engine.layers import find_layer
from gradcamo_dask.engine.models import efficientnet3d
from gradcamo_dask.engine.models2d import efficientnet2d
from gradcamo_dask.engine.vit import vit

__all__ = ["ARCHITECTURES", "Bundle", "BundleConfig", "describe_bundle", "honour_umask", "open_bundle", "write_bundle"]

BUNDLE_FORMAT = "gradcamo-dask-bundle"
BUNDLE_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

ARCHITECTURES = {"efficientnet3d": efficientnet3d, "efficientnet2d": efficientnet2d, "vit": vit}


@dataclass(frozen=True)
class BundleConfig:
    """What a bundle's ``config.json`` says (item access works too: ``config["channels"]``).

    Grids are ``(z, y, x)`` in voxels; a ``None`` entry of ``crop_shape`` means
    "any" (e.g. all z slices of a site). ``crop_fill`` is what filled crop windows past
    the site in training ("zero" or "background"; bundles written before it existed: "zero").
    """

    architecture: dict
    channels: list[str]
    classes: list[str]
    crop_shape: list[int | None]
    input_shape: list[int]
    normalization: dict
    layers: list[str]
    provenance: dict = field(default_factory=dict)
    weights_sha256: str = ""
    crop_fill: str = "zero"
    format: str = BUNDLE_FORMAT
    version: int = BUNDLE_VERSION

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def spatial_dims(self) -> int:
        """2 or 3: the model grid's axes ((y, x) or (z, y, x))."""
        return len(self.input_shape)


def _names(kind: str, names: Sequence[str]) -> str:
    return f"{len(names)} {kind} ({', '.join(map(str, names))})"


@dataclass
class Bundle:
    """A loaded model bundle.

    Attributes
    ----------
    model : torch.nn.Module
        In eval mode on the requested device.
    config : BundleConfig
    hash : str
        ``"sha256:<hex>"`` over the weights file and ``config.json`` bytes.
    path : pathlib.Path
    """

    model: nn.Module
    config: BundleConfig
    hash: str
    path: Path

    def check_fits(
        self,
        channels: Sequence[str] | None = None,
        classes: Sequence[str] | None = None,
        crop_shape: Sequence[int | None] | None = None,
    ) -> None:
        """Refuse data that this model cannot score; the error names both sides.

        Parameters
        ----------
        channels : list of str, optional
            The plate's channel names; must equal the bundle's, in order.
        classes : list of str, optional
            Class (treatment) names the data will use as targets; each must be one
            of the bundle's classes.
        crop_shape : (z, y, x), optional
            The crop grid in voxels; ``None`` entries (here or in the bundle) match
            anything.

        Raises
        ------
        BundleMismatchError
        """
        cfg = self.config
        if channels is not None and list(channels) != list(cfg.channels):
            if len(channels) != len(cfg.channels):
                raise BundleMismatchError(
                    f"bundle expects {_names('channels', cfg.channels)}, plate has {len(channels)} "
                    f"({', '.join(map(str, channels))}); select the bundle's channels or use a "
                    "bundle trained on these"
                )
            raise BundleMismatchError(
                f"bundle expects channels ({', '.join(cfg.channels)}) in this order, plate has "
                f"({', '.join(map(str, channels))}); reorder the plate's channels or rename them"
            )
        if classes is not None:
            unknown = [c for c in classes if c not in cfg.classes]
            if unknown:
                raise BundleMismatchError(
                    f"bundle knows {_names('classes', cfg.classes)}, data has "
                    f"{_names('classes', list(classes))}; not in the bundle: {', '.join(map(str, unknown))}"
                )
        if crop_shape is not None and len(crop_shape) != cfg.spatial_dims:
            raise DimensionalityError(
                f"bundle is {cfg.spatial_dims}D (crops {tuple(cfg.crop_shape)}), data is {len(crop_shape)}D (crops "
                f"{tuple(crop_shape)}); use a {len(crop_shape)}D bundle (e.g. trained with efficientnet"
                f"{len(crop_shape)}d) for these crops"
            )
        if crop_shape is not None:
            crop = list(crop_shape)
            ok = len(crop) == len(cfg.crop_shape) and all(
                a is None or b is None or int(a) == int(b) for a, b in zip(crop, cfg.crop_shape)
            )
            if not ok:
                raise BundleMismatchError(
                    f"bundle expects crops of {tuple(cfg.crop_shape)} voxels (z, y, x; None = any), "
                    f"data has {tuple(crop)}; crop the cells at the bundle's grid"
                )


def _jsonable_shape(shape: Sequence[int | None], what: str) -> list[int | None]:
    values = [None if n is None else int(n) for n in shape]
    if len(values) not in (2, 3):
        raise InputError(f"{what} must be (z, y, x) in voxels, or (y, x) for a 2D model, got {tuple(shape)}")
    return values


def _checked_bundle_metadata(model: nn.Module, channels: Sequence[str], classes: Sequence[str],
                             input_shape: Sequence[int], normalization: Mapping[str, Sequence[float]]) -> tuple:
    """``(architecture, channel names, class names, {"mean": [...], "std": [...]})`` of a model to bundle,
    after checking that they fit the model (one name per input channel / logit, its input grid in voxels,
    one finite positive std per channel); raises :class:`InputError` otherwise."""
    arch = getattr(model, "architecture", None)
    if not isinstance(arch, dict) or arch.get("name") not in ARCHITECTURES:
        raise InputError(
            f"cannot bundle a {type(model).__name__}: bundles rebuild the network from its "
            f"architecture name, known ones are {sorted(ARCHITECTURES)}; build it with efficientnet3d()"
        )
    channels, classes = [str(c) for c in channels], [str(c) for c in classes]
    if len(channels) != arch["in_channels"]:
        raise InputError(f"model takes {arch['in_channels']} channels, got {_names('channel names', channels)}")
    if len(classes) != arch["num_classes"]:
        raise InputError(f"model has {arch['num_classes']} classes, got {_names('class names', classes)}")
    if list(_jsonable_shape(input_shape, "input_shape")) != list(arch["input_shape"]):
        raise InputError(
            f"input_shape {tuple(input_shape)} differs from the grid the model was built for "
            f"{tuple(arch['input_shape'])}; rebuild the model with efficientnet3d(input_shape=...)"
        )
    keys = ("mean", "std", "low", "high") if "low" in normalization else ("mean", "std")  # low/high: plate scaling
    norm = {key: [float(v) for v in normalization[key]] for key in keys}
    if any(len(v) != len(channels) for v in norm.values()):
        raise InputError(f"normalization needs {' and '.join('one ' + k for k in keys)} per channel "
                         f"({len(channels)})")
    if "low" in norm and not all(math.isfinite(a) and math.isfinite(b) and b > a
                                 for a, b in zip(norm["low"], norm["high"], strict=True)):
        raise InputError(f"normalization 'high' must be finite and > 'low' for every channel, got {norm}")
    if not all(math.isfinite(v) and v > 0 for v in norm["std"]):
        raise InputError(f"normalization std must be finite and > 0 for every channel, got {norm['std']}")
    return arch, channels, classes, norm


def _bundle_layers(model: nn.Module, layers: Sequence[str] | None) -> list[str]:
    """The bundle's default layers (the model's ``default_cam_layer`` if none), each checked to exist."""
    layers = list(layers) if layers is not None else [getattr(model, "default_cam_layer", "")]
    for name in layers:
        if not (hasattr(model, "vit") and name in ATTENTION_SOURCES):  # a ViT's maps are named sources
            find_layer(model, name)
    return layers


def _check_same_dims(crop_shape: Sequence[int | None], input_shape: Sequence[int]) -> None:
    if len(crop_shape) != len(input_shape):
        raise DimensionalityError(f"crop_shape {tuple(crop_shape)} and the model grid {tuple(input_shape)} differ in "
                                  "dimensionality; give crops of the model's axes")


def write_bundle(
    path: str | Path,
    model: nn.Module,
    *,
    channels: Sequence[str],
    classes: Sequence[str],
    crop_shape: Sequence[int | None],
    input_shape: Sequence[int],
    normalization: Mapping[str, Sequence[float]],
    provenance: Mapping[str, Any] | None = None,
    layers: Sequence[str] | None = None,
    crop_fill: str = "zero",
) -> Path:
    """Write ``model`` as a bundle directory: ``model.safetensors`` + ``config.json``.

    Parameters
    ----------
    path : str or Path
        Directory (created; existing bundle files in it are replaced).
    model : EfficientNet3D
        A model with an ``architecture`` attribute naming a known architecture.
    channels, classes : list of str
        Names in the order of the model's input channels and output logits.
    crop_shape : (z, y, x)
        Crop grid in voxels (``None`` for "all z").
    input_shape : (z, y, x)
        Model input grid in voxels; must be the grid the model was built for.
    normalization : dict
        ``{"mean": [...], "std": [...]}``, one value per channel (of rescaled
        intensities); with ``"low"``/``"high"`` too for a fixed intensity range
        (``intensity_scaling="plate"``, raw intensity units).
    provenance : dict, optional
        Training provenance (data, parameters, versions); JSON-able.
    layers : list of str, optional
        Default Grad-CAM layers (default: the model's ``default_cam_layer``).
    crop_fill : {"zero", "background"}
        What filled crop windows past the site in training (scoring fills them alike).

    Returns
    -------
    pathlib.Path
        The bundle directory.
    """
    from safetensors.torch import save_file

    arch, channels, classes, norm = _checked_bundle_metadata(model, channels, classes, input_shape, normalization)
    _check_same_dims(crop_shape, arch["input_shape"])
    layers = _bundle_layers(model, layers)
    _check_fill(crop_fill, "crop_fill", InputError)  # an argument: refused as bad input, not bad metadata

    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": BUNDLE_FORMAT})
    honour_umask(directory / WEIGHTS_FILE)  # safetensors writes 0600: workers of another user could not read it
    weights_hash = hashlib.sha256((directory / WEIGHTS_FILE).read_bytes()).hexdigest()
    config = BundleConfig(
        architecture=dict(arch),
        channels=channels,
        classes=classes,
        crop_shape=_jsonable_shape(crop_shape, "crop_shape"),
        input_shape=list(arch["input_shape"]),
        normalization=norm,
        layers=layers,
        provenance=json.loads(json.dumps(dict(provenance or {}))),
        weights_sha256=weights_hash,
        crop_fill=crop_fill,
    )
    (directory / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    return directory


def honour_umask(path: str | Path) -> None:
    """Give a file written by a library that forces 0600 the mode the process's umask asks for (e.g. 0644)."""
    mask = os.umask(0o022)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


_REQUIRED = ("architecture", "channels", "classes", "crop_shape", "input_shape", "normalization")


def _read_config(file: Path) -> BundleConfig:
    """Parse and check ``config.json``; every problem is a :class:`MetadataError` naming the file and the key."""
    text = file.read_bytes()
    try:
        raw = json.loads(text.decode("utf-8")) if text.strip() else None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MetadataError(f"{file} is not JSON ({err}); save the bundle again (write_bundle or "
                            "gradcamo-dask train)") from None
    if not isinstance(raw, dict):
        raise MetadataError(f"{file} is empty or not a JSON object; save the bundle again")
    if raw.get("format") != BUNDLE_FORMAT:
        raise MetadataError(f"{file} is not a {BUNDLE_FORMAT} config (format {raw.get('format')!r})")
    missing = [key for key in _REQUIRED if key not in raw]
    if missing:
        raise MetadataError(f"{file} lacks the keys {missing}; save the bundle again")
    arch, norm, channels = raw["architecture"], raw["normalization"], raw["channels"]
    if not isinstance(arch, dict) or not {"name", "in_channels", "num_classes", "input_shape"} <= set(arch):
        raise MetadataError(f"{file}: 'architecture' must name name, in_channels, num_classes and input_shape")
    if not isinstance(norm, dict) or not isinstance(norm.get("mean"), list) or not isinstance(norm.get("std"), list) \
            or not len(norm["mean"]) == len(norm["std"]) == len(channels):
        raise MetadataError(f"{file}: 'normalization' needs 'mean' and 'std' lists with one value per channel "
                            f"({len(channels)})")
    if ("low" in norm or "high" in norm) and not (
            isinstance(norm.get("low"), list) and isinstance(norm.get("high"), list)
            and len(norm["low"]) == len(norm["high"]) == len(channels)
            and all(isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isfinite(a)
                    and math.isfinite(b) and b > a for a, b in zip(norm["low"], norm["high"], strict=True))):
        raise MetadataError(f"{file}: the normalization's fixed intensity range needs finite 'low' and 'high' "
                            f"lists with one value per channel ({len(channels)}) and high > low; save the bundle "
                            "again")
    bad = [i for i, v in enumerate(norm["std"]) if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0)]
    if bad:
        raise MetadataError(f"{file}: normalization std of channel(s) {[channels[i] for i in bad]} is "
                            f"{[norm['std'][i] for i in bad]}; every std must be finite and > 0 (crops are divided "
                            "by it). Fix the value or save the bundle again")
    _check_fill(raw.get("crop_fill", "zero"), f"{file}: 'crop_fill'")
    return BundleConfig(**{k: raw[k] for k in BundleConfig.__dataclass_fields__ if k in raw})


def _check_fill(fill: Any, where: str, error: type = MetadataError) -> None:
    from gradcamo_dask.crop_geometry import FILLS

    if fill not in FILLS:
        raise error(f"{where} must be 'zero' or 'background', got {fill!r}")


def _read_weights(file: Path, config: BundleConfig, weights_bytes: bytes) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load

    weights_hash = hashlib.sha256(weights_bytes).hexdigest()
    if config.weights_sha256 and config.weights_sha256 != weights_hash:
        raise BundleMismatchError(
            f"{file} has sha256 {weights_hash[:12]}..., config.json expects "
            f"{config.weights_sha256[:12]}...; the weights were replaced, save the bundle again"
        )
    try:
        return load(weights_bytes)
    except (SafetensorError, ValueError, OSError) as err:
        raise WeightsFormatError(f"{file} is not a readable safetensors file ({err}); it may be truncated or of "
                                 "another format. Save the bundle again (pickled checkpoints are never loaded)") \
            from None


def open_bundle(path: str | Path, device: str | torch.device = "cpu") -> Bundle:
    """Load a bundle written by :func:`write_bundle`; never unpickles anything.

    The network is rebuilt from the config's architecture, the weights come from
    safetensors, and the model is returned in eval mode on ``device``.

    Raises
    ------
    WeightsNotFoundError
        When the directory lacks ``config.json`` or ``model.safetensors``.
    MetadataError
        ``config.json`` is empty, not JSON, lacks keys, or has a std that is not > 0.
    WeightsFormatError
        ``model.safetensors`` is truncated or not safetensors.
    BundleMismatchError
        When the weights do not match the config (hash or tensor names).
    """
    directory = Path(path)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise WeightsNotFoundError(f"{directory} is not a model bundle: {name} is missing; give the folder "
                                       "written by `gradcamo-dask train` (or write_bundle)")
    config_bytes = (directory / CONFIG_FILE).read_bytes()
    weights_bytes = (directory / WEIGHTS_FILE).read_bytes()
    config = _read_config(directory / CONFIG_FILE)
    state = _read_weights(directory / WEIGHTS_FILE, config, weights_bytes)
    arch = dict(config.architecture)
    builder = ARCHITECTURES.get(arch.pop("name", None))
    if builder is None:
        raise BundleMismatchError(f"unknown architecture {config.architecture.get('name')!r} in {directory}")
    model = builder(arch.pop("in_channels"), arch.pop("num_classes"), arch.pop("input_shape"), **arch)
    missing, unexpected = set(model.state_dict()) - set(state), set(state) - set(model.state_dict())
    if missing or unexpected:
        raise BundleMismatchError(
            f"weights in {directory} do not fit {config.architecture['name']}: missing "
            f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    model.load_state_dict(state)
    model.to(device).eval()
    digest = hashlib.sha256(weights_bytes + b"\0" + config_bytes).hexdigest()
    return Bundle(model=model, config=config, hash=f"sha256:{digest}", path=directory)


#: Training provenance keys ``describe_bundle`` shows (a bundle from ``gradcamo-dask train`` has them all).
TRAINING_KEYS = ("plate", "cells", "epochs_run", "epochs", "best_epoch", "stopped_by", "seed", "augmentation",
                 "regularizer", "test", "seconds")


def describe_bundle(path: str | Path) -> dict | None:
    """What a model bundle holds, or None when ``path`` is not a bundle folder.

    The bundle is opened as :func:`open_bundle` does (weights checked against the
    config), so a broken bundle raises its own error. Grids are ``(z, y, x)`` voxels.

    Returns
    -------
    dict or None
        ``kind="bundle"``, ``architecture``, ``parameters``, ``channels``, ``classes``,
        ``crop_shape``, ``input_shape``, ``crop_fill``, ``intensity_scaling``,
        ``layers`` (default Grad-CAM layers and their map grids; None for a ViT's
        attention sources, which have no layer grid), ``hash`` and
        ``trained`` (the provenance's :data:`TRAINING_KEYS` that are present).
    """
    from gradcamo_dask.engine.layers import layer_grids

    directory = Path(path)
    if not (directory / CONFIG_FILE).is_file() or not (directory / WEIGHTS_FILE).is_file():
        return None
    bundle = open_bundle(directory)
    cfg = bundle.config
    grids = layer_grids(bundle.model, tuple(cfg.input_shape))  # a ViT's token layers have none: None below
    scaling = "plate (fixed range)" if "low" in cfg.normalization else "crop (min-max per crop)"
    return {"kind": "bundle", "architecture": cfg.architecture["name"],
            "parameters": sum(p.numel() for p in bundle.model.parameters()), "channels": cfg.channels,
            "classes": cfg.classes, "crop_shape": cfg.crop_shape, "input_shape": cfg.input_shape,
            "crop_fill": cfg.crop_fill, "intensity_scaling": scaling,
            "layers": {name: list(grids[name]) if name in grids else None for name in cfg.layers},
            "hash": bundle.hash, "trained": {k: cfg.provenance[k] for k in TRAINING_KEYS if k in cfg.provenance}}
