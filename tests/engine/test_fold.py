"""Batch norm folded into convolutions: the same outputs and Grad-CAMO as the unfolded model in eval mode."""

from __future__ import annotations

import torch

from gradcamo_dask.engine.explain import explain
from gradcamo_dask.engine.fold import fold_batch_norm, foldable_pairs
from gradcamo_dask.engine.models import efficientnet3d
from tests.helpers.engine_models import lively
from tests.helpers.plate_fixtures import INPUT_SHAPE, LAYERS

CROP = (8, 40, 40)


def _model():
    torch.manual_seed(0)
    return lively(efficientnet3d(6, 3, INPUT_SHAPE), seed=1)


def test_folded_model_equals_the_unfolded_one_in_eval_mode():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold_batch_norm(model, INPUT_SHAPE)
    n_bn = sum(isinstance(m, torch.nn.BatchNorm3d) for m in model.modules())
    left = sum(isinstance(m, torch.nn.BatchNorm3d) for m in folded.modules())
    assert n_bn > 40 and left == 0  # every batch norm of EfficientNet-B0 follows a conv
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the original is untouched
    x = torch.randn(3, 6, *INPUT_SHAPE)
    with torch.no_grad():
        want, got = model.eval()(x), folded(x)
    assert want.abs().max() > 1e-2  # the comparison means something
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_folded_model_gives_the_same_features_maps_and_gradcamo():
    model = _model()
    folded = fold_batch_norm(model, INPUT_SHAPE, keep=LAYERS)
    crops = torch.randn(4, 6, *CROP)
    masks = torch.zeros(4, *CROP, dtype=torch.bool)
    masks[:, 2:6, 10:30, 12:28] = True
    a = explain(model, crops, masks, layers=LAYERS, input_shape=INPUT_SHAPE)
    b = explain(folded, crops, masks, layers=LAYERS, input_shape=INPUT_SHAPE)
    torch.testing.assert_close(b.logits, a.logits, atol=1e-5, rtol=1e-5)
    for name in LAYERS:
        torch.testing.assert_close(b.features[name], a.features[name], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(b.gradcamo[name], a.gradcamo[name], atol=1e-5, rtol=0, equal_nan=True)
        torch.testing.assert_close(b.cams[name], a.cams[name], atol=1e-5, rtol=1e-4)


def test_a_kept_conv_is_not_folded():
    model = _model()
    pairs = foldable_pairs(model, INPUT_SHAPE)
    conv = pairs[3][0]
    kept = foldable_pairs(model, INPUT_SHAPE, keep=[conv])
    assert conv not in {c for c, _ in kept} and len(kept) == len(pairs) - 1
    folded = fold_batch_norm(model, INPUT_SHAPE, keep=[conv])
    assert isinstance(folded.get_submodule(pairs[3][1]), torch.nn.BatchNorm3d)
