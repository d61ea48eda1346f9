"""The differentiable Grad-CAMO regulariser and the training augmentations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradcamo_dask.engine.augment import NO_AUGMENTATION, Augmentation, augment_batch
from gradcamo_dask.errors import InputError
from gradcamo_dask.engine.regularize import gradcamo_loss
from tests.helpers.engine_models import TinyCNN


def smooth_cnn(bias: bool = True) -> nn.Module:
    """Smooth (tanh) tiny 3D CNN: enough for gradcheck in float64."""
    return TinyCNN(2, 3, width=4, width2=5, activation=nn.Tanh, bias=bias)


def _data(seed: int = 0, n: int = 3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 4, 6, 6, generator=g, dtype=torch.float64)
    masks = torch.rand(n, 7, 9, 9, generator=g) > 0.5  # crop grid differs from the CAM grid (2, 3, 3)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y, masks


def test_lambda_zero_is_cross_entropy_value_and_gradient():
    torch.manual_seed(0)
    model = smooth_cnn().double()
    x, y, masks = _data()
    out = gradcamo_loss(model, x, y, masks, layer="act2", lam=0.0)
    out.loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ce = F.cross_entropy(model(x), y)
    ce.backward()
    assert torch.equal(out.loss.detach(), ce.detach())
    for g, p in zip(grads, model.parameters()):
        assert torch.equal(g, p.grad)


def test_scores_match_the_engine_audit():
    from gradcamo_dask.engine.explain import explain

    torch.manual_seed(1)
    model = smooth_cnn().double()
    x, y, masks = _data(1, n=4)
    out = gradcamo_loss(model, x, y, masks, layer="act2", lam=1.0, target="predicted")
    crops = F.interpolate(x, size=(7, 9, 9), mode="trilinear", align_corners=False)  # explain resamples back
    ex = explain(model.eval(), x, None, layers="act2", input_shape=(4, 6, 6))
    # same Grad-CAM maps as the engine, and the same Eq. 5 scores at the crop grid
    from gradcamo_dask.engine.gradcamo import gradcamo_score, upsample_cam

    cam = ex.cams["act2"]
    full, _, _ = gradcamo_score(upsample_cam(torch.as_tensor(np.asarray(cam)), (7, 9, 9)), masks)
    np.testing.assert_allclose(out.scores.numpy(), np.asarray(full), rtol=1e-6, atol=1e-9)  # explain keeps float32 maps
    assert crops.shape[2:] == masks.shape[1:]


def test_gradcamo_term_gradient_is_exact_gradcheck():
    torch.manual_seed(2)
    model = smooth_cnn().double()
    x, y, masks = _data(2, n=2)
    x.requires_grad_(True)

    def term(inp: torch.Tensor) -> torch.Tensor:
        return gradcamo_loss(model, inp, y, masks, layer="act2", lam=1.0).mean_gradcamo

    assert float(term(x).detach()) > 0
    assert torch.autograd.gradcheck(term, (x,), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_parameter_gradient_matches_finite_differences():
    torch.manual_seed(3)
    model = smooth_cnn().double()
    x, y, masks = _data(3, n=3)
    lam = 2.0
    out = gradcamo_loss(model, x, y, masks, layer="act2", lam=lam)
    out.loss.backward()
    weight = model.conv1.weight
    analytic = weight.grad.clone()
    rng = np.random.default_rng(0)
    for flat in rng.choice(weight.numel(), 5, replace=False):
        idx = np.unravel_index(flat, weight.shape)
        eps = 1e-6
        with torch.no_grad():
            weight[idx] += eps
        plus = float(gradcamo_loss(model, x, y, masks, layer="act2", lam=lam).loss)
        with torch.no_grad():
            weight[idx] -= 2 * eps
        minus = float(gradcamo_loss(model, x, y, masks, layer="act2", lam=lam).loss)
        with torch.no_grad():
            weight[idx] += eps
        assert (plus - minus) / (2 * eps) == pytest.approx(float(analytic[idx]), rel=1e-4, abs=1e-8)
    # and the regulariser really changes the gradient
    model.zero_grad()
    gradcamo_loss(model, x, y, masks, layer="act2", lam=0.0).loss.backward()
    assert not torch.allclose(model.conv1.weight.grad, analytic)


def test_undefined_scores_do_not_poison_the_loss():
    torch.manual_seed(4)
    model = smooth_cnn(bias=False).double()
    x, y, masks = _data(4, n=3)
    x[1] = 0.0  # no bias anywhere: zero activations, an all-zero map, sum(G) == 0
    out = gradcamo_loss(model, x, y, masks, layer="act2", lam=1.0)
    assert out.n_undefined == 1
    assert torch.isnan(out.scores[1]) and torch.isfinite(out.scores[[0, 2]]).all()
    assert float(out.mean_gradcamo) == pytest.approx(float(out.scores[[0, 2]].mean()))
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    # every cell undefined: the term is 0, the loss is the cross-entropy
    model.zero_grad()
    out = gradcamo_loss(model, torch.zeros_like(x), y, masks, layer="act2", lam=1.0)
    assert out.n_undefined == 3 and float(out.mean_gradcamo) == 0.0
    assert float(out.loss) == pytest.approx(float(out.cross_entropy))


def test_bad_layer_and_target():
    model = smooth_cnn().double()
    x, y, masks = _data()
    with pytest.raises(InputError, match="fc"):
        gradcamo_loss(model, x, y, masks, layer="fc", lam=1.0)
    with pytest.raises(InputError, match="target"):
        gradcamo_loss(model, x, y, masks, layer="act2", lam=1.0, target="true")


# ------------------------------------------------------------------ augment
def test_flips_are_x_and_y_only():
    x = torch.rand(64, 2, 3, 4, 5)
    g = torch.Generator().manual_seed(0)
    flips = Augmentation(p=1.0, brightness=None, gamma=None)
    assert torch.equal(augment_batch(x, g, flips), x.flip(-1).flip(-2))
    out = augment_batch(x, torch.Generator().manual_seed(1), Augmentation(p=0.5, brightness=None, gamma=None))
    kinds = set()
    for i in range(len(x)):
        for cand, name in ((x[i], "none"), (x[i].flip(-1), "x"), (x[i].flip(-2), "y"), (x[i].flip(-1).flip(-2), "xy")):
            if torch.equal(out[i], cand):
                kinds.add(name)
                break
        else:
            raise AssertionError(f"cell {i} is not a pure x/y flip (z flipped?)")
    assert kinds == {"none", "x", "y", "xy"}
    assert torch.equal(augment_batch(x, torch.Generator().manual_seed(0), NO_AUGMENTATION), x)


def test_brightness_and_gamma_ranges_and_probability():
    x = torch.full((4000, 1, 1, 2, 2), 0.5, dtype=torch.float64)
    out = augment_batch(x, torch.Generator().manual_seed(0), Augmentation(p=0.5, flip_x=False, flip_y=False,
                                                                           gamma=None))[:, 0, 0, 0, 0] / 0.5
    changed = out != 1
    assert 0.45 < float(changed.double().mean()) < 0.55
    assert float(out[changed].min()) >= 0.5 and float(out[changed].max()) <= 1.25
    assert float(out[changed].min()) < 0.55 and float(out[changed].max()) > 1.2
    out = augment_batch(x, torch.Generator().manual_seed(0), Augmentation(p=1.0, flip_x=False, flip_y=False,
                                                                           brightness=None))[:, 0, 0, 0, 0]
    power = torch.log(out) / np.log(0.5)
    assert float(power.min()) >= 0.5 - 1e-9 and float(power.max()) <= 1.5 + 1e-9
    a = augment_batch(x, torch.Generator().manual_seed(5))
    b = augment_batch(x, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


# ------------------------------------------------------------ bf16 / CUDA
def test_regularizer_under_bf16_autocast_stays_close_to_float32():
    # the logic of the CUDA path (bf16 autocast, maps and scores widened to float32), run on the CPU
    torch.manual_seed(5)
    model = smooth_cnn()
    x, y, masks = _data(5, n=4)
    x = x.float()
    ref = gradcamo_loss(model, x, y, masks, layer="act2", lam=1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = gradcamo_loss(model, x, y, masks, layer="act2", lam=1.0)
    assert low.scores.dtype == torch.float32 and low.loss.dtype == torch.float32
    np.testing.assert_allclose(low.scores.numpy(), ref.scores.numpy(), atol=0.05)
    low.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_train_step_channels_last_matches_contiguous():
    from gradcamo_dask.engine.models import efficientnet3d
    from gradcamo_dask.jobs.epochs import to_device

    torch.manual_seed(0)
    model = efficientnet3d(2, 3, (8, 16, 16)).eval()
    x = torch.randn(2, 2, 8, 16, 16)
    y = torch.tensor([0, 2])
    masks = torch.rand(2, 8, 20, 20) > 0.5
    a = gradcamo_loss(model, to_device(x, torch.device("cpu"), False), y, masks, layer="_blocks.4.10", lam=1.0)
    model_cl = model.to(memory_format=torch.channels_last_3d)
    xc = to_device(x, torch.device("cpu"), True)
    assert xc.is_contiguous(memory_format=torch.channels_last_3d)
    b = gradcamo_loss(model_cl, xc, y, masks, layer="_blocks.4.10", lam=1.0)
    assert float(a.loss) == pytest.approx(float(b.loss), rel=1e-4, abs=1e-5)


@pytest.mark.gpu
def test_cuda_bf16_channels_last_training_step_matches_cpu():
    from gradcamo_dask.engine.models import efficientnet3d
    from gradcamo_dask.engine.precision import autocast_context
    from gradcamo_dask.jobs.epochs import to_device

    torch.manual_seed(0)
    model = efficientnet3d(6, 4, (16, 48, 48)).eval()
    x = torch.randn(4, 6, 16, 48, 48)
    y = torch.tensor([0, 1, 2, 3])
    masks = torch.rand(4, 16, 48, 48) > 0.6
    cpu = gradcamo_loss(model, x, y, masks, layer="_blocks.4.10", lam=1.0)
    device = torch.device("cuda")
    gpu_model = efficientnet3d(6, 4, (16, 48, 48)).eval()
    gpu_model.load_state_dict(model.state_dict())
    gpu_model = gpu_model.to(device).to(memory_format=torch.channels_last_3d)
    with autocast_context(device, None):
        gpu = gradcamo_loss(gpu_model, to_device(x, device, True), y.to(device), masks.to(device),
                            layer="_blocks.4.10", lam=1.0)
    gpu.loss.backward()
    assert float(gpu.cross_entropy) == pytest.approx(float(cpu.cross_entropy), rel=0.05, abs=0.05)
    np.testing.assert_allclose(gpu.scores.cpu().numpy(), cpu.scores.numpy(), atol=0.05)
    assert all(torch.isfinite(p.grad).all() for p in gpu_model.parameters() if p.grad is not None)


def test_mask_contractions_stay_float32_under_bf16_autocast():
    from gradcamo_dask.engine.regularize import mask_weights

    torch.manual_seed(3)
    masks = torch.rand(3, 9, 20, 20) > 0.5
    plain = mask_weights(masks, (2, 5, 5), torch.float32, torch.device("cpu"))
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        under = mask_weights(masks, (2, 5, 5), torch.float32, torch.device("cpu"))
        model = nn.Sequential(nn.Conv3d(2, 5, 3, stride=2, padding=1), nn.Tanh(), nn.AdaptiveAvgPool3d(1),
                              nn.Flatten(), nn.Linear(5, 3))
        x, y, m = _data(4)
        out = gradcamo_loss(model, x.float(), y, m, layer="1", lam=1.0)
    for a, b in zip(plain, under):
        assert b.dtype == torch.float32
        assert torch.equal(a, b)  # bf16 matmuls would round the interpolation weights
    assert out.scores.dtype == torch.float32 and out.mean_gradcamo.dtype == torch.float32


def test_evidence_both_scores_the_absolute_map_before_the_relu():
    from gradcamo_dask.engine.gradcamo import gradcamo_score, upsample_cam

    torch.manual_seed(2)
    model = smooth_cnn().double()
    x, y, masks = _data(2, n=4)
    both = gradcamo_loss(model, x, y, masks, layer="act2", lam=1.0, evidence="both")
    positive = gradcamo_loss(model, x, y, masks, layer="act2", lam=1.0)
    # by hand: the signed map (1/C') sum_c w_c A_c of the true label, its absolute value, upsampled, Eq. 5
    kept = {}
    hook = model.get_submodule("act2").register_forward_hook(lambda _m, _i, o: kept.__setitem__("a", o))
    try:
        logits = model(x)
    finally:
        hook.remove()
    (grad,) = torch.autograd.grad(logits.gather(1, y[:, None]).sum(), [kept["a"]])
    signed = (grad.mean(dim=(2, 3, 4), keepdim=True) * kept["a"]).mean(1).detach()
    assert (signed < 0).any() and (signed > 0).any()  # both kinds of evidence: the two maps differ
    expected, _, _ = gradcamo_score(upsample_cam(signed.abs(), (7, 9, 9)), masks)
    np.testing.assert_allclose(both.scores.numpy(), np.asarray(expected), rtol=1e-6)
    assert not np.allclose(both.scores.numpy(), positive.scores.numpy())
    both.loss.backward()  # differentiable like the paper's map
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    with pytest.raises(InputError, match="evidence"):
        gradcamo_loss(model, x, y, masks, layer="act2", lam=1.0, evidence="negative")


def test_hirescam_regularizer_scores_the_engine_hirescam_map_and_has_exact_gradients():
    """method="hirescam": the loss scores the same map as explain(method="hirescam"), the gradient kept per
    voxel; the term's gradient passes gradcheck (second derivatives through dY/dA)."""
    from gradcamo_dask.engine.explain import explain
    from gradcamo_dask.engine.gradcamo import gradcamo_score, upsample_cam

    torch.manual_seed(3)
    model = smooth_cnn().double()
    x, y, masks = _data(3, n=4)
    for layer in ("act1", "act2"):
        hires = gradcamo_loss(model, x, y, masks, layer=layer, lam=1.0, target="predicted", method="hirescam")
        paper = gradcamo_loss(model, x, y, masks, layer=layer, lam=1.0, target="predicted")
        ex = explain(model.eval(), x, None, layers=layer, input_shape=(4, 6, 6), method="hirescam")
        full, _, _ = gradcamo_score(upsample_cam(torch.as_tensor(np.asarray(ex.cams[layer])), (7, 9, 9)), masks)
        np.testing.assert_allclose(hires.scores.numpy(), np.asarray(full), rtol=1e-6, atol=1e-9)
        gap = np.nanmax(np.abs(hires.scores.numpy() - paper.scores.numpy()))
        # act2 feeds global pooling and the linear layer alone: its gradient is the same at every voxel
        assert gap > 1e-3 if layer == "act1" else gap < 1e-9, (layer, gap)

    x2, y2, masks2 = _data(2, n=2)
    x2.requires_grad_(True)

    def term(inp: torch.Tensor) -> torch.Tensor:
        return gradcamo_loss(model, inp, y2, masks2, layer="act1", lam=1.0, method="hirescam").mean_gradcamo

    assert float(term(x2).detach()) > 0
    assert torch.autograd.gradcheck(term, (x2,), eps=1e-6, atol=1e-6, rtol=1e-4)
    with pytest.raises(InputError, match="CAM method must be one of"):
        gradcamo_loss(model, x, y, masks, layer="act2", lam=1.0, method="gradcam++")
