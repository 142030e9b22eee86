#!/usr/bin/env bash
# One script for the lent GPU machine (torch 2.11, Python 3.12, no network). Phases, in any order:
#   setup        install the carried wheels (.whl/) into /tmp/site (idempotent while the machine stays warm)
#   env          card, versions, what is installed
#   tests        the GPU test cases (kernels bf16/fp16, attention backends, model parity, loaders)
#   kernel-tests the kernel parity suite on CUDA (tests/kernels: fp32/bf16/fp16 grid, both compile doors, nano model);
#                KT_WORKERS pytest-xdist workers (default 8; the suite is Triton/Inductor compile time, CPU-bound);
#                KT_ARGS extra pytest arguments (e.g. a --deselect)
#   old-bench    bench_kernels.py (script mode, triton only, row kernels) on the code of the ignored folder OLD_TREE
#                (git archive of an older commit's nanodit/), for before/after numbers from one machine and run
#   ncu          Nsight Compute (--set full) of the row kernels at the large bench shape (scripts/ncu_kernels.py;
#                NCU_OPS picks ops, NCU_REGEX the kernels, e.g. '_kernel$' for flow_loss's finish and scale): ncu_rows.ncu-rep, ncu_details.txt, and ncu_summary.txt (key metrics)
#   step         bench/bench_step.py --profile (VARIANTS env: comma list; default all): ms/step, GPU-busy ms
#   train-short  the nano config for a few hundred steps: fp32/bf16 x eager/compile (ms/step, samples/s, memory);
#                MODES (default "fp32 false,bf16 false,bf16 true,fp32 true") and KERNELS (default ref) pick runs
#   sweep        tile/stage sweep of the row kernels (bench_kernels.py --sweep); exports the winners
#                (NANODIT_FWD_TILES, NANODIT_BWD_TILES, NANODIT_BWD_STAGES) for the phases after it
#   kernel-bench pytest bench/bench_kernels.py --benchmark-only (+ the summary table)
#   profile      the trainer with train.profile_steps=20 (PROFILE_MODES, default "fp32 false default model,
#                bf16 false default model,bf16 true reduce-overhead blocks"): wall vs GPU-busy, host ms per region
#   flex-debug   scripts/debug_flex.py (which stage of FlexAttention faults in the attention benchmark)
#   nano-start   the full nano run (5k steps, validation every 1000) in the background (setsid)
#   nano-wait S  wait up to S seconds for it, then copy its report into $OUT
#   decision-time  bench/decision_time.py: the default job cold, then warm (compile caches), each a fresh process
#                (~265 s + ~220 s on an H200 at d2a9b5b: a call holds it only with little else; DT_TIMEOUT, default 540;
#                DT_ARGS extra arguments, e.g. "--bench triton-compile-cg"); decision_time.json is written after the
#                cold run too, so a cut warm run still leaves the cold numbers
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

phase_kernel_tests() {
  local par=""
  python3 -c "import xdist" 2>/dev/null && par="-n ${KT_WORKERS:-8}"
  timeout ${KT_TIMEOUT:-600} python3 -m pytest -q tests/kernels $par ${KT_ARGS:-} -p no:cacheprovider --durations=5 \
    --junitxml="$OUT/kernels_tests.xml" > "$OUT/kernels_tests.log" 2>&1
  grep -E "^(FAILED|ERROR)" "$OUT/kernels_tests.log" | head -20
  tail -3 "$OUT/kernels_tests.log"
}

phase_old_bench() {
  [ -d "${OLD_TREE:-}/nanodit" ] || { echo "old-bench: OLD_TREE=${OLD_TREE:-} has no nanodit/"; return; }
  PYTHONPATH=$PWD/$OLD_TREE:$PYTHONPATH timeout 300 python3 bench/bench_kernels.py --providers triton \
    --kernels ${OLD_KERNELS:-modulate,gated_residual,residual_modulate,residual_modulate_gated,flow_loss} --out "$OUT/kernels_old.json" \
    > "$OUT/kernels_old.log" 2>&1
  # from /tmp: python -c puts the working directory (this checkout) first on sys.path, a script its own folder
  (cd /tmp && PYTHONPATH=$OLDPWD/$OLD_TREE:$PYTHONPATH python3 -c "import nanodit.kernels as k; print('old-bench used', k.__file__)")
  python3 bench/bench_kernels.py --table "$OUT/kernels_old.json" | tee "$OUT/kernels_old_summary.txt" | head -20
}

phase_ncu() {
  local ncu
  ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  [ -n "$ncu" ] || { echo "ncu: not found"; return; }
  timeout ${NCU_TIMEOUT:-300} "$ncu" --clock-control none --profile-from-start off -k regex:"${NCU_REGEX:-_(fwd|bwd)_kernel\$}" \
    --set full --import-source no -f -o "$OUT/ncu_rows" python3 scripts/ncu_kernels.py ${NCU_OPS:-} > "$OUT/ncu.log" 2>&1
  tail -3 "$OUT/ncu.log"
  "$ncu" --import "$OUT/ncu_rows.ncu-rep" --page details > "$OUT/ncu_details.txt" 2>&1
  grep -E "^  _|Duration|DRAM Throughput|Memory Throughput|Compute \(SM\) Throughput|Registers Per|Achieved Occupancy|Theoretical Occupancy|Block Limit Reg|Issue Slots Busy|Warp Cycles Per Issued|Eligible Warps|No Eligible|Dynamic Shared|L2 Hit Rate|Mem Busy|Max Bandwidth|Executed Ipc A" \
    "$OUT/ncu_details.txt" | tee "$OUT/ncu_summary.txt" | head -120
}

phase_step() {
  timeout ${STEP_TIMEOUT:-540} python3 bench/bench_step.py --profile --out "$OUT/step.json" \
    ${VARIANTS:+--variants "$VARIANTS"} 2>&1 | grep -v "^W[0-9]" | tee "$OUT/step.log" | tail -20
}

phase_train_short() {
  touch "$OUT/train_short.jsonl"
  IFS=',' read -r -a modes <<< "${MODES:-fp32 false,bf16 false,bf16 true,fp32 true}"
  for mode in "${modes[@]}"; do
    set -- $mode
    for k in ${KERNELS:-ref}; do
      mkdir -p /tmp/runs; dir=/tmp/runs/short-$1-c$2-$k-${COMPILE_MODE:-default}-${RUN_TAG:-x}
      rm -rf "$dir"
      timeout ${TRAIN_TIMEOUT:-240} python3 -m nanodit.train --config nano run.dir="$dir" train.steps=300 train.precision=$1 \
        train.compile=$2 train.compile_mode=${COMPILE_MODE:-default} model.kernels=$k val.every=0 val.at_end=false run.progress=false train.log_every=50 \
        data.cache_dir=/tmp/cache ${TRAIN_ARGS:-} > "$dir.log" 2>&1
      python3 - "$dir" "$1" "$2" "$k" "${COMPILE_MODE:-default}" >> "$OUT/train_short.jsonl" <<'EOF'
import json, os, sys
d, prec, comp, k, cmode = sys.argv[1:]
try:
    rows = [json.loads(l) for l in open(f"{d}/metrics.jsonl")]
    s = json.load(open(f"{d}/summary.json"))
    steady = rows[2:]  # skip the first 100 steps (compile, warm-up)
    ms = sum(r["ms_per_step"] for r in steady) / len(steady)
    sps = sum(r["samples_per_s"] for r in steady) / len(steady)  # the real batches (partial ones included)
    print(json.dumps({"precision": prec, "compile": comp, "compile_mode": cmode, "kernels": k, "ms_per_step": ms,
                      "samples_per_s": sps, "loss_first": rows[0]["loss"], "loss_last": rows[-1]["loss"],
                      "peak_memory_gb": s["peak_memory_gb"], "device": s["device"],
                      "data_wait_frac": sum(r.get("data_wait_frac", 0) for r in steady) / len(steady),
                      "extra": os.environ.get("TRAIN_ARGS", "")}))
except Exception as e:
    print(json.dumps({"precision": prec, "compile": comp, "kernels": k, "error": repr(e)[:300],
                      "extra": os.environ.get("TRAIN_ARGS", "")}))
EOF
      tail -1 "$OUT/train_short.jsonl"
    done
  done
}

phase_sweep() {
  timeout ${SWEEP_TIMEOUT:-300} python3 bench/bench_kernels.py --sweep --sweep-env "$OUT/kernels_best.env" \
    > "$OUT/kernels_sweep.txt" 2>&1
  tail -4 "$OUT/kernels_sweep.txt"
  if [ -s "$OUT/kernels_best.env" ]; then source "$OUT/kernels_best.env"; cat "$OUT/kernels_best.env"; fi
}

phase_kernel_bench() {
  python3 -m pytest bench/bench_kernels.py --benchmark-only --benchmark-json="$OUT/kernels_bench.json" -q \
    -p no:cacheprovider --benchmark-columns=median,rounds > "$OUT/kernels_bench.log" 2>&1
  tail -1 "$OUT/kernels_bench.log"
  python3 bench/bench_kernels.py --table "$OUT/kernels_bench.json" | tee "$OUT/kernels_summary.txt"
}

phase_profile() {
  IFS=',' read -r -a modes <<< "${PROFILE_MODES:-fp32 false default model,bf16 false default model,bf16 true reduce-overhead blocks}"
  for mode in "${modes[@]}"; do
    set -- $mode
    dir=/tmp/runs/prof-$1-c$2-$3-$4; rm -rf "$dir"; mkdir -p /tmp/runs
    timeout ${TRAIN_TIMEOUT:-240} python3 -m nanodit.train --config nano run.dir="$dir" train.steps=${PROFILE_END:-150} \
      train.precision=$1 train.compile=$2 train.compile_mode=$3 train.compile_scope=$4 val.every=0 val.at_end=false \
      run.progress=false train.log_every=50 train.profile_start=${PROFILE_START:-120} train.profile_steps=20 \
      data.cache_dir=/tmp/cache ${TRAIN_ARGS:-} > "$dir.log" 2>&1
    tag=$1-c$2-$3-$4
    cp "$dir/profile/summary.txt" "$OUT/profile_$tag.txt" 2>/dev/null || tail -5 "$dir.log"
    python3 -c "import json,sys; s=json.load(open(sys.argv[1])); s.pop('top_kernels'); print(sys.argv[2], json.dumps(s))" \
      "$dir/profile/summary.json" "$tag" 2>/dev/null | tee -a "$OUT/profile.jsonl"
  done
}

phase_flex_debug() {
  [ "${FLEX_STAGES:-1}" = 1 ] && for c in cross self; do
    CUDA_LAUNCH_BLOCKING=1 timeout 150 python3 scripts/debug_flex.py $c > "$OUT/flex_debug_$c.log" 2>&1
    grep -v "^W[0-9]" "$OUT/flex_debug_$c.log" | grep -E "ok$|FAILED|Error|error" | head -12
  done
  for v in leaves detached eager; do
    CUDA_LAUNCH_BLOCKING=1 timeout 100 python3 scripts/debug_flex.py cross $v > "$OUT/flex_nograd_$v.log" 2>&1
    echo "$v: $(grep -v "^W[0-9]" "$OUT/flex_nograd_$v.log" | grep -E "ok$|FAILED|Error" | head -2 | tr '\n' ' ')"
  done
}

phase_decision_time() {
  rm -rf /tmp/dt
  timeout ${DT_TIMEOUT:-540} python3 bench/decision_time.py --out "$OUT/decision_time.json" --keep /tmp/dt ${DT_ARGS:-} \
    > "$OUT/decision_time.log" 2>&1
  echo "decision-time: rc=$?"; cat "$OUT/decision_time.json" 2>/dev/null
  for d in cold warm; do
    cp /tmp/dt/$d/summary.json "$OUT/${d}_summary.json" 2>/dev/null
    cp /tmp/dt/$d/report/report.md "$OUT/${d}_report.md" 2>/dev/null
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
    kernel-tests) phase_kernel_tests ;;
    ncu) phase_ncu ;;
    old-bench) phase_old_bench ;;
    step) phase_step ;;
    train-short) phase_train_short ;;
    sweep) phase_sweep ;;
    kernel-bench) phase_kernel_bench ;;
    profile) phase_profile ;;
    flex-debug) phase_flex_debug ;;
    nano-start) shift; IFS=' ' read -r -a NANO_ARGS <<< "${1:-}"; phase_nano_start ;;
    nano-wait) shift; phase_nano_wait "$1" ;;
    decision-time) phase_decision_time ;;
    *) echo "unknown phase $1"; exit 2 ;;
  esac
  shift
done
