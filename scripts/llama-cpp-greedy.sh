#!/usr/bin/env bash
# Greedy 64-token continuations of SmolLM2 F32/F16/Q8_0 from a native (-march=native) build of the same
# llama.cpp as tests/fixtures/engine/llama_cpp.json (which used llama-cpp-python's portable AVX2 build).
# Shows how much llama.cpp's own greedy output depends on its build, and gives the engine a second,
# same-ISA reference. Writes tests/fixtures/engine/llama_cpp_native_greedy.json.
#   scripts/llama-cpp-greedy.sh        (needs scripts/prepare-engine-models.sh; builds libllama once)
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="${TESSERA_CACHE:-$HOME/.cache/tessera}"
scripts/build-llama-cpp.sh llama ggml >/dev/null
SRC="$CACHE/src/llama_cpp_python-0.3.36/vendor/llama.cpp"
BUILD="$CACHE/build/llama.cpp-0.3.36"
BIN="$CACHE/llama.cpp/bin/llama_cpp_greedy"
g++ -O2 -std=c++17 -I"$SRC/include" -I"$SRC/ggml/include" scripts/llama_cpp_greedy.cpp \
    "$BUILD/src/libllama.a" "$BUILD/ggml/src/libggml.a" "$BUILD/ggml/src/libggml-cpu.a" \
    "$BUILD/ggml/src/libggml-base.a" -fopenmp -lpthread -ldl -lm -o "$BIN"
python3 - "$BIN" "$CACHE/models" <<'PY'
import json, platform, subprocess, sys
bin_, models = sys.argv[1], sys.argv[2]
fx = "tests/fixtures/engine/llama_cpp.json"
ref = json.load(open(fx))
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
flags = next((l.split(":", 1)[1].split() for l in open("/proc/cpuinfo") if l.startswith("flags")), [])
out = {"produced_by": "scripts/llama-cpp-greedy.sh (scripts/llama_cpp_greedy.cpp)",
       "llama_cpp": "llama-cpp-python 0.3.36 vendored llama.cpp, GGML_NATIVE=ON static build (scripts/build-llama-cpp.sh)",
       "settings": "n_ctx 256, n_batch/n_ubatch 512, 2 threads, F32 K/V, flash attention off, prompt in one llama_decode, then one token per llama_decode, argmax (ties: lower id)",
       "cpu": cpu, "avx512": sorted(f for f in flags if f.startswith("avx512")), "runs": []}
for name in ["smollm2-f32", "smollm2-f16", "smollm2-q8_0"]:
    run = next(r for r in ref["runs"] if r["run"] == name)
    ids = ref["prompts"][run["prompt"]]["ids"]
    res = json.loads(subprocess.run([bin_, f"{models}/{run['file']}", "64", *map(str, ids)],
                                    check=True, capture_output=True, text=True).stdout)
    avx2 = run["greedy"]["ids"]
    first = next((i for i, (a, b) in enumerate(zip(res["ids"], avx2)) if a != b), None)
    out["runs"].append({"run": name, "file": run["file"], "ids": res["ids"],
                        "margins": [round(m, 6) for m in res["margins"]],
                        "first_difference_from_avx2_build": first})
    print(f"{name}: native build first differs from the AVX2 build's continuation at step {first}", file=sys.stderr)
with open("tests/fixtures/engine/llama_cpp_native_greedy.json", "w") as f:
    json.dump(out, f, indent=1)
    f.write("\n")
PY
