//! AVX-512 attention over an f16 KV cache for up to [`MAX_ROWS`] query rows that share one KV head: the
//! heads of a GQA group, for one token or for several consecutive tokens (row `r` is head `r % group` of
//! token `r / group` and sees `n_kv0 + r / group` positions). Each key and value load serves every row.
//!
//! Positions go in blocks of 16: the block's keys are widened to f32 once; each row's 16 dot products
//! (`q16 · k_j`, `q` rounded to f16 as in llama.cpp) are summed by a transpose-and-add tree into one
//! vector of 16 scores; one online-softmax update per block (ggml's AVX-512 `exp`); then `Σ p_j · v_j`
//! with each value chunk loaded once for all rows.
//!
//! # Safety
//! Needs AVX-512 F/BW/VL/DQ (+ F16C, FMA). Contract of [`attn_rows`]: for `r < rows`, row `r` of `q` and
//! `out` is `d` floats at `(r / group) * tok_stride + (r % group) * d`; `1 <= rows <= MAX_ROWS`, `group >=
//! 1`, `d` a multiple of 16 and at most [`MAX_DIM`]; `k` and `v` point at position 0 of one KV head with
//! `n_kv0 + (rows - 1) / group` positions `kv_stride` bytes apart, each `d` f16 values; `n_kv0 >= 1`.

// Row/position/chunk grids read better as index loops.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use super::ops::v_expf;

/// Query rows handled per call.
pub(crate) const MAX_ROWS: usize = 16;
/// Largest head dimension of the blocked kernel.
pub(crate) const MAX_DIM: usize = 256;
const MAX_CHUNKS: usize = MAX_DIM / 16;

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
unsafe fn f16x16(p: *const u8) -> __m512 {
    // SAFETY: the caller guarantees 32 readable bytes.
    _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(p.cast()) })
}

/// `r[j] = Σ lanes of v[j]` for 16 vectors: three levels of 128/256-bit shuffles and adds, one in-lane
/// level, and a final permute restoring position order.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
fn sum16(v: &[__m512; 16]) -> __m512 {
    let mut w = [_mm512_setzero_ps(); 8];
    for p in 0..8 {
        let (a, b) = (v[2 * p], v[2 * p + 1]);
        w[p] = _mm512_add_ps(
            _mm512_shuffle_f32x4::<0x44>(a, b),
            _mm512_shuffle_f32x4::<0xee>(a, b),
        );
    }
    // Quarter k of x[p] holds 4 partial sums of position 4p + k.
    let mut x = [_mm512_setzero_ps(); 4];
    for p in 0..4 {
        let (a, b) = (w[2 * p], w[2 * p + 1]);
        x[p] = _mm512_add_ps(
            _mm512_shuffle_f32x4::<0x88>(a, b),
            _mm512_shuffle_f32x4::<0xdd>(a, b),
        );
    }
    let mut y = [_mm512_setzero_ps(); 2];
    for p in 0..2 {
        let (a, b) = (x[2 * p], x[2 * p + 1]);
        y[p] = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    }
    let (a, b) = (_mm512_castps_pd(y[0]), _mm512_castps_pd(y[1]));
    // The 64-bit unpacks only move pairs of floats; the add must stay in f32.
    let z = _mm512_add_ps(
        _mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
        _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)),
    );
    // Lane 4k + p of z holds position 4p + k.
    let idx = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    _mm512_permutexvar_ps(idx, z)
}

/// See the module docs for the contract.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn attn_rows(
    q: *const f32,
    out: *mut f32,
    tok_stride: usize,
    rows: usize,
    group: usize,
    k: *const u8,
    v: *const u8,
    kv_stride: usize,
    n_kv0: usize,
    d: usize,
    scale: f32,
) {
    let chunks = d / 16;
    debug_assert!((1..=MAX_ROWS).contains(&rows) && chunks <= MAX_CHUNKS && d.is_multiple_of(16));
    let row_at = |r: usize| (r / group) * tok_stride + (r % group) * d;
    let limit = |r: usize| n_kv0 + r / group;
    let n_max = limit(rows - 1);
    // Q rounded to f16 and back (K's vec_dot_type in ggml).
    let mut qf = [[_mm512_setzero_ps(); MAX_CHUNKS]; MAX_ROWS];
    for i in 0..rows {
        for c in 0..chunks {
            // SAFETY: row `i`, chunk `c` of `q` is readable (contract).
            let x = unsafe { _mm512_loadu_ps(q.add(row_at(i) + 16 * c)) };
            qf[i][c] = _mm512_cvtph_ps(_mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT }>(x));
        }
    }
    let mut acc = [[_mm512_setzero_ps(); MAX_CHUNKS]; MAX_ROWS];
    let mut m = [f32::NEG_INFINITY; MAX_ROWS];
    let mut l = [0.0f32; MAX_ROWS];
    let mut probs = [[0.0f32; 16]; MAX_ROWS];
    let mut kf = [[_mm512_setzero_ps(); MAX_CHUNKS]; 16];
    let mut j0 = 0;
    while j0 < n_max {
        let len = (n_max - j0).min(16);
        for j in 0..len {
            for c in 0..chunks {
                // SAFETY: position j0 + j < n_max exists, chunk c < d / 16 (contract).
                kf[j][c] = unsafe { f16x16(k.add((j0 + j) * kv_stride + 32 * c)) };
            }
        }
        let mut ms = [1.0f32; MAX_ROWS];
        for i in 0..rows {
            let lim = limit(i);
            if j0 >= lim {
                probs[i] = [0.0; 16];
                continue;
            }
            let mut part = [_mm512_setzero_ps(); 16];
            for j in 0..len {
                let mut s = _mm512_mul_ps(kf[j][0], qf[i][0]);
                for c in 1..chunks {
                    s = _mm512_fmadd_ps(kf[j][c], qf[i][c], s);
                }
                part[j] = s;
            }
            let n_valid = (lim - j0).min(len);
            let valid: __mmask16 = if n_valid == 16 {
                0xffff
            } else {
                (1u16 << n_valid) - 1
            };
            let s = _mm512_mask_mul_ps(
                _mm512_set1_ps(f32::NEG_INFINITY),
                valid,
                sum16(&part),
                _mm512_set1_ps(scale),
            );
            let m_new = m[i].max(_mm512_reduce_max_ps(s));
            ms[i] = (m[i] - m_new).exp();
            let p = _mm512_maskz_mov_ps(valid, v_expf(_mm512_sub_ps(s, _mm512_set1_ps(m_new))));
            l[i] = l[i] * ms[i] + _mm512_reduce_add_ps(p);
            m[i] = m_new;
            // SAFETY: `probs[i]` is 16 floats.
            unsafe { _mm512_storeu_ps(probs[i].as_mut_ptr(), p) };
        }
        for c in 0..chunks {
            let mut a = [_mm512_setzero_ps(); MAX_ROWS];
            for i in 0..rows {
                a[i] = _mm512_mul_ps(acc[i][c], _mm512_set1_ps(ms[i]));
            }
            for j in 0..len {
                // SAFETY: as for the keys.
                let vj = unsafe { f16x16(v.add((j0 + j) * kv_stride + 32 * c)) };
                for i in 0..rows {
                    a[i] = _mm512_fmadd_ps(_mm512_set1_ps(probs[i][j]), vj, a[i]);
                }
            }
            for i in 0..rows {
                acc[i][c] = a[i];
            }
        }
        j0 += 16;
    }
    for i in 0..rows {
        let inv = _mm512_set1_ps(if l[i] == 0.0 { 0.0 } else { 1.0 / l[i] });
        for c in 0..chunks {
            // SAFETY: row `i`, chunk `c` of `out` is writable (contract).
            unsafe { _mm512_storeu_ps(out.add(row_at(i) + 16 * c), _mm512_mul_ps(acc[i][c], inv)) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
    fn sum16_of(vals: &[[f32; 16]; 16]) -> [f32; 16] {
        let mut v = [_mm512_setzero_ps(); 16];
        for (x, row) in v.iter_mut().zip(vals) {
            // SAFETY: 16 floats.
            *x = unsafe { _mm512_loadu_ps(row.as_ptr()) };
        }
        let mut out = [0.0f32; 16];
        // SAFETY: 16 floats.
        unsafe { _mm512_storeu_ps(out.as_mut_ptr(), sum16(&v)) };
        out
    }

    #[test]
    fn sum16_sums_each_vector() {
        if !crate::cpu::Isa::Avx512.is_available() {
            return;
        }
        let vals: [[f32; 16]; 16] =
            std::array::from_fn(|j| std::array::from_fn(|l| (j * 100 + l) as f32));
        // SAFETY: AVX-512 was detected above.
        let got = unsafe { sum16_of(&vals) };
        let want: [f32; 16] = std::array::from_fn(|j| vals[j].iter().sum());
        assert_eq!(got, want);
    }
}
