#!/usr/bin/env bash
# Regenerate the image lock files deploy/lock/cpu.txt and deploy/lock/gpu.txt (every package pinned,
# with hashes) from pyproject.toml, the *.in files beside this script and the constraints files.
#
#   bash deploy/lock/compile.sh TESTED_PYTHON [TORCH_CPU_WHEELS]
#
# TESTED_PYTHON: the interpreter of the environment CI tests (.venv/bin/python). Its `pip freeze` is a
#   constraint, so each image gets the versions CI tested wherever they fit (dask-cuda pins dask and
#   distributed exactly, so the GPU lock takes dask-cuda's).
# TORCH_CPU_WHEELS: a folder holding torch-2.13.0+cpu-cp311-*.whl; without it the CPU wheel is taken
#   from https://download.pytorch.org/whl/cpu.
# Needs uv (python3 -m venv /tmp/uvenv && /tmp/uvenv/bin/pip install uv; or UV=/path/to/uv) and PyPI.
# uv resolves from package metadata for the images' Python and platform, not this machine's.
set -euo pipefail
TESTED_PYTHON=${1:?usage: compile.sh TESTED_PYTHON [TORCH_CPU_WHEELS]}
UV=${UV:-uv}
HERE=$(cd "$(dirname "$0")" && pwd)
cd "$HERE/../.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

"$TESTED_PYTHON" -m pip freeze --exclude-editable | grep -E '^[A-Za-z0-9_.-]+==' > "$work/tested.txt"
# The GPU image takes torch from PyPI (no +cpu label) and dask-cuda's own dask and distributed.
sed -e 's/^torch==\([^+]*\)+cpu$/torch==\1/' "$work/tested.txt" \
    | grep -v -i -E '^(dask|distributed)==' > "$work/tested-gpu.txt"

common=(--python-platform x86_64-manylinux_2_28 --generate-hashes --no-annotate
        --custom-compile-command "bash deploy/lock/compile.sh TESTED_PYTHON [TORCH_CPU_WHEELS]")
if [ -n "${2:-}" ]; then cpu_torch=(--find-links "$2"); else
    cpu_torch=(--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match); fi

# CPU image: python:3.11-slim-bookworm (Python 3.11, as CI).
"$UV" pip compile pyproject.toml deploy/lock/cpu.in --extra hpc \
    -c deploy/constraints-cpu.txt -c "$work/tested.txt" --python-version 3.11 \
    "${cpu_torch[@]}" "${common[@]}" -o "$work/cpu.txt"
# GPU image: nvidia/cuda:13.0.x-cudnn-runtime-ubuntu24.04 (Ubuntu's Python 3.12), everything from PyPI.
"$UV" pip compile pyproject.toml deploy/lock/gpu.in --extra hpc \
    -c deploy/constraints-gpu.txt -c "$work/tested-gpu.txt" --python-version 3.12 \
    "${common[@]}" -o "$work/gpu.txt"

header() {  # $1: Python version, $2: where the packages come from, $3: cpu or gpu
    printf '# Lock for deploy/docker/Dockerfile.%s: Python %s, x86_64 manylinux_2_28 (glibc >= 2.28).\n' "$3" "$1"
    printf '# Index: %s\n' "$2"
    printf '# Installed with: pip install --require-hashes --no-deps -r deploy/lock/%s.txt\n' "$3"
}
{ header 3.11 "PyPI; torch (+cpu) from https://download.pytorch.org/whl/cpu" cpu; cat "$work/cpu.txt"; } > deploy/lock/cpu.txt
{ header 3.12 "PyPI only (torch 2.13.0 from PyPI is a CUDA 13.0 build)" gpu; cat "$work/gpu.txt"; } > deploy/lock/gpu.txt
echo "wrote deploy/lock/cpu.txt ($(grep -c '==' deploy/lock/cpu.txt) pins), deploy/lock/gpu.txt ($(grep -c '==' deploy/lock/gpu.txt) pins)"
