#!/usr/bin/env bash
# GPU check of the loader backends (issue 6): the parity tests with CUDA cases, then the loader benchmark.
#
#   OUT=/some/folder bash scripts/gpu_loaders.sh         # ~3 minutes on an H100/H200
#   bash scripts/gpu_loaders.sh stage                    # a call that only carries a DALI part: keep it, exit
#
# Wheels (the image lacks them; fetched here by scripts/fetch_loader_wheels.sh, carried, never downloaded
# there): .whl_loader/ (webdataset, braceexpand, DALI's small deps, MANIFEST) and, for DALI, the 4 parts
# .whl_dali_p1..p4/ carried by 4 calls back to back on one warm machine (/tmp lasts ~30 s after a call):
#   calls 1-3  carry [.whl_dali_pN]               bash scripts/gpu_loaders.sh stage
#   call 4     carry [.whl_dali_p4, .whl_loader]  bash scripts/gpu_loaders.sh
# Without the DALI parts the DALI cases are skipped with their reason; everything else runs.
#
# Writes into $OUT (default bench/results/loaders-<date>), flat names, 4 files:
#   loaders_tests.log    pytest tests/test_loaders.py (CPU cases + CUDA cases: gpu-cache on the device,
#                        webdataset through pinned memory, DALI's GPU pipeline, against MemoryLoader)
#   loaders_bench.log    python bench/bench_loader.py (the table)
#   bench_loader.json    samples/s, bus MB/sample, start-up, data wait at a 13 ms step; card, versions
#   loaders_summary.txt  the lines printed last
# Exit status: non-zero if a test or the benchmark failed; 3 after 'stage'.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PARTS=/tmp/loader_parts
WHEELS=/tmp/loader_wheels
SITE=/tmp/site_loader
mkdir -p "$PARTS" "$WHEELS"

# ---- 1. keep the DALI parts this call carried, join them once all are here ------------------------------------
for d in .whl_dali_p*/; do
  [ -d "$d" ] || continue
  for p in "$d"*.part[0-9]*; do
    [ -f "$p" ] || continue
    cp -n "$p" "$PARTS/" && cp "$d/PARTS" "$PARTS/PARTS" && echo "gpu_loaders: kept $(basename "$p")"
  done
done
if [ -f "$PARTS/PARTS" ]; then
  read -r name count sum <"$PARTS/PARTS"
  have=$(ls "$PARTS/$name".part[0-9]* 2>/dev/null | wc -l)
  if [ ! -f "$WHEELS/$name" ] && [ "$have" -ge "$count" ]; then
    cat $(ls "$PARTS/$name".part[0-9]* | sort) >"$WHEELS/$name.tmp"
    if [ "$(sha256sum "$WHEELS/$name.tmp" | cut -d' ' -f1)" = "$sum" ]; then
      mv "$WHEELS/$name.tmp" "$WHEELS/$name" && echo "gpu_loaders: joined $name ($count parts, sha256 ok)"
    else
      rm -f "$WHEELS/$name.tmp" && echo "gpu_loaders: $name: sha256 mismatch after joining; DALI skipped" >&2
    fi
  elif [ ! -f "$WHEELS/$name" ]; then
    echo "gpu_loaders: $name: $have of $count parts here; carry the others next (back to back)"
  fi
fi
if [ "${1:-}" = "stage" ]; then
  exit 3
fi

# ---- 2. install the carried wheels into $SITE (no network, no dependency resolution) --------------------------
OUT=${OUT:-bench/results/loaders-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
if [ -d .whl_loader ]; then
  wheels=()
  while read -r w; do
    if [ -f ".whl_loader/$w" ]; then
      wheels+=(".whl_loader/$w")
    elif [ -f "$WHEELS/$w" ]; then
      wheels+=("$WHEELS/$w")
    else
      echo "gpu_loaders: $w not here (DALI parts missing?): installing without it"
    fi
  done <.whl_loader/MANIFEST
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "${wheels[@]}" && echo "gpu_loaders: installed ${#wheels[@]} wheels into $SITE"
else
  echo "gpu_loaders: no .whl_loader carried; using what the image has"
fi
# /tmp/site: the base wheels of scripts/gpu_session.sh setup (omegaconf: the config-driven loader tests need it;
# without it 3 tests failed with ModuleNotFoundError on the H200, third session)
export PYTHONUNBUFFERED=1 PYTHONPATH="$SITE:/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
$PY -c "import omegaconf" 2>/dev/null || echo "gpu_loaders: omegaconf missing: run 'bash scripts/gpu_session.sh setup' first (carry .whl)"

$PY - <<'EOF' || exit 2
import torch
assert torch.cuda.is_available(), "no CUDA device"
import webdataset
try:
    import nvidia.dali as dali
    dali_v = dali.__version__
except ImportError as e:
    dali_v = f"not installed ({e})"
print(torch.cuda.get_device_name(), "torch", torch.__version__, "webdataset", webdataset.__version__, "dali", dali_v)
EOF

# ---- 3. tests, then the benchmark ------------------------------------------------------------------------------
echo "== tests: pytest tests/test_loaders.py (log: $OUT/loaders_tests.log)"
t0=$SECONDS
$PY -m pytest tests/test_loaders.py -q -p no:cacheprovider -rs >"$OUT/loaders_tests.log" 2>&1
test_rc=$?
grep -E "^(FAILED|ERROR|SKIPPED)" "$OUT/loaders_tests.log" | head -20
tests_line=$(tail -n 1 "$OUT/loaders_tests.log")
echo "   $tests_line ($((SECONDS - t0)) s)"

echo "== benchmark: python bench/bench_loader.py (log: $OUT/loaders_bench.log)"
t0=$SECONDS
$PY bench/bench_loader.py --out "$OUT" 2>&1 | grep -v DeprecationWarning | tee "$OUT/loaders_bench.log"
bench_rc=${PIPESTATUS[0]}
echo "   bench exit $bench_rc ($((SECONDS - t0)) s)"

{
  echo "tests: $tests_line"
  grep -E "^(data|index|variant|gpu-cache|webdataset|dali)" "$OUT/loaders_bench.log"
} | tee "$OUT/loaders_summary.txt"
[ $test_rc -eq 0 ] && [ "$bench_rc" -eq 0 ]
