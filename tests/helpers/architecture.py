"""The package's stages and their import graph, drawn as the README's "Architecture" picture.

Run ``python -m tests.helpers.architecture`` in the repository root to print the
picture; ``tests/test_architecture.py`` checks that the README holds exactly this
output and that imports go one way, down the stages (lazy imports inside
functions included).
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

PACKAGE = "gradcamo_dask"
#: Stages from the bottom (read first) to the top; a stage may import only itself and those below.
STAGES = ("io", "segment", "cells", "engine", "profiles", "jobs", "cli")
#: Modules every stage may use; they import no stage.
SHARED = ("arrays", "crop_geometry", "errors", "normalize", "provenance")
ROLES = {
    "io": "plates in and out: OME-Zarr HCS, plain Zarr, TIFF, platemaps, synthetic plates",
    "segment": "segmenters (Cellpose, watershed baseline) and tiling of large sites",
    "cells": "cell table, crops and central masks, per-site graph helper",
    "engine": "models, layer lookup, bundles, explain (one pass), Grad-CAMO, regulariser, augmentations",
    "profiles": "the profiles store, QC, whitening, classic features, export, report",
    "jobs": "scoring a plate, training, layer sweep, clusters, demo",
    "cli": "the `gradcamo-dask` command: builds option objects and calls jobs",
}
FLOW = "plate -> segment -> cells -> engine -> profiles -> report"


def stage_of(module: str) -> str:
    """``gradcamo_dask.engine.explain`` -> ``engine``; shared modules and the package -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in STAGES else ""


def parse_module(path: Path) -> ast.Module:
    """``ast.parse`` of a module, tried up to 3 times on SystemError: CPython 3.11.7 (CI's Python) keeps the AST
    builder's depth counter in shared state (python/cpython#106905), so a Dask thread left over from an earlier test
    that formats a traceback (3.11's traceback module calls ``ast.parse``) at the same moment can fail a pure parse."""
    text = path.read_text()
    for _attempt in range(2):
        try:
            return ast.parse(text)
        except SystemError:
            continue
    return ast.parse(text)  # the third try: an error that lasts surfaces


def _imported(path: Path, module: str) -> set[str]:
    tree = parse_module(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith(PACKAGE))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            if base.startswith(PACKAGE):
                out.add(base)
                out.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
    return out


def module_imports(root: Path) -> dict[str, set[str]]:
    """Each module of the package (the package's own ``__init__`` left out) -> the package modules it imports."""
    graph = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        if module != PACKAGE:
            graph[module] = _imported(path, module)
    return graph


def stage_imports(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Each stage -> the other stages its modules import."""
    out: dict[str, set[str]] = {s: set() for s in STAGES}
    for module, targets in graph.items():
        here = stage_of(module)
        for target in targets:
            there = stage_of(target)
            if here and there and there != here:
                out[here].add(there)
    return out


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """``"a imports b"`` for every import that goes up the stages (or from a shared module into a stage)."""
    bad = []
    for module, targets in sorted(graph.items()):
        here = stage_of(module)
        for target in sorted(targets):
            there = stage_of(target)
            if there and (not here or STAGES.index(there) > STAGES.index(here)):
                bad.append(f"{module} imports {target}")
    return bad


def _modules_of(graph: dict[str, set[str]], stage: str) -> list[str]:
    names = [m.split(".")[-1] for m in graph if stage_of(m) == stage and m.count(".") == 2]
    return sorted(n for n in names if n != "__init__")


def picture(root: Path) -> str:
    """The ASCII picture: stages top to bottom, their modules, and which stages each imports."""
    graph = module_imports(root)
    uses = stage_imports(graph)
    lines = [f"data flow: {FLOW}", "each stage imports only the stages below it", ""]
    for stage in reversed(STAGES):
        is_package = (root / PACKAGE / stage).is_dir()
        name = f"{stage}/" if is_package else f"{stage}.py"
        lines.append(f"+-- {name:<10} {ROLES[stage]}")
        if is_package:
            wrapped = textwrap.wrap(", ".join(_modules_of(graph, stage)), 96)
            lines.extend(f"|   {'':<10} {w}" for w in wrapped)
        below = [s for s in STAGES if s in uses[stage]]
        lines.append(f"|   {'':<10} imports: {', '.join(below) if below else '-'}")
        if stage != STAGES[0]:
            lines.append("|")
    lines.append("")
    lines.append(f"shared by every stage: {', '.join(m + '.py' for m in SHARED)}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(picture(Path.cwd()), end="")
