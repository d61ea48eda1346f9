"""deploy/: each container image installs exactly its lock file, which pins every package it needs
with hashes; the two images agree on their user, carry the dashboard and the right CUDA stack."""

from __future__ import annotations

import re
import tomllib

import pytest
import yaml
from packaging.requirements import Requirement

from tests.deploy.locks import lock_entries, read_lock, unlocked_installs, unmet_requirements
from tests.helpers.paths import REPO

DEPLOY = REPO / "deploy"
IMAGES = ["cpu", "gpu"]


def _dockerfile(image: str) -> str:
    return (DEPLOY / "docker" / f"Dockerfile.{image}").read_text()


def _lock(image: str):
    pins, problems = read_lock((DEPLOY / "lock" / f"{image}.txt").read_text())
    assert problems == [], problems
    return pins


def _lock_python(image: str) -> str:
    return re.search(r"^# Lock for .*: Python (\d+\.\d+),", (DEPLOY / "lock" / f"{image}.txt").read_text(),
                     re.M).group(1)


def _image_roots(image: str) -> list[str]:
    """What the image asks for: the package's dependencies, its hpc extra and the lock's .in file."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extra_lines = lock_entries((DEPLOY / "lock" / f"{image}.in").read_text())
    return project["dependencies"] + project["optional-dependencies"]["hpc"] + extra_lines


@pytest.mark.parametrize("image", IMAGES)
def test_lock_pins_every_package_to_one_version_with_hashes(image):
    pins = _lock(image)  # asserts no problem line
    assert len(pins) > 100, f"{image}.txt holds {len(pins)} packages: not a whole environment"


@pytest.mark.parametrize("image", IMAGES)
def test_lock_holds_every_requirement_of_the_image(image):
    pins = _lock(image)
    unmet, walked = unmet_requirements(pins, _image_roots(image), _lock_python(image))
    assert unmet == [], "\n".join(unmet)
    # The walk read the metadata of the packages installed here at the locked version (a fresh CI
    # environment may hold newer ones: those are left to the image build's `pip check`). torch is
    # pinned alike in CI and in the CPU lock, so its requirements are always walked there.
    assert walked and (image != "cpu" or "torch" in walked), sorted(walked)


def test_lock_checks_catch_loose_unhashed_doubled_and_missing_pins():
    text = (DEPLOY / "lock" / "cpu.txt").read_text()
    assert read_lock(text.replace("\nzarr==", "\nzarr>=", 1))[1] == [
        "zarr>=3.1.6: not pinned to one exact version (name==version)"]
    unhashed = re.sub(r"(\nzict==[\d.]+) \\\n(\s+--hash=\S+ \\\n)*\s+--hash=\S+", r"\1", text)
    assert read_lock(unhashed)[1] == ["zict==3.0.0: needs --hash=sha256:... for every file pip may take"]
    assert read_lock(text + "\nZarr==3.1.6 --hash=sha256:" + "0" * 64)[1] == [
        "Zarr==3.1.6: zarr is locked twice"]
    assert read_lock("--extra-index-url https://example.org\n")[1][0].endswith("not the lock")
    pins, _ = read_lock(text)
    del pins["msgpack"]  # distributed needs it (told here, so that the check does not hang on the venv)
    graph = {"distributed": ["msgpack>=1.0", "tornado>=6", "pywin32; sys_platform == 'win32'"],
             "dask": ["distributed>=2024.8; extra == 'distributed'"]}

    def told(pin):
        return [Requirement(line) for line in graph.get(pin.name, [])]

    unmet, walked = unmet_requirements(pins, ["dask[distributed]"], "3.11", requirements_of=told)
    assert unmet == ["distributed needs msgpack>=1.0; the lock has nothing"] and walked == {
        "dask", "distributed", "tornado"}
    unmet, _ = unmet_requirements(read_lock(text)[0], ["zarr>=99"], "3.11")
    assert unmet == ["the image needs zarr>=99; the lock has 3.1.6"]


@pytest.mark.parametrize("image", IMAGES)
def test_dockerfile_installs_only_its_lock_and_the_package(image):
    lock = f"deploy/lock/{image}.txt"
    text = _dockerfile(image)
    assert unlocked_installs(text, lock) == []
    assert f"COPY {lock} ./{lock}" in text
    assert re.search(r"pip install [^\n]*--no-deps --no-build-isolation \.", text)  # setuptools: from the lock
    assert "pip check" in text  # the build fails when the lock is incomplete or inconsistent


def test_dockerfile_checks_catch_installs_outside_the_lock():
    lock = "deploy/lock/cpu.txt"
    good = "RUN pip install --no-cache-dir --require-hashes --no-deps -r deploy/lock/cpu.txt\n"
    assert unlocked_installs(good, lock) == []
    bad = {
        "RUN pip install --require-hashes -r deploy/lock/cpu.txt\n": "without --no-deps",
        "RUN pip install --no-deps --require-hashes -r deploy/lock/gpu.txt\n": "must install deploy/lock/cpu.txt",
        "RUN pip install --no-deps -r deploy/lock/cpu.txt\n": "with --require-hashes",
        "RUN apt-get update && pip install --no-deps requests==2.0\n": "installs ['requests==2.0']",
        "RUN python -m pip install \\\n    --no-deps . torch\n": "installs ['.', 'torch']",
    }
    for dockerfile, message in bad.items():
        problems = unlocked_installs(dockerfile, lock)
        assert len(problems) == 1 and message in problems[0], (dockerfile, problems)


def test_lock_python_is_the_images_python():
    cpu_base = re.search(r"^ARG PYTHON_IMAGE=python:(\d+\.\d+)-", _dockerfile("cpu"), re.M).group(1)
    assert _lock_python("cpu") == cpu_base
    ubuntu = re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:\S+-ubuntu(\d+\.\d+)$", _dockerfile("gpu"), re.M).group(1)
    assert _lock_python("gpu") == {"22.04": "3.10", "24.04": "3.12"}[ubuntu]  # Ubuntu's python3


def test_cpu_lock_has_the_cpu_torch_ci_pins_and_no_cuda():
    pins = _lock("cpu")
    constraints = {Requirement(line).name: Requirement(line)
                   for line in lock_entries((DEPLOY / "constraints-cpu.txt").read_text())}
    for name, requirement in constraints.items():  # torch, cellpose, pandas: what CI runs
        assert requirement.specifier.contains(pins[name].version, prereleases=True), (name, pins[name])
    assert pins["torch"].version.endswith("+cpu")
    assert not [name for name in pins if re.match(r"nvidia-|cuda-|cupy|triton", name)]


def test_gpu_lock_is_one_cuda_major_with_dask_cuda_extra():
    pins = _lock("gpu")
    major = pins["cuda-toolkit"].version.split(".")[0]  # torch's CUDA, as PyPI builds it
    assert "+" not in pins["torch"].version and major == "13"
    assert re.search(rf"^ARG CUDA_IMAGE=nvidia/cuda:{major}\.\S+cudnn-runtime", _dockerfile("gpu"), re.M)
    assert f"cupy-cuda{major}x" in pins and not [n for n in pins if re.match(r"cupy-cuda(?!%sx)" % major, n)]
    assert pins["cuda-bindings"].version.split(".")[0] == major and "cuda-core" in pins
    dask_cuda = [Requirement(line) for line in lock_entries((DEPLOY / "lock" / "gpu.in").read_text())
                 if line.startswith("dask-cuda")]
    assert [r.extras for r in dask_cuda] == [{f"cu{major}"}] and "dask-cuda" in pins
    assert not [name for name in pins if re.search(r"-cu1[0-9]$", name) and not name.endswith(f"cu{major}")]
    # pip users on CUDA 12 hosts keep the package's [gpu] extra with dask-cuda's cu12 extra.
    gpu_extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    assert {"cu12"} in [Requirement(line).extras for line in gpu_extra if line.startswith("dask-cuda")]


@pytest.mark.parametrize("image", IMAGES)
def test_image_has_the_dashboard(image):
    assert "bokeh" in _lock(image)
    imports = re.search(r'python -c "import ([^"]+)"', _dockerfile(image)).group(1)
    assert "bokeh" in [name.strip() for name in imports.split(",")]


def _security_contexts(node):
    if isinstance(node, dict):
        if "runAsUser" in node:
            yield node
        for value in node.values():
            yield from _security_contexts(value)
    elif isinstance(node, list):
        for value in node:
            yield from _security_contexts(value)


def test_one_uid_in_both_images_and_every_pod():
    uids = set()
    for image in IMAGES:
        text = _dockerfile(image)
        uids |= set(re.findall(r"useradd [^\n]*--uid (\d+)", text)) | set(re.findall(r"^USER (\d+)$", text, re.M))
    assert len(uids) == 1, f"the images use the UIDs {uids}: files on a shared volume would not match"
    uid = int(uids.pop())
    contexts = [context for path in sorted((DEPLOY / "kubernetes").glob("*.yaml"))
                for document in yaml.safe_load_all(path.read_text())
                for context in _security_contexts(document)]
    assert len(contexts) >= 4  # cluster scheduler and workers, job runner, staging pod
    for context in contexts:
        assert context == {"runAsUser": uid, "runAsGroup": uid, "fsGroup": uid}, context
