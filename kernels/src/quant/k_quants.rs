//! The k-quant super-block types Q2_K, Q3_K, Q4_K, Q5_K and Q6_K (256 elements each): layouts as in ggml's
//! `ggml-common.h` (`block_q2_K` ... `block_q6_K`), dequantization as `dequantize_row_q*_K` and the reference
//! quantizers `quantize_row_q*_K_ref` (no importance matrix) from `ggml-quants.c`.
//!
//! A super-block splits into sub-blocks (16 x 16 for Q2_K/Q3_K/Q6_K, 8 x 32 for Q4_K/Q5_K), each with a
//! 4-, 6- or 8-bit scale (and for Q2_K/Q4_K/Q5_K a min) that multiplies the f16 super-block scale `d` (`dmin`).
//! The bit packing interleaves sub-blocks so that SIMD code can unpack 32 lanes with one shift; the loops
//! below follow ggml's so the element order can be checked against it line by line. The scale searches live
//! in `k_search`.
//!
//! The f16 super-block scales bound the usable range. `d` is about max|x| / 4096 for Q6_K and max|x| / 500
//! for Q4_K/Q5_K, so it is already an f16 subnormal (< 6.1e-5) for typical weight rows (sigma 0.02); that
//! costs little while `d` keeps a few significant bits, because the levels are requantized against the
//! stored `d`. Tinier rows run out of bits: relative RMSE measured at sigma 1e-4 / 1e-5 is Q6_K 0.074 / 1.0
//! (blocks round to zero), Q5_K 0.051 / 2.2 (`d` and `dmin` lose their balance), Q4_K 0.082 / 0.093. That
//! is ggml's format, reproduced bit for bit, not a bug of this port.

use half::f16;

use super::GgmlType;
use super::block::{Block, FieldReader, FieldWriter};
use super::float::{f16_to_f32, f32_to_f16};
use super::k_search::{
    GROUP_MAX_EPS, Qkx2Search, make_q3_quants, make_qkx2_quants, make_qx_quants, nearest_int,
};

/// Elements per k-quant super-block.
pub const QK_K: usize = 256;
/// Bytes of packed 6-bit scales and mins in Q4_K and Q5_K.
pub const K_SCALE_SIZE: usize = 12;

/// `x = d * scale_j * q - dmin * min_j` with 2-bit `q` and 4-bit scale/min per 16 elements; 2.625 bpw.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BlockQ2K {
    /// Low nibble: scale, high nibble: min, per 16-element sub-block.
    pub scales: [u8; QK_K / 16],
    pub qs: [u8; QK_K / 4],
    pub d: f16,
    pub dmin: f16,
}
const _: () = assert!(size_of::<BlockQ2K>() == 84 && GgmlType::Q2_K.type_size() == 84);

/// `x = d * (scale_j - 32) * (q - 4)` with 3-bit `q` (low 2 bits in `qs`, high bit in `hmask`, set meaning
/// "no -4") and 6-bit scales per 16 elements; 3.4375 bpw.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BlockQ3K {
    pub hmask: [u8; QK_K / 8],
    pub qs: [u8; QK_K / 4],
    /// 16 six-bit scales: low nibbles in bytes 0..8, high 2 bits in bytes 8..12.
    pub scales: [u8; 12],
    pub d: f16,
}
const _: () = assert!(size_of::<BlockQ3K>() == 110 && GgmlType::Q3_K.type_size() == 110);

/// `x = d * scale_j * q - dmin * min_j` with 4-bit `q` and 6-bit scale/min per 32 elements; 4.5 bpw.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BlockQ4K {
    pub d: f16,
    pub dmin: f16,
    /// Eight 6-bit scales and eight 6-bit mins, packed as `get_scale_min_k4` reads them.
    pub scales: [u8; K_SCALE_SIZE],
    pub qs: [u8; QK_K / 2],
}
const _: () = assert!(size_of::<BlockQ4K>() == 144 && GgmlType::Q4_K.type_size() == 144);

/// Q4_K with a fifth bit per element in `qh`; 5.5 bpw.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BlockQ5K {
    pub d: f16,
    pub dmin: f16,
    pub scales: [u8; K_SCALE_SIZE],
    pub qh: [u8; QK_K / 8],
    pub qs: [u8; QK_K / 2],
}
const _: () = assert!(size_of::<BlockQ5K>() == 176 && GgmlType::Q5_K.type_size() == 176);

/// `x = d * scale_j * (q - 32)` with 6-bit `q` (low 4 bits in `ql`, high 2 in `qh`) and a signed 8-bit scale
/// per 16 elements; 6.5625 bpw.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BlockQ6K {
    pub ql: [u8; QK_K / 2],
    pub qh: [u8; QK_K / 4],
    pub scales: [i8; QK_K / 16],
    pub d: f16,
}
const _: () = assert!(size_of::<BlockQ6K>() == 210 && GgmlType::Q6_K.type_size() == 210);

/// Scale and min of sub-block `j` (0..8) of Q4_K/Q5_K (ggml's `get_scale_min_k4`): sub-blocks 0..4 keep
/// 6 bits in bytes 0..8; 4..8 keep their low nibbles in bytes 8..12 and their top 2 bits in the spare top
/// bits of bytes 0..8. `j` is taken modulo 8.
pub fn get_scale_min_k4(j: usize, q: &[u8; K_SCALE_SIZE]) -> (u8, u8) {
    let j = j % 8;
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Inverse of [`get_scale_min_k4`] for 6-bit `ls`/`lm`.
fn pack_scale_min_k4(ls: &[u8; 8], lm: &[u8; 8]) -> [u8; K_SCALE_SIZE] {
    let mut q = [0u8; K_SCALE_SIZE];
    for j in 0..8 {
        let (s, m) = (ls[j], lm[j]);
        if j < 4 {
            q[j] = s;
            q[j + 4] = m;
        } else {
            q[j + 4] = (s & 0x0f) | ((m & 0x0f) << 4);
            q[j - 4] |= (s >> 4) << 6;
            q[j] |= (m >> 4) << 6;
        }
    }
    q
}

/// The 16 six-bit Q3_K scales, still offset by 32.
fn q3_k_scales(s: &[u8; 12]) -> [i32; 16] {
    std::array::from_fn(|j| {
        let low = if j < 8 { s[j] & 0x0f } else { s[j - 8] >> 4 };
        let high = (s[8 + j % 4] >> (2 * (j / 4))) & 3;
        i32::from(low | (high << 4))
    })
}

/// Packs 2-bit levels: byte `l` of each 32-byte group holds elements `l`, `l+32`, `l+64`, `l+96` of its 128.
fn pack_2bit(levels: &[u8; QK_K]) -> [u8; QK_K / 4] {
    let mut qs = [0u8; QK_K / 4];
    for j in (0..QK_K).step_by(128) {
        for l in 0..32 {
            qs[j / 4 + l] = levels[j + l]
                | (levels[j + l + 32] << 2)
                | (levels[j + l + 64] << 4)
                | (levels[j + l + 96] << 6);
        }
    }
    qs
}

/// Sub-block scales and mins of Q4_K/Q5_K: search each 32-element group with `make_qkx2_quants`, quantize
/// the scales and mins to 6 bits against the largest of each, then requantize every group against its
/// final (f16-rounded) scale and min. Returns `(d, dmin, packed scales, levels)`.
fn quantize_scale_min_k4(
    x: &[f32; QK_K],
    search: &Qkx2Search,
) -> (f16, f16, [u8; K_SCALE_SIZE], [u8; QK_K]) {
    let mut levels = [0u8; QK_K];
    let mut scales = [0f32; QK_K / 32];
    let mut mins = [0f32; QK_K / 32];
    let (mut max_scale, mut max_min) = (0f32, 0f32);
    for (j, (xs, ls)) in x
        .chunks_exact(32)
        .zip(levels.chunks_exact_mut(32))
        .enumerate()
    {
        // Weights favour large values, offset by the group's RMS so that small ones still count.
        let sum_x2 = xs.iter().fold(0f32, |s, &v| s + v * v);
        let av_x = (sum_x2 / 32.0).sqrt();
        let weights: [f32; 32] = std::array::from_fn(|l| av_x + xs[l].abs());
        (scales[j], mins[j]) = make_qkx2_quants(xs, &weights, ls, search);
        if scales[j] > max_scale {
            max_scale = scales[j];
        }
        if mins[j] > max_min {
            max_min = mins[j];
        }
    }

    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    // `as u8` wraps like C's int -> uint8_t before the clamp, as ggml does.
    let ls: [u8; 8] = std::array::from_fn(|j| (nearest_int(inv_scale * scales[j]) as u8).min(63));
    let lm: [u8; 8] = std::array::from_fn(|j| (nearest_int(inv_min * mins[j]) as u8).min(63));
    let packed = pack_scale_min_k4(&ls, &lm);
    let d = f32_to_f16(max_scale / 63.0);
    let dmin = f32_to_f16(max_min / 63.0);

    let nmax = search.nmax;
    for (j, (xs, out)) in x
        .chunks_exact(32)
        .zip(levels.chunks_exact_mut(32))
        .enumerate()
    {
        let (sc, m) = get_scale_min_k4(j, &packed);
        let dj = f16_to_f32(d) * f32::from(sc);
        if dj == 0.0 {
            continue;
        }
        let dm = f16_to_f32(dmin) * f32::from(m);
        for (l, &v) in out.iter_mut().zip(xs) {
            *l = nearest_int((v + dm) / dj).clamp(0, nmax) as u8;
        }
    }
    (d, dmin, packed, levels)
}

impl Block<84, QK_K> for BlockQ2K {
    fn from_bytes(bytes: &[u8; 84]) -> Self {
        let mut r = FieldReader::new(bytes);
        let block = Self {
            scales: r.array(),
            qs: r.array(),
            d: r.f16(),
            dmin: r.f16(),
        };
        debug_assert!(r.is_done());
        block
    }

    fn to_bytes(&self) -> [u8; 84] {
        FieldWriter::new()
            .put(&self.scales)
            .put(&self.qs)
            .f16(self.d)
            .f16(self.dmin)
            .finish()
    }

    fn dequantize(&self, y: &mut [f32; QK_K]) {
        let d = f16_to_f32(self.d);
        let min = f16_to_f32(self.dmin);
        let mut out = y.iter_mut();
        let mut is = 0;
        for q in self.qs.chunks_exact(32) {
            for shift in [0, 2, 4, 6] {
                for half in q.chunks_exact(16) {
                    let sc = self.scales[is];
                    is += 1;
                    let dl = d * f32::from(sc & 0x0f);
                    let ml = min * f32::from(sc >> 4);
                    // The block's slice first: `zip` must not pull an output it will not write.
                    for (&b, y) in half.iter().zip(out.by_ref()) {
                        *y = dl * f32::from((b >> shift) & 3) - ml;
                    }
                }
            }
        }
    }

    fn quantize(x: &[f32; QK_K]) -> Self {
        const Q4SCALE: f32 = 15.0;
        let search = Qkx2Search {
            nmax: 3,
            rmin: -0.5,
            rdelta: 0.1,
            nstep: 15,
            use_mad: true,
        };
        let mut levels = [0u8; QK_K];
        let mut scales = [0f32; QK_K / 16];
        let mut mins = [0f32; QK_K / 16];
        let (mut max_scale, mut max_min) = (0f32, 0f32);
        for (j, (xs, ls)) in x
            .chunks_exact(16)
            .zip(levels.chunks_exact_mut(16))
            .enumerate()
        {
            let weights: [f32; 16] = std::array::from_fn(|l| xs[l].abs());
            (scales[j], mins[j]) = make_qkx2_quants(xs, &weights, ls, &search);
            if scales[j] > max_scale {
                max_scale = scales[j];
            }
            if mins[j] > max_min {
                max_min = mins[j];
            }
        }

        let mut packed = [0u8; QK_K / 16];
        let mut d = f16::ZERO;
        if max_scale > 0.0 {
            let iscale = Q4SCALE / max_scale;
            for (p, &s) in packed.iter_mut().zip(&scales) {
                *p = nearest_int(iscale * s) as u8;
            }
            d = f32_to_f16(max_scale / Q4SCALE);
        }
        let mut dmin = f16::ZERO;
        if max_min > 0.0 {
            let iscale = Q4SCALE / max_min;
            for (p, &m) in packed.iter_mut().zip(&mins) {
                *p |= (nearest_int(iscale * m) as u8) << 4;
            }
            dmin = f32_to_f16(max_min / Q4SCALE);
        }
        for ((xs, out), &sc) in x
            .chunks_exact(16)
            .zip(levels.chunks_exact_mut(16))
            .zip(&packed)
        {
            let dj = f16_to_f32(d) * f32::from(sc & 0x0f);
            if dj == 0.0 {
                continue;
            }
            let dm = f16_to_f32(dmin) * f32::from(sc >> 4);
            for (l, &v) in out.iter_mut().zip(xs) {
                *l = nearest_int((v + dm) / dj).clamp(0, 3) as u8;
            }
        }
        Self {
            scales: packed,
            qs: pack_2bit(&levels),
            d,
            dmin,
        }
    }
}

impl Block<110, QK_K> for BlockQ3K {
    fn from_bytes(bytes: &[u8; 110]) -> Self {
        let mut r = FieldReader::new(bytes);
        let block = Self {
            hmask: r.array(),
            qs: r.array(),
            scales: r.array(),
            d: r.f16(),
        };
        debug_assert!(r.is_done());
        block
    }

    fn to_bytes(&self) -> [u8; 110] {
        FieldWriter::new()
            .put(&self.hmask)
            .put(&self.qs)
            .put(&self.scales)
            .f16(self.d)
            .finish()
    }

    fn dequantize(&self, y: &mut [f32; QK_K]) {
        let d_all = f16_to_f32(self.d);
        let scales = q3_k_scales(&self.scales);
        let mut out = y.iter_mut();
        let mut is = 0;
        // The high-bit mask advances one bit per 32 outputs across the whole block, while `qs` advances one
        // 32-byte group per 128 outputs.
        let mut m = 1u8;
        for q in self.qs.chunks_exact(32) {
            for shift in [0, 2, 4, 6] {
                for (half, hm) in q.chunks_exact(16).zip(self.hmask.chunks_exact(16)) {
                    let dl = d_all * (scales[is] - 32) as f32;
                    is += 1;
                    for ((&b, &h), y) in half.iter().zip(hm).zip(out.by_ref()) {
                        let q = i32::from((b >> shift) & 3) - if h & m != 0 { 0 } else { 4 };
                        *y = dl * q as f32;
                    }
                }
                m <<= 1;
            }
        }
    }

    fn quantize(x: &[f32; QK_K]) -> Self {
        let mut levels = [0i8; QK_K];
        let mut scales = [0f32; QK_K / 16];
        let (mut max_scale, mut amax) = (0f32, 0f32);
        for (j, (xs, ls)) in x
            .chunks_exact(16)
            .zip(levels.chunks_exact_mut(16))
            .enumerate()
        {
            scales[j] = make_q3_quants(4, xs, ls);
            if scales[j].abs() > amax {
                amax = scales[j].abs();
                max_scale = scales[j];
            }
        }

        let mut packed = [0u8; 12];
        let mut d = f16::ZERO;
        if max_scale != 0.0 {
            let iscale = -32.0 / max_scale;
            for (j, &s) in scales.iter().enumerate() {
                // ggml stores nearest_int into an int8_t before clamping; the value is within +-32 anyway.
                let l = (i32::from(nearest_int(iscale * s) as i8).clamp(-32, 31) + 32) as u8;
                if j < 8 {
                    packed[j] = l & 0x0f;
                } else {
                    packed[j - 8] |= (l & 0x0f) << 4;
                }
                packed[j % 4 + 8] |= (l >> 4) << (2 * (j / 4));
            }
            d = f32_to_f16(1.0 / iscale);
        }

        let final_scales = q3_k_scales(&packed);
        for ((xs, out), &sc) in x
            .chunks_exact(16)
            .zip(levels.chunks_exact_mut(16))
            .zip(&final_scales)
        {
            let dj = f16_to_f32(d) * (sc - 32) as f32;
            if dj == 0.0 {
                continue;
            }
            for (l, &v) in out.iter_mut().zip(xs) {
                *l = (nearest_int(v / dj).clamp(-4, 3) + 4) as i8;
            }
        }

        // Bit `j / 32` of hmask byte `j % 32` is the high bit of element `j`.
        let mut hmask = [0u8; QK_K / 8];
        let mut low = [0u8; QK_K];
        for (j, (&l, lo)) in levels.iter().zip(low.iter_mut()).enumerate() {
            let l = l as u8;
            if l > 3 {
                hmask[j % 32] |= 1 << (j / 32);
            }
            *lo = l & 3;
        }
        Self {
            hmask,
            qs: pack_2bit(&low),
            scales: packed,
            d,
        }
    }
}

impl Block<144, QK_K> for BlockQ4K {
    fn from_bytes(bytes: &[u8; 144]) -> Self {
        let mut r = FieldReader::new(bytes);
        let block = Self {
            d: r.f16(),
            dmin: r.f16(),
            scales: r.array(),
            qs: r.array(),
        };
        debug_assert!(r.is_done());
        block
    }

    fn to_bytes(&self) -> [u8; 144] {
        FieldWriter::new()
            .f16(self.d)
            .f16(self.dmin)
            .put(&self.scales)
            .put(&self.qs)
            .finish()
    }

    fn dequantize(&self, y: &mut [f32; QK_K]) {
        let d = f16_to_f32(self.d);
        let min = f16_to_f32(self.dmin);
        for (j, (q, y)) in self
            .qs
            .chunks_exact(32)
            .zip(y.chunks_exact_mut(64))
            .enumerate()
        {
            let (sc1, m1) = get_scale_min_k4(2 * j, &self.scales);
            let (sc2, m2) = get_scale_min_k4(2 * j + 1, &self.scales);
            let (d1, m1) = (d * f32::from(sc1), min * f32::from(m1));
            let (d2, m2) = (d * f32::from(sc2), min * f32::from(m2));
            let (lo, hi) = y.split_at_mut(32);
            for ((l, h), &b) in lo.iter_mut().zip(hi).zip(q) {
                *l = d1 * f32::from(b & 0x0f) - m1;
                *h = d2 * f32::from(b >> 4) - m2;
            }
        }
    }

    fn quantize(x: &[f32; QK_K]) -> Self {
        let search = Qkx2Search {
            nmax: 15,
            rmin: -1.0,
            rdelta: 0.1,
            nstep: 20,
            use_mad: false,
        };
        let (d, dmin, scales, levels) = quantize_scale_min_k4(x, &search);
        let mut qs = [0u8; QK_K / 2];
        for (q, l) in qs.chunks_exact_mut(32).zip(levels.chunks_exact(64)) {
            let (lo, hi) = l.split_at(32);
            for ((q, &a), &b) in q.iter_mut().zip(lo).zip(hi) {
                *q = a | (b << 4);
            }
        }
        Self {
            d,
            dmin,
            scales,
            qs,
        }
    }
}

impl Block<176, QK_K> for BlockQ5K {
    fn from_bytes(bytes: &[u8; 176]) -> Self {
        let mut r = FieldReader::new(bytes);
        let block = Self {
            d: r.f16(),
            dmin: r.f16(),
            scales: r.array(),
            qh: r.array(),
            qs: r.array(),
        };
        debug_assert!(r.is_done());
        block
    }

    fn to_bytes(&self) -> [u8; 176] {
        FieldWriter::new()
            .f16(self.d)
            .f16(self.dmin)
            .put(&self.scales)
            .put(&self.qh)
            .put(&self.qs)
            .finish()
    }

    fn dequantize(&self, y: &mut [f32; QK_K]) {
        let d = f16_to_f32(self.d);
        let min = f16_to_f32(self.dmin);
        // Pair `j` of sub-blocks takes its fifth bits from bits 2j and 2j+1 of every `qh` byte.
        for (j, (ql, y)) in self
            .qs
            .chunks_exact(32)
            .zip(y.chunks_exact_mut(64))
            .enumerate()
        {
            let (sc1, m1) = get_scale_min_k4(2 * j, &self.scales);
            let (sc2, m2) = get_scale_min_k4(2 * j + 1, &self.scales);
            let (d1, m1) = (d * f32::from(sc1), min * f32::from(m1));
            let (d2, m2) = (d * f32::from(sc2), min * f32::from(m2));
            let (u1, u2) = (1u8 << (2 * j), 2u8 << (2 * j));
            let (lo, hi) = y.split_at_mut(32);
            for (((l, h), &b), &qh) in lo.iter_mut().zip(hi).zip(ql).zip(&self.qh) {
                let q1 = (b & 0x0f) + if qh & u1 != 0 { 16 } else { 0 };
                let q2 = (b >> 4) + if qh & u2 != 0 { 16 } else { 0 };
                *l = d1 * f32::from(q1) - m1;
                *h = d2 * f32::from(q2) - m2;
            }
        }
    }

    fn quantize(x: &[f32; QK_K]) -> Self {
        let search = Qkx2Search {
            nmax: 31,
            rmin: -0.5,
            rdelta: 0.1,
            nstep: 15,
            use_mad: false,
        };
        let (d, dmin, scales, levels) = quantize_scale_min_k4(x, &search);
        let mut qh = [0u8; QK_K / 8];
        let mut qs = [0u8; QK_K / 2];
        for (j, (q, l)) in qs
            .chunks_exact_mut(32)
            .zip(levels.chunks_exact(64))
            .enumerate()
        {
            let (m1, m2) = (1u8 << (2 * j), 2u8 << (2 * j));
            let (lo, hi) = l.split_at(32);
            for (((q, h), &a), &b) in q.iter_mut().zip(qh.iter_mut()).zip(lo).zip(hi) {
                if a > 15 {
                    *h |= m1;
                }
                if b > 15 {
                    *h |= m2;
                }
                *q = (a & 0x0f) | ((b & 0x0f) << 4);
            }
        }
        Self {
            d,
            dmin,
            scales,
            qh,
            qs,
        }
    }
}

impl Block<210, QK_K> for BlockQ6K {
    fn from_bytes(bytes: &[u8; 210]) -> Self {
        let mut r = FieldReader::new(bytes);
        let block = Self {
            ql: r.array(),
            qh: r.array(),
            scales: r.array::<16>().map(|b| b as i8),
            d: r.f16(),
        };
        debug_assert!(r.is_done());
        block
    }

    fn to_bytes(&self) -> [u8; 210] {
        FieldWriter::new()
            .put(&self.ql)
            .put(&self.qh)
            .put(&self.scales.map(|s| s as u8))
            .f16(self.d)
            .finish()
    }

    fn dequantize(&self, y: &mut [f32; QK_K]) {
        let d = f16_to_f32(self.d);
        // Each half of 128 outputs uses 64 bytes of `ql`, 32 of `qh` and 8 scales; byte `l` of those
        // feeds outputs l, l+32, l+64 and l+96.
        let halves = self
            .ql
            .chunks_exact(64)
            .zip(self.qh.chunks_exact(32))
            .zip(self.scales.chunks_exact(8));
        for (((ql, qh), sc), y) in halves.zip(y.chunks_exact_mut(128)) {
            for l in 0..32 {
                let is = l / 16;
                let q1 = i32::from((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) - 32;
                let q2 = i32::from((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) - 32;
                let q3 = i32::from((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                let q4 = i32::from((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                y[l] = d * f32::from(sc[is]) * q1 as f32;
                y[l + 32] = d * f32::from(sc[is + 2]) * q2 as f32;
                y[l + 64] = d * f32::from(sc[is + 4]) * q3 as f32;
                y[l + 96] = d * f32::from(sc[is + 6]) * q4 as f32;
            }
        }
    }

    fn quantize(x: &[f32; QK_K]) -> Self {
        let mut levels = [0i8; QK_K];
        let mut scales = [0f32; QK_K / 16];
        let (mut max_scale, mut max_abs_scale) = (0f32, 0f32);
        for (j, (xs, ls)) in x
            .chunks_exact(16)
            .zip(levels.chunks_exact_mut(16))
            .enumerate()
        {
            scales[j] = make_qx_quants(32, xs, ls);
            if scales[j].abs() > max_abs_scale {
                max_abs_scale = scales[j].abs();
                max_scale = scales[j];
            }
        }
        if max_abs_scale < GROUP_MAX_EPS {
            return Self {
                ql: [0; QK_K / 2],
                qh: [0; QK_K / 4],
                scales: [0; QK_K / 16],
                d: f16::ZERO,
            };
        }

        let iscale = -128.0 / max_scale;
        let d = f32_to_f16(1.0 / iscale);
        let qscales: [i8; QK_K / 16] =
            std::array::from_fn(|j| nearest_int(iscale * scales[j]).min(127) as i8);
        for ((xs, out), &sc) in x
            .chunks_exact(16)
            .zip(levels.chunks_exact_mut(16))
            .zip(&qscales)
        {
            let dj = f16_to_f32(d) * f32::from(sc);
            if dj == 0.0 {
                continue;
            }
            for (l, &v) in out.iter_mut().zip(xs) {
                *l = (nearest_int(v / dj).clamp(-32, 31) + 32) as i8;
            }
        }

        let mut ql = [0u8; QK_K / 2];
        let mut qh = [0u8; QK_K / 4];
        let halves = ql
            .chunks_exact_mut(64)
            .zip(qh.chunks_exact_mut(32))
            .zip(levels.chunks_exact(128));
        for ((ql, qh), lv) in halves {
            for l in 0..32 {
                let [a, b, c, e] = [lv[l], lv[l + 32], lv[l + 64], lv[l + 96]].map(|v| v as u8);
                ql[l] = (a & 0x0f) | ((c & 0x0f) << 4);
                ql[l + 32] = (b & 0x0f) | ((e & 0x0f) << 4);
                qh[l] = (a >> 4) | ((b >> 4) << 2) | ((c >> 4) << 4) | ((e >> 4) << 6);
            }
        }
        Self {
            ql,
            qh,
            scales: qscales,
            d,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_min_k4_packing_round_trips() {
        let ls: [u8; 8] = [0, 1, 17, 63, 32, 5, 48, 63];
        let lm: [u8; 8] = [63, 2, 33, 0, 16, 62, 7, 31];
        let packed = pack_scale_min_k4(&ls, &lm);
        for j in 0..8 {
            assert_eq!(
                get_scale_min_k4(j, &packed),
                (ls[j], lm[j]),
                "sub-block {j}"
            );
        }
    }

    #[test]
    fn q3_k_scale_unpacking_matches_ggml_aux_trick() {
        // ggml's dequantize_row_q3_K rebuilds the scales with u32 masks; check our per-index formula on all
        // bytes against that construction.
        let s: [u8; 12] = std::array::from_fn(|i| (i as u8).wrapping_mul(97).wrapping_add(13));
        let mut aux = [0u32; 4];
        for (k, a) in aux.iter_mut().take(3).enumerate() {
            *a = u32::from_le_bytes([s[4 * k], s[4 * k + 1], s[4 * k + 2], s[4 * k + 3]]);
        }
        let (kmask1, kmask2) = (0x0303_0303u32, 0x0f0f_0f0fu32);
        let tmp = aux[2];
        aux[2] = ((aux[0] >> 4) & kmask2) | (((tmp >> 4) & kmask1) << 4);
        aux[3] = ((aux[1] >> 4) & kmask2) | (((tmp >> 6) & kmask1) << 4);
        aux[0] = (aux[0] & kmask2) | ((tmp & kmask1) << 4);
        aux[1] = (aux[1] & kmask2) | (((tmp >> 2) & kmask1) << 4);
        let bytes: Vec<i32> = aux
            .iter()
            .flat_map(|a| a.to_le_bytes())
            .map(i32::from)
            .collect();
        assert_eq!(q3_k_scales(&s).to_vec(), bytes);
    }
}
