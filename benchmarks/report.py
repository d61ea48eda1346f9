"""One HTML page of every committed benchmark: ``python -m benchmarks.report`` (or ``gradcamo-dask bench-report``).

Reads ``benchmarks/results/*.json`` and draws, each figure labelled with the machine,
the date and whether its figures were measured or simulated:

* one-pass overhead (``explain``) against its peers (``bench_explain*``);
* throughput and efficiency against workers (``bench_plate``, ``bench_fleet*`` when present);
* memory against plate size and site size (``bench_plate``, ``bench_scale*``) and planning
  time and tasks against sites (``bench_scale*``);
* segmentation AP (``bench_segment*``);
* ground-truth attention: Grad-CAMO of clean, confounded and regularised models beside
  the uniform-map reference (``bench_confounder*``), and any ``bench_groundtruth*`` /
  ``bench_attention*`` results.

Files it has no figure for are listed with their date and machine. The page is
self-contained (figures embedded as PNG).
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import html
import io
import json
import sys
from pathlib import Path
from typing import Any, Callable

RESULTS = Path(__file__).resolve().parent / "results"

# ------------------------------------------------------------------ labels


def machine_label(data: dict) -> str:
    """``<cpus> CPUs, <gpu or no GPU>, <platform>`` from a benchmark JSON's ``machine``."""
    m = data.get("machine") or {}
    cpus = m.get("cpus") or m.get("cpu_count") or "?"
    gpu = m.get("gpu") or "no GPU"
    platform = str(m.get("platform", "?")).split("-with-")[0]
    return f"{cpus} CPUs, {gpu}, {platform}"


def run_date(data: dict) -> str:
    """The run's date (YYYY-MM-DD) wherever the benchmark put it."""
    m = data.get("machine") or {}
    for value in (data.get("date"), m.get("date"), m.get("date_utc"), data.get("date_utc")):
        if value:
            return str(value)[:10]
    return "undated"


def kind(data: dict, name: str) -> str:
    """``"simulated"`` when the file says so (or is a simulated fleet), else ``"measured"``."""
    if data.get("simulated") is True or data.get("measured") is False or "fleet" in name and not data.get("measured"):
        return "simulated"
    return "measured"


def _stamp(fig: Any, sources: list[tuple[str, dict]]) -> None:
    """Write the label line (kind, machine, date, file) under a figure."""
    text = "; ".join(f"{kind(d, n)}: {n}, {machine_label(d)}, {run_date(d)}" for n, d in sources)
    fig.text(0.01, 0.005, text, fontsize=7, color="#444", ha="left", va="bottom", wrap=True)
    fig.subplots_adjust(bottom=0.2)


def _figure(n_axes: int = 1, width: float = 6.0) -> tuple[Any, list]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, n_axes, figsize=(width * n_axes if n_axes > 1 else width, 3.8), squeeze=False)
    return fig, list(axes[0])


# ------------------------------------------------------------------ figures


def overhead_figure(files: dict[str, dict]) -> Any:
    """Seconds per batch relative to features alone, per method and grid (``bench_explain*``)."""
    sources = [(n, d) for n, d in files.items() if n.startswith("bench_explain") and d.get("configs")]
    if not sources:
        return None
    fig, axes = _figure(len(sources))
    for ax, (name, data) in zip(axes, sources):
        labels, values = [], []
        for config in data["configs"]:
            for row in config["rows"]:
                if "vs_features" in row:
                    labels.append(f"{config['config']}\n{row['method']}")
                    values.append(row["vs_features"])
        ax.barh(range(len(values)), values, color=["#4c72b0" if "explain" in v else "#999" for v in labels])
        ax.set_yticks(range(len(values)), labels, fontsize=6)
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_xlabel("time / features-only time")
        ax.set_title(f"one-pass overhead vs peers ({name})", fontsize=9)
        ax.invert_yaxis()
    _stamp(fig, sources)
    return fig


def _worker_rows(data: dict) -> list[dict]:
    """Rows with a worker (or GPU) count and a throughput, wherever a benchmark keeps them."""
    rows = []
    for value in data.values():
        if isinstance(value, list):
            for row in value:
                if isinstance(row, dict) and ("workers" in row or "gpus" in row) and "cells_per_s" in row:
                    rows.append(row)
    return rows


def workers_figure(files: dict[str, dict]) -> Any:
    """Cells/s and parallel efficiency against workers (``bench_plate``, ``bench_fleet*``)."""
    sources = [(n, d) for n, d in files.items() if n in ("bench_plate", "bench_plate_cuda") or n.startswith("bench_fleet")]
    sources = [(n, d) for n, d in sources if _worker_rows(d)]
    if not sources:
        return None
    fig, (ax_rate, ax_eff) = _figure(2, 4.5)
    for name, data in sources:
        by_n: dict[int, float] = {}
        for row in _worker_rows(data):
            n = int(row.get("gpus", row.get("workers")))
            by_n[n] = max(by_n.get(n, 0.0), float(row["cells_per_s"]))
        ns = sorted(by_n)
        label = f"{name} ({kind(data, name)})"
        ax_rate.plot(ns, [by_n[n] for n in ns], "o-", label=label)
        base = by_n[ns[0]] / ns[0]
        ax_eff.plot(ns, [by_n[n] / (n * base) for n in ns], "o-", label=label)
    ax_rate.set(xlabel="workers (GPUs)", ylabel="cells/s", title="throughput vs workers")
    ax_eff.set(xlabel="workers (GPUs)", ylabel="efficiency (rate / (n x rate at fewest))", ylim=(0, 1.15),
               title="efficiency vs workers")
    ax_eff.axhline(0.9, color="k", ls=":", lw=0.8)
    for ax in (ax_rate, ax_eff):
        ax.legend(fontsize=7)
    _stamp(fig, sources)
    return fig


def plate_memory_figure(files: dict[str, dict]) -> Any:
    """Peak worker RSS against plate size (``bench_plate*``)."""
    sources = [(n, d) for n, d in files.items() if n.startswith("bench_plate") and d.get("by_plate_size")]
    if not sources:
        return None
    fig, (ax,) = _figure()
    for name, data in sources:
        rows = data["by_plate_size"]
        ax.plot([r["sites"] for r in rows], [r["peak_worker_rss_mib"] for r in rows], "o-", label=name)
    ax.set(xscale="log", xlabel="sites in the plate", ylabel="peak worker RSS (MiB)", title="memory vs plate size")
    ax.legend(fontsize=7)
    _stamp(fig, sources)
    return fig


def scale_figure(result: dict, name: str = "bench_scale") -> Any:
    """Planning time and tasks against sites, and peak memory per site against site width (``bench_scale``)."""
    panels = [p for p in ("planning", "memory") if result.get(p)]
    if not panels:
        return None
    fig, axes = _figure(len(panels), 4.8)
    for ax, panel in zip(axes, panels):
        rows = [r for r in result[panel] if "failed" not in r]
        if panel == "planning":
            sites = [r["sites"] for r in rows]
            ax.plot(sites, [r["planning_s"] for r in rows], "o-", label="planning (score + write graphs), wall s")
            if all("planning_cpu_s" in r for r in rows):
                ax.plot(sites, [r["planning_cpu_s"] for r in rows], "o-", color="#55a868", label="planning, CPU s")
            ax.plot(sites, [r["cell_table_geometry_s"] for r in rows], "s--", label="cell table from geometry, s")
            ax.axhline(30, color="k", ls=":", lw=0.8, label="target 30 s")
            ax.set(xlabel="sites", ylabel="seconds", title="planning a virtual plate")
            twin = ax.twinx()
            twin.plot(sites, [r["write_tasks"] for r in rows], "^:", color="#c44e52", label="tasks")
            twin.set_ylabel("tasks in the write graph", color="#c44e52")
        else:
            widths = [r["width"] for r in rows]
            ax.plot(widths, [r["raw_site_mib"] for r in rows], "o--", color="#999", label="raw site (image + labels)")
            ax.plot(widths, [3 * r["raw_site_mib"] for r in rows], ":", color="k", label="3 x raw (target)")
            ax.plot(widths, [r["site_peak_mib"] for r in rows], "o-", label="peak worker RSS above baseline")
            ax.plot(widths, [r["float32_crops_mib"] for r in rows], "s-.", label="float32 crops of all cells")
            ax.set(xlabel="site width (pixels)", ylabel="MiB", title="memory per site vs site size", yscale="log")
        ax.legend(fontsize=7, loc="upper left")
    _stamp(fig, [(name, result)])
    return fig


def segmentation_figure(files: dict[str, dict]) -> Any:
    """AP at IoU 0.5 per segmentation method, all cells and interior cells (``bench_segment*``)."""
    sources = [(n, d) for n, d in files.items() if n.startswith("bench_segment") and d.get("results")]
    if not sources:
        return None
    fig, axes = _figure(len(sources), 4.5)
    for ax, (name, data) in zip(axes, sources):
        methods = [r["method"] for r in data["results"]]
        for k, part in enumerate(("all_cells", "interior_cells")):
            values = [r.get(part, {}).get("ap50", float("nan")) for r in data["results"]]
            ax.bar([i + 0.4 * k for i in range(len(methods))], values, width=0.4, label=part.replace("_", " "))
        ax.set_xticks([i + 0.2 for i in range(len(methods))], methods)
        ax.set(ylim=(0, 1), ylabel="AP50", title=f"segmentation AP ({name})")
        ax.legend(fontsize=7)
    _stamp(fig, sources)
    return fig


def attention_figure(files: dict[str, dict]) -> Any:
    """Test-set Grad-CAMO per model beside the uniform-map reference (``bench_confounder*``)."""
    sources = [(n, d) for n, d in files.items()
               if n.startswith("bench_confounder") and isinstance(d.get("results"), dict) and "calibration" not in n]
    if not sources:
        return None
    fig, axes = _figure(len(sources), 3.6)
    for ax, (name, data) in zip(axes, sources):
        runs = [(k, v) for k, v in data["results"].items() if isinstance(v, dict) and "test_gradcamo_mean" in v]
        ax.bar(range(len(runs)), [v["test_gradcamo_mean"] for _, v in runs],
               yerr=[v.get("test_gradcamo_sd", 0) for _, v in runs], color="#4c72b0", capsize=3)
        ref = data.get("uniform_map_reference", {}).get("mean")
        if ref is not None:
            ax.axhline(ref, color="#c44e52", ls="--", lw=1, label="uniform map (chance)")
            ax.legend(fontsize=7)
        ax.set_xticks(range(len(runs)), [f"{k}\nacc {v.get('test_accuracy', float('nan')):.2f}" for k, v in runs],
                      fontsize=6)
        ax.set(ylabel="test Grad-CAMO (mean ± sd)", title=name, ylim=(0, None))
    _stamp(fig, sources)
    return fig


def groundtruth_figure(files: dict[str, dict]) -> Any:
    """Numbers of ``bench_groundtruth*`` / ``bench_attention*`` files, one bar per scalar result."""
    sources = [(n, d) for n, d in files.items() if n.startswith(("bench_groundtruth", "bench_attention"))]
    if not sources:
        return None
    fig, axes = _figure(len(sources), 4.5)
    for ax, (name, data) in zip(axes, sources):
        scalars = _scalars(data.get("results", data))
        ax.barh(range(len(scalars)), list(scalars.values()))
        ax.set_yticks(range(len(scalars)), list(scalars), fontsize=6)
        ax.set_title(f"ground-truth attention ({name})", fontsize=9)
        ax.invert_yaxis()
    _stamp(fig, sources)
    return fig


def _scalars(data: Any, prefix: str = "", limit: int = 24) -> dict[str, float]:
    out: dict[str, float] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            if isinstance(value, bool):
                continue
            if isinstance(value, (int, float)):
                out[f"{prefix}{key}"] = float(value)
            elif isinstance(value, dict):
                out.update(_scalars(value, f"{prefix}{key}.", limit))
            if len(out) >= limit:
                break
    return dict(list(out.items())[:limit])


# ------------------------------------------------------------------ page


def load_results(folder: Path) -> dict[str, dict]:
    """Every ``*.json`` in ``folder`` by file stem (files that are not JSON objects are skipped)."""
    files = {}
    for path in sorted(Path(folder).glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict):
            files[path.stem] = data
    return files


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


SECTIONS: list[tuple[str, Callable[[dict], Any]]] = [
    ("One-pass overhead vs peers", overhead_figure),
    ("Throughput and efficiency vs workers", workers_figure),
    ("Memory vs plate size", plate_memory_figure),
    ("Segmentation AP", segmentation_figure),
    ("Ground-truth attention", attention_figure),
    ("Ground-truth attention (other benchmarks)", groundtruth_figure),
]


def build_report(results: Path = RESULTS, out: Path | None = None) -> Path:
    """Write the HTML page built from ``results/*.json``; returns its path (default ``results/report.html``)."""
    results = Path(results)
    out = Path(out) if out is not None else results / "report.html"
    files = load_results(results)
    if not files:
        raise FileNotFoundError(f"no benchmark JSON files in {results}; run a benchmark (python -m "
                                f"benchmarks.bench_scale --quick) or pass the results folder")
    parts, used = [], set()
    sections = list(SECTIONS)
    for name in sorted(n for n in files if n.startswith("bench_scale")):
        sections.insert(3, (f"Plates at real size ({name})", lambda f, n=name: scale_figure(f[n], n)))
    for title, make in sections:
        fig = make(files)
        if fig is None:
            continue
        for name in files:
            if name in fig.texts[-1].get_text():
                used.add(name)
        parts.append(f"<h2>{html.escape(title)}</h2>\n<img alt=\"{html.escape(title)}\" "
                     f"src=\"data:image/png;base64,{_png(fig)}\">")
    rows = "".join(f"<tr><td>{html.escape(n)}</td><td>{html.escape(run_date(d))}</td><td>{html.escape(kind(d, n))}"
                   f"</td><td>{html.escape(machine_label(d))}</td><td>{'figure' if n in used else 'table only'}</td></tr>"
                   for n, d in files.items())
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    page = (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>gradcamo-dask benchmarks</title>"
            f"<style>body{{font-family:sans-serif;max-width:1100px;margin:auto}}img{{max-width:100%}}"
            f"td,th{{padding:2px 8px;text-align:left}}</style></head><body>"
            f"<h1>gradcamo-dask benchmarks</h1><p>Built {now} from {len(files)} files in "
            f"<code>benchmarks/results/</code> by <code>python -m benchmarks.report</code>. Under each figure: "
            f"measured or simulated, the file, the machine and the date of the run.</p>"
            + "\n".join(parts)
            + "<h2>All result files</h2><table><tr><th>file</th><th>date</th><th>kind</th><th>machine</th>"
            f"<th>in a figure</th></tr>{rows}</table></body></html>\n")
    out.write_text(page)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="one HTML page of every committed benchmark result")
    parser.add_argument("--results", default=str(RESULTS), help="folder of benchmark JSON files")
    parser.add_argument("--out", default=None, help="HTML file to write (default: RESULTS/report.html)")
    args = parser.parse_args(argv)
    print(build_report(Path(args.results), Path(args.out) if args.out else None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
