"""Batch-norm folding: CPU forward time of EfficientNet-B0 3D folded vs unfolded, one run, interleaved.

Usage::

    python benchmarks/bench_fold.py            # grid 16 x 64 x 64, batch 8, 1 torch thread

Writes ``benchmarks/results/bench_fold.json`` and ``.md`` (date, machine and load included).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import time
from pathlib import Path

from machine_info import machine  # benchmarks/ is on sys.path when a script runs

HERE = Path(__file__).resolve().parent


def measure(grid: tuple[int, int, int], batch: int, repeats: int) -> dict:
    """Median seconds per forward pass (no grad, eval) of both models, alternating, after one warm-up each."""
    import numpy as np
    import torch

    from gradcamo_dask.engine.fold import fold_batch_norm
    from gradcamo_dask.engine.models import efficientnet3d

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    model = efficientnet3d(6, 6, grid).eval()
    folded = fold_batch_norm(model, grid)
    x = torch.randn(batch, 6, *grid)
    times: dict[str, list[float]] = {"unfolded": [], "folded": []}
    with torch.no_grad():
        diff = float((model(x) - folded(x)).abs().max())
        for _ in range(repeats):
            for name, m in (("unfolded", model), ("folded", folded)):
                start = time.perf_counter()
                m(x)
                times[name].append(time.perf_counter() - start)
    med = {k: float(np.median(v)) for k, v in times.items()}
    return {"grid": list(grid), "batch": batch, "repeats": repeats, "max_abs_diff": diff,
            "unfolded_s": med["unfolded"], "folded_s": med["folded"], "speedup": med["unfolded"] / med["folded"],
            "batch_norms_folded": sum(isinstance(m, torch.nn.BatchNorm3d) for m in model.modules())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    load = [round(v, 2) for v in os.getloadavg()]
    r = measure((16, 64, 64), 8, args.repeats)
    r.update(date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), machine=machine(),
             load_before=load, load_after=[round(v, 2) for v in os.getloadavg()])
    m = r["machine"]
    md = "\n".join([
        "# bench_fold: batch norm folded into convolutions (CPU forward, measured)", "",
        f"{r['date']} on {m['platform']}, {m['cpu_count']} CPUs, 1 torch thread, load {r['load_before']} -> "
        f"{r['load_after']}.", "",
        f"EfficientNet-B0 3D, 6 channels, input {r['grid']}, batch {r['batch']}, eval, no grad; median of "
        f"{r['repeats']} alternating passes; {r['batch_norms_folded']} batch norms folded.", "",
        "| unfolded s | folded s | speed-up | max abs difference of logits |", "|---|---|---|---|",
        f"| {r['unfolded_s']:.3f} | {r['folded_s']:.3f} | {r['speedup']:.2f}x | {r['max_abs_diff']:.1e} |", ""])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_fold.json").write_text(json.dumps(r, indent=2) + "\n")
    (args.out / "bench_fold.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
