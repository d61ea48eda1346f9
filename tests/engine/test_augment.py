"""Named augmentations: flips keep intensities as scaled; unknown names are refused."""

from __future__ import annotations

import pytest
import torch

from gradcamo_dask.engine.augment import AUGMENTATION_NAMES, augment_batch, augment_with_masks, named_augmentation
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


@pytest.mark.parametrize("shape", [(32, 3, 4, 9, 7), (32, 3, 9, 7)], ids=["3d", "2d"])
def test_masks_are_flipped_with_their_crops(shape):
    masks = torch.rand(shape[0], *shape[2:]) > 0.7  # asymmetric: a flip moves them
    x = masks[:, None].float().repeat(1, shape[1], *([1] * (len(shape) - 2)))  # every channel is the mask
    out, moved = augment_with_masks(x, masks, torch.Generator().manual_seed(3), named_augmentation("paper"))
    assert torch.equal(out > 0, moved[:, None].expand_as(out))  # each mask sits where its crop's cell went
    assert not torch.equal(moved, masks) and torch.equal(masks, x[:, 0] > 0)  # moved, the input untouched
    assert torch.equal(out, augment_batch(x, torch.Generator().manual_seed(3), named_augmentation("paper")))
