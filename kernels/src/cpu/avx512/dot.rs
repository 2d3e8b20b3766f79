//! AVX-512 matmul tiles: `R` weight rows × `T` tokens per call (4×1 for decode, 4×4 for prefill), so each
//! activation load and each weight decode serves several outputs, with one accumulator per (row, token)
//! to hide FMA latency.
//!
//! Legacy quantized types (VNNI level): a 512-bit register holds two 32-element blocks; `vpdpbusd`
//! multiplies unsigned weight bytes by signed activation bytes, so signed weights are offset (Q4_0: the
//! nibble `q` itself, Q8_0: `q + 128`) and the offset times `Σa` is subtracted by starting the accumulation
//! from `-offset·Σa`. Block scales are gathered 16 blocks at a time (`vpgatherdd` of the f16 `d`
//! fields), multiplied once per (row, token), and each pair of blocks broadcasts its two scales to the
//! matching 8-lane halves with `vpermps`. Float types: 16 lanes per step, F16 via `vcvtph2ps`, BF16 via
//! `vdpbf16ps` when AVX512-BF16 is present.
//!
//! # Safety
//! Every `unsafe fn` needs the CPU features in its `target_feature` attribute (the tables are built after
//! detecting them) and: `w` points at `R` rows `w_stride` bytes apart, `a` at `T` activation rows
//! `a_stride` bytes apart, each holding the bytes of `n` values, and `out[t * out_stride + r]` writable
//! for `r < R`, `t < T`.

// Tiles index (row, token) accumulator grids; index loops over the const extents read better than zips and
// unroll the same.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use crate::cpu::layout::{Q8_0_BYTES, Q8_1_BYTES};

/// The weight layouts a legacy tile handles.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Legacy {
    /// Q4_0 × Q8_0.
    Q4_0,
    /// Q4_1 × Q8_1 (the min term `m · s` per block).
    Q4_1,
    /// Q8_0 × Q8_0.
    Q8_0,
}

impl Legacy {
    /// The kind a tile is monomorphized for (`const` generic parameters cannot be enums on stable Rust).
    const fn from_id(id: u8) -> Self {
        match id {
            0 => Self::Q4_0,
            1 => Self::Q4_1,
            _ => Self::Q8_0,
        }
    }

    const fn w_bytes(self) -> usize {
        match self {
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q8_0 => 34,
        }
    }
    const fn a_bytes(self) -> usize {
        match self {
            Self::Q4_0 | Self::Q8_0 => Q8_0_BYTES,
            Self::Q4_1 => Q8_1_BYTES,
        }
    }
    const fn w_qs(self) -> usize {
        match self {
            Self::Q4_0 | Self::Q8_0 => 2,
            Self::Q4_1 => 4,
        }
    }
    const fn a_qs(self) -> usize {
        match self {
            Self::Q4_0 | Self::Q8_0 => 2,
            Self::Q4_1 => 4,
        }
    }
}

/// Byte offsets `0, stride, 2·stride, ...` of 16 consecutive blocks.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
fn block_offsets(stride: usize) -> __m512i {
    _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32(stride as i32),
    )
}

/// The f16 pairs (`d`, and the following 16 bits) of `count` (≤ 16) blocks at `p`, as two f32 vectors.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
unsafe fn gather_f16x2(p: *const u8, offsets: __m512i, count: usize) -> (__m512, __m512) {
    let k: __mmask16 = if count >= 16 {
        0xffff
    } else {
        (1u16 << count) - 1
    };
    // SAFETY: lanes below `count` read 4 bytes at the start of a block the caller guarantees to exist;
    // masked-off lanes read nothing.
    let v =
        unsafe { _mm512_mask_i32gather_epi32::<1>(_mm512_setzero_si512(), k, offsets, p.cast()) };
    let lo = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(v));
    let hi = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(v)));
    (lo, hi)
}

/// The 64 unsigned weight bytes of blocks `p` and `p + stride` in activation order (low nibbles of a block
/// then its high nibbles), or of block `p` alone with zeros after it when `two` is false.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,avx512vnni")]
unsafe fn weight_pair(kind: Legacy, p: *const u8, stride: usize, two: bool) -> __m512i {
    // SAFETY: the caller guarantees the block(s) exist.
    unsafe {
        match kind {
            Legacy::Q4_0 | Legacy::Q4_1 => {
                let a = _mm_loadu_si128(p.cast());
                let b = if two {
                    _mm_loadu_si128(p.add(stride).cast())
                } else {
                    _mm_setzero_si128()
                };
                let ab = _mm256_inserti128_si256::<1>(_mm256_castsi128_si256(a), b);
                let aabb = _mm512_permutexvar_epi64(
                    _mm512_setr_epi64(0, 1, 0, 1, 2, 3, 2, 3),
                    _mm512_castsi256_si512(ab),
                );
                let shifted = _mm512_mask_srli_epi16::<4>(aabb, 0xff00_ff00, aabb);
                _mm512_and_si512(shifted, _mm512_set1_epi8(0x0f))
            }
            Legacy::Q8_0 => {
                let a = _mm256_loadu_si256(p.cast());
                let b = if two {
                    _mm256_loadu_si256(p.add(stride).cast())
                } else {
                    _mm256_set1_epi8(-128)
                };
                let ab = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(a), b);
                // Signed to unsigned: q + 128 (the missing block becomes 0).
                _mm512_xor_si512(ab, _mm512_set1_epi8(-128))
            }
        }
    }
}

/// Activation bytes of blocks `p` and `p + stride` (or `p` then zeros).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,avx512vnni")]
unsafe fn act_pair(p: *const u8, stride: usize, two: bool) -> __m512i {
    // SAFETY: the caller guarantees the block(s) exist.
    unsafe {
        let a = _mm256_loadu_si256(p.cast());
        let b = if two {
            _mm256_loadu_si256(p.add(stride).cast())
        } else {
            _mm256_setzero_si256()
        };
        _mm512_inserti64x4::<1>(_mm512_castsi256_si512(a), b)
    }
}

/// `R × T` tile of a legacy quantized type against Q8_0/Q8_1 activations (see the module docs).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,avx512vnni")]
#[allow(clippy::too_many_arguments)]
unsafe fn legacy_tile<const KIND: u8, const R: usize, const T: usize>(
    n: usize,
    w: *const u8,
    w_stride: usize,
    a: *const u8,
    a_stride: usize,
    out: *mut f32,
    out_stride: usize,
) {
    let kind = const { Legacy::from_id(KIND) };
    let nb = n / 32;
    let (wb, ab) = (kind.w_bytes(), kind.a_bytes());
    let (w_off, a_off) = (block_offsets(wb), block_offsets(ab));
    let offset_byte = match kind {
        Legacy::Q4_0 => 8,
        Legacy::Q4_1 => 0,
        Legacy::Q8_0 => -128i8,
    };
    let offset = _mm512_set1_epi8(offset_byte);
    let mut acc = [[_mm512_setzero_ps(); T]; R];
    let mut acc_min = [[_mm512_setzero_ps(); T]; R];
    let mut scales = [[_mm512_setzero_ps(); T]; R];
    let mut g = 0;
    while g < nb {
        let count = (nb - g).min(16);
        // SAFETY: blocks g..g+count exist in every row and token (caller contract).
        unsafe {
            let mut dw = [_mm512_setzero_ps(); R];
            let mut mw = [_mm512_setzero_ps(); R];
            for r in 0..R {
                (dw[r], mw[r]) = gather_f16x2(w.add(r * w_stride + g * wb), w_off, count);
            }
            for t in 0..T {
                let (da, sa) = gather_f16x2(a.add(t * a_stride + g * ab), a_off, count);
                for r in 0..R {
                    scales[r][t] = _mm512_mul_ps(dw[r], da);
                    if kind == Legacy::Q4_1 {
                        acc_min[r][t] = _mm512_fmadd_ps(mw[r], sa, acc_min[r][t]);
                    }
                }
            }
            let mut j = 0;
            while j < count {
                let two = j + 1 < count;
                let blk = g + j;
                // Lanes 0..8 take the scale of block j, lanes 8..16 that of block j + 1.
                let idx = _mm512_setr_epi32(
                    j as i32,
                    j as i32,
                    j as i32,
                    j as i32,
                    j as i32,
                    j as i32,
                    j as i32,
                    j as i32,
                    j as i32 + 1,
                    j as i32 + 1,
                    j as i32 + 1,
                    j as i32 + 1,
                    j as i32 + 1,
                    j as i32 + 1,
                    j as i32 + 1,
                    j as i32 + 1,
                );
                let mut av = [_mm512_setzero_si512(); T];
                let mut init = [_mm512_setzero_si512(); T];
                for t in 0..T {
                    av[t] = act_pair(a.add(t * a_stride + blk * ab + kind.a_qs()), ab, two);
                    if offset_byte != 0 {
                        init[t] = _mm512_sub_epi32(
                            _mm512_setzero_si512(),
                            _mm512_dpbusd_epi32(_mm512_setzero_si512(), offset, av[t]),
                        );
                    }
                }
                for r in 0..R {
                    let wv =
                        weight_pair(kind, w.add(r * w_stride + blk * wb + kind.w_qs()), wb, two);
                    for t in 0..T {
                        let s = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(init[t], wv, av[t]));
                        let sc = _mm512_permutexvar_ps(idx, scales[r][t]);
                        acc[r][t] = _mm512_fmadd_ps(s, sc, acc[r][t]);
                    }
                }
                j += 2;
            }
        }
        g += 16;
    }
    for r in 0..R {
        for t in 0..T {
            let v = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][t], acc_min[r][t]));
            // SAFETY: caller contract on `out`.
            unsafe { *out.add(t * out_stride + r) = v };
        }
    }
}

macro_rules! legacy_tiles {
    ($($name:ident: $kind:expr, $r:literal x $t:literal;)*) => {$(
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,avx512vnni")]
        pub(crate) unsafe fn $name(
            n: usize,
            w: *const u8,
            w_stride: usize,
            a: *const u8,
            a_stride: usize,
            out: *mut f32,
            out_stride: usize,
        ) {
            // SAFETY: forwarded contract.
            unsafe { legacy_tile::<{ $kind as u8 }, $r, $t>(n, w, w_stride, a, a_stride, out, out_stride) }
        }
    )*};
}

legacy_tiles! {
    q4_0_q8_0_4x1: Legacy::Q4_0, 4 x 1;
    q4_0_q8_0_4x4: Legacy::Q4_0, 4 x 4;
    q4_1_q8_1_4x1: Legacy::Q4_1, 4 x 1;
    q4_1_q8_1_4x4: Legacy::Q4_1, 4 x 4;
    q8_0_q8_0_4x1: Legacy::Q8_0, 4 x 1;
    q8_0_q8_0_4x4: Legacy::Q8_0, 4 x 4;
}

/// Single-row dots built from the 1×1 tile, for rows left over after the 4-row tiles.
macro_rules! legacy_dots {
    ($($name:ident: $kind:expr;)*) => {$(
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,avx512vnni")]
        pub(crate) unsafe fn $name(n: usize, w: &[u8], a: &[u8]) -> f32 {
            let mut out = 0.0f32;
            // SAFETY: `w` and `a` hold one row / token of `n` values (caller contract).
            unsafe { legacy_tile::<{ $kind as u8 }, 1, 1>(n, w.as_ptr(), 0, a.as_ptr(), 0, &mut out, 0) };
            out
        }
    )*};
}

legacy_dots! {
    vec_dot_q4_0_q8_0: Legacy::Q4_0;
    vec_dot_q4_1_q8_1: Legacy::Q4_1;
    vec_dot_q8_0_q8_0: Legacy::Q8_0;
}

/// The float element types of weights and activations.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Float {
    F32,
    F16,
    /// BF16 widened to f32 by a shift (AVX-512 without BF16).
    Bf16Shift,
}

impl Float {
    const fn from_id(id: u8) -> Self {
        match id {
            0 => Self::F32,
            1 => Self::F16,
            _ => Self::Bf16Shift,
        }
    }

    const fn bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::Bf16Shift => 2,
        }
    }
}

/// 16 values at `p` as f32; `count < 16` loads only that many (the rest zero).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
unsafe fn load16(kind: Float, p: *const u8, count: usize) -> __m512 {
    let k16: __mmask16 = if count >= 16 {
        0xffff
    } else {
        (1u16 << count) - 1
    };
    // SAFETY: `count` values at `p` are readable (caller contract); masked lanes read nothing.
    unsafe {
        match kind {
            Float::F32 => _mm512_maskz_loadu_ps(k16, p.cast()),
            Float::F16 => _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k16, p.cast())),
            Float::Bf16Shift => _mm512_castsi512_ps(_mm512_slli_epi32::<16>(
                _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k16, p.cast())),
            )),
        }
    }
}

/// `R × T` tile of float weights against float activations of the same kind.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn float_tile<const KIND: u8, const R: usize, const T: usize>(
    n: usize,
    w: *const u8,
    w_stride: usize,
    a: *const u8,
    a_stride: usize,
    out: *mut f32,
    out_stride: usize,
) {
    let kind = const { Float::from_id(KIND) };
    let eb = kind.bytes();
    let mut acc = [[_mm512_setzero_ps(); T]; R];
    let mut i = 0;
    while i < n {
        let count = (n - i).min(16);
        // SAFETY: elements i..i+count exist in every row and token.
        unsafe {
            let mut av = [_mm512_setzero_ps(); T];
            for t in 0..T {
                av[t] = load16(kind, a.add(t * a_stride + i * eb), count);
            }
            for r in 0..R {
                let wv = load16(kind, w.add(r * w_stride + i * eb), count);
                for t in 0..T {
                    acc[r][t] = _mm512_fmadd_ps(wv, av[t], acc[r][t]);
                }
            }
        }
        i += 16;
    }
    for r in 0..R {
        for t in 0..T {
            // SAFETY: caller contract on `out`.
            unsafe { *out.add(t * out_stride + r) = _mm512_reduce_add_ps(acc[r][t]) };
        }
    }
}

macro_rules! float_kernels {
    ($($tile4x1:ident, $tile4x4:ident, $dot:ident: $kind:expr;)*) => {$(
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
        pub(crate) unsafe fn $tile4x1(
            n: usize, w: *const u8, w_stride: usize, a: *const u8, a_stride: usize, out: *mut f32,
            out_stride: usize,
        ) {
            // SAFETY: forwarded contract.
            unsafe { float_tile::<{ $kind as u8 }, 4, 1>(n, w, w_stride, a, a_stride, out, out_stride) }
        }
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
        pub(crate) unsafe fn $tile4x4(
            n: usize, w: *const u8, w_stride: usize, a: *const u8, a_stride: usize, out: *mut f32,
            out_stride: usize,
        ) {
            // SAFETY: forwarded contract.
            unsafe { float_tile::<{ $kind as u8 }, 4, 4>(n, w, w_stride, a, a_stride, out, out_stride) }
        }
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
        pub(crate) unsafe fn $dot(n: usize, w: &[u8], a: &[u8]) -> f32 {
            let mut out = 0.0f32;
            // SAFETY: one row and one token of `n` values (caller contract).
            unsafe { float_tile::<{ $kind as u8 }, 1, 1>(n, w.as_ptr(), 0, a.as_ptr(), 0, &mut out, 0) };
            out
        }
    )*};
}

float_kernels! {
    f32_4x1, f32_4x4, vec_dot_f32: Float::F32;
    f16_4x1, f16_4x4, vec_dot_f16: Float::F16;
    bf16_4x1, bf16_4x4, vec_dot_bf16: Float::Bf16Shift;
}

/// `R × T` BF16 tile with `vdpbf16ps` (pairs of bf16 products summed into f32 lanes, as ggml's AVX512-BF16
/// `ggml_vec_dot_bf16`), 32 values per step.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn bf16_dp_tile<const R: usize, const T: usize>(
    n: usize,
    w: *const u8,
    w_stride: usize,
    a: *const u8,
    a_stride: usize,
    out: *mut f32,
    out_stride: usize,
) {
    let mut acc = [[_mm512_setzero_ps(); T]; R];
    let mut i = 0;
    while i < n {
        let count = (n - i).min(32);
        let k: __mmask32 = if count >= 32 { !0 } else { (1u32 << count) - 1 };
        // SAFETY: elements i..i+count exist in every row and token; masked lanes read nothing. The
        // transmutes reinterpret 32 bf16 bit patterns as the `__m512bh` vector type of the same size.
        unsafe {
            let mut av = [_mm512_setzero_si512(); T];
            for t in 0..T {
                av[t] = _mm512_maskz_loadu_epi16(k, a.add(t * a_stride + 2 * i).cast());
            }
            for r in 0..R {
                let wv = _mm512_maskz_loadu_epi16(k, w.add(r * w_stride + 2 * i).cast());
                for t in 0..T {
                    acc[r][t] = _mm512_dpbf16_ps(
                        acc[r][t],
                        std::mem::transmute::<__m512i, __m512bh>(wv),
                        std::mem::transmute::<__m512i, __m512bh>(av[t]),
                    );
                }
            }
        }
        i += 32;
    }
    for r in 0..R {
        for t in 0..T {
            // SAFETY: caller contract on `out`.
            unsafe { *out.add(t * out_stride + r) = _mm512_reduce_add_ps(acc[r][t]) };
        }
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,avx512bf16")]
pub(crate) unsafe fn bf16_dp_4x1(
    n: usize,
    w: *const u8,
    w_stride: usize,
    a: *const u8,
    a_stride: usize,
    out: *mut f32,
    out_stride: usize,
) {
    // SAFETY: forwarded contract.
    unsafe { bf16_dp_tile::<4, 1>(n, w, w_stride, a, a_stride, out, out_stride) }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,avx512bf16")]
pub(crate) unsafe fn bf16_dp_4x4(
    n: usize,
    w: *const u8,
    w_stride: usize,
    a: *const u8,
    a_stride: usize,
    out: *mut f32,
    out_stride: usize,
) {
    // SAFETY: forwarded contract.
    unsafe { bf16_dp_tile::<4, 4>(n, w, w_stride, a, a_stride, out, out_stride) }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,avx512bf16")]
pub(crate) unsafe fn vec_dot_bf16_dp(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut out = 0.0f32;
    // SAFETY: one row and one token of `n` values (caller contract).
    unsafe { bf16_dp_tile::<1, 1>(n, w.as_ptr(), 0, a.as_ptr(), 0, &mut out, 0) };
    out
}
