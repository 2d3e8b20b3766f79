//! Scalar reference activation quantizers: f32 activations to the weight type's `vec_dot_type` (Q8_0, Q8_1,
//! Q8_K, F16, BF16), as llama.cpp's CPU backend does before every quantized matmul.
//!
//! These follow the x86 builds of ggml (`ggml-cpu/arch/x86/quants.c`), which is what llama.cpp runs on the
//! machines we compare with: Q8_0/Q8_1 use `d = amax / 127`, `id = 127 / amax` and round half to even
//! (`_mm256_round_ps(_MM_ROUND_NEAREST)`), not the `roundf` of `quantize_row_q8_0_ref`; Q8_1's `s` is
//! `f16(d * Σq)`. Q8_K is `quantize_row_q8_K_ref` (x86 uses the reference). The SIMD twins produce the
//! same bytes, which the conformance tests check.

use half::f16;

use crate::cpu::layout::{Q8_0_BYTES, Q8_1_BYTES, Q8_K_BYTES};
use crate::quant::{f32_to_bf16_bits, nearest_int};

/// `amax`, the f16 scale bytes and the multiplier of one Q8_0/Q8_1 block.
#[inline]
fn q8_scale(x: &[f32]) -> (f32, f32) {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    (d, id)
}

/// Quantizes `x` (a multiple of 32 values) to Q8_0 blocks in `dst` (`34 * x.len() / 32` bytes).
pub(crate) fn quantize_q8_0(x: &[f32], dst: &mut [u8]) {
    for (xb, out) in x.chunks_exact(32).zip(dst.chunks_exact_mut(Q8_0_BYTES)) {
        let (d, id) = q8_scale(xb);
        out[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
        for (q, &v) in out[2..].iter_mut().zip(xb) {
            *q = (v * id).round_ties_even() as i8 as u8;
        }
    }
}

/// Quantizes `x` to Q8_1 blocks (`d`, `s = d * Σq`, 32 quants: 36 bytes per 32 values).
pub(crate) fn quantize_q8_1(x: &[f32], dst: &mut [u8]) {
    for (xb, out) in x.chunks_exact(32).zip(dst.chunks_exact_mut(Q8_1_BYTES)) {
        let (d, id) = q8_scale(xb);
        let mut sum = 0i32;
        for (q, &v) in out[4..].iter_mut().zip(xb) {
            let r = (v * id).round_ties_even() as i32;
            sum += r;
            *q = r as i8 as u8;
        }
        out[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
        out[2..4].copy_from_slice(&f16::from_f32(d * sum as f32).to_le_bytes());
    }
}

/// Quantizes `x` (a multiple of 256 values) to Q8_K blocks: f32 `d`, 256 quants, 16 i16 sums of 16 quants.
pub(crate) fn quantize_q8_k(x: &[f32], dst: &mut [u8]) {
    for (xb, out) in x.chunks_exact(256).zip(dst.chunks_exact_mut(Q8_K_BYTES)) {
        let (mut amax, mut max) = (0.0f32, 0.0f32);
        for &v in xb {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        if amax == 0.0 {
            out.fill(0);
            continue;
        }
        let iscale = -127.0 / max;
        let (qs, bsums) = out[4..].split_at_mut(256);
        for (q, &v) in qs.iter_mut().zip(xb) {
            *q = nearest_int(iscale * v).min(127) as i8 as u8;
        }
        for (s, g) in bsums.chunks_exact_mut(2).zip(qs.chunks_exact(16)) {
            let sum: i32 = g.iter().map(|&q| i32::from(q as i8)).sum();
            s.copy_from_slice(&(sum as i16).to_le_bytes());
        }
        out[..4].copy_from_slice(&(1.0 / iscale).to_le_bytes());
    }
}

/// f32 -> f16, round to nearest even (F16C `vcvtps2ph` with rounding mode 0).
pub(crate) fn convert_f16(x: &[f32], dst: &mut [u8]) {
    for (&v, out) in x.iter().zip(dst.chunks_exact_mut(2)) {
        out.copy_from_slice(&f16::from_f32(v).to_le_bytes());
    }
}

/// f32 -> bf16 as `ggml_compute_fp32_to_bf16` (round to nearest even).
pub(crate) fn convert_bf16(x: &[f32], dst: &mut [u8]) {
    for (&v, out) in x.iter().zip(dst.chunks_exact_mut(2)) {
        out.copy_from_slice(&f32_to_bf16_bits(v).to_le_bytes());
    }
}

/// F32 "conversion": a little-endian copy.
pub(crate) fn convert_f32(x: &[f32], dst: &mut [u8]) {
    for (&v, out) in x.iter().zip(dst.chunks_exact_mut(4)) {
        out.copy_from_slice(&v.to_le_bytes());
    }
}
