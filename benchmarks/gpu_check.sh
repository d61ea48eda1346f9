#!/usr/bin/env bash
# GPU check for the engine (issue #2): on a machine with CUDA, run the engine's tests with the
# GPU-marked ones (CUDA vs CPU, CuPy in/out, bf16 autocast, channels_last_3d) and the explain
# benchmark on the GPU, print cells/s, and leave everything under benchmarks/results/:
#   gpu_check_tests.txt, gpu_check_bench.txt, bench_explain_cuda.json, bench_explain_cuda.md
# Usage (repository root or anywhere):  benchmarks/gpu_check.sh [extra bench_explain.py options]
# Set PYTHON to pick the interpreter (default: python3). Exit status: non-zero when a test fails,
# when no CUDA device is visible, or when CUDA tests were skipped (a missing CuPy only warns).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=benchmarks/results
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: no CUDA device visible to torch; run this on a GPU machine" >&2
    exit 2
fi
"$PYTHON" -c 'import torch; print("gpu_check:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| CUDA", torch.version.cuda)' | tee "$OUT/gpu_check_tests.txt"

"$PYTHON" -m pytest tests/engine/test_models.py tests/engine/test_explain.py tests/engine/test_gradcamo.py tests/test_cells.py \
    tests/segment/test_segment.py tests/jobs/test_pipeline.py tests/jobs/test_cluster.py tests/jobs/test_deploy.py \
    -rA -p no:cacheprovider \
    2>&1 | tee -a "$OUT/gpu_check_tests.txt"
tests_status=${PIPESTATUS[0]}
if grep -E "^SKIPPED .*needs a CUDA GPU" "$OUT/gpu_check_tests.txt" >/dev/null; then
    echo "gpu_check: GPU tests were skipped although CUDA is visible" >&2
    [ "$tests_status" -eq 0 ] && tests_status=3
fi
if grep -E "^SKIPPED .*cupy" "$OUT/gpu_check_tests.txt" >/dev/null; then
    echo "gpu_check: WARNING: CuPy is not installed, its checks were skipped (pip install -e '.[gpu]')" >&2
fi

"$PYTHON" benchmarks/bench_explain.py --device cuda "$@" 2>&1 | tee "$OUT/gpu_check_bench.txt"
bench_status=${PIPESTATUS[0]}

# plate scale (issue #4): LocalCUDACluster, paper crop and grid, crops read from Zarr; cells/s per GPU
"$PYTHON" benchmarks/bench_plate.py --device cuda 2>&1 | tee "$OUT/gpu_check_bench_plate.txt"
plate_status=${PIPESTATUS[0]}

# Training (issue #6): GPU-marked training tests, then cells/s trained (bf16 autocast, channels_last_3d)
# at the paper's grids for plain cross-entropy and with the Grad-CAMO regulariser.
"$PYTHON" -m pytest tests/jobs/test_train.py tests/engine/test_regularize.py -rA -p no:cacheprovider \
    2>&1 | tee "$OUT/gpu_check_train_tests.txt"
train_tests_status=${PIPESTATUS[0]}
"$PYTHON" benchmarks/bench_train_speed.py --device cuda 2>&1 | tee "$OUT/gpu_check_train.txt"
train_status=${PIPESTATUS[0]}

echo "gpu_check: tests exit $tests_status, benchmark exit $bench_status, plate benchmark exit $plate_status," \
    "training tests exit $train_tests_status, training speed exit $train_status; cells/s:"
grep -E "cells/s|^\[bench_explain\]|^\[bench_train_speed\]" "$OUT/gpu_check_bench.txt" "$OUT/gpu_check_bench_plate.txt" \
    "$OUT/gpu_check_train.txt" || true
[ "$tests_status" -eq 0 ] && [ "$bench_status" -eq 0 ] && [ "$plate_status" -eq 0 ] && [ "$train_tests_status" -eq 0 ] \
    && [ "$train_status" -eq 0 ]
