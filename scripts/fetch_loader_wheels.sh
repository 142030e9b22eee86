#!/usr/bin/env bash
# Fetch the loader backends' wheels that the GPU machine's image lacks (CPython 3.12, x86-64, CUDA 13), for a
# machine with no network: run HERE, where PyPI is reachable, from anywhere in the repo.
#
#   bash scripts/fetch_loader_wheels.sh            # webdataset only (~70 KB): one call
#   bash scripts/fetch_loader_wheels.sh --dali     # + NVIDIA DALI (~200 MB): four calls, back to back
#
# Result (ignored by git through .gitignore's /.whl*/):
#   .whl_loader/        small wheels + MANIFEST (every wheel the install needs, DALI's included with --dali)
#   .whl_dali_p1..p4/   with --dali: the nvidia-dali-cuda130 wheel (199 MB) in 50 MiB parts, one folder each,
#                       each with its PARTS file (wheel name, part count, sha256)
#   .whl_dali_big/      with --dali: the DALI wheel whole, for reference (never carried)
# A device call carries at most 64 MiB, so DALI takes 4 calls on one warm machine (see scripts/README.md):
#   calls 1-3  carry [.whl_dali_pN]               bash scripts/gpu_loaders.sh stage
#   call 4     carry [.whl_dali_p4, .whl_loader]  bash scripts/gpu_loaders.sh
#
# What the image lacks (its package list, 2026-11): webdataset 1.0.2 needs braceexpand, numpy, pyyaml; the
# last two are there. nvidia-dali-cuda130 2.4.0 declares astunparse, gast, six, optree, packaging<=26.3, numpy,
# nvtx, makefun, libcst, nvidia-nvimgcodec-cu13, nvidia-libnvcomp-cu13; the loader's pipeline (webdataset
# reader, numpy decoder, pad, .gpu()) imports only astunparse, gast, optree, six, packaging and loads no
# nvimgcodec/nvcomp/nvjpeg library (checked here with the CPU pipeline: sys.modules and /proc/self/maps), and
# its CUDA libraries (cudart, nvrtc, cublas...) come from torch's nvidia-* cu13 packages. So: the DALI wheel +
# astunparse, gast, optree (six, packaging, numpy are on the image; pip --no-deps skips the version pin).
set -euo pipefail
cd "$(git -C "$(dirname "$0")" rev-parse --show-toplevel)"
PY=${PYTHON:-python3}
SMALL=(webdataset==1.0.2 braceexpand==0.1.7)
DALI_SMALL=(astunparse==1.6.3 gast==0.7.0 optree==0.20.0)
DALI=nvidia-dali-cuda130==2.4.0
PART_SIZE=50M # one part per call, room left for the repo and .whl_loader/ under 64 MiB

with_dali=0
[ "${1:-}" = "--dali" ] && with_dali=1

download() {
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d "$@"
}

rm -rf .whl_loader .whl_dali_p* .whl_dali_big
mkdir -p .whl_loader
download .whl_loader "${SMALL[@]}"
if [ $with_dali = 1 ]; then
  download .whl_loader "${DALI_SMALL[@]}"
  mkdir -p .whl_dali_big
  download .whl_dali_big "$DALI"
fi
ls .whl_loader/*.whl | xargs -n1 basename >.whl_loader/MANIFEST

echo "== Requires-Dist of the fetched wheels (check against the GPU image's package list):"
for w in .whl_loader/*.whl .whl_dali_big/*.whl; do
  [ -f "$w" ] || continue
  { unzip -p "$w" '*.dist-info/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' || true; } |
    sed "s|^|  $(basename "$w"): |"
done

if [ $with_dali = 1 ]; then
  big=$(ls .whl_dali_big/*.whl)
  name=$(basename "$big")
  echo "$name" >>.whl_loader/MANIFEST
  sum=$(sha256sum "$big" | cut -d' ' -f1)
  tmp=$(mktemp -d)
  split -b "$PART_SIZE" -d -a 2 "$big" "$tmp/$name.part"
  parts=("$tmp"/*)
  n=0
  for p in "${parts[@]}"; do
    n=$((n + 1))
    mkdir -p ".whl_dali_p$n"
    mv "$p" ".whl_dali_p$n/"
    printf '%s %s %s\n' "$name" "${#parts[@]}" "$sum" >".whl_dali_p$n/PARTS"
  done
  rmdir "$tmp"
fi

echo "== sizes (bytes):"
du -sb .whl_loader .whl_dali_p* 2>/dev/null | sed 's/^/  /'
if [ $with_dali = 1 ]; then
  last=$(ls -d .whl_dali_p* | wc -l)
  echo "== carry: calls 1..$((last - 1)) [.whl_dali_pN] 'bash scripts/gpu_loaders.sh stage';" \
    "call $last [.whl_dali_p$last, .whl_loader] 'bash scripts/gpu_loaders.sh' (back to back, one warm machine)"
else
  echo "== carry: [.whl_loader] 'bash scripts/gpu_loaders.sh' (DALI rows are skipped)"
fi
