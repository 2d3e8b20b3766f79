//! AVX2 activation converters, byte-identical twins of `scalar::act` (ggml's x86 `quantize_row_q8_0` /
//! `quantize_row_q8_1`: max |x| by `max_ps`, `id = 127 / amax`, `round_ps(NEAREST)`, saturating packs).
//! Q8_K keeps the scalar reference (as ggml's x86 build does).
//!
//! # Safety
//! Every function requires AVX2, FMA and F16C and `dst` to hold exactly the bytes of `x.len()` values of its
//! format, `x.len()` a multiple of the block size.

use std::arch::x86_64::*;

use crate::cpu::layout::{Q8_0_BYTES, Q8_1_BYTES};

/// Quantizes 32 floats at `x` to 32 i8 at `q`; returns `(d, Σq)`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_block(x: *const f32, q: *mut u8) -> (f32, i32) {
    // SAFETY: the caller guarantees 32 readable floats at `x` and 32 writable bytes at `q`.
    unsafe {
        let v = [
            _mm256_loadu_ps(x),
            _mm256_loadu_ps(x.add(8)),
            _mm256_loadu_ps(x.add(16)),
            _mm256_loadu_ps(x.add(24)),
        ];
        let sign = _mm256_set1_ps(-0.0);
        let mut m = _mm256_andnot_ps(sign, v[0]);
        for vi in &v[1..] {
            m = _mm256_max_ps(m, _mm256_andnot_ps(sign, *vi));
        }
        let m4 = _mm_max_ps(_mm256_extractf128_ps::<1>(m), _mm256_castps256_ps128(m));
        let m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        let m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        let amax = _mm_cvtss_f32(m4);
        let d = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let mul = _mm256_set1_ps(id);
        let mut i = [_mm256_setzero_si256(); 4];
        for (ik, vk) in i.iter_mut().zip(v) {
            let r = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                _mm256_mul_ps(vk, mul),
            );
            *ik = _mm256_cvtps_epi32(r);
        }
        let s = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
        let s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256::<1>(s));
        let s4 = _mm_add_epi32(s4, _mm_unpackhi_epi64(s4, s4));
        let s4 = _mm_add_epi32(s4, _mm_shuffle_epi32::<0b10_11_00_01>(s4));
        let sum = _mm_cvtsi128_si32(s4);
        // Packs work per 128-bit lane; the final permute restores element order.
        let p01 = _mm256_packs_epi32(i[0], i[1]);
        let p23 = _mm256_packs_epi32(i[2], i[3]);
        let p = _mm256_packs_epi16(p01, p23);
        let p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256(q.cast(), p);
        (d, sum)
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn f16_bits(x: f32) -> u16 {
    _mm_extract_epi16::<0>(_mm_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT }>(_mm_set_ss(x))) as u16
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn quantize_q8_0(x: &[f32], dst: &mut [u8]) {
    let nb = x.len() / 32;
    debug_assert!(dst.len() >= nb * Q8_0_BYTES);
    for i in 0..nb {
        // SAFETY: block `i` is inside both buffers.
        unsafe {
            let out = dst.as_mut_ptr().add(i * Q8_0_BYTES);
            let (d, _) = q8_block(x.as_ptr().add(32 * i), out.add(2));
            out.cast::<[u8; 2]>()
                .write_unaligned(f16_bits(d).to_le_bytes());
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn quantize_q8_1(x: &[f32], dst: &mut [u8]) {
    let nb = x.len() / 32;
    debug_assert!(dst.len() >= nb * Q8_1_BYTES);
    for i in 0..nb {
        // SAFETY: block `i` is inside both buffers.
        unsafe {
            let out = dst.as_mut_ptr().add(i * Q8_1_BYTES);
            let (d, sum) = q8_block(x.as_ptr().add(32 * i), out.add(4));
            out.cast::<[u8; 2]>()
                .write_unaligned(f16_bits(d).to_le_bytes());
            out.add(2)
                .cast::<[u8; 2]>()
                .write_unaligned(f16_bits(d * sum as f32).to_le_bytes());
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn convert_f16(x: &[f32], dst: &mut [u8]) {
    let n = x.len();
    debug_assert!(dst.len() >= 2 * n);
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: 8 values inside both buffers.
        unsafe {
            let h = _mm256_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT }>(_mm256_loadu_ps(
                x.as_ptr().add(i),
            ));
            _mm_storeu_si128(dst.as_mut_ptr().add(2 * i).cast(), h);
        }
        i += 8;
    }
    for j in i..n {
        dst[2 * j..2 * j + 2].copy_from_slice(&f16_bits(x[j]).to_le_bytes());
    }
}

/// f32 -> bf16 bits as `ggml_compute_fp32_to_bf16`, 8 at a time: NaN truncated and made quiet, others round
/// to nearest even.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn convert_bf16(x: &[f32], dst: &mut [u8]) {
    let n = x.len();
    debug_assert!(dst.len() >= 2 * n);
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: 8 values inside both buffers.
        unsafe {
            let u = _mm256_castps_si256(_mm256_loadu_ps(x.as_ptr().add(i)));
            let lsb = _mm256_and_si256(_mm256_srli_epi32::<16>(u), _mm256_set1_epi32(1));
            let rounded = _mm256_srli_epi32::<16>(_mm256_add_epi32(
                u,
                _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb),
            ));
            let nan = _mm256_or_si256(_mm256_srli_epi32::<16>(u), _mm256_set1_epi32(64));
            let abs = _mm256_and_si256(u, _mm256_set1_epi32(0x7fff_ffff));
            let is_nan = _mm256_cmpgt_epi32(abs, _mm256_set1_epi32(0x7f80_0000));
            let r = _mm256_blendv_epi8(rounded, nan, is_nan);
            // Keep the low 16 bits of each lane, in order.
            let r = _mm256_and_si256(r, _mm256_set1_epi32(0xffff));
            let packed =
                _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256::<1>(r));
            _mm_storeu_si128(dst.as_mut_ptr().add(2 * i).cast(), packed);
        }
        i += 8;
    }
    crate::cpu::scalar::act::convert_bf16(&x[i..], &mut dst[2 * i..]);
}
