#!/usr/bin/env bash
# Runs every CUDA kernel (kernels/src/cuda/kernels.cu) on the CPU, without a GPU or CUDA toolkit: the source
# is compiled as C++ against kernels/tests/cuda_emu/emu.h (one OS thread per CUDA thread, std::barrier for
# __syncthreads and warp shuffles) and checked by kernels/tests/cuda_emu/test.cpp against naive references.
# It catches indexing, masking, reduction and synchronization-order mistakes; not performance, alignment
# faults or the device memory model. Needs g++ 12+ (C++20, _Float16) and python3.
set -euo pipefail
cd "$(dirname "$0")/.."
EMU=kernels/tests/cuda_emu
OUT="${TMPDIR:-/tmp}/tessera-cuda-emu"
mkdir -p "$OUT"

# The only device-specific code is the PTX `cvt` in the two f16 conversions; swap in host versions.
python3 - kernels/src/cuda/kernels.cu "$OUT/kernels_host.cu" <<'PY'
import sys
src, dst = sys.argv[1:3]
s = open(src).read()
a = s.index("__device__ __forceinline__ float f16_to_f32(u16 h) {")
b = s.index("__device__ __forceinline__ float bf16_to_f32")
host = (
    "__device__ __forceinline__ float f16_to_f32(u16 h) { _Float16 f; memcpy(&f, &h, 2); return (float)f; }\n"
    "__device__ __forceinline__ u16 f32_to_f16(float f) { _Float16 h = (_Float16)f; u16 r; memcpy(&r, &h, 2); return r; }\n\n"
)
open(dst, "w").write('#include "emu.h"\n' + s[:a] + host + s[b:])
PY

g++ -std=c++20 -O2 -ffp-contract=off -Wno-unknown-pragmas -pthread -I "$EMU" -I "$OUT" -x c++ "$EMU/test.cpp" -o "$OUT/test"
"$OUT/test"
