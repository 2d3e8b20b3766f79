//! Plain float element types: F32, F16 and BF16 rows, and the f16 <-> f32 conversions every quantized block
//! uses for its scales.
//!
//! Conversions are exact where the target can hold the value and round to nearest-even otherwise, as in
//! ggml's `ggml-impl.h` (`ggml_compute_fp32_to_bf16`, `ggml_compute_fp32_to_fp16`) and numpy's `astype`.
//! NaNs keep their payload the way numpy does (the reference `gguf.quants` is numpy): ggml itself turns every
//! NaN into 0x7E00 on f32 -> f16, which only matters for rows that already contain NaN.

use half::f16;

/// f16 -> f32, exact. NaN payloads are kept unchanged (numpy's `npy_halfbits_to_floatbits`); `half`'s
/// conversion would set the quiet bit, which differs for signalling NaNs.
#[inline]
pub(crate) fn f16_to_f32(h: f16) -> f32 {
    if h.is_nan() {
        let bits = u32::from(h.to_bits());
        return f32::from_bits(((bits & 0x8000) << 16) | 0x7f80_0000 | ((bits & 0x03ff) << 13));
    }
    h.to_f32()
}

/// f32 -> f16, round to nearest even, overflow to infinity. NaN keeps the top mantissa bits (numpy's
/// `npy_floatbits_to_halfbits`), made non-zero when they would all be dropped so the result stays NaN.
#[inline]
pub(crate) fn f32_to_f16(x: f32) -> f16 {
    if x.is_nan() {
        let bits = x.to_bits();
        let mut half = 0x7c00 | ((bits & 0x007f_ffff) >> 13) as u16;
        if half == 0x7c00 {
            half += 1;
        }
        return f16::from_bits(((bits >> 16) as u16 & 0x8000) | half);
    }
    f16::from_f32(x)
}

/// f32 -> bf16 bits exactly as `ggml_compute_fp32_to_bf16`: NaN is truncated and forced quiet, everything else
/// rounds to nearest even (finite values past the bf16 range become infinity).
#[inline]
pub(crate) fn f32_to_bf16_bits(x: f32) -> u16 {
    let u = x.to_bits();
    if (u & 0x7fff_ffff) > 0x7f80_0000 {
        return ((u >> 16) | 64) as u16;
    }
    // Cannot overflow: the largest non-NaN pattern is 0xff80_0000 and the rounding bias is at most 0x8000.
    ((u + (0x7fff + ((u >> 16) & 1))) >> 16) as u16
}

#[inline]
pub(crate) fn bf16_bits_to_f32(b: u16) -> f32 {
    f32::from_bits(u32::from(b) << 16)
}

pub(crate) fn dequantize_f32(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.as_chunks::<4>().0.iter().zip(dst) {
        *y = f32::from_le_bytes(*b);
    }
}

pub(crate) fn dequantize_f16(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.as_chunks::<2>().0.iter().zip(dst) {
        *y = f16_to_f32(f16::from_le_bytes(*b));
    }
}

pub(crate) fn dequantize_bf16(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.as_chunks::<2>().0.iter().zip(dst) {
        *y = bf16_bits_to_f32(u16::from_le_bytes(*b));
    }
}

pub(crate) fn quantize_f32(src: &[f32], dst: &mut Vec<u8>) {
    for x in src {
        dst.extend_from_slice(&x.to_le_bytes());
    }
}

pub(crate) fn quantize_f16(src: &[f32], dst: &mut Vec<u8>) {
    for &x in src {
        dst.extend_from_slice(&f32_to_f16(x).to_le_bytes());
    }
}

pub(crate) fn quantize_bf16(src: &[f32], dst: &mut Vec<u8>) {
    for &x in src {
        dst.extend_from_slice(&f32_to_bf16_bits(x).to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_nan_payloads_round_trip_like_numpy() {
        // Values observed from numpy 2.x `astype` on this machine.
        assert_eq!(f16_to_f32(f16::from_bits(0x7c01)).to_bits(), 0x7f80_2000);
        assert_eq!(f16_to_f32(f16::from_bits(0xfc01)).to_bits(), 0xff80_2000);
        assert_eq!(f32_to_f16(f32::from_bits(0x7f80_0001)).to_bits(), 0x7c01);
        assert_eq!(f32_to_f16(f32::from_bits(0xff80_0001)).to_bits(), 0xfc01);
        assert_eq!(f32_to_f16(f32::from_bits(0x7fa0_0000)).to_bits(), 0x7d00);
    }

    #[test]
    fn f16_rounding_and_overflow() {
        assert_eq!(f32_to_f16(65504.0).to_bits(), 0x7bff);
        assert_eq!(f32_to_f16(65519.99).to_bits(), 0x7bff);
        assert_eq!(f32_to_f16(65520.0).to_bits(), 0x7c00);
        // 1 + 2^-11 is halfway between 1 and the next f16: ties go to the even mantissa.
        assert_eq!(f32_to_f16(1.0 + 2f32.powi(-11)).to_bits(), 0x3c00);
        assert_eq!(f32_to_f16(1.0 + 3.0 * 2f32.powi(-11)).to_bits(), 0x3c02);
        // Smallest f16 subnormal and half of it (a tie that rounds to zero).
        assert_eq!(f32_to_f16(2f32.powi(-24)).to_bits(), 0x0001);
        assert_eq!(f32_to_f16(2f32.powi(-25)).to_bits(), 0x0000);
    }

    #[test]
    fn bf16_matches_ggml() {
        assert_eq!(f32_to_bf16_bits(1.0), 0x3f80);
        // Halfway cases round to even.
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x3f80_8000)), 0x3f80);
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x3f81_8000)), 0x3f82);
        assert_eq!(f32_to_bf16_bits(f32::MAX), 0x7f80);
        assert_eq!(f32_to_bf16_bits(f32::NEG_INFINITY), 0xff80);
        // Signalling NaN with only low payload bits is forced quiet rather than becoming infinity.
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x7f80_0001)), 0x7fc0);
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0xffa0_0000)), 0xffe0);
    }
}
