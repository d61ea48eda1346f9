"""Stand-ins for sbatch, scancel and squeue on PATH: dask-jobqueue submits to them, tests read what it sent.

``sbatch`` copies each submitted job script to ``<root>/jobs/<id>.sh`` and answers like
SLURM (``Submitted batch job <id>``); ``scancel`` appends the ids to ``<root>/cancelled``.
With ``run=True`` each job also runs at once on this machine, in its own process group,
with the dask-cuda worker module swapped for distributed's CPU worker (same options),
and ``scancel`` kills it: a CPU stand-in for a SLURM GPU job.
"""

from __future__ import annotations

import os
from pathlib import Path

SBATCH = r"""#!/usr/bin/env bash
set -eu
root="$(dirname "$0")/.."
mkdir -p "$root/jobs"
n=$(( $(ls "$root/jobs" | wc -l) + 1001 ))
cp "${@: -1}" "$root/jobs/$n.sh"
if [ -n "${FAKE_SLURM_RUN:-}" ]; then
  mkdir -p "$root/run"
  sed 's/ -m dask_cuda\.cli / -m distributed.cli.dask_worker /' "$root/jobs/$n.sh" > "$root/run/$n.sh"
  setsid bash "$root/run/$n.sh" > "$root/run/$n.log" 2>&1 < /dev/null &
  echo $! > "$root/run/$n.pid"
fi
echo "Submitted batch job $n"
"""
SCANCEL = """#!/usr/bin/env bash
root="$(dirname "$0")/.."
echo "$@" >> "$root/cancelled"
for id in "$@"; do
  [ -f "$root/run/$id.pid" ] && kill -- -"$(cat "$root/run/$id.pid")" 2>/dev/null
done
exit 0
"""
SQUEUE = """#!/usr/bin/env bash
echo "JOBID"
"""


def install_fake_slurm(root: Path, monkeypatch, run: bool = False) -> Path:
    """Put fake ``sbatch``/``scancel``/``squeue`` first on PATH (via ``monkeypatch``); return ``root/jobs``.

    ``run=True``: jobs run here as CPU workers (see the module docstring)."""
    bin_dir = root / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name, text in (("sbatch", SBATCH), ("scancel", SCANCEL), ("squeue", SQUEUE)):
        path = bin_dir / name
        path.write_text(text)
        path.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    if run:
        monkeypatch.setenv("FAKE_SLURM_RUN", "1")
    return root / "jobs"


def kill_running_jobs(root: Path) -> None:
    """Kill every job process group the fake sbatch started (cleanup when a test fails)."""
    import signal

    for pid_file in (root / "run").glob("*.pid") if (root / "run").is_dir() else []:
        try:
            os.killpg(int(pid_file.read_text()), signal.SIGKILL)
        except (ProcessLookupError, ValueError, PermissionError):
            pass


def submitted_scripts(jobs: Path) -> list[str]:
    """The job scripts submitted so far, oldest first."""
    return [p.read_text() for p in sorted(jobs.glob("*.sh"))] if jobs.is_dir() else []
