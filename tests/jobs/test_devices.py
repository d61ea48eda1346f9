"""The CUDA plumbing of site tasks, checked on the CPU with stand-ins for CuPy and RMM.

The stand-ins follow the documented interfaces: CuPy's ``PythonFunctionAllocator``
calls ``malloc(size, device_id)`` and ``free(pointer, device_id)``; a CuPy array
refuses ``numpy.asarray`` and moves to the host with ``.get()``.
"""

from __future__ import annotations

import sys
import types

import dask
import numpy as np
import pytest
import torch

from gradcamo_dask.errors import InputError
from gradcamo_dask.jobs import devices
from gradcamo_dask.jobs import score as pipeline
from tests.helpers.paths import REPO
from tests.helpers.plate_fixtures import CROP_SHAPE, LAYERS, make_bundle, make_plate, open_tiny


class StandInDeviceArray:
    """A device array as CuPy's: no ``__array__`` (NumPy conversion raises), ``.get()`` copies to the host."""

    def __init__(self, data: np.ndarray) -> None:
        self._data = np.asarray(data)
        self.shape, self.dtype, self.ndim = self._data.shape, self._data.dtype, self._data.ndim
        self.gets = 0

    def __array__(self, *args, **kwargs):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. Please use `.get()`")

    def get(self) -> np.ndarray:
        self.gets += 1
        return self._data.copy()

    def __getitem__(self, key):
        return StandInDeviceArray(self._data[key])


class StandInAllocator:
    """CuPy's PythonFunctionAllocator as documented: keeps the functions, calls them with (size, device_id)
    and (pointer, device_id)."""

    instances: list = []

    def __init__(self, malloc_func, free_func) -> None:
        self.malloc_func, self.free_func = malloc_func, free_func
        StandInAllocator.instances.append(self)

    def malloc(self, size: int):
        pointer = self.malloc_func(size, 0)
        self.free_func(pointer, 0)
        return pointer


def _stand_in_cupy(allocator=None) -> types.ModuleType:
    cupy = types.ModuleType("cupy")
    cupy.ndarray = StandInDeviceArray
    state = {"allocator": allocator or (lambda size: None), "set": []}

    def set_allocator(fn):
        state["allocator"] = fn
        state["set"].append(fn)

    cuda = types.SimpleNamespace(
        set_allocator=set_allocator, get_allocator=lambda: state["allocator"],
        get_current_stream=lambda: types.SimpleNamespace(ptr=0),
        memory=types.SimpleNamespace(PythonFunctionAllocator=StandInAllocator))
    cupy.cuda, cupy.state = cuda, state
    return cupy


@pytest.fixture
def fresh_bridge(monkeypatch):
    monkeypatch.setitem(devices._BRIDGE, "installed", False)
    StandInAllocator.instances.clear()


def test_allocator_bridge_uses_cupys_documented_call_signature(monkeypatch, fresh_bridge):
    cupy = _stand_in_cupy()
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    calls = []
    monkeypatch.setattr(torch.cuda, "caching_allocator_alloc",
                        lambda size, device=None, stream=None: calls.append(("alloc", size, device, stream)) or 4096)
    monkeypatch.setattr(torch.cuda, "caching_allocator_delete", lambda pointer: calls.append(("delete", pointer)))
    assert devices.share_cuda_memory() is True
    assert len(cupy.state["set"]) == 1
    assert cupy.state["allocator"](1024) == 4096  # CuPy calls malloc(size, device_id), then free(ptr, device_id)
    assert calls == [("alloc", 1024, 0, 0), ("delete", 4096)]
    assert devices.share_cuda_memory() is True and len(cupy.state["set"]) == 1  # once per process


def test_no_bridge_when_rmm_manages_memory(monkeypatch, fresh_bridge):
    cupy = _stand_in_cupy()
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    rmm = types.ModuleType("rmm")
    rmm.is_initialized = lambda: True
    monkeypatch.setitem(sys.modules, "rmm", rmm)
    assert devices.share_cuda_memory() is False and cupy.state["set"] == []

    rmm.is_initialized = lambda: False  # RMM imported but idle: CuPy's allocator decides
    rmm_allocator = types.FunctionType((lambda size: size).__code__, {}, "rmm_cupy_allocator")
    rmm_allocator.__module__ = "rmm.allocators.cupy"
    cupy2 = _stand_in_cupy(rmm_allocator)
    monkeypatch.setitem(sys.modules, "cupy", cupy2)
    assert devices.rmm_in_use(cupy2) is True
    assert devices.share_cuda_memory() is False and cupy2.state["set"] == []
    monkeypatch.delitem(sys.modules, "rmm")
    assert devices.rmm_in_use(_stand_in_cupy()) is False


def test_prepare_cuda_turns_on_cudnn_benchmark(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.setattr(devices, "share_cuda_memory", lambda: True)
    devices.prepare_cuda()
    assert torch.backends.cudnn.benchmark is True


def test_a_cuda_index_means_the_workers_own_gpu_on_a_dask_worker(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(devices, "in_dask_worker", lambda: True)
    assert devices.resolve_device("cuda:1") == "cuda:0"  # dask-cuda: each worker sees its GPU as device 0
    assert devices.resolve_device("cuda") == "cuda:0" and devices.resolve_device(None) == "cuda:0"
    assert devices.resolve_device("cpu") == "cpu"
    monkeypatch.setattr(devices, "in_dask_worker", lambda: False)
    assert devices.resolve_device("cuda:0") == "cuda:0"
    with pytest.raises(InputError, match="sees 1 CUDA GPU"):
        devices.resolve_device("cuda:1")
    with pytest.raises(InputError, match="'cpu', 'cuda'"):
        devices.resolve_device("tpu")


def test_cuda_without_a_gpu_says_so(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InputError, match="sees no CUDA GPU"):
        devices.resolve_device("cuda")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("devices")
    image, labels = open_tiny(make_plate(root / "plate.zarr", wells_per_treatment=1, sites=1))
    return {"image": image, "labels": labels, "bundle": make_bundle(root / "bundle")}


def test_score_site_moves_device_blocks_to_the_host_with_their_own_api(tiny, monkeypatch):
    from gradcamo_dask.cells import cell_table
    from gradcamo_dask.engine.bundles import open_bundle
    from gradcamo_dask.io.platemap import platemap_of

    image, labels = tiny["image"], tiny["labels"]
    cells = cell_table(labels, platemap_of(image), size=CROP_SHAPE)
    one = cells[(cells["well"] == cells["well"].iloc[0]) & (cells["site"] == cells["site"].iloc[0])]
    rows = one[["object_number", "center_z", "center_y", "center_x"]].reset_index(drop=True)
    bundle = open_bundle(tiny["bundle"])
    spec = {"bundle_path": str(tiny["bundle"]), "bundle_hash": bundle.hash, "layers": LAYERS, "crop_size": CROP_SHAPE,
            "batch_size": 4, "target": "predicted", "plate": "tiny", "well": "B02", "site": 0, "device": "cpu"}
    with dask.config.set(scheduler="sync"):
        host_image, host_labels = image.data[0, 0].compute(), labels.data[0, 0].compute()
    want = pipeline.score_site(host_image, host_labels, rows, spec)
    monkeypatch.setitem(sys.modules, "cupy", _stand_in_cupy())
    dev_image, dev_labels = StandInDeviceArray(host_image), StandInDeviceArray(host_labels)
    with pytest.raises(TypeError):
        np.asarray(dev_image)  # what the old np.asarray did to a CuPy block
    got = pipeline.score_site(dev_image, dev_labels, rows, spec)
    assert dev_image.gets == 1 and dev_labels.gets == 1
    assert set(got) == set(want) and len(rows) > 2
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_bench_plate_makes_no_cuda_call_in_the_client_before_the_cluster(monkeypatch):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import bench_plate
    finally:
        sys.path.remove(str(REPO / "benchmarks"))

    def forbidden(*args, **kwargs):
        raise AssertionError("a CUDA call in the client before the cluster starts")

    for name in ("is_available", "get_device_name", "get_device_properties", "init", "current_device",
                 "device_count", "_lazy_init"):
        monkeypatch.setattr(torch.cuda, name, forbidden)
    info = bench_plate.machine()
    assert info["torch"] == torch.__version__ and "gpu" not in info
