"""The transformer row of the ground-truth attention benchmark (issue #17).

:func:`vit_row` trains a small 3D ViT (MONAI's, :func:`gradcamo_dask.engine.vit.vit`) on the mosaic plate of
``bench_attention.py``, with its recipe (crop, model grid, epochs, training cells, learning rate, seeds) and on its
held-out cells, once on the responders (**in-cell**: the treatment is readable only inside the cell) and once on
the bystanders (**off-cell**: only in the neighbours). Each model is audited on its own held-out population, for
each attention source (CLS attention, rollout, Grad-CAM on patch tokens): Grad-CAMO of the predicted class,
mean ± sd and share >= the cut-off, beside the uniform-map reference (the cells' share of their crops); test
accuracy beside chance (the largest class share); Cohen's d between the two models per source.

``bench_attention.py`` hands itself in (``vit_row(bench_attention, "quick")``): this module reads its settings
(``COMMON``, ``SETTINGS``, command-line overrides included) and its plate and cell helpers when called, and
imports nothing from it, so there is no import cycle and the row follows any change of the plate or of the cells.
``bench_attention.py --quick`` adds the row to its report; on its own, quick or with the full settings::

    python benchmarks/attention_vit.py [--full] [--seeds 0 1 2]   # results/attention_vit[_full].json and .md
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

SOURCES = ("cls_attention", "rollout", "gradcam_tokens")
# A ViT-Tiny-like network, narrower and shallower (CPU): at the benchmark's 12 x 48 x 48 grid, patches of
# 4 x 8 x 8 give a 3 x 6 x 6 patch grid (108 tokens), fine enough in y and x to localise a cell (>= 3 x 3).
VIT = dict(architecture="vit", patch_size=[2, 8, 8], hidden_size=96, mlp_dim=192, num_layers=4, num_heads=4)


def train_vit(bench: ModuleType, mode: str, seed: int, name: str, plate, truth, out: Path) -> tuple[Path, float]:
    """Train the ViT on one population (``name``, a key of ``bench.MODELS``); returns its bundle and seconds.

    As ``bench_attention.train_model``: train() gets every training-well cell and only the first site of each
    test well (its own test figure is provenance; the audit is the benchmark's).
    """
    from gradcamo_dask.io.synthetic import population_labels
    from gradcamo_dask.jobs.recipe import Recipe, Split
    from gradcamo_dask.jobs.train import train

    c, s = bench.COMMON, bench.SETTINGS[mode]
    test_site = int(plate.image["site"].values[0])
    train_truth = truth[~truth["well"].str[0].isin(c["test_rows"]) | (truth["site"] == test_site)]
    recipe = Recipe(crop_size=c["crop_size"], input_shape=c["input_shape"], epochs=s["epochs"], seed=seed,
                    learning_rate=c["learning_rate"], patience=None, layers=list(SOURCES), augmentation=None,
                    model_options=dict(VIT),
                    split=Split(test_rows=c["test_rows"], max_train_cells=s["max_train_cells"]))
    t0 = time.perf_counter()
    bundle = train(plate.image, population_labels(plate.labels, train_truth, bench.MODELS[name]), recipe, out=out,
                   platemap=plate.platemap, progress=False)
    return Path(bundle), time.perf_counter() - t0


def attention_scores(bundle_path: Path, x01, masks, batch_size: int = 16) -> dict:
    """Grad-CAMO of the predicted class per source, the predictions and the patch grid of one ViT bundle.

    ``x01``: crops rescaled to [0, 1] per crop and channel (``bench.test_cells``); they are standardised with the
    bundle's statistics by the package's own :func:`~gradcamo_dask.normalize.normalize_crops`, as in training.
    """
    from gradcamo_dask.engine.bundles import open_bundle
    from gradcamo_dask.engine.explain import explain
    from gradcamo_dask.normalize import normalize_crops

    bundle = open_bundle(bundle_path)
    x = normalize_crops(np.asarray(x01, dtype=np.float32), bundle.config.normalization, rescaled=True)
    out = explain(bundle.model.eval(), x, np.asarray(masks), layers=list(SOURCES), batch_size=batch_size,
                  input_shape=tuple(bundle.config.input_shape))
    return {"gradcamo": {k: np.asarray(out.gradcamo[k], dtype=np.float64) for k in SOURCES},
            "predicted": np.asarray(out.predicted), "classes": list(bundle.config.classes),
            "grid": [int(n) for n in out.grids[SOURCES[0]]]}


def vit_row(bench: ModuleType, mode: str = "quick") -> dict:
    """Train and audit the in-cell and off-cell ViTs for every seed of ``bench.SETTINGS[mode]``.

    Returns ``{"architecture", "patch_grid", "localises", "seeds", "models": {model: {"n", "uniform",
    "accuracy", "accuracy_chance", source: {n, mean, sd, share_on_target, n_undefined}}}, "cohens_d":
    {source: d}, "cohens_d_over_uniform": {source: d}, "per_seed": [...], "total_seconds"}``; scores of the
    seeds pooled, accuracy their mean.
    """
    t_start = time.perf_counter()
    c, s = bench.COMMON, bench.SETTINGS[mode]
    plate, truth = bench.mosaic_plate(c, s)
    table, x01, masks = bench.test_cells(plate, truth, s["max_test_cells"], c["plate_seed"])
    uniform = masks.float().mean(dim=tuple(range(1, masks.ndim))).numpy().astype(np.float64)
    pops = {name: (table["responder"] == flag).to_numpy() for name, flag in bench.MODELS.items()}
    pooled = {name: {k: [] for k in SOURCES} for name in bench.MODELS}
    per_seed, grid = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for seed in s["seeds"]:
            for name in bench.MODELS:
                path, train_s = train_vit(bench, mode, seed, name, plate, truth, Path(tmp) / f"{name}-{seed}")
                scores = attention_scores(path, x01, masks)
                grid, own = scores["grid"], pops[name]
                y = np.array([scores["classes"].index(str(t)) for t in table["treatment"]])
                for k in SOURCES:
                    pooled[name][k].append(scores["gradcamo"][k][own])
                per_seed.append({"seed": int(seed), "model": name, "train_seconds": round(train_s, 1),
                                 "accuracy": float((scores["predicted"][own] == y[own]).mean()),
                                 "accuracy_chance": float(np.bincount(y[own]).max() / own.sum()),
                                 **{k: float(np.nanmean(scores["gradcamo"][k][own])) for k in SOURCES}})
    models = {}
    for name, own in pops.items():
        runs = [r for r in per_seed if r["model"] == name]
        models[name] = {"n": int(own.sum()),
                        "uniform": {"mean": float(uniform[own].mean()), "sd": float(uniform[own].std())},
                        "accuracy": float(np.mean([r["accuracy"] for r in runs])),
                        "accuracy_chance": runs[0]["accuracy_chance"],
                        **{k: bench.summarise(np.concatenate(pooled[name][k]), c["cutoff"]) for k in SOURCES}}
    joined = {name: {k: np.concatenate(v) for k, v in per.items()} for name, per in pooled.items()}
    # responders are larger than bystanders (a larger uniform share): d of score / uniform takes cell size out
    size = {name: np.tile(uniform[own], len(s["seeds"])) for name, own in pops.items()}
    return {"architecture": dict(VIT), "patch_grid": grid, "localises": bool(grid[-2] >= 3 and grid[-1] >= 3),
            "seeds": [int(v) for v in s["seeds"]], "models": models,
            "cohens_d": {k: bench.cohens_d(joined["in_cell"][k], joined["off_cell"][k]) for k in SOURCES},
            "cohens_d_over_uniform": {k: bench.cohens_d(joined["in_cell"][k] / size["in_cell"],
                                                         joined["off_cell"][k] / size["off_cell"]) for k in SOURCES},
            "per_seed": per_seed, "total_seconds": round(time.perf_counter() - t_start, 1)}


def markdown_lines(row: dict) -> list[str]:
    """The row as a report section: one line per attention source, then the references and accuracy."""
    m, a = row["models"], row["architecture"]

    def cell(v: dict) -> str:
        return f"{v['mean']:.3f} ± {v['sd']:.3f} ({v['share_on_target']:.2f})"

    lines = ["", "## Transformer row: a 3D ViT's attention as the map (issue #17)", "",
             f"MONAI ViT, patch {'x'.join(map(str, a['patch_size']))} -> patch grid "
             f"{'x'.join(map(str, row['patch_grid']))} ({'localises' if row['localises'] else 'cannot localise'}), "
             f"{a['hidden_size']} wide, {a['num_layers']} blocks, {a['num_heads']} heads; same plate, recipe and "
             f"held-out cells as above; seeds {row['seeds']} pooled; {row['total_seconds']} s. Grad-CAMO of the "
             "predicted class, mean ± sd (share >= 0.25).", "",
             "| map | in-cell model | off-cell model | Cohen's d | d of score / uniform | in-cell / uniform | "
             "off-cell / uniform |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for k in SOURCES:
        lines.append(f"| {k} | {cell(m['in_cell'][k])} | {cell(m['off_cell'][k])} | {row['cohens_d'][k]:.2f} | "
                     f"{row['cohens_d_over_uniform'][k]:.2f} | "
                     f"{m['in_cell'][k]['mean'] / m['in_cell']['uniform']['mean']:.2f} | "
                     f"{m['off_cell'][k]['mean'] / m['off_cell']['uniform']['mean']:.2f} |")
    lines.append(f"| uniform map (reference) | {m['in_cell']['uniform']['mean']:.3f} ± "
                 f"{m['in_cell']['uniform']['sd']:.3f} | {m['off_cell']['uniform']['mean']:.3f} ± "
                 f"{m['off_cell']['uniform']['sd']:.3f} | | | 1.00 | 1.00 |")
    lines.append(f"| test accuracy (chance) | {m['in_cell']['accuracy']:.3f} ({m['in_cell']['accuracy_chance']:.2f}) | "
                 f"{m['off_cell']['accuracy']:.3f} ({m['off_cell']['accuracy_chance']:.2f}) | | | | |")
    lines.append(f"| held-out cells | {m['in_cell']['n']} | {m['off_cell']['n']} | | | | |")
    return lines


def main(argv: list[str] | None = None) -> int:
    """``python benchmarks/attention_vit.py [--full]``: the row alone, written to ``attention_vit[_full].json/.md``."""
    import argparse

    import torch

    sys.path.insert(0, str(HERE))
    import bench_attention
    from machine_info import load_average, run_record, write_record

    parser = argparse.ArgumentParser(description="the transformer row of bench_attention on its own")
    parser.add_argument("--full", action="store_true", help="bench_attention's full settings (default: quick)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="override the mode's seeds")
    parser.add_argument("--out", default=str(HERE / "results"), help="folder for the JSON and Markdown")
    args = parser.parse_args(argv)
    mode = "full" if args.full else "quick"
    if args.seeds is not None:
        bench_attention.SETTINGS[mode]["seeds"] = tuple(args.seeds)
    torch.set_num_threads(1)  # as bench_attention: one thread on the shared cores
    report = run_record("attention_vit.py", argv, mode=mode, settings={
        k: list(v) if isinstance(v, tuple) else v
        for k, v in {**bench_attention.SETTINGS[mode], **bench_attention.COMMON}.items()})
    start = report["load_average_start"]
    report["transformer"] = vit_row(bench_attention, mode)
    report["load_average_end"] = load_average()
    st, m = report["settings"], report["machine"]
    head = [f"# attention_vit ({mode}): bench_attention's transformer row on its own", "",
            f"- date: {report['date']}; command `{report['command']}`",
            f"- machine: {m['platform']}, {m['cpu_count']} CPUs, torch on 1 thread; load average (1, 5, 15 min) at "
            f"start {start}, at end {report['load_average_end']} (shared cores)",
            f"- plate: bench_attention's mosaic plate, {st['sites_per_well']} sites per well; {st['epochs']} epochs, "
            f"at most {st['max_train_cells']} training cells, at most {st['max_test_cells']} held-out cells"]
    write_record(args.out, "attention_vit" + ("_full" if args.full else ""), report,
                 "\n".join(head + markdown_lines(report["transformer"])) + "\n")
    print("\n".join(head + markdown_lines(report["transformer"])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
