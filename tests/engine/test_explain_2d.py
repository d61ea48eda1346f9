"""2D engine: bilinear Grad-CAMO by the low-resolution route, any 2D CNN, efficientnet2d, 2D bundles."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.helpers.engine_models import crops_and_masks
from gradcamo_dask import efficientnet3d, explain
from gradcamo_dask.engine.bundles import open_bundle, write_bundle
from gradcamo_dask.engine.gradcamo import gradcamo_lowres, gradcamo_score, upsample_cam
from gradcamo_dask.engine.layers import layer_grids, model_spatial_dims
from gradcamo_dask.engine.models2d import efficientnet2d
from gradcamo_dask.errors import DimensionalityError, InputError

CROP = (37, 41)  # odd, unequal crop grid: interpolation weights differ per axis
MODEL = (48, 48)


def crops_2d(n: int, channels: int, grid=CROP, seed: int = 3):
    """Cell-like 2D crops (n, c, y, x) and masks (n, y, x): noise, per-cell offsets and a bright disc (the mask)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(*(np.linspace(-1, 1, s) for s in grid), indexing="ij")
    crops = np.empty((n, channels, *grid), dtype=np.float32)
    masks = np.empty((n, *grid), dtype=bool)
    for i in range(n):
        cy, cx = rng.uniform(-0.5, 0.5, size=2)
        masks[i] = (yy - cy) ** 2 + (xx - cx) ** 2 < rng.uniform(0.3, 0.7) ** 2
        offset = rng.normal(size=(channels, 1, 1))
        crops[i] = 0.5 * rng.normal(size=(channels, *grid)) + offset + rng.normal(scale=2.0, size=(channels, 1, 1)) * masks[i]
    assert masks.any(axis=(1, 2)).all()
    return crops, masks


class Small2DCNN(nn.Module):
    """A torchvision-style 2D CNN (features, pool, classifier) named by its own layer names."""

    def __init__(self, channels: int = 3, classes: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 8, 3, padding=1), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(1)
    return Small2DCNN().eval()


def test_lowres_bilinear_score_equals_full_resolution_and_torch():
    rng = np.random.default_rng(0)
    cam = rng.random((5, 3, 4)) * (rng.random((5, 3, 4)) > 0.3)
    cam[4] = 0.0  # an all-zero map: NaN, never 0
    mask = rng.random((5, *CROP)) > 0.6
    score, inside, total = gradcamo_lowres(cam, mask.astype(np.float64))  # float64 mask: the exact route
    full = upsample_cam(cam, CROP)
    torch_full = F.interpolate(torch.from_numpy(cam)[:, None], size=CROP, mode="bilinear", align_corners=False)
    np.testing.assert_allclose(full, torch_full[:, 0].numpy(), rtol=1e-12, atol=1e-14)
    ref_score, ref_inside, ref_total = gradcamo_score(full, mask, spatial_dims=2)
    np.testing.assert_allclose(inside, ref_inside, rtol=1e-12)
    np.testing.assert_allclose(total, ref_total, rtol=1e-12)
    np.testing.assert_allclose(score[:4], ref_score[:4], rtol=1e-12)
    assert np.isnan(score[4]) and np.isnan(ref_score[4])
    bool_score = gradcamo_lowres(cam, mask)[0]  # bool masks contract in float32 first (~1e-7)
    np.testing.assert_allclose(bool_score[:4], ref_score[:4], rtol=1e-6)
    assert len(set(np.round(score[:4], 6))) == 4  # cells differ: the comparison means something
    with pytest.raises(InputError, match="same number of cells|\\(N, y, x\\)"):
        gradcamo_lowres(cam, mask[:, None])


def test_any_2d_cnn_matches_captum_bilinear(cnn):
    from captum.attr import LayerAttribution, LayerGradCam

    crops, masks = crops_2d(4, 3)
    layers = ["features.3", "features.5"]
    result = explain(cnn, crops, masks, layers=layers, input_shape=MODEL, batch_size=3)
    assert result.grids == {"features.3": (24, 24), "features.5": (12, 12)}
    assert result.cams["features.5"].shape == (4, 12, 12) and result.features["features.5"].shape == (4, 16)
    inputs = F.interpolate(torch.from_numpy(crops), size=MODEL, mode="bilinear", align_corners=False)
    targets = torch.from_numpy(result.predicted)
    for name in layers:
        module = dict(cnn.named_modules())[name]
        attribution = LayerGradCam(cnn, module).attribute(inputs, target=targets, relu_attributions=True).detach()
        channels = result.features[name].shape[1]
        assert float(attribution.max()) > 0
        # captum sums over channels, Grad-CAM (paper) averages: a factor C'
        np.testing.assert_allclose(result.cams[name] * channels, attribution[:, 0].numpy(), rtol=1e-4,
                                   atol=1e-6 * float(attribution.abs().max()))
        full = LayerAttribution.interpolate(attribution, CROP, interpolate_mode="bilinear")[:, 0]
        score, _inside, total = gradcamo_score(full.double().numpy(), masks, spatial_dims=2)
        np.testing.assert_allclose(result.gradcamo[name], score, rtol=1e-5)
        np.testing.assert_allclose(result.cam_total[name] * channels, total, rtol=1e-5)
    assert np.ptp(result.gradcamo["features.3"]) > 1e-3  # the cells' scores differ


def test_efficientnet2d_is_monai_b0_with_its_own_head_activation():
    from monai.networks.nets import EfficientNetBN

    torch.manual_seed(0)
    ours = efficientnet2d(5, 7, (64, 64)).eval()
    reference = EfficientNetBN("efficientnet-b0", pretrained=False, spatial_dims=2, in_channels=5,
                               num_classes=7).eval()
    # The stock network at image size 224 pads for 224; for 64 x 64 the padding differs, so compare at 224.
    ours224 = efficientnet2d(5, 7, (224, 224)).eval()
    state = reference.state_dict()
    assert {k: v.shape for k, v in ours224.state_dict().items()} == {k: v.shape for k, v in state.items()}
    ours224.load_state_dict(state)
    x = torch.randn(2, 5, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours224(x), reference(x))
    assert ours._head_swish is not ours._swish and model_spatial_dims(ours) == 2
    assert layer_grids(ours)["_head_swish"] == (2, 2) and layer_grids(ours)["_blocks.3.7"] == (4, 4)
    with pytest.raises(InputError, match="square"):
        efficientnet2d(5, 7, (64, 96))


def test_efficientnet2d_forward_only_head_cam_equals_autograd():
    torch.manual_seed(2)
    model = efficientnet2d(3, 4, MODEL).eval()
    crops, masks = crops_2d(3, 3, seed=5)
    fast = explain(model, crops, masks, layers=["_head_swish", "_blocks.3.7"], route="auto")
    slow = explain(model, crops, masks, layers=["_head_swish", "_blocks.3.7"], route="autograd")
    assert fast.grids["_head_swish"] == (2, 2)
    assert float(np.abs(slow.cams["_head_swish"]).max()) > 0
    np.testing.assert_allclose(fast.cams["_head_swish"], slow.cams["_head_swish"], rtol=1e-4,
                               atol=1e-6 * float(np.abs(slow.cams["_head_swish"]).max()))
    np.testing.assert_allclose(fast.gradcamo["_blocks.3.7"], slow.gradcamo["_blocks.3.7"], rtol=1e-6)


def test_dimensionality_is_recorded_and_mismatches_refused(tmp_path, cnn):
    crops3, masks3 = crops_and_masks(2, 3, (4, 20, 20))
    crops2, masks2 = crops_2d(2, 3)
    with pytest.raises(DimensionalityError, match="2D .* but the crops"):
        explain(cnn, crops3, masks3, input_shape=(4, 20, 20))
    model3 = efficientnet3d(3, 4, (4, 32, 32))
    with pytest.raises(DimensionalityError, match="3D .* but the crops"):
        explain(model3, crops2, masks2)
    with pytest.warns(UserWarning, match="one z slice"):  # a 2D plate through a 3D model is said, not silent
        explain(model3, crops2[:, :, None], masks2[:, None])
    norm = {"mean": [0.0] * 3, "std": [1.0] * 3}
    path = write_bundle(tmp_path / "b2", efficientnet2d(3, 4, MODEL), channels=["a", "b", "c"],
                        classes=list("wxyz"), crop_shape=CROP, input_shape=MODEL, normalization=norm)
    bundle = open_bundle(path)
    assert bundle.config.spatial_dims == 2 and bundle.config.input_shape == list(MODEL)
    assert type(bundle.model).__name__ == "EfficientNet2D"
    bundle.check_fits(crop_shape=CROP)
    with pytest.raises(DimensionalityError, match="bundle is 2D"):
        bundle.check_fits(crop_shape=(None, *CROP))
    bundle3 = open_bundle(write_bundle(tmp_path / "b3", model3, channels=["a", "b", "c"], classes=list("wxyz"),
                                       crop_shape=(None, 20, 20), input_shape=(4, 32, 32), normalization=norm))
    assert bundle3.config.spatial_dims == 3
    with pytest.raises(DimensionalityError, match="bundle is 3D"):
        bundle3.check_fits(crop_shape=CROP)
    with pytest.raises(DimensionalityError):
        write_bundle(tmp_path / "bad", efficientnet2d(3, 4, MODEL), channels=["a", "b", "c"], classes=list("wxyz"),
                     crop_shape=(1, *CROP), input_shape=MODEL, normalization=norm)
