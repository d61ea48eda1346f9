"""GPU check parts: cells/s at the paper grid, a kernel profile, CuPy vs NumPy crops.

One part per call, so that ``benchmarks/gpu_check.sh`` can time-box each one and go
on when one fails or hangs. Each part writes ``gpu_check_<part>.json`` into
``--out`` as soon as it has a figure (a part cut off by its timeout keeps what it
measured); ``summary`` merges them into ``gpu_check.json`` and ``gpu_check.md``.

Parts:

* ``env``: versions (torch, CUDA, cuDNN, CuPy), GPU name, whether bf16 conv3d is trusted.
* ``throughput``: :func:`~gradcamo_dask.explain` on crops of 6 x 21 x 128 x 128 voxels
  resampled to the model grid 64 x 224 x 224 (EfficientNet-B0 3D, random weights,
  layer ``_head_swish``, Grad-CAMO against masks), cells/s per GPU for fp32 and bf16,
  autograd and forward-only (analytic) Grad-CAM, and the forward pass alone.
* ``compiled``: the forward-only route through ``torch.compile`` of the model's
  hook-free ``head_and_logits`` (default mode, then ``reduce-overhead``: CUDA graphs).
* ``profile``: ``torch.profiler`` over bf16 analytic batches: top 10 kernels and the
  share of the profiled time the GPU ran no kernel or copy.
* ``crops``: :func:`~gradcamo_dask.cells.crop_site` + normalisation of a 6 x 21 x 1024
  x 1024 site, NumPy vs CuPy (upload timed separately).

``--dry-run`` runs every part on the CPU at tiny sizes (a check of the script's logic).

Usage::

    python benchmarks/bench_gpu.py throughput --out benchmarks/results
    python benchmarks/bench_gpu.py summary --out benchmarks/results
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PAPER = {"crop": (21, 128, 128), "grid": (64, 224, 224), "batch": 32, "site": (21, 1024, 1024), "spacing": 64}
TINY = {"crop": (5, 24, 24), "grid": (8, 32, 32), "batch": 4, "site": (5, 160, 160), "spacing": 40}
MODES = [  # name, autocast, route, cams
    ("fp32_autograd", False, "autograd", True),
    ("bf16_autograd", "bf16", "autograd", True),
    ("fp32_analytic", False, "auto", True),
    ("bf16_analytic", "bf16", "auto", True),
    ("bf16_forward_only", "bf16", "auto", False),
]


class Part:
    """A part's record: written to ``gpu_check_<name>.json`` after every update."""

    def __init__(self, name: str, out: Path, sizes: dict, device: str) -> None:
        self.path = out / f"gpu_check_{name}.json"
        self.data = {"part": name, "device": device, "sizes": {k: list(v) if isinstance(v, tuple) else v
                                                               for k, v in sizes.items()},
                     "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                     "host": platform.node(), "status": "running", "figures": {}}
        self.save()

    def put(self, key: str, value) -> None:
        self.data["figures"][key] = value
        print(f"[bench_gpu] {self.data['part']} {key}: {json.dumps(value, default=str)}", flush=True)
        self.save()

    def save(self, status: str | None = None) -> None:
        if status:
            self.data["status"] = status
        self.path.write_text(json.dumps(self.data, indent=2, default=str) + "\n")


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _model(sizes: dict, device: str):
    import torch

    from gradcamo_dask.engine.models import efficientnet3d

    torch.manual_seed(0)
    model = efficientnet3d(6, 2, sizes["grid"]).eval().to(device)
    if device.startswith("cuda"):
        model = model.to(memory_format=torch.channels_last_3d)  # converted once, not per batch
    return model


def _cells(sizes: dict, device: str, n: int):
    """Normalised crops (n, 6, z, y, x) and central masks (n, z, y, x) on the device."""
    import torch

    gen = torch.Generator(device="cpu").manual_seed(1)
    crops = torch.randn(n, 6, *sizes["crop"], generator=gen).to(device)
    z, y, x = sizes["crop"]
    zz, yy, xx = torch.meshgrid(torch.arange(z), torch.arange(y), torch.arange(x), indexing="ij")
    ball = ((zz - z / 2) / (z / 2)) ** 2 + ((yy - y / 2) / (y / 4)) ** 2 + ((xx - x / 2) / (x / 4)) ** 2 < 1
    return crops, ball[None].expand(n, -1, -1, -1).contiguous().to(device)


def _rate(run, cells_per_call: int, seconds: float, device: str, warmup: int = 2) -> dict:
    for _ in range(warmup):
        run()
    _sync(device)
    calls, start = 0, time.perf_counter()
    while True:
        run()
        calls += 1
        _sync(device)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and calls >= 2:
            break
    return {"cells_per_s": round(calls * cells_per_call / elapsed, 1), "calls": calls, "seconds": round(elapsed, 2)}


def part_env(part: Part, sizes: dict, device: str, args) -> None:
    import torch

    from gradcamo_dask.engine.precision import bf16_conv3d_problem

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else None,
            "bf16_conv3d_problem": bf16_conv3d_problem()}
    for name in ("cupy", "dask", "distributed", "dask_cuda", "zarr", "monai", "numpy", "cellpose"):
        try:
            info[name] = getattr(__import__(name), "__version__", "?")
        except Exception as err:  # noqa: BLE001 - a missing or broken package is a finding
            info[name] = f"unavailable ({type(err).__name__}: {str(err)[:80]})"
    part.put("versions", info)


def part_throughput(part: Part, sizes: dict, device: str, args) -> None:
    import torch

    from gradcamo_dask.engine.explain import explain

    torch.backends.cudnn.benchmark = True
    model = _model(sizes, device)
    batch = args.batch or sizes["batch"]
    crops, masks = _cells(sizes, device, batch)
    dtype = {"bf16": torch.bfloat16, False: False}
    for name, autocast, route, cams in MODES:
        def run(autocast=autocast, route=route, cams=cams):
            explain(model, crops, masks, layers=["_head_swish"], batch_size=batch, autocast=dtype[autocast],
                    route=route, cams=cams)

        try:
            figure = _rate(run, batch, args.seconds, device)
            if device.startswith("cuda"):
                figure["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            part.put(name, figure)
        except Exception as err:  # noqa: BLE001 - record and go on with the next mode
            part.put(name, {"error": f"{type(err).__name__}: {str(err)[:300]}"})
    f = part.data["figures"]
    if "cells_per_s" in f.get("bf16_analytic", {}) and "cells_per_s" in f.get("bf16_forward_only", {}):
        part.put("analytic_cost_vs_forward_bf16",
                 round(f["bf16_forward_only"]["cells_per_s"] / f["bf16_analytic"]["cells_per_s"], 3))
    if "cells_per_s" in f.get("bf16_analytic", {}) and "cells_per_s" in f.get("bf16_autograd", {}):
        part.put("analytic_speedup_vs_autograd_bf16",
                 round(f["bf16_analytic"]["cells_per_s"] / f["bf16_autograd"]["cells_per_s"], 3))


def _compiled_step(model, sizes: dict, batch: int, device: str, mode: str | None, backend: str):
    import torch
    import torch.nn.functional as F

    from gradcamo_dask.engine.gradcam import head_cam
    from gradcamo_dask.engine.gradcamo import gradcamo_lowres

    compiled = torch.compile(model.head_and_logits, mode=mode, backend=backend)
    crops, masks = _cells(sizes, device, batch)
    weight = model.pooled_linear("_head_swish").weight  # the head's linear layer
    autocast = torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)

    def run():
        x = F.interpolate(crops, size=sizes["grid"], mode="trilinear", align_corners=False)
        if device.startswith("cuda"):
            x = x.contiguous(memory_format=torch.channels_last_3d)
        with torch.no_grad(), autocast:
            head, logits = compiled(x)
        cam = head_cam(head, weight, logits.float().argmax(dim=1))
        return gradcamo_lowres(cam, masks)

    return run


def part_compiled(part: Part, sizes: dict, device: str, args) -> None:
    import torch

    torch.backends.cudnn.benchmark = True
    model = _model(sizes, device)
    batch = args.batch or sizes["batch"]
    modes = [None, "reduce-overhead"] if device.startswith("cuda") else [None]
    for mode in modes:
        key = f"bf16_analytic_compiled_{mode or 'default'}"
        try:
            started = time.perf_counter()
            # the dry run traces with dynamo only ("eager"): inductor's C++ build takes minutes on 2 cores
            run = _compiled_step(model, sizes, batch, device, mode, "eager" if args.dry_run else "inductor")
            run()
            _sync(device)
            compile_s = round(time.perf_counter() - started, 1)
            part.put(key, {**_rate(run, batch, args.seconds, device, warmup=2), "first_call_s": compile_s})
        except Exception as err:  # noqa: BLE001
            part.put(key, {"error": f"{type(err).__name__}: {str(err)[:300]}"})


def _busy_share(events, kinds) -> tuple[float | None, float]:
    """Share of the profiled span covered by device events (union of intervals) and the span in ms."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in events)
    if not spans:
        return None, 0.0
    device = sorted((e.time_range.start, e.time_range.end) for e in events if e.device_type in kinds)
    busy, end = 0.0, None
    for a, b in device:
        if end is None or a > end:
            busy += b - a
            end = b
        elif b > end:
            busy += b - end
            end = b
    span = max(b for _, b in spans) - spans[0][0]
    return (busy / span if span > 0 and device else None), span / 1e3


def part_profile(part: Part, sizes: dict, device: str, args) -> None:
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from gradcamo_dask.engine.explain import explain

    torch.backends.cudnn.benchmark = True
    model = _model(sizes, device)
    batch = args.batch or sizes["batch"]
    crops, masks = _cells(sizes, device, batch)
    autocast = torch.bfloat16 if device.startswith("cuda") else False

    def run():
        explain(model, crops, masks, layers=["_head_swish"], batch_size=batch, autocast=autocast)

    for _ in range(3):
        run()
    _sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        for _ in range(args.profile_batches):
            run()
        _sync(device)
    events = list(prof.events())
    kinds = {DeviceType.CUDA}
    busy, span_ms = _busy_share(events, kinds)
    on_device = [e for e in events if e.device_type in kinds] or [e for e in events if e.cpu_parent is None]
    totals: dict[str, list] = {}
    for e in on_device:
        t = totals.setdefault(e.name, [0.0, 0])
        t[0] += e.time_range.end - e.time_range.start
        t[1] += 1
    top = sorted(totals.items(), key=lambda kv: -kv[1][0])[:10]
    whole = sum(v[0] for v in totals.values()) or 1.0
    part.put("profiled", {"batches": args.profile_batches, "cells": args.profile_batches * batch,
                          "span_ms": round(span_ms, 1), "device_busy_share": None if busy is None else round(busy, 3),
                          "device_idle_share": None if busy is None else round(1 - busy, 3),
                          "kernels_are": "CUDA kernels and copies" if device.startswith("cuda")
                          else "CPU ops (dry run)"})
    part.put("top10", [{"name": n[:120], "ms": round(v[0] / 1e3, 2), "share": round(v[0] / whole, 3), "count": v[1]}
                       for n, v in top])
    sort = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    try:
        table = prof.key_averages().table(sort_by=sort, row_limit=10)
    except Exception as err:  # noqa: BLE001 - sort keys were renamed across torch versions
        table = f"(key_averages table unavailable: {err})"
    (part.path.parent / "gpu_check_profile.txt").write_text(table + "\n")


def _site(sizes: dict):
    """A site (6, z, y, x) uint16 with box cells on a grid, its labels and cell table (centres in voxels)."""
    import numpy as np
    import pandas as pd

    z, y, x = sizes["site"]
    step = sizes["spacing"]
    rng = np.random.default_rng(0)
    image = rng.integers(0, 4000, size=(6, z, y, x), dtype=np.uint16)
    labels = np.zeros((z, y, x), dtype=np.int32)
    rows = []
    for cy in range(step // 2, y - step // 2, step):
        for cx in range(step // 2, x - step // 2, step):
            n = len(rows) + 1
            h = int(rng.integers(step // 4, step // 2))
            z0, z1, y0, x0 = 1, z - 1, cy - h // 2, cx - h // 2
            labels[z0:z1, y0:y0 + h, x0:x0 + h] = n
            rows.append({"object_number": n, "center_z": (z0 + z1 - 1) / 2, "center_y": y0 + (h - 1) / 2,
                         "center_x": x0 + (h - 1) / 2})
    return image, labels, pd.DataFrame(rows)


def part_crops(part: Part, sizes: dict, device: str, args) -> None:
    from gradcamo_dask.cells import crop_site
    from gradcamo_dask.normalize import normalize_crops

    image, labels, cells = _site(sizes)
    crop = (None, *sizes["crop"][1:])
    norm = {"mean": [0.3] * 6, "std": [0.2] * 6}
    part.put("site", {"shape": list(image.shape), "cells": len(cells), "crop": list(crop)})

    def numpy_run():
        crops, masks = crop_site(image, labels, cells, crop)
        return normalize_crops(crops, norm)

    part.put("numpy", _rate(numpy_run, len(cells), args.seconds, "cpu", warmup=1))
    try:
        import cupy
    except ImportError as err:
        part.put("cupy", {"error": f"CuPy unavailable: {err}"})
        return
    stream = cupy.cuda.get_current_stream()

    def upload():
        return cupy.asarray(image), cupy.asarray(labels)

    up = _rate(lambda: (upload(), stream.synchronize()), len(cells), args.seconds / 2, "cpu", warmup=1)
    gpu_image, gpu_labels = upload()

    def cupy_run():
        crops, masks = crop_site(gpu_image, gpu_labels, cells, crop)
        normalize_crops(crops, norm)
        stream.synchronize()

    part.put("cupy_upload", up)
    part.put("cupy", _rate(cupy_run, len(cells), args.seconds, "cpu", warmup=1))
    f = part.data["figures"]
    part.put("cupy_vs_numpy", round(f["cupy"]["cells_per_s"] / f["numpy"]["cells_per_s"], 2))


def summary(out: Path) -> str:
    parts = {}
    for path in sorted(out.glob("gpu_check_*.json")):
        try:
            data = json.loads(path.read_text())
        except ValueError:
            continue
        if isinstance(data, dict) and "part" in data:
            parts[data["part"]] = data
    merged = {"benchmark": "gpu_check", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "parts": parts}
    (out / "gpu_check.json").write_text(json.dumps(merged, indent=2, default=str) + "\n")
    env = parts.get("env", {}).get("figures", {}).get("versions", {})
    lines = ["# gpu_check", "", f"{merged['date']}, GPU {env.get('gpu')}, torch {env.get('torch')}, CUDA "
             f"{env.get('cuda')}, cuDNN {env.get('cudnn')}, CuPy {env.get('cupy')}; bf16 conv3d problem: "
             f"{env.get('bf16_conv3d_problem')}", "",
             "Random weights; crops 6 x 21 x 128 x 128 resampled to 64 x 224 x 224 inside the timed call; layer "
             "_head_swish; Grad-CAMO against masks. Measured, not estimated.", "",
             "| part | figure | value |", "|---|---|---|"]
    for name, data in parts.items():
        if name == "env":
            continue
        for key, value in data.get("figures", {}).items():
            if key == "top10":
                continue
            shown = value.get("cells_per_s", value) if isinstance(value, dict) and "error" not in value else value
            lines.append(f"| {name} ({data.get('status')}) | {key} | {json.dumps(shown, default=str)} |")
    top = parts.get("profile", {}).get("figures", {}).get("top10", [])
    if top:
        lines += ["", "Top 10 kernels (profile part):", "", "| kernel | ms | share | count |", "|---|---|---|---|"]
        lines += [f"| {t['name']} | {t['ms']} | {t['share']} | {t['count']} |" for t in top]
    text = "\n".join(lines) + "\n"
    (out / "gpu_check.md").write_text(text)
    return text


PARTS = {"env": part_env, "throughput": part_throughput, "compiled": part_compiled, "profile": part_profile,
         "crops": part_crops}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=[*PARTS, "summary"])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: checks the logic, measures nothing")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--seconds", type=float, default=None, help="timed seconds per figure (default 8; dry run 0.5)")
    parser.add_argument("--batch", type=int, default=None, help="cells per batch (default 32; dry run 4)")
    parser.add_argument("--profile-batches", type=int, default=5)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.part == "summary":
        print(summary(out))
        return 0
    sizes, device = (TINY, "cpu") if args.dry_run else (PAPER, "cuda")
    args.seconds = args.seconds if args.seconds is not None else (0.5 if args.dry_run else 8.0)
    if args.dry_run:
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
        args.profile_batches = min(args.profile_batches, 2)
    part = Part(args.part, out, sizes, device)
    try:
        PARTS[args.part](part, sizes, device, args)
    except BaseException as err:
        part.data["error"] = f"{type(err).__name__}: {str(err)[:500]}"
        part.save("failed")
        raise
    part.save("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
