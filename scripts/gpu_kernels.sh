#!/usr/bin/env bash
# GPU check of the Triton kernels (nanodit/kernels): parity tests on CUDA, then the kernel benchmarks.
#
#   OUT=/some/folder bash scripts/gpu_kernels.sh        # ~5 minutes on an H100/H200
#
# Writes into $OUT (default bench/results/kernels-<date>), flat names, 5 files (6 with SWEEP=1):
#   kernels_tests.log   pytest tests/kernels -q (CUDA: full shape grid, fp32/bf16/fp16, compile, nano model)
#   kernels_tests.xml   the same as JUnit XML
#   kernels_bench.log   pytest bench/bench_kernels.py --benchmark-only
#   kernels_bench.json  pytest-benchmark JSON; each benchmark's extra_info holds ms, GB/s, % of copy
#                       bandwidth, card, torch/triton versions, commit
#   kernels_summary.txt the table printed last
#   kernels_sweep.txt   only with SWEEP=1 (+~2 min): % of copy bandwidth per tile config of the row kernels
# Needs: torch with CUDA, triton, pytest, pytest-benchmark. Exit status: non-zero if a test failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/kernels-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

$PY -c 'import torch, triton; assert torch.cuda.is_available(), "no CUDA device"; print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)' || exit 2

echo "== parity tests: pytest tests/kernels (log: $OUT/kernels_tests.log)"
t0=$SECONDS
$PY -m pytest tests/kernels -q -p no:cacheprovider --durations=8 --junitxml="$OUT/kernels_tests.xml" \
    >"$OUT/kernels_tests.log" 2>&1
test_rc=$?
grep -E "^(FAILED|ERROR)" "$OUT/kernels_tests.log" | head -20
tests_line=$(tail -n 1 "$OUT/kernels_tests.log")
echo "   $tests_line ($((SECONDS - t0)) s)"

echo "== benchmarks: pytest bench/bench_kernels.py (log: $OUT/kernels_bench.log)"
t0=$SECONDS
$PY -m pytest bench/bench_kernels.py --benchmark-only --benchmark-json="$OUT/kernels_bench.json" \
    -q -p no:cacheprovider --benchmark-columns=median,rounds >"$OUT/kernels_bench.log" 2>&1
bench_rc=$?
bench_line=$(tail -n 1 "$OUT/kernels_bench.log")
echo "   $bench_line ($((SECONDS - t0)) s)"

if [ "${SWEEP:-0}" = 1 ]; then
    echo "== tile sweep (triton row kernels): $OUT/kernels_sweep.txt"
    timeout 240 $PY bench/bench_kernels.py --sweep >"$OUT/kernels_sweep.txt" 2>&1
    tail -n 16 "$OUT/kernels_sweep.txt"
fi

echo "== summary (bf16; ms = GPU ms per call from CUDA-graph replay, e = eager wall ms per call; GB/s, %copy of the triton op; x ref / x comp = speedups)"
if [ -s "$OUT/kernels_bench.json" ]; then
    $PY bench/bench_kernels.py --table "$OUT/kernels_bench.json" | tee "$OUT/kernels_summary.txt"
else
    echo "no benchmark JSON (see kernels_bench.log)" | tee "$OUT/kernels_summary.txt"
fi
echo "tests: $tests_line" | tee -a "$OUT/kernels_summary.txt"
echo "bench: $bench_line" | tee -a "$OUT/kernels_summary.txt"
[ $test_rc -eq 0 ] && [ $bench_rc -eq 0 ]
