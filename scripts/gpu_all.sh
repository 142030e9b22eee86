#!/usr/bin/env bash
# Everything that needs the GPU after the code is done, in one call (~10 min on an H100/H200):
# kernel parity (fp32/bf16/fp16, real Triton), the nano-step benchmark, and the kernel, attention and loader
# benchmarks, each under its own time limit. Results in $OUT; the summary tables print last.
#   OUT=/some/folder bash scripts/gpu_all.sh          (wheels from .whl/ are installed by gpu_session.sh setup)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
rm -f /tmp/site/.done; bash scripts/gpu_session.sh setup
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
echo "== kernel parity on the GPU"
timeout 170 python3 -m pytest -q tests/kernels -p no:cacheprovider -x 2>&1 | tail -4 | tee "$OUT/kernels_tests.log"
echo "== nano step"
timeout 230 python3 bench/bench_step.py --out "$OUT/step.json" \
  --variants ref-eager,triton-eager,ref-compile,triton-compile,pixart-eager,ref-eager-fp32 2>&1 \
  | grep -v "^W1\|warn" | tail -12 | tee "$OUT/step.log"
echo "== attention"
timeout 80 python3 bench/bench_attention.py --json "$OUT/attention.json" --budget-s 50 \
  --providers cudnn,sdpa,sdpa-efficient,sdpa-flash,flex 2>&1 | grep -v "^W1" | tail -14 | tee "$OUT/attention.log"
echo "== loaders"
timeout 60 python3 bench/bench_loader.py --out "$OUT" --samples 1000 --batches 120 --variants gpu-cache,webdataset-w8,webdataset-w14 2>&1 \
  | tail -8 | tee "$OUT/loader.log"
echo "== kernels"
timeout 70 python3 bench/bench_kernels.py --out "$OUT/kernels.json" --shapes nano,large 2>&1 | tail -26
