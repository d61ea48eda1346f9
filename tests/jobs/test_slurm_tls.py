"""--cluster slurm through the CLI's own code path: TLS by default, full-role --tls-* files, plain TCP refused.

The fake sbatch (tests/helpers/fake_slurm.py, run mode) runs each submitted job script on
this machine with distributed's CPU worker in place of dask-cuda's, so the workers start
exactly as the job script says: scheduler address, ``--protocol tls://``, certificate paths.
"""

from __future__ import annotations

import argparse
import operator
import sys
from pathlib import Path

import pytest
import yaml
from distributed import Client

from gradcamo_dask.cli import options
from tests.helpers.fake_slurm import install_fake_slurm, kill_running_jobs
from tests.helpers.paths import REPO

SLURM_CONFIG = REPO / "deploy" / "slurm" / "jobqueue.yaml"


@pytest.fixture
def running_slurm(tmp_path, monkeypatch):
    install_fake_slurm(tmp_path / "slurm", monkeypatch, run=True)
    yield tmp_path / "slurm"
    kill_running_jobs(tmp_path / "slurm")


def _cpu_job_config(tmp_path: Path) -> Path:
    config = yaml.safe_load(SLURM_CONFIG.read_text())
    config["gradcamo"]["slurm"].update({"minimum-jobs": 1, "maximum-jobs": 1})
    config["jobqueue"]["slurm"].update({
        "python": sys.executable, "cores": 1, "memory": "2GiB", "walltime": "01:00:00", "death-timeout": 30,
        "job-script-prologue": [], "local-directory": str(tmp_path / "scratch"),
        "shared-temp-directory": str(tmp_path / "certs")})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _cli_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    options.add_cluster_options(parser)
    return parser.parse_args(list(argv))


def _refused_plain_tcp(address: str) -> None:
    plain = address.replace("tls://", "tcp://")
    with pytest.raises((OSError, TimeoutError)):
        Client(plain, timeout=5).close()


def _check_tls_cluster(client) -> None:
    address = client.scheduler.address
    assert address.startswith("tls://")
    workers = client.scheduler_info()["workers"]
    assert workers and all(w.startswith("tls://") for w in workers)
    assert dict(next(iter(workers.values()))["resources"]) == {"GPU": 1}
    assert client.submit(operator.add, 1, 2, pure=False).result() == 3
    _refused_plain_tcp(address)
    assert len(client.scheduler_info()["workers"]) == len(workers)


def test_cli_slurm_cluster_is_tls_by_default(tmp_path, running_slurm):
    args = _cli_args("--cluster", "slurm", "--cluster-config", str(_cpu_job_config(tmp_path)),
                     "--worker-timeout", "120")
    assert options.cluster_security(args) is None  # no --tls-* files: temporary certificates
    client = options.connect(args)
    try:
        _check_tls_cluster(client)
    finally:
        client.close()
        client.cluster.close()


def test_cli_slurm_cluster_with_tls_files_gives_every_role_a_certificate(tmp_path, running_slurm):
    from tests.helpers.tls_certs import write_test_pki

    pki = write_test_pki(tmp_path / "pki", hosts={"node": ["127.0.0.1"]})
    node = pki["node"]
    args = _cli_args("--cluster", "slurm", "--cluster-config", str(_cpu_job_config(tmp_path)),
                     "--worker-timeout", "120", "--tls-ca-file", str(node["ca"]), "--tls-cert", str(node["cert"]),
                     "--tls-key", str(node["key"]))
    security = options.cluster_security(args)
    assert security.tls_scheduler_cert == security.tls_worker_cert == str(node["cert"])
    client = options.connect(args)
    try:
        script = client.cluster.job_script()
        assert f"--tls-cert {node['cert']}" in script and "--tls-cert None" not in script
        _check_tls_cluster(client)
    finally:
        client.close()
        client.cluster.close()


def test_first_worker_wait_defaults_by_cluster_and_zero_means_no_limit():
    assert options.first_worker_wait(_cli_args("--cluster", "slurm")) is None
    assert options.first_worker_wait(_cli_args("--scheduler", "tcp://h:1")) == 600.0
    assert options.first_worker_wait(_cli_args("--scheduler", "tcp://h:1", "--worker-timeout", "0")) is None
    assert options.first_worker_wait(_cli_args("--worker-timeout", "30")) == 30.0
