"""2D or 3D: fit a training recipe to a plate, and refuse a bundle of the other dimensionality.

A plate whose ``z`` has length 1 is 2D (:func:`~gradcamo_dask.cells.plate_spatial_dims`):
its crops are ``(cell, c, y, x)`` and it needs a 2D model (``efficientnet2d``, or a ViT
with a 2D grid). Training picks that model by itself; scoring refuses a 3D bundle on a
2D plate, and the reverse, with :class:`~gradcamo_dask.errors.DimensionalityError`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from gradcamo_dask.cells import plate_spatial_dims
from gradcamo_dask.errors import DimensionalityError
from gradcamo_dask.jobs.recipe import Recipe

__all__ = ["ARCHITECTURE_DIMS", "check_bundle_dims", "plate_recipe"]

ARCHITECTURE_DIMS = {"efficientnet3d": 3, "efficientnet2d": 2}  # the ViT follows its input grid
PAPER_GRID_3D, PAPER_GRID_2D = (64, 224, 224), (224, 224)


def _grid_2d(recipe: Recipe) -> tuple[int, int]:
    """The model grid ``(y, x)`` of a recipe for a 2D plate; a 3D grid other than the default is refused."""
    grid = tuple(recipe.input_shape)
    if len(grid) == 2:
        return grid  # type: ignore[return-value]
    if grid == PAPER_GRID_3D:  # the default recipe: its 2D counterpart (EfficientNet-B0's 224 x 224)
        return PAPER_GRID_2D
    raise DimensionalityError(f"the plate is 2D (one z slice), the recipe's model grid {grid} is 3D; give a 2D grid "
                              f"(y, x), e.g. input_shape={grid[1:]} (--input-shape {grid[1]} {grid[2]})")


def plate_recipe(recipe: Recipe, image: Any) -> Recipe:
    """The recipe as it applies to ``image``'s dimensionality.

    On a 2D plate: crops ``(y, x)`` (a 3-entry size keeps its last two), a 2D model grid
    (the default ``(64, 224, 224)`` becomes ``(224, 224)``), and ``efficientnet2d`` unless
    another architecture is named. On a 3D plate the recipe is returned unchanged.

    Raises
    ------
    DimensionalityError
        A 3D architecture or grid for a 2D plate, or a 2D one for a 3D plate.
    """
    options = dict(recipe.model_options or {})
    arch = options.get("architecture", "efficientnet3d" if plate_spatial_dims(image) == 3 else "efficientnet2d")
    if plate_spatial_dims(image) == 3:
        if len(recipe.input_shape) == 2 or ARCHITECTURE_DIMS.get(arch) == 2:
            raise DimensionalityError(f"the plate is 3D ({image.sizes['z']} z slices), the recipe is 2D (architecture "
                                      f"{arch!r}, model grid {tuple(recipe.input_shape)}); give a 3D grid (z, y, x) "
                                      "and a 3D model, or select one z slice (image.isel(z=[k])) for a 2D model")
        return recipe
    if ARCHITECTURE_DIMS.get(arch) == 3:
        raise DimensionalityError(f"the plate is 2D (one z slice), architecture {arch!r} is 3D; use "
                                  "'efficientnet2d' (the default for 2D plates) or a 2D 'vit'")
    options["architecture"] = arch
    crop = tuple(recipe.crop_size)[-2:]
    return dataclasses.replace(recipe, crop_size=crop, input_shape=_grid_2d(recipe), model_options=options)


def check_bundle_dims(bundle: Any, image: Any) -> None:
    """Refuse a bundle whose model grid is not of the plate's dimensionality (DimensionalityError)."""
    plate_dims, bundle_dims = plate_spatial_dims(image), bundle.config.spatial_dims
    if plate_dims != bundle_dims:
        z = image.sizes.get("z", 1)
        raise DimensionalityError(
            f"bundle is {bundle_dims}D (model grid {tuple(bundle.config.input_shape)}), the plate is {plate_dims}D "
            f"({z} z slice{'s' if z != 1 else ''}); score it with a {plate_dims}D bundle (train one on a "
            f"{plate_dims}D plate: 'gradcamo-dask train' picks efficientnet{plate_dims}d by itself)")
