//! AVX-512 element-wise kernels: SwiGLU and softmax exponentials with ggml's AVX-512 `ggml_v_expf`
//! (`vscalefps` for the exponent), so results equal llama.cpp's AVX-512 build; tails use libm.
//!
//! # Safety
//! Requires AVX-512 F/DQ (the level's features); `up.len() >= gate.len()`.

use std::arch::x86_64::*;

/// ggml's AVX-512 `ggml_v_expf`, operation for operation.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
pub(crate) fn v_expf(x: __m512) -> __m512 {
    let r = _mm512_set1_ps(f32::from_bits(0x4b40_0000)); // 0x1.8p23
    let z = _mm512_fmadd_ps(x, _mm512_set1_ps(f32::from_bits(0x3fb8_aa3b)), r); // 0x1.715476p+0
    let n = _mm512_sub_ps(z, r);
    let b = _mm512_fnmadd_ps(
        n,
        _mm512_set1_ps(f32::from_bits(0x35bf_be8e)), // 0x1.7f7d1cp-20
        _mm512_fnmadd_ps(n, _mm512_set1_ps(f32::from_bits(0x3f31_7200)), x), // 0x1.62e4p-1
    );
    let d = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(_mm512_abs_ps(n), _mm512_set1_ps(192.0));
    let u = _mm512_mul_ps(b, b);
    let j = _mm512_fmadd_ps(
        _mm512_fmadd_ps(
            _mm512_fmadd_ps(
                _mm512_set1_ps(f32::from_bits(0x3c07_2010)), // 0x1.0e4020p-7
                b,
                _mm512_set1_ps(f32::from_bits(0x3d2b_9f17)), // 0x1.573e2ep-5
            ),
            u,
            _mm512_fmadd_ps(
                _mm512_set1_ps(f32::from_bits(0x3e2a_af33)), // 0x1.555e66p-3
                b,
                _mm512_set1_ps(f32::from_bits(0x3eff_fedb)), // 0x1.fffdb6p-2
            ),
        ),
        u,
        _mm512_fmadd_ps(
            _mm512_set1_ps(f32::from_bits(0x3f7f_fff6)),
            b,
            _mm512_set1_ps(1.0),
        ), // 0x1.ffffecp-1
    );
    let res = _mm512_scalef_ps(j, n);
    if d == 0 {
        return res;
    }
    let zero = _mm512_setzero_ps();
    let alt = _mm512_mask_blend_ps(
        _mm512_cmp_ps_mask::<_CMP_LE_OQ>(n, zero),
        _mm512_set1_ps(f32::INFINITY),
        zero,
    );
    _mm512_mask_blend_ps(d, res, alt)
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
pub(crate) unsafe fn silu_mul(gate: &mut [f32], up: &[f32]) {
    let n = gate.len();
    debug_assert!(up.len() >= n);
    let mut i = 0;
    while i + 16 <= n {
        // SAFETY: 16 values inside both slices.
        unsafe {
            let x = _mm512_loadu_ps(gate.as_ptr().add(i));
            let e = v_expf(_mm512_sub_ps(_mm512_setzero_ps(), x));
            let s = _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0), e));
            let y = _mm512_mul_ps(s, _mm512_loadu_ps(up.as_ptr().add(i)));
            _mm512_storeu_ps(gate.as_mut_ptr().add(i), y);
        }
        i += 16;
    }
    crate::cpu::scalar::ops::silu_mul(&mut gate[i..], &up[i..n]);
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
pub(crate) unsafe fn exp_sum(x: &mut [f32], max: f32) -> f64 {
    let n = x.len();
    let mut sum = 0.0f64;
    let mut i = 0;
    while i + 16 <= n {
        // SAFETY: 16 values inside the slice.
        unsafe {
            let v = v_expf(_mm512_sub_ps(
                _mm512_loadu_ps(x.as_ptr().add(i)),
                _mm512_set1_ps(max),
            ));
            _mm512_storeu_ps(x.as_mut_ptr().add(i), v);
            sum += f64::from(_mm512_reduce_add_ps(v));
        }
        i += 16;
    }
    sum + crate::cpu::scalar::ops::exp_sum(&mut x[i..], max)
}
