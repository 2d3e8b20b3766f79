//! AVX-512 VNNI tiles for 16-row interleaved Q4_K and Q6_K (layouts in `cpu::packed`), against Q8_K
//! activations: `vpdpbusd` per 4-element word with one lane per row, sub-block sums times the unpacked
//! per-row scales (`vpmulld`), and per super-block one convert / scale / FMA per token.
//!
//! Q4_K: `Σ = d·da·Σ_j sc_j·Σ q·a − dmin·da·Σ_j m_j·bs_j` with `bs_j` the activation sum of sub-block `j`
//! (pairs of Q8_K `bsums`, prepared per call in `aux`), the second sum by `vpdpwssd` on i16 pairs. The
//! 6-bit scales and mins stay packed in the record and are unpacked for 16 rows at once per super-block.
//! Q6_K: `Σ = d·da·Σ_g sc_g·(Σ q·a − 32·bs_g)`; each group's integer accumulator starts at `−32·bs_g`.
//!
//! # Safety
//! Needs AVX-512 F/BW/VL/DQ + VNNI; the pointer contract is `group_tile`'s in `packed`.

// Tiles index (token, group) accumulator grids; index loops over the const extents read better.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use crate::cpu::layout::Q8_K_BYTES;
use crate::cpu::packed::{GroupTileFn, Q4K_QS, Q4K_SCALES, Q6K_QL, Q6K_SCALES, T_TILE};
use crate::quant::GgmlType;

/// `aux` words per (token, super-block): Q4_K `d` + 4 sub-block sum pairs, Q6_K `d` + 16 `−32·bs_g`.
pub(crate) const Q4K_AUX: usize = 5;
pub(crate) const Q6K_AUX: usize = 17;
const Q4K_REC: usize = Q4K_QS + 2048;
const Q6K_REC: usize = Q6K_QL + 3072;

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,avx512vnni")]
unsafe fn word(p: *const u8) -> __m512i {
    // SAFETY: the caller guarantees 4 readable bytes.
    _mm512_set1_epi32(unsafe { p.cast::<i32>().read_unaligned() })
}

/// Prefetches byte `off` of the record after the one at `r`. Decode streams each Q4_K record once and
/// its loads (which the compiler interleaves across sub-blocks) leave the hardware prefetcher behind:
/// on the 2-core Zen 4 VM, one record (2304 bytes) ahead into L1 measured 1.6x the matvec throughput
/// of none, two records ahead gained nothing, and the same prefetch in the Q6_K tile (already at the
/// read bandwidth) made it slower.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,avx512vnni")]
fn prefetch_next(r: *const u8, off: usize) {
    // Wrapping arithmetic: past the last record the address is never dereferenced (a prefetch cannot
    // fault), so it need not lie inside the matrix.
    _mm_prefetch::<_MM_HINT_T0>(r.wrapping_add(Q4K_REC + off).cast());
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,avx512vnni")]
unsafe fn load(p: *const u8) -> __m512i {
    // SAFETY: the caller guarantees 64 readable bytes.
    unsafe { _mm512_loadu_si512(p.cast()) }
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,avx512vnni")]
#[allow(clippy::too_many_arguments)]
unsafe fn q4_k_tile<const T: usize>(
    nb: usize,
    w: *const u8,
    a: *const u8,
    a_stride: usize,
    aux: *const u32,
    out: *mut f32,
    out_stride: usize,
    valid: usize,
) {
    let m4 = _mm512_set1_epi8(0x0f);
    let m6 = _mm512_set1_epi8(0x3f);
    let m30 = _mm512_set1_epi8(0x30);
    let lo16 = _mm512_set1_epi32(0x00ff_00ff);
    // `vpshufb` controls that zero-extend byte `k` of every word (indices are per 128-bit lane).
    let lane_words = _mm512_set_epi32(12, 8, 4, 0, 12, 8, 4, 0, 12, 8, 4, 0, 12, 8, 4, 0);
    let pick: [__m512i; 4] = std::array::from_fn(|k| {
        _mm512_add_epi32(
            lane_words,
            _mm512_set1_epi32(0x8080_8080_u32 as i32 - 0x80 + k as i32),
        )
    });
    let mut acc = [_mm512_setzero_ps(); T];
    for b in 0..nb {
        // SAFETY: record `b`, activation block `b` and its aux words exist for every token (caller
        // contract); offsets below stay inside them.
        unsafe {
            let r = w.add(b * Q4K_REC);
            let at: [*const u8; T] =
                std::array::from_fn(|t| a.add(t * a_stride + b * Q8_K_BYTES + 4));
            let xt: [*const u32; T] = std::array::from_fn(|t| aux.add((t * nb + b) * Q4K_AUX));
            // `get_scale_min_k4` for 16 rows: bytes 0..4 of each word are sub-blocks 0..4 (`*_a`) or
            // 4..8 (`*_b`).
            let (w0, w1, w2) = (
                load(r.add(Q4K_SCALES)),
                load(r.add(Q4K_SCALES + 64)),
                load(r.add(Q4K_SCALES + 128)),
            );
            let sc_a = _mm512_and_si512(w0, m6);
            let sc_b = _mm512_or_si512(
                _mm512_and_si512(w2, m4),
                _mm512_and_si512(_mm512_srli_epi16::<2>(w0), m30),
            );
            let mn_a = _mm512_and_si512(w1, m6);
            let mn_b = _mm512_or_si512(
                _mm512_and_si512(_mm512_srli_epi16::<4>(w2), m4),
                _mm512_and_si512(_mm512_srli_epi16::<2>(w1), m30),
            );
            let mut sumi = [_mm512_setzero_si512(); T];
            for i in 0..4 {
                if T == 1 {
                    prefetch_next(r, 64 * i);
                }
                let mut lo_s = [_mm512_setzero_si512(); T];
                let mut hi_s = [_mm512_setzero_si512(); T];
                for c in 0..8 {
                    if T == 1 {
                        prefetch_next(r, Q4K_QS + 64 * (8 * i + c));
                    }
                    let v = load(r.add(Q4K_QS + 64 * (8 * i + c)));
                    let lo = _mm512_and_si512(v, m4);
                    // 16 × the high nibble: saves the shift; the factor 16 moves onto the low
                    // nibbles' scale and `d / 16` below (exact: powers of two; the super-block sum
                    // stays below 256·240·128·63 < 2^31).
                    let hi = _mm512_andnot_si512(m4, v);
                    for t in 0..T {
                        lo_s[t] = _mm512_dpbusd_epi32(lo_s[t], lo, word(at[t].add(64 * i + 4 * c)));
                        hi_s[t] =
                            _mm512_dpbusd_epi32(hi_s[t], hi, word(at[t].add(64 * i + 32 + 4 * c)));
                    }
                }
                let src = if i < 2 { sc_a } else { sc_b };
                let sc_lo = _mm512_slli_epi32::<4>(_mm512_shuffle_epi8(src, pick[2 * (i % 2)]));
                let sc_hi = _mm512_shuffle_epi8(src, pick[2 * (i % 2) + 1]);
                for t in 0..T {
                    let s = _mm512_add_epi32(
                        _mm512_mullo_epi32(lo_s[t], sc_lo),
                        _mm512_mullo_epi32(hi_s[t], sc_hi),
                    );
                    sumi[t] = _mm512_add_epi32(sumi[t], s);
                }
            }
            // i16 pairs (m0, m2), (m1, m3), (m4, m6), (m5, m7), as `fill_aux` pairs the sums.
            let mins = [
                _mm512_and_si512(mn_a, lo16),
                _mm512_and_si512(_mm512_srli_epi32::<8>(mn_a), lo16),
                _mm512_and_si512(mn_b, lo16),
                _mm512_and_si512(_mm512_srli_epi32::<8>(mn_b), lo16),
            ];
            let d = _mm512_mul_ps(
                _mm512_cvtph_ps(_mm256_loadu_si256(r.cast())),
                _mm512_set1_ps(1.0 / 16.0),
            );
            let dmin = _mm512_cvtph_ps(_mm256_loadu_si256(r.add(32).cast()));
            for t in 0..T {
                let mut ms = _mm512_setzero_si512();
                for k in 0..4 {
                    let pair = _mm512_set1_epi32(*xt[t].add(1 + k) as i32);
                    ms = _mm512_dpwssd_epi32(ms, mins[k], pair);
                }
                let da = _mm512_set1_ps(f32::from_bits(*xt[t]));
                acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sumi[t]), _mm512_mul_ps(d, da), acc[t]);
                acc[t] = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(ms), _mm512_mul_ps(dmin, da), acc[t]);
            }
        }
    }
    store(acc, out, out_stride, valid);
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,avx512vnni")]
#[allow(clippy::too_many_arguments)]
unsafe fn q6_k_tile<const T: usize>(
    nb: usize,
    w: *const u8,
    a: *const u8,
    a_stride: usize,
    aux: *const u32,
    out: *mut f32,
    out_stride: usize,
    valid: usize,
) {
    let m4 = _mm512_set1_epi8(0x0f);
    let m30 = _mm512_set1_epi8(0x30);
    let mut acc = [_mm512_setzero_ps(); T];
    for b in 0..nb {
        // SAFETY: as in `q4_k_tile`.
        unsafe {
            let r = w.add(b * Q6K_REC);
            let at: [*const u8; T] =
                std::array::from_fn(|t| a.add(t * a_stride + b * Q8_K_BYTES + 4));
            let xt: [*const u32; T] = std::array::from_fn(|t| aux.add((t * nb + b) * Q6K_AUX));
            let mut sumi = [_mm512_setzero_si512(); T];
            for h in 0..2 {
                for quarter in 0..2 {
                    // Groups of elements l, l+32, l+64, l+96 for l in this 16-wide quarter.
                    let groups = [0, 2, 4, 6].map(|k| 8 * h + k + quarter);
                    let mut gs = [[_mm512_setzero_si512(); 4]; T];
                    for t in 0..T {
                        for k in 0..4 {
                            gs[t][k] = _mm512_set1_epi32(*xt[t].add(1 + groups[k]) as i32);
                        }
                    }
                    for p in 0..4 {
                        let l = 16 * quarter + 4 * p;
                        let at_w = r.add(Q6K_QL + 192 * (8 * h + l / 4));
                        let (va, vb, vh) = (load(at_w), load(at_w.add(64)), load(at_w.add(128)));
                        let q = [
                            _mm512_or_si512(
                                _mm512_and_si512(va, m4),
                                _mm512_and_si512(_mm512_slli_epi16::<4>(vh), m30),
                            ),
                            _mm512_or_si512(
                                _mm512_and_si512(vb, m4),
                                _mm512_and_si512(_mm512_slli_epi16::<2>(vh), m30),
                            ),
                            _mm512_or_si512(
                                _mm512_and_si512(_mm512_srli_epi16::<4>(va), m4),
                                _mm512_and_si512(vh, m30),
                            ),
                            _mm512_or_si512(
                                _mm512_and_si512(_mm512_srli_epi16::<4>(vb), m4),
                                _mm512_and_si512(_mm512_srli_epi16::<2>(vh), m30),
                            ),
                        ];
                        for t in 0..T {
                            for k in 0..4 {
                                gs[t][k] = _mm512_dpbusd_epi32(
                                    gs[t][k],
                                    q[k],
                                    word(at[t].add(128 * h + 32 * k + l)),
                                );
                            }
                        }
                    }
                    for k in 0..4 {
                        let sc = _mm512_cvtepi8_epi32(_mm_loadu_si128(
                            r.add(Q6K_SCALES + 16 * groups[k]).cast(),
                        ));
                        for t in 0..T {
                            sumi[t] = _mm512_add_epi32(sumi[t], _mm512_mullo_epi32(gs[t][k], sc));
                        }
                    }
                }
            }
            let d = _mm512_cvtph_ps(_mm256_loadu_si256(r.cast()));
            for t in 0..T {
                let da = _mm512_set1_ps(f32::from_bits(*xt[t]));
                acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sumi[t]), _mm512_mul_ps(d, da), acc[t]);
            }
        }
    }
    store(acc, out, out_stride, valid);
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,avx512vnni")]
fn store<const T: usize>(acc: [__m512; T], out: *mut f32, out_stride: usize, valid: usize) {
    let k: __mmask16 = if valid >= 16 {
        0xffff
    } else {
        (1u16 << valid) - 1
    };
    for (t, v) in acc.into_iter().enumerate() {
        // SAFETY: the caller guarantees the first `valid` outputs of each token row are writable.
        unsafe { _mm512_mask_storeu_ps(out.add(t * out_stride), k, v) };
    }
}

/// The level's tiles of 1, 2, 3 and `T_TILE` tokens (the `by_tokens` of a tile table), each a
/// `target_feature` wrapper of the generic tile.
macro_rules! tiles {
    ($($name:ident: $kind:tt;)*) => {$(
        pub(crate) const $name: [GroupTileFn; T_TILE] = {
            /// # Safety
            /// See `packed::GroupTileFn`.
            #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,avx512vnni")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn tile<const T: usize>(
                nb: usize, w: *const u8, a: *const u8, a_stride: usize, aux: *const u32, out: *mut f32,
                out_stride: usize, valid: usize,
            ) {
                // SAFETY: forwarded contract.
                unsafe { $kind::<T>(nb, w, a, a_stride, aux, out, out_stride, valid) }
            }
            [tile::<1>, tile::<2>, tile::<3>, tile::<4>]
        };
    )*};
}

tiles! {
    Q4K_TILES: q4_k_tile;
    Q6K_TILES: q6_k_tile;
}

/// Fills the per (token, super-block) words: `d`, then for Q4_K the 4 pairs `(bs_0, bs_2)`, `(bs_1, bs_3)`,
/// `(bs_4, bs_6)`, `(bs_5, bs_7)` of sub-block sums as i16 halves (the order the tile unpacks the mins in), for Q6_K `−32·bsums[g]` for the 16 groups.
/// A `FillAuxFn`.
pub(crate) fn fill_aux(
    ty: GgmlType,
    act: &[u8],
    n_tokens: usize,
    stride: usize,
    _nb: usize,
    aux: &mut Vec<u32>,
) {
    let q6 = ty == GgmlType::Q6_K;
    aux.clear();
    for t in 0..n_tokens {
        for blk in act[t * stride..(t + 1) * stride].chunks_exact(Q8_K_BYTES) {
            aux.push(u32::from_le_bytes([blk[0], blk[1], blk[2], blk[3]]));
            let bs = |g: usize| i32::from(i16::from_le_bytes([blk[260 + 2 * g], blk[261 + 2 * g]]));
            if q6 {
                aux.extend((0..16).map(|g| (-32 * bs(g)) as u32));
            } else {
                let sub = |j: usize| (bs(2 * j) + bs(2 * j + 1)) as u16;
                for (j0, j1) in [(0, 2), (1, 3), (4, 6), (5, 7)] {
                    aux.push(u32::from(sub(j0)) | (u32::from(sub(j1)) << 16));
                }
            }
        }
    }
}
