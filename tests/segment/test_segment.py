"""Segmentation (gradcamo_dask.segment.plate): lazy plate labels, Cellpose adapter, weights, baseline, bad input."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

import gradcamo_dask
from gradcamo_dask.segment import cellpose_adapter
from gradcamo_dask.errors import InputError, PlateLayoutError, WeightsFormatError, WeightsNotFoundError
from gradcamo_dask.segment.plate import make_segmenter, segment_plate, segment_site
from tests.helpers.paths import REPO
from tests.helpers.segment_blobs import as_voxel_sets, blob_plate, blob_site, matched_iou

# ---------------------------------------------------------------- the classical baseline


def _counting_plate(n_wells=1, n_sites=2, **kwargs):
    """A blob plate whose chunks count how often they are read."""
    import dask.array as da

    image, truth = blob_plate(n_wells, n_sites, **kwargs)
    reads = []
    data = image.data

    def read(block, block_info=None):
        reads.append(block_info[0]["chunk-location"][:2])
        return block

    image = image.copy(data=da.map_blocks(read, data, dtype=data.dtype))
    return image, truth, reads


def test_watershed_labels_are_lazy_and_right():
    image, truth, reads = _counting_plate(2, 2)
    labels = segment_plate(image, "watershed")
    assert reads == []  # building the graph read nothing
    assert labels.name == "labels"
    assert labels.dims == ("well", "site", "z", "y", "x")
    assert labels.dtype == np.int32
    assert labels.data.chunks[:2] == ((1, 1), (1, 1))  # one task per site
    assert list(labels.coords["well"].values) == ["B02", "B03"]
    assert list(labels.coords["row"].values) == ["B", "B"]
    assert labels.attrs["plate"] == "blobs"
    provenance = json.loads(labels.attrs["segmentation"])
    assert provenance["method"] == "watershed" and provenance["settings"]["min_size"] == 30
    assert provenance["settings"]["anisotropy"] == pytest.approx(1.71)  # from spacing_zyx_um
    values = labels.values
    assert sorted(set(reads)) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for w in range(2):
        for s in range(2):
            ids = np.unique(values[w, s])
            assert ids.tolist() == list(range(ids.max() + 1))  # 0 plus 1..N, unique within the site
            matches, n_truth, n_found = matched_iou(truth[w, s], values[w, s])
            assert n_truth == 9 and matches >= 8 and n_found <= 10


def test_missing_channel_names_the_plate_channels():
    image, _ = blob_plate(1, 1, channels=("DNA", "ER", "AGP"))
    with pytest.raises(PlateLayoutError, match=r"no channel 'Mito'.*DNA, ER, AGP"):
        segment_plate(image, "watershed", cytoplasm_channel="Mito")
    with pytest.raises(PlateLayoutError, match="nucleus_channel='Hoechst'"):
        segment_plate(image, "watershed", nucleus_channel="Hoechst")


def test_wrong_dims_and_unknown_method_are_refused():
    image, _ = blob_plate(1, 1)
    with pytest.raises(PlateLayoutError, match="dims"):
        segment_plate(image.transpose("site", "well", "c", "z", "y", "x"), "watershed")
    with pytest.raises(InputError, match="unknown segmentation method"):
        segment_plate(image, "stardist")


def test_single_slice_sites_are_segmented_as_2d():
    image, truth = blob_plate(1, 1, shape=(1, 96, 96), anisotropy=1.0)
    # a single slice through the cell centres: z=0 is the equator when z has one slice
    labels = segment_plate(image, "watershed").values
    assert labels.shape == (1, 1, 1, 96, 96)
    matches, n_truth, _ = matched_iou(truth[0, 0], labels[0, 0])
    assert n_truth == 9 and matches >= 8
    flat = segment_site(image.values[0, 0, 0, 0], image.values[0, 0, 1, 0], "watershed")
    assert flat.shape == (96, 96) and flat.max() == labels.max()


def test_all_zero_site_gives_zero_cells_not_an_error():
    image, _ = blob_plate(1, 2)
    zeroed = image.copy(data=image.data * np.uint16(0))
    labels = segment_plate(zeroed, "watershed").values
    assert labels.shape == (1, 2, 8, 96, 96) and labels.max() == 0


def test_nan_intensities_name_the_site():
    import dask.array as da

    image, _ = blob_plate(1, 2)
    values = image.values.astype(np.float32)
    values[0, 1, 0, 3, 10, 10] = np.nan
    bad = image.copy(data=da.from_array(values, chunks=(1, 1, 2, 8, 96, 96)))
    with pytest.raises(InputError, match=r"well B02 site 1.*NaN"):
        segment_plate(bad, "watershed").compute()


def test_real_stack_through_the_baseline(real_data):
    """rgb_3D.tif (75 x 75 x 75, isotropic) holds about ten nuclei, several cut by the volume's edges.

    Counted by eye on maximum projections of 13-slice slabs of the nucleus
    channel: one nucleus in the top slabs, four to five in the middle, four in
    the bottom ones, most of them ~15-20 voxels across. Plausible for the
    baseline: 6 to 18 cells, at least 5 of them larger than a 15-voxel sphere
    (1,767 voxels), none larger than a quarter of the stack.
    """
    import tifffile

    stack = tifffile.imread(real_data / "rgb_3D.tif")
    assert stack.shape == (75, 2, 75, 75)
    labels = segment_site(stack[:, 0], stack[:, 1], "watershed", anisotropy=1.0)
    sizes = np.bincount(labels.ravel())[1:]
    assert 6 <= sizes.size <= 18, sizes
    assert (sizes > 1767).sum() >= 5
    assert sizes.max() < labels.size / 4


# ---------------------------------------------------------------- tiling through segment_plate()


def test_a_site_in_four_tiles_gives_the_same_cells_as_untiled():
    image, truth = blob_site((6, 160, 160), n_cells=30, radius=9, seed=3)
    untiled = segment_site(image[0], image[1], "watershed")
    assert matched_iou(truth, untiled)[0] >= 28
    tiled = segment_site(image[0], image[1], "watershed", tile_shape=(80, 80), tile_overlap=24)
    assert as_voxel_sets(tiled) == as_voxel_sets(untiled)

    import dask.array as da
    import xarray as xr

    plate = xr.DataArray(
        da.from_array(image[None, None]),
        dims=("well", "site", "c", "z", "y", "x"),
        coords={"well": ["B02"], "site": [0], "c": ["DNA", "RNA"]},
        attrs={"plate": "tiles"},
    )
    lazy = segment_plate(plate, "watershed", tile_shape=(80, 80), tile_overlap=24, anisotropy=1.71)
    assert lazy.data.chunks[3:] == ((80, 80), (80, 80))  # one task per tile core
    assert as_voxel_sets(lazy.values[0, 0]) == as_voxel_sets(untiled)


# ---------------------------------------------------------------- Cellpose weights


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture
def model_dirs(tmp_path, monkeypatch):
    """Empty CELLPOSE_LOCAL_MODELS_PATH and home folders."""
    local = tmp_path / "local-models"
    home = tmp_path / "home"
    local.mkdir()
    home.mkdir()
    monkeypatch.setenv("CELLPOSE_LOCAL_MODELS_PATH", str(local))
    monkeypatch.setenv("HOME", str(home))
    return local, home / ".cellpose" / "models"


def _save_state_dict(path: Path, keys: dict) -> Path:
    import torch

    torch.save({k: torch.zeros(v) for k, v in keys.items()}, path)
    return path


CP3_KEYS = {"downsample.down.res_down_0.conv.conv_0.2.weight": (2,), "output.2.weight": (3, 32, 1, 1), "diam_mean": (1,)}
CP4_KEYS = {"module.encoder.patch_embed.proj.weight": (4,), "module.out.weight": (4,), "module.W2": (4,)}


def test_missing_weights_fail_at_once_offline_and_say_where_to_put_them(model_dirs, no_network):
    local, cache = model_dirs
    image, _ = blob_plate(1, 1)
    started = time.perf_counter()
    with pytest.raises(WeightsNotFoundError) as error:
        segment_plate(image, "cellpose", model="cyto3")
    assert time.perf_counter() - started < 5
    message = str(error.value)
    assert str(local / "cyto3") in message and str(cache / "cyto3") in message
    assert "https://www.cellpose.org/models/cyto3" in message and "No download was attempted" in message
    assert isinstance(error.value, FileNotFoundError)


def test_a_path_that_does_not_exist_never_falls_back_to_a_default(model_dirs, no_network, tmp_path):
    _save_state_dict(model_dirs[0] / "cyto3", CP3_KEYS)  # a default model is there, and must not be used
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        make_segmenter("cellpose", model=str(tmp_path / "my_models" / "trained_model"))
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        make_segmenter("cellpose", model=tmp_path / "plain_name_as_path")


def test_names_resolve_in_local_folder_then_cellpose_cache(model_dirs):
    local, cache = model_dirs
    cache.mkdir(parents=True)
    _save_state_dict(cache / "nucleitorch_0", CP3_KEYS)
    _save_state_dict(cache / "mine", CP3_KEYS)
    _save_state_dict(local / "mine", CP3_KEYS)
    resolve = cellpose_adapter.resolve_cellpose_weights
    assert resolve("nuclei", major=3) == (cache / "nucleitorch_0").resolve()  # built-in file name
    assert resolve("mine", major=3) == (local / "mine").resolve()  # CELLPOSE_LOCAL_MODELS_PATH first
    assert resolve(str(cache / "mine"), major=3) == (cache / "mine").resolve()
    with pytest.raises(WeightsNotFoundError, match="huggingface.co/mouseland/cellpose-sam"):
        resolve(None, major=4)  # Cellpose 4's default is cpsam


def test_files_that_are_not_cellpose_models_are_refused(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a model at all" * 10)
    with pytest.raises(WeightsFormatError, match="not a Cellpose model"):
        cellpose_adapter.check_cellpose_weights(junk, 3)
    other = _save_state_dict(tmp_path / "resnet.pth", {"conv1.weight": (2,), "fc.bias": (2,)})
    with pytest.raises(WeightsFormatError, match="neither a Cellpose 3 network"):
        cellpose_adapter.check_cellpose_weights(other, 3)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    with pytest.raises(WeightsFormatError, match="empty"):
        cellpose_adapter.check_cellpose_weights(empty, 3)
    sam = _save_state_dict(tmp_path / "cpsam", CP4_KEYS)
    with pytest.raises(WeightsFormatError, match="Cellpose-SAM"):
        cellpose_adapter.check_cellpose_weights(sam, 3)
    assert cellpose_adapter.check_cellpose_weights(sam, 4) == "cellpose-sam"
    cp3 = _save_state_dict(tmp_path / "cp3", CP3_KEYS)
    with pytest.raises(WeightsFormatError, match="Cellpose 3"):
        cellpose_adapter.check_cellpose_weights(cp3, 4)
    image, _ = blob_plate(1, 1)
    with pytest.raises(WeightsFormatError):
        segment_plate(image, "cellpose", model=str(other))


# ---------------------------------------------------------------- Cellpose 4.x mapping (fake module)


class _FakeCellposeModel:
    """Stands in for ``cellpose.models.CellposeModel``; records what it is given."""

    built: list = []
    calls: list = []

    def __init__(self, **kwargs):
        type(self).built.append(kwargs)

    def eval(self, x, **kwargs):
        type(self).calls.append((x, kwargs))
        shape = x.shape[1:] if kwargs.get("z_axis") is None else x.shape[:1] + x.shape[2:]
        labels = np.zeros(shape, np.uint16)
        labels[..., 2:6, 2:6] = 7  # one object, with a non-sequential id
        return labels, None, None


@pytest.fixture
def fake_cellpose4(monkeypatch, tmp_path):
    """UNIT TEST OF THE 4.x ARGUMENT MAPPING ONLY: cellpose 4 cannot be installed here, so a fake
    ``cellpose.models`` module receives the calls. The real end-to-end test below uses cellpose 3.1."""
    fake_models = types.ModuleType("cellpose.models")
    fake_models.CellposeModel = _FakeCellposeModel
    fake_package = types.ModuleType("cellpose")
    fake_package.models = fake_models
    monkeypatch.setitem(sys.modules, "cellpose", fake_package)
    monkeypatch.setitem(sys.modules, "cellpose.models", fake_models)
    monkeypatch.setattr(cellpose_adapter, "cellpose_major_version", lambda: 4)
    monkeypatch.setattr(_FakeCellposeModel, "built", [])
    monkeypatch.setattr(_FakeCellposeModel, "calls", [])
    cellpose_adapter.clear_cellpose_cache()
    yield _save_state_dict(tmp_path / "cpsam", CP4_KEYS)
    cellpose_adapter.clear_cellpose_cache()


def test_cellpose4_mapping_has_no_channels_and_three_planes(fake_cellpose4, model_dirs):
    image, _ = blob_plate(1, 2, channels=("RNA", "DNA"))
    labels = segment_plate(image, "cellpose", model=str(fake_cellpose4), diameter=18.0, device="cpu").values
    built = _FakeCellposeModel.built
    assert len(built) == 1  # loaded once for both sites
    assert built[0]["pretrained_model"] == str(fake_cellpose4.resolve()) and built[0]["gpu"] is False
    assert len(_FakeCellposeModel.calls) == 2
    raw = image.values[0, 0]
    x, kwargs = next(call for call in _FakeCellposeModel.calls if np.array_equal(call[0][:, 1], raw[1]))  # site 0
    assert x.shape == (8, 3, 96, 96)
    np.testing.assert_array_equal(x[:, 0], raw[0])  # cytoplasm (RNA) first
    np.testing.assert_array_equal(x[:, 1], raw[1])  # then nucleus (DNA)
    assert not x[:, 2].any()
    assert "channels" not in kwargs
    assert kwargs["channel_axis"] == 1 and kwargs["z_axis"] == 0
    assert kwargs["flow_threshold"] == 0.75 and kwargs["stitch_threshold"] == 0.05
    assert kwargs["min_size"] == 30 and kwargs["anisotropy"] == pytest.approx(1.71)
    assert kwargs["do_3D"] is False and kwargs["diameter"] == 18.0
    assert kwargs["normalize"]["lowhigh"].shape == (3, 2)
    assert labels.dtype == np.int32 and set(np.unique(labels)) == {0, 1}


def test_cellpose4_3d_mode_and_single_slices(fake_cellpose4, model_dirs):
    settings = make_segmenter("cellpose", model=str(fake_cellpose4), do_3D=True, device="cpu").settings
    nucleus = np.random.default_rng(0).random((5, 16, 16)).astype(np.float32)
    cellpose_adapter.run_cellpose(nucleus, None, settings)
    x, kwargs = _FakeCellposeModel.calls[-1]
    assert kwargs["do_3D"] is True and kwargs["stitch_threshold"] == 0.0
    assert x.shape == (5, 3, 16, 16) and not x[:, 1:].any()  # nucleus only, zero-padded to 3 planes
    labels = cellpose_adapter.run_cellpose(nucleus[:1], None, settings)
    x, kwargs = _FakeCellposeModel.calls[-1]
    assert x.shape == (3, 16, 16) and kwargs["channel_axis"] == 0 and kwargs["z_axis"] is None
    assert kwargs["do_3D"] is False and labels.shape == (1, 16, 16)


def test_device_auto_picks_the_gpu_when_the_worker_has_one(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cellpose_adapter._torch_device("auto").type == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert cellpose_adapter._torch_device("auto").type == "cpu"
    assert cellpose_adapter._torch_device("cuda:1").index == 1


def test_cellpose_paper_defaults_are_the_defaults(fake_cellpose4, model_dirs):
    settings = make_segmenter("cellpose", model=str(fake_cellpose4)).settings
    assert (settings.stitch_threshold, settings.flow_threshold, settings.anisotropy, settings.min_size) == (
        0.05,
        0.75,
        1.71,
        30,
    )
    with pytest.raises(InputError, match="stitch_threshold"):
        make_segmenter("cellpose", model=str(fake_cellpose4), stitch_threshold=0.0)


# ---------------------------------------------------------------- Cellpose 3.1 end to end (real package)


@pytest.fixture(scope="module")
def cellpose_weights(tmp_path_factory):
    """Weights of a randomly initialised Cellpose 3 network, made and saved by the test itself.

    No pretrained weights can be had here; a random network is enough to prove
    the wiring (its outputs are compared with a direct Cellpose call below).
    The benchmark trains one for accuracy figures.
    """
    torch = pytest.importorskip("torch")
    models = pytest.importorskip("cellpose.models")
    if cellpose_adapter.cellpose_major_version() != 3:
        pytest.skip("the end-to-end test drives cellpose 3.x (4.x needs torchvision, not installable here)")
    torch.manual_seed(0)
    model = models.CellposeModel(gpu=False, pretrained_model=False, diam_mean=18.0)
    path = tmp_path_factory.mktemp("cellpose") / "random_cp3"
    model.net.save_model(str(path))
    return path


@pytest.fixture
def eval_spy(monkeypatch):
    """Counts model loads and records every ``eval`` call's keyword arguments."""
    record = {"loads": 0, "calls": [], "devices": []}
    original = cellpose_adapter._load_model

    def load(weights, device, major):
        record["loads"] += 1
        record["devices"].append(str(device))
        model = original(weights, device, major)
        real_eval = model.eval

        def spy(x, **kwargs):
            record["calls"].append((x.shape, kwargs))
            return real_eval(x, **kwargs)

        model.eval = spy
        return model

    cellpose_adapter.clear_cellpose_cache()
    monkeypatch.setattr(cellpose_adapter, "_load_model", load)
    yield record
    cellpose_adapter.clear_cellpose_cache()


def test_cellpose_end_to_end_with_paper_settings(cellpose_weights, eval_spy):
    image, _ = blob_plate(1, 2, shape=(4, 64, 64), n_cells=4)
    labels = segment_plate(image, "cellpose", model=str(cellpose_weights), device="cpu")
    assert eval_spy["loads"] == 0  # nothing runs before compute
    values = labels.values
    assert eval_spy["loads"] == 1  # one model for both sites
    assert len(eval_spy["calls"]) == 2
    shape, kwargs = eval_spy["calls"][0]
    assert shape == (4, 2, 64, 64)
    assert kwargs["channels"] == [1, 2] and kwargs["channel_axis"] == 1 and kwargs["z_axis"] == 0
    assert kwargs["stitch_threshold"] == 0.05 and kwargs["flow_threshold"] == 0.75
    assert kwargs["anisotropy"] == pytest.approx(1.71) and kwargs["min_size"] == 30
    assert kwargs["do_3D"] is False and kwargs["cellprob_threshold"] == 0.0
    # the two sites run in either order; each call carries its own site's 1st/99th percentiles, RNA first
    got = sorted(np.asarray(kw["normalize"]["lowhigh"], dtype=np.float64).ravel().tolist() for _, kw in eval_spy["calls"])
    want = sorted(
        np.concatenate([np.percentile(raw[c].astype(np.float32), [1, 99]) for c in (1, 0)]).tolist()
        for raw in image.values[0]
    )
    np.testing.assert_allclose(got, want)
    assert labels.dims == ("well", "site", "z", "y", "x") and values.dtype == np.int32
    assert values.shape == (1, 2, 4, 64, 64)
    provenance = json.loads(labels.attrs["segmentation"])
    assert provenance["weights_sha256"] and provenance["cellpose_version"].startswith("3.")


def test_cellpose_labels_equal_a_direct_cellpose_call(cellpose_weights, eval_spy):
    """Our labels are Cellpose's own masks for the same arguments, renumbered 1..N."""
    from cellpose import models

    image, _ = blob_site((4, 64, 64), n_cells=4, seed=1)
    options = dict(cellprob_threshold=-0.5, flow_threshold=0.0)  # a random network finds objects only so
    ours = segment_site(image[0], image[1], "cellpose", model=str(cellpose_weights), device="cpu", **options)
    direct = models.CellposeModel(gpu=False, pretrained_model=str(cellpose_weights)).eval(
        np.stack([image[1], image[0]], axis=1),
        channels=[1, 2],
        channel_axis=1,
        z_axis=0,
        stitch_threshold=0.05,
        min_size=30,
        **options,
    )[0]
    assert ours.dtype == np.int32 and ours.shape == direct.shape == (4, 64, 64)
    assert direct.max() > 0  # something to compare
    assert as_voxel_sets(ours) == as_voxel_sets(direct)
    assert np.unique(ours).tolist() == list(range(ours.max() + 1))


def test_cellpose_3d_mode_runs_end_to_end(cellpose_weights, eval_spy):
    image, _ = blob_site((4, 32, 32), n_cells=2, radius=6, seed=4)
    labels = segment_site(image[0], image[1], "cellpose", model=str(cellpose_weights), device="cpu", do_3D=True,
                          anisotropy=2.0)  # fmt: skip
    shape, kwargs = eval_spy["calls"][-1]
    assert kwargs["do_3D"] is True and kwargs["stitch_threshold"] == 0.0 and kwargs["anisotropy"] == 2.0
    assert labels.shape == (4, 32, 32) and labels.dtype == np.int32


def test_cellpose_all_zero_site_gives_zero_cells_without_running(cellpose_weights, eval_spy):
    labels = segment_site(np.zeros((3, 32, 32), np.uint16), np.zeros((3, 32, 32), np.uint16), "cellpose",
                          model=str(cellpose_weights), device="cpu")  # fmt: skip
    assert labels.shape == (3, 32, 32) and labels.max() == 0 and eval_spy["calls"] == []


def test_graph_carries_the_weights_path_not_the_model(cellpose_weights, eval_spy):
    image, _ = blob_plate(1, 1, shape=(4, 64, 64), n_cells=4)
    labels = segment_plate(image, "cellpose", model=str(cellpose_weights), device="cpu")
    import cloudpickle

    graph = dict(labels.data.__dask_graph__())
    blob = cloudpickle.dumps(graph)
    assert len(blob) < 500_000  # the image chunks plus a few hundred bytes of settings
    assert str(cellpose_weights).encode() in blob
    assert b"CellposeModel" not in blob and b"CPnet" not in blob


@pytest.mark.gpu
def test_cellpose_on_the_gpu_agrees_with_the_cpu(cellpose_weights, eval_spy):
    """device="auto" takes the GPU when there is one; the labels match the CPU's."""
    image, _ = blob_site((4, 64, 64), n_cells=4, seed=1)
    options = dict(model=str(cellpose_weights), cellprob_threshold=-0.5, flow_threshold=0.0)
    on_cpu = segment_site(image[0], image[1], "cellpose", device="cpu", **options)
    on_gpu = segment_site(image[0], image[1], "cellpose", device="auto", **options)
    assert eval_spy["devices"] == ["cpu", "cuda"]
    matches, n_cpu, n_gpu = matched_iou(on_cpu, on_gpu)
    assert on_cpu.max() > 0 and matches >= 0.9 * max(n_cpu, n_gpu)


@pytest.mark.slow
def test_each_worker_process_loads_its_own_model(cellpose_weights):
    """On a distributed cluster with worker processes the model is loaded in the worker, once."""
    distributed = pytest.importorskip("distributed")
    image, _ = blob_plate(1, 2, shape=(4, 64, 64), n_cells=4)
    cellpose_adapter.clear_cellpose_cache()
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=True, dashboard_address=None) as cluster:
        with distributed.Client(cluster) as client:
            labels = segment_plate(image, "cellpose", model=str(cellpose_weights), device="cpu")
            values = labels.compute()
            loaded = client.run(lambda: len(__import__("importlib").import_module("gradcamo_dask.segment.cellpose_adapter")._CACHE))
    assert list(loaded.values()) == [1]  # one model in the one worker process
    assert len(cellpose_adapter._CACHE) == 0  # and none in the client
    assert values.shape == (1, 2, 4, 64, 64)


def test_public_names():
    image, _ = blob_plate(1, 1, shape=(2, 32, 32), n_cells=2, radius=6)
    assert gradcamo_dask.segment_plate(image, "watershed").shape == (1, 1, 2, 32, 32)
    code = "import gradcamo_dask; print(gradcamo_dask.segment_plate.__name__, gradcamo_dask.segment_site.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.split() == ["segment_plate", "segment_site"]
    module = __import__("importlib").import_module("gradcamo_dask.segment.plate")  # binds the subpackage
    assert module.segment_plate is gradcamo_dask.segment_plate
    assert gradcamo_dask.segment_site is segment_site
    assert gradcamo_dask.WeightsFormatError is WeightsFormatError


# ---------------------------------------------------------------- command line


def test_cli_segment_writes_labels_open_labels_reads(tmp_path, monkeypatch, capsys):
    from gradcamo_dask.cli import main

    image, truth = blob_plate(1, 2)
    monkeypatch.setattr(gradcamo_dask, "open_plate", lambda path: image)
    out = tmp_path / "labels.zarr"
    assert main(["segment", "plate.zarr", "--out", str(out), "--method", "watershed"]) == 0
    labels = gradcamo_dask.open_labels(out, like=image)
    assert labels.dims == ("well", "site", "z", "y", "x") and labels.dtype == np.int32
    assert list(labels.coords["well"].values) == ["B02"]
    assert matched_iou(truth[0, 1], labels.values[0, 1])[0] >= 8
    import zarr

    assert json.loads(zarr.open_group(out, mode="r").attrs["segmentation"])["method"] == "watershed"
    assert main(["segment", "plate.zarr", "--out", str(out), "--method", "watershed"]) == 1
    assert "exists" in capsys.readouterr().err
    code = main(["segment", "plate.zarr", "--out", str(tmp_path / "x.zarr"), "--nucleus-channel", "Hoechst"])
    assert code == 1 and "Hoechst" in capsys.readouterr().err


def test_cli_synth_then_segment(tmp_path):
    """The command line end to end on a written OME-Zarr plate: synth, segment, read back."""
    from gradcamo_dask.cli import main

    plate = tmp_path / "plate.zarr"
    assert main(["synth", str(plate), "--doses", "0", "--wells-per-treatment", "1", "--sites", "1",
                 "--site-shape", "21", "160", "160", "--quiet"]) == 0  # fmt: skip
    out = tmp_path / "labels.zarr"
    assert main(["segment", str(plate), "--out", str(out), "--method", "watershed"]) == 0
    image = gradcamo_dask.open_plate(plate)
    labels = gradcamo_dask.open_labels(out, like=image)
    truth = gradcamo_dask.open_labels(plate, like=image)
    found = labels.values[0, 0]
    assert found.max() >= 1
    matches, n_truth, _ = matched_iou(truth.values[0, 0], found)
    assert matches >= n_truth // 2
