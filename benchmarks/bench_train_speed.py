"""Training throughput: cells/s trained by the recipe's step (Adam, batch 8) on random crops.

Measures, on one device in one run, the optimisation step of :func:`gradcamo_dask.jobs.train`
(forward, cross-entropy, backward, Adam) with plain cross-entropy and with the
Grad-CAMO regulariser (double backward through the Grad-CAM weights), at a given
model grid. On CUDA it uses bf16 autocast and ``channels_last_3d`` as training does.
Data loading is not included (crops come from memory).

Usage::

    python benchmarks/bench_train_speed.py --device cuda                    # paper grid 64 x 224 x 224
    python benchmarks/bench_train_speed.py --device cpu --input-shape 16 48 48 --steps 3

Writes ``benchmarks/results/bench_train_speed_<device>.json`` and ``.md``.
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def main(argv: list[str] | None = None) -> int:
    import torch

    from gradcamo_dask.engine.models import efficientnet3d
    from gradcamo_dask.engine.regularize import gradcamo_loss
    from gradcamo_dask.engine.precision import autocast_context
    from gradcamo_dask.jobs.epochs import to_device

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--input-shape", type=int, nargs=3, default=[64, 224, 224])
    parser.add_argument("--crop-shape", type=int, nargs=3, default=[21, 128, 128])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--layer", default="_blocks.4.10")
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    channels_last = device.type == "cuda"
    shape = tuple(args.input_shape)
    results = {}
    for lam in (0.0, 1.0):
        torch.manual_seed(0)
        model = efficientnet3d(6, 6, shape).to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last_3d)
        opt = torch.optim.Adam(model.parameters(), lr=3e-4)
        x = torch.randn(args.batch_size, 6, *shape)
        y = torch.randint(0, 6, (args.batch_size,))
        masks = torch.rand(args.batch_size, *args.crop_shape) > 0.7

        def step() -> None:
            xb = to_device(x, device, channels_last)
            with autocast_context(device, None):
                out = gradcamo_loss(model, xb, y.to(device), masks.to(device), layer=args.layer, lam=lam)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()

        step()  # warm-up (cuDNN autotuning, allocations)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        rate = args.steps * args.batch_size / seconds
        name = "regularized" if lam else "cross_entropy"
        results[name] = {"cells_per_s": round(rate, 2), "seconds_per_step": round(seconds / args.steps, 4),
                         "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20)
                         if device.type == "cuda" else None}
        print(f"[bench_train_speed] {name}: {rate:.1f} cells/s trained ({device}, grid {shape}, batch "
              f"{args.batch_size})", flush=True)
    report = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(),
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "settings": {k: v for k, v in vars(args).items() if k != "out"}, "results": results,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"bench_train_speed_{device.type}"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# bench_train_speed ({device.type})", "", f"- date: {report['date']}",
             f"- machine: {report['machine']}", f"- grid {shape}, batch {args.batch_size}, layer {args.layer}", "",
             "| loss | cells/s trained | s/step | peak GPU MiB |", "| --- | --- | --- | --- |"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['cells_per_s']} | {r['seconds_per_step']} | {r['peak_gpu_mib']} |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
