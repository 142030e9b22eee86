#!/usr/bin/env bash
# One script for the lent GPU machine (torch 2.11, Python 3.12, no network). Phases, in any order:
#   setup        install the carried wheels (.whl/) into /tmp/site (idempotent while the machine stays warm)
#   env          card, versions, what is installed
#   tests        the GPU test cases (kernels bf16/fp16, attention backends, model parity, loaders)
#   train-short  the nano config for a few hundred steps: fp32/bf16 x eager/compile (ms/step, samples/s, memory)
#   nano-start   the full nano run (5k steps, validation every 1000) in the background (setsid)
#   nano-wait S  wait up to S seconds for it, then copy its report into $OUT
# Usage: bash scripts/gpu_session.sh setup env tests ...      (results land in $OUT)
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."

phase_setup() {
  if [ -f /tmp/site/.done ]; then echo "setup: /tmp/site ready"; return; fi
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && touch /tmp/site/.done && echo "setup: installed $(ls .whl | wc -l) wheels"
}

phase_env() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 - <<'EOF'
import torch, triton, importlib
print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())
for m in ("omegaconf", "webdataset", "lpips", "diffusers", "skimage", "pytest_benchmark", "flash_attn"):
    try:
        mod = importlib.import_module(m); print(m, getattr(mod, "__version__", "?"))
    except Exception as e:
        print(m, "MISSING", e.__class__.__name__)
import os
hub = os.path.join(torch.hub.get_dir(), "checkpoints")
print("torch hub checkpoints:", os.listdir(hub) if os.path.isdir(hub) else "none")
EOF
}

phase_tests() {
  # TESTS: which test paths (default: every GPU case except the validation power tests, which train for minutes)
  timeout 420 python3 -m pytest -q -m "gpu" ${TESTS:-tests --deselect tests/test_validate.py} -p no:cacheprovider \
    --junitxml="$OUT/gpu_tests.xml" 2>&1 \
    | tee "$OUT/gpu_tests.log" | tail -25
}

phase_train_short() {
  : > "$OUT/train_short.jsonl"
  for mode in "fp32 false" "bf16 false" "bf16 true" "fp32 true"; do
    set -- $mode
    for k in ${KERNELS:-ref}; do
      mkdir -p /tmp/runs; dir=/tmp/runs/short-$1-c$2-$k
      rm -rf "$dir"
      timeout 240 python3 -m nanodit.train --config nano run.dir="$dir" train.steps=300 train.precision=$1 \
        train.compile=$2 model.kernels=$k val.every=0 val.at_end=false run.progress=false train.log_every=50 \
        data.cache_dir=/tmp/cache > "$dir.log" 2>&1
      python3 - "$dir" "$1" "$2" "$k" >> "$OUT/train_short.jsonl" <<'EOF'
import json, sys
d, prec, comp, k = sys.argv[1:]
try:
    rows = [json.loads(l) for l in open(f"{d}/metrics.jsonl")]
    s = json.load(open(f"{d}/summary.json"))
    steady = rows[2:]  # skip the first 100 steps (compile, warm-up)
    ms = sum(r["ms_per_step"] for r in steady) / len(steady)
    print(json.dumps({"precision": prec, "compile": comp, "kernels": k, "ms_per_step": ms,
                      "samples_per_s": 16000 / ms, "loss_first": rows[0]["loss"], "loss_last": rows[-1]["loss"],
                      "peak_memory_gb": s["peak_memory_gb"], "device": s["device"]}))
except Exception as e:
    print(json.dumps({"precision": prec, "compile": comp, "kernels": k, "error": repr(e)[:300]}))
EOF
      tail -1 "$OUT/train_short.jsonl"
    done
  done
}

phase_nano_start() {
  rm -rf /tmp/runs/nano && mkdir -p /tmp/runs
  setsid nohup python3 -m nanodit.train --config nano run.dir=/tmp/runs/nano data.cache_dir=/tmp/cache \
    run.progress=false "${NANO_ARGS[@]}" > /tmp/runs/nano.log 2>&1 < /dev/null &
  echo "nano: started (pid $!) with ${NANO_ARGS[*]:-defaults}"
}

phase_nano_wait() {
  local budget=$1 t=0
  while [ $t -lt "$budget" ] && ! grep -q "^run folder:" /tmp/runs/nano.log 2>/dev/null \
        && ! grep -q "^error:\|Traceback" /tmp/runs/nano.log 2>/dev/null; do
    sleep 10; t=$((t + 10))
  done
  tail -5 /tmp/runs/nano.log
  tail -1 /tmp/runs/nano/metrics.jsonl 2>/dev/null
  cp /tmp/runs/nano.log "$OUT/nano.log" 2>/dev/null
  if [ -d /tmp/runs/nano ]; then
    tar -C /tmp/runs -czf "$OUT/nano_run.tgz" --exclude='nano/checkpoints' --exclude='nano/tensorboard' nano
  fi
}

NANO_ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    setup) phase_setup ;;
    env) phase_env ;;
    tests) phase_tests ;;
    train-short) phase_train_short ;;
    nano-start) shift; IFS=' ' read -r -a NANO_ARGS <<< "${1:-}"; phase_nano_start ;;
    nano-wait) shift; phase_nano_wait "$1" ;;
    *) echo "unknown phase $1"; exit 2 ;;
  esac
  shift
done
