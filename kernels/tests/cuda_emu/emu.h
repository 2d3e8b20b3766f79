// Host emulation of the CUDA features kernels.cu uses: one OS thread per CUDA thread, blocks run one at a
// time (so `static` = __shared__ is per block), std::barrier for __syncthreads and warp shuffles.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <barrier>
#include <vector>
#include <memory>
#include <algorithm>
using std::min; using std::max;
struct dim3 { unsigned x = 1, y = 1, z = 1; };
inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;
struct uint4 { unsigned x, y, z, w; };
struct float4 { float x, y, z, w; };
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __restrict__ __restrict
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
inline float __uint_as_float(unsigned i) { float f; memcpy(&f, &i, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned i; memcpy(&i, &f, 4); return i; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline std::unique_ptr<std::barrier<>> g_block_bar;
inline std::vector<std::unique_ptr<std::barrier<>>> g_warp_bar;
inline uint32_t g_xchg[32][32];
inline void __syncthreads() { g_block_bar->arrive_and_wait(); }
template <class T> T __shfl_xor_sync(unsigned, T v, int o) {
    int w = threadIdx.x / 32, l = threadIdx.x % 32;
    uint32_t bits; memcpy(&bits, &v, 4);
    g_xchg[w][l] = bits;
    g_warp_bar[w]->arrive_and_wait();
    uint32_t ob = g_xchg[w][l ^ o];
    g_warp_bar[w]->arrive_and_wait();
    T r; memcpy(&r, &ob, 4); return r;
}
template <class F, class... A> void launch(F f, dim3 grid, dim3 block, A... args) {
    gridDim = grid; blockDim = block;
    for (unsigned by = 0; by < grid.y; by++)
        for (unsigned bx = 0; bx < grid.x; bx++) {
            g_block_bar = std::make_unique<std::barrier<>>(block.x);
            g_warp_bar.clear();
            for (unsigned w = 0; w < block.x / 32; w++) g_warp_bar.push_back(std::make_unique<std::barrier<>>(32));
            std::vector<std::thread> ts;
            for (unsigned t = 0; t < block.x; t++)
                ts.emplace_back([=] { threadIdx = {t, 0, 0}; blockIdx = {bx, by, 0}; f(args...); });
            for (auto& t : ts) t.join();
        }
}
