//! The "legacy" 32-element block types Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0: layouts (ggml's `ggml-common.h`
//! `block_q4_0` ... `block_q8_0`), `dequantize_row_*` and `quantize_row_*_ref` from `ggml-quants.c`.
//!
//! Element order inside a block: byte `j` of `qs` holds element `j` in its low nibble and element `j + 16` in
//! its high nibble; Q5 types keep bit 4 of element `i` in bit `i` of the little-endian u32 `qh`.
//!
//! Quantizers truncate `x * id + 8.5` (or `+ 0.5` after subtracting the min) toward zero like ggml's
//! `(int8_t)` casts and gguf-py's `np.trunc`, and Q8_0 rounds half away from zero (`roundf`, gguf-py's
//! `np_roundf`); the float operations and their order are ggml's, so the output is byte-identical to both.
//! Rows containing NaN are outside what ggml or gguf-py define (C casts NaN to int8 as undefined behaviour);
//! here they give some valid block rather than a panic.

use half::f16;

use super::GgmlType;
use super::block::{Block, FieldReader, FieldWriter};
use super::float::{f16_to_f32, f32_to_f16};

pub const QK4_0: usize = 32;
pub const QK4_1: usize = 32;
pub const QK5_0: usize = 32;
pub const QK5_1: usize = 32;
pub const QK8_0: usize = 32;

/// `x = d * (q - 8)`, 4.5 bits per weight.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BlockQ4_0 {
    pub d: f16,
    pub qs: [u8; QK4_0 / 2],
}
const _: () = assert!(size_of::<BlockQ4_0>() == 18 && GgmlType::Q4_0.type_size() == 18);

/// `x = d * q + m`, 5 bits per weight.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BlockQ4_1 {
    pub d: f16,
    pub m: f16,
    pub qs: [u8; QK4_1 / 2],
}
const _: () = assert!(size_of::<BlockQ4_1>() == 20 && GgmlType::Q4_1.type_size() == 20);

/// `x = d * (q - 16)`, 5.5 bits per weight.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BlockQ5_0 {
    pub d: f16,
    pub qh: [u8; 4],
    pub qs: [u8; QK5_0 / 2],
}
const _: () = assert!(size_of::<BlockQ5_0>() == 22 && GgmlType::Q5_0.type_size() == 22);

/// `x = d * q + m`, 6 bits per weight.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BlockQ5_1 {
    pub d: f16,
    pub m: f16,
    pub qh: [u8; 4],
    pub qs: [u8; QK5_1 / 2],
}
const _: () = assert!(size_of::<BlockQ5_1>() == 24 && GgmlType::Q5_1.type_size() == 24);

/// `x = d * q` with signed 8-bit `q`, 8.5 bits per weight.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BlockQ8_0 {
    pub d: f16,
    pub qs: [i8; QK8_0],
}
const _: () = assert!(size_of::<BlockQ8_0>() == 34 && GgmlType::Q8_0.type_size() == 34);

/// `1 / d`, or 0 for an all-zero block so that every element quantizes to the zero point.
#[inline]
fn inverse(d: f32) -> f32 {
    if d != 0.0 { 1.0 / d } else { 0.0 }
}

/// The value of largest magnitude, keeping its sign; the first one wins ties like ggml's strict `<` and
/// numpy's `argmax`.
fn signed_absmax(x: &[f32]) -> f32 {
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    max
}

fn min_max(x: &[f32]) -> (f32, f32) {
    let (mut min, mut max) = (f32::MAX, -f32::MAX);
    for &v in x {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    (min, max)
}

/// C's `(int)` conversion of the biased value, clamped to `0..=hi`. Truncation toward zero is the rounding
/// ggml and gguf-py use here; the bias (+0.5, +8.5, +16.5) turns it into round-half-up.
#[inline]
fn trunc_clamp(v: f32, hi: i32) -> u8 {
    (v as i32).clamp(0, hi) as u8
}

/// Bit `i` of the result is bit 4 of `q[i]`: the `qh` field of the Q5 types.
fn high_bits(q: &[u8; 32]) -> [u8; 4] {
    let mut qh = 0u32;
    for (i, &v) in q.iter().enumerate() {
        qh |= u32::from((v >> 4) & 1) << i;
    }
    qh.to_le_bytes()
}

/// Packs element `j` into the low nibble and element `j + 16` into the high nibble of byte `j`.
fn pack_nibbles(q: &[u8; 32]) -> [u8; 16] {
    let (lo, hi) = q.split_at(16);
    let mut qs = [0u8; 16];
    for ((b, &l), &h) in qs.iter_mut().zip(lo).zip(hi) {
        *b = (l & 0x0f) | ((h & 0x0f) << 4);
    }
    qs
}

/// The 5-bit values of a Q5 block, in element order.
fn unpack5(qs: &[u8; 16], qh: [u8; 4]) -> [u8; 32] {
    let qh = u32::from_le_bytes(qh);
    let mut q = [0u8; 32];
    let (lo, hi) = q.split_at_mut(16);
    for (j, ((l, h), &b)) in lo.iter_mut().zip(hi).zip(qs).enumerate() {
        *l = (b & 0x0f) | ((((qh >> j) << 4) & 0x10) as u8);
        *h = (b >> 4) | (((qh >> (j + 12)) & 0x10) as u8);
    }
    q
}

/// Writes `f(low nibble)` to `y[j]` and `f(high nibble)` to `y[j + 16]`, the Q4 element order.
fn for_each_nibble(qs: &[u8; 16], y: &mut [f32; 32], f: impl Fn(u8) -> f32) {
    let (lo, hi) = y.split_at_mut(16);
    for ((l, h), &b) in lo.iter_mut().zip(hi).zip(qs) {
        *l = f(b & 0x0f);
        *h = f(b >> 4);
    }
}

impl Block<18, 32> for BlockQ4_0 {
    fn from_bytes(bytes: &[u8; 18]) -> Self {
        let mut r = FieldReader::new(bytes);
        let block = Self {
            d: r.f16(),
            qs: r.array(),
        };
        debug_assert!(r.is_done());
        block
    }

    fn to_bytes(&self) -> [u8; 18] {
        FieldWriter::new().f16(self.d).put(&self.qs).finish()
    }

    fn dequantize(&self, y: &mut [f32; 32]) {
        let d = f16_to_f32(self.d);
        for_each_nibble(&self.qs, y, |q| (i32::from(q) - 8) as f32 * d);
    }

    fn quantize(x: &[f32; 32]) -> Self {
        let d = signed_absmax(x) / -8.0;
        let id = inverse(d);
        let q = x.map(|v| trunc_clamp(v * id + 8.5, 15));
        Self {
            d: f32_to_f16(d),
            qs: pack_nibbles(&q),
        }
    }
}

impl Block<20, 32> for BlockQ4_1 {
    fn from_bytes(bytes: &[u8; 20]) -> Self {
        let mut r = FieldReader::new(bytes);
        let block = Self {
            d: r.f16(),
            m: r.f16(),
            qs: r.array(),
        };
        debug_assert!(r.is_done());
        block
    }

    fn to_bytes(&self) -> [u8; 20] {
        FieldWriter::new()
            .f16(self.d)
            .f16(self.m)
            .put(&self.qs)
            .finish()
    }

    fn dequantize(&self, y: &mut [f32; 32]) {
        let (d, m) = (f16_to_f32(self.d), f16_to_f32(self.m));
        for_each_nibble(&self.qs, y, |q| f32::from(q) * d + m);
    }

    fn quantize(x: &[f32; 32]) -> Self {
        let (min, max) = min_max(x);
        let d = (max - min) / 15.0;
        let id = inverse(d);
        let q = x.map(|v| trunc_clamp((v - min) * id + 0.5, 15));
        Self {
            d: f32_to_f16(d),
            m: f32_to_f16(min),
            qs: pack_nibbles(&q),
        }
    }
}

impl Block<22, 32> for BlockQ5_0 {
    fn from_bytes(bytes: &[u8; 22]) -> Self {
        let mut r = FieldReader::new(bytes);
        let block = Self {
            d: r.f16(),
            qh: r.array(),
            qs: r.array(),
        };
        debug_assert!(r.is_done());
        block
    }

    fn to_bytes(&self) -> [u8; 22] {
        FieldWriter::new()
            .f16(self.d)
            .put(&self.qh)
            .put(&self.qs)
            .finish()
    }

    fn dequantize(&self, y: &mut [f32; 32]) {
        let d = f16_to_f32(self.d);
        for (y, q) in y.iter_mut().zip(unpack5(&self.qs, self.qh)) {
            *y = (i32::from(q) - 16) as f32 * d;
        }
    }

    fn quantize(x: &[f32; 32]) -> Self {
        let d = signed_absmax(x) / -16.0;
        let id = inverse(d);
        let q = x.map(|v| trunc_clamp(v * id + 16.5, 31));
        Self {
            d: f32_to_f16(d),
            qh: high_bits(&q),
            qs: pack_nibbles(&q),
        }
    }
}

impl Block<24, 32> for BlockQ5_1 {
    fn from_bytes(bytes: &[u8; 24]) -> Self {
        let mut r = FieldReader::new(bytes);
        let block = Self {
            d: r.f16(),
            m: r.f16(),
            qh: r.array(),
            qs: r.array(),
        };
        debug_assert!(r.is_done());
        block
    }

    fn to_bytes(&self) -> [u8; 24] {
        FieldWriter::new()
            .f16(self.d)
            .f16(self.m)
            .put(&self.qh)
            .put(&self.qs)
            .finish()
    }

    fn dequantize(&self, y: &mut [f32; 32]) {
        let (d, m) = (f16_to_f32(self.d), f16_to_f32(self.m));
        for (y, q) in y.iter_mut().zip(unpack5(&self.qs, self.qh)) {
            *y = f32::from(q) * d + m;
        }
    }

    fn quantize(x: &[f32; 32]) -> Self {
        let (min, max) = min_max(x);
        let d = (max - min) / 31.0;
        let id = inverse(d);
        // ggml has no upper clamp here (`(uint8_t)(x0 + 0.5f)`: the value cannot pass 31.5); gguf-py clips to
        // 31. Clamping keeps the two equal and keeps out-of-range input from spilling into the next bit.
        let q = x.map(|v| trunc_clamp((v - min) * id + 0.5, 31));
        Self {
            d: f32_to_f16(d),
            m: f32_to_f16(min),
            qh: high_bits(&q),
            qs: pack_nibbles(&q),
        }
    }
}

impl Block<34, 32> for BlockQ8_0 {
    fn from_bytes(bytes: &[u8; 34]) -> Self {
        let mut r = FieldReader::new(bytes);
        let block = Self {
            d: r.f16(),
            qs: r.array::<32>().map(|b| b as i8),
        };
        debug_assert!(r.is_done());
        block
    }

    fn to_bytes(&self) -> [u8; 34] {
        FieldWriter::new()
            .f16(self.d)
            .put(&self.qs.map(|q| q as u8))
            .finish()
    }

    fn dequantize(&self, y: &mut [f32; 32]) {
        let d = f16_to_f32(self.d);
        for (y, &q) in y.iter_mut().zip(&self.qs) {
            *y = f32::from(q) * d;
        }
    }

    fn quantize(x: &[f32; 32]) -> Self {
        let amax = x
            .iter()
            .fold(0.0f32, |a, v| if a > v.abs() { a } else { v.abs() });
        let d = amax / 127.0;
        let id = inverse(d);
        // `f32::round` is C's `roundf` (half away from zero), as in ggml and gguf-py's `np_roundf`.
        let qs = x.map(|v| (v * id).round() as i8);
        Self {
            d: f32_to_f16(d),
            qs,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_0_known_block() {
        // max |x| is -8 at index 3, so d = 1 and q = x + 8 after truncating x + 8.5.
        let mut x = [0.0f32; 32];
        x[3] = -8.0;
        x[20] = 7.0;
        x[5] = 0.49;
        let b = BlockQ4_0::quantize(&x);
        assert_eq!(b.d, f16::from_f32(1.0));
        assert_eq!(b.qs[3] & 0x0f, 0);
        assert_eq!(b.qs[4] >> 4, 15);
        assert_eq!(b.qs[5] & 0x0f, 8);
        let mut y = [0.0f32; 32];
        b.dequantize(&mut y);
        assert_eq!(y[3], -8.0);
        assert_eq!(y[20], 7.0);
    }

    #[test]
    fn q5_0_high_bits_layout() {
        let q: [u8; 32] = std::array::from_fn(|i| i as u8);
        let packed = pack_nibbles(&q);
        let qh = high_bits(&q);
        assert_eq!(u32::from_le_bytes(qh), 0xffff_0000);
        assert_eq!(unpack5(&packed, qh), q);
    }

    #[test]
    fn q8_0_rounds_half_away_from_zero() {
        let mut x = [0.0f32; 32];
        x[0] = 127.0;
        x[1] = 2.5;
        x[2] = -2.5;
        let b = BlockQ8_0::quantize(&x);
        assert_eq!(&b.qs[..3], &[127, 3, -3]);
    }
}
