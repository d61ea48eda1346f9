"""Known attention: networks that can only read the voxels inside a given box.

Each :class:`BoxReader` multiplies its input by a fixed box indicator before anything
else, then runs conv 1x3x3 -> ReLU -> max pool 1x2x2 -> conv 1x1x1 -> SiLU -> global mean -> linear, with
bias-free positive convolutions: its output depends on the box alone and every layer's
activation is zero more than a receptive field away from it. Grad-CAMO must then be
near 1 for a mask that covers the box and near 0 for a mask elsewhere, at every layer
type (convolution, activation, pooling, the last spatial layer), through explain, the
full-resolution route and the regulariser's differentiable score alike.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from gradcamo_dask.engine.explain import explain
from gradcamo_dask.engine.gradcamo import gradcamo_score, upsample_cam
from gradcamo_dask.engine.regularize import gradcamo_loss

GRID = (8, 64, 64)
BOXES = {  # z, y, x half-open ranges; two boxes of the same size (7 % of the crop) that do not touch
    "left": ((2, 6), (8, 32), (4, 28)),
    "right": ((2, 6), (32, 56), (36, 60)),
}
LAYERS = {  # name -> layer type, grid at GRID
    "conv1": "convolution",
    "act1": "activation",
    "pool": "pooling",
    "conv2": "convolution after pooling",
    "act2": "last spatial layer",
}


def box_mask(box, grid=GRID) -> np.ndarray:
    mask = np.zeros(grid, dtype=bool)
    mask[tuple(slice(*r) for r in box)] = True
    return mask


class BoxReader(nn.Module):
    """A 3D CNN whose logits read only the voxels inside ``box`` (of a ``GRID`` input)."""

    def __init__(self, box, channels: int = 2, width: int = 4, classes: int = 2, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("box", torch.from_numpy(box_mask(box)).float()[None, None])
        self.conv1 = nn.Conv3d(channels, width, (1, 3, 3), padding=(0, 1, 1), bias=False)
        self.act1 = nn.ReLU()
        self.pool = nn.MaxPool3d((1, 2, 2))
        self.conv2 = nn.Conv3d(width, width, 1, bias=False)
        self.act2 = nn.SiLU()
        self.fc = nn.Linear(width, classes)
        with torch.no_grad():
            for conv in (self.conv1, self.conv2):
                conv.weight.copy_(torch.rand(conv.weight.shape, generator=gen) + 0.1)
            self.fc.weight.copy_(torch.rand(self.fc.weight.shape, generator=gen) + 0.1)
            self.fc.weight[1:] *= -1  # class 0 grows with the box's content, the others shrink
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.box
        x = self.act2(self.conv2(self.pool(self.act1(self.conv1(x)))))
        return self.fc(x.mean(dim=(2, 3, 4)))


@pytest.fixture(scope="module")
def crops() -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return 1.0 + torch.rand((6, 2, *GRID), generator=gen)  # positive content everywhere


def test_the_box_readers_read_only_their_box(crops):
    model = BoxReader(BOXES["left"]).eval()
    changed = crops.clone()
    changed[..., ~torch.from_numpy(box_mask(BOXES["left"]))] = 5.0  # everything outside the box
    torch.testing.assert_close(model(changed), model(crops))
    inside = crops.clone()
    inside[..., torch.from_numpy(box_mask(BOXES["left"]))] += 1.0
    assert not torch.allclose(model(inside), model(crops))


@pytest.mark.parametrize("where", list(BOXES))
def test_gradcamo_is_near_1_on_the_box_and_near_0_elsewhere_at_every_layer(crops, where):
    other = "right" if where == "left" else "left"
    model = BoxReader(BOXES[where]).eval()
    n = len(crops)
    on = np.broadcast_to(box_mask(BOXES[where]), (n, *GRID))
    off = np.broadcast_to(box_mask(BOXES[other]), (n, *GRID))
    uniform = box_mask(BOXES[where]).mean()  # what a uniform map scores for either mask (same size)
    res_on = explain(model, crops, on.copy(), layers=list(LAYERS), target=0)
    res_off = explain(model, crops, off.copy(), layers=list(LAYERS), target=0)
    for layer, kind in LAYERS.items():
        s_on, s_off = np.asarray(res_on.gradcamo[layer]), np.asarray(res_off.gradcamo[layer])
        assert np.isfinite(s_on).all() and np.isfinite(s_off).all(), kind
        # not exactly 1: the 3x3 convolution reaches one voxel past the box, and maps after the 2x pooling
        # are upsampled (trilinear), which spreads the box's edge over half a coarse voxel
        assert s_on.min() > (0.9 if layer in ("conv1", "act1") else 0.8), (kind, s_on)
        assert s_off.max() < 0.02, (kind, s_off)
        assert s_on.min() > 10 * uniform > s_off.max(), kind


def test_grad_cam_ranks_the_box_readers_by_where_they_read(crops):
    """One mask, two models: the model that reads inside the mask ranks first at every layer."""
    mask = np.broadcast_to(box_mask(BOXES["left"]), (len(crops), *GRID)).copy()
    reads_left = explain(BoxReader(BOXES["left"], seed=2).eval(), crops, mask, layers=list(LAYERS))
    reads_right = explain(BoxReader(BOXES["right"], seed=2).eval(), crops, mask, layers=list(LAYERS))
    for layer in LAYERS:
        assert np.asarray(reads_left.gradcamo[layer]).mean() > np.asarray(reads_right.gradcamo[layer]).mean() + 0.5


def test_full_resolution_route_and_the_regularizer_agree(crops):
    model = BoxReader(BOXES["right"]).eval()
    mask = np.broadcast_to(box_mask(BOXES["right"]), (len(crops), *GRID)).copy()
    res = explain(model, crops, mask, layers=["act2"], target=0)
    full = upsample_cam(np.asarray(res.cams["act2"]), GRID)
    score, _inside, _total = gradcamo_score(full, mask)
    np.testing.assert_allclose(np.asarray(score), np.asarray(res.gradcamo["act2"]), rtol=1e-4)
    out = gradcamo_loss(model, crops, torch.zeros(len(crops), dtype=torch.long), torch.from_numpy(mask),
                        layer="act2", lam=1.0)
    np.testing.assert_allclose(out.scores.numpy(), np.asarray(res.gradcamo["act2"]), rtol=1e-4)
    elsewhere = np.broadcast_to(box_mask(BOXES["left"]), mask.shape).copy()
    low = gradcamo_loss(model, crops, torch.zeros(len(crops), dtype=torch.long), torch.from_numpy(elsewhere),
                        layer="act2", lam=1.0)
    assert float(low.scores.max()) < 0.05 < 0.6 < float(out.scores.min())
