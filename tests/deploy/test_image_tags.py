"""deploy/: images are tagged <version>-<commit>-<variant> by deploy/image-tag.sh, and every image
reference in the manifests and the docs follows that scheme (no moving tag such as gpu or latest)."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib

import yaml

from tests.helpers.paths import REPO

DEPLOY = REPO / "deploy"
VARIANTS = {"cpu": "Dockerfile.cpu", "gpu-cu13": "Dockerfile.gpu"}
# An image reference of ours: REGISTRY/.../gradcamo-dask then :TAG or @sha256:DIGEST.
REFERENCE = re.compile(r"[\w.-]+(?:/[\w.-]+)*/gradcamo-dask(?::([\w.${}()-]+)|@sha256:[0-9a-f]{64})")
# VERSION and COMMIT are the placeholders the manifests carry (EDIT); $TAG-style shell words are the
# README's commands, whose tag comes from image-tag.sh.
TAG = re.compile(r"(VERSION|\d+\.\d+\.\d+[\w.]*)-(COMMIT|[0-9a-f]{12})-(%s)" % "|".join(VARIANTS))


def moving_tags(text: str) -> list[str]:
    """Image references in ``text`` whose tag does not follow <version>-<commit>-<variant>."""
    found = []
    for match in REFERENCE.finditer(text):
        tag = match.group(1)
        if tag is not None and not TAG.fullmatch(tag) and not tag.startswith("$("):
            found.append(match.group(0))
    return found


def _git(folder, *arguments):
    return subprocess.run(["git", "-C", str(folder), *arguments], check=True, capture_output=True, text=True)


def _tag(folder, variant):
    return subprocess.run(["bash", str(folder / "deploy" / "image-tag.sh"), variant],
                          capture_output=True, text=True, timeout=30)


def test_image_tag_names_version_commit_and_variant(tmp_path):
    (tmp_path / "deploy").mkdir()
    shutil.copy(DEPLOY / "image-tag.sh", tmp_path / "deploy" / "image-tag.sh")
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@example.org", "commit", "-qm", "x")
    commit = _git(tmp_path, "rev-parse", "HEAD").stdout.strip()
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    result = _tag(tmp_path, "gpu-cu13")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{version}-{commit[:12]}-gpu-cu13"
    assert TAG.fullmatch(result.stdout.strip())

    refused = _tag(tmp_path, "gpu")  # no CUDA major: not a variant
    assert refused.returncode == 2 and "cpu or gpu-cu13" in refused.stderr
    (tmp_path / "pyproject.toml").write_text((REPO / "pyproject.toml").read_text() + "\n# edit\n")
    dirty = _tag(tmp_path, "cpu")
    assert dirty.returncode == 1 and "uncommitted changes" in dirty.stderr and dirty.stdout == ""


def test_tag_variants_are_the_dockerfiles():
    for variant, dockerfile in VARIANTS.items():
        text = (DEPLOY / "docker" / dockerfile).read_text()
        assert f"$(bash deploy/image-tag.sh {variant})" in text  # its build command tags it so
        cuda = re.search(r"-cu(\d+)$", variant)
        if cuda:
            assert re.search(rf"^ARG CUDA_IMAGE=nvidia/cuda:{cuda.group(1)}\.", text, re.M), variant
    script = (DEPLOY / "image-tag.sh").read_text()
    assert f"{'|'.join(VARIANTS)})" in script


def test_every_image_reference_follows_the_tag_scheme():
    files = sorted(DEPLOY.rglob("*.yaml")) + sorted(DEPLOY.rglob("*.md")) + [REPO / "README.md"]
    files += sorted((DEPLOY / "docker").glob("Dockerfile.*")) + sorted(DEPLOY.rglob("*.sbatch"))
    references = 0
    for path in files:
        text = path.read_text()
        references += len(REFERENCE.findall(text))
        assert moving_tags(text) == [], f"{path.relative_to(REPO)}: {moving_tags(text)}"
    assert references >= 8  # the manifests, the Dockerfiles' and README's commands
    helm = (DEPLOY / "kubernetes" / "helm-values-gpu.yaml").read_text()
    assert [TAG.fullmatch(tag) is not None for tag in re.findall(r"^    tag: (\S+)", helm, re.M)] == [True, True]


def test_moving_tags_are_caught():
    text = ("image: ghcr.io/o/gradcamo-dask:gpu\nimage: ghcr.io/o/gradcamo-dask:latest\n"
            "image: ghcr.io/o/gradcamo-dask:0.1.0-gpu-cu13\n"
            "ok: ghcr.io/o/gradcamo-dask:0.1.0-3f2a9c1d0e4b-cpu ghcr.io/o/gradcamo-dask@sha256:" + "a" * 64)
    assert moving_tags(text) == ["ghcr.io/o/gradcamo-dask:gpu", "ghcr.io/o/gradcamo-dask:latest",
                                 "ghcr.io/o/gradcamo-dask:0.1.0-gpu-cu13"]


def test_every_pod_runs_the_one_image_of_the_cluster():
    # The images pin different dask versions (dask-cuda pins its own), and the staging pod is also
    # where the client runs: one image reference for all pods, helm's scheduler and workers too.
    images = set()
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        images |= {match.group(0) for match in REFERENCE.finditer(path.read_text())}
    helm = yaml.safe_load((DEPLOY / "kubernetes" / "helm-values-gpu.yaml").read_text())
    images |= {f"{helm[role]['image']['repository']}:{helm[role]['image']['tag']}" for role in ("scheduler", "worker")}
    assert len(images) == 1, images
    assert images.pop().endswith("-gpu-cu13")
