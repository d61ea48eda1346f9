"""Every code block of README.md and deploy/README.md runs as written, in order, in a fresh folder.

Blocks follow one another like a user's session: the first README block that makes files (the "your own
plate" example) writes the plate, labels, model and profiles the later ones read. Each Python block runs
as its own script (as a user saving it would), each bash block in bash with the checkout's package and
console script first on the path. A block preceded by ``<!-- skip: reason -->`` (GPU, SLURM, Docker,
multi-host, internet) is skipped with that reason.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.paths import REPO

FENCE = re.compile(r"^```(bash|python)\s*$")
SKIP = re.compile(r"^<!--\s*skip:\s*(.+?)\s*-->\s*$")
SNIPPET = re.compile(r"^<!--\s*snippet:\s*(\w+)\s*-->\s*$")  # run by tests/profiles/test_readme_snippets.py


def code_blocks(path: Path) -> list[dict]:
    """``[{"language", "code", "line", "skip"}]`` of the fenced bash and Python blocks of a Markdown file."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        before = next((lines[k] for k in range(i - 1, -1, -1) if lines[k].strip()), "")
        skip, snippet = SKIP.match(before), SNIPPET.match(before)
        reason = skip.group(1) if skip else (
            f"snippet '{snippet.group(1)}': run on a scored store by tests/profiles/test_readme_snippets.py"
            if snippet else None)
        end = next(k for k in range(i + 1, len(lines)) if lines[k].startswith("```"))
        blocks.append({"language": match.group(1), "code": "\n".join(lines[i + 1:end]) + "\n", "line": i + 1,
                       "skip": reason})
        i = end + 1
    return blocks


def _environment() -> dict:
    scripts = str(Path(sys.executable).parent)
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PATH": f"{scripts}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONPATH": f"{REPO}{os.pathsep}{path}" if path else str(REPO), "MPLBACKEND": "Agg"}


def run_block(block: dict, folder: Path, name: str, timeout: float = 850) -> subprocess.CompletedProcess:
    """Run one block in ``folder``: bash with ``-euo pipefail``, Python as a script file."""
    if block["language"] == "bash":
        command = ["bash", "-euo", "pipefail", "-c", block["code"]]
    else:
        script = folder / f"{name}.py"
        script.write_text(block["code"])
        command = [sys.executable, script.name]
    return subprocess.run(command, cwd=folder, env=_environment(), capture_output=True, text=True, timeout=timeout)


README_BLOCKS = code_blocks(REPO / "README.md")
DEPLOY_BLOCKS = code_blocks(REPO / "deploy" / "README.md")


def test_the_readmes_have_blocks_and_the_marked_ones_say_why():
    assert len(README_BLOCKS) >= 12 and len(DEPLOY_BLOCKS) >= 5
    for block in README_BLOCKS + DEPLOY_BLOCKS:
        assert block["skip"] is None or len(block["skip"]) > 10
    runnable = [b for b in README_BLOCKS if b["skip"] is None]
    assert "gradcamo-dask synth plate.zarr" in runnable[0]["code"]  # the first runnable block makes the files
    assert any('if __name__ == "__main__":' in b["code"] for b in runnable)


@pytest.fixture(scope="module")
def readme_folder(tmp_path_factory):
    return tmp_path_factory.mktemp("readme")


@pytest.fixture(scope="module")
def deploy_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("deploy-readme")
    (folder / "deploy").symlink_to(REPO / "deploy")  # the blocks name deploy/... files of the checkout
    return folder


def _check(block: dict, folder: Path, name: str) -> None:
    if block["skip"]:
        pytest.skip(f"line {block['line']}: {block['skip']}")
    result = run_block(block, folder, name)
    assert result.returncode == 0, (f"block at line {block['line']} failed ({result.returncode}):\n{block['code']}\n"
                                    f"--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-5000:]}")


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(README_BLOCKS)), ids=[f"README.md:{b['line']}" for b in README_BLOCKS])
def test_readme_block_runs(index, readme_folder):
    _check(README_BLOCKS[index], readme_folder, f"block_{index:02d}")


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(DEPLOY_BLOCKS)),
                         ids=[f"deploy/README.md:{b['line']}" for b in DEPLOY_BLOCKS])
def test_deploy_readme_block_runs(index, deploy_folder):
    _check(DEPLOY_BLOCKS[index], deploy_folder, f"block_{index:02d}")
