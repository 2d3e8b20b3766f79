//! AVX2 + FMA + F16C dot products, twins of `scalar::dot`: one 256-bit vector per 32-element block for the
//! legacy types (ggml's `arch/x86/quants.c` AVX2 paths: `maddubs` on unsigned × signed bytes, the sign trick
//! for signed × signed), and ggml's AVX2 k-quant kernels with their shuffled scale tables.
//!
//! # Safety
//! Every function requires AVX2, FMA and F16C (the table is built only after detecting them) and the length
//! contract of `scalar::dot`: `w` and `a` hold at least the bytes of `n` values. Reads go through raw
//! pointers within those bytes; `debug_assert!`s restate the contract.

use std::arch::x86_64::*;

use crate::cpu::layout::{Q8_0_BYTES, Q8_1_BYTES, Q8_K_BYTES};

/// f16 at `p` (unaligned) to f32 via F16C.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn f16_load(p: *const u8) -> f32 {
    // SAFETY: the caller guarantees 2 readable bytes at `p`.
    let bits = unsafe { p.cast::<u16>().read_unaligned() };
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits))))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn hsum_f32x8(x: __m256) -> f32 {
    let r = _mm_add_ps(_mm256_extractf128_ps(x, 1), _mm256_castps256_ps128(x));
    let r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    let r = _mm_add_ss(r, _mm_movehdup_ps(r));
    _mm_cvtss_f32(r)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load256(p: *const u8) -> __m256i {
    // SAFETY: the caller guarantees 32 readable bytes.
    unsafe { _mm256_loadu_si256(p.cast()) }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load128(p: *const u8) -> __m128i {
    // SAFETY: the caller guarantees 16 readable bytes.
    unsafe { _mm_loadu_si128(p.cast()) }
}

/// 16 packed bytes to 32 nibbles: low nibbles in bytes 0..16, high nibbles in 16..32 (the legacy order).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn nibbles32(p: *const u8) -> __m256i {
    // SAFETY: 16 readable bytes, forwarded.
    let t = unsafe { load128(p) };
    let both = _mm256_inserti128_si256::<1>(_mm256_castsi128_si256(t), _mm_srli_epi16::<4>(t));
    _mm256_and_si256(both, _mm256_set1_epi8(0x0f))
}

/// 32 bits to 32 bytes of 0x00 / 0xFF (ggml's `bytes_from_bits_32`).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn bytes_from_bits32(p: *const u8) -> __m256i {
    // SAFETY: 4 readable bytes.
    let x = unsafe { p.cast::<u32>().read_unaligned() } as i32;
    let shuf = _mm256_set_epi64x(
        0x0303_0303_0303_0303,
        0x0202_0202_0202_0202,
        0x0101_0101_0101_0101,
        0,
    );
    let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(x), shuf);
    let bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe));
    _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1))
}

/// Σ of unsigned × signed byte pairs, as 8 f32 lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn mul_sum_us8(ax: __m256i, sy: __m256i) -> __m256 {
    let dot = _mm256_maddubs_epi16(ax, sy);
    _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_set1_epi16(1), dot))
}

/// Σ of signed × signed byte pairs (sign trick), as 8 f32 lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn mul_sum_i8(x: __m256i, y: __m256i) -> __m256 {
    mul_sum_us8(_mm256_sign_epi8(x, x), _mm256_sign_epi8(y, x))
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn vec_dot_q4_0_q8_0(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let nb = n / 32;
    debug_assert!(w.len() >= nb * 18 && a.len() >= nb * Q8_0_BYTES);
    let (wp, ap) = (w.as_ptr(), a.as_ptr());
    let mut acc = _mm256_setzero_ps();
    for i in 0..nb {
        // SAFETY: block `i` lies within the checked lengths.
        unsafe {
            let (wb, ab) = (wp.add(i * 18), ap.add(i * Q8_0_BYTES));
            let d = _mm256_set1_ps(f16_load(wb) * f16_load(ab));
            let qx = _mm256_sub_epi8(nibbles32(wb.add(2)), _mm256_set1_epi8(8));
            let q = mul_sum_i8(qx, load256(ab.add(2)));
            acc = _mm256_fmadd_ps(d, q, acc);
        }
    }
    hsum_f32x8(acc)
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn vec_dot_q4_1_q8_1(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let nb = n / 32;
    debug_assert!(w.len() >= nb * 20 && a.len() >= nb * Q8_1_BYTES);
    let (wp, ap) = (w.as_ptr(), a.as_ptr());
    let mut acc = _mm256_setzero_ps();
    let mut summs = 0.0f32;
    for i in 0..nb {
        // SAFETY: block `i` lies within the checked lengths.
        unsafe {
            let (wb, ab) = (wp.add(i * 20), ap.add(i * Q8_1_BYTES));
            summs += f16_load(wb.add(2)) * f16_load(ab.add(2));
            let d = _mm256_set1_ps(f16_load(wb) * f16_load(ab));
            let q = mul_sum_us8(nibbles32(wb.add(4)), load256(ab.add(4)));
            acc = _mm256_fmadd_ps(d, q, acc);
        }
    }
    hsum_f32x8(acc) + summs
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn vec_dot_q5_0_q8_0(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let nb = n / 32;
    debug_assert!(w.len() >= nb * 22 && a.len() >= nb * Q8_0_BYTES);
    let (wp, ap) = (w.as_ptr(), a.as_ptr());
    let mut acc = _mm256_setzero_ps();
    for i in 0..nb {
        // SAFETY: block `i` lies within the checked lengths.
        unsafe {
            let (wb, ab) = (wp.add(i * 22), ap.add(i * Q8_0_BYTES));
            let d = _mm256_set1_ps(f16_load(wb) * f16_load(ab));
            let qx = nibbles32(wb.add(6));
            // Elements whose 5th bit is clear get -16 (ggml: `andnot(bits, 0xF0)` then OR).
            let hi = _mm256_andnot_si256(bytes_from_bits32(wb.add(2)), _mm256_set1_epi8(-16));
            let qx = _mm256_or_si256(qx, hi);
            let q = mul_sum_i8(qx, load256(ab.add(2)));
            acc = _mm256_fmadd_ps(d, q, acc);
        }
    }
    hsum_f32x8(acc)
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn vec_dot_q5_1_q8_1(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let nb = n / 32;
    debug_assert!(w.len() >= nb * 24 && a.len() >= nb * Q8_1_BYTES);
    let (wp, ap) = (w.as_ptr(), a.as_ptr());
    let mut acc = _mm256_setzero_ps();
    let mut summs = 0.0f32;
    for i in 0..nb {
        // SAFETY: block `i` lies within the checked lengths.
        unsafe {
            let (wb, ab) = (wp.add(i * 24), ap.add(i * Q8_1_BYTES));
            summs += f16_load(wb.add(2)) * f16_load(ab.add(2));
            let d = _mm256_set1_ps(f16_load(wb) * f16_load(ab));
            let hi = _mm256_and_si256(bytes_from_bits32(wb.add(4)), _mm256_set1_epi8(0x10));
            let qx = _mm256_or_si256(nibbles32(wb.add(8)), hi);
            let q = mul_sum_us8(qx, load256(ab.add(4)));
            acc = _mm256_fmadd_ps(d, q, acc);
        }
    }
    hsum_f32x8(acc) + summs
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn vec_dot_q8_0_q8_0(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let nb = n / 32;
    debug_assert!(w.len() >= nb * 34 && a.len() >= nb * Q8_0_BYTES);
    let (wp, ap) = (w.as_ptr(), a.as_ptr());
    let mut acc = _mm256_setzero_ps();
    for i in 0..nb {
        // SAFETY: block `i` lies within the checked lengths.
        unsafe {
            let (wb, ab) = (wp.add(i * 34), ap.add(i * Q8_0_BYTES));
            let d = _mm256_set1_ps(f16_load(wb) * f16_load(ab));
            let q = mul_sum_i8(load256(wb.add(2)), load256(ab.add(2)));
            acc = _mm256_fmadd_ps(d, q, acc);
        }
    }
    hsum_f32x8(acc)
}

/// Byte shuffles that broadcast 16-bit scale `i` (of 8 per 128-bit lane) to a whole register
/// (ggml's `get_scale_shuffle_k4`).
static SHUFFLE_K4: [[u8; 32]; 8] = {
    let mut t = [[0u8; 32]; 8];
    let mut i = 0;
    while i < 8 {
        let mut j = 0;
        while j < 32 {
            t[i][j] = (2 * i + j % 2) as u8;
            j += 1;
        }
        i += 1;
    }
    t
};

/// Shuffles giving 16-bit scale `2i` to the low lane and `2i + 1` to the high lane (`get_scale_shuffle_q3k`).
static SHUFFLE_Q3K: [[u8; 32]; 4] = {
    let mut t = [[0u8; 32]; 4];
    let mut i = 0;
    while i < 4 {
        let mut j = 0;
        while j < 32 {
            t[i][j] = (4 * i + 2 * (j / 16) + j % 2) as u8;
            j += 1;
        }
        i += 1;
    }
    t
};

/// Shuffles repeating byte `2i` eight times then `2i + 1` eight times (`get_scale_shuffle`).
static SHUFFLE_Q6K: [[u8; 16]; 8] = {
    let mut t = [[0u8; 16]; 8];
    let mut i = 0;
    while i < 8 {
        let mut j = 0;
        while j < 16 {
            t[i][j] = (2 * i + j / 8) as u8;
            j += 1;
        }
        i += 1;
    }
    t
};

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn shuffle_const(t: &[u8; 32]) -> __m256i {
    // SAFETY: `t` is 32 readable bytes.
    unsafe { _mm256_loadu_si256(t.as_ptr().cast()) }
}

/// Q4_K/Q5_K 6-bit scales and mins unpacked to 8 + 8 bytes (ggml's `utmp` shuffle).
#[inline]
pub(crate) fn k4_scales_mins(s: &[u8]) -> [u32; 4] {
    const KMASK1: u32 = 0x3f3f_3f3f;
    const KMASK2: u32 = 0x0f0f_0f0f;
    const KMASK3: u32 = 0x0303_0303;
    let r = |o: usize| u32::from_le_bytes([s[o], s[o + 1], s[o + 2], s[o + 3]]);
    let mut u = [r(0), r(4), r(8), 0];
    u[3] = ((u[2] >> 4) & KMASK2) | (((u[1] >> 6) & KMASK3) << 4);
    let uaux = u[1] & KMASK1;
    u[1] = (u[2] & KMASK2) | (((u[0] >> 6) & KMASK3) << 4);
    u[2] = uaux;
    u[0] &= KMASK1;
    u
}

/// `Σ_j mins[j] · (bsums[2j] + bsums[2j+1])` for the 8 mins of a Q4_K/Q5_K block (as 4 i32 lanes).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn k4_min_products(mins_and_scales: __m256i, bsums: *const u8) -> __m128i {
    // SAFETY: 32 readable bytes of bsums.
    let q8sums = unsafe { load256(bsums) };
    let q8s = _mm_hadd_epi16(
        _mm256_castsi256_si128(q8sums),
        _mm256_extracti128_si256::<1>(q8sums),
    );
    _mm_madd_epi16(_mm256_extracti128_si256::<1>(mins_and_scales), q8s)
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn vec_dot_q4_k_q8_k(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let nb = n / 256;
    debug_assert!(w.len() >= nb * 144 && a.len() >= nb * Q8_K_BYTES);
    let m4 = _mm256_set1_epi8(0x0f);
    let mut acc = _mm256_setzero_ps();
    let mut acc_m = _mm_setzero_ps();
    for i in 0..nb {
        let wb = &w[i * 144..(i + 1) * 144];
        let ab = &a[i * Q8_K_BYTES..(i + 1) * Q8_K_BYTES];
        // SAFETY: `wb` and `ab` are whole blocks; every offset below is inside them.
        unsafe {
            let ad = ab.as_ptr().cast::<f32>().read_unaligned();
            let d = ad * f16_load(wb.as_ptr());
            let dmin = -ad * f16_load(wb.as_ptr().add(2));
            let u = k4_scales_mins(&wb[4..16]);
            let mins_and_scales = _mm256_cvtepu8_epi16(_mm_set_epi32(
                u[3] as i32,
                u[2] as i32,
                u[1] as i32,
                u[0] as i32,
            ));
            let prod = k4_min_products(mins_and_scales, ab.as_ptr().add(260));
            acc_m = _mm_fmadd_ps(_mm_set1_ps(dmin), _mm_cvtepi32_ps(prod), acc_m);
            let sc128 = _mm256_castsi256_si128(mins_and_scales);
            let scales = _mm256_inserti128_si256::<1>(_mm256_castsi128_si256(sc128), sc128);
            let mut sumi = _mm256_setzero_si256();
            let (mut q4, mut q8) = (wb.as_ptr().add(16), ab.as_ptr().add(4));
            for j in 0..4 {
                let scale_l = _mm256_shuffle_epi8(scales, shuffle_const(&SHUFFLE_K4[2 * j]));
                let scale_h = _mm256_shuffle_epi8(scales, shuffle_const(&SHUFFLE_K4[2 * j + 1]));
                let bits = load256(q4);
                q4 = q4.add(32);
                let q4l = _mm256_and_si256(bits, m4);
                let q4h = _mm256_and_si256(_mm256_srli_epi16::<4>(bits), m4);
                let p16l = _mm256_madd_epi16(scale_l, _mm256_maddubs_epi16(q4l, load256(q8)));
                let p16h =
                    _mm256_madd_epi16(scale_h, _mm256_maddubs_epi16(q4h, load256(q8.add(32))));
                q8 = q8.add(64);
                sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(p16l, p16h));
            }
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
        }
    }
    let acc_m = _mm_add_ps(acc_m, _mm_movehl_ps(acc_m, acc_m));
    let acc_m = _mm_add_ss(acc_m, _mm_movehdup_ps(acc_m));
    hsum_f32x8(acc) + _mm_cvtss_f32(acc_m)
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn vec_dot_q5_k_q8_k(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let nb = n / 256;
    debug_assert!(w.len() >= nb * 176 && a.len() >= nb * Q8_K_BYTES);
    let m4 = _mm256_set1_epi8(0x0f);
    let mone = _mm256_set1_epi8(1);
    let mut acc = _mm256_setzero_ps();
    let mut acc_m = _mm_setzero_ps();
    for i in 0..nb {
        let wb = &w[i * 176..(i + 1) * 176];
        let ab = &a[i * Q8_K_BYTES..(i + 1) * Q8_K_BYTES];
        // SAFETY: `wb` and `ab` are whole blocks; every offset below is inside them.
        unsafe {
            let ad = ab.as_ptr().cast::<f32>().read_unaligned();
            let d = ad * f16_load(wb.as_ptr());
            let dmin = -ad * f16_load(wb.as_ptr().add(2));
            let u = k4_scales_mins(&wb[4..16]);
            let mins_and_scales = _mm256_cvtepu8_epi16(_mm_set_epi32(
                u[3] as i32,
                u[2] as i32,
                u[1] as i32,
                u[0] as i32,
            ));
            let prod = k4_min_products(mins_and_scales, ab.as_ptr().add(260));
            acc_m = _mm_fmadd_ps(_mm_set1_ps(dmin), _mm_cvtepi32_ps(prod), acc_m);
            let sc128 = _mm256_castsi256_si128(mins_and_scales);
            let scales = _mm256_inserti128_si256::<1>(_mm256_castsi128_si256(sc128), sc128);
            let hbits = load256(wb.as_ptr().add(16));
            let mut hmask = mone;
            let mut sumi = _mm256_setzero_si256();
            let (mut q5, mut q8) = (wb.as_ptr().add(48), ab.as_ptr().add(4));
            for j in 0..4 {
                let scale_0 = _mm256_shuffle_epi8(scales, shuffle_const(&SHUFFLE_K4[2 * j]));
                let scale_1 = _mm256_shuffle_epi8(scales, shuffle_const(&SHUFFLE_K4[2 * j + 1]));
                let bits = load256(q5);
                q5 = q5.add(32);
                // High bit: (hbits & hmask) != 0 → 16, via compare (bit position varies with j).
                let h0 = _mm256_and_si256(
                    _mm256_cmpeq_epi8(_mm256_and_si256(hbits, hmask), hmask),
                    _mm256_set1_epi8(16),
                );
                hmask = _mm256_add_epi8(hmask, hmask);
                let h1 = _mm256_and_si256(
                    _mm256_cmpeq_epi8(_mm256_and_si256(hbits, hmask), hmask),
                    _mm256_set1_epi8(16),
                );
                hmask = _mm256_add_epi8(hmask, hmask);
                let q5_0 = _mm256_or_si256(_mm256_and_si256(bits, m4), h0);
                let q5_1 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(bits), m4), h1);
                let p0 = _mm256_madd_epi16(scale_0, _mm256_maddubs_epi16(q5_0, load256(q8)));
                let p1 =
                    _mm256_madd_epi16(scale_1, _mm256_maddubs_epi16(q5_1, load256(q8.add(32))));
                q8 = q8.add(64);
                sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(p0, p1));
            }
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
        }
    }
    let acc_m = _mm_add_ps(acc_m, _mm_movehl_ps(acc_m, acc_m));
    let acc_m = _mm_add_ss(acc_m, _mm_movehdup_ps(acc_m));
    hsum_f32x8(acc) + _mm_cvtss_f32(acc_m)
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn vec_dot_q6_k_q8_k(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let nb = n / 256;
    debug_assert!(w.len() >= nb * 210 && a.len() >= nb * Q8_K_BYTES);
    let m3 = _mm256_set1_epi8(3);
    let m15 = _mm256_set1_epi8(15);
    let mut acc = _mm256_setzero_ps();
    for i in 0..nb {
        let wb = &w[i * 210..(i + 1) * 210];
        let ab = &a[i * Q8_K_BYTES..(i + 1) * Q8_K_BYTES];
        // SAFETY: `wb` and `ab` are whole blocks; every offset below is inside them.
        unsafe {
            let ad = ab.as_ptr().cast::<f32>().read_unaligned();
            let d = ad * f16_load(wb.as_ptr().add(208));
            let q8sums = load256(ab.as_ptr().add(260));
            let scales = load128(wb.as_ptr().add(192));
            let scales16 = _mm256_cvtepi8_epi16(scales);
            let q8sclsub = _mm256_slli_epi32::<5>(_mm256_madd_epi16(q8sums, scales16));
            let mut sumi = _mm256_setzero_si256();
            let (mut q4, mut qh, mut q8) = (wb.as_ptr(), wb.as_ptr().add(128), ab.as_ptr().add(4));
            for j in 0..2 {
                let b1 = load256(q4);
                let b2 = load256(q4.add(32));
                let bh = load256(qh);
                q4 = q4.add(64);
                qh = qh.add(32);
                let h0 = _mm256_slli_epi16::<4>(_mm256_and_si256(bh, m3));
                let h1 = _mm256_slli_epi16::<2>(_mm256_and_si256(bh, _mm256_set1_epi8(12)));
                let h2 = _mm256_and_si256(bh, _mm256_set1_epi8(48));
                let h3 = _mm256_srli_epi16::<2>(_mm256_and_si256(bh, _mm256_set1_epi8(-64)));
                let q0 = _mm256_or_si256(_mm256_and_si256(b1, m15), h0);
                let q1 = _mm256_or_si256(_mm256_and_si256(b2, m15), h1);
                let q2 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(b1), m15), h2);
                let q3 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(b2), m15), h3);
                let qs = [q0, q1, q2, q3];
                for (k, q) in qs.into_iter().enumerate() {
                    let p = _mm256_maddubs_epi16(q, load256(q8.add(32 * k)));
                    let sh = _mm_loadu_si128(SHUFFLE_Q6K[4 * j + k].as_ptr().cast());
                    let sc = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(scales, sh));
                    sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(sc, p));
                }
                q8 = q8.add(128);
            }
            let sumi = _mm256_sub_epi32(sumi, q8sclsub);
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
        }
    }
    hsum_f32x8(acc)
}

/// The 16 Q3_K scales (offset removed) as 16 i16: low 8 in the first array, high 8 in the second.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q3_k_scales(s: &[u8]) -> __m256i {
    const KMASK1: u32 = 0x0303_0303;
    const KMASK2: u32 = 0x0f0f_0f0f;
    let r = |o: usize| u32::from_le_bytes([s[o], s[o + 1], s[o + 2], s[o + 3]]);
    let aux = [r(0), r(4), r(8)];
    let s128 = _mm_set_epi32(
        (((aux[1] >> 4) & KMASK2) | (((aux[2] >> 6) & KMASK1) << 4)) as i32,
        (((aux[0] >> 4) & KMASK2) | (((aux[2] >> 4) & KMASK1) << 4)) as i32,
        ((aux[1] & KMASK2) | (((aux[2] >> 2) & KMASK1) << 4)) as i32,
        ((aux[0] & KMASK2) | ((aux[2] & KMASK1) << 4)) as i32,
    );
    _mm256_cvtepi8_epi16(_mm_sub_epi8(s128, _mm_set1_epi8(32)))
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn vec_dot_q3_k_q8_k(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let nb = n / 256;
    debug_assert!(w.len() >= nb * 110 && a.len() >= nb * Q8_K_BYTES);
    let m3 = _mm256_set1_epi8(3);
    let mut acc = _mm256_setzero_ps();
    for i in 0..nb {
        let wb = &w[i * 110..(i + 1) * 110];
        let ab = &a[i * Q8_K_BYTES..(i + 1) * Q8_K_BYTES];
        // SAFETY: `wb` and `ab` are whole blocks; every offset below is inside them.
        unsafe {
            let ad = ab.as_ptr().cast::<f32>().read_unaligned();
            let d = ad * f16_load(wb.as_ptr().add(108));
            let all = q3_k_scales(&wb[96..108]);
            let lo = _mm256_castsi256_si128(all);
            let hi = _mm256_extracti128_si256::<1>(all);
            let scales = [
                _mm256_inserti128_si256::<1>(_mm256_castsi128_si256(lo), lo),
                _mm256_inserti128_si256::<1>(_mm256_castsi128_si256(hi), hi),
            ];
            let hbits = load256(wb.as_ptr());
            let mut sumi = _mm256_setzero_si256();
            let (mut q3, mut q8) = (wb.as_ptr().add(32), ab.as_ptr().add(4));
            let mut bit = 0;
            for sc in scales {
                let bits = load256(q3);
                q3 = q3.add(32);
                for k in 0..4 {
                    let ql = _mm256_and_si256(_mm256_srl_epi16(bits, _mm_cvtsi32_si128(2 * k)), m3);
                    // 4 where the high bit is clear, else 0.
                    let m = _mm256_set1_epi8(1 << bit);
                    let qh = _mm256_andnot_si256(
                        _mm256_cmpeq_epi8(_mm256_and_si256(hbits, m), m),
                        _mm256_set1_epi8(4),
                    );
                    bit += 1;
                    let y = load256(q8.add(32 * k as usize));
                    let p =
                        _mm256_sub_epi16(_mm256_maddubs_epi16(ql, y), _mm256_maddubs_epi16(qh, y));
                    let s = _mm256_shuffle_epi8(sc, shuffle_const(&SHUFFLE_Q3K[k as usize]));
                    sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(s, p));
                }
                q8 = q8.add(128);
            }
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
        }
    }
    hsum_f32x8(acc)
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn vec_dot_q2_k_q8_k(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let nb = n / 256;
    debug_assert!(w.len() >= nb * 84 && a.len() >= nb * Q8_K_BYTES);
    let m3 = _mm256_set1_epi8(3);
    let m4 = _mm_set1_epi8(0x0f);
    let mut acc = _mm256_setzero_ps();
    for i in 0..nb {
        let wb = &w[i * 84..(i + 1) * 84];
        let ab = &a[i * Q8_K_BYTES..(i + 1) * Q8_K_BYTES];
        // SAFETY: `wb` and `ab` are whole blocks; every offset below is inside them.
        unsafe {
            let ad = ab.as_ptr().cast::<f32>().read_unaligned();
            let d = ad * f16_load(wb.as_ptr().add(80));
            let dmin = -ad * f16_load(wb.as_ptr().add(82));
            let ms = load128(wb.as_ptr());
            let scales8 = _mm_and_si128(ms, m4);
            let mins8 = _mm_and_si128(_mm_srli_epi16::<4>(ms), m4);
            let prod =
                _mm256_madd_epi16(_mm256_cvtepi8_epi16(mins8), load256(ab.as_ptr().add(260)));
            acc = _mm256_fmadd_ps(_mm256_set1_ps(dmin), _mm256_cvtepi32_ps(prod), acc);
            let all = _mm256_cvtepi8_epi16(scales8);
            let lo = _mm256_castsi256_si128(all);
            let hi = _mm256_extracti128_si256::<1>(all);
            let scales = [
                _mm256_inserti128_si256::<1>(_mm256_castsi128_si256(lo), lo),
                _mm256_inserti128_si256::<1>(_mm256_castsi128_si256(hi), hi),
            ];
            let mut sumi = _mm256_setzero_si256();
            let (mut q2, mut q8) = (wb.as_ptr().add(16), ab.as_ptr().add(4));
            for sc in scales {
                let bits = load256(q2);
                q2 = q2.add(32);
                for k in 0..4 {
                    let q = _mm256_and_si256(_mm256_srl_epi16(bits, _mm_cvtsi32_si128(2 * k)), m3);
                    let p = _mm256_maddubs_epi16(q, load256(q8.add(32 * k as usize)));
                    let s = _mm256_shuffle_epi8(sc, shuffle_const(&SHUFFLE_Q3K[k as usize]));
                    sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(s, p));
                }
                q8 = q8.add(128);
            }
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
        }
    }
    hsum_f32x8(acc)
}

/// F16 · F16 with F16C conversion and four 8-lane FMA accumulators (ggml's `GGML_F16_STEP` = 32).
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn vec_dot_f16(n: usize, w: &[u8], a: &[u8]) -> f32 {
    debug_assert!(w.len() >= 2 * n && a.len() >= 2 * n);
    let (wp, ap) = (w.as_ptr(), a.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    // SAFETY (all blocks below): indices stay below `n` f16 values of both inputs.
    while i + 32 <= n {
        for (k, acc) in acc.iter_mut().enumerate() {
            unsafe {
                let x = _mm256_cvtph_ps(load128(wp.add(2 * (i + 8 * k))));
                let y = _mm256_cvtph_ps(load128(ap.add(2 * (i + 8 * k))));
                *acc = _mm256_fmadd_ps(x, y, *acc);
            }
        }
        i += 32;
    }
    while i + 8 <= n {
        unsafe {
            let x = _mm256_cvtph_ps(load128(wp.add(2 * i)));
            let y = _mm256_cvtph_ps(load128(ap.add(2 * i)));
            acc[0] = _mm256_fmadd_ps(x, y, acc[0]);
        }
        i += 8;
    }
    let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let mut sum = hsum_f32x8(s);
    while i < n {
        unsafe {
            sum += f16_load(wp.add(2 * i)) * f16_load(ap.add(2 * i));
        }
        i += 1;
    }
    sum
}

/// 8 bf16 at `p` widened to f32 (a shift into the high half of each lane).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn bf16x8(p: *const u8) -> __m256 {
    // SAFETY: 16 readable bytes, forwarded.
    let v = unsafe { load128(p) };
    _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(v)))
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn vec_dot_bf16(n: usize, w: &[u8], a: &[u8]) -> f32 {
    debug_assert!(w.len() >= 2 * n && a.len() >= 2 * n);
    let (wp, ap) = (w.as_ptr(), a.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    // SAFETY (all blocks below): indices stay below `n` bf16 values of both inputs.
    while i + 32 <= n {
        for (k, acc) in acc.iter_mut().enumerate() {
            unsafe {
                let x = bf16x8(wp.add(2 * (i + 8 * k)));
                let y = bf16x8(ap.add(2 * (i + 8 * k)));
                *acc = _mm256_fmadd_ps(x, y, *acc);
            }
        }
        i += 32;
    }
    while i + 8 <= n {
        unsafe {
            acc[0] = _mm256_fmadd_ps(bf16x8(wp.add(2 * i)), bf16x8(ap.add(2 * i)), acc[0]);
        }
        i += 8;
    }
    let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let mut sum = hsum_f32x8(s);
    let bf = |p: *const u8| {
        // SAFETY: index below `n`.
        f32::from_bits(u32::from(unsafe { p.cast::<u16>().read_unaligned() }) << 16)
    };
    while i < n {
        sum += bf(wp.wrapping_add(2 * i)) * bf(ap.wrapping_add(2 * i));
        i += 1;
    }
    sum
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn vec_dot_f32(n: usize, w: &[u8], a: &[u8]) -> f32 {
    debug_assert!(w.len() >= 4 * n && a.len() >= 4 * n);
    let (wp, ap) = (w.as_ptr().cast::<f32>(), a.as_ptr().cast::<f32>());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    // SAFETY (all blocks below): indices stay below `n` f32 values of both inputs; loads are unaligned.
    while i + 32 <= n {
        for (k, acc) in acc.iter_mut().enumerate() {
            unsafe {
                let x = _mm256_loadu_ps(wp.add(i + 8 * k));
                let y = _mm256_loadu_ps(ap.add(i + 8 * k));
                *acc = _mm256_fmadd_ps(x, y, *acc);
            }
        }
        i += 32;
    }
    while i + 8 <= n {
        unsafe {
            acc[0] = _mm256_fmadd_ps(
                _mm256_loadu_ps(wp.add(i)),
                _mm256_loadu_ps(ap.add(i)),
                acc[0],
            );
        }
        i += 8;
    }
    let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let mut sum = hsum_f32x8(s);
    while i < n {
        // SAFETY: index below `n`.
        unsafe { sum += wp.add(i).read_unaligned() * ap.add(i).read_unaligned() };
        i += 1;
    }
    sum
}

/// `acc[i] += s * v[i]` for f16 `v`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn axpy_f16(acc: &mut [f32], v: &[u8], s: f32) {
    let n = acc.len();
    debug_assert!(v.len() >= 2 * n);
    let (ap, vp) = (acc.as_mut_ptr(), v.as_ptr());
    let sv = _mm256_set1_ps(s);
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: indices below `n` for both.
        unsafe {
            let x = _mm256_cvtph_ps(load128(vp.add(2 * i)));
            let y = _mm256_loadu_ps(ap.add(i));
            _mm256_storeu_ps(ap.add(i), _mm256_fmadd_ps(x, sv, y));
        }
        i += 8;
    }
    while i < n {
        // SAFETY: as above.
        unsafe { *ap.add(i) += s * f16_load(vp.add(2 * i)) };
        i += 1;
    }
}
