//! AVX-512 activation converters, byte-identical twins of `scalar::act`. Q8_K (ggml's
//! `quantize_row_q8_K_ref`, which x86 builds use): the first element of largest magnitude sets
//! `iscale = -127 / max`, quants are `min(127, round_half_even(iscale · x))`, `bsums` are sums of 16.
//! Q8_0 / Q8_1 / F16 / BF16 keep the AVX2 versions (already one register per block).
//!
//! # Safety
//! Requires AVX-512 F/BW/VL/DQ; `dst` holds exactly the bytes of `x.len()` values, `x.len()` a multiple of
//! 256.

use std::arch::x86_64::*;

use crate::cpu::layout::Q8_K_BYTES;

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
pub(crate) unsafe fn quantize_q8_k(x: &[f32], dst: &mut [u8]) {
    let nb = x.len() / 256;
    debug_assert!(dst.len() >= nb * Q8_K_BYTES);
    for b in 0..nb {
        let xs = &x[256 * b..256 * (b + 1)];
        let out = &mut dst[b * Q8_K_BYTES..(b + 1) * Q8_K_BYTES];
        // SAFETY: `xs` is 256 floats, `out` one Q8_K block (292 bytes); every access below is inside them.
        unsafe {
            let mut v = [_mm512_setzero_ps(); 16];
            for (i, vi) in v.iter_mut().enumerate() {
                *vi = _mm512_loadu_ps(xs.as_ptr().add(16 * i));
            }
            let mut m = _mm512_abs_ps(v[0]);
            for vi in &v[1..] {
                m = _mm512_max_ps(m, _mm512_abs_ps(*vi));
            }
            let amax = _mm512_reduce_max_ps(m);
            if amax == 0.0 {
                out.fill(0);
                continue;
            }
            // The first element whose magnitude is the maximum, with its sign (the reference's strict `>`).
            let target = _mm512_set1_ps(amax);
            let mut max = 0.0f32;
            for (i, vi) in v.iter().enumerate() {
                let k = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(_mm512_abs_ps(*vi), target);
                if k != 0 {
                    max = xs[16 * i + k.trailing_zeros() as usize];
                    break;
                }
            }
            let iscale = -127.0 / max;
            let sc = _mm512_set1_ps(iscale);
            let qs = out.as_mut_ptr().add(4);
            let bsums = out.as_mut_ptr().add(260);
            for (i, vi) in v.iter().enumerate() {
                let q = _mm512_min_epi32(
                    _mm512_cvtps_epi32(_mm512_mul_ps(*vi, sc)),
                    _mm512_set1_epi32(127),
                );
                _mm_storeu_si128(qs.add(16 * i).cast(), _mm512_cvtsepi32_epi8(q));
                let s = _mm512_reduce_add_epi32(q) as i16;
                bsums
                    .add(2 * i)
                    .cast::<[u8; 2]>()
                    .write_unaligned(s.to_le_bytes());
            }
            out.as_mut_ptr()
                .cast::<[u8; 4]>()
                .write_unaligned((1.0 / iscale).to_le_bytes());
        }
    }
}
