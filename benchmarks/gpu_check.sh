#!/usr/bin/env bash
# GPU check (issues #19, #15): on a CUDA machine, in at most GPU_CHECK_BUDGET_S seconds (default 540 = 9 min):
#   1. env         versions, GPU, whether bf16 conv3d is trusted (torch 2.9.0 / cuDNN 9.8-9.10 are not)
#   2. tests       the GPU-marked tests (engine, cells, pipeline, cluster, training, regulariser; segmentation
#                  too when cellpose imports)
#   3. throughput  cells/s per GPU at the paper grid (crops 6x21x128x128 -> model 64x224x224): fp32, bf16,
#                  autograd vs forward-only (analytic head) Grad-CAM, forward pass alone
#   4. profile     torch.profiler: top 10 CUDA kernels and the share of time the GPU sat idle
#   5. crops       CuPy crops vs NumPy crops of a 6x21x1024x1024 site
#   6. compiled    the forward-only route through torch.compile (default, then reduce-overhead = CUDA graphs)
# Each part runs under `timeout` (a hang costs its own slot, never the budget) and the next part runs whatever
# the last one did. Figures go to benchmarks/results/gpu_check_<part>.json, merged into gpu_check.json and
# gpu_check.md; the whole output is teed into gpu_check.log. When $OUT is set (a lent device machine), the log,
# the merged results, the profile table, the test log and a tarball of the part files are copied there after
# every part.
# Usage:  benchmarks/gpu_check.sh            (GPU machine; PYTHON picks the interpreter, default python3)
#         benchmarks/gpu_check.sh --dry-run  (any machine: CPU, tiny sizes, results in a temporary folder)
# Exit status: 0 when every part passed; 2 without CUDA (not a dry run); 1 when a part failed or timed out,
# or when GPU tests were skipped although CUDA is visible.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; fi
BUDGET_S=${GPU_CHECK_BUDGET_S:-540}
RESERVE_S=15  # summary and copies
START=$(date +%s)
if [ "$DRY" = 1 ]; then
    RESULTS=${GPU_CHECK_RESULTS:-$(mktemp -d /tmp/gpu_check_dry.XXXXXX)}
    BENCH_FLAGS=(--dry-run)
else
    RESULTS=${GPU_CHECK_RESULTS:-benchmarks/results}
    BENCH_FLAGS=()
fi
mkdir -p "$RESULTS"
LOG="$RESULTS/gpu_check.log"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

elapsed() { echo $(( $(date +%s) - START )); }

copy_out() {  # at most 8 files come back from $OUT: 6 here
    [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ] || return 0
    for f in gpu_check.log gpu_check.json gpu_check.md gpu_check_profile.txt gpu_check_tests.txt; do
        [ -f "$RESULTS/$f" ] && cp -f "$RESULTS/$f" "$OUT/$f"
    done
    (cd "$RESULTS" && ls gpu_check_*.json >/dev/null 2>&1 \
        && tar czf "$OUT/gpu_check_parts.tgz" gpu_check_*.json) || true
}

FAILED=()
run_part() {  # run_part NAME MAX_SECONDS COMMAND...
    local name=$1 max=$2
    shift 2
    local left=$(( BUDGET_S - RESERVE_S - $(elapsed) ))
    local limit=$(( max < left ? max : left ))
    if [ "$limit" -lt 10 ]; then
        echo "gpu_check: SKIPPED part $name: ${left} s of the budget left"
        FAILED+=("$name:skipped")
        return
    fi
    echo "=== gpu_check: part $name (at most ${limit} s; $(elapsed) s spent)"
    timeout -k 5 "$limit" "$@"
    local rc=$?
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        echo "gpu_check: part $name TIMED OUT after ${limit} s (figures measured before that are kept)"
        FAILED+=("$name:timeout")
    elif [ "$rc" -ne 0 ]; then
        echo "gpu_check: part $name FAILED (exit $rc)"
        FAILED+=("$name:exit$rc")
    else
        echo "gpu_check: part $name done ($(elapsed) s spent)"
    fi
    copy_out
}

run_tests() {
    local files=(tests/engine tests/test_cells.py tests/jobs/test_pipeline.py tests/jobs/test_cluster.py
                 tests/jobs/test_prefetch.py tests/jobs/test_train.py)
    if timeout 60 "$PYTHON" -c "import cellpose.models" >/dev/null 2>&1; then
        files+=(tests/segment/test_segment.py)
    else
        echo "gpu_check: cellpose does not import here: segmentation's GPU tests are left out"
    fi
    "$PYTHON" -m pytest "${files[@]}" -m gpu -rA -p no:cacheprovider --timeout 150 2>&1 \
        | tee "$RESULTS/gpu_check_tests.txt"
    local rc=${PIPESTATUS[0]}
    if [ "$DRY" = 0 ] && grep -E "^SKIPPED .*needs a CUDA GPU" "$RESULTS/gpu_check_tests.txt" >/dev/null; then
        echo "gpu_check: GPU tests were skipped although CUDA is visible"
        [ "$rc" -eq 0 ] && rc=3
    fi
    if grep -E "^SKIPPED .*cupy" "$RESULTS/gpu_check_tests.txt" >/dev/null; then
        echo "gpu_check: WARNING: CuPy is not installed, its checks were skipped"
    fi
    return "$rc"
}

main() {
    echo "gpu_check: $(date -u +%FT%TZ) on $(hostname), budget ${BUDGET_S} s, results in $RESULTS, dry run: $DRY"
    if [ "$DRY" = 0 ] && ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
        echo "gpu_check: no CUDA device visible to torch; run this on a GPU machine (or pass --dry-run)"
        return 2
    fi
    local bench=("$PYTHON" benchmarks/bench_gpu.py --out "$RESULTS" "${BENCH_FLAGS[@]}")
    run_part env 45 "${bench[@]}" env
    run_part tests 150 bash -c run_tests
    run_part throughput 120 "${bench[@]}" throughput --seconds "${GPU_CHECK_SECONDS:-6}"
    run_part profile 50 "${bench[@]}" profile
    run_part crops 45 "${bench[@]}" crops --seconds 3
    run_part compiled 150 "${bench[@]}" compiled --seconds 5
    "$PYTHON" benchmarks/bench_gpu.py summary --out "$RESULTS" || FAILED+=("summary")
    echo "gpu_check: finished in $(elapsed) s; problems: ${FAILED[*]:-none}"
    grep -h "\[bench_gpu\]" "$LOG" 2>/dev/null | grep -E "cells_per_s|idle|vs_" || true
    [ "${#FAILED[@]}" -eq 0 ]
}

export -f run_tests
export PYTHON RESULTS DRY
main "$@" 2>&1 | tee "$LOG"
status=${PIPESTATUS[0]}
copy_out
exit "$status"
