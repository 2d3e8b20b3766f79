#!/usr/bin/env bash
# Build tools from the llama.cpp that is vendored in the llama-cpp-python==0.3.36 sdist (PyPI),
# CPU only, Release, and install the binaries into $CACHE/llama.cpp/bin.
#
#   scripts/build-llama-cpp.sh                      # builds llama-quantize
#   scripts/build-llama-cpp.sh llama-quantize llama-bench llama-eval-callback llama-gguf-split
#   scripts/build-llama-cpp.sh llama-server         # the peer for bench/prefix.sh and bench/serving.sh
#                                                   # (no web UI: it would come from the network)
#
# Idempotent: the sdist is downloaded once, extracted once, configured once; ninja rebuilds nothing
# that is up to date. Environment:
#   TESSERA_CACHE   cache root (default $HOME/.cache/tessera)
#   JOBS            parallel compile jobs (default 2)
#   NICE            niceness for the compile (default 10)
#   ISA             `native` (default: -march=native) or `avx2` (a portable AVX2 + FMA + F16C build with
#                   AVX-512 off, as on Zen 2/3 or Haswell-to-Broadwell servers: its own build and bin dirs)
# The last line of stdout is the bin directory.
set -euo pipefail

LCP_VERSION=0.3.36
CACHE="${TESSERA_CACHE:-$HOME/.cache/tessera}"
DL="$CACHE/dl"
SRC_ROOT="$CACHE/src"
SRC="$SRC_ROOT/llama_cpp_python-$LCP_VERSION/vendor/llama.cpp"
ISA="${ISA:-native}"
case "$ISA" in
    native) SUFFIX=""; ISA_FLAGS=() ;;
    avx2) SUFFIX="-avx2"
          ISA_FLAGS=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
                     -DGGML_BMI2=ON -DGGML_AVX512=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF
                     -DGGML_AVX_VNNI=OFF) ;;
    *) echo "[build-llama-cpp] ISA must be native or avx2, not '$ISA'" >&2; exit 2 ;;
esac
BUILD="$CACHE/build/llama.cpp-$LCP_VERSION$SUFFIX"
BIN="$CACHE/llama.cpp/bin$SUFFIX"
JOBS="${JOBS:-2}"
NICE="${NICE:-10}"
PY="${PYTHON:-python3}"

if [ "$#" -eq 0 ]; then
    set -- llama-quantize
fi
TARGETS=("$@")

log() { echo "[build-llama-cpp] $*" >&2; }

mkdir -p "$DL" "$SRC_ROOT" "$BIN"

# 1. the sdist (not a wheel: --no-binary for this one package only; ':all:' would build cmake from source)
SDIST="$DL/llama_cpp_python-$LCP_VERSION.tar.gz"
if [ ! -s "$SDIST" ]; then
    log "downloading llama-cpp-python==$LCP_VERSION sdist"
    "$PY" -m pip download --no-deps --no-binary llama-cpp-python -d "$DL" "llama-cpp-python==$LCP_VERSION" >&2
fi
[ -s "$SDIST" ] || { log "sdist not found at $SDIST"; exit 1; }

# 2. extract (once)
if [ ! -f "$SRC/CMakeLists.txt" ]; then
    log "extracting $SDIST"
    tmp="$SRC_ROOT/.extract.$$"
    rm -rf "$tmp"; mkdir -p "$tmp"
    tar xzf "$SDIST" -C "$tmp"
    rm -rf "$SRC_ROOT/llama_cpp_python-$LCP_VERSION"
    mv "$tmp/llama_cpp_python-$LCP_VERSION" "$SRC_ROOT/"
    rm -rf "$tmp"
fi

# 3. cmake + ninja from PyPI, unless already on PATH
need_tools=()
command -v cmake >/dev/null 2>&1 || need_tools+=(cmake)
command -v ninja >/dev/null 2>&1 || need_tools+=(ninja)
if [ "${#need_tools[@]}" -gt 0 ]; then
    log "pip install ${need_tools[*]}"
    "$PY" -m pip install "${need_tools[@]}" >&2
    hash -r
    # pip may have put the entry points in a user/script dir that is not on PATH
    scripts_dir="$("$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')"
    export PATH="$scripts_dir:$HOME/.local/bin:$PATH"
fi
command -v cmake >/dev/null && command -v ninja >/dev/null || { log "cmake/ninja not available"; exit 1; }

# 4. configure (once; again for a build dir configured before llama-server was one of the targets)
if [ ! -f "$BUILD/build.ninja" ] || grep -q '^LLAMA_BUILD_SERVER:BOOL=OFF' "$BUILD/CMakeCache.txt" 2>/dev/null; then
    log "configuring in $BUILD"
    mkdir -p "$BUILD"
    nice -n "$NICE" cmake -S "$SRC" -B "$BUILD" -G Ninja \
        -DCMAKE_BUILD_TYPE=Release \
        -DBUILD_SHARED_LIBS=OFF \
        -DLLAMA_CURL=OFF \
        -DLLAMA_OPENSSL=OFF \
        -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_SERVER=ON \
        -DLLAMA_USE_PREBUILT_UI=OFF \
        -DLLAMA_BUILD_UI=OFF \
        -DLLAMA_BUILD_TOOLS=ON \
        -DLLAMA_BUILD_EXAMPLES=ON \
        -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF \
        -DGGML_CCACHE=OFF \
        "${ISA_FLAGS[@]}" \
        >&2
fi

# 5. build the requested targets and install them
log "building ${TARGETS[*]} with -j$JOBS"
nice -n "$NICE" cmake --build "$BUILD" --config Release -j "$JOBS" --target "${TARGETS[@]}" >&2
for t in "${TARGETS[@]}"; do
    case "$t" in llama|ggml|ggml-*) continue ;; esac   # libraries stay in the build tree
    if [ -x "$BUILD/bin/$t" ]; then
        install -m 0755 "$BUILD/bin/$t" "$BIN/$t"
        log "installed $BIN/$t"
    else
        log "target $t built but $BUILD/bin/$t not found"; exit 1
    fi
done
echo "$BIN"
