"""The machine a benchmark ran on, for its JSON and Markdown reports (shared by the bench_* scripts)."""

from __future__ import annotations

import os
import platform


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
