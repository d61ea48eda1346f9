"""deploy/slurm/score-plate.sbatch with SIF set runs the scheduler, every dask-cuda worker and the
client through `apptainer exec --nv` (stub apptainer and srun that record their arguments; the
scheduler itself is real)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

from tests.helpers.paths import REPO

SBATCH = REPO / "deploy" / "slurm" / "score-plate.sbatch"


def _stub(folder: Path, name: str, log: Path, then: str = "") -> None:
    """An executable ``name`` that appends its arguments to ``log`` and then runs ``then``."""
    stub = folder / name
    # one write per call: stubs run side by side (the scheduler and srun in the background), and a line
    # written in pieces could interleave with another's
    stub.write_text(f'#!/usr/bin/env bash\nline="{name}"; for a in "$@"; do line+=" $(printf %q "$a")"; done\n'
                    f'printf "%s\\n" "$line" >> "{log}"\n{then}\n')
    stub.chmod(0o755)


def _run_batch(tmp_path: Path, **extra_env: str) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    bin_dir, log = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    # apptainer exec --nv --bind DIR IMAGE COMMAND...: run COMMAND here, as the container would.
    _stub(bin_dir, "apptainer", log, 'shift 5; exec "$@"')
    _stub(bin_dir, "srun", log)
    _stub(bin_dir, "gradcamo-dask", log)
    env = {"PATH": f"{bin_dir}:{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(tmp_path),
           "SLURM_JOB_ID": "78", "SLURM_SUBMIT_DIR": str(tmp_path), "SLURM_CPUS_PER_TASK": "6",
           "SLURM_GPUS_ON_NODE": "4", "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
           "PLATE": "/shared/p.zarr", "LABELS": "/shared/l.zarr", "MODEL": "/shared/bundle",
           "OUT": "/shared/out.zarr", **extra_env}
    result = subprocess.run(["bash", str(SBATCH)], env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=180)
    calls = [shlex.split(line) for line in log.read_text().splitlines()] if log.exists() else []
    return result, calls


def test_sif_runs_every_piece_through_apptainer_with_nv(tmp_path):
    result, calls = _run_batch(tmp_path, SIF="/shared/images/gradcamo-gpu.sif", BIND="/shared,/scratch")
    assert result.returncode == 0, result.stderr[-2000:]
    container = ["apptainer", "exec", "--nv", "--bind", "/shared,/scratch", "/shared/images/gradcamo-gpu.sif"]
    in_container = [call[len(container):] for call in calls if call[:len(container)] == container]
    # The scheduler, the address read-out and the client, in that order (the workers: in srun's call).
    assert [command[:3] for command in in_container] == [
        ["python", "-m", "distributed.cli.dask_scheduler"], ["python", "-c", in_container[1][2]],
        ["gradcamo-dask", "score", "/shared/p.zarr"]]
    srun = next(call for call in calls if call[0] == "srun")
    start = srun.index("apptainer")
    assert srun[start:start + len(container)] == container and "--cpus-per-task=6" in srun
    assert srun[start + len(container):start + len(container) + 3] == ["python", "-m", "dask_cuda.cli"]
    score = next(call for call in calls if call[0] == "gradcamo-dask")  # the stub, run by apptainer's
    assert score[score.index("--scheduler") + 1].startswith("tcp://")


def test_without_sif_no_apptainer_and_a_missing_venv_is_an_error(tmp_path):
    result, calls = _run_batch(tmp_path, VENV=str(tmp_path / "no-venv"))
    assert result.returncode != 0 and "no-venv/bin/activate" in result.stderr
    assert not [call for call in calls if call[0] == "apptainer"]
