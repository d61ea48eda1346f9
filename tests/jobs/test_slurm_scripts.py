"""The SLURM job scripts gradcamo-dask makes and ships, rendered and run by bash where it matters.

dask-jobqueue submits to fake ``sbatch``/``scancel`` (tests/helpers/fake_slurm.py), so what
a real cluster would be asked to run is read back from the submitted scripts.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from dask.utils import parse_timedelta

from gradcamo_dask.errors import ClusterError
from tests.helpers.fake_slurm import install_fake_slurm, submitted_scripts
from tests.helpers.paths import REPO

SLURM_CONFIG = REPO / "deploy" / "slurm" / "jobqueue.yaml"
SBATCH = REPO / "deploy" / "slurm" / "score-plate.sbatch"


def _config(tmp_path: Path, gradcamo: dict | None = None, jobqueue: dict | None = None) -> Path:
    config = yaml.safe_load(SLURM_CONFIG.read_text())
    config["gradcamo"]["slurm"].update(gradcamo or {})
    config["jobqueue"]["slurm"].update({"shared-temp-directory": str(tmp_path / "certs"), **(jobqueue or {})})
    (tmp_path / "certs").mkdir(exist_ok=True)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    return install_fake_slurm(tmp_path / "slurm", monkeypatch)


def _cluster_scripts(config: Path, jobs: Path, wait_jobs: int = 0, **kwargs):
    """Start the SLURM cluster, wait for ``wait_jobs`` submissions; (job_script(), submitted scripts, adaptive)."""
    from gradcamo_dask.jobs.slurm import slurm_cluster

    cluster = slurm_cluster(config, **kwargs)
    try:
        deadline = time.monotonic() + 60
        while len(submitted_scripts(jobs)) < wait_jobs and time.monotonic() < deadline:
            time.sleep(0.2)
        adaptive = cluster._adaptive
        return cluster.job_script(), submitted_scripts(jobs), (type(adaptive).__name__, adaptive.minimum,
                                                               adaptive.maximum), cluster.scheduler_address
    finally:
        cluster.close()


def _worker_line(script: str) -> str:
    return next(line for line in script.splitlines() if " -m dask_cuda.cli " in line)


def _argv_on_the_node(script: str, env: dict) -> list[str]:
    """The worker command's argv as bash on the node would build it (the python command replaced by printf)."""
    line = _worker_line(script).split(" -m dask_cuda.cli ", 1)[1]
    shown = subprocess.run(["bash", "-c", f"printf '%s\\n' {line}"], env=env, capture_output=True, text=True,
                           check=True)
    return shown.stdout.splitlines()


def test_empty_tmpdir_cannot_swallow_the_resources_flag(tmp_path, fake_slurm):
    script, _, _, _ = _cluster_scripts(_config(tmp_path, {"minimum-jobs": 0}), fake_slurm)
    for tmpdir, expected in (("", "/tmp"), ("/scratch/job 7", "/scratch/job 7")):
        argv = _argv_on_the_node(script, {"PATH": os.environ["PATH"], "TMPDIR": tmpdir})
        assert argv[argv.index("--local-directory") + 1] == expected
        assert argv[argv.index("--resources") + 1] == "GPU=1"


def test_adapts_between_minimum_and_maximum_and_submits_the_minimum(tmp_path, fake_slurm):
    config = _config(tmp_path, {"gpus-per-job": 2, "minimum-jobs": 1, "maximum-jobs": 3}, {"cores": 16})
    _, submitted, adaptive, _ = _cluster_scripts(config, fake_slurm, wait_jobs=1)
    assert adaptive == ("ReplacingAdaptive", 2, 6)  # workers: jobs x 2 GPUs
    assert len(submitted) == 1 and "#SBATCH --gres=gpu:2" in submitted[0]
    _, _, adaptive, _ = _cluster_scripts(config, fake_slurm, wait_jobs=2, n_workers=9)  # --workers 9 -> 5 jobs
    assert adaptive[2] == 10


def test_workers_live_a_margin_shorter_than_the_walltime(tmp_path, fake_slurm):
    config = _config(tmp_path, {"minimum-jobs": 0, "lifetime-margin": "10m", "lifetime-stagger": "5m"},
                     {"walltime": "1-02:00:00"})
    script, _, _, _ = _cluster_scripts(config, fake_slurm)
    prologue = "\n".join(line for line in script.splitlines() if line.startswith("export "))
    code = ("import dask, distributed\n"
            "print(dask.config.get('distributed.worker.lifetime.duration'), "
            "dask.config.get('distributed.worker.lifetime.stagger'), dask.config.get('distributed.worker.lifetime.restart'))")
    out = subprocess.run(["bash", "-c", f"{prologue}\n{shlex.quote(sys.executable)} -c {shlex.quote(code)}"],
                         capture_output=True, text=True, check=True, env={**os.environ}).stdout.split()
    # what a distributed.Worker started in this job reads (dask-cuda's workers included)
    assert parse_timedelta(out[0]) == 26 * 3600 - 600 - 300 and parse_timedelta(out[1]) == 300
    assert out[2] == "False"  # the worker exits, its job ends, adapt submits a new job


def test_a_walltime_without_room_for_a_lifetime_is_refused(tmp_path):
    from gradcamo_dask.jobs.slurm import open_slurm_config

    with pytest.raises(ClusterError, match="walltime 00:12:00.*lifetime-margin"):
        open_slurm_config(_config(tmp_path, jobqueue={"walltime": "00:12:00"}))
    with pytest.raises(ClusterError, match="not a SLURM time"):
        open_slurm_config(_config(tmp_path, jobqueue={"walltime": "four hours"}))
    with pytest.raises(ClusterError, match="maximum-jobs"):
        open_slurm_config(_config(tmp_path, {"minimum-jobs": 3, "maximum-jobs": 2}))
    with pytest.raises(ClusterError, match="no setting lifetime"):
        open_slurm_config(_config(tmp_path, {"lifetime": "1h"}))


def test_slurm_walltime_formats():
    from gradcamo_dask.jobs.walltime import slurm_walltime_seconds

    assert [slurm_walltime_seconds(t) for t in ("90", "90:30", "04:00:00", "2-00", "1-02:03", "1-00:00:05")] == \
        [5400, 5430, 14400, 172800, 93780, 86405]


def test_tls_is_the_default_with_temporary_certificates(tmp_path, fake_slurm):
    script, _, _, address = _cluster_scripts(_config(tmp_path, {"minimum-jobs": 0}), fake_slurm)
    argv = _argv_on_the_node(script, {"PATH": os.environ["PATH"]})
    assert address.startswith("tls://") and argv[0].startswith("tls://")
    for flag in ("--tls-ca-file", "--tls-cert", "--tls-key"):
        path = Path(argv[argv.index(flag) + 1])
        assert path.parent == tmp_path / "certs" and (path.stat().st_mode & 0o077) == 0  # the user's only
    import gc

    gc.collect()
    assert not path.exists()  # the run's private keys went with the cluster
    plain, _, _, address = _cluster_scripts(_config(tmp_path, {"minimum-jobs": 0, "tls": False}), fake_slurm)
    assert address.startswith("tcp://") and "--tls-key" not in plain


def test_usable_cores_follow_slurm_and_the_cgroup_quota(tmp_path):
    from gradcamo_dask.jobs.machine import cgroup_cpu_quota, usable_cores

    affinity = len(os.sched_getaffinity(0))
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(v2) is None and usable_cores({}, v2) == affinity
    (v2 / "cpu.max").write_text("50000 100000\n")  # half a CPU: still one thread
    assert cgroup_cpu_quota(v2) == 0.5 and usable_cores({}, v2) == 1
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_quota(v1) == 1.0
    assert usable_cores({"SLURM_CPUS_PER_TASK": "1"}, tmp_path / "none") == 1


def test_torch_threads_of_a_gpu_job_share_the_job_cpus_not_the_node(monkeypatch):
    from types import SimpleNamespace

    from gradcamo_dask.jobs import machine
    from gradcamo_dask.jobs.worker_plugins import TorchThreads

    monkeypatch.setattr(machine.os, "sched_getaffinity", lambda pid: set(range(128)))  # a 128-core node
    monkeypatch.setattr(machine, "cgroup_cpu_quota", lambda root=None: None)
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "16")
    worker = SimpleNamespace(ip="10.0.0.7", state=SimpleNamespace(nthreads=1))
    assert TorchThreads(per_host=4).threads_for(worker) == 4  # 16 job CPUs / 4 GPU workers, none joined yet
    assert TorchThreads(hosts={"10.0.0.7": 2}, per_host=4).threads_for(worker) == 8


def test_dask_jobqueue_floor_has_worker_command():
    """worker_command (dask_cuda.cli) arrived in dask-jobqueue 0.8.2; the floor in pyproject must not allow less."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.version import Version

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    floors = [Requirement(r).specifier for group in ("hpc", "dev") for r in project[group]
              if Requirement(r).name == "dask-jobqueue"]
    assert len(floors) == 2
    for spec in floors:
        assert not spec.contains(Version("0.8.1")) and spec.contains(Version("0.9.0"))


# ------------------------------------------------------------------ deploy/slurm/score-plate.sbatch


def _fake_node(tmp_path: Path) -> tuple[Path, dict]:
    """A venv whose activate puts stub srun and gradcamo-dask on PATH; the real python runs the scheduler."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    log = tmp_path / "calls"
    for name in ("srun", "gradcamo-dask"):
        stub = venv / "bin" / name
        stub.write_text(f'#!/usr/bin/env bash\nprintf "{name}" >> "{log}"; printf " %q" "$@" >> "{log}"; '
                        f'echo >> "{log}"\n')
        stub.chmod(0o755)
    python_dir = str(Path(sys.executable).parent)
    (venv / "bin" / "activate").write_text(f'export PATH="{venv}/bin:{python_dir}:$PATH"\n')
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "VENV": str(venv), "SLURM_JOB_ID": "77",
           "SLURM_SUBMIT_DIR": str(tmp_path), "SLURM_CPUS_PER_TASK": "12", "SLURM_GPUS_ON_NODE": "2",
           "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    return log, env


def test_sbatch_script_runs_a_scheduler_on_a_free_port_and_gives_srun_the_cpus(tmp_path):
    log, env = _fake_node(tmp_path)
    env.update(PLATE="/p.zarr", LABELS="/l.zarr", MODEL="/bundle", OUT="/out.zarr")
    result = subprocess.run(["bash", str(SBATCH)], env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    calls = log.read_text().splitlines()
    srun = shlex.split(next(c for c in calls if c.startswith("srun")))
    assert "--cpus-per-task=12" in srun and "--gres=gpu:2" in srun
    assert srun[srun.index("--resources") + 1] == "GPU=1"
    score = shlex.split(next(c for c in calls if c.startswith("gradcamo-dask")))
    address = score[score.index("--scheduler") + 1]
    assert re.fullmatch(r"tcp://[\d.]+:\d+", address) and not address.endswith(":8786")
    assert not (tmp_path / "gradcamo-scheduler-77.json").exists()  # removed on exit


def test_sbatch_export_example_passes_every_variable(tmp_path):
    lines = [line[1:].strip() for line in SBATCH.read_text().splitlines()
             if line.startswith("#   ") and ("sbatch" in line or "export" in line)]
    stub = 'sbatch() { for a in "$@"; do echo "ARG:$a"; done; env | grep -E "^(PLATE|LABELS|MODEL|OUT)=" ; }'
    out = subprocess.run(["bash", "-c", stub + "\n" + "\n".join(lines)], capture_output=True, text=True,
                         check=True, env={"PATH": "/usr/bin:/bin"}).stdout.splitlines()
    args = [o[4:] for o in out if o.startswith("ARG:")]
    assert args[-1] == "deploy/slurm/score-plate.sbatch" and args[0].startswith("--export=ALL")
    assert sorted(o.split("=")[0] for o in out if not o.startswith("ARG:")) == ["LABELS", "MODEL", "OUT", "PLATE"]
