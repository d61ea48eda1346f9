"""Named augmentations: flips keep intensities as scaled; unknown names are refused."""

from __future__ import annotations

import pytest
import torch

from gradcamo_dask.engine.augment import AUGMENTATION_NAMES, augment_batch, named_augmentation
from gradcamo_dask.errors import InputError


def test_flips_only_move_voxels_and_the_paper_recipe_changes_intensities():
    x = torch.rand(64, 2, 3, 8, 8) + 0.1
    flipped = augment_batch(x, torch.Generator().manual_seed(0), named_augmentation("flips"))
    # every cell is x itself, flipped in y and/or x: the multiset of values per cell is unchanged
    assert torch.equal(torch.sort(flipped.flatten(1)).values, torch.sort(x.flatten(1)).values)
    assert not torch.equal(flipped, x)  # some cells were flipped (p = 0.5 each, 64 cells)
    paper = augment_batch(x, torch.Generator().manual_seed(0), named_augmentation("paper"))
    assert not torch.equal(torch.sort(paper.flatten(1)).values, torch.sort(x.flatten(1)).values)
    assert named_augmentation("none") is None


def test_unknown_augmentation_name_is_refused():
    with pytest.raises(InputError, match="flips"):
        named_augmentation("flip")
    assert set(AUGMENTATION_NAMES) == {"none", "flips", "paper"}
