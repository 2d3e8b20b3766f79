// Tessera's CUDA kernels, compiled at run time by NVRTC for the device's `compute_XY` (see compile.rs).
//
// Self-contained on purpose: NVRTC without a CUDA toolkit has no cuda_fp16.h, so f16/bf16 conversions are
// done here with PTX `cvt` (exact f16 -> f32, round-to-nearest-even f32 -> f16) and integer bit operations
// (bf16, as ggml's `ggml_compute_fp32_to_bf16`). Every entry point is `extern "C"` so that its PTX name is
// the plain name listed in KERNEL_NAMES (a C++-mangled name would not load).
//
// Conventions shared with the CPU kernels (kernels/src/cpu): activations are rows of f32, `n` tokens back
// to back; matmul outputs are `y[t * rows + r]`; the KV cache is position-major `[pos][kv_head][head_dim]`
// f16; all arithmetic is f32 (IEEE division, sqrt and exp: no --use_fast_math).
//
// Quantized weights stay in the GGUF block layout (ggml-common.h), rows back to back. Each k-quant block
// is decoded in 8 "parts" of 32 values, one part per thread; the part -> (byte, nibble, scale) mapping of
// Q4_K and Q6_K is mirrored in plain Rust in mirror.rs and checked there against the scalar dequantizers.

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;

#define FULL_MASK 0xffffffffu
#define NEG_INF __int_as_float(0xff800000)

// ---------------------------------------------------------------------------------------------------------
// Conversions and reductions
// ---------------------------------------------------------------------------------------------------------

__device__ __forceinline__ float f16_to_f32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ u16 f32_to_f16(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

__device__ __forceinline__ float bf16_to_f32(u16 b) { return __uint_as_float((u32)b << 16); }

// ggml_compute_fp32_to_bf16: NaN truncated and forced quiet, everything else rounded to nearest even.
__device__ __forceinline__ u16 f32_to_bf16(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)((u >> 16) | 64u);
    return (u16)((u + (0x7fffu + ((u >> 16) & 1u))) >> 16);
}

// Small unsigned integers (< 2^23) to float with an OR and a subtraction: exact, and it keeps the integer
// -> float conversion unit (a quarter of the FMA rate) off the decode path of the matvec kernels.
__device__ __forceinline__ float u2f(u32 u) { return __uint_as_float(0x4b000000u | u) - 8388608.0f; }
// A signed byte held in the low 8 bits of `u` (upper bits zero) to float, the same way.
__device__ __forceinline__ float s8_to_f(u32 u) {
    return __uint_as_float(0x4b000080u ^ u) - 8388736.0f;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result. `sh` holds
// 32 floats; the leading __syncthreads makes back-to-back calls with the same `sh` safe.
__device__ float block_sum(float v, float* sh) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    v = lane < nw ? sh[lane] : 0.0f;
    return warp_sum(v);
}

// ---------------------------------------------------------------------------------------------------------
// Block decoders shared by the matvec and dequantization kernels
// ---------------------------------------------------------------------------------------------------------

// Q8_0 (34 bytes: f16 d, 32 x i8): part p (0..4) is values 8p..8p+8. Blocks are only 2-byte aligned in a
// row (34-byte stride), hence u16 loads.
struct Q8Part {
    float d;
    float q[8];
};

__device__ __forceinline__ Q8Part q8_0_part(const u8* blk, int p) {
    const u16* h = (const u16*)blk;
    Q8Part r;
    r.d = f16_to_f32(h[0]);
#pragma unroll
    for (int k = 0; k < 4; k++) {
        const u32 w = h[1 + 4 * p + k];  // bytes 2 + 8p + 2k, 2 + 8p + 2k + 1
        r.q[2 * k] = s8_to_f(w & 0xffu);
        r.q[2 * k + 1] = s8_to_f(w >> 8);
    }
    return r;
}

// Q4_K (144 bytes: f16 d, f16 dmin, 12 bytes of 6-bit scales/mins, 128 bytes of nibbles). 144 = 9 * 16, so
// every block of a row is 16-byte aligned and read with two 16-byte loads per part: the header (d, dmin,
// scales) and the part's 16 `qs` bytes. Part c (0..8) covers qs[16c .. 16c+16]: with j = c / 2 and
// l0 = 16 (c % 2), the low nibble of byte i is value 64j + l0 + i (sub-block 2j), the high nibble value
// 64j + 32 + l0 + i (sub-block 2j + 1): ggml's dequantize_row_q4_K order.
struct Q4KPart {
    float d_lo, m_lo, d_hi, m_hi;  // value = d_x * q - m_x
    float lo[16], hi[16];          // nibbles as floats
    int e_lo;                      // index of lo[0] in the block; hi[0] is e_lo + 32
};

// Byte i (0..12) of the scales, which start at byte 4 of the header (words h.y, h.z, h.w).
__device__ __forceinline__ u32 q4k_scale_byte(uint4 h, int i) {
    const u32 w = i < 4 ? h.y : (i < 8 ? h.z : h.w);
    return (w >> (8 * (i & 3))) & 0xffu;
}

// ggml's get_scale_min_k4 for sub-block s (0..8).
__device__ __forceinline__ void q4k_scale_min(uint4 h, int s, u32& sc, u32& m) {
    if (s < 4) {
        sc = q4k_scale_byte(h, s) & 63u;
        m = q4k_scale_byte(h, s + 4) & 63u;
    } else {
        sc = (q4k_scale_byte(h, s + 4) & 0xfu) | ((q4k_scale_byte(h, s - 4) >> 6) << 4);
        m = (q4k_scale_byte(h, s + 4) >> 4) | ((q4k_scale_byte(h, s) >> 6) << 4);
    }
}

__device__ __forceinline__ Q4KPart q4_k_part(const u8* blk, int c) {
    const uint4 h = *(const uint4*)blk;
    const uint4 qv = *((const uint4*)(blk + 16) + c);
    const int j = c >> 1;
    Q4KPart r;
    r.e_lo = 64 * j + 16 * (c & 1);
    const float d = f16_to_f32((u16)(h.x & 0xffffu));
    const float dmin = f16_to_f32((u16)(h.x >> 16));
    u32 sc, m;
    q4k_scale_min(h, 2 * j, sc, m);
    r.d_lo = d * (float)sc;
    r.m_lo = dmin * (float)m;
    q4k_scale_min(h, 2 * j + 1, sc, m);
    r.d_hi = d * (float)sc;
    r.m_hi = dmin * (float)m;
    const u32 w[4] = {qv.x, qv.y, qv.z, qv.w};
#pragma unroll
    for (int i = 0; i < 16; i++) {
        const u32 b = (w[i >> 2] >> (8 * (i & 3))) & 0xffu;
        r.lo[i] = u2f(b & 0xfu);
        r.hi[i] = u2f(b >> 4);
    }
    return r;
}

// Q6_K (210 bytes: ql[128] low nibbles, qh[64] high 2-bit pairs, 16 x i8 scales, f16 d). Blocks are 2-byte
// aligned (210-byte stride), hence u16 loads. Part c (0..8): half hf = c / 4 (128 values), l0 = 8 (c % 4);
// for i in 0..8 and l = l0 + i it decodes the four values 128hf + l + 32k (k = 0..3) that ggml's
// dequantize_row_q6_K builds from ql[64hf + l], ql[64hf + 32 + l] and qh[32hf + l], with scale
// scales[8hf + l/16 + 2k] (l/16 is the same for the part's 8 values).
struct Q6KPart {
    float ds[4];    // d * scale of group k
    float q[4][8];  // levels (q - 32) of values e0 + 32k + i
    int e0;         // 128hf + l0
};

__device__ __forceinline__ Q6KPart q6_k_part(const u8* blk, int c) {
    const int hf = c >> 2, l0 = 8 * (c & 3), is = l0 >> 4;
    const u16* ql_a = (const u16*)(blk + 64 * hf + l0);
    const u16* ql_b = (const u16*)(blk + 64 * hf + 32 + l0);
    const u16* qh = (const u16*)(blk + 128 + 32 * hf + l0);
    const u16* sc = (const u16*)(blk + 192 + 8 * hf);  // scales 8hf + 2k and 8hf + 2k + 1 per u16
    const float d = f16_to_f32(*(const u16*)(blk + 208));
    Q6KPart r;
    r.e0 = 128 * hf + l0;
#pragma unroll
    for (int k = 0; k < 4; k++) {
        const u32 s = (sc[k] >> (8 * is)) & 0xffu;
        r.ds[k] = d * (float)(int)(signed char)s;
    }
#pragma unroll
    for (int k2 = 0; k2 < 4; k2++) {
        const u32 a = ql_a[k2], b = ql_b[k2], h = qh[k2];
#pragma unroll
        for (int e = 0; e < 2; e++) {
            const int i = 2 * k2 + e;
            const u32 ab = (a >> (8 * e)) & 0xffu, bb = (b >> (8 * e)) & 0xffu, hb = (h >> (8 * e)) & 0xffu;
            // level + 32 in 0..64, then the float trick with 2^23 + 32 subtracted.
            r.q[0][i] = __uint_as_float(0x4b000000u | (ab & 0xfu) | ((hb & 3u) << 4)) - 8388640.0f;
            r.q[1][i] = __uint_as_float(0x4b000000u | (bb & 0xfu) | (((hb >> 2) & 3u) << 4)) - 8388640.0f;
            r.q[2][i] = __uint_as_float(0x4b000000u | (ab >> 4) | (((hb >> 4) & 3u) << 4)) - 8388640.0f;
            r.q[3][i] = __uint_as_float(0x4b000000u | (bb >> 4) | (((hb >> 6) & 3u) << 4)) - 8388640.0f;
        }
    }
    return r;
}

// ---------------------------------------------------------------------------------------------------------
// Matrix-vector (small batch) products: y[t, r] = sum_c W[r, c] x[t, c]
// ---------------------------------------------------------------------------------------------------------
//
// One warp per weight row, MV_WARPS rows per block, NT tokens per block: each weight load is used for NT
// tokens. blockIdx.x = row_block * n_tiles + tile, so the blocks that share a row block (and its weights)
// are adjacent in launch order and all but the first read the weights from L2. Tokens past `n` in the last
// tile re-read token n - 1 (no branch in the inner loop) and are not stored. Activation rows must be
// 16-byte aligned (checked on the host); lanes read them with 16-byte loads from L1.

#define MV_WARPS 4

#define MV_SETUP(NT)                                                   \
    const int n_tiles = (n + (NT) - 1) / (NT);                         \
    const int row = (blockIdx.x / n_tiles) * MV_WARPS + (threadIdx.x >> 5); \
    const int t0 = (blockIdx.x % n_tiles) * (NT);                      \
    const int lane = threadIdx.x & 31;                                 \
    if (row >= rows) return;                                           \
    const float* xt[NT];                                               \
    _Pragma("unroll") for (int t = 0; t < (NT); t++) xt[t] = x + (i64)min(t0 + t, n - 1) * cols; \
    float acc[NT];                                                     \
    _Pragma("unroll") for (int t = 0; t < (NT); t++) acc[t] = 0.0f;

template <int NT>
__device__ __forceinline__ void mv_store(float (&acc)[NT], float* y, int row, int rows, int t0, int n) {
#pragma unroll
    for (int t = 0; t < NT; t++) {
        const float s = warp_sum(acc[t]);
        if ((threadIdx.x & 31) == 0 && t0 + t < n) y[(i64)(t0 + t) * rows + row] = s;
    }
}

__device__ __forceinline__ float dot4(float4 a, float4 b, float s) {
    s = fmaf(a.x, b.x, s);
    s = fmaf(a.y, b.y, s);
    s = fmaf(a.z, b.z, s);
    return fmaf(a.w, b.w, s);
}

__device__ __forceinline__ float sum4(float4 a, float s) { return s + a.x + a.y + a.z + a.w; }

// Dot of 8 decoded values with x[0..8] (x 16-byte aligned); also adds x's values to *sx when SUMX.
template <bool SUMX>
__device__ __forceinline__ float dot8(const float* q, const float* x, float s, float* sx) {
    const float4 a = *(const float4*)x, b = *(const float4*)(x + 4);
    s = dot4(make_float4(q[0], q[1], q[2], q[3]), a, s);
    s = dot4(make_float4(q[4], q[5], q[6], q[7]), b, s);
    if (SUMX) *sx = sum4(b, sum4(a, *sx));
    return s;
}

// F32 weights, cols % 4 == 0.
template <int NT>
__device__ void mv_f32(const float* __restrict__ w, const float* __restrict__ x, float* __restrict__ y,
                       int rows, int cols, int n) {
    MV_SETUP(NT)
    const float4* wr = (const float4*)(w + (i64)row * cols);
    const int nv = cols >> 2;
#pragma unroll 4
    for (int i = lane; i < nv; i += 32) {
        const float4 a = wr[i];
#pragma unroll
        for (int t = 0; t < NT; t++) acc[t] = dot4(a, ((const float4*)xt[t])[i], acc[t]);
    }
    mv_store<NT>(acc, y, row, rows, t0, n);
}

// F16 / BF16 weights, cols % 8 == 0: each lane reads 8 weights (16 bytes) at a time, the warp 512
// consecutive bytes.
template <int NT, bool BF>
__device__ void mv_half(const u16* __restrict__ w, const float* __restrict__ x, float* __restrict__ y,
                        int rows, int cols, int n) {
    MV_SETUP(NT)
    const uint4* wr = (const uint4*)(w + (i64)row * cols);
    const int nv = cols >> 3;
#pragma unroll 4
    for (int i = lane; i < nv; i += 32) {
        const uint4 a = wr[i];
        const u32 ws[4] = {a.x, a.y, a.z, a.w};
        float q[8];
#pragma unroll
        for (int k = 0; k < 4; k++) {
            const u16 lo = (u16)(ws[k] & 0xffffu), hi = (u16)(ws[k] >> 16);
            q[2 * k] = BF ? bf16_to_f32(lo) : f16_to_f32(lo);
            q[2 * k + 1] = BF ? bf16_to_f32(hi) : f16_to_f32(hi);
        }
#pragma unroll
        for (int t = 0; t < NT; t++) acc[t] = dot8<false>(q, xt[t] + 8 * i, acc[t], nullptr);
    }
    mv_store<NT>(acc, y, row, rows, t0, n);
}

// Q8_0, cols % 32 == 0: 4 lanes per block (8 values each), 8 blocks per warp step.
template <int NT>
__device__ void mv_q8_0(const u8* __restrict__ w, const float* __restrict__ x, float* __restrict__ y,
                        int rows, int cols, int n) {
    MV_SETUP(NT)
    const int nb = cols >> 5;
    const u8* wr = w + (i64)row * nb * 34;
    const int p = lane & 3;
#pragma unroll 2
    for (int b = lane >> 2; b < nb; b += 8) {
        const Q8Part q = q8_0_part(wr + (i64)b * 34, p);
        const int e = 32 * b + 8 * p;
#pragma unroll
        for (int t = 0; t < NT; t++) acc[t] = fmaf(q.d, dot8<false>(q.q, xt[t] + e, 0.0f, nullptr), acc[t]);
    }
    mv_store<NT>(acc, y, row, rows, t0, n);
}

// Q4_K, cols % 256 == 0: 8 lanes per block (32 values each), 4 blocks per warp step. Per sub-block the
// lane forms sum(q x) and sum(x) and applies d * scale and dmin * min once.
template <int NT>
__device__ void mv_q4_k(const u8* __restrict__ w, const float* __restrict__ x, float* __restrict__ y,
                        int rows, int cols, int n) {
    MV_SETUP(NT)
    const int nb = cols >> 8;
    const u8* wr = w + (i64)row * nb * 144;
    const int c = lane & 7;
#pragma unroll 2
    for (int b = lane >> 3; b < nb; b += 4) {
        const Q4KPart q = q4_k_part(wr + (i64)b * 144, c);
        const int e = 256 * b + q.e_lo;
#pragma unroll
        for (int t = 0; t < NT; t++) {
            float s_lo = 0.0f, s_hi = 0.0f, x_lo = 0.0f, x_hi = 0.0f;
#pragma unroll
            for (int i = 0; i < 16; i += 8) {
                s_lo = dot8<true>(q.lo + i, xt[t] + e + i, s_lo, &x_lo);
                s_hi = dot8<true>(q.hi + i, xt[t] + e + 32 + i, s_hi, &x_hi);
            }
            acc[t] += q.d_lo * s_lo - q.m_lo * x_lo + (q.d_hi * s_hi - q.m_hi * x_hi);
        }
    }
    mv_store<NT>(acc, y, row, rows, t0, n);
}

// Q6_K, cols % 256 == 0: 8 lanes per block (32 values each), 4 blocks per warp step.
template <int NT>
__device__ void mv_q6_k(const u8* __restrict__ w, const float* __restrict__ x, float* __restrict__ y,
                        int rows, int cols, int n) {
    MV_SETUP(NT)
    const int nb = cols >> 8;
    const u8* wr = w + (i64)row * nb * 210;
    const int c = lane & 7;
#pragma unroll 2
    for (int b = lane >> 3; b < nb; b += 4) {
        const Q6KPart q = q6_k_part(wr + (i64)b * 210, c);
        const int e = 256 * b + q.e0;
#pragma unroll
        for (int t = 0; t < NT; t++) {
            float s = acc[t];
#pragma unroll
            for (int k = 0; k < 4; k++) s = fmaf(q.ds[k], dot8<false>(q.q[k], xt[t] + e + 32 * k, 0.0f, nullptr), s);
            acc[t] = s;
        }
    }
    mv_store<NT>(acc, y, row, rows, t0, n);
}

// Entry points: matvec_<type>_t<NT>(W, x, y, rows, cols, n), 128 threads per block, grid
// ceil(rows / 4) * ceil(n / NT).
#define MV_ENTRY(NAME, FN, WT, NT)                                                                  \
    extern "C" __global__ void __launch_bounds__(32 * MV_WARPS) NAME(                             \
        const WT* __restrict__ w, const float* __restrict__ x, float* __restrict__ y, int rows, int cols, int n) { \
        FN<NT>(w, x, y, rows, cols, n);                                                             \
    }
#define MV_ENTRY_HALF(NAME, BF, NT)                                                                 \
    extern "C" __global__ void __launch_bounds__(32 * MV_WARPS) NAME(                             \
        const u16* __restrict__ w, const float* __restrict__ x, float* __restrict__ y, int rows, int cols, int n) { \
        mv_half<NT, BF>(w, x, y, rows, cols, n);                                                    \
    }

MV_ENTRY(matvec_f32_t1, mv_f32, float, 1)
MV_ENTRY(matvec_f32_t2, mv_f32, float, 2)
MV_ENTRY(matvec_f32_t4, mv_f32, float, 4)
MV_ENTRY(matvec_f32_t8, mv_f32, float, 8)
MV_ENTRY_HALF(matvec_f16_t1, false, 1)
MV_ENTRY_HALF(matvec_f16_t2, false, 2)
MV_ENTRY_HALF(matvec_f16_t4, false, 4)
MV_ENTRY_HALF(matvec_f16_t8, false, 8)
MV_ENTRY_HALF(matvec_bf16_t1, true, 1)
MV_ENTRY_HALF(matvec_bf16_t2, true, 2)
MV_ENTRY_HALF(matvec_bf16_t4, true, 4)
MV_ENTRY_HALF(matvec_bf16_t8, true, 8)
MV_ENTRY(matvec_q8_0_t1, mv_q8_0, u8, 1)
MV_ENTRY(matvec_q8_0_t2, mv_q8_0, u8, 2)
MV_ENTRY(matvec_q8_0_t4, mv_q8_0, u8, 4)
MV_ENTRY(matvec_q8_0_t8, mv_q8_0, u8, 8)
MV_ENTRY(matvec_q4_k_t1, mv_q4_k, u8, 1)
MV_ENTRY(matvec_q4_k_t2, mv_q4_k, u8, 2)
MV_ENTRY(matvec_q4_k_t4, mv_q4_k, u8, 4)
MV_ENTRY(matvec_q4_k_t8, mv_q4_k, u8, 8)
MV_ENTRY(matvec_q6_k_t1, mv_q6_k, u8, 1)
MV_ENTRY(matvec_q6_k_t2, mv_q6_k, u8, 2)
MV_ENTRY(matvec_q6_k_t4, mv_q6_k, u8, 4)
MV_ENTRY(matvec_q6_k_t8, mv_q6_k, u8, 8)

// ---------------------------------------------------------------------------------------------------------
// Dequantization to f16 rows (the large-batch path: dequantize a slice of rows, then cuBLAS)
// ---------------------------------------------------------------------------------------------------------
//
// dequant_f16_<type>(W, out, rows, cols): rows `rows` of W (the caller offsets W) to `out[r * cols + c]`.
// One thread per part; values are formed as the scalar reference does (`d * q`, `d * q - m`, with explicit
// _rn operations so no FMA contraction changes them) before rounding to f16.

extern "C" __global__ void dequant_f16_q8_0(const u8* __restrict__ w, u16* __restrict__ out, int rows, int cols) {
    const int nb = cols >> 5;
    const i64 parts = (i64)rows * nb * 4;
    for (i64 it = (i64)blockIdx.x * blockDim.x + threadIdx.x; it < parts; it += (i64)gridDim.x * blockDim.x) {
        const i64 blk = it >> 2;
        const int p = (int)(it & 3);
        const Q8Part q = q8_0_part(w + blk * 34, p);
        u16* o = out + blk * 32 + 8 * p;  // rows are nb blocks of 32 values, so block index = value / 32
#pragma unroll
        for (int i = 0; i < 8; i++) o[i] = f32_to_f16(__fmul_rn(q.d, q.q[i]));
    }
}

extern "C" __global__ void dequant_f16_q4_k(const u8* __restrict__ w, u16* __restrict__ out, int rows, int cols) {
    const int nb = cols >> 8;
    const i64 parts = (i64)rows * nb * 8;
    for (i64 it = (i64)blockIdx.x * blockDim.x + threadIdx.x; it < parts; it += (i64)gridDim.x * blockDim.x) {
        const i64 blk = it >> 3;
        const Q4KPart q = q4_k_part(w + blk * 144, (int)(it & 7));
        u16* o = out + blk * 256 + q.e_lo;
#pragma unroll
        for (int i = 0; i < 16; i++) {
            o[i] = f32_to_f16(__fsub_rn(__fmul_rn(q.d_lo, q.lo[i]), q.m_lo));
            o[32 + i] = f32_to_f16(__fsub_rn(__fmul_rn(q.d_hi, q.hi[i]), q.m_hi));
        }
    }
}

extern "C" __global__ void dequant_f16_q6_k(const u8* __restrict__ w, u16* __restrict__ out, int rows, int cols) {
    const int nb = cols >> 8;
    const i64 parts = (i64)rows * nb * 8;
    for (i64 it = (i64)blockIdx.x * blockDim.x + threadIdx.x; it < parts; it += (i64)gridDim.x * blockDim.x) {
        const i64 blk = it >> 3;
        const Q6KPart q = q6_k_part(w + blk * 210, (int)(it & 7));
        u16* o = out + blk * 256 + q.e0;
#pragma unroll
        for (int k = 0; k < 4; k++)
#pragma unroll
            for (int i = 0; i < 8; i++) o[32 * k + i] = f32_to_f16(__fmul_rn(q.ds[k], q.q[k][i]));
    }
}

// ---------------------------------------------------------------------------------------------------------
// Element-wise and row operations
// ---------------------------------------------------------------------------------------------------------

#define GRID_STRIDE(i, n) for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (i64)gridDim.x * blockDim.x)

// out = x / sqrt(mean(x^2) + eps) * w per row of `cols` (one block per row): `(x * scale) * w` as ggml.
extern "C" __global__ void rms_norm_f32(const float* __restrict__ x, const float* __restrict__ w,
                                        float* __restrict__ out, int cols, float eps) {
    __shared__ float sh[32];
    const float* xr = x + (i64)blockIdx.x * cols;
    float* yr = out + (i64)blockIdx.x * cols;
    float s = 0.0f;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) s = fmaf(xr[i], xr[i], s);
    s = block_sum(s, sh);
    const float scale = 1.0f / sqrtf(s / (float)cols + eps);
    for (int i = threadIdx.x; i < cols; i += blockDim.x) yr[i] = (xr[i] * scale) * w[i];
}

// gate = silu(gate) * up, silu(g) = g / (1 + exp(-g)).
extern "C" __global__ void silu_mul_f32(float* __restrict__ gate, const float* __restrict__ up, i64 n) {
    GRID_STRIDE(i, n) {
        const float g = gate[i];
        gate[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

// x += d.
extern "C" __global__ void add_f32(float* __restrict__ x, const float* __restrict__ d, i64 n) {
    GRID_STRIDE(i, n) x[i] += d[i];
}

// RoPE, ggml's NORM mode: rotates adjacent pairs (x[2i], x[2i+1]), i < rope_dim / 2, of each head of each
// token by the host's table cs[t][2i] = cos, cs[t][2i+1] = sin; dims >= rope_dim are untouched.
extern "C" __global__ void rope_f32(float* __restrict__ x, const float* __restrict__ cs, int n, int n_heads,
                                    int head_dim, int rope_dim) {
    const int half = rope_dim >> 1;
    GRID_STRIDE(i, (i64)n * n_heads * half) {
        const int pair = (int)(i % half);
        const i64 th = i / half;  // t * n_heads + h
        const i64 t = th / n_heads;
        float* p = x + th * head_dim + 2 * pair;
        const float c = cs[t * rope_dim + 2 * pair], s = cs[t * rope_dim + 2 * pair + 1];
        const float x0 = p[0], x1 = p[1];
        // The host's rotation (`RopeCache::apply`, as llama.cpp's x86 builds compile it): one FMA over a
        // rounded product, so a rotated key is the same bits on either device.
        p[0] = fmaf(x0, c, -__fmul_rn(x1, s));
        p[1] = fmaf(x0, s, __fmul_rn(x1, c));
    }
}

// n rows of `row` f32 -> f16 cache rows pos .. pos + n.
extern "C" __global__ void kv_write_f16(const float* __restrict__ src, u16* __restrict__ cache, int row, int pos,
                                        int n) {
    GRID_STRIDE(i, (i64)n * row) cache[(i64)pos * row + i] = f32_to_f16(src[i]);
}

extern "C" __global__ void convert_f32_f16(const float* __restrict__ x, u16* __restrict__ y, i64 n) {
    GRID_STRIDE(i, n) y[i] = f32_to_f16(x[i]);
}

extern "C" __global__ void convert_f32_bf16(const float* __restrict__ x, u16* __restrict__ y, i64 n) {
    GRID_STRIDE(i, n) y[i] = f32_to_bf16(x[i]);
}

// Per row of logits (one block per row): the maximum, its index (the first on ties) and
// log(sum(exp(x - max))) + max. A row of -inf gives max = lse = -inf.
extern "C" __global__ void row_stats_f32(const float* __restrict__ x, int cols, float* __restrict__ out_max,
                                         u32* __restrict__ out_arg, float* __restrict__ out_lse) {
    __shared__ float sh[32];
    __shared__ float sv[32];
    __shared__ u32 si[32];
    const float* xr = x + (i64)blockIdx.x * cols;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    float best = NEG_INF;
    u32 arg = 0xffffffffu;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) {
        const float v = xr[i];
        if (v > best || arg == 0xffffffffu) {
            best = v;
            arg = (u32)i;
        }
    }
    // (value, index) reduction: larger value wins, the smaller index on ties.
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(FULL_MASK, best, o);
        const u32 oi = __shfl_xor_sync(FULL_MASK, arg, o);
        if (ov > best || (ov == best && oi < arg) || (arg == 0xffffffffu && oi != 0xffffffffu)) {
            best = ov;
            arg = oi;
        }
    }
    if (lane == 0) {
        sv[warp] = best;
        si[warp] = arg;
    }
    __syncthreads();
    best = lane < nw ? sv[lane] : NEG_INF;
    arg = lane < nw ? si[lane] : 0xffffffffu;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(FULL_MASK, best, o);
        const u32 oi = __shfl_xor_sync(FULL_MASK, arg, o);
        if (ov > best || (ov == best && oi < arg) || (arg == 0xffffffffu && oi != 0xffffffffu)) {
            best = ov;
            arg = oi;
        }
    }
    const float mx = best;
    float s = 0.0f;
    if (mx != NEG_INF)
        for (int i = threadIdx.x; i < cols; i += blockDim.x) s += expf(xr[i] - mx);
    s = block_sum(s, sh);
    if (threadIdx.x == 0) {
        out_max[blockIdx.x] = mx;
        out_arg[blockIdx.x] = arg == 0xffffffffu ? 0u : arg;
        out_lse[blockIdx.x] = mx == NEG_INF ? NEG_INF : mx + logf(s);
    }
}

// ---------------------------------------------------------------------------------------------------------
// Attention over the f16 KV cache (online softmax, split over positions)
// ---------------------------------------------------------------------------------------------------------
//
// A block takes up to ATT_ROWS query rows that share one KV head: rows r = t * group + g of that head
// (token t, query head kvh * group + g), so GQA groups and, in prefill, consecutive tokens share every K/V
// load. blockIdx.x = kvh * n_row_tiles + row_tile; blockIdx.y = split: the block covers positions
// [split * chunk, min((split + 1) * chunk, n_past + t_last + 1)) and row (t, g) masks positions past
// n_past + t (causal). Positions go in tiles of ATT_TILE: thread j computes the scores of position j of the
// tile against all rows (q in shared memory), one warp per row does the online-softmax update, then
// thread d accumulates dims d and d + 128 of sum(p v). With one split the block writes the normalized
// output; otherwise it writes its unnormalized accumulator, max and sum to the partial buffers for
// attention_combine (flash-decoding). As the CPU path, q is rounded to f16 before the dot products.

#define ATT_THREADS 128
#define ATT_TILE 128
#define ATT_ROWS 8
#define ATT_MAX_HD 256

extern "C" __global__ void __launch_bounds__(ATT_THREADS)
    attention_f16(const float* __restrict__ q, const u16* __restrict__ kc, const u16* __restrict__ vc,
                  float* __restrict__ out, float* __restrict__ part_acc, float* __restrict__ part_ml,
                  int n_tokens, int n_past, int n_heads, int n_kv_heads, int hd, float scale, int chunk) {
    __shared__ __align__(16) float qs[ATT_ROWS][ATT_MAX_HD];
    __shared__ __align__(16) float ps[ATT_ROWS][ATT_TILE];
    __shared__ float s_m[ATT_ROWS], s_l[ATT_ROWS], s_alpha[ATT_ROWS];

    const int group = n_heads / n_kv_heads;
    const int rows_per_kv = n_tokens * group;
    const int n_rt = (rows_per_kv + ATT_ROWS - 1) / ATT_ROWS;
    const int kvh = blockIdx.x / n_rt;
    const int r0 = (blockIdx.x % n_rt) * ATT_ROWS;
    const int nr = min(ATT_ROWS, rows_per_kv - r0);
    const int split = blockIdx.y;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int len_max = n_past + (r0 + nr - 1) / group + 1;
    const int p_begin = split * chunk;
    const int p_end = min(p_begin + chunk, len_max);
    const i64 kv_stride = (i64)n_kv_heads * hd;  // elements per position

    for (int idx = tid; idx < ATT_ROWS * hd; idx += ATT_THREADS) {
        const int i = idx / hd, d = idx % hd;
        float v = 0.0f;
        if (i < nr) {
            const int r = r0 + i;
            const int t = r / group, h = kvh * group + r % group;
            v = f16_to_f32(f32_to_f16(q[((i64)t * n_heads + h) * hd + d]));
        }
        qs[i][d] = v;
    }
    if (tid < ATT_ROWS) {
        s_m[tid] = NEG_INF;
        s_l[tid] = 0.0f;
    }
    float acc[ATT_ROWS][2];
#pragma unroll
    for (int i = 0; i < ATT_ROWS; i++) acc[i][0] = acc[i][1] = 0.0f;
    __syncthreads();

    for (int p0 = p_begin; p0 < p_end; p0 += ATT_TILE) {
        // Scores: thread tid takes position p0 + tid.
        const int p = p0 + tid;
        float s[ATT_ROWS];
#pragma unroll
        for (int i = 0; i < ATT_ROWS; i++) s[i] = 0.0f;
        if (p < p_end) {
            const uint4* kp = (const uint4*)(kc + (i64)p * kv_stride + (i64)kvh * hd);
            for (int c = 0; c < (hd >> 3); c++) {
                const uint4 kw = kp[c];
                const u32 ws[4] = {kw.x, kw.y, kw.z, kw.w};
                float k8[8];
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    k8[2 * e] = f16_to_f32((u16)(ws[e] & 0xffffu));
                    k8[2 * e + 1] = f16_to_f32((u16)(ws[e] >> 16));
                }
#pragma unroll
                for (int i = 0; i < ATT_ROWS; i++) {
                    const float4 a = *(const float4*)&qs[i][8 * c];
                    const float4 b = *(const float4*)&qs[i][8 * c + 4];
                    s[i] = dot4(a, make_float4(k8[0], k8[1], k8[2], k8[3]), s[i]);
                    s[i] = dot4(b, make_float4(k8[4], k8[5], k8[6], k8[7]), s[i]);
                }
            }
        }
#pragma unroll
        for (int i = 0; i < ATT_ROWS; i++) {
            const bool ok = p < p_end && i < nr && p <= n_past + (r0 + i) / group;
            ps[i][tid] = ok ? s[i] * scale : NEG_INF;
        }
        __syncthreads();

        // Online softmax: warp w updates rows w, w + 4; scores become probabilities in place.
        for (int i = warp; i < ATT_ROWS; i += ATT_THREADS / 32) {
            float mx = NEG_INF;
            for (int j = lane; j < ATT_TILE; j += 32) mx = fmaxf(mx, ps[i][j]);
            mx = warp_max(mx);
            const float m_old = s_m[i];
            const float m_new = fmaxf(m_old, mx);
            float sum = 0.0f;
            for (int j = lane; j < ATT_TILE; j += 32) {
                const float v = ps[i][j];
                const float e = v == NEG_INF ? 0.0f : expf(v - m_new);
                ps[i][j] = e;
                sum += e;
            }
            sum = warp_sum(sum);
            if (lane == 0) {
                const float alpha = m_old == NEG_INF ? 0.0f : expf(m_old - m_new);
                s_alpha[i] = alpha;
                s_l[i] = s_l[i] * alpha + sum;
                s_m[i] = m_new;
            }
        }
        __syncthreads();

        // Values: thread tid accumulates dims tid and tid + 128. Positions past p_end have probability 0;
        // their loads are clamped to p_end - 1 so that nothing outside the cache is read.
#pragma unroll
        for (int i = 0; i < ATT_ROWS; i++) {
            acc[i][0] *= s_alpha[i];
            acc[i][1] *= s_alpha[i];
        }
        const int np = min(ATT_TILE, p_end - p0);
        const bool d0 = tid < hd, d1 = tid + 128 < hd;
        for (int j = 0; j < np; j += 4) {
            float v0[4], v1[4];
#pragma unroll
            for (int u = 0; u < 4; u++) {
                const u16* vp = vc + (i64)min(p0 + j + u, p_end - 1) * kv_stride + (i64)kvh * hd;
                v0[u] = d0 ? f16_to_f32(vp[tid]) : 0.0f;
                v1[u] = d1 ? f16_to_f32(vp[tid + 128]) : 0.0f;
            }
#pragma unroll
            for (int i = 0; i < ATT_ROWS; i++) {
                const float4 w = *(const float4*)&ps[i][j];
                acc[i][0] = dot4(w, make_float4(v0[0], v0[1], v0[2], v0[3]), acc[i][0]);
                acc[i][1] = dot4(w, make_float4(v1[0], v1[1], v1[2], v1[3]), acc[i][1]);
            }
        }
        __syncthreads();
    }

    const i64 n_rows = (i64)n_tokens * n_heads;
#pragma unroll
    for (int i = 0; i < ATT_ROWS; i++) {
        if (i >= nr) break;
        const int r = r0 + i;
        const i64 g = (i64)(r / group) * n_heads + kvh * group + r % group;  // output row t * n_heads + h
        if (gridDim.y == 1) {
            const float inv = s_l[i] > 0.0f ? 1.0f / s_l[i] : 0.0f;
            if (tid < hd) out[g * hd + tid] = acc[i][0] * inv;
            if (tid + 128 < hd) out[g * hd + tid + 128] = acc[i][1] * inv;
        } else {
            const i64 at = (i64)split * n_rows + g;
            if (tid < hd) part_acc[at * hd + tid] = acc[i][0];
            if (tid + 128 < hd) part_acc[at * hd + tid + 128] = acc[i][1];
            if (tid == 0) {
                part_ml[2 * at] = s_m[i];
                part_ml[2 * at + 1] = s_l[i];
            }
        }
    }
}

// Merges the splits of attention_f16: one block per output row (t * n_heads + h).
extern "C" __global__ void attention_combine(const float* __restrict__ part_acc, const float* __restrict__ part_ml,
                                             float* __restrict__ out, int n_rows, int hd, int n_split) {
    const i64 g = blockIdx.x;
    float mx = NEG_INF;
    for (int s = 0; s < n_split; s++) mx = fmaxf(mx, part_ml[2 * ((i64)s * n_rows + g)]);
    float l = 0.0f;
    for (int s = 0; s < n_split; s++) {
        const float m = part_ml[2 * ((i64)s * n_rows + g)];
        if (m != NEG_INF) l += part_ml[2 * ((i64)s * n_rows + g) + 1] * expf(m - mx);
    }
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float a = 0.0f;
        for (int s = 0; s < n_split; s++) {
            const float m = part_ml[2 * ((i64)s * n_rows + g)];
            if (m != NEG_INF) a += part_acc[((i64)s * n_rows + g) * hd + d] * expf(m - mx);
        }
        out[g * hd + d] = a * inv;
    }
}
