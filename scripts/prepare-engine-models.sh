#!/usr/bin/env bash
# Make the model files the engine's reference tests run on, into $TESSERA_CACHE/models
# (default ~/.cache/tessera/models), and check each one against the sha256 recorded in
# tests/fixtures/engine/models.json (the exact bytes the committed references were computed on).
#
#   scripts/prepare-engine-models.sh                 # everything (builds llama-quantize if missing)
#   scripts/prepare-engine-models.sh --no-kquants    # skip the 5 llama-quantize-made k-quant models
#   scripts/prepare-engine-models.sh --bench         # + benchmark-only Llama-3.2-1B-shaped model (~4 GB, not checked)
#
# What it makes (see tests/fixtures/engine/README.md):
#   SmolLM2-135M-Instruct.{F32,F16,BF16,Q8_0,Q4_0}.gguf  from the shipped Q4_1 (gguf.quants, numpy only)
#   SmolLM2-135M-Instruct.hf-f32/                         HF safetensors twin of the F32 file
#   synth-llama3-kq.F32.gguf                              seeded random Llama-3-shaped model, real Llama 3 vocab
#   synth-llama3-kq.{Q2_K,Q3_K,Q4_K,Q5_K,Q6_K}.gguf       llama-quantize --pure of the F32 file
#   synth-llama31-longctx.F32.gguf + .hf-f32/             llama3 rope scaling (rope_freqs.weight), toy vocab
#
# Only the k-quant models need llama.cpp (llama-quantize, from the llama-cpp-python 0.3.36 sdist via
# scripts/build-llama-cpp.sh: about 10 minutes on 2 cores the first time, cached afterwards). Everything
# else needs numpy + gguf + safetensors (scripts/requirements-fixtures.txt) and takes about 2 minutes.
# Idempotent: existing files are kept (and checked). Exit status 1 on any sha256 mismatch.
# Environment: TESSERA_CACHE, PYTHON (default python3), JOBS/NICE (passed to build-llama-cpp.sh).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="${PYTHON:-python3}"
CACHE="${TESSERA_CACHE:-$HOME/.cache/tessera}"
KQ=1
BENCH=()
for a in "$@"; do
    case "$a" in
        --no-kquants) KQ=0 ;;
        --bench) BENCH=(--bench) ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
        *) echo "unknown argument $a" >&2; exit 2 ;;
    esac
done

log() { echo "[prepare-engine-models] $*" >&2; }

"$PY" -c 'import gguf, numpy, safetensors' 2>/dev/null || {
    log "installing scripts/requirements-fixtures.txt"
    "$PY" -m pip install -r "$HERE/requirements-fixtures.txt" >&2
}

"$HERE/fetch-smollm2.sh" >/dev/null

ARGS=()
if [ "$KQ" = 1 ]; then
    Q="$CACHE/llama.cpp/bin/llama-quantize"
    if [ ! -x "$Q" ]; then
        need=0
        for t in Q2_K Q3_K Q4_K Q5_K Q6_K; do
            [ -f "$CACHE/models/synth-llama3-kq.$t.gguf" ] || need=1
        done
        if [ "$need" = 1 ]; then
            log "building llama-quantize (scripts/build-llama-cpp.sh, ~10 min the first time)"
            "$HERE/build-llama-cpp.sh" llama-quantize >/dev/null
        fi
    fi
    [ -x "$Q" ] && ARGS+=(--quantize "$Q")
else
    ARGS+=(--no-kquants)
fi

"$PY" "$HERE/gen_engine_refs.py" models "${ARGS[@]}" "${BENCH[@]}"
echo "$CACHE/models"
