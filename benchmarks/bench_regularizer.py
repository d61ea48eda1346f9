"""The Grad-CAMO regulariser on ground truth: a λ sweep on a plate where the treatment can be read both
inside each cell and from its neighbours.

Plate: the two-compound granules plate of ``bench_attention`` *without* mosaic wells
(``synthetic_plate(mosaic=False, granules=1, compounds=2, doses_um=(10,))``): about 88 % of the cells
respond, so a cell's own granules and its responding neighbours' granules both tell the compound. A model
trained with plain cross-entropy may read either; the regulariser (``loss = CE - λ · mean Grad-CAMO`` at
the stem layer ``_swish``, the layer ``bench_attention`` ranks first) should move its attention onto the
cell of interest.

For each λ and seed, EfficientNet-B0 3D is trained on every training-well cell and audited on the held-out
wells (row C): Grad-CAMO of the predicted class at ``_swish`` (mean ± sd, share >= 0.25, the uniform-map
reference), test accuracy, and accuracy with the *surround* blanked (``cell only``: the off-cell signal
removed) and with the cell blanked (``surround only``). Targets (issue #12): Grad-CAMO rises by Cohen's
d >= 0.8 against λ = 0, cell-only accuracy rises, test accuracy falls by at most 3 points.

Usage::

    python benchmarks/bench_regularizer.py --quick   # 1 seed, λ 0 and 10, tiny; runs in a test
    python benchmarks/bench_regularizer.py           # λ 0, 10, 30 x seeds 0, 1, 2: the committed figures
    python benchmarks/bench_regularizer.py --layer _blocks.1.1 --lambdas 0 1 3 10 --epochs 16 \
        --max-train-cells 300 --sites-per-well 12 --warm-start 8 --tag warm   # fine-tunes of a plain model

Writes ``benchmarks/results/bench_regularizer[_quick].json`` and ``.md`` (date, machine, load).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import bench_attention as ba  # noqa: E402  (the plate, training, audit and statistics are shared)

from gradcamo_dask.engine.augment import AUGMENTATION_NAMES  # noqa: E402

LAYER = "_swish"
SETTINGS = {
    "quick": dict(sites_per_well=2, epochs=1, max_train_cells=16, max_test_cells=32, seeds=(0,), lambdas=(0.0, 10.0)),
    "full": dict(sites_per_well=12, epochs=5, max_train_cells=160, max_test_cells=300, seeds=(0, 1, 2),
                 lambdas=(0.0, 10.0, 30.0)),
}
# Sized for ~50 min on 2 cores shared with other long benchmarks (load 12-18; run with --workers 3, one torch
# thread each): at load ~11 one batch of 8 took 1.6 s plain and 3.95 s with the regulariser at _swish (double
# backward), and each of our processes got ~14 % of a core at load 18, so 160 cells x 5 epochs (100 batches per
# run). max_test_cells 300 keeps every held-out cell (276; a subset is drawn only above it).
# λ 10 and 30 follow bench_confounder's calibration: at initialisation the Grad-CAMO gradient is about 1/6 of
# the cross-entropy's.


def sweep_settings(scaling: str, run_options: dict | None = None) -> dict:
    """bench_attention's plate and recipe without mosaic wells; ``run_options``: ``layer`` (regularised and
    audited, default LAYER) and ``augmentation`` (a name of ``AUGMENTATION_NAMES``)."""
    return {**ba.COMMON, "mosaic": False, "intensity_scaling": scaling, "layer": LAYER, **(run_options or {})}


def train_job(c: dict, s: dict, seed: int, lam: float, out: str, start: str | None = None,
              warm: dict | None = None) -> dict:
    """One regularised (or plain, λ = 0) model on every cell, with the run's intensity scaling; with ``start``
    (a bundle) it is fine-tuned from that bundle for ``warm["epochs"]`` at ``warm["learning_rate"]``."""
    options = {"regularizer": lam, "regularizer_layer": c["layer"],
               "regularizer_evidence": c.get("evidence", "positive"),
               "regularizer_cam": c.get("cam", "gradcam")} if lam > 0 else {}
    options["intensity_scaling"] = c["intensity_scaling"]
    if start is not None:
        options["init_from"] = start
        c, s = {**c, "learning_rate": warm["learning_rate"]}, {**s, "epochs": warm["epochs"]}
    return ba.train_model(c, s, seed, "all_cells", out, recipe_options=options)


def bundle_normalization(bundle: str) -> dict:
    """The bundle's normalisation: ``mean``/``std`` and, with plate scaling, ``low``/``high`` (raw units)."""
    return json.loads((Path(bundle) / "config.json").read_text())["normalization"]


def audit_model(bundle: str, table, raw, masks, layer: str = LAYER) -> dict:
    """Grad-CAMO at ``layer`` and the accuracies of one model on the held-out cells."""
    # raw crops, normalised in the audit as the bundle was trained (its fixed range, or each crop's min-max)
    import diagnose_maps  # imported here: it imports this module

    from gradcamo_dask.engine.bundles import open_bundle
    from gradcamo_dask.normalize import normalize_crops

    a = ba.audit(Path(bundle), table, raw, masks, layers=(layer, ba.COMMON["feature_layer"]), raw=True)
    every = np.ones(len(table), bool)
    norm = bundle_normalization(bundle)
    model = open_bundle(bundle)
    maps = diagnose_maps.raw_maps(model.model, normalize_crops(raw, norm), layer, model.config.input_shape)
    figures = diagnose_maps.map_figures(*maps, masks)  # where the evidence against the class lies
    return {"gradcamo": a["gradcamo"][layer], "grid": a["grids"][layer],
            "gradcamo_hirescam": a["by_method"]["hirescam"][layer],  # the same model with HiResCAM maps
            "negative_outside_share_of_all": figures["negative_outside_share_of_all"],
            "intensity_range": {k: norm[k] for k in ("low", "high") if k in norm},
            "test": ba.accuracy(a["predicted"], a["y"], every),
            "cell_only": ba.accuracy(a["cell_only"], a["y"], every),
            "surround_only": ba.accuracy(a["surround_only"], a["y"], every)}


def run(mode: str, workers: int, on_done, scaling: str = "plate", run_options: dict | None = None,
        warm: dict | None = None) -> dict:
    """Train every (λ, seed) in ``workers`` processes and audit each as it finishes; ``on_done(report)``
    after each, so an interrupted sweep keeps its finished runs. ``warm`` (``epochs``, ``learning_rate``):
    first a plain model per seed (the mode's epochs), then every λ (0 included, the control) fine-tuned from it."""
    s = SETTINGS[mode]
    c = sweep_settings(scaling, run_options)
    plate, truth = ba.mosaic_plate(c, s)
    table, raw, masks = ba.test_cells(plate, truth.assign(responder=True), s["max_test_cells"], c["plate_seed"],
                                      raw=True, common=c)
    del plate
    uniform = masks.float().mean(dim=tuple(range(1, masks.ndim))).numpy().astype(np.float64)
    jobs = [(lam, seed) for seed in s["seeds"] for lam in s["lambdas"]]  # seed by seed: a cut-off sweep stays paired
    results: dict = {}
    starts: dict = {}

    def audited(trained: dict, what: str) -> dict:
        r = {**trained, **audit_model(trained["bundle"], table, raw, masks, c["layer"]),
             "load_average_done": [round(v, 2) for v in os.getloadavg()]}
        print(f"[bench_regularizer] {what}: accuracy {r['test']['accuracy']:.3f}, cell only "
              f"{r['cell_only']['accuracy']:.3f}, Grad-CAMO {np.nanmean(r['gradcamo']):.3f}; train "
              f"{trained['train_seconds']:.0f} s; load {r['load_average_done']}", flush=True)
        return r

    with tempfile.TemporaryDirectory() as tmp, ProcessPoolExecutor(
            max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
        if warm:  # the plain models every λ starts from, then the fine-tunes (submitted as each start is done)
            first = {seed: pool.submit(train_job, c, s, seed, 0.0, f"{tmp}/start-{seed}") for seed in s["seeds"]}
            futures = {}
            for seed in s["seeds"]:
                starts[seed] = audited(first[seed].result(), f"start seed {seed}")
                futures |= {(lam, seed): pool.submit(train_job, c, s, seed, lam, f"{tmp}/lam{lam:g}-{seed}",
                                                     starts[seed]["bundle"], warm) for lam in s["lambdas"]}
        else:
            futures = {job: pool.submit(train_job, c, s, job[1], job[0], f"{tmp}/lam{job[0]:g}-{job[1]}")
                       for job in jobs}
        for job in jobs:
            results[job] = audited(futures[job].result(), f"λ {job[0]:g} seed {job[1]}")
            on_done(summary(mode, s, c, results, uniform, starts, warm))
    return summary(mode, s, c, results, uniform, starts, warm)


def audit_saved(s: dict, bundle: str, scaling: str, run_options: dict | None = None) -> dict:
    """Audit one saved bundle (a folder ``lam<λ>-<seed>``, e.g. kept from an interrupted sweep) in a process of
    its own: the plate and held-out cells are rebuilt here (torch on 1 thread). Returns the run's results."""
    import torch

    torch.set_num_threads(1)
    c = sweep_settings(scaling, run_options)  # s: the settings (a spawned process
    plate, truth = ba.mosaic_plate(c, s)  # re-imports this module, so the caller's overrides travel explicitly)
    table, raw, masks = ba.test_cells(plate, truth.assign(responder=True), s["max_test_cells"], c["plate_seed"],
                                      raw=True, common=c)
    config = json.loads((Path(bundle) / "config.json").read_text())
    state = Path(bundle) / "checkpoint" / "state.json"
    history = json.loads(state.read_text())["history"] if state.is_file() else None
    return {"train_seconds": None, "train_cells": config["provenance"]["cells"]["train"],
            "epochs": config["provenance"]["epochs_run"], "history": history,
            "uniform": masks.float().mean(dim=tuple(range(1, masks.ndim))).numpy().astype(np.float64),
            **audit_model(bundle, table, raw, masks, c["layer"]), "load_average_done": [round(v, 2) for v in os.getloadavg()]}


def run_saved(mode: str, bundles: list[str], on_done, scaling: str = "plate", run_options: dict | None = None) -> dict:
    """Audit saved bundles, one process each (all at once); the report as :func:`run`'s."""
    results: dict = {}
    with ProcessPoolExecutor(max_workers=len(bundles), mp_context=mp.get_context("spawn")) as pool:
        futures = {b: pool.submit(audit_saved, SETTINGS[mode], b, scaling, run_options) for b in bundles}
        for b, future in futures.items():
            lam, seed = Path(b).name.removeprefix("lam").rsplit("-", 1)
            results[(float(lam), int(seed))] = r = future.result()
            print(f"[bench_regularizer] λ {lam} seed {seed}: accuracy {r['test']['accuracy']:.3f}, cell only "
                  f"{r['cell_only']['accuracy']:.3f}, Grad-CAMO {np.nanmean(r['gradcamo']):.3f}", flush=True)
    c = sweep_settings(scaling, run_options)
    report = summary(mode, SETTINGS[mode], c, dict(sorted(results.items())), next(iter(results.values()))["uniform"])
    on_done(report)
    return report


def _row(lam: float | str, seed: int, r: dict, cutoff: float) -> dict:
    return {"lambda": lam, "seed": seed, "train_seconds": r["train_seconds"], "train_cells": r["train_cells"],
            "epochs": r["epochs"], "test": r["test"], "cell_only": r["cell_only"],
            "surround_only": r["surround_only"], "gradcamo": ba.summarise(r["gradcamo"], cutoff),
            "gradcamo_hirescam": ba.summarise(r["gradcamo_hirescam"], cutoff),
            "load_average_done": r["load_average_done"], "intensity_range": r.get("intensity_range"),
            "negative_outside_share_of_all": r.get("negative_outside_share_of_all"),
            "training_history": r.get("history")}


def _pooled(runs: list[dict], base: list[np.ndarray], starts: list[np.ndarray], cutoff: float,
            base_hires: list[np.ndarray] | None = None) -> dict:
    """Seeds pooled: Grad-CAMO, d against λ = 0 (and against the start models when warm), mean ± sd accuracies."""
    pooled = np.concatenate([r["gradcamo"] for r in runs])
    hires = {}
    if runs:  # the same models' HiResCAM maps, d against λ 0's
        h = np.concatenate([r["gradcamo_hirescam"] for r in runs])
        hires = {"hirescam": {"gradcamo": ba.summarise(h, cutoff),
                              "cohens_d_vs_lambda_0": ba.cohens_d(h, np.concatenate(base_hires)) if base_hires
                              else float("nan")}}
    return {"seeds": len(runs), "gradcamo": ba.summarise(pooled, cutoff), **hires,
            "cohens_d_vs_lambda_0": ba.cohens_d(pooled, np.concatenate(base)) if base else float("nan"),
            **({"cohens_d_vs_start": ba.cohens_d(pooled, np.concatenate(starts))} if starts else {}),
            "negative_outside_share_of_all": float(np.mean([r.get("negative_outside_share_of_all", np.nan)
                                                            for r in runs])),
            **{k: {"mean": float(np.mean([r[k]["accuracy"] for r in runs])),
                   "sd": float(np.std([r[k]["accuracy"] for r in runs]))} for k in ("test", "cell_only", "surround_only")}}


def summary(mode: str, s: dict, c: dict, results: dict, uniform: np.ndarray, starts: dict | None = None,
            warm: dict | None = None) -> dict:
    starts = starts or {}
    rows = [_row("start", seed, r, c["cutoff"]) for seed, r in starts.items()]
    rows += [_row(lam, seed, r, c["cutoff"]) for (lam, seed), r in results.items()]
    base = [r["gradcamo"] for (lam, _s), r in results.items() if lam == 0]
    base_hires = [r["gradcamo_hirescam"] for (lam, _s), r in results.items() if lam == 0]
    start_maps = [r["gradcamo"] for r in starts.values()]
    per_lambda = {str(lam): _pooled([r for (l, _s), r in results.items() if l == lam], base, start_maps, c["cutoff"],
                                    base_hires)
                  for lam in sorted({k[0] for k in results})}
    grid = next(iter(results.values()))["grid"] if results else None
    return {"mode": mode, "layer": c["layer"], "layer_grid": grid, "targets": targets(per_lambda),
            "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in {**s, **c}.items()},
            "warm_start": warm,
            "start": _pooled(list(starts.values()), base, [], c["cutoff"], base_hires) if starts else None,
            "uniform_map_reference": {"mean": float(uniform.mean()), "sd": float(uniform.std())},
            "test_cells": int(len(uniform)), "runs": rows, "by_lambda": per_lambda}


def targets(per_lambda: dict) -> dict:
    """Issue #12's targets per λ > 0 against λ = 0: d >= 0.8, cell-only accuracy up, test accuracy down
    by at most 3 points (means over seeds)."""
    base = per_lambda.get("0.0")
    if base is None:
        return {}
    out = {}
    for lam, v in per_lambda.items():
        if lam == "0.0":
            continue
        lost = base["test"]["mean"] - v["test"]["mean"]
        checks = {"d_at_least_0.8": bool(v["cohens_d_vs_lambda_0"] >= 0.8),
                  "cell_only_rises": bool(v["cell_only"]["mean"] > base["cell_only"]["mean"]),
                  "accuracy_lost_at_most_3_points": bool(lost <= 0.03)}
        out[lam] = {**checks, "accuracy_lost": float(lost), "all": all(checks.values())}
    return out


def _hires(v: dict, uniform: float) -> str:
    h = v.get("hirescam")
    if not h:
        return "-"
    return f"{h['gradcamo']['mean']:.3f}, {h['gradcamo']['mean'] / uniform:.2f}, {h['cohens_d_vs_lambda_0']:.2f}"


def _lam(lam: float | str) -> str:
    return lam if isinstance(lam, str) else f"{float(lam):g}"


def markdown(report: dict) -> str:
    st, ref = report["settings"], report["uniform_map_reference"]
    lines = [f"# bench_regularizer ({report['mode']})", "",
             f"- date: {report['date']}; wall time {report['total_seconds']} s; {report['workers']} trainings at once",
             f"- machine: {report['machine']['platform']}, {report['machine']['cpu_count']} CPUs, torch on 1 thread per "
             f"process; load average at start {report['load_average_start']}, at end {report['load_average_end']}",
             f"- plate: synthetic, not mosaic (about 88 % of cells respond: own cell and neighbours both carry the "
             f"compound), {st['compounds']} compounds at {st['doses_um']} µM, granules {st['granules']}, "
             f"{st['wells_per_treatment']} wells x {st['sites_per_well']} sites of {st['site_shape']}; held-out row "
             f"{st['test_rows']}, {report['test_cells']} cells; chance accuracy 0.5",
             f"- training: every training-well cell (at most {st['max_train_cells']}), {st['epochs']} epochs, crop "
             f"{st['crop_size']}, grid {st['input_shape']}, Adam {st['learning_rate']:g}; intensity scaling "
             f"`{st['intensity_scaling']}`; regulariser `CE - λ·mean Grad-CAMO` at `{report['layer']}` (map grid "
             f"{'x'.join(map(str, report['layer_grid'] or []))}; true label's map, evidence "
             f"`{st.get('evidence', 'positive')}`, map `{st.get('cam', 'gradcam')}`); audit: predicted class's map "
             "(Grad-CAM; HiResCAM of the same models beside it)",
             f"- command: `{report['command']}`",
             f"- uniform-map reference (cell's share of its crop): {ref['mean']:.3f} ± {ref['sd']:.3f}"]
    warm = report.get("warm_start")
    if warm:
        lines.append(f"- warm start: each seed's plain model above (row `start`, {st['epochs']} epochs) is fine-tuned "
                     f"for {warm['epochs']} epochs at Adam {warm['learning_rate']:g} with each λ (`init_from`); λ 0 "
                     "is the control fine-tuned alike, so the targets compare against it")
    lines += ["", "## Per λ (seeds pooled for Grad-CAMO; accuracies mean ± sd over seeds)", "",
              "| λ | seeds | Grad-CAMO at " + report["layer"] + " (share >= 0.25) | x uniform | d vs λ = 0 | "
              + ("d vs start | " if warm else "") + "test accuracy | cell only (off-cell signal removed) | "
              "surround only | negative evidence outside the cell (share of the map's mass before ReLU) | "
              "HiResCAM: score, x uniform, d vs λ = 0 |",
              "| --- | --- | --- | --- | --- | " + ("--- | " if warm else "") + "--- | --- | --- | --- | --- |"]
    blocks = ([("start", report["start"])] if warm and report.get("start") else []) + list(report["by_lambda"].items())
    for lam, v in blocks:
        g = v["gradcamo"]
        lines.append(f"| {_lam(lam)} | {v['seeds']} | {g['mean']:.3f} ± {g['sd']:.3f} ({g['share_on_target']:.2f}) | "
                     f"{g['mean'] / ref['mean']:.2f} | {v['cohens_d_vs_lambda_0']:.2f} | "
                     + (f"{v.get('cohens_d_vs_start', 0.0):.2f} | " if warm else "")
                     + f"{v['test']['mean']:.3f} ± {v['test']['sd']:.3f} | {v['cell_only']['mean']:.3f} ± "
                     f"{v['cell_only']['sd']:.3f} | {v['surround_only']['mean']:.3f} ± {v['surround_only']['sd']:.3f} | "
                     f"{v.get('negative_outside_share_of_all', float('nan')):.3f} | {_hires(v, ref['mean'])} |")
    lines += ["", "## Targets against λ = 0 (d >= 0.8, cell only rises, <= 3 points of accuracy lost)", ""]
    for lam, t in report.get("targets", {}).items():
        lines.append(f"- λ {float(lam):g}: d >= 0.8 {'yes' if t['d_at_least_0.8'] else 'no'}; cell only rises "
                     f"{'yes' if t['cell_only_rises'] else 'no'}; accuracy lost {100 * t['accuracy_lost']:.1f} points "
                     f"({'ok' if t['accuracy_lost_at_most_3_points'] else 'over 3'}): "
                     f"**{'met' if t['all'] else 'not met'}**")
    lines += ["", "## Every run", "", "| λ | seed | train cells x epochs | train s | test accuracy | cell only | "
              "surround only | Grad-CAMO | load when done |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["runs"]:
        g = r["gradcamo"]
        lines.append(f"| {_lam(r['lambda'])} | {r['seed']} | {r['train_cells']} x {r['epochs']} | {r['train_seconds']} | "
                     f"{r['test']['accuracy']:.3f} | {r['cell_only']['accuracy']:.3f} | "
                     f"{r['surround_only']['accuracy']:.3f} | {g['mean']:.3f} ± {g['sd']:.3f} | "
                     f"{r['load_average_done']} |")
    histories = [r for r in report["runs"] if r.get("training_history")]
    if histories:
        lines += ["", "## Training, per epoch (train accuracy / train Grad-CAMO of the true label at the layer / "
                  "validation accuracy)", "", "| λ | seed | " + " | ".join(
                      f"epoch {h['epoch']}" for h in histories[0]["training_history"]) + " |",
                  "| --- | --- | " + " | ".join("---" for _h in histories[0]["training_history"]) + " |"]
        for r in histories:
            cells = [f"{h['train_accuracy']:.3f} / " + (f"{h['train_gradcamo']:.3f}" if h.get("train_gradcamo")
                                                         else "-") + f" / {h.get('val_accuracy', float('nan')):.3f}"
                     for h in r["training_history"]]
            lines.append(f"| {_lam(r['lambda'])} | {r['seed']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from machine_info import finish_record, run_record, write_record

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, λ 0 and 10, tiny (runs in a test)")
    parser.add_argument("--lambdas", type=float, nargs="+", default=None, help="override the mode's λ values")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="override the mode's seeds")
    parser.add_argument("--scaling", choices=("plate", "crop"), default="plate",
                        help="intensity scaling of training and audit (default plate: per-crop min-max leaks "
                             "a neighbour's phenotype into every voxel)")
    parser.add_argument("--epochs", type=int, default=None, help="override the mode's epochs")
    parser.add_argument("--max-train-cells", type=int, default=None, help="override the mode's training cells")
    parser.add_argument("--sites-per-well", type=int, default=None, help="override the mode's sites per well")
    parser.add_argument("--audit-bundles", nargs="+", default=None, metavar="DIR",
                        help="only audit these saved bundles (folders lam<λ>-<seed>), one process each")
    parser.add_argument("--max-test-cells", type=int, default=None, help="override the mode's held-out cells (x 2)")
    parser.add_argument("--workers", type=int, default=None, help="trainings at once (default: cores, at most 2)")
    parser.add_argument("--layer", default=LAYER, help=f"layer regularised and audited (default {LAYER})")
    parser.add_argument("--augment", choices=AUGMENTATION_NAMES, default=None,
                        help=f"training augmentation (default bench_attention's, {ba.COMMON['augmentation']})")
    parser.add_argument("--warm-start", type=int, default=None, metavar="EPOCHS",
                        help="train a plain model per seed first, then fine-tune it this many epochs with each λ "
                        "(0 included, the control)")
    parser.add_argument("--warm-lr", type=float, default=3e-4, help="Adam learning rate of the fine-tunes")
    parser.add_argument("--evidence", choices=("positive", "both"), default="positive",
                        help="map the regulariser scores: Grad-CAM (positive, the paper's) or |map| before its ReLU")
    parser.add_argument("--cam", choices=("gradcam", "hirescam"), default="gradcam",
                        help="map the regulariser scores: Grad-CAM (the paper's) or HiResCAM (gradient per voxel)")
    parser.add_argument("--tag", default="", help="suffix of the output file names")
    parser.add_argument("--out", default=str(HERE / "results"), help="folder for the JSON and Markdown")
    args = parser.parse_args(argv)
    run_options = {"layer": args.layer, "evidence": args.evidence, "cam": args.cam,
                   **({"augmentation": args.augment} if args.augment else {})}
    mode = "quick" if args.quick else "full"
    if args.lambdas:
        SETTINGS[mode]["lambdas"] = tuple(args.lambdas)
    if args.seeds:
        SETTINGS[mode]["seeds"] = tuple(args.seeds)
    for key in ("epochs", "max_train_cells", "sites_per_well", "max_test_cells"):
        if getattr(args, key) is not None:
            SETTINGS[mode][key] = getattr(args, key)
    workers = args.workers or min(2, os.cpu_count() or 1)
    stem = "bench_regularizer" + ("_quick" if args.quick else "") + (f"_{args.tag}" if args.tag else "")
    report = run_record("bench_regularizer.py", argv, workers=workers)
    t0 = time.perf_counter()

    def write(partial: dict) -> None:
        write_record(args.out, stem, finish_record(report, t0, **partial), markdown(report))

    if args.audit_bundles:
        write(run_saved(mode, args.audit_bundles, write, args.scaling, run_options))
    else:
        warm = {"epochs": args.warm_start, "learning_rate": args.warm_lr} if args.warm_start else None
        write(run(mode, workers, write, args.scaling, run_options, warm))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
