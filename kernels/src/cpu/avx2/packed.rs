//! AVX2 matmul over the 16-row interleaved legacy layouts (Q4_0, Q4_1, Q8_0; `cpu::packed`; the k-quants
//! are in `packed_k`, the float layouts in `packed_f`), for CPUs
//! without AVX-512 (Zen 2/3, Haswell to Broadwell): the VNNI tiles' scheme with 256-bit vectors. A 64-byte
//! weight chunk is two 8-row halves; without `vpdpbusd`, `maddubs` multiplies unsigned weight bytes by the
//! broadcast activation word into i16 pairs and one `madd` by ones per block widens them to the 8 row sums.
//! The per-row dot products of `dot.rs` re-decode every weight block for every token and reduce it
//! horizontally; here a weight load serves 4 tokens and the float work is once per block for 8 rows.
//!
//! - Q4_0 / Q4_1: nibbles 0..15 × activations: the eight `maddubs` of a block are summed in i16
//!   (8 · 2 · 15 · 128 = 30720 < 2^15) before the one widening `madd`.
//! - Q8_0: the layout stores `q ^ 0x80` (unsigned for `vpdpbusd`); `maddubs` of 255 × 127 pairs would
//!   saturate, so the tile flips back and uses ggml's sign trick (`|q|` × activation with `q`'s sign), one
//!   `madd` per chunk, and ignores the `−128 Σa` correction the VNNI tile needs.
//!
//! # Safety
//! The `unsafe fn`s need AVX2 + FMA + F16C (the table is built only after detecting them); the pointer
//! contract is `packed::GroupTileFn`'s.

// Accumulator grids indexed by (half, token) read better as index loops.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use crate::cpu::isa::Kernels;
use crate::cpu::packed::{GroupTileFn, QuantTiles, T_TILE, matmul_quant};
use crate::cpu::{KernelError, Pool, Scratch};
use crate::quant::GgmlType;

use super::packed_k;

const Q4_0: u8 = 0;
const Q4_1: u8 = 1;
const Q8_0: u8 = 2;

/// The 4 activation bytes at `p` broadcast to every 32-bit lane.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn word(p: *const u8) -> __m256i {
    // SAFETY: the caller guarantees 4 readable bytes.
    _mm256_set1_epi32(unsafe { p.cast::<i32>().read_unaligned() })
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn load(p: *const u8) -> __m256i {
    // SAFETY: the caller guarantees 32 readable bytes.
    unsafe { _mm256_loadu_si256(p.cast()) }
}

/// Stores the first `n` (≤ 8) lanes of `v` at `p`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn store_rows(p: *mut f32, v: __m256, n: usize) {
    if n >= 8 {
        // SAFETY: the caller guarantees 8 writable floats.
        unsafe { _mm256_storeu_ps(p, v) };
    } else {
        let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), lanes);
        // SAFETY: the caller guarantees `n` writable floats; masked-off lanes are not touched.
        unsafe { _mm256_maskstore_ps(p, mask, v) };
    }
}

/// Writes the first `valid` of a 16-row group's outputs for each of `T` tokens: rows 0..8 from
/// `acc[0]`, 8..16 from `acc[1]`.
///
/// # Safety
/// The first `valid` floats at `out + t * out_stride` are writable for every token `t < T`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn store_group<const T: usize>(
    acc: [[__m256; T]; 2],
    out: *mut f32,
    out_stride: usize,
    valid: usize,
) {
    for (half, rows) in acc.into_iter().enumerate() {
        let n = valid.saturating_sub(8 * half).min(8);
        if n == 0 {
            continue;
        }
        for (t, v) in rows.into_iter().enumerate() {
            // SAFETY: rows `8 * half .. 8 * half + n` of token `t` are among the first `valid` (caller
            // contract).
            unsafe { store_rows(out.add(t * out_stride + 8 * half), v, n) };
        }
    }
}

/// Halves `first..first + H` of a 16-row group × `T` tokens (contract of `packed::GroupTileFn`, whose
/// arguments these are). Decode (`T = 1`) runs both halves in one pass over the records; 4-token tiles
/// one half per pass, to stay within 16 vector registers. A row's sums are the same either way.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn halves<const KIND: u8, const T: usize, const H: usize>(
    first: usize,
    nb: usize,
    w: *const u8,
    a: *const u8,
    a_stride: usize,
    aux: *const u32,
    out: *mut f32,
    out_stride: usize,
    valid: usize,
) {
    let (head, rec) = match KIND {
        Q4_0 => (32, 288),
        Q4_1 => (64, 320),
        _ => (32, 544),
    };
    let (ab, qs) = if KIND == Q4_1 { (36, 4) } else { (34, 2) };
    let m4 = _mm256_set1_epi8(0x0f);
    let ones = _mm256_set1_epi16(1);
    let flip = _mm256_set1_epi8(0x80u8 as i8);
    let mut acc = [[_mm256_setzero_ps(); T]; H];
    for b in 0..nb {
        // SAFETY: record `b` of the group, block `b` of each token's activations and aux words exist
        // (caller contract); every offset below stays inside them.
        unsafe {
            let r = w.add(b * rec);
            let at: [*const u8; T] = std::array::from_fn(|t| a.add(t * a_stride + b * ab + qs));
            let xt: [*const u32; T] = std::array::from_fn(|t| aux.add(t * 2 * nb + 2 * b));
            for h in 0..H {
                let half = first + h;
                let mut isum = [_mm256_setzero_si256(); T];
                if KIND == Q8_0 {
                    for c in 0..8 {
                        let q = _mm256_xor_si256(load(r.add(head + 64 * c + 32 * half)), flip);
                        let mag = _mm256_abs_epi8(q);
                        for t in 0..T {
                            let s = _mm256_sign_epi8(word(at[t].add(4 * c)), q);
                            let p = _mm256_madd_epi16(_mm256_maddubs_epi16(mag, s), ones);
                            isum[t] = _mm256_add_epi32(isum[t], p);
                        }
                    }
                } else {
                    for c in 0..4 {
                        let v = load(r.add(head + 64 * c + 32 * half));
                        let lo = _mm256_and_si256(v, m4);
                        let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), m4);
                        for t in 0..T {
                            let pl = _mm256_maddubs_epi16(lo, word(at[t].add(4 * c)));
                            let ph = _mm256_maddubs_epi16(hi, word(at[t].add(16 + 4 * c)));
                            isum[t] = _mm256_add_epi16(isum[t], _mm256_add_epi16(pl, ph));
                        }
                    }
                    for t in 0..T {
                        isum[t] = _mm256_madd_epi16(isum[t], ones);
                        if KIND == Q4_0 {
                            isum[t] =
                                _mm256_add_epi32(isum[t], _mm256_set1_epi32(*xt[t].add(1) as i32));
                        }
                    }
                }
                let dw = _mm256_cvtph_ps(_mm_loadu_si128(r.add(16 * half).cast()));
                let mw = if KIND == Q4_1 {
                    _mm256_cvtph_ps(_mm_loadu_si128(r.add(32 + 16 * half).cast()))
                } else {
                    _mm256_setzero_ps()
                };
                for t in 0..T {
                    let da = _mm256_set1_ps(f32::from_bits(*xt[t]));
                    let s = _mm256_cvtepi32_ps(isum[t]);
                    acc[h][t] = _mm256_fmadd_ps(s, _mm256_mul_ps(dw, da), acc[h][t]);
                    if KIND == Q4_1 {
                        let sa = _mm256_set1_ps(f32::from_bits(*xt[t].add(1)));
                        acc[h][t] = _mm256_fmadd_ps(mw, sa, acc[h][t]);
                    }
                }
            }
        }
    }
    for h in 0..H {
        let rows = valid.saturating_sub(8 * (first + h)).min(8);
        if rows == 0 {
            continue;
        }
        for t in 0..T {
            // SAFETY: the first `valid` outputs of each token row exist (caller contract); this half
            // writes its `rows` of them.
            unsafe { store_rows(out.add(t * out_stride + 8 * (first + h)), acc[h][t], rows) };
        }
    }
}

/// One 16-row group × `T` tokens (`packed::GroupTileFn`).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn group_tile<const KIND: u8, const T: usize>(
    nb: usize,
    w: *const u8,
    a: *const u8,
    a_stride: usize,
    aux: *const u32,
    out: *mut f32,
    out_stride: usize,
    valid: usize,
) {
    // SAFETY: forwarded contract; halves cover rows 0..8 and 8..16 of the group.
    unsafe {
        if T == 1 {
            halves::<KIND, T, 2>(0, nb, w, a, a_stride, aux, out, out_stride, valid);
        } else {
            halves::<KIND, T, 1>(0, nb, w, a, a_stride, aux, out, out_stride, valid);
            if valid > 8 {
                halves::<KIND, T, 1>(1, nb, w, a, a_stride, aux, out, out_stride, valid);
            }
        }
    }
}

/// The level's tiles of 1, 2, 3 and `T_TILE` tokens (the `by_tokens` of a tile table), each a
/// `target_feature` wrapper of the generic tile.
macro_rules! tiles {
    ($($name:ident: $kind:tt;)*) => {$(
        const $name: [GroupTileFn; T_TILE] = {
            /// # Safety
            /// See `packed::GroupTileFn`.
            #[target_feature(enable = "avx2,fma,f16c")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn tile<const T: usize>(
                nb: usize, w: *const u8, a: *const u8, a_stride: usize, aux: *const u32, out: *mut f32,
                out_stride: usize, valid: usize,
            ) {
                // SAFETY: forwarded contract.
                unsafe { group_tile::<$kind, T>(nb, w, a, a_stride, aux, out, out_stride, valid) }
            }
            [tile::<1>, tile::<2>, tile::<3>, tile::<4>]
        };
    )*};
}

tiles! {
    Q4_0_TILES: Q4_0;
    Q4_1_TILES: Q4_1;
    Q8_0_TILES: Q8_0;
}

/// The types the AVX2 packed matmul multiplies.
pub(crate) const TYPES: &[GgmlType] = &[
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q8_0,
    GgmlType::Q4_K,
    GgmlType::Q6_K,
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
];

/// The AVX2 packed matmul (a `PackedMatmulFn`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul(
    k: &Kernels,
    pool: &Pool,
    ty: GgmlType,
    rows: usize,
    cols: usize,
    data: &[u8],
    x: &[f32],
    n_tokens: usize,
    y: &mut [f32],
    scratch: &mut Scratch,
) -> Result<(), KernelError> {
    if matches!(ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) {
        return super::packed_f::matmul(k, pool, ty, rows, cols, data, x, n_tokens, y, scratch);
    }
    let tiles = match ty {
        GgmlType::Q4_0 => QuantTiles::legacy(Q4_0_TILES),
        GgmlType::Q4_1 => QuantTiles::legacy(Q4_1_TILES),
        GgmlType::Q8_0 => QuantTiles::legacy(Q8_0_TILES),
        GgmlType::Q4_K => QuantTiles {
            by_tokens: packed_k::Q4K_TILES,
            aux_words: packed_k::Q4K_AUX,
            fill_aux: packed_k::fill_aux,
        },
        GgmlType::Q6_K => QuantTiles {
            by_tokens: packed_k::Q6K_TILES,
            aux_words: packed_k::Q6K_AUX,
            fill_aux: packed_k::fill_aux,
        },
        _ => {
            return Err(KernelError::Invalid(
                "matmul_packed: type has no packed layout",
            ));
        }
    };
    matmul_quant(
        k, pool, ty, rows, cols, data, x, n_tokens, y, scratch, tiles,
    )
}
