#!/usr/bin/env bash
# The nano step of two trees side by side on one GPU: OLD_TREE (an ignored folder holding
# `git archive <hash> nanodit bench | tar -x`) and this checkout, in alternating fresh processes (new, old, new, old),
# bench_step.py's VARIANTS (default triton-graph, with --profile) at the trainer's caption length T5_LEN (default 32,
# data.t5_pad_multiple of configs/nano.yaml). Writes $OUT/step_{new,old}_<round>.{json,log}.
#   OUT=... OLD_TREE=.old_<hash> OLD_COMMIT=<hash> NEW_COMMIT=<hash> bash scripts/step_ab.sh
set -u
: "${OUT:?}" "${OLD_TREE:?}" "${OLD_COMMIT:?}" "${NEW_COMMIT:?}"
V=${VARIANTS:-triton-graph}
L=${T5_LEN:-32}
ROOT=$PWD
run() { # tree label commit round
  (cd "$1/bench" && NANODIT_COMMIT=$3 PYTHONPATH=/tmp/site timeout "${AB_TIMEOUT:-200}" python3 -c "
import sys, bench_step as b
b.L = $L
sys.argv = ['bench_step', '--variants', '$V', '--profile', '--out', '$OUT/step_$2_$4.json']
b.main()" > "$OUT/step_$2_$4.log" 2>&1)
  echo "step $2 round $4 ($3):"; grep -v "^W[0-9]" "$OUT/step_$2_$4.log" | tail -2
}
for r in $(seq 1 "${ROUNDS:-2}"); do
  run "$ROOT" new "$NEW_COMMIT" "$r"
  run "$ROOT/$OLD_TREE" old "$OLD_COMMIT" "$r"
done
