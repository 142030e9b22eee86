#!/usr/bin/env bash
# GPU check of nanodit/attention.py: parity tests on CUDA, then the attention benchmark table.
#
#   OUT=/some/folder bash scripts/gpu_attention.sh        # ~3 minutes on an H100/H200
#
# flash-attn joins when it is importable; carried wheels installed by scripts/install_carried_wheels.sh
# (in /tmp/site) are put on PYTHONPATH here.  Writes into $OUT (default bench/results/attention-<date>):
#   attention_tests.log   pytest tests/test_attention.py (CUDA cases: cudnn, sdpa, flex, flash, auto; bf16/fp32)
#   attention_tests.xml   the same as JUnit XML
#   attention_bench.log   the table: fwd ms, fwd+bwd ms, TFLOP/s per provider, eager and CUDA graph,
#                         best per case against the targets, AUTO_TABLE rows ready to paste
#   attention.json        the same rows + card, versions, commit, date
# Knobs: TEST_TIMEOUT (s, default 150), BENCH_BUDGET (s of benchmarking before the rest is skipped, default 100).
# Exit status: non-zero if a test failed or the benchmark did not finish.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/attention-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -f /tmp/site/.installed ]; then
  export PYTHONPATH="$PYTHONPATH:/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages"
fi

$PY -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print(torch.cuda.get_device_name(), "torch", torch.__version__, "cudnn", torch.backends.cudnn.version())' || exit 2
$PY -c 'import flash_attn.cute, importlib.metadata as m; print("flash-attn-4", m.version("flash-attn-4"))' 2>&1 | tail -1

echo "== parity tests: pytest tests/test_attention.py (log: $OUT/attention_tests.log)"
t0=$SECONDS
timeout "${TEST_TIMEOUT:-150}" $PY -m pytest tests/test_attention.py -q -p no:cacheprovider --durations=5 \
  --junitxml="$OUT/attention_tests.xml" >"$OUT/attention_tests.log" 2>&1
test_rc=$?
grep -E "^(FAILED|ERROR)" "$OUT/attention_tests.log" | head -30
echo "   $(tail -n 1 "$OUT/attention_tests.log") (rc $test_rc, $((SECONDS - t0)) s)"

echo "== benchmark: python bench/bench_attention.py (log: $OUT/attention_bench.log)"
t0=$SECONDS
$PY bench/bench_attention.py --json "$OUT/attention.json" --budget-s "${BENCH_BUDGET:-100}" 2>&1 \
  | grep -v "^W[0-9]" | tee "$OUT/attention_bench.log"
bench_rc=${PIPESTATUS[0]}
echo "   benchmark rc $bench_rc, $((SECONDS - t0)) s"
[ $test_rc -eq 0 ] && [ $bench_rc -eq 0 ]
