"""The machine a benchmark ran on and the head and files of its JSON and Markdown reports (shared by the bench_*
and diagnose_* scripts)."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any


def machine() -> dict:
    """Platform, Python, CPU count, processor, torch threads and the GPU name (None without CUDA)."""
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "processor": platform.processor() or platform.machine()}
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:  # pragma: no cover
        info["torch_threads"], info["gpu"] = None, None
    return info


def load_average() -> list[float]:
    """The 1, 5 and 15 min load averages, rounded (the cores are shared: every report records them)."""
    return [round(v, 2) for v in os.getloadavg()]


def run_record(script: str, argv: list[str] | None, **fields: Any) -> dict:
    """The head of a benchmark's JSON report: UTC date, :func:`machine`, load average at the start and the
    command as typed (``argv`` None: this process's)."""
    args = argv if argv is not None else sys.argv[1:]
    return {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
            "load_average_start": load_average(), "command": f"python benchmarks/{script} " + " ".join(args),
            **fields}


def finish_record(report: dict, started: float, **fields: Any) -> dict:
    """Stamp ``report`` with its wall time since ``started`` (``time.perf_counter()``, s) and the load at the end."""
    report.update(fields, total_seconds=round(time.perf_counter() - started, 1), load_average_end=load_average())
    return report


def write_record(out: str | Path, stem: str, report: dict, markdown: str) -> None:
    """``<out>/<stem>.json`` and ``<out>/<stem>.md`` (the folder made when missing)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2, default=list) + "\n")
    (out / f"{stem}.md").write_text(markdown)
