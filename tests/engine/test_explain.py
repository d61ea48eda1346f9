"""explain / GradCAM: exact Grad-CAM and Grad-CAMO in one pass, bad input, hooks, memory, threads."""

from __future__ import annotations

import copy
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.helpers.engine_models import SharedActivationCNN, TinyCNN, crops_and_masks, lively
from gradcamo_dask import InputError, efficientnet3d, explain, gradcamo_score
from gradcamo_dask.engine.explain import GradCAM

MODEL_GRID = (8, 72, 80)  # last conv map 1 x 2 x 2, stage-4 output 1 x 3 x 3
CROP_GRID = (6, 40, 44)  # crops are resampled to the model grid inside explain
LAYERS = ["_head_swish", "_blocks.4.10", "_blocks.0"]
STAGE4 = "_blocks.4.10"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return lively(efficientnet3d(6, 4, MODEL_GRID), seed=6)


@pytest.fixture(scope="module")
def data():
    return crops_and_masks(4, 6, CROP_GRID, seed=11)


@pytest.fixture(scope="module")
def result(model, data):
    crops, masks = data
    return explain(model, crops, masks, layers=LAYERS, batch_size=3)


def assert_close(actual, expected, rel=1e-5):
    """Equal to ``rel`` relative to the largest magnitude of ``expected`` (float32 kernels
    differ by batch size at the 1e-7 level, so element-wise ratios of near-zero entries are noise)."""
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape
    scale = np.abs(expected).max()
    assert np.abs(actual - expected).max() <= rel * scale, (np.abs(actual - expected).max(), scale)
    return scale


def _resampled(crops):
    return F.interpolate(torch.from_numpy(crops), size=MODEL_GRID, mode="trilinear", align_corners=False)


def _no_hooks_left(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_logits_features_and_grids(model, data, result):
    crops, _ = data
    activations = {}
    hooks = [dict(model.named_modules())[n].register_forward_hook(
        lambda _m, _a, o, n=n: activations.update({n: o.detach().clone()})) for n in LAYERS]
    with torch.no_grad():
        logits = model(_resampled(crops))
    for h in hooks:
        h.remove()
    assert_close(result.logits, logits.numpy())
    assert len(set(result.predicted.tolist())) > 1  # cells differ, so the checks below mean something
    np.testing.assert_array_equal(result.predicted, logits.argmax(1).numpy())
    np.testing.assert_array_equal(result.targets, result.predicted)
    assert result.grids == {"_head_swish": (1, 2, 2), STAGE4: (1, 3, 3), "_blocks.0": (2, 18, 20)}
    for name in LAYERS:
        assert result.cams[name].shape == (4, *result.grids[name]) and result.cams[name].dtype == np.float32
        assert_close(result.features[name], activations[name].mean(dim=(2, 3, 4)).numpy())
    assert result.features["_head_swish"].shape == (4, 1280)
    assert isinstance(result.logits, np.ndarray) and result.input_shape == MODEL_GRID


@pytest.mark.parametrize("layer", ["_head_swish", STAGE4])
def test_cams_and_scores_match_captum_layer_gradcam(model, data, result, layer):
    from captum.attr import LayerAttribution, LayerGradCam

    crops, masks = data
    module = dict(model.named_modules())[layer]
    targets = torch.from_numpy(result.predicted)
    attribution = LayerGradCam(model, module).attribute(
        _resampled(crops), target=targets, relu_attributions=True
    ).detach()
    channels = result.features[layer].shape[1]
    assert float(attribution.max()) > 0
    # captum sums over channels; DESIGN §2 (and the paper) average: a factor C'
    assert assert_close(result.cams[layer] * channels, attribution[:, 0].numpy()) > 0
    full = LayerAttribution.interpolate(attribution, CROP_GRID, interpolate_mode="trilinear")[:, 0]
    score, inside, total = gradcamo_score(full.double().numpy(), masks)
    np.testing.assert_allclose(result.gradcamo[layer], score, rtol=1e-5)
    np.testing.assert_allclose(result.cam_inside[layer] * channels, inside, rtol=1e-5)
    np.testing.assert_allclose(result.cam_total[layer] * channels, total, rtol=1e-5)
    assert result.gradcamo[layer].dtype == np.float64


def test_per_cell_targets_in_one_batch_equal_one_cell_at_a_time(model, data):
    # In float64, so that float32 kernels choosing other algorithms for other batch sizes
    # (differences ~1e-5 of a map's scale after backpropagation) cannot hide or fake anything.
    crops, masks = data
    double = copy.deepcopy(model).double()
    labels = np.array([3, 0, 2, 1])
    layers = ["_head_swish", STAGE4]
    batch = explain(double, crops, masks, layers=layers, target=labels, batch_size=4)
    np.testing.assert_array_equal(batch.targets, labels)
    assert batch.cams[STAGE4].dtype == np.float64
    scales = []
    for i in (0, 2):
        single = explain(double, crops[i:i + 1], masks[i:i + 1], layers=layers, target=int(labels[i]))
        for name in layers:
            scales.append(assert_close(batch.cams[name][i], single.cams[name][0], rel=1e-10))
            np.testing.assert_allclose(batch.gradcamo[name][i], single.gradcamo[name][0], rtol=1e-10)
    assert sum(scale > 0 for scale in scales) >= 2  # not a comparison of all-zero maps
    fixed = explain(double, crops[:2], masks[:2], layers=STAGE4, target=1)
    np.testing.assert_array_equal(fixed.targets, [1, 1])
    assert not np.allclose(fixed.cams[STAGE4], batch.cams[STAGE4][:2])  # the class matters


def test_default_layer_and_torch_in_torch_out(model, data, result):
    crops, masks = data
    out = explain(model, torch.from_numpy(crops[:2]), torch.from_numpy(masks[:2]))
    assert out.layers == ["_head_swish"]
    assert isinstance(out.gradcamo["_head_swish"], torch.Tensor)
    np.testing.assert_allclose(out.gradcamo["_head_swish"].numpy(), result.gradcamo["_head_swish"][:2], rtol=1e-5)


def test_frozen_parameters_and_no_parameter_gradients(model, data, result):
    crops, masks = data
    for p in model.parameters():
        assert p.grad is None  # explain never wrote parameter gradients
    state = [p.requires_grad for p in model.parameters()]
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        frozen = explain(model, crops, masks, layers=["_head_swish", STAGE4])
    finally:
        for p, flag in zip(model.parameters(), state):
            p.requires_grad_(flag)
    for name in ("_head_swish", STAGE4):
        np.testing.assert_allclose(frozen.gradcamo[name], result.gradcamo[name], rtol=1e-5)


def test_grad_mode_training_mode_and_hooks_are_restored(model, data):
    crops, masks = data
    with torch.no_grad():
        explain(model, crops[:1], masks[:1])
        assert not torch.is_grad_enabled()
    assert torch.is_grad_enabled()
    model.train()
    try:
        in_training = explain(model, crops[:2], masks[:2])
        assert model.training  # restored
    finally:
        model.eval()
    evaluated = explain(model, crops[:2], masks[:2])
    np.testing.assert_allclose(in_training.gradcamo["_head_swish"], evaluated.gradcamo["_head_swish"], rtol=1e-6)
    assert _no_hooks_left(model)
    with pytest.raises(InputError, match=r"\[0, 3\]"):
        explain(model, crops[:2], masks[:2], target=[0, 7])
    assert _no_hooks_left(model) and torch.is_grad_enabled()


def test_gradcam_context_manager_releases_hooks_on_error():
    tiny = TinyCNN().eval()
    x = torch.randn(2, 2, 4, 8, 8)
    with pytest.raises(ValueError, match="boom"):
        with GradCAM(tiny, ["act1", "act2"]) as cam:
            assert len(tiny.act1._forward_hooks) == 1
            cam(x)
            raise ValueError("boom")
    assert _no_hooks_left(tiny)
    with pytest.raises(RuntimeError, match="context manager"):
        GradCAM(tiny, "act2")(x)


def test_features_only_pass_needs_no_gradients(model, data, result):
    crops, _ = data
    out = explain(model, crops, layers=LAYERS, cams=False)
    assert out.cams == {} and out.gradcamo == {} and out.grids == result.grids
    assert_close(out.logits, result.logits)
    for name in LAYERS:
        assert_close(out.features[name], result.features[name])


def test_bad_input_is_refused_with_useful_messages(model, data):
    crops, masks = data
    with pytest.raises(InputError, match="3 channels, the model's first convolution takes 6"):
        explain(model, crops[:, :3], masks)
    with pytest.raises(InputError, match="do not match crops"):
        explain(model, crops, masks[:, :-1])
    with pytest.raises(InputError, match="do not match crops"):
        explain(model, crops, masks[:3])
    with pytest.raises(InputError, match=r"\(cell, c, z, y, x\)"):
        explain(model, crops[0], masks[0])
    with pytest.raises(InputError) as err:
        explain(model, crops, masks, layers=["_head_swish", "_blocks.9"])
    assert "'_blocks.9' does not exist" in str(err.value) and ", _head_swish" in str(err.value)
    assert "_blocks.4.10._bn2" in str(err.value)
    with pytest.raises(InputError, match=r"'_fc' outputs \(4, 4\), not a spatial map"):
        explain(model, crops, masks, layers="_fc")
    bad = crops.copy()
    bad[1, 2, 0, 0, 0] = np.nan
    bad[3, 0, 1, 1, 1] = np.inf
    with pytest.raises(InputError, match=r"NaN or inf in cell\(s\) 1, 3;"):
        explain(model, bad, masks, batch_size=2)
    with pytest.raises(InputError, match="4 targets"):
        explain(model, crops[:3], masks[:3], target=[0, 1, 2, 3])
    with pytest.raises(InputError, match="built .* for input grid"):
        explain(model, crops, masks, input_shape=(16, 72, 80))
    assert _no_hooks_left(model)


def test_a_module_that_runs_twice_is_refused():
    shared = SharedActivationCNN().eval()
    with pytest.raises(InputError, match="'act1' runs 2 times"):
        explain(shared, np.zeros((1, 2, 4, 8, 8), np.float32), layers="act1")


def test_empty_batch_returns_empty_results(model, data):
    crops, masks = data
    out = explain(model, crops[:0], masks[:0], layers=["_head_swish", STAGE4])
    assert out.logits.shape == (0, 4) and out.predicted.shape == (0,)
    assert out.cams[STAGE4].shape == (0, 1, 3, 3) and out.features["_head_swish"].shape == (0, 1280)
    assert out.gradcamo["_head_swish"].shape == (0,) and out.grids[STAGE4] == (1, 3, 3)


def test_generic_cnn_without_resampling():
    tiny = lively(TinyCNN(), seed=1)
    crops, masks = crops_and_masks(3, 2, (4, 8, 8), seed=2)
    out = explain(tiny, crops, masks)
    assert out.layers == ["act2"] and out.grids == {"act2": (2, 4, 4)} and out.input_shape == (4, 8, 8)
    # by hand: Grad-CAM from autograd on the whole network, then Eq. 5 on the upsampled map
    x = torch.from_numpy(crops)
    a2 = tiny.act2(tiny.conv2(tiny.act1(tiny.conv1(x))))
    logits = tiny.fc(tiny.pool(a2).flatten(1))
    k = logits.argmax(1)
    grads = torch.autograd.grad(logits.gather(1, k[:, None]).sum(), a2)[0]
    cam = torch.relu((grads.mean(dim=(2, 3, 4), keepdim=True) * a2).mean(dim=1)).detach()
    assert_close(out.cams["act2"], cam.numpy())
    full = F.interpolate(cam[:, None].double(), size=(4, 8, 8), mode="trilinear", align_corners=False)[:, 0]
    expected = (full * torch.from_numpy(masks)).sum(dim=(1, 2, 3)) / full.sum(dim=(1, 2, 3))
    np.testing.assert_allclose(out.gradcamo["act2"], expected.numpy(), rtol=1e-5)


def test_autocast_and_channels_last_paths_on_cpu(model, data, result):
    crops, masks = data
    cl = explain(model, crops[:2], masks[:2], layers=["_head_swish", STAGE4], channels_last=True)
    for name in ("_head_swish", STAGE4):
        assert_close(cl.cams[name], result.cams[name][:2], rel=1e-4)
    bf16 = explain(model, crops[:2], masks[:2], layers=[STAGE4], autocast=torch.bfloat16)
    assert bf16.cams[STAGE4].dtype == np.float32 and bf16.gradcamo[STAGE4].dtype == np.float64
    np.testing.assert_allclose(bf16.logits, result.logits[:2], atol=0.1 * np.abs(result.logits).max())
    reference = result.cams[STAGE4][:2].ravel()
    assert np.corrcoef(bf16.cams[STAGE4].ravel(), reference)[0, 1] > 0.9
    np.testing.assert_allclose(bf16.gradcamo[STAGE4], result.gradcamo[STAGE4][:2], atol=0.05)


def test_threads_sharing_one_model_get_their_own_results():
    tiny = lively(TinyCNN(), seed=3)
    inputs = [crops_and_masks(2, 2, (4, 8, 8), seed=s) for s in range(4)]
    expected = [explain(tiny, c, m).gradcamo["act2"] for c, m in inputs]
    got: dict[int, list] = {}

    def work(i):
        got[i] = [explain(tiny, *inputs[i]).gradcamo["act2"] for _ in range(25)]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(4):
        for value in got[i]:
            np.testing.assert_allclose(value, expected[i], rtol=1e-6)
    assert _no_hooks_left(tiny)


_MEMORY_PROBE = """
import gc, json, sys, tracemalloc
import psutil, torch
sys.path.insert(0, str(__import__('pathlib').Path(sys.argv[1]).parent))
from tests.helpers.engine_models import TinyCNN, crops_and_masks, lively
from gradcamo_dask import explain

torch.set_num_threads(1)  # tiny ops: thread hand-offs would dominate on a busy machine
tiny = lively(TinyCNN(width=8), seed=4)
crops, masks = crops_and_masks(4, 2, (6, 16, 16), seed=5)

def call():
    out = explain(tiny, crops, masks, layers=["act1", "act2"])
    assert out.gradcamo["act2"].shape == (4,)
    if sys.argv[2] == "leak":  # the control: keep every call's logits alive
        kept.append(out.logits)

kept = []
for _ in range(50):  # warm-up: allocator pools, lazy imports, caches
    call()
kept.clear()
gc.collect()
process = psutil.Process()
rss_before = process.memory_info().rss
tracemalloc.start()
python_before = tracemalloc.get_traced_memory()[0]
for _ in range(1000):
    call()
gc.collect()
python_growth = tracemalloc.get_traced_memory()[0] - python_before
tracemalloc.stop()
hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in tiny.modules())
print(json.dumps({"python": python_growth, "rss": process.memory_info().rss - rss_before, "hooks": hooks}))
"""


def _growth_over_1000_calls(*modes):
    """Memory growth of 1,000 explain calls for each of ``modes``, each measured in its own fresh interpreter.

    tracemalloc counts every thread of its process; in a full test session, threads
    that earlier tests leave behind (Dask clients, progress monitors) allocate during
    the window, so the measurement runs alone in a subprocess. The subprocesses run at
    the same time (each on one core of CI's two): RSS and tracemalloc are per process.
    """
    import json
    import subprocess
    import sys
    from pathlib import Path

    tests_dir = Path(__file__).resolve().parents[1]
    probes = [subprocess.Popen([sys.executable, "-c", _MEMORY_PROBE, str(tests_dir), mode], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=tests_dir.parent,
                               env={**__import__("os").environ, "PYTHONPATH": str(tests_dir.parent)})
              for mode in modes]
    results = []
    try:
        for probe in probes:
            stdout, stderr = probe.communicate(timeout=600)
            assert probe.returncode == 0, stderr[-2000:]
            results.append(json.loads(stdout.strip().splitlines()[-1]))
    finally:
        for probe in probes:
            if probe.poll() is None:
                probe.kill()
                probe.wait()
    return results


def test_memory_does_not_grow_over_1000_calls():
    pytest.importorskip("psutil")
    # the honest run and its leaky control run side by side (each probe is one process on one torch thread)
    honest, leaky = _growth_over_1000_calls("honest", "leak")
    # Each call handles ~50 KB of crops and ~200 KB of activations. Measured on the dev
    # machine: an honest run grows ~13 KB (tracemalloc: Python objects) and ~1 MB (RSS: the
    # C allocator settling); keeping each call's logits alive grows 234 KB / 2.7 MB, keeping
    # its CAMs 700 KB / 38 MB. Hooks, closures or autograd graphs that survive a call are
    # Python objects too, so both limits below catch a leak of any of them.
    assert honest["python"] < 64 * 1024, honest
    assert honest["rss"] < 20 * 2**20, honest
    assert honest["hooks"] == 0
    assert leaky["python"] > 64 * 1024, leaky  # the control: the same probe sees a real leak


# ------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_cuda_matches_cpu_and_cupy_round_trips(model, data, result):
    crops, masks = data
    cuda_model = lively(efficientnet3d(6, 4, MODEL_GRID), seed=6).cuda()
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # true float32
    try:
        fp32 = explain(cuda_model, torch.from_numpy(crops).cuda(), torch.from_numpy(masks).cuda(),
                       layers=LAYERS, autocast=False, channels_last=False)
        channels_last = explain(cuda_model, torch.from_numpy(crops).cuda(), torch.from_numpy(masks).cuda(),
                                layers=LAYERS, autocast=False, channels_last=True)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    assert fp32.logits.is_cuda
    for name in LAYERS:
        np.testing.assert_allclose(fp32.gradcamo[name].cpu().numpy(), result.gradcamo[name], rtol=1e-3, atol=1e-4)
        assert_close(channels_last.cams[name].cpu().numpy(), fp32.cams[name].cpu().numpy(), rel=1e-4)
    default = explain(cuda_model, torch.from_numpy(crops).cuda(), torch.from_numpy(masks).cuda(), layers=LAYERS)
    np.testing.assert_allclose(default.gradcamo[STAGE4].cpu().numpy(), result.gradcamo[STAGE4], atol=0.05)
    cupy = pytest.importorskip("cupy")
    out = explain(cuda_model, cupy.asarray(crops), cupy.asarray(masks), layers=LAYERS, autocast=False)
    assert isinstance(out.gradcamo[STAGE4], cupy.ndarray)
    np.testing.assert_allclose(out.gradcamo[STAGE4].get(), result.gradcamo[STAGE4], rtol=1e-3, atol=1e-4)


def test_nonfinite_check_is_exact():
    from gradcamo_dask.engine.explain import _nonfinite_cells

    crops = np.zeros((5, 2, 3, 4, 4), np.float32)
    crops[0, 0, 0, 0, :2] = 3e38  # finite, but its sum overflows: not flagged
    crops[1, 1, 2, 3, 3] = np.nan
    crops[2, 0, 0, 0, 0], crops[2, 0, 0, 0, 1] = np.inf, -np.inf  # sum is NaN
    crops[4, 1, 1, 1, 1] = -np.inf
    for batch in (1, 2, 5):
        assert _nonfinite_cells(crops, batch) == [1, 2, 4]
        assert _nonfinite_cells(torch.from_numpy(crops), batch) == [1, 2, 4]


# ----------------------------------------------------------- forward-only head
def test_head_layer_needs_no_backward_and_equals_autograd(model, data, monkeypatch):
    crops, masks = data
    targets = np.array([3, 0, 2, 1])
    reference = {t: explain(model, crops, masks, layers=LAYERS, batch_size=3, route="autograd", target=t)
                 for t in ("predicted", 2)}
    reference["cells"] = explain(model, crops, masks, layers=LAYERS, batch_size=3, route="autograd", target=targets)

    def no_backward(*args, **kwargs):
        raise AssertionError("autograd ran for a layer that needs no backward pass")

    with monkeypatch.context() as patch:
        patch.setattr(torch.autograd, "grad", no_backward)
        head = explain(model, crops, masks, layers=["_head_swish"], batch_size=3)
        with pytest.raises(AssertionError, match="autograd ran"):
            explain(model, crops, masks, layers=["_head_swish"], route="autograd")
    cells = explain(model, crops, masks, layers=LAYERS, batch_size=3, target=targets)
    for got, want in ((head, reference["predicted"]), (cells, reference["cells"]),
                      (explain(model, crops, masks, layers=LAYERS, batch_size=3, target=2), reference[2])):
        for name in got.cams:
            scale = assert_close(got.cams[name], want.cams[name], rel=1e-6)
            assert scale > 0
            np.testing.assert_allclose(got.gradcamo[name], want.gradcamo[name], atol=1e-6, rtol=0)
            assert_close(got.cam_total[name], want.cam_total[name], rel=1e-6)
        np.testing.assert_array_equal(got.targets, want.targets)


def test_head_route_in_float64_is_exact_and_refused_where_it_does_not_hold(data):
    from gradcamo_dask.engine.explain import GradCAM

    crops, masks = data
    model64 = lively(efficientnet3d(6, 4, MODEL_GRID), seed=8).double()
    a = explain(model64, crops.astype(np.float64), masks, layers="_head_swish", route="analytic")
    b = explain(model64, crops.astype(np.float64), masks, layers="_head_swish", route="autograd")
    np.testing.assert_allclose(a.cams["_head_swish"], b.cams["_head_swish"], rtol=1e-12, atol=1e-15)
    with pytest.raises(InputError, match="needs a backward pass"):
        GradCAM(model64, [STAGE4], route="analytic")
    with pytest.raises(InputError, match="route must be"):
        GradCAM(model64, [STAGE4], route="fast")
    assert GradCAM(TinyCNN(), ["act2"]).heads == {}  # a model that names no pooled head: autograd


def test_head_cam_stays_float32_under_bf16_autocast(model, data):
    from gradcamo_dask.engine.gradcam import head_cam

    acts = torch.rand(3, 1280, 1, 2, 2)
    weight = torch.randn(4, 1280)
    targets = torch.tensor([0, 3, 1])
    plain = head_cam(acts, weight, targets)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        under = head_cam(acts, weight, targets)
    assert under.dtype == torch.float32 and torch.equal(plain, under)


def test_hirescam_keeps_the_gradient_per_voxel(model, data, result):
    """method="hirescam": ReLU(mean_c dY/dA_c * A_c), by hand with autograd; the same map as Grad-CAM at the
    pooled-linear head (its gradient is W[k, c] / V at every voxel), another map inside the network."""
    crops, masks = data
    hires = explain(model, crops, masks, layers=LAYERS, batch_size=3, method="hirescam")
    kept = {}
    hooks = [dict(model.named_modules())[n].register_forward_hook(
        lambda _m, _a, o, n=n: kept.update({n: o})) for n in LAYERS]
    try:
        logits = model(_resampled(crops))
    finally:
        for h in hooks:
            h.remove()
    selected = logits.gather(1, torch.from_numpy(result.predicted)[:, None]).sum()
    grads = torch.autograd.grad(selected, [kept[n] for n in LAYERS])
    for name, grad in zip(LAYERS, grads):
        a = kept[name].detach()
        by_hand = torch.relu((grad * a).sum(1) / a.shape[1])
        assert assert_close(hires.cams[name], by_hand.numpy(), rel=1e-4) > 0
        full = F.interpolate(by_hand[:, None], size=CROP_GRID, mode="trilinear", align_corners=False)[:, 0]
        np.testing.assert_allclose(hires.gradcamo[name], gradcamo_score(full.double().numpy(), masks)[0], rtol=1e-4)
    assert_close(hires.cams["_head_swish"], result.cams["_head_swish"], rel=1e-5)
    for name in (STAGE4, "_blocks.0"):
        assert np.abs(hires.cams[name] - result.cams[name]).max() > 1e-3 * np.abs(result.cams[name]).max()
    np.testing.assert_array_equal(hires.predicted, result.predicted)
    np.testing.assert_allclose(hires.features["_head_swish"], result.features["_head_swish"], rtol=1e-5)
    with pytest.raises(InputError, match="CAM method must be one of"):
        explain(model, crops, masks, layers=LAYERS, method="gradcam++")
