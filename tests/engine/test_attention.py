"""Vision transformers: attention maps (CLS attention, rollout, Grad-CAM on tokens) as Grad-CAMO's G."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gradcamo_dask import explain
from gradcamo_dask.engine.attention import AttentionCAM, attention_rollout, cls_rollout
from gradcamo_dask.engine.gradcamo import gradcamo_score, upsample_cam
from gradcamo_dask.errors import InputError
from gradcamo_dask.engine.vit import vit

MODEL = (16, 20)
PATCH = 4  # patch grid 4 x 5
CROP = (23, 26)
SOURCES = ["cls_attention", "rollout", "gradcam_tokens"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(4)
    net = vit(3, 4, MODEL, patch_size=PATCH, hidden_size=16, mlp_dim=32, num_layers=2, num_heads=2).eval()
    with torch.no_grad():  # livelier than the default init, so that attention is far from uniform
        for name, p in net.named_parameters():
            if "qkv" in name or "pos" in name:
                p.mul_(6.0)
    return net


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(7)
    crops = rng.normal(size=(5, 3, *CROP)).astype(np.float32)
    masks = np.zeros((5, *CROP), dtype=bool)
    for i in range(5):
        y, x = rng.integers(2, 12), rng.integers(2, 12)
        masks[i, y:y + 10, x:x + 12] = True
        crops[i, :, y:y + 10, x:x + 12] += rng.normal(scale=2.0, size=(3, 1, 1))
    return crops, masks


def _hand_attention(block, tokens):
    """softmax(QK^T / sqrt(d)) per head, computed here from the block's qkv weights: (N, heads, T, T)."""
    attn = block.attn
    heads, width = attn.num_heads, tokens.shape[-1]
    d = width // heads
    qkv = F.linear(tokens, attn.qkv.weight, attn.qkv.bias)  # (N, T, 3 * heads * d), laid out (qkv, head, d)
    qkv = qkv.reshape(tokens.shape[0], tokens.shape[1], 3, heads, d).permute(2, 0, 3, 1, 4)
    q, k = qkv[0], qkv[1]
    return torch.softmax(q @ k.transpose(-1, -2) / d ** 0.5, dim=-1)


def _reference(model, crops, targets):
    """Per-block attention, CLS features and token Grad-CAM, by hand from one autograd pass."""
    inputs = F.interpolate(torch.from_numpy(crops), size=MODEL, mode="bilinear", align_corners=False)
    seen = {}
    hooks = [b.norm1.register_forward_hook(lambda _m, _a, o, i=i: seen.update({i: o})) for i, b in
             enumerate(model.vit.blocks)]
    hooks.append(model.vit.norm.register_forward_hook(lambda _m, _a, o: seen.update({"final": o})))
    try:
        logits = model(inputs)
    finally:
        for h in hooks:
            h.remove()
    last = len(model.vit.blocks) - 1
    grad = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), seen[last])[0]
    att = [_hand_attention(b, seen[i]).detach() for i, b in enumerate(model.vit.blocks)]
    tokens, grad = seen[last].detach()[:, 1:], grad[:, 1:]
    token_cam = torch.relu((grad.mean(dim=1, keepdim=True) * tokens).sum(-1) / tokens.shape[-1])
    return att, seen["final"][:, 0].detach(), token_cam, logits.detach()


def test_maps_equal_hand_computed_attention(model, data):
    crops, masks = data
    result = explain(model, crops, masks, layers=SOURCES, batch_size=2)
    att, features, token_cam, logits = _reference(model, crops, torch.from_numpy(result.predicted))
    torch.testing.assert_close(torch.from_numpy(result.logits), logits, rtol=1e-4, atol=1e-5)
    grid = (MODEL[0] // PATCH, MODEL[1] // PATCH)
    cls = att[-1].mean(dim=1)[:, 0, 1:]
    assert float(cls.std()) > 0.01  # far from uniform: the comparison means something
    np.testing.assert_allclose(result.cams["cls_attention"], cls.reshape(-1, *grid).numpy(), rtol=1e-4, atol=1e-6)
    rollout = torch.eye(att[0].shape[-1])
    for a in att:
        a = 0.5 * a.mean(dim=1) + 0.5 * torch.eye(a.shape[-1])
        rollout = (a / a.sum(-1, keepdim=True)) @ rollout
    np.testing.assert_allclose(result.cams["rollout"], rollout[:, 0, 1:].reshape(-1, *grid).numpy(), rtol=1e-4,
                               atol=1e-6)
    full = attention_rollout([a for a in att])  # the T x T product, first block first
    np.testing.assert_allclose(full[:, 0].numpy(), cls_rollout(att).numpy(), rtol=1e-5, atol=1e-7)
    assert float(token_cam.max()) > 0
    np.testing.assert_allclose(result.cams["gradcam_tokens"], token_cam.reshape(-1, *grid).numpy(), rtol=1e-4,
                               atol=1e-6 * float(token_cam.max()))
    for source in SOURCES:
        np.testing.assert_allclose(result.features[source], features.numpy(), rtol=1e-4, atol=1e-6)
        assert result.grids[source] == grid
        full = upsample_cam(result.cams[source].astype(np.float64), CROP)
        np.testing.assert_allclose(result.gradcamo[source], gradcamo_score(full, masks, spatial_dims=2)[0],
                                   rtol=1e-5)
    assert not np.allclose(result.gradcamo["cls_attention"], result.gradcamo["gradcam_tokens"])


def test_hooks_are_released_and_the_model_keeps_no_attention(model, data):
    crops, _ = data
    blocks = list(model.vit.blocks)
    assert not any(b.attn.save_attn for b in blocks)
    cam = AttentionCAM(model, SOURCES)
    x = torch.zeros(1, 3, *MODEL)
    with pytest.raises(RuntimeError):
        with cam:
            result = cam(x)
            assert set(result.cams) == set(SOURCES)
            raise RuntimeError("user code failed")
    assert not any(b.attn.save_attn for b in blocks)  # attention is captured per call, never saved on the model
    assert all(not m._forward_hooks for m in model.modules())
    assert all(b.attn.att_mat.numel() == 0 for b in blocks)  # no batch kept alive


def test_threads_sharing_one_vit_get_their_own_maps(model, data):
    """Concurrent explain() calls on one ViT give the serial maps (the old code shared att_mat and hooks)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    crops, masks = data
    rng = np.random.default_rng(11)
    batches = [(crops * rng.uniform(0.2, 3.0) + rng.normal(size=(1, 3, 1, 1)).astype(np.float32)).astype(np.float32)
               for _ in range(6)]
    serial = [explain(model, b, masks, layers=SOURCES) for b in batches]
    barrier = threading.Barrier(3)

    def run(k):
        barrier.wait(timeout=30)  # start together: the forwards of the three threads interleave
        return [explain(model, batches[j], masks, layers=SOURCES) for j in range(k, len(batches), 3) for _ in range(4)]

    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(run, range(3)))
    for k, outs in enumerate(results):
        for i, out in enumerate(outs):
            ref = serial[k + 3 * (i // 4)]
            for source in SOURCES:
                np.testing.assert_allclose(out.cams[source], ref.cams[source], rtol=1e-5, atol=1e-7)
                np.testing.assert_allclose(out.gradcamo[source], ref.gradcamo[source], rtol=1e-5, atol=1e-9)
    assert all(not m._forward_hooks for m in model.modules())


def test_3d_vit_bundle_round_trip_and_refusals(tmp_path):
    torch.manual_seed(0)
    net = vit(2, 3, (8, 16, 16), patch_size=(4, 8, 8), hidden_size=16, mlp_dim=32, num_layers=2, num_heads=2)
    crops = np.random.default_rng(0).normal(size=(2, 2, 6, 20, 20)).astype(np.float32)
    masks = np.zeros((2, 6, 20, 20), dtype=bool)
    masks[:, 1:4, 5:15, 5:15] = True
    result = explain(net, crops, masks, layers=["cls_attention", "rollout"])
    assert result.cams["rollout"].shape == (2, 2, 2, 2)
    assert np.all((result.gradcamo["rollout"] > 0) & (result.gradcamo["rollout"] < 1))
    from gradcamo_dask.engine.bundles import open_bundle, write_bundle

    path = write_bundle(tmp_path / "vit", net, channels=["a", "b"], classes=["p", "q", "r"], crop_shape=(6, 20, 20),
                        input_shape=(8, 16, 16), normalization={"mean": [0, 0], "std": [1, 1]})
    again = explain(open_bundle(path).model, crops, masks, layers=["cls_attention", "rollout"])
    np.testing.assert_allclose(again.gradcamo["rollout"], result.gradcamo["rollout"], rtol=1e-6)
    with pytest.raises(InputError, match="cannot be mixed"):
        explain(net, crops, masks, layers=["cls_attention", "vit.patch_embedding.patch_embeddings"])
    with pytest.raises(InputError, match="attention sources .* have none"):  # HiResCAM weighs gradients
        explain(net, crops, masks, layers=["rollout"], method="hirescam")
    with pytest.raises(InputError, match="whole number of patches"):
        vit(2, 3, (8, 18, 16), patch_size=(4, 8, 8))
    from gradcamo_dask.engine.models2d import efficientnet2d

    with pytest.raises(InputError, match="not a MONAI ViT"):
        AttentionCAM(efficientnet2d(2, 3, (32, 32)), "rollout")
