//! AVX-512 VNNI matmul over 16-row interleaved weights (layout in `cpu::packed`): per block, four or eight
//! 64-byte weight loads, `vpdpbusd` against broadcast 4-byte activation words (one lane per row), then one
//! convert / scale / FMA per token for all 16 rows. Per-block activation scales and `Σa` corrections are
//! computed once per call into scratch.
//!
//! # Safety
//! The `unsafe fn`s need AVX-512 F/BW/VL/DQ + VNNI (the table is built only after detecting them); the
//! pointer contracts are stated on each.

use std::arch::x86_64::*;

use crate::cpu::isa::Kernels;
use crate::cpu::packed::{GroupTileFn, QuantTiles, T_TILE, matmul_quant};
use crate::cpu::{KernelError, Pool, Scratch};
use crate::quant::GgmlType;

use super::packed_k;

const Q4_0: u8 = 0;
const Q4_1: u8 = 1;
const Q8_0: u8 = 2;

/// The 4 activation bytes at `p` broadcast to every lane.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,avx512vnni")]
unsafe fn word(p: *const u8) -> __m512i {
    // SAFETY: the caller guarantees 4 readable bytes.
    _mm512_set1_epi32(unsafe { p.cast::<i32>().read_unaligned() })
}

/// One 16-row group × `T` tokens. `w`: the group's records (`nb` of `rec` bytes); `a`: token 0's activation
/// row, tokens `a_stride` bytes apart; `aux`: token 0's `(d, bias-or-s)` pairs for its `nb` blocks, tokens
/// `2 * nb` words apart; `out`: `y` at (token 0, the group's first row), tokens `out_stride` floats apart,
/// of which the first `valid` rows are written.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,avx512vnni")]
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
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
    let (head, rec) = match KIND {
        Q4_0 => (32, 288),
        Q4_1 => (64, 320),
        _ => (32, 544),
    };
    let (ab, qs) = if KIND == Q4_1 { (36, 4) } else { (34, 2) };
    let m4 = _mm512_set1_epi8(0x0f);
    let mut acc = [_mm512_setzero_ps(); T];
    for b in 0..nb {
        // SAFETY: record `b` of the group, block `b` of each token's activations and aux entries exist
        // (caller contract); every offset below stays inside them.
        unsafe {
            let r = w.add(b * rec);
            let dw = _mm512_cvtph_ps(_mm256_loadu_si256(r.cast()));
            let mut isum = [_mm512_setzero_si512(); T];
            let mut isum2 = [_mm512_setzero_si512(); T];
            let at: [*const u8; T] = std::array::from_fn(|t| a.add(t * a_stride + b * ab + qs));
            let xt: [*const u32; T] = std::array::from_fn(|t| aux.add(t * 2 * nb + 2 * b));
            if KIND != Q4_1 {
                for t in 0..T {
                    isum[t] = _mm512_set1_epi32(*xt[t].add(1) as i32);
                }
            }
            if KIND == Q8_0 {
                for c in 0..8 {
                    let v = _mm512_loadu_si512(r.add(head + 64 * c).cast());
                    for t in 0..T {
                        if c % 2 == 0 {
                            isum[t] = _mm512_dpbusd_epi32(isum[t], v, word(at[t].add(4 * c)));
                        } else {
                            isum2[t] = _mm512_dpbusd_epi32(isum2[t], v, word(at[t].add(4 * c)));
                        }
                    }
                }
            } else {
                for c in 0..4 {
                    let v = _mm512_loadu_si512(r.add(head + 64 * c).cast());
                    let lo = _mm512_and_si512(v, m4);
                    let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(v), m4);
                    for t in 0..T {
                        isum[t] = _mm512_dpbusd_epi32(isum[t], lo, word(at[t].add(4 * c)));
                        isum2[t] = _mm512_dpbusd_epi32(isum2[t], hi, word(at[t].add(16 + 4 * c)));
                    }
                }
            }
            let mw = if KIND == Q4_1 {
                _mm512_cvtph_ps(_mm256_loadu_si256(r.add(32).cast()))
            } else {
                _mm512_setzero_ps()
            };
            for t in 0..T {
                let s = _mm512_cvtepi32_ps(_mm512_add_epi32(isum[t], isum2[t]));
                let da = _mm512_set1_ps(f32::from_bits(*xt[t]));
                acc[t] = _mm512_fmadd_ps(s, _mm512_mul_ps(dw, da), acc[t]);
                if KIND == Q4_1 {
                    let sa = _mm512_set1_ps(f32::from_bits(*xt[t].add(1)));
                    acc[t] = _mm512_fmadd_ps(mw, sa, acc[t]);
                }
            }
        }
    }
    let k: __mmask16 = if valid >= 16 {
        0xffff
    } else {
        (1u16 << valid) - 1
    };
    for t in 0..T {
        // SAFETY: the first `valid` outputs of each token row exist (caller contract).
        unsafe { _mm512_mask_storeu_ps(out.add(t * out_stride), k, acc[t]) };
    }
}

/// The level's tiles of 1, 2, 3 and `T_TILE` tokens (the `by_tokens` of a tile table), each a
/// `target_feature` wrapper of the generic tile.
macro_rules! tiles {
    ($($name:ident: $kind:tt;)*) => {$(
        const $name: [GroupTileFn; T_TILE] = {
            /// # Safety
            /// See `packed::GroupTileFn`.
            #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,avx512vnni")]
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

/// The VNNI packed matmul (a `PackedMatmulFn`).
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
