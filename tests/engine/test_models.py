"""EfficientNet-B0 3D: size, padding per axis, hookable head, checkpoint conversion, bundles."""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.helpers.engine_models import TinyCNN, lively
from gradcamo_dask import BundleMismatchError, InputError, efficientnet3d, layer_grids, open_bundle, write_bundle
from gradcamo_dask.engine.layers import default_layer
from gradcamo_dask.engine.models import convert_efficientnet_pytorch_3d, from_efficientnet_pytorch_3d

CHANNELS = ["DNA", "ER", "RNA", "AGP", "Actin", "Mito"]
CLASSES = ["DMSO", "A", "B", "C", "D", "E"]
NORMALIZATION = {"mean": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6], "std": [1.0, 1.1, 1.2, 1.3, 1.4, 1.5]}
SMALL = (9, 35, 70)  # odd, non-cubic: catches per-axis padding mistakes


def _module(model, name):
    return dict(model.named_modules())[name]


def _padding(model, conv_name):
    from gradcamo_dask.engine.models import conv_padding

    return conv_padding(_module(model, conv_name), _module(model, conv_name + "_padding"))


def test_parameter_count_of_b0_with_6_channels_and_6_classes():
    model = efficientnet3d(6, 6)
    assert sum(p.numel() for p in model.parameters()) == 4_700_386
    assert len(list(model._blocks.children())) == 7
    assert sum(len(stage) for stage in model._blocks) == 16


def test_layer_grids_at_the_paper_input_grid():
    grids = layer_grids(efficientnet3d(6, 6, (64, 224, 224)))
    assert grids["_conv_stem"] == (32, 112, 112)
    assert grids["_blocks.0"] == (16, 56, 56)  # the first MBConv stage has stride 2
    assert grids["_blocks.3"] == (2, 7, 7)
    assert grids["_blocks.4"] == grids["_blocks.4.10"] == (2, 7, 7)  # a stage-4 block
    # "same" padding of a 7-voxel axis at stride 2 gives ceil(7 / 2) = 4 voxels, not 3
    assert grids["_blocks.5"] == (1, 4, 4)
    assert grids["_head_swish"] == (1, 4, 4)
    assert grids["_avg_pooling"] == (1, 1, 1)
    assert "_fc" not in grids  # not spatial
    assert "_swish" in grids and "_blocks.1.1._swish" not in grids  # block swishes run several times
    # the raw crop grid, used without resampling
    raw = layer_grids(efficientnet3d(6, 6, (21, 128, 128)))
    assert raw["_head_swish"] == (1, 2, 2) and raw["_blocks.4.10"] == (1, 4, 4)


def test_efficientnet_pytorch_3d_padding_gives_its_1x3x3_map():
    # That project pads every convolution as if it saw a 224-voxel cube (its from_name default).
    model = efficientnet3d(6, 6, (64, 224, 224), padding="efficientnet_pytorch_3d")
    grids = layer_grids(model)
    assert grids["_head_swish"] == (1, 3, 3) and grids["_blocks.4.10"] == (2, 7, 7)
    assert _padding(model, "_conv_stem") == ((0, 1),) * 3  # k3, stride 2 on an even size: 1 voxel, after
    assert _padding(model, "_blocks.5.11._depthwise_conv") == ((1, 2),) * 3  # k5, stride 2, even size
    assert _padding(model, "_blocks.4.8._depthwise_conv") == ((2, 2),) * 3  # k5, stride 1
    with pytest.raises(InputError, match="padding"):
        efficientnet3d(6, 6, padding="valid")


def test_padding_is_derived_per_axis_from_the_input_grid():
    model = efficientnet3d(6, 6, (64, 224, 224))
    # block 11 (stage 5, k5, stride 2) sees 2 x 7 x 7: z pads 3 = (1, 2), y and x pad 4 = (2, 2)
    assert _padding(model, "_blocks.5.11._depthwise_conv") == ((1, 2), (2, 2), (2, 2))
    assert _padding(model, "_conv_stem") == ((0, 1), (0, 1), (0, 1))
    small = lively(efficientnet3d(2, 3, SMALL))
    shapes = {}
    hooks = [m.register_forward_hook(lambda _m, _a, o, n=n: shapes.update({n: tuple(o.shape[2:])}))
             for n, m in small.named_modules() if n in ("_blocks.0", "_blocks.3", "_head_swish")]
    with torch.no_grad():
        logits = small(torch.randn(2, 2, *SMALL))
    for h in hooks:
        h.remove()
    assert logits.shape == (2, 3)
    # each stride-2 stage gives ceil(n / 2) on every axis separately
    assert shapes == {"_blocks.0": (3, 9, 18), "_blocks.3": (1, 2, 3), "_head_swish": (1, 1, 2)}
    assert {k: layer_grids(small)[k] for k in shapes} == shapes  # the meta-device probe agrees
    # numbers: the stem equals an explicit zero pad by the TF "same" rule, then a valid convolution
    # (9 -> 5: pad 2 = (1, 1); 35 -> 18: pad 2 = (1, 1); 70 -> 35: pad 1 = (0, 1))
    x = torch.randn(1, 2, *SMALL)
    expected = F.conv3d(F.pad(x, (0, 1, 1, 1, 1, 1)), small._conv_stem.weight, stride=2)
    with torch.no_grad():
        got = small._conv_stem(small._conv_stem_padding(x))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_monai_single_image_size_trap_is_avoided():
    from monai.networks.nets import EfficientNet

    from gradcamo_dask.engine.models import EFFICIENTNET_B0_BLOCKS

    stock = EfficientNet(list(EFFICIENTNET_B0_BLOCKS), spatial_dims=3, in_channels=2, num_classes=3, image_size=224)
    x = torch.randn(1, 2, 16, 32, 32)
    with pytest.raises(RuntimeError), torch.no_grad():
        stock.eval()(x)
    with torch.no_grad():
        assert efficientnet3d(2, 3, (16, 32, 32)).eval()(x).shape == (1, 3)


def test_head_activation_is_its_own_hookable_module():
    model = lively(efficientnet3d(2, 3, SMALL))
    assert model._head_swish is not model._swish
    assert default_layer(model) == "_head_swish"
    calls = {"_swish": [], "_head_swish": []}
    hooks = [getattr(model, n).register_forward_hook(lambda _m, _a, o, n=n: calls[n].append(o.shape))
             for n in calls]
    with torch.no_grad():
        model(torch.randn(1, 2, *SMALL))
    for h in hooks:
        h.remove()
    assert calls["_head_swish"] == [torch.Size([1, 1280, 1, 1, 2])]
    assert calls["_swish"] == [torch.Size([1, 32, 5, 18, 35])]  # the stem only
    model.set_swish(memory_efficient=False)
    with torch.no_grad():
        assert model(torch.randn(1, 2, *SMALL)).shape == (1, 3)


def test_default_layer_of_a_generic_cnn_is_its_last_activation():
    assert default_layer(TinyCNN(), (4, 8, 8)) == "act2"
    with pytest.raises(InputError, match="input_shape"):
        default_layer(TinyCNN())


def _flat_keys(state):
    """State dict in efficientnet_pytorch_3d naming, written independently of the converter."""
    return {re.sub(r"^_blocks\.\d+\.(\d+)\.", r"_blocks.\1.", k): v for k, v in state.items()}


def test_efficientnet_pytorch_3d_checkpoint_converts_loads_and_gives_the_same_logits():
    source = lively(efficientnet3d(6, 6, SMALL), seed=3)
    flat = _flat_keys(source.state_dict())
    assert "_blocks.15._project_conv.weight" in flat and "_blocks.6.15._project_conv.weight" not in flat
    converted = convert_efficientnet_pytorch_3d({f"module.{k}": v for k, v in flat.items()})
    assert set(converted) == set(source.state_dict())
    target = efficientnet3d(6, 6, SMALL).eval()
    target.load_state_dict(converted)  # strict
    x = torch.randn(2, 6, *SMALL)
    with torch.no_grad():
        expected, got = source(x), target(x)
    assert expected.abs().max() > 0.05  # the comparison is not between two zeros
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    loaded = from_efficientnet_pytorch_3d(flat, SMALL, image_size=None)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
    legacy = from_efficientnet_pytorch_3d(flat)  # that project's default static padding
    assert legacy.architecture["padding"] == "efficientnet_pytorch_3d" and legacy.output_grid == (1, 3, 3)


def test_conversion_refuses_other_variants_and_nested_keys():
    with pytest.raises(InputError, match="16 blocks"):
        convert_efficientnet_pytorch_3d({"_blocks.16._bn0.weight": torch.ones(1)})
    with pytest.raises(InputError, match="already nested"):
        convert_efficientnet_pytorch_3d({"_blocks.0.0._bn1.weight": torch.ones(1)})


# ---------------------------------------------------------------------- bundles
@pytest.fixture(scope="module")
def small_model():
    return lively(efficientnet3d(6, 6, SMALL), seed=1)


def _save(path, model, **changes):
    options = dict(channels=CHANNELS, classes=CLASSES, crop_shape=(None, 40, 40), input_shape=SMALL,
                   normalization=NORMALIZATION, provenance={"trained_on": "plate P1", "epochs": 3})
    options.update(changes)
    return write_bundle(path, model, **options)


def test_bundle_round_trip_gives_the_same_model_and_config(tmp_path, small_model):
    path = _save(tmp_path / "bundle", small_model, layers=["_head_swish", "_blocks.4.10"])
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    raw = json.loads((path / "config.json").read_text())
    assert raw["channels"] == CHANNELS and raw["classes"] == CLASSES
    assert raw["crop_shape"] == [None, 40, 40] and raw["input_shape"] == list(SMALL)
    assert raw["architecture"]["name"] == "efficientnet3d" and raw["architecture"]["padding"] == "same"
    bundle = open_bundle(path)
    assert not bundle.model.training
    assert bundle.config.channels == CHANNELS and bundle.config["classes"] == CLASSES
    assert bundle.config.normalization == NORMALIZATION and bundle.config.layers == ["_head_swish", "_blocks.4.10"]
    assert bundle.config.provenance == {"trained_on": "plate P1", "epochs": 3}
    x = torch.randn(2, 6, *SMALL)
    with torch.no_grad():
        torch.testing.assert_close(bundle.model(x), small_model(x), rtol=0, atol=0)
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", bundle.hash)
    assert open_bundle(path).hash == bundle.hash  # stable


def test_bundle_hash_follows_the_content(tmp_path, small_model):
    first = open_bundle(_save(tmp_path / "a", small_model)).hash
    other = lively(efficientnet3d(6, 6, SMALL), seed=2)
    assert open_bundle(_save(tmp_path / "b", other)).hash != first
    assert open_bundle(_save(tmp_path / "c", small_model, classes=list("UVWXYZ"))).hash != first


def test_loading_never_unpickles(tmp_path, small_model, monkeypatch):
    path = _save(tmp_path / "bundle", small_model)
    import pickle

    def refuse(*_args, **_kwargs):
        raise AssertionError("a bundle load must not unpickle")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    assert open_bundle(path).config.channels == CHANNELS
    assert (path / "model.safetensors").read_bytes()[8:9] == b"{"  # safetensors: 8-byte length, JSON header


def test_tampered_or_incomplete_bundles_are_refused(tmp_path, small_model):
    path = _save(tmp_path / "bundle", small_model)
    other = _save(tmp_path / "other", lively(efficientnet3d(6, 6, SMALL), seed=5))
    (path / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    with pytest.raises(BundleMismatchError, match="sha256"):
        open_bundle(path)
    (other / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        open_bundle(other)


def test_check_fits_names_both_sides(tmp_path, small_model):
    bundle = open_bundle(_save(tmp_path / "bundle", small_model))
    bundle.check_fits(channels=CHANNELS, classes=["DMSO", "B"], crop_shape=(21, 40, 40))
    with pytest.raises(BundleMismatchError) as err:
        bundle.check_fits(channels=["DNA", "RNA", "Mito"])
    assert str(err.value).startswith(
        "bundle expects 6 channels (DNA, ER, RNA, AGP, Actin, Mito), plate has 3 (DNA, RNA, Mito)"
    )
    with pytest.raises(BundleMismatchError, match=r"in this order, plate has \(ER, DNA"):
        bundle.check_fits(channels=["ER", "DNA", "RNA", "AGP", "Actin", "Mito"])
    with pytest.raises(BundleMismatchError, match="not in the bundle: Z"):
        bundle.check_fits(classes=["DMSO", "Z"])
    with pytest.raises(BundleMismatchError, match=r"\(None, 40, 40\).*\(21, 64, 64\)"):
        bundle.check_fits(crop_shape=(21, 64, 64))


def test_write_bundle_refuses_inconsistent_metadata(tmp_path, small_model):
    with pytest.raises(InputError, match="6 channels"):
        _save(tmp_path / "x", small_model, channels=["DNA", "RNA"])
    with pytest.raises(InputError, match="6 classes"):
        _save(tmp_path / "x", small_model, classes=["a"])
    with pytest.raises(InputError, match="one mean and one std per channel"):
        _save(tmp_path / "x", small_model, normalization={"mean": [0.0], "std": [1.0]})
    with pytest.raises(InputError, match="input_shape"):
        _save(tmp_path / "x", small_model, input_shape=(64, 224, 224))
    with pytest.raises(InputError, match="does not exist"):
        _save(tmp_path / "x", small_model, layers=["_nope"])
    with pytest.raises(InputError, match="cannot bundle a TinyCNN"):
        _save(tmp_path / "x", TinyCNN())
    with pytest.raises(InputError, match="crop_fill must be 'zero' or 'background', got 'edge'"):
        _save(tmp_path / "x", small_model, crop_fill="edge")
    assert not (tmp_path / "x" / "config.json").exists()


def test_unknown_layer_lists_valid_names():
    from gradcamo_dask.engine.layers import find_layer

    with pytest.raises(InputError) as err:
        find_layer(TinyCNN(), "conv3")
    assert "'conv3' does not exist" in str(err.value)
    for name in ("conv1", "act1", "conv2", "act2", "pool", "fc"):
        assert name in str(err.value)
    assert isinstance(find_layer(TinyCNN(), "conv2"), nn.Conv3d)


def test_engine_names_have_one_home_and_resolve_from_the_package():
    import importlib

    import gradcamo_dask
    from gradcamo_dask.engine import bundles, layers

    assert gradcamo_dask.open_bundle is bundles.open_bundle and gradcamo_dask.layer_grids is layers.layer_grids
    importlib.import_module("gradcamo_dask.engine.explain")  # binding the submodule keeps the function
    assert callable(gradcamo_dask.explain) and gradcamo_dask.explain.__name__ == "explain"
    with pytest.raises(AttributeError):
        importlib.import_module("gradcamo_dask.engine.models").open_bundle  # noqa: B018  (one home: bundles)
