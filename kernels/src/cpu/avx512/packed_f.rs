//! AVX-512 matmul over 16-row interleaved float weights (F32, F16, BF16; layout in `cpu::packed`): one load
//! is a column of 16 rows, multiplied by each token's broadcast activation into one accumulator per token
//! (BF16: a column pair with `vdpbf16ps`, as ggml's AVX512-BF16 dot). No horizontal sums; a tile writes
//! 16 outputs per token with one store.
//!
//! Activations as llama.cpp converts them: F32 unchanged, F16 rounded to f16 (used here as the f32 of that
//! f16), BF16 rounded to bf16.
//!
//! # Safety
//! The `unsafe fn`s need AVX-512 F/BW/VL/DQ (+ AVX512-BF16 for the `vdpbf16ps` tiles); pointer contracts on
//! `float_tile`.

// Token accumulator arrays read better as index loops.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use crate::cpu::isa::Kernels;
use crate::cpu::packed::{FloatTileFn, FloatTiles, GROUP, T_TILE, matmul_float};
use crate::cpu::{KernelError, Pool, Scratch};
use crate::quant::GgmlType;

const F32: u8 = 0;
const F16: u8 = 1;
/// BF16 widened by shifts (AVX-512 without BF16).
const BF16_SHIFT: u8 = 2;
/// BF16 with `vdpbf16ps`.
const BF16_DP: u8 = 3;

/// One 16-row group × `T` tokens over `steps` steps. `w`: the group's steps (64 bytes each; F16: 32);
/// `a`: token 0's activations (f32 for F32/F16, bf16 for BF16), tokens `a_stride` bytes apart; `out`: `y`
/// at (token 0, the group's first row), tokens `out_stride` floats apart; the first `valid` rows are written.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
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
    // Independent accumulator sets (step `s` goes to set `s % SETS`), for every tile width: a token's sums
    // are then added in the same order whether it is computed alone or in a tile with others, so a
    // sequence's logits do not depend on what else is in its batch (the server batches unrelated requests).
    const SETS: usize = 4;
    let mut acc = [[_mm512_setzero_ps(); T]; SETS];
    // `u` runs over a constant range, so the sets stay in registers.
    let mut s0 = 0;
    while s0 < steps {
        for (u, acc_u) in acc.iter_mut().enumerate() {
            let s = s0 + u;
            if s >= steps {
                break;
            }
            // SAFETY: step `s` of the group and of each token's activations exist (caller contract).
            unsafe {
                match KIND {
                    F32 | F16 => {
                        let wv = if KIND == F32 {
                            _mm512_loadu_ps(w.add(64 * s).cast())
                        } else {
                            _mm512_cvtph_ps(_mm256_loadu_si256(w.add(32 * s).cast()))
                        };
                        for (t, acc_t) in acc_u.iter_mut().enumerate() {
                            let x = _mm512_set1_ps(
                                a.add(t * a_stride + 4 * s).cast::<f32>().read_unaligned(),
                            );
                            *acc_t = _mm512_fmadd_ps(wv, x, *acc_t);
                        }
                    }
                    _ => {
                        // Lane r: (row r, column 2s) in the low half, (row r, column 2s+1) in the high half.
                        let wv = _mm512_loadu_si512(w.add(64 * s).cast());
                        for (t, acc_t) in acc_u.iter_mut().enumerate() {
                            let p = a.add(t * a_stride + 4 * s).cast::<i32>().read_unaligned();
                            if KIND == BF16_DP {
                                *acc_t = bf16_dp(*acc_t, wv, _mm512_set1_epi32(p));
                            } else {
                                let even = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(wv));
                                let odd = _mm512_castsi512_ps(_mm512_and_si512(
                                    wv,
                                    _mm512_set1_epi32(-65536),
                                ));
                                let x0 = _mm512_set1_ps(f32::from_bits((p as u32) << 16));
                                let x1 = _mm512_set1_ps(f32::from_bits(p as u32 & 0xffff_0000));
                                *acc_t = _mm512_fmadd_ps(even, x0, *acc_t);
                                *acc_t = _mm512_fmadd_ps(odd, x1, *acc_t);
                            }
                        }
                    }
                }
            }
        }
        s0 += SETS;
    }
    let mut sum = acc[0];
    for acc_u in &acc[1..] {
        for t in 0..T {
            sum[t] = _mm512_add_ps(sum[t], acc_u[t]);
        }
    }
    let k: __mmask16 = if valid >= GROUP {
        0xffff
    } else {
        (1u16 << valid) - 1
    };
    for t in 0..T {
        // SAFETY: the first `valid` outputs of each token row are writable (caller contract).
        unsafe { _mm512_mask_storeu_ps(out.add(t * out_stride), k, sum[t]) };
    }
}

/// `vdpbf16ps` in a function of its own, so that only the BF16 tiles require AVX512-BF16.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,avx512bf16")]
fn bf16_dp(acc: __m512, w: __m512i, x: __m512i) -> __m512 {
    // SAFETY: reinterpreting 32 bf16 bit patterns as the same-sized `__m512bh`.
    unsafe {
        _mm512_dpbf16_ps(
            acc,
            std::mem::transmute::<__m512i, __m512bh>(w),
            std::mem::transmute::<__m512i, __m512bh>(x),
        )
    }
}

/// `x` rounded to f16 (nearest even, as F16C converts) and back, as little-endian f32 bytes in `out`.
///
/// # Safety
/// AVX-512 F + F16C; `out.len() >= 4 * x.len()`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
unsafe fn round_through_f16(x: &[f32], out: &mut [u8]) {
    let mut i = 0;
    while i + 16 <= x.len() {
        // SAFETY: 16 values inside `x` and 64 bytes inside `out`.
        unsafe {
            let v = _mm512_loadu_ps(x.as_ptr().add(i));
            let r = _mm512_cvtph_ps(_mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT }>(v));
            _mm512_storeu_ps(out.as_mut_ptr().add(4 * i).cast(), r);
        }
        i += 16;
    }
    for (j, &v) in x.iter().enumerate().skip(i) {
        out[4 * j..4 * j + 4].copy_from_slice(&half::f16::from_f32(v).to_f32().to_le_bytes());
    }
}

/// The level's tiles of 1, 2, 3 and `T_TILE` tokens (the `by_tokens` of a tile table), each a
/// `target_feature` wrapper of the generic tile.
macro_rules! tiles {
    ($($name:ident: $kind:tt, $feat:literal;)*) => {$(
        const $name: [FloatTileFn; T_TILE] = {
            /// # Safety
            /// See `float_tile` (the features of this wrapper include the tile's).
            #[target_feature(enable = $feat)]
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
    F32_TILES: F32, "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c";
    F16_TILES: F16, "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c";
    BF16S_TILES: BF16_SHIFT, "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c";
    BF16D_TILES: BF16_DP, "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,avx512bf16";
}

/// The packed float matmul, called by the VNNI level's packed matmul for F32/F16/BF16.
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
    let dp = is_x86_feature_detected!("avx512bf16");
    matmul_with(k, pool, ty, rows, cols, data, x, n_tokens, y, scratch, dp)
}

/// [`matmul`] choosing the BF16 variant (`dp`: `vdpbf16ps`, else shifts), so tests reach both.
#[allow(clippy::too_many_arguments)]
fn matmul_with(
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
    dp: bool,
) -> Result<(), KernelError> {
    let by_tokens: [FloatTileFn; T_TILE] = match ty {
        GgmlType::F32 => F32_TILES,
        GgmlType::F16 => F16_TILES,
        _ if dp => BF16D_TILES,
        _ => BF16S_TILES,
    };
    let tiles = FloatTiles {
        by_tokens,
        round_through_f16,
    };
    matmul_float(
        k, pool, ty, rows, cols, data, x, n_tokens, y, scratch, tiles,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::{Isa, QMatrix};

    #[test]
    fn bf16_shift_and_dp_tiles_agree() {
        let Some(k) = Kernels::for_isa(Isa::Avx512Vnni) else {
            return;
        };
        let (rows, cols, n) = (37, 96, 11);
        let wf: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919) % 1009) as f32 / 1009.0 - 0.5)
            .collect();
        let mut raw = Vec::new();
        crate::quant::quantize_row(GgmlType::BF16, &wf, &mut raw).expect("bf16");
        let p = k
            .pack(&QMatrix::new(GgmlType::BF16, rows, cols, &raw).expect("matrix"))
            .expect("pack");
        let x: Vec<f32> = (0..n * cols)
            .map(|i| ((i * 31) % 97) as f32 / 97.0 - 0.5)
            .collect();
        let pool = Pool::new(2);
        let mut s = Scratch::new();
        let (mut y1, mut y2) = (vec![0.0; n * rows], vec![0.0; n * rows]);
        let data = &p.data;
        matmul_with(
            k,
            &pool,
            GgmlType::BF16,
            rows,
            cols,
            data,
            &x,
            n,
            &mut y1,
            &mut s,
            false,
        )
        .expect("shift");
        if is_x86_feature_detected!("avx512bf16") {
            matmul_with(
                k,
                &pool,
                GgmlType::BF16,
                rows,
                cols,
                data,
                &x,
                n,
                &mut y2,
                &mut s,
                true,
            )
            .expect("dp");
        } else {
            k.matmul(
                &pool,
                &QMatrix::new(GgmlType::BF16, rows, cols, &raw).expect("m"),
                &x,
                n,
                &mut y2,
                &mut s,
            )
            .expect("plain");
        }
        for (a, b) in y1.iter().zip(&y2) {
            assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{a} vs {b}");
        }
    }
}
