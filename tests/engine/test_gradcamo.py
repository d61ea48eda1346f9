"""Eq. 5 scores: interpolation weights, full vs low-resolution routes, NaN handling, summaries."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gradcamo_dask import InputError
from gradcamo_dask.engine.gradcamo import (
    contract_mask,
    gradcamo_lowres,
    gradcamo_score,
    interpolation_matrix,
    total_weights,
    upsample_cam,
)


@pytest.mark.parametrize("n_in,n_out", [(1, 5), (3, 21), (4, 128), (7, 128), (2, 2), (5, 3), (13, 7), (3, 4)])
def test_interpolation_matrix_is_torch_linear_interpolation(n_in, n_out):
    rng = np.random.default_rng(n_in * 100 + n_out)
    values = rng.random((4, n_in))
    expected = F.interpolate(torch.tensor(values)[:, None], size=n_out, mode="linear", align_corners=False)[:, 0]
    u = interpolation_matrix(n_in, n_out)
    assert u.shape == (n_out, n_in)
    np.testing.assert_allclose(values @ u.T, expected.numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(u.sum(axis=1), 1.0, atol=1e-12)  # a partition of unity


def test_interpolation_matrix_known_values():
    # 2 -> 4 voxels, align_corners=False: sources -0.25 (clamped to 0), 0.25, 0.75, 1.25 (-> last voxel)
    expected = np.array([[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]])
    np.testing.assert_allclose(interpolation_matrix(2, 4), expected, atol=1e-15)
    np.testing.assert_allclose(interpolation_matrix(1, 3), np.ones((3, 1)))
    with pytest.raises(InputError):
        interpolation_matrix(-1, 3)


@pytest.mark.parametrize("grid,shape", [((1, 3, 3), (21, 128, 128)), ((2, 7, 7), (21, 128, 128)),
                                        ((3, 5, 4), (11, 17, 23)), ((1, 4, 4), (64, 224, 224))])
def test_upsample_cam_matches_torch_trilinear(grid, shape):
    rng = np.random.default_rng(1)
    cam = rng.random((2, *grid))
    expected = F.interpolate(torch.tensor(cam)[:, None], size=shape, mode="trilinear", align_corners=False)[:, 0]
    np.testing.assert_allclose(upsample_cam(cam, shape), expected.numpy(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    "grid,shape",
    [((1, 3, 3), (21, 128, 128)), ((2, 7, 7), (21, 128, 128)), ((1, 4, 4), (21, 128, 128)),
     ((3, 5, 7), (13, 31, 29)), ((1, 1, 1), (5, 6, 7)), ((4, 4, 4), (4, 4, 4)), ((5, 9, 6), (3, 4, 5))],
)
def test_lowres_route_equals_full_resolution_route(grid, shape):
    rng = np.random.default_rng(sum(grid) + sum(shape))
    n = 3
    cam = rng.random((n, *grid)) * (rng.random((n, *grid)) > 0.3)  # non-negative, some zeros
    mask = rng.random((n, *shape)) > 0.6
    full = F.interpolate(torch.tensor(cam)[:, None], size=shape, mode="trilinear", align_corners=False)[:, 0]
    score_full, inside_full, total_full = gradcamo_score(full.numpy(), mask)
    score_low, inside_low, total_low = gradcamo_lowres(cam, mask)
    np.testing.assert_allclose(score_low, score_full, rtol=1e-5)
    np.testing.assert_allclose(inside_low, inside_full, rtol=1e-5)
    np.testing.assert_allclose(total_low, total_full, rtol=1e-5)
    # and the same in torch, float32 maps
    t_score, t_inside, _ = gradcamo_lowres(torch.tensor(cam, dtype=torch.float32), torch.tensor(mask))
    assert isinstance(t_score, torch.Tensor)
    np.testing.assert_allclose(t_score.numpy(), score_full, rtol=1e-5)
    np.testing.assert_allclose(t_inside.numpy(), inside_full, rtol=1e-5)


def test_contract_mask_is_the_adjoint_of_upsampling():
    rng = np.random.default_rng(3)
    cam, mask = rng.random((2, 2, 3, 4)), rng.random((2, 9, 10, 11)) > 0.5
    lhs = (upsample_cam(cam, (9, 10, 11)) * mask).sum(axis=(1, 2, 3))
    exact = (cam * contract_mask(mask.astype(np.float64), (2, 3, 4))).sum(axis=(1, 2, 3))
    np.testing.assert_allclose(lhs, exact, rtol=1e-12)  # float64 masks: float64 throughout
    fast = (cam * contract_mask(mask, (2, 3, 4))).sum(axis=(1, 2, 3))
    np.testing.assert_allclose(lhs, fast, rtol=1e-7)  # bool masks: first contraction in float32


def test_constant_map_scores_the_mask_fraction():
    # upsampling a constant map gives the same constant, so the score is |M| / |V|
    mask = np.zeros((1, 21, 128, 128), dtype=bool)
    mask[0, 5:15, 30:90, 40:70] = True  # 10 * 60 * 30 voxels
    expected = 10 * 60 * 30 / (21 * 128 * 128)
    score, inside, total = gradcamo_lowres(np.full((1, 1, 3, 3), 2.0), mask)
    assert score[0] == pytest.approx(expected, rel=1e-12)
    assert total[0] == pytest.approx(2.0 * 21 * 128 * 128, rel=1e-12)
    assert inside[0] == pytest.approx(2.0 * 10 * 60 * 30, rel=1e-12)
    full_score, _, _ = gradcamo_score(np.full((21, 128, 128), 0.5), mask[0])
    assert float(full_score) == pytest.approx(expected, rel=1e-12)


def test_all_zero_map_is_nan_not_zero_and_keeps_its_sums():
    mask = np.ones((2, 4, 5, 6), dtype=bool)
    cam = np.zeros((2, 1, 2, 2))
    cam[1, 0, 0, 0] = 1.0
    score, inside, total = gradcamo_lowres(cam, mask)
    assert np.isnan(score[0]) and score[1] == pytest.approx(1.0)
    assert total[0] == 0 and inside[0] == 0 and total[1] > 0
    full, _, full_total = gradcamo_score(np.zeros((4, 5, 6)), mask[0])
    assert np.isnan(full) and full_total == 0
    t_score, _, _ = gradcamo_score(torch.zeros(2, 4, 5, 6), torch.ones(2, 4, 5, 6, dtype=torch.bool))
    assert torch.isnan(t_score).all()


def test_score_errors():
    with pytest.raises(InputError, match="same shape"):
        gradcamo_score(np.ones((4, 5, 6)), np.ones((4, 5, 7), dtype=bool))
    with pytest.raises(InputError, match="negative"):
        gradcamo_score(-np.ones((4, 5, 6)), np.ones((4, 5, 6), dtype=bool))
    with pytest.raises(InputError, match="NaN"):
        gradcamo_score(np.full((4, 5, 6), np.nan), np.ones((4, 5, 6), dtype=bool))
    with pytest.raises(InputError, match="negative"):
        gradcamo_lowres(-np.ones((1, 1, 2, 2)), np.ones((1, 4, 5, 6), dtype=bool))
    with pytest.raises(InputError, match="same number of cells"):
        gradcamo_lowres(np.ones((2, 1, 2, 2)), np.ones((3, 4, 5, 6), dtype=bool))


@pytest.mark.gpu
def test_cupy_routes_agree_on_gpu():
    cupy = pytest.importorskip("cupy")
    rng = np.random.default_rng(5)
    cam, mask = rng.random((2, 2, 7, 7)), rng.random((2, 21, 128, 128)) > 0.5
    score, inside, total = gradcamo_lowres(cupy.asarray(cam), cupy.asarray(mask))
    assert isinstance(score, cupy.ndarray)
    expected = gradcamo_score(upsample_cam(cam, (21, 128, 128)), mask)[0]
    np.testing.assert_allclose(score.get(), expected, rtol=1e-5)
    full = gradcamo_score(cupy.asarray(upsample_cam(cam, (21, 128, 128))), cupy.asarray(mask))[0]
    np.testing.assert_allclose(full.get(), expected, rtol=1e-10)


@pytest.mark.parametrize("grid", [(1, 6, 6), (2, 12, 12), (1, 1, 1), (6, 6)])
def test_ceiling_bounds_every_map_and_is_reached_by_one_voxel(grid):
    from gradcamo_dask.engine.gradcamo import gradcamo_ceiling

    rng = np.random.default_rng(3)
    shape = (6, 48, 48)[-len(grid):]
    masks = np.zeros((3, *shape), dtype=bool)
    masks[0, ..., 12:36, 12:36] = True  # centred square
    masks[1, ..., 0:10, 30:48] = True  # a corner blob
    masks[2] = rng.random(shape) < 0.2  # scattered voxels
    ceiling = gradcamo_ceiling(masks, grid)
    assert ceiling.shape == (3,) and ceiling.dtype == np.float64
    maps = rng.random((200, *grid)) ** 4  # peaked random maps
    for i in range(3):
        scores = gradcamo_lowres(maps, np.repeat(masks[i:i + 1], len(maps), axis=0))[0]
        assert np.all(scores <= ceiling[i] + 1e-12)
        # the bound is reached: all the mass on the best voxel (checked at full resolution)
        best = np.zeros((1, *grid))
        ratio = contract_mask(masks[i:i + 1], grid)[0] / total_weights(grid, shape, best)
        best.reshape(-1)[np.argmax(ratio)] = 1.0
        full = gradcamo_score(upsample_cam(best, shape), masks[i:i + 1], spatial_dims=len(grid))[0]
        assert full[0] == pytest.approx(ceiling[i], abs=1e-9)
    # a 1 x 1 x 1 grid can only score the mask's share of the crop
    if grid == (1, 1, 1):
        np.testing.assert_allclose(ceiling, masks.reshape(3, -1).mean(axis=1), atol=1e-12)
