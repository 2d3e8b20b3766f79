//! AVX2 attention over an f16 KV cache: the AVX-512 kernel's scheme (`avx512::attention`, whose contract
//! this `attn_rows` shares: up to 16 query rows of one KV head, `d` a multiple of 16 up to 256) with
//! 256-bit vectors and blocks of 8 positions. Each key and value load serves every row; the 8 scores of a
//! row are one vector (a transpose-and-add of 8 dot-product vectors), so the online softmax runs once per
//! block with ggml's AVX2 `exp`, instead of a dot product, a scalar `exp` and an `axpy` per position.
//!
//! # Safety
//! Needs AVX2 + FMA + F16C (the table is built only after detecting them); the contract of
//! `avx512::attention::attn_rows`.

// Row/position/chunk grids read better as index loops.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use super::ops::v_expf;

const MAX_ROWS: usize = 16;
const MAX_CHUNKS: usize = 256 / 8;

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16x8(p: *const u8) -> __m256 {
    // SAFETY: the caller guarantees 16 readable bytes.
    _mm256_cvtph_ps(unsafe { _mm_loadu_si128(p.cast()) })
}

/// `r[j] = Σ lanes of v[j]` for 8 vectors.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn sum8(v: &[__m256; 8]) -> __m256 {
    // Lanes of a pair-sum `hadd(a, b)`: a01 a23 b01 b23 | a45 a67 b45 b67.
    let t0 = _mm256_hadd_ps(v[0], v[1]);
    let t1 = _mm256_hadd_ps(v[2], v[3]);
    let t2 = _mm256_hadd_ps(v[4], v[5]);
    let t3 = _mm256_hadd_ps(v[6], v[7]);
    // Low 128 bits: the low-half sums of v0..v3 (v4..v7), high 128 bits: their high-half sums.
    let u0 = _mm256_hadd_ps(t0, t1);
    let u1 = _mm256_hadd_ps(t2, t3);
    _mm256_add_ps(
        _mm256_permute2f128_ps::<0x20>(u0, u1),
        _mm256_permute2f128_ps::<0x31>(u0, u1),
    )
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn hmax(v: __m256) -> f32 {
    let m = _mm_max_ps(_mm256_extractf128_ps::<1>(v), _mm256_castps256_ps128(v));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)))
}

/// See the module docs for the contract.
#[target_feature(enable = "avx2,fma,f16c")]
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
    let chunks = d / 8;
    debug_assert!((1..=MAX_ROWS).contains(&rows) && chunks <= MAX_CHUNKS && d.is_multiple_of(16));
    let row_at = |r: usize| (r / group) * tok_stride + (r % group) * d;
    let limit = |r: usize| n_kv0 + r / group;
    let n_max = limit(rows - 1);
    // Q rounded to f16 and back (K's vec_dot_type in ggml).
    let mut qf = [[_mm256_setzero_ps(); MAX_CHUNKS]; MAX_ROWS];
    for i in 0..rows {
        for c in 0..chunks {
            // SAFETY: row `i`, chunk `c` of `q` is readable (contract).
            let x = unsafe { _mm256_loadu_ps(q.add(row_at(i) + 8 * c)) };
            qf[i][c] = _mm256_cvtph_ps(_mm256_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT }>(x));
        }
    }
    let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let mut acc = [[_mm256_setzero_ps(); MAX_CHUNKS]; MAX_ROWS];
    let mut m = [f32::NEG_INFINITY; MAX_ROWS];
    let mut l = [0.0f32; MAX_ROWS];
    let mut probs = [[0.0f32; 8]; MAX_ROWS];
    let mut kf = [[_mm256_setzero_ps(); MAX_CHUNKS]; 8];
    let mut j0 = 0;
    while j0 < n_max {
        let len = (n_max - j0).min(8);
        for j in 0..len {
            for c in 0..chunks {
                // SAFETY: position j0 + j < n_max exists, chunk c < d / 8 (contract).
                kf[j][c] = unsafe { f16x8(k.add((j0 + j) * kv_stride + 16 * c)) };
            }
        }
        let mut ms = [1.0f32; MAX_ROWS];
        for i in 0..rows {
            let lim = limit(i);
            if j0 >= lim {
                probs[i] = [0.0; 8];
                continue;
            }
            let mut part = [_mm256_setzero_ps(); 8];
            for j in 0..len {
                let mut s = _mm256_mul_ps(kf[j][0], qf[i][0]);
                for c in 1..chunks {
                    s = _mm256_fmadd_ps(kf[j][c], qf[i][c], s);
                }
                part[j] = s;
            }
            let n_valid = (lim - j0).min(len);
            let valid =
                _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(n_valid as i32), lanes));
            let s = _mm256_blendv_ps(
                _mm256_set1_ps(f32::NEG_INFINITY),
                _mm256_mul_ps(sum8(&part), _mm256_set1_ps(scale)),
                valid,
            );
            let m_new = m[i].max(hmax(s));
            ms[i] = (m[i] - m_new).exp();
            let p = _mm256_and_ps(valid, v_expf(_mm256_sub_ps(s, _mm256_set1_ps(m_new))));
            l[i] = l[i] * ms[i] + super::dot::hsum_f32x8(p);
            m[i] = m_new;
            // SAFETY: `probs[i]` is 8 floats.
            unsafe { _mm256_storeu_ps(probs[i].as_mut_ptr(), p) };
        }
        for c in 0..chunks {
            let mut a = [_mm256_setzero_ps(); MAX_ROWS];
            for i in 0..rows {
                a[i] = _mm256_mul_ps(acc[i][c], _mm256_set1_ps(ms[i]));
            }
            for j in 0..len {
                // SAFETY: as for the keys.
                let vj = unsafe { f16x8(v.add((j0 + j) * kv_stride + 16 * c)) };
                for i in 0..rows {
                    a[i] = _mm256_fmadd_ps(_mm256_set1_ps(probs[i][j]), vj, a[i]);
                }
            }
            for i in 0..rows {
                acc[i][c] = a[i];
            }
        }
        j0 += 8;
    }
    for i in 0..rows {
        let inv = _mm256_set1_ps(if l[i] == 0.0 { 0.0 } else { 1.0 / l[i] });
        for c in 0..chunks {
            // SAFETY: row `i`, chunk `c` of `out` is writable (contract).
            unsafe { _mm256_storeu_ps(out.add(row_at(i) + 8 * c), _mm256_mul_ps(acc[i][c], inv)) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sum8_sums_each_vector() {
        if !crate::cpu::Isa::Avx2.is_available() {
            return;
        }
        let vals: [[f32; 8]; 8] =
            std::array::from_fn(|j| std::array::from_fn(|l| (j * 100 + l) as f32));
        // SAFETY: AVX2 was detected above; each row is 8 floats.
        let got = unsafe {
            let v: [__m256; 8] = std::array::from_fn(|j| _mm256_loadu_ps(vals[j].as_ptr()));
            let mut out = [0.0f32; 8];
            _mm256_storeu_ps(out.as_mut_ptr(), sum8(&v));
            out
        };
        let want: [f32; 8] = std::array::from_fn(|j| vals[j].iter().sum());
        assert_eq!(got, want);
    }
}
