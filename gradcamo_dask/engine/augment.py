"""Training augmentations of the paper's recipe, seeded and batched in torch.

Each augmentation fires independently per cell with probability ``p`` (paper: 0.5):

- flip along x, flip along y (never z: the optical axis is not symmetric);
- brightness: multiply by a factor from U[0.5, 1.25];
- gamma: raise to a power from U[0.5, 1.5].

No crop or resize augmentation: cell size is biology. Intensities are expected in
[0, 1] (crops after :func:`gradcamo_dask.cells.rescale_crops`, before the
training-set standardisation), where gamma keeps them in [0, 1] and brightness keeps
them non-negative. Every random draw comes from the ``torch.Generator`` handed in
(on the CPU, whatever the data's device), so a run is reproducible and resumable.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from gradcamo_dask.errors import InputError

__all__ = ["AUGMENTATION_NAMES", "Augmentation", "augment_batch", "augment_with_masks", "named_augmentation"]


@dataclass(frozen=True)
class Augmentation:
    """Augmentation settings (defaults: the paper's).

    Attributes
    ----------
    p : float
        Probability of each augmentation, per cell and independently.
    flip_x, flip_y : bool
        Random flips along x and along y.
    brightness : (float, float) or None
        Range of the multiplicative brightness factor; None switches it off.
    gamma : (float, float) or None
        Range of the gamma exponent; None switches it off.
    """

    p: float = 0.5
    flip_x: bool = True
    flip_y: bool = True
    brightness: tuple[float, float] | None = (0.5, 1.25)
    gamma: tuple[float, float] | None = (0.5, 1.5)

    def __post_init__(self) -> None:
        if not 0.0 <= self.p <= 1.0:
            raise InputError(f"augmentation probability p must be in [0, 1], got {self.p}")
        for name in ("brightness", "gamma"):
            rng = getattr(self, name)
            if rng is not None and not (len(rng) == 2 and 0 < rng[0] <= rng[1]):
                raise InputError(f"{name} range must be (low, high) with 0 < low <= high, got {rng}")

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


NO_AUGMENTATION = Augmentation(p=0.0, flip_x=False, flip_y=False, brightness=None, gamma=None)
#: Augmentation by name: ``"none"``; ``"flips"``, x/y flips only (p = 0.5 each; intensities stay as scaled,
#: which a fixed plate intensity range needs); ``"paper"``, flips, brightness and gamma (the default).
AUGMENTATION_NAMES = ("none", "flips", "paper")


def named_augmentation(name: str) -> Augmentation | None:
    """The :class:`Augmentation` called ``name`` (one of AUGMENTATION_NAMES); None for ``"none"``."""
    if name not in AUGMENTATION_NAMES:
        raise InputError(f"augmentation must be one of {AUGMENTATION_NAMES}, got {name!r}")
    return {"none": None, "flips": Augmentation(brightness=None, gamma=None), "paper": Augmentation()}[name]


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)


def augment_batch(x: torch.Tensor, generator: torch.Generator, settings: Augmentation = Augmentation()) -> torch.Tensor:
    """Augment a batch ``(N, C, z, y, x)`` (or 2D ``(N, C, y, x)``) of [0, 1] intensities; returns a new tensor.

    The same number of random draws is made whatever fires (fixed order: flip x,
    flip y, brightness, gamma; one coin and one value per cell each), so the
    generator's state after a batch depends only on the batch size.
    """
    return augment_with_masks(x, None, generator, settings)[0]


def augment_with_masks(x: torch.Tensor, masks: torch.Tensor | None, generator: torch.Generator,
                       settings: Augmentation = Augmentation()) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`augment_batch` of ``x``, and each cell's mask ``(N, z, y, x)`` (2D ``(N, y, x)``) flipped as its
    crop was (the regulariser scores a flipped crop's map against its flipped mask); same draws, same ``x``."""
    if x.ndim not in (4, 5):
        raise InputError(f"augment_batch needs (N, C, z, y, x) or 2D (N, C, y, x), got shape {tuple(x.shape)}")
    per_cell = (-1,) + (1,) * (x.ndim - 1)
    n = x.shape[0]
    coins = torch.rand((4, n), generator=generator, dtype=torch.float64) < settings.p
    factor = _uniform(n, *(settings.brightness or (1.0, 1.0)), generator)
    power = _uniform(n, *(settings.gamma or (1.0, 1.0)), generator)
    out = x.clone()
    device = x.device
    masks = None if masks is None else masks.clone()
    for flip, coin, axis in ((settings.flip_x, coins[0], -1), (settings.flip_y, coins[1], -2)):
        if flip and bool(coin.any()):
            idx = coin.nonzero().flatten().to(device)
            out[idx] = out[idx].flip(axis)
            if masks is not None:
                masks[idx.to(masks.device)] = masks[idx.to(masks.device)].flip(axis)
    if settings.gamma is not None:
        # gamma first, on [0, 1] values; brightness after, so that gamma sees [0, 1]
        g = torch.where(coins[3], power, torch.ones_like(power)).to(device=device, dtype=x.dtype)
        out = out.clamp_min(0).pow(g.view(per_cell))
    if settings.brightness is not None:
        b = torch.where(coins[2], factor, torch.ones_like(factor)).to(device=device, dtype=x.dtype)
        out = out * b.view(per_cell)
    return out, masks
