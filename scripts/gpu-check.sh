#!/usr/bin/env bash
# Issue 5's GPU checks in one go, for a lent GPU machine that has CUDA but no Rust and no network.
#
#   scripts/gpu-check.sh kit          # here: release binaries + CUDA test binaries + the Llama 3 vocab,
#                                     # stripped into .gpu-kit/ (git-ignored, ~40 MB), to carry along
#   scripts/gpu-check.sh run [STEPS]  # there, from the repository root, with .gpu-kit carried; writes
#                                     # every step's output to ${OUT:-/tmp/gpu-check}/gpu-check.log
#
# STEPS (default all, in this order): env tests sanitizer compare bench torch. Each step runs on even if an
# earlier one failed; the exit status is the number of failed steps.
#   env        GPU, driver, where libcuda / NVRTC / cuBLAS / NCCL are; a directory of unversioned links to
#              them (cudarc asks for `libnvrtc.so` etc.; the machine's CUDA 13 files are `.so.13`)
#   tests      kernels/tests/cuda_compile.rs and worker/tests/cuda.rs (every kernel compiled by NVRTC for
#              this GPU; the tiny model on CUDA against the CPU)
#   sanitizer  compute-sanitizer memcheck over the worker CUDA tests
#   compare    synthetic llama3-1b (real Llama 3 vocab) in F16, BF16, Q8_0, Q4_K: CUDA vs CPU logits over a
#              64-token prompt and the first differing step of a 64-token greedy continuation
#   bench      synthetic llama3-8b in BF16 and Q4_K: pp2048, tg128, and batched decode at 8, 32, 64
#              sequences (engine-bench --device cuda:0)
#   torch      the peers' numbers on the same GPU: PyTorch device-to-device copy bandwidth (the decode
#              bound = bandwidth / weight bytes per token) and the bf16 matmuls of a llama3-8b prefill of
#              2048 tokens (the prefill peer)
set -uo pipefail
cd "$(dirname "$0")/.."
KIT=.gpu-kit

kit() {
    set -e
    cargo build --release -p tessera -p shard-tool -p tessera-bench
    mkdir -p "$KIT"
    for b in tessera shard-tool engine-bench; do strip -o "$KIT/$b" "target/release/$b"; done
    # Test binaries: the paths cargo reports for the two CUDA test targets.
    local json
    json=$(cargo test --release --no-run --message-format=json -p tessera-kernels --test cuda_compile \
        -p tessera-worker --test cuda 2>/dev/null)
    for t in cuda_compile cuda; do
        local exe
        exe=$(echo "$json" | python3 -c "
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get('reason') == 'compiler-artifact' and m['target']['name'] == '$t' and m.get('executable'):
        print(m['executable'])")
        strip -o "$KIT/test-$t" "$exe"
    done
    cp "${TESSERA_CACHE:-$HOME/.cache/tessera}/models/ggml-vocab-llama-bpe.gguf" "$KIT/"
    # The test binaries find tests/fixtures through the path they were built at.
    pwd > "$KIT/built-at"
    du -sh "$KIT"
}

log() { echo "== $(date -u +%T) $*"; }

step_env() {
    nvidia-smi || return 1
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv
    LINKS=/tmp/tessera-cuda-links
    mkdir -p "$LINKS"
    local dirs=()
    local sp
    sp=$(python3 -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null)
    for d in /usr/local/cuda/lib64 /usr/local/nvidia/lib64 /usr/lib/x86_64-linux-gnu $sp; do
        [ -d "$d" ] && dirs+=("$d")
    done
    for lib in cuda nvrtc cublas cublasLt nccl; do
        local f
        # Highest version by file name; never a link-time stub (cuda/lib64/stubs/libcuda.so).
        f=$(find "${dirs[@]}" -name "lib$lib.so*" ! -name '*.alt.*' ! -path '*/stubs/*' 2>/dev/null |
            awk -F/ '{print $NF "\t" $0}' | sort -V | tail -1 | cut -f2)
        if [ -n "$f" ]; then
            ln -sf "$f" "$LINKS/lib$lib.so"
            echo "lib$lib.so -> $f"
            LIBDIRS="${LIBDIRS:-}:$(dirname "$f")"
        else
            echo "lib$lib: not found"
        fi
    done
    export LD_LIBRARY_PATH="$LINKS${LIBDIRS:-}:${LD_LIBRARY_PATH:-}"
    # NVRTC alone (its builtins beside it) for the compile test, which preloads every library of the
    # directory it is given; the wheel's own directory may hold many more.
    export TESSERA_CUDA_LIB_DIR=/tmp/tessera-nvrtc
    mkdir -p "$TESSERA_CUDA_LIB_DIR"
    local nvrtc_dir
    nvrtc_dir=$(dirname "$(readlink -f "$LINKS/libnvrtc.so")")
    ln -sf "$nvrtc_dir"/libnvrtc*.so* "$TESSERA_CUDA_LIB_DIR/" 2>/dev/null
    ls -l "$TESSERA_CUDA_LIB_DIR"
    echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
}

step_tests() {
    local rc=0
    "$KIT/test-cuda_compile" --test-threads 1 || rc=1
    "$KIT/test-cuda" --test-threads 1 --nocapture || rc=1
    return $rc
}

step_sanitizer() {
    command -v compute-sanitizer >/dev/null || { echo "compute-sanitizer not on PATH"; return 1; }
    compute-sanitizer --tool memcheck --error-exitcode 9 "$KIT/test-cuda" --test-threads 1
}

MODELS=/tmp/tessera-models
synth() { # SHAPE QUANT
    local f="$MODELS/synth-$1.$2.gguf"
    [ -s "$f" ] || "$KIT/shard-tool" synth --shape "$1" --quant "$2" \
        --tokenizer "$KIT/ggml-vocab-llama-bpe.gguf" -o "$f" -q >&2
    echo "$f"
}

step_compare() {
    mkdir -p "$MODELS"
    local rc=0
    for q in F16 BF16 Q8_0 Q4_K; do
        local m
        m=$(synth llama3-1b "$q") || { rc=1; continue; }
        "$KIT/engine-bench" "$m" --device cuda:0 --compare-cpu -p 64 -n 64 -t "$(nproc)" || rc=1
    done
    return $rc
}

step_bench() {
    mkdir -p "$MODELS"
    local rc=0
    for q in BF16 Q4_K; do
        local m
        m=$(synth llama3-8b "$q") || { rc=1; continue; }
        ls -l "$m"
        "$KIT/engine-bench" "$m" --device cuda:0 -p 2048 -n 128 -r 3 || rc=1
        "$KIT/engine-bench" "$m" --device cuda:0 -p 16 -n 64 -r 1 --parallel 1,8,32,64 || rc=1
    done
    return $rc
}

step_torch() {
    python3 - <<'PY'
import torch, time
assert torch.cuda.is_available()
dev = torch.device("cuda")
print("torch", torch.__version__, torch.cuda.get_device_name())
# Device-to-device copy: bytes read + written per second (the decode bound's bandwidth).
x = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
y = torch.empty_like(x)
for _ in range(3):
    y.copy_(x)
torch.cuda.synchronize()
t = time.perf_counter()
for _ in range(20):
    y.copy_(x)
torch.cuda.synchronize()
s = (time.perf_counter() - t) / 20
print(f"copy_bandwidth_GBps {2 * x.numel() / s / 1e9:.1f} (read+write), read-only equivalent {x.numel() / s / 1e9:.1f}")
# A llama3-8b prefill of 2048 tokens, matmuls only, bf16: per layer q/k/v/o, gate/up/down; 32 layers;
# LM head for the last token only (as the engine computes it).
T, E, F, KV, V = 2048, 4096, 14336, 1024, 128256
shapes = [(E, E), (E, KV), (E, KV), (E, E), (E, F), (E, F), (F, E)]
a = {k: torch.randn(T, k, dtype=torch.bfloat16, device=dev) for k in (E, F)}
w = [torch.randn(k, n, dtype=torch.bfloat16, device=dev) for k, n in shapes]
head = torch.randn(E, V, dtype=torch.bfloat16, device=dev)
def prefill():
    for _ in range(32):
        for (k, n), m in zip(shapes, w):
            torch.matmul(a[k], m)
    torch.matmul(a[E][-1:], head)
for _ in range(3):
    prefill()
torch.cuda.synchronize()
t = time.perf_counter()
for _ in range(10):
    prefill()
torch.cuda.synchronize()
s = (time.perf_counter() - t) / 10
print(f"torch_bf16_prefill2048_matmuls_s {s:.4f} -> {T / s:.0f} tok/s upper bound for prefill")
PY
}

run() {
    OUT_DIR="${OUT:-/tmp/gpu-check}"
    mkdir -p "$OUT_DIR"
    [ -x "$KIT/engine-bench" ] || { echo "no $KIT: run 'scripts/gpu-check.sh kit' here and carry $KIT"; exit 2; }
    # The test binaries look for tests/fixtures where they were built.
    local built
    built=$(cat "$KIT/built-at")
    if [ "$built" != "$(pwd)" ] && [ ! -e "$built" ]; then
        mkdir -p "$(dirname "$built")" && ln -s "$(pwd)" "$built"
    fi
    local steps=("$@")
    [ ${#steps[@]} -eq 0 ] && steps=(env tests sanitizer compare bench torch)
    [ "${steps[0]}" = env ] || step_env >/dev/null
    local failed=0
    for s in "${steps[@]}"; do
        log "step $s"
        if "step_$s"; then log "step $s ok"; else log "step $s FAILED"; failed=$((failed + 1)); fi
    done
    log "$failed step(s) failed"
    return $failed
}

case "${1:-}" in
    kit) kit ;;
    run) shift; mkdir -p "${OUT:-/tmp/gpu-check}"; run "$@" 2>&1 | tee "${OUT:-/tmp/gpu-check}/gpu-check.log"; exit "${PIPESTATUS[0]}" ;;
    *) sed -n '2,22p' "$0"; exit 2 ;;
esac
