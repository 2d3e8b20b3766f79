//! AVX2 matmul over the 16-row interleaved float layouts (F32, F16, BF16; `cpu::packed`): the AVX-512
//! float tiles with 256-bit vectors, for CPUs without AVX-512. A 16-row step is two 8-row halves; each
//! weight load is multiplied by every token's broadcast activation, so there are no horizontal sums and a
//! weight load serves 4 tokens. BF16 pairs are widened with shifts (no AVX512-BF16 here).
//!
//! # Safety
//! The `unsafe fn`s need AVX2 + FMA + F16C (the table is built only after detecting them); the pointer
//! contract is `packed::FloatTileFn`'s.

#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use crate::cpu::isa::Kernels;
use crate::cpu::packed::{FloatTileFn, FloatTiles, T_TILE, matmul_float};
use crate::cpu::{KernelError, Pool, Scratch};
use crate::quant::GgmlType;

const F32: u8 = 0;
const F16: u8 = 1;
const BF16: u8 = 2;

/// One 16-row group × `T` tokens (`packed::FloatTileFn`): both 8-row halves per step, one accumulator
/// per (half, token). A token's sums run in the same order whether it is alone or in a tile with others,
/// so a sequence's logits do not depend on what else is in its batch. A 4-token tile has 8 independent
/// FMA chains, each activation broadcast feeds two of them, and 8 accumulators leave registers for the
/// weights; decode's 2 chains still outrun memory. (Two accumulator sets over one half at a time, as the
/// AVX-512 tile does, read F16 pp512 at 564 vs llama.cpp's 675 tok/s; this tile ~600, bench/RESULTS.md.)
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn float_tile<const KIND: u8, const T: usize>(
    steps: usize,
    w: *const u8,
    a: *const u8,
    a_stride: usize,
    out: *mut f32,
    out_stride: usize,
    valid: usize,
) {
    let mut acc = [[_mm256_setzero_ps(); T]; 2];
    let high = _mm256_set1_epi32(-65536);
    for s in 0..steps {
        for h in 0..2 {
            // SAFETY: step `s` of the group (half `h`'s 32 or 16 bytes) and of each token's activations
            // exist (caller contract).
            unsafe {
                if KIND == BF16 {
                    // Lane r: (row r, column 2s) in the low half, (row r, column 2s+1) in the high.
                    let wv = _mm256_loadu_si256(w.add(64 * s + 32 * h).cast());
                    let even = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(wv));
                    let odd = _mm256_castsi256_ps(_mm256_and_si256(wv, high));
                    for t in 0..T {
                        let p = a.add(t * a_stride + 4 * s).cast::<u32>().read_unaligned();
                        let x0 = _mm256_set1_ps(f32::from_bits(p << 16));
                        let x1 = _mm256_set1_ps(f32::from_bits(p & 0xffff_0000));
                        acc[h][t] = _mm256_fmadd_ps(even, x0, acc[h][t]);
                        acc[h][t] = _mm256_fmadd_ps(odd, x1, acc[h][t]);
                    }
                } else {
                    let wv = if KIND == F32 {
                        _mm256_loadu_ps(w.add(64 * s + 32 * h).cast())
                    } else {
                        _mm256_cvtph_ps(_mm_loadu_si128(w.add(32 * s + 16 * h).cast()))
                    };
                    for t in 0..T {
                        let x = _mm256_set1_ps(
                            a.add(t * a_stride + 4 * s).cast::<f32>().read_unaligned(),
                        );
                        acc[h][t] = _mm256_fmadd_ps(wv, x, acc[h][t]);
                    }
                }
            }
        }
    }
    // SAFETY: the first `valid` outputs of each token row are writable (caller contract).
    unsafe { super::packed::store_group(acc, out, out_stride, valid) };
}

/// `x` rounded to f16 and back (`FloatTiles::round_through_f16`).
///
/// # Safety
/// AVX2 + F16C; `out.len() >= 4 * x.len()`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn round_through_f16(x: &[f32], out: &mut [u8]) {
    let mut i = 0;
    while i + 8 <= x.len() {
        // SAFETY: 8 values inside `x` and 32 bytes inside `out`.
        unsafe {
            let v = _mm256_loadu_ps(x.as_ptr().add(i));
            let r = _mm256_cvtph_ps(_mm256_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT }>(v));
            _mm256_storeu_ps(out.as_mut_ptr().add(4 * i).cast(), r);
        }
        i += 8;
    }
    for (j, &v) in x.iter().enumerate().skip(i) {
        out[4 * j..4 * j + 4].copy_from_slice(&half::f16::from_f32(v).to_f32().to_le_bytes());
    }
}

/// The level's tiles of 1, 2, 3 and `T_TILE` tokens (the `by_tokens` of a tile table), each a
/// `target_feature` wrapper of the generic tile.
macro_rules! tiles {
    ($($name:ident: $kind:tt;)*) => {$(
        const $name: [FloatTileFn; T_TILE] = {
            /// # Safety
            /// See `packed::FloatTileFn`.
            #[target_feature(enable = "avx2,fma,f16c")]
            unsafe fn tile<const T: usize>(
                steps: usize, w: *const u8, a: *const u8, a_stride: usize, out: *mut f32,
                out_stride: usize, valid: usize,
            ) {
                // SAFETY: forwarded contract.
                unsafe { float_tile::<$kind, T>(steps, w, a, a_stride, out, out_stride, valid) }
            }
            [tile::<1>, tile::<2>, tile::<3>, tile::<4>]
        };
    )*};
}

tiles! {
    F32_TILES: F32;
    F16_TILES: F16;
    BF16_TILES: BF16;
}

/// The AVX2 packed float matmul, called by the level's packed matmul for F32/F16/BF16.
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
    let by_tokens: [FloatTileFn; T_TILE] = match ty {
        GgmlType::F32 => F32_TILES,
        GgmlType::F16 => F16_TILES,
        GgmlType::BF16 => BF16_TILES,
        _ => {
            return Err(KernelError::Invalid(
                "matmul_packed: type has no packed float layout",
            ));
        }
    };
    let tiles = FloatTiles {
        by_tokens,
        round_through_f16,
    };
    matmul_float(
        k, pool, ty, rows, cols, data, x, n_tokens, y, scratch, tiles,
    )
}
