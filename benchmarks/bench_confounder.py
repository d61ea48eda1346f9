"""The paper's central claim on ground truth: a model trained on a confounded plate
looks away from the cell (low Grad-CAMO), and the Grad-CAMO regulariser brings its
attention back at similar accuracy.

One run, same seed, same split, same model and recipe for all three trainings:

1. **clean**: synthetic plate with ``confounder=0`` (the background carries no
   treatment information), plain cross-entropy;
2. **confounded**: the same plate (same seed: same cells, same stains) with the
   confounder knob on (a treatment-specific grating outside every cell), plain
   cross-entropy;
3. **confounded + regulariser**: plate 2, ``loss = CE - lambda * mean Grad-CAMO``.

For each: test accuracy (held-out wells) and mean ± sd test Grad-CAMO of the
predicted class at the same layer, plus wall time and cells/s trained. Expected:
Grad-CAMO clearly lower for model 2 than model 1, raised by the regulariser (3)
at similar accuracy.

Usage::

    python benchmarks/bench_confounder.py --quick   # 2 classes, tiny, a few minutes on 2 cores
    python benchmarks/bench_confounder.py           # 4 classes, ~25 min on 2 cores

Writes ``benchmarks/results/bench_confounder[_quick].json`` and ``.md`` (date and machine).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

SETTINGS = {
    "quick": dict(doses_um=(0.0, 10.0), sites_per_well=3, epochs=2, max_train_cells=96),
    "full": dict(doses_um=(0.0, 0.3, 1.0, 10.0), sites_per_well=5, epochs=3, max_train_cells=256),
}
COMMON = dict(site_shape=(12, 128, 128), cell_radius=12.0, crop_size=(None, 48, 48), input_shape=(12, 48, 48),
              layer="_blocks.1.2", confounder=1.0, lam=1.0, seed=0, wells_per_treatment=2, test_rows=("C",),
              patience=None)


def machine() -> dict:
    import torch

    return {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_average": list(os.getloadavg())}


def run(mode: str, out_dir: Path, device: str | None) -> dict:
    from gradcamo_dask.synthetic import synthetic_plate
    from gradcamo_dask.train import train

    s, c = SETTINGS[mode], COMMON
    plates = {
        name: synthetic_plate(doses_um=s["doses_um"], wells_per_treatment=c["wells_per_treatment"],
                              sites_per_well=s["sites_per_well"], site_shape=c["site_shape"],
                              cell_radius=c["cell_radius"], seed=c["seed"], confounder=strength)
        for name, strength in (("clean", 0.0), ("confounded", c["confounder"]))
    }
    runs = {"clean": ("clean", 0.0), "confounded": ("confounded", 0.0), "confounded_regularized": ("confounded", c["lam"])}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (plate_name, lam) in runs.items():
            plate = plates[plate_name]
            t0 = time.perf_counter()
            bundle = train(plate.image, plate.labels, plate.platemap, out=Path(tmp) / name,
                           crop_size=c["crop_size"], input_shape=c["input_shape"], epochs=s["epochs"],
                           seed=c["seed"], test_rows=c["test_rows"], max_train_cells=s["max_train_cells"],
                           patience=c["patience"], regularizer=lam, regularizer_layer=c["layer"],
                           layers=[c["layer"]], device=device, progress=sys.stderr.isatty())
            seconds = time.perf_counter() - t0
            prov = json.loads((bundle / "config.json").read_text())["provenance"]
            cells_trained = prov["cells"]["train"] * prov["epochs_run"]
            results[name] = {
                "plate": plate_name, "lambda": lam, "test_accuracy": prov["test"]["accuracy"],
                "test_gradcamo_mean": prov["test"]["gradcamo_mean"], "test_gradcamo_sd": prov["test"]["gradcamo_sd"],
                "test_undefined": prov["test"]["n_undefined"], "test_cells": prov["test"]["n"],
                "train_cells": prov["cells"]["train"], "epochs": prov["epochs_run"], "seconds": round(seconds, 1),
                "cells_per_s_trained": round(cells_trained / seconds, 2), "history": prov["history"],
                "chance_accuracy": 1 / len(prov["classes"]),
            }
            partial = Path(out_dir) / f"bench_confounder_{mode}_partial.json"
            partial.parent.mkdir(parents=True, exist_ok=True)
            partial.write_text(json.dumps(results, indent=2) + "\n")  # survives an interrupted run
            print(f"[bench_confounder] {name}: accuracy {results[name]['test_accuracy']:.3f}, Grad-CAMO "
                  f"{results[name]['test_gradcamo_mean']:.3f} +- {results[name]['test_gradcamo_sd']:.3f}, "
                  f"{seconds:.0f} s", flush=True)
    return {"mode": mode, "settings": {**{k: list(v) if isinstance(v, tuple) else v for k, v in s.items()},
                                       **{k: list(v) if isinstance(v, tuple) else v for k, v in c.items()}},
            "results": results}


def markdown(report: dict) -> str:
    m, r, st = report["machine"], report["results"], report["settings"]
    lines = [
        f"# bench_confounder ({report['mode']})", "",
        f"- date: {report['date']}",
        f"- machine: {m['platform']}, {m['cpu_count']} CPUs, torch threads {m['torch_threads']}, GPU {m['gpu']}, "
        f"load average at start {m['load_average']}",
        f"- plates: synthetic, doses {st['doses_um']} µM ({len(st['doses_um'])} classes), "
        f"{st['wells_per_treatment']} wells x {st['sites_per_well']} sites of {st['site_shape']} voxels, cell radius "
        f"{st['cell_radius']} px, seed {st['seed']}; confounder {st['confounder']} vs 0",
        f"- training: crop {st['crop_size']}, model grid {st['input_shape']}, {st['epochs']} epochs, batch 8, "
        f"Adam 3e-4, paper augmentations, test wells = row {st['test_rows']}; regulariser lambda {st['lam']} at "
        f"`{st['layer']}` (true-label map); Grad-CAMO of the predicted class at the same layer", "",
        "| model | plate | test accuracy | test Grad-CAMO (mean ± sd) | undefined | train cells x epochs | "
        "time (s) | cells/s trained |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, v in r.items():
        lines.append(f"| {name} | {v['plate']} | {v['test_accuracy']:.3f} (chance {v['chance_accuracy']:.2f}) | "
                     f"{v['test_gradcamo_mean']:.3f} ± {v['test_gradcamo_sd']:.3f} | {v['test_undefined']} / "
                     f"{v['test_cells']} | {v['train_cells']} x {v['epochs']} | {v['seconds']} | "
                     f"{v['cells_per_s_trained']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 classes, tiny (a few minutes on 2 cores)")
    parser.add_argument("--layer", default=COMMON["layer"],
                        help="Grad-CAM layer of the regulariser and of the test audit (default %(default)s: grid "
                        "2 x 6 x 6 at the 12 x 48 x 48 model grid; the deeper blocks are 1 x 2 x 2 or a single voxel)")
    parser.add_argument("--lam", type=float, default=COMMON["lam"], help="regulariser weight (default %(default)s)")
    parser.add_argument("--confounder", type=float, default=COMMON["confounder"],
                        help="confounder strength of the confounded plate (default %(default)s)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--out", default=str(HERE / "results"), help="folder for the JSON and Markdown")
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else "full"
    COMMON.update(layer=args.layer, lam=args.lam, confounder=args.confounder)
    report = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine()}
    t0 = time.perf_counter()
    report.update(run(mode, Path(args.out), args.device))
    report["total_seconds"] = round(time.perf_counter() - t0, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "bench_confounder" + ("_quick" if args.quick else "")
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
