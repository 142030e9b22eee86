#!/usr/bin/env bash
# Fetch flash-attn-4 and the wheels it needs that the GPU machine's image lacks (CPython 3.12, x86-64,
# CUDA 13), for a machine with no network: run HERE, where PyPI is reachable, from anywhere in the repo.
#
#   bash scripts/fetch_flash_wheels.sh
#
# Result (all ignored by git through .gitignore's /.whl*/):
#   .whl_flash/        the small wheels (~10 MB) + MANIFEST (every wheel the install needs)
#   .whl_flash_p1/ …   the big wheel (nvidia-cutlass-dsl-libs-cu13, ~92 MB) in <= 50 MB parts, one
#                      folder each, each with its PARTS file (wheel name, part count, sha256)
#   .whl_flash_big/    the big wheel whole, for reference (never carried)
# A device call carries at most 64 MiB, so: call 1 carries .whl_flash_p1, call 2 carries .whl_flash_p2
# and .whl_flash; each runs scripts/install_carried_wheels.sh (see scripts/README.md).
#
# Versions pinned together (checked 2026-11 from each wheel's Requires-Dist):
#   flash-attn-4 4.0.0b36  needs nvidia-cutlass-dsl>=4.6.2, apache-tvm-ffi>=0.1.11,<0.2, quack-kernels>=0.5.3,
#                          torch-c-dlpack-ext, einops, typing_extensions, torch (the last three are on the image)
#   quack-kernels 0.6.5    needs nvidia-cutlass-dsl>=4.7, apache-tvm-ffi>=0.1.6,<0.2, torch-c-dlpack-ext
#   nvidia-cutlass-dsl 4.8.1 = libs-base + libs-core + libs-cu13 (its cu12 libs are not needed on a CUDA 13
#                          driver: the loader picks the newest flavour the driver supports); they need
#                          cuda-bindings, protobuf, typing-extensions: on the image.
#   torch-c-dlpack-ext 0.1.5 ships addons up to torch 2.9 and does nothing on a torch that has the DLPack
#                          exchange API itself (2.10+).
set -euo pipefail
cd "$(git -C "$(dirname "$0")" rev-parse --show-toplevel)"
PY=${PYTHON:-python3}
WHEELS=(
  flash-attn-4==4.0.0b36
  quack-kernels==0.6.5
  nvidia-cutlass-dsl==4.8.1
  nvidia-cutlass-dsl-libs-base==4.8.1
  nvidia-cutlass-dsl-libs-core==4.8.1
  nvidia-cutlass-dsl-libs-cu13==4.8.1
  apache-tvm-ffi==0.1.15.post2
  torch-c-dlpack-ext==0.1.5
)
PART_SIZE=50M  # one part per call, room left for the repo and .whl_flash/ under 64 MiB

rm -rf .whl_flash .whl_flash_p* .whl_flash_big
mkdir -p .whl_flash .whl_flash_big
"$PY" -m pip download --no-deps --only-binary=:all: --pre --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d .whl_flash "${WHEELS[@]}"

# what the image lacks besides these: read each wheel's Requires-Dist (extras and markers aside)
echo "== Requires-Dist of the fetched wheels (check against the GPU image's package list):"
for w in .whl_flash/*.whl; do
  unzip -p "$w" '*.dist-info/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' | sed "s|^|  $(basename "$w"): |"
done

ls .whl_flash/*.whl | xargs -n1 basename >.whl_flash/MANIFEST
n=0
for w in .whl_flash/*.whl; do
  size=$(stat -c %s "$w")
  if [ "$size" -le $((50 * 1024 * 1024)) ]; then continue; fi
  name=$(basename "$w")
  sum=$(sha256sum "$w" | cut -d' ' -f1)
  mv "$w" .whl_flash_big/
  tmp=$(mktemp -d)
  split -b "$PART_SIZE" -d -a 2 ".whl_flash_big/$name" "$tmp/$name.part"
  parts=("$tmp"/*)
  for p in "${parts[@]}"; do
    n=$((n + 1))
    mkdir -p ".whl_flash_p$n"
    mv "$p" ".whl_flash_p$n/"
    printf '%s %s %s\n' "$name" "${#parts[@]}" "$sum" >".whl_flash_p$n/PARTS"
  done
  rmdir "$tmp"
done

echo "== sizes (bytes):"
du -b .whl_flash/*.whl .whl_flash_big/*.whl .whl_flash_p*/* | sort -k2
du -sb .whl_flash .whl_flash_p* | sed 's/^/  folder /'
echo "== carry: call 1 [.whl_flash_p1]; call 2 [.whl_flash_p2, .whl_flash]; ... each: bash scripts/install_carried_wheels.sh"
