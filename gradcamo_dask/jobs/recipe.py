"""A training recipe: every option of :func:`gradcamo_dask.jobs.train.train` that shapes the model.

:class:`Recipe` holds what the model learns from and how (grids, epochs, batch,
optimiser, augmentation, regulariser, split); :class:`Split` holds the
leave-wells-out split. Both are frozen and checked when built, so a bad value fails
before any crop is read. Defaults are the paper's recipe. What only says where and
how fast to run (output folder, device, cache, progress) stays an argument of
:func:`~gradcamo_dask.jobs.train.train`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from gradcamo_dask.engine.augment import Augmentation
from gradcamo_dask.errors import InputError

__all__ = ["Recipe", "Split"]


def _names(value: Sequence[Any] | None, kind: type) -> tuple | None:
    if value is None:
        return None
    if isinstance(value, (str, int)):
        value = [value]
    return tuple(kind(v) for v in value)


@dataclass(frozen=True)
class Split:
    """Leave-wells-out split: training and test wells, and the validation share.

    Test wells are those named, or in the named columns or rows; training wells the
    same through ``train_*`` (default: every other well). Without any ``test_*``
    option each treatment's last well in plate order is its test well.

    Parameters
    ----------
    test_wells, train_wells : sequence of str, optional
        Wells by name, e.g. ``["B03", "C03"]`` (default None).
    test_columns, train_columns : sequence of int, optional
        Wells by plate column, 1-based (default None). Paper: train column 2, test column 3.
    test_rows, train_rows : sequence of str, optional
        Wells by plate row letter (default None).
    val_fraction : float
        Share of the training cells (seeded, at least one) held out for early
        stopping, in [0, 1) (default 0.1).
    max_train_cells : int, optional
        Keep a seeded random subset of this many training cells (default None: all).
    """

    test_wells: Sequence[str] | None = None
    test_columns: Sequence[int] | None = None
    test_rows: Sequence[str] | None = None
    train_wells: Sequence[str] | None = None
    train_columns: Sequence[int] | None = None
    train_rows: Sequence[str] | None = None
    val_fraction: float = 0.1
    max_train_cells: int | None = None

    def __post_init__(self) -> None:
        for name, kind in [("test_wells", str), ("test_columns", int), ("test_rows", str),
                           ("train_wells", str), ("train_columns", int), ("train_rows", str)]:
            object.__setattr__(self, name, _names(getattr(self, name), kind))
        if not 0 <= self.val_fraction < 1:
            raise InputError(f"val_fraction must be in [0, 1) (share of training cells), got {self.val_fraction}")
        if self.max_train_cells is not None and int(self.max_train_cells) < 1:
            raise InputError(f"max_train_cells must be >= 1 cells or None (all), got {self.max_train_cells}")

    @property
    def names_test_wells(self) -> bool:
        """True when any ``test_*`` option is given (not the default held-out wells)."""
        return any(v is not None for v in (self.test_wells, self.test_columns, self.test_rows))


@dataclass(frozen=True)
class Recipe:
    """How to train the 3D feature extractor (defaults: the paper's recipe).

    Parameters
    ----------
    crop_size : (int or None, int, int)
        Crop ``(z, y, x)`` in voxels, None = all z-slices (default ``(None, 128, 128)``);
        ``(y, x)`` for a 2D plate (a 3-entry size is read as its last two there).
    input_shape : (int, int, int)
        Model grid ``(z, y, x)`` in voxels the crops are resampled to (default
        ``(64, 224, 224)``; e.g. ``(16, 48, 48)`` trains in minutes on a CPU); ``(y, x)``
        for a 2D plate, whose default is ``(224, 224)`` (:func:`~gradcamo_dask.jobs.dimensionality.plate_recipe`).
    epochs : int
        Most passes over the training cells (default 50).
    batch_size : int
        Cells per optimisation step (default 8).
    learning_rate : float
        Adam's learning rate, per step (default 3e-4).
    seed : int
        Seed of the split, weights, shuffling and augmentations (default 0).
    split : Split
        Leave-wells-out split (default ``Split()``: each treatment's last well is its test well).
    patience : int, optional
        Epochs without a better validation loss before stopping (default 5; None: never stop early).
    augmentation : Augmentation, optional
        Training augmentations (default the paper's: x/y flips, brightness, gamma, p = 0.5 each); None: off.
    regularizer : float
        ``lambda`` of ``loss = CE - lambda * mean Grad-CAMO``, dimensionless (default 0: plain cross-entropy).
    regularizer_layer : str, optional
        Grad-CAM layer of the regulariser (default None: the model's default layer,
        or the last block output with more than one voxel at ``input_shape``).
    regularizer_target : {"label", "predicted"}
        Class whose map the regulariser scores (default "label").
    regularizer_evidence : {"positive", "both"}
        Map the regulariser scores: Grad-CAM (default "positive", the paper's) or its absolute value
        before the ReLU ("both": evidence against the class must lie in the cell too;
        :func:`~gradcamo_dask.engine.regularize.gradcamo_loss`).
    regularizer_cam : {"gradcam", "hirescam"}
        How the regulariser's map weighs channels: Grad-CAM (default, the paper's) or HiResCAM
        (gradient times activation per voxel; :func:`~gradcamo_dask.engine.regularize.gradcamo_loss`).
    layers : sequence of str, optional
        Default Grad-CAM layers stored in the bundle (default None: the regulariser's layer).
    shuffle_sites : int
        Sites whose cells are shuffled together, the read-ahead window (default 64).
    model_options : mapping, optional
        Extra :func:`~gradcamo_dask.engine.models.efficientnet3d` options, e.g. ``{"dropout_rate": 0.2}``;
        ``"architecture"`` picks another network of the bundle registry, e.g. ``{"architecture": "vit",
        "patch_size": [4, 8, 8]}`` (:func:`~gradcamo_dask.engine.vit.vit`; its map is ``cls_attention``).
    batchnorm_momentum : "epoch", float or None
        Batch-norm running statistics: ``"epoch"`` (default) averages each epoch's
        batches; a float is an exponential moving average with that momentum; None
        keeps EfficientNet's 0.01 (too slow for short runs).
    head_init_std : float, optional
        Standard deviation of the re-initialised classification weights (default
        0.01: initial loss ln K); None keeps MONAI's U(+-1/sqrt(K)).
    intensity_scaling : {"crop", "plate"}
        ``"crop"`` (default, the paper's): each crop's channels min-max rescaled to [0, 1];
        ``"plate"``: one fixed range per channel fitted on the training sites
        (:func:`~gradcamo_dask.normalize.fit_intensity_range`), stored in the bundle, so a
        neighbour's bright phenotype cannot change the cell's own intensities.
    crop_fill : {"zero", "background"}
        What fills the part of a crop window past the site: 0 (default) or the site's
        background level per channel (:func:`~gradcamo_dask.crop_geometry.background_level`);
        stored in the bundle, so scoring cuts crops as training did.
    init_from : path, optional
        A model bundle whose weights start the run (fine-tuning; default None: seeded
        random weights). Its channels, classes, intensity scaling and network must be
        the run's; its normalisation is kept (:mod:`~gradcamo_dask.jobs.warm_start`).
        E.g. a plain run's bundle, then ``regularizer > 0`` for a few epochs.
    """

    crop_size: Sequence[int | None] = (None, 128, 128)
    input_shape: Sequence[int] = (64, 224, 224)
    epochs: int = 50
    batch_size: int = 8
    learning_rate: float = 3e-4
    seed: int = 0
    split: Split = field(default_factory=Split)
    patience: int | None = 5
    augmentation: Augmentation | None = field(default_factory=Augmentation)
    regularizer: float = 0.0
    regularizer_layer: str | None = None
    regularizer_target: str = "label"
    regularizer_evidence: str = "positive"
    regularizer_cam: str = "gradcam"
    layers: Sequence[str] | None = None
    shuffle_sites: int = 64
    model_options: Mapping[str, Any] | None = None
    batchnorm_momentum: float | str | None = "epoch"
    head_init_std: float | None = 0.01
    intensity_scaling: str = "crop"
    crop_fill: str = "zero"
    init_from: str | None = None

    def __post_init__(self) -> None:
        crop = tuple(None if n is None else int(n) for n in self.crop_size)
        grid = tuple(int(n) for n in self.input_shape)
        if len(crop) not in (2, 3) or any(n is not None and n < 1 for n in crop):
            raise InputError(f"crop_size must be (z or None, y, x) or 2D (y, x) positive voxels, got {self.crop_size}")
        if len(grid) not in (2, 3) or min(grid) < 1:
            raise InputError(f"input_shape must be (z, y, x) or 2D (y, x) positive voxels, got {self.input_shape}")
        object.__setattr__(self, "crop_size", crop)
        object.__setattr__(self, "input_shape", grid)
        object.__setattr__(self, "layers", None if self.layers is None else tuple(str(n) for n in self.layers))
        if self.batch_size < 1 or self.epochs < 0 or not self.learning_rate > 0:
            raise InputError(f"need batch_size >= 1, epochs >= 0 and learning_rate > 0; got batch_size "
                             f"{self.batch_size}, epochs {self.epochs}, learning_rate {self.learning_rate}")
        if self.patience is not None and self.patience < 1:
            raise InputError(f"patience must be >= 1 epochs or None (no early stopping), got {self.patience}")
        if self.regularizer_target not in ("label", "predicted"):
            raise InputError(f"regularizer_target must be 'label' or 'predicted', got {self.regularizer_target!r}")
        if self.regularizer_evidence not in ("positive", "both"):
            raise InputError(f"regularizer_evidence must be 'positive' (Grad-CAM, the paper's) or 'both' (|map| "
                             f"before the ReLU), got {self.regularizer_evidence!r}")
        if self.regularizer_cam not in ("gradcam", "hirescam"):
            raise InputError(f"regularizer_cam must be 'gradcam' (the paper's) or 'hirescam', got "
                             f"{self.regularizer_cam!r}")
        if self.shuffle_sites < 1:
            raise InputError(f"shuffle_sites must be >= 1 sites, got {self.shuffle_sites}")
        momentum = self.batchnorm_momentum
        if momentum not in (None, "epoch") and not isinstance(momentum, (int, float)):
            raise InputError(f"batchnorm_momentum must be 'epoch', a float or None, got {momentum!r}")
        if self.intensity_scaling not in ("crop", "plate"):
            raise InputError(f"intensity_scaling must be 'crop' (per-crop min-max, the paper's) or 'plate' (one "
                             f"fixed range per channel), got {self.intensity_scaling!r}")
        if self.crop_fill not in ("zero", "background"):
            raise InputError(f"crop_fill must be 'zero' or 'background' (the site's background level), got "
                             f"{self.crop_fill!r}")
        if self.init_from is not None:
            object.__setattr__(self, "init_from", str(self.init_from))
        if not isinstance(self.split, Split):
            raise InputError(f"split must be a Split, got {type(self.split).__name__}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready copy (the augmentation as its settings)."""
        out = asdict(self)
        out["augmentation"] = None if self.augmentation is None else self.augmentation.to_dict()
        return out
