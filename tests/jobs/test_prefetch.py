"""The prefetcher: a bounded queue on CPU; on CUDA, pinned buffers and a side stream (logic checked with a
stand-in torch here, on the device by the GPU-marked test in benchmarks/gpu_check.sh); no host syncs in the loop."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from gradcamo_dask.jobs import feed
from gradcamo_dask.jobs.feed import Batch, ExplainRunner, FeedStats, score_sites
from gradcamo_dask.jobs.prefetch import CudaStager, HostStager, Prefetcher
from tests.jobs.test_feed import SyncCounter, _jobs, tiny  # noqa: F401  (fixture)
from tests.helpers.plate_fixtures import CROP_SHAPE, LAYERS


def _batch(k: int, n: int = 4) -> Batch:
    crops = np.full((n, 2, 3, 4, 4), float(k), np.float32)
    return Batch(crops, np.ones((n, 3, 4, 4), bool), [(k, 0, n)])


def test_cpu_path_is_a_bounded_queue_in_order():
    made, seen = [], []

    def source():
        for k in range(10):
            made.append(k)
            yield _batch(k)

    for batch in Prefetcher(source(), depth=2):
        time.sleep(0.02)  # a slow consumer: the producer must wait for room, not run ahead
        seen.append(int(batch.crops[0, 0, 0, 0, 0]))
        assert len(made) - len(seen) <= 2 + 1  # queue depth + the one being put
    assert seen == list(range(10))


def test_producer_error_reaches_the_consumer_and_early_exit_stops_the_thread():
    def broken():
        yield _batch(0)
        raise OSError("zarr chunk missing")

    with pytest.raises(OSError, match="zarr chunk missing"):
        list(Prefetcher(broken(), depth=1))
    before = threading.active_count()
    for _ in Prefetcher((_batch(k) for k in range(100)), depth=1):
        break
    time.sleep(0.3)
    assert threading.active_count() <= before  # the producer thread ended


class _FakeTorch:
    """Stands in for torch.cuda: records which thread did what on which stream, in order."""

    float32, bool, uint8 = "float32", "bool", "uint8"

    def __init__(self) -> None:
        self.log: list[tuple] = []
        self.current = SimpleNamespace(name="compute", wait_event=lambda e: self.log.append(("wait", e.id, _me())))
        fake = self

        class Stream:
            def __init__(self, device=None):
                self.name, self.cuda_stream = "side", 0x5EED

            def wait_event(self, event):
                fake.log.append(("side-wait", event.id, _me()))

        class Event:
            count = 0

            def __init__(self):
                Event.count += 1
                self.id = Event.count

            def record(self, stream):
                fake.log.append(("record", self.id, stream.name, _me()))

            def synchronize(self):
                fake.log.append(("host-sync", self.id, _me()))

        class _StreamContext:
            def __init__(self, stream):
                self.stream = stream

            def __enter__(self):
                fake.active = self.stream.name

            def __exit__(self, *exc):
                fake.active = "compute"

        self.active = "compute"
        self.cuda = SimpleNamespace(Stream=Stream, Event=Event, stream=_StreamContext,
                                    current_stream=lambda device=None: self.current)

    def empty(self, shape, dtype, pin_memory=False):
        self.log.append(("alloc", tuple(shape), pin_memory))
        return _FakeTensor(np.empty(shape, np.float32 if dtype == "float32" else bool), self, pinned=pin_memory)

    def from_numpy(self, array):
        return _FakeTensor(array, self)


class _FakeTensor:
    def __init__(self, data, torch, pinned=False, device="cpu"):
        self.data, self.torch, self.pinned, self.device = data, torch, pinned, device
        self.shape = data.shape

    def copy_(self, src):
        self.data[...] = src.data

    def to(self, device, non_blocking=False):
        self.torch.log.append(("copy", self.pinned, non_blocking, self.torch.active, _me()))
        return _FakeTensor(self.data.copy(), self.torch, device=device)

    def record_stream(self, stream):
        self.torch.log.append(("record_stream", stream.name, _me()))


def _me() -> str:
    return "consumer" if threading.current_thread() is threading.main_thread() else "producer"


def test_cuda_stager_copies_through_pinned_buffers_on_a_side_stream_and_the_consumer_never_waits_on_the_host():
    fake = _FakeTorch()
    stager = CudaStager("cuda:0", slots=3, torch_module=fake)
    values = []
    for batch in Prefetcher((_batch(k) for k in range(8)), depth=2, stager=stager):
        assert batch.crops.device == "cuda:0" and batch.masks.device == "cuda:0"
        values.append(float(batch.crops.data[0, 0, 0, 0, 0]))
    assert values == [float(k) for k in range(8)]  # the copied values, in order
    log = fake.log
    allocs = [e for e in log if e[0] == "alloc"]
    assert len(allocs) == 2 * 3 and all(pinned for _, _, pinned in allocs)  # 3 pinned slots each for crops, masks
    copies = [e for e in log if e[0] == "copy"]
    assert len(copies) == 16 and all(c[1:] == (True, True, "side", "producer") for c in copies)
    waits = [e for e in log if e[0] == "wait"]
    assert [w[2] for w in waits] == ["consumer"] * 8  # device-side waits, one per batch, in the consumer
    records = {e[1]: i for i, e in enumerate(log) if e[0] == "record"}
    for i, event in enumerate(log):
        if event[0] == "wait":
            assert records[event[1]] < i  # the consumer waits on an event already recorded after the copy
    assert not [e for e in log if e[0] == "host-sync" and e[2] == "consumer"]  # no host sync in the batch loop
    assert len([e for e in log if e[0] == "record_stream"]) == 16


class _FakeCupy:
    """Stands in for cupy.cuda: ``ExternalStream(ptr, device_id)`` made current with ``with``, as CuPy's."""

    def __init__(self, torch: _FakeTorch) -> None:
        self.active, self.made = "default", []
        fake = self

        class ExternalStream:
            def __init__(self, ptr, device_id=-1):
                fake.made.append((ptr, device_id))
                self.name = "side" if ptr == 0x5EED else f"stream {ptr}"

            def __enter__(self):
                fake.previous, fake.active = fake.active, self.name
                return self

            def __exit__(self, *exc):
                fake.active = fake.previous

        self.cuda = SimpleNamespace(ExternalStream=ExternalStream)


def test_crops_cut_on_the_gpu_run_on_the_side_stream_and_are_freed_after_the_consumer_s_work():
    """#19: CuPy crops were cut on the producer thread's default stream, which the model's stream waits on."""
    fake = _FakeTorch()
    cupy = _FakeCupy(fake)
    stager = CudaStager("cuda:1", slots=3, torch_module=fake, cupy_module=cupy)

    def cut_on_the_device():
        for k in range(6):  # what _batches does on a GPU worker: CuPy kernels in the producer thread
            fake.log.append(("crop", k, fake.active, cupy.active, _me()))
            yield Batch(crops=SimpleNamespace(shape=(4,), k=k), masks=SimpleNamespace(shape=(4,)), owners=[])

    seen = [batch.crops.k for batch in Prefetcher(cut_on_the_device(), depth=2, stager=stager)]
    assert seen == list(range(6)) and cupy.made == [(0x5EED, 1)]  # one CuPy view of torch's side stream
    log = fake.log
    crops = [e for e in log if e[0] == "crop"]
    assert all(e[2:] == ("side", "side", "producer") for e in crops), crops  # torch and CuPy on the side stream
    records = [i for i, e in enumerate(log) if e[0] == "record" and e[2] == "side"]
    for k, i in enumerate(i for i, e in enumerate(log) if e[0] == "crop"):
        assert log[records[k]][3] == "producer" and records[k] > i  # each batch's event follows its crops
    waits = [e for e in log if e[0] == "wait"]
    assert [w[1] for w in waits] == [log[i][1] for i in records] and {w[2] for w in waits} == {"consumer"}
    # freed to the side stream only behind the consumer's work: the side stream waits on an event the
    # consumer recorded on its own stream, once per batch, on the device (no host sync anywhere in the loop)
    used = {e[1] for e in log if e[0] == "record" and e[2] == "compute" and e[3] == "consumer"}
    side_waits = [e for e in log if e[0] == "side-wait"]
    assert len(side_waits) == 6 and {e[1] for e in side_waits} == used and {e[2] for e in side_waits} == {"consumer"}
    assert not [e for e in log if e[0] in ("host-sync", "record_stream", "copy", "alloc")]


def test_the_host_stager_sets_no_stream_and_passes_batches_as_they_are():
    batch = Batch(crops=SimpleNamespace(shape=(2,)), masks=None, owners=[])
    host = HostStager()
    with host.producing():
        assert host.ready(host.stage(batch)) is batch
    host.release(batch)
    assert batch.copied is None


def test_host_syncs_in_the_whole_batch_loop_are_bounded(tiny, monkeypatch):  # noqa: F811
    """Counted from the first batch to the results' one transfer: .item, bool, float, int, .cpu, .numpy,
    .tolist and np.asarray (__array__) on tensors, in the consumer thread. Bound: 0 per batch."""
    sites, bundle = tiny["sites"], tiny["bundle"]
    counter = SyncCounter(monkeypatch, threading.get_ident())
    split = feed._split

    def split_counted(parts, jobs):
        counter.active = False  # the one transfer after the loop
        return split(parts, jobs)

    monkeypatch.setattr(feed, "_split", split_counted)
    runner = ExplainRunner(bundle.model, LAYERS, check_finite=False)

    def started(source):
        counter.active = True
        yield from source

    stats = FeedStats()
    batches = feed._batches
    monkeypatch.setattr(feed, "_batches", lambda *a, **k: started(batches(*a, **k)))
    out = score_sites(_jobs(sites), runner, crop_size=CROP_SHAPE, normalization=bundle.config.normalization,
                      batch_size=4, stats=stats, prefetch=False)
    assert stats.batches >= 4 and len(out) == len(sites)
    assert counter.calls == [], counter.calls
    counter.active = True
    np.asarray(torch.ones(2))  # the counter sees np.asarray on a tensor
    counter.active = False
    assert "__array__" in counter.calls


@pytest.mark.gpu
def test_cuda_stager_on_the_device():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU; run benchmarks/gpu_check.sh on a GPU machine")
    stager = CudaStager("cuda:0", slots=3)
    batches = [_batch(k, n=8) for k in range(6)]
    got = [(b.crops.clone(), b.masks.clone()) for b in Prefetcher(iter(batches), depth=2, stager=stager)]
    for (crops, masks), want in zip(got, batches):
        assert crops.is_cuda and masks.dtype == torch.bool
        np.testing.assert_array_equal(crops.cpu().numpy(), want.crops)
    assert all(slot[0].is_pinned() for ring in stager._buffers.values() for slot in ring["slots"])


@pytest.mark.gpu
def test_cupy_crops_on_the_side_stream_on_the_device():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU; run benchmarks/gpu_check.sh on a GPU machine")
    cupy = pytest.importorskip("cupy")
    stager = CudaStager("cuda:0", slots=3)
    streams = []

    def cut_on_the_device():
        for k in range(6):
            streams.append(cupy.cuda.get_current_stream().ptr)
            crops = cupy.full((8, 2, 3, 4, 4), k, dtype=cupy.float32) * 2 + 1  # kernels on the current stream
            yield Batch(crops, cupy.ones((8, 3, 4, 4), dtype=bool), [(k, 0, 8)])

    got = [torch.as_tensor(b.crops, device="cuda:0").sum() for b in Prefetcher(cut_on_the_device(), 2, stager)]
    assert streams == [stager.side.cuda_stream] * 6  # the producer's CuPy work queued on the side stream
    assert [float(g) for g in got] == [float((2 * k + 1) * 8 * 2 * 3 * 4 * 4) for k in range(6)]
