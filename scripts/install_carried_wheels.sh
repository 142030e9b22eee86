#!/usr/bin/env bash
# On the GPU machine (no network): collect the wheel parts carried by this and earlier calls, and once
# every part and wheel is there, install them all into /tmp/site.  Run it in every call that carries a
# part (from the repo root); it is idempotent.  Made by scripts/fetch_flash_wheels.sh; see scripts/README.md.
#
#   bash scripts/install_carried_wheels.sh && export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages
#
# /tmp survives between calls only while the machine stays warm (~30 s after a call): send the calls
# back to back.  Exit status: 0 installed (now or before), 3 parts still missing, 1 error.
set -euo pipefail
cd "$(dirname "$0")/.."
PARTS=/tmp/whl_parts
WHEELS=/tmp/whl_flash
SITE=/tmp/site
PY=${PYTHON:-python3}
mkdir -p "$PARTS" "$WHEELS"

if [ -f "$SITE/.installed" ]; then
  echo "install_carried_wheels: already installed in $SITE"
  exit 0
fi

# 1. keep what this call carried
for d in .whl_flash_p*/; do
  [ -d "$d" ] || continue
  part=$(ls "$d" | grep '\.part[0-9]*$' || true)
  [ -n "$part" ] || continue
  cp -n "$d$part" "$PARTS/"
  cp "$d/PARTS" "$PARTS/$part.PARTS"
  echo "install_carried_wheels: kept $part"
done
if [ -d .whl_flash ]; then
  cp -n .whl_flash/*.whl "$WHEELS/" 2>/dev/null || true
  cp .whl_flash/MANIFEST "$WHEELS/MANIFEST"
  echo "install_carried_wheels: kept $(ls .whl_flash/*.whl | wc -l) small wheels and MANIFEST"
fi

# 2. join every big wheel whose parts are all here, and check it
for info in "$PARTS"/*.PARTS; do
  [ -f "$info" ] || continue
  read -r name count sum <"$info"
  [ -f "$WHEELS/$name" ] && continue
  have=$(ls "$PARTS/$name".part[0-9]* 2>/dev/null | grep -cv '\.PARTS$' || true)
  if [ "$have" -lt "$count" ]; then
    echo "install_carried_wheels: $name: $have of $count parts here; carry the others next (back to back)"
    continue
  fi
  cat $(ls "$PARTS/$name".part[0-9]* | grep -v '\.PARTS$' | sort) >"$WHEELS/$name.tmp"
  if [ "$(sha256sum "$WHEELS/$name.tmp" | cut -d' ' -f1)" != "$sum" ]; then
    echo "install_carried_wheels: $name: sha256 mismatch after joining the parts" >&2
    rm -f "$WHEELS/$name.tmp"
    exit 1
  fi
  mv "$WHEELS/$name.tmp" "$WHEELS/$name"
  echo "install_carried_wheels: joined $name ($count parts, sha256 ok)"
done

# 3. install once every wheel of the manifest is here
if [ ! -f "$WHEELS/MANIFEST" ]; then
  echo "install_carried_wheels: .whl_flash (small wheels + MANIFEST) not carried yet"
  exit 3
fi
missing=$(while read -r w; do [ -f "$WHEELS/$w" ] || echo "$w"; done <"$WHEELS/MANIFEST")
if [ -n "$missing" ]; then
  echo "install_carried_wheels: still missing: $missing"
  exit 3
fi
# --target skips .pth files: the cutlass DSL's dsl_packages path goes on PYTHONPATH instead
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
  $(sed "s|^|$WHEELS/|" "$WHEELS/MANIFEST")
touch "$SITE/.installed"
echo "install_carried_wheels: installed $(wc -l <"$WHEELS/MANIFEST") wheels into $SITE"
echo "export PYTHONPATH=$SITE:$SITE/nvidia_cutlass_dsl/dsl_packages\${PYTHONPATH:+:\$PYTHONPATH}"
