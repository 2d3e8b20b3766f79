//! Scalar reference dot products of one weight row with one activation row, `vec_dot_<weight>_<activation>`
//! after ggml's `ggml_vec_dot_*_generic` (`ggml-cpu/quants.c`, `vec.cpp`). Integer sums are exact; float
//! accumulation differs from ggml's 8-lane split only in rounding. Every SIMD twin is tested against these.
//!
//! Contract of every function here and in the SIMD siblings: `n` is a multiple of the weight block size, `w`
//! holds at least the bytes of `n` weights and `a` at least the bytes of `n` activations (checked by the
//! caller once per matrix, not per row).

use crate::cpu::layout::{Q8_0_BYTES, Q8_1_BYTES, Q8_K_BYTES};
use crate::quant::{bf16_bits_to_f32, f16_to_f32};
use half::f16;

#[inline]
pub(crate) fn f16_at(b: &[u8], at: usize) -> f32 {
    f16_to_f32(f16::from_le_bytes([b[at], b[at + 1]]))
}

#[inline]
pub(crate) fn f32_at(b: &[u8], at: usize) -> f32 {
    f32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

#[inline]
fn i8s(b: &[u8]) -> impl Iterator<Item = i32> + '_ {
    b.iter().map(|&q| i32::from(q as i8))
}

/// Σ over one 32-element block of `w(j) * a[j]`, where `a` holds 32 signed bytes.
#[inline]
fn block_sum(a: &[u8], w: impl Fn(usize) -> i32) -> i32 {
    i8s(&a[..32]).enumerate().map(|(j, q)| w(j) * q).sum()
}

/// Low nibble of byte `j` for elements 0..16, high nibble of byte `j - 16` for 16..32 (legacy Q4 order).
#[inline]
fn nibble(qs: &[u8], j: usize) -> i32 {
    i32::from(if j < 16 {
        qs[j] & 0x0f
    } else {
        qs[j - 16] >> 4
    })
}

/// Bit 4 of a Q5 element from the little-endian `qh`.
#[inline]
fn bit5(qh: u32, j: usize) -> i32 {
    (((qh >> j) & 1) << 4) as i32
}

pub(crate) fn vec_dot_q4_0_q8_0(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut sum = 0.0f32;
    for i in 0..n / 32 {
        let (wb, ab) = (&w[i * 18..], &a[i * Q8_0_BYTES..]);
        let sumi = block_sum(&ab[2..], |j| nibble(&wb[2..18], j) - 8);
        sum += sumi as f32 * (f16_at(wb, 0) * f16_at(ab, 0));
    }
    sum
}

pub(crate) fn vec_dot_q4_1_q8_1(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut sum = 0.0f32;
    for i in 0..n / 32 {
        let (wb, ab) = (&w[i * 20..], &a[i * Q8_1_BYTES..]);
        let sumi = block_sum(&ab[4..], |j| nibble(&wb[4..20], j));
        sum += (f16_at(wb, 0) * f16_at(ab, 0)) * sumi as f32 + f16_at(wb, 2) * f16_at(ab, 2);
    }
    sum
}

pub(crate) fn vec_dot_q5_0_q8_0(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut sum = 0.0f32;
    for i in 0..n / 32 {
        let (wb, ab) = (&w[i * 22..], &a[i * Q8_0_BYTES..]);
        let qh = u32::from_le_bytes([wb[2], wb[3], wb[4], wb[5]]);
        let sumi = block_sum(&ab[2..], |j| (nibble(&wb[6..22], j) | bit5(qh, j)) - 16);
        sum += sumi as f32 * (f16_at(wb, 0) * f16_at(ab, 0));
    }
    sum
}

pub(crate) fn vec_dot_q5_1_q8_1(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut sum = 0.0f32;
    for i in 0..n / 32 {
        let (wb, ab) = (&w[i * 24..], &a[i * Q8_1_BYTES..]);
        let qh = u32::from_le_bytes([wb[4], wb[5], wb[6], wb[7]]);
        let sumi = block_sum(&ab[4..], |j| nibble(&wb[8..24], j) | bit5(qh, j));
        sum += (f16_at(wb, 0) * f16_at(ab, 0)) * sumi as f32 + f16_at(wb, 2) * f16_at(ab, 2);
    }
    sum
}

pub(crate) fn vec_dot_q8_0_q8_0(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut sum = 0.0f32;
    for i in 0..n / 32 {
        let (wb, ab) = (&w[i * 34..], &a[i * Q8_0_BYTES..]);
        let sumi: i32 = i8s(&wb[2..34])
            .zip(i8s(&ab[2..34]))
            .map(|(x, y)| x * y)
            .sum();
        sum += sumi as f32 * (f16_at(wb, 0) * f16_at(ab, 0));
    }
    sum
}

/// The Q8_K activation block `i`: scale, 256 quants, 16 sums of 16.
#[inline]
fn q8k(a: &[u8], i: usize) -> (f32, &[u8], [i32; 16]) {
    let b = &a[i * Q8_K_BYTES..(i + 1) * Q8_K_BYTES];
    let bsums =
        std::array::from_fn(|j| i32::from(i16::from_le_bytes([b[260 + 2 * j], b[261 + 2 * j]])));
    (f32_at(b, 0), &b[4..260], bsums)
}

/// Σ_j scale[j / group] · Σ_{l in group j} level[l] · q8[l] over one super-block.
#[inline]
fn scaled_sum(levels: &[i32; 256], q8: &[u8], scales: &[i32], group: usize) -> i32 {
    levels
        .chunks_exact(group)
        .zip(q8.chunks_exact(group))
        .zip(scales)
        .map(|((l, q), &s)| s * l.iter().zip(i8s(q)).map(|(x, y)| x * y).sum::<i32>())
        .sum()
}

pub(crate) fn vec_dot_q2_k_q8_k(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut sum = 0.0f32;
    for i in 0..n / 256 {
        let wb = &w[i * 84..(i + 1) * 84];
        let (ad, q8, bsums) = q8k(a, i);
        let sc = &wb[..16];
        let summs: i32 = (0..16).map(|j| bsums[j] * i32::from(sc[j] >> 4)).sum();
        let mut levels = [0i32; 256];
        for (half, qs) in wb[16..80].chunks_exact(32).enumerate() {
            for shift in 0..4 {
                for (l, &q) in qs.iter().enumerate() {
                    levels[half * 128 + shift * 32 + l] = i32::from((q >> (2 * shift)) & 3);
                }
            }
        }
        let scales: [i32; 16] = std::array::from_fn(|j| i32::from(sc[j] & 0x0f));
        let isum = scaled_sum(&levels, q8, &scales, 16);
        let dall = ad * f16_at(wb, 80);
        let dmin = ad * f16_at(wb, 82);
        sum += dall * isum as f32 - dmin * summs as f32;
    }
    sum
}

/// The 16 Q3_K scales, offset removed (`-32..32`).
pub(crate) fn q3_k_scales(s: &[u8]) -> [i32; 16] {
    std::array::from_fn(|j| {
        let low = if j < 8 { s[j] & 0x0f } else { s[j - 8] >> 4 };
        let high = (s[8 + j % 4] >> (2 * (j / 4))) & 3;
        i32::from(low | (high << 4)) - 32
    })
}

pub(crate) fn vec_dot_q3_k_q8_k(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut sum = 0.0f32;
    for i in 0..n / 256 {
        let wb = &w[i * 110..(i + 1) * 110];
        let (ad, q8, _) = q8k(a, i);
        let (hm, qs) = (&wb[..32], &wb[32..96]);
        let mut levels = [0i32; 256];
        for (half, q3) in qs.chunks_exact(32).enumerate() {
            for shift in 0..4 {
                let bit = half * 4 + shift;
                for l in 0..32 {
                    let low = i32::from((q3[l] >> (2 * shift)) & 3);
                    let high = if hm[l] & (1 << bit) != 0 { 0 } else { 4 };
                    levels[half * 128 + shift * 32 + l] = low - high;
                }
            }
        }
        let isum = scaled_sum(&levels, q8, &q3_k_scales(&wb[96..108]), 16);
        sum += f16_at(wb, 108) * ad * isum as f32;
    }
    sum
}

/// Scales and mins of the 8 sub-blocks of a Q4_K/Q5_K super-block.
fn k4_scales(s: &[u8]) -> ([i32; 8], [i32; 8]) {
    let s: &[u8; 12] = s.try_into().unwrap_or(&[0; 12]);
    let pairs: [(u8, u8); 8] = std::array::from_fn(|j| crate::quant::get_scale_min_k4(j, s));
    (pairs.map(|p| i32::from(p.0)), pairs.map(|p| i32::from(p.1)))
}

pub(crate) fn vec_dot_q4_k_q8_k(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut sum = 0.0f32;
    for i in 0..n / 256 {
        let wb = &w[i * 144..(i + 1) * 144];
        let (ad, q8, bsums) = q8k(a, i);
        let (scales, mins) = k4_scales(&wb[4..16]);
        let mut levels = [0i32; 256];
        for (j, q4) in wb[16..144].chunks_exact(32).enumerate() {
            for l in 0..32 {
                levels[j * 64 + l] = i32::from(q4[l] & 0x0f);
                levels[j * 64 + 32 + l] = i32::from(q4[l] >> 4);
            }
        }
        let isum = scaled_sum(&levels, q8, &scales, 32);
        let summs: i32 = (0..16).map(|j| bsums[j] * mins[j / 2]).sum();
        sum += f16_at(wb, 0) * ad * isum as f32 - f16_at(wb, 2) * ad * summs as f32;
    }
    sum
}

pub(crate) fn vec_dot_q5_k_q8_k(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut sum = 0.0f32;
    for i in 0..n / 256 {
        let wb = &w[i * 176..(i + 1) * 176];
        let (ad, q8, bsums) = q8k(a, i);
        let (scales, mins) = k4_scales(&wb[4..16]);
        let qh = &wb[16..48];
        let mut levels = [0i32; 256];
        for (j, q4) in wb[48..176].chunks_exact(32).enumerate() {
            for l in 0..32 {
                let h0 = if qh[l] & (1 << (2 * j)) != 0 { 16 } else { 0 };
                let h1 = if qh[l] & (1 << (2 * j + 1)) != 0 {
                    16
                } else {
                    0
                };
                levels[j * 64 + l] = i32::from(q4[l] & 0x0f) + h0;
                levels[j * 64 + 32 + l] = i32::from(q4[l] >> 4) + h1;
            }
        }
        let isum = scaled_sum(&levels, q8, &scales, 32);
        let summs: i32 = (0..16).map(|j| bsums[j] * mins[j / 2]).sum();
        sum += f16_at(wb, 0) * ad * isum as f32 - f16_at(wb, 2) * ad * summs as f32;
    }
    sum
}

pub(crate) fn vec_dot_q6_k_q8_k(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut sum = 0.0f32;
    for i in 0..n / 256 {
        let wb = &w[i * 210..(i + 1) * 210];
        let (ad, q8, _) = q8k(a, i);
        let mut levels = [0i32; 256];
        for half in 0..2 {
            let ql = &wb[half * 64..half * 64 + 64];
            let qh = &wb[128 + half * 32..128 + half * 32 + 32];
            let out = &mut levels[half * 128..half * 128 + 128];
            for l in 0..32 {
                let h = i32::from(qh[l]);
                out[l] = (i32::from(ql[l] & 0x0f) | ((h & 3) << 4)) - 32;
                out[l + 32] = (i32::from(ql[l + 32] & 0x0f) | (((h >> 2) & 3) << 4)) - 32;
                out[l + 64] = (i32::from(ql[l] >> 4) | (((h >> 4) & 3) << 4)) - 32;
                out[l + 96] = (i32::from(ql[l + 32] >> 4) | (((h >> 6) & 3) << 4)) - 32;
            }
        }
        let scales: [i32; 16] = std::array::from_fn(|j| i32::from(wb[192 + j] as i8));
        let isum = scaled_sum(&levels, q8, &scales, 16);
        sum += f16_at(wb, 208) * ad * isum as f32;
    }
    sum
}

/// F16 weights · F16 activations, products in f32 and the sum in f64 (ggml's generic `ggml_vec_dot_f16`).
pub(crate) fn vec_dot_f16(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut sum = 0.0f64;
    for i in 0..n {
        sum += f64::from(f16_at(w, 2 * i) * f16_at(a, 2 * i));
    }
    sum as f32
}

pub(crate) fn vec_dot_bf16(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let bf = |b: &[u8], i: usize| bf16_bits_to_f32(u16::from_le_bytes([b[2 * i], b[2 * i + 1]]));
    let mut sum = 0.0f64;
    for i in 0..n {
        sum += f64::from(bf(w, i) * bf(a, i));
    }
    sum as f32
}

pub(crate) fn vec_dot_f32(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut sum = 0.0f64;
    for i in 0..n {
        sum += f64::from(f32_at(w, 4 * i) * f32_at(a, 4 * i));
    }
    sum as f32
}

/// `acc[i] += s * v[i]` for f16 `v` (the V accumulation of attention).
pub(crate) fn axpy_f16(acc: &mut [f32], v: &[u8], s: f32) {
    for (i, a) in acc.iter_mut().enumerate() {
        *a += s * f16_at(v, 2 * i);
    }
}
