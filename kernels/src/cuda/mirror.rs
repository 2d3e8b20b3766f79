//! The part decoders `q4_k_part` and `q6_k_part` of kernels.cu transliterated to Rust: the same per-thread
//! index arithmetic (which word, byte, nibble, high bits and scale a thread reads for part `c` of a block)
//! and the same float tricks, so that a layout mistake in the CUDA code shows up here, without a GPU, as a
//! mismatch with the scalar dequantizers of `crate::quant`. Keep in step with kernels.cu.

use half::f16;

use crate::quant::{GgmlType, dequantize_row, f16_to_f32};

fn word(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn half16(b: &[u8], at: usize) -> u32 {
    u32::from(u16::from_le_bytes([b[at], b[at + 1]]))
}

fn f16_bits(h: u32) -> f32 {
    f16_to_f32(f16::from_bits(h as u16))
}

/// kernels.cu `u2f`.
fn u2f(u: u32) -> f32 {
    f32::from_bits(0x4b00_0000 | u) - 8_388_608.0
}

/// kernels.cu `q4k_scale_byte`: `h` is the 16-byte header as four little-endian words.
fn q4k_scale_byte(h: [u32; 4], i: usize) -> u32 {
    let w = if i < 4 {
        h[1]
    } else if i < 8 {
        h[2]
    } else {
        h[3]
    };
    (w >> (8 * (i & 3))) & 0xff
}

/// kernels.cu `q4k_scale_min`.
fn q4k_scale_min(h: [u32; 4], s: usize) -> (u32, u32) {
    if s < 4 {
        (q4k_scale_byte(h, s) & 63, q4k_scale_byte(h, s + 4) & 63)
    } else {
        (
            (q4k_scale_byte(h, s + 4) & 0xf) | ((q4k_scale_byte(h, s - 4) >> 6) << 4),
            (q4k_scale_byte(h, s + 4) >> 4) | ((q4k_scale_byte(h, s) >> 6) << 4),
        )
    }
}

/// kernels.cu `q4_k_part` + `dequant_f16_q4_k` (before the f16 rounding): part `c` of `blk` into `y`.
fn q4_k_part(blk: &[u8], c: usize, y: &mut [f32; 256]) {
    let h = [word(blk, 0), word(blk, 4), word(blk, 8), word(blk, 12)];
    let qv = [0, 4, 8, 12].map(|k| word(blk, 16 + 16 * c + k));
    let j = c >> 1;
    let e_lo = 64 * j + 16 * (c & 1);
    let d = f16_bits(h[0] & 0xffff);
    let dmin = f16_bits(h[0] >> 16);
    let (sc, m) = q4k_scale_min(h, 2 * j);
    let (d_lo, m_lo) = (d * sc as f32, dmin * m as f32);
    let (sc, m) = q4k_scale_min(h, 2 * j + 1);
    let (d_hi, m_hi) = (d * sc as f32, dmin * m as f32);
    for i in 0..16 {
        let b = (qv[i >> 2] >> (8 * (i & 3))) & 0xff;
        y[e_lo + i] = d_lo * u2f(b & 0xf) - m_lo;
        y[e_lo + 32 + i] = d_hi * u2f(b >> 4) - m_hi;
    }
}

/// kernels.cu `q6_k_part` + `dequant_f16_q6_k` (before the f16 rounding): part `c` of `blk` into `y`.
fn q6_k_part(blk: &[u8], c: usize, y: &mut [f32; 256]) {
    let (hf, l0) = (c >> 2, 8 * (c & 3));
    let is = l0 >> 4;
    let (ql_a, ql_b, qh, sc) = (
        64 * hf + l0,
        64 * hf + 32 + l0,
        128 + 32 * hf + l0,
        192 + 8 * hf,
    );
    let d = f16_bits(half16(blk, 208));
    let ds: [f32; 4] = std::array::from_fn(|k| {
        let s = (half16(blk, sc + 2 * k) >> (8 * is)) & 0xff;
        d * f32::from(s as u8 as i8)
    });
    let e0 = 128 * hf + l0;
    let level = |u: u32| f32::from_bits(0x4b00_0000 | u) - 8_388_640.0;
    for k2 in 0..4 {
        let (a, b, h) = (
            half16(blk, ql_a + 2 * k2),
            half16(blk, ql_b + 2 * k2),
            half16(blk, qh + 2 * k2),
        );
        for e in 0..2 {
            let i = 2 * k2 + e;
            let (ab, bb, hb) = (
                (a >> (8 * e)) & 0xff,
                (b >> (8 * e)) & 0xff,
                (h >> (8 * e)) & 0xff,
            );
            let q = [
                level((ab & 0xf) | ((hb & 3) << 4)),
                level((bb & 0xf) | (((hb >> 2) & 3) << 4)),
                level((ab >> 4) | (((hb >> 4) & 3) << 4)),
                level((bb >> 4) | (((hb >> 6) & 3) << 4)),
            ];
            for k in 0..4 {
                y[e0 + 32 * k + i] = ds[k] * q[k];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Random blocks (xorshift) with finite f16 scales written at `scale_at`.
    fn blocks(n: usize, size: usize, scale_at: &[usize], seed: u64) -> Vec<u8> {
        let mut s = seed | 1;
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let mut out: Vec<u8> = (0..n * size).map(|_| next() as u8).collect();
        for blk in out.chunks_exact_mut(size) {
            for &at in scale_at {
                // Magnitudes around 1e-3 with either sign, including f16 subnormals.
                let v = ((next() % 20_000) as f32 - 10_000.0) * 1e-7;
                blk[at..at + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
            }
        }
        out
    }

    fn check(
        ty: GgmlType,
        size: usize,
        scale_at: &[usize],
        part: fn(&[u8], usize, &mut [f32; 256]),
    ) {
        let data = blocks(64, size, scale_at, 0x5eed ^ size as u64);
        let mut reference = vec![0f32; 64 * 256];
        dequantize_row(ty, &data, &mut reference).unwrap();
        for (b, (blk, want)) in data
            .chunks_exact(size)
            .zip(reference.chunks_exact(256))
            .enumerate()
        {
            let mut got = [f32::NAN; 256];
            for c in 0..8 {
                part(blk, c, &mut got);
            }
            for (e, (g, w)) in got.iter().zip(want).enumerate() {
                assert_eq!(
                    g.to_bits(),
                    w.to_bits(),
                    "{ty:?} block {b} value {e}: {g} vs {w}"
                );
            }
        }
    }

    #[test]
    fn q4_k_parts_match_reference() {
        check(GgmlType::Q4_K, 144, &[0, 2], q4_k_part);
    }

    #[test]
    fn q6_k_parts_match_reference() {
        check(GgmlType::Q6_K, 210, &[208], q6_k_part);
    }

    #[test]
    fn float_tricks_are_exact() {
        for u in 0..(1u32 << 16) {
            assert_eq!(u2f(u), u as f32);
        }
        // kernels.cu `s8_to_f` (Q8_0).
        for b in 0..=255u32 {
            let v = f32::from_bits(0x4b00_0080 ^ b) - 8_388_736.0;
            assert_eq!(v, f32::from(b as u8 as i8));
        }
    }
}
