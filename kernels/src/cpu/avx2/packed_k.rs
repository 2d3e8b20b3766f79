//! AVX2 tiles for 16-row interleaved Q4_K and Q6_K (layouts in `cpu::packed`), against Q8_K activations,
//! for AVX2-only servers (Haswell / Broadwell, Zen 2 / 3). They read the records the AVX-512 VNNI tiles
//! read, so a level's packing is shared; without `vpdpbusd` the 4-element word dot is ggml's AVX2 pair
//! `vpmaddubsw` (u8 × i8 → i16 pairs, one 32-bit lane per row) then `vpmaddwd` by the row's scale as an
//! i16 pair, which applies the scale and widens to i32 in one op (no `vpmulld`). A ymm holds 8 rows, so
//! each tile runs a 16-row group as two halves: rows 0..8 are bytes 0..32 of every 64-byte chunk, rows
//! 8..16 bytes 32..64, and the f16 `d` / `dmin` of rows 8..16 start 16 bytes into their arrays.
//!
//! Q4_K: `Σ = d·da·Σ_j sc_j·Σ q·a − dmin·da·Σ_j m_j·bs_j`. A sub-block's 8 words of nibbles (0..15) are
//! summed in i16 before its scale is applied: `8 · 2 · 15 · 128 = 30720` cannot overflow. The high
//! nibbles are shifted down, since the AVX-512 tile's ×16 trick would overflow i16. The mins term is
//! `vpmaddwd` of `(m, m')` pairs with the aux sub-block sum pairs.
//! Q6_K: `Σ = d·da·Σ_g sc_g·(Σ q·a − 32·bs_g)`. 6-bit quants (0..63) allow only two words per i16 sum
//! (`2 · 2 · 63 · 128 = 32256`) before `vpmaddwd` by the sign-extended group scale; the `−32·Σ_g sc_g·bs_g`
//! correction is `vpmaddwd` of `(sc_g, sc_g+1)` pairs with the Q8_K block's own `bsums`, shifted by 5.
//!
//! Every tile keeps its integer sums exact and runs the same float operations per token for any `T`, so a
//! token's result does not depend on the batch it was in (the server batches unrelated requests).
//!
//! # Safety
//! Needs AVX2, FMA and F16C; the pointer contract is `GroupTileFn`'s in `packed`.

// Tiles index (half, token) accumulator grids; index loops over the const extents read better.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use crate::cpu::layout::Q8_K_BYTES;
use crate::cpu::packed::{GroupTileFn, Q4K_QS, Q4K_SCALES, Q6K_QL, Q6K_SCALES, T_TILE};
use crate::quant::GgmlType;

use super::packed::{load, store_group as store, word};

/// `aux` words per (token, super-block). Q4_K: `d`, then the sub-block activation sums as i16 pairs
/// `(bs_0, bs_2)`, `(bs_1, bs_3)`, `(bs_4, bs_6)`, `(bs_5, bs_7)`, the order the tile unpacks the mins in
/// (the AVX-512 tiles' format). Q6_K: none, its tile reads `d` and the 16 `bsums` straight from the Q8_K
/// block, whose adjacent i16 sums already are the pairs `vpmaddwd` wants.
pub(crate) const Q4K_AUX: usize = 5;
pub(crate) const Q6K_AUX: usize = 0;
const Q4K_REC: usize = Q4K_QS + 2048;
const Q6K_REC: usize = Q6K_QL + 3072;
/// Offset of the 16 i16 `bsums` in a Q8_K block.
const Q8K_BSUMS: usize = 260;

/// 8 f16 at `p` as f32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load_f16x8(p: *const u8) -> __m256 {
    // SAFETY: the caller guarantees 16 readable bytes.
    _mm256_cvtph_ps(unsafe { _mm_loadu_si128(p.cast()) })
}

/// 8 i8 at `p`, each sign-extended into both i16 halves of its row's lane.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn i8_pairs(p: *const u8) -> __m256i {
    // SAFETY: the caller guarantees 8 readable bytes.
    let s = unsafe { _mm_loadl_epi64(p.cast()) };
    _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(s, s))
}

/// Prefetches byte `off` of the record after the one at `r`: a 1-token Q4_K tile streams each record
/// once, and the AVX-512 tile measured 1.6× the matvec throughput with this one-record-ahead prefetch
/// (see there).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn prefetch_next(r: *const u8, off: usize) {
    // Wrapping arithmetic: past the last record the address is never dereferenced (a prefetch cannot
    // fault), so it need not lie inside the matrix.
    _mm_prefetch::<_MM_HINT_T0>(r.wrapping_add(Q4K_REC + off).cast());
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
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
    let m4 = _mm256_set1_epi8(0x0f);
    let m6 = _mm256_set1_epi8(0x3f);
    let m30 = _mm256_set1_epi8(0x30);
    let lo16 = _mm256_set1_epi32(0x00ff_00ff);
    // `vpshufb` controls that put byte `k` of every row's word into both i16 halves of the row's lane
    // (indices are per 128-bit lane, 4 rows each).
    let lane_words = _mm256_set_epi32(
        0x000c_000c,
        0x0008_0008,
        0x0004_0004,
        0,
        0x000c_000c,
        0x0008_0008,
        0x0004_0004,
        0,
    );
    let pick: [__m256i; 4] = std::array::from_fn(|k| {
        _mm256_add_epi32(
            lane_words,
            _mm256_set1_epi32((0x8000_8000_u32 + 0x0001_0001 * k as u32) as i32),
        )
    });
    let mut acc = [[_mm256_setzero_ps(); T]; 2];
    for b in 0..nb {
        // SAFETY: record `b`, activation block `b` and its aux words exist for every token (caller
        // contract); offsets below stay inside them (`o` picks a 32-byte half of 64-byte chunks).
        unsafe {
            let r = w.add(b * Q4K_REC);
            let at: [*const u8; T] =
                std::array::from_fn(|t| a.add(t * a_stride + b * Q8_K_BYTES + 4));
            let xt: [*const u32; T] = std::array::from_fn(|t| aux.add((t * nb + b) * Q4K_AUX));
            for half in 0..2 {
                let o = 32 * half;
                // `get_scale_min_k4` for 8 rows: bytes 0..4 of each word are sub-blocks 0..4 (`*_a`) or
                // 4..8 (`*_b`).
                let (w0, w1, w2) = (
                    load(r.add(Q4K_SCALES + o)),
                    load(r.add(Q4K_SCALES + 64 + o)),
                    load(r.add(Q4K_SCALES + 128 + o)),
                );
                let sc_a = _mm256_and_si256(w0, m6);
                let sc_b = _mm256_or_si256(
                    _mm256_and_si256(w2, m4),
                    _mm256_and_si256(_mm256_srli_epi16::<2>(w0), m30),
                );
                let mn_a = _mm256_and_si256(w1, m6);
                let mn_b = _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16::<4>(w2), m4),
                    _mm256_and_si256(_mm256_srli_epi16::<2>(w1), m30),
                );
                let mut sumi = [_mm256_setzero_si256(); T];
                for i in 0..4 {
                    if T == 1 && half == 0 {
                        prefetch_next(r, 64 * i);
                    }
                    let src = if i < 2 { sc_a } else { sc_b };
                    let sc_lo = _mm256_shuffle_epi8(src, pick[2 * (i % 2)]);
                    let sc_hi = _mm256_shuffle_epi8(src, pick[2 * (i % 2) + 1]);
                    // Tokens innermost: a weight load and its nibble split serve every token, and the
                    // 2·T i16 sums plus the chunk's temporaries fit the 16 ymm registers for T = 4
                    // (token-outer, which keeps the 16 nibble vectors of a sub-block pair across the
                    // tokens, spilled them and measured ~1.6x slower at 16 tokens).
                    let mut s_lo = [_mm256_setzero_si256(); T];
                    let mut s_hi = [_mm256_setzero_si256(); T];
                    for c in 0..8 {
                        if T == 1 && half == 0 {
                            prefetch_next(r, Q4K_QS + 64 * (8 * i + c));
                        }
                        let v = load(r.add(Q4K_QS + 64 * (8 * i + c) + o));
                        let lo = _mm256_and_si256(v, m4);
                        let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), m4);
                        for t in 0..T {
                            let p = at[t].add(64 * i + 4 * c);
                            s_lo[t] = _mm256_add_epi16(s_lo[t], _mm256_maddubs_epi16(lo, word(p)));
                            s_hi[t] = _mm256_add_epi16(
                                s_hi[t],
                                _mm256_maddubs_epi16(hi, word(p.add(32))),
                            );
                        }
                    }
                    for t in 0..T {
                        let s = _mm256_add_epi32(
                            _mm256_madd_epi16(s_lo[t], sc_lo),
                            _mm256_madd_epi16(s_hi[t], sc_hi),
                        );
                        sumi[t] = _mm256_add_epi32(sumi[t], s);
                    }
                }
                // i16 pairs (m0, m2), (m1, m3), (m4, m6), (m5, m7), as `fill_aux` pairs the sums.
                let mins = [
                    _mm256_and_si256(mn_a, lo16),
                    _mm256_and_si256(_mm256_srli_epi32::<8>(mn_a), lo16),
                    _mm256_and_si256(mn_b, lo16),
                    _mm256_and_si256(_mm256_srli_epi32::<8>(mn_b), lo16),
                ];
                let d = load_f16x8(r.add(16 * half));
                let dmin = load_f16x8(r.add(32 + 16 * half));
                for t in 0..T {
                    let mut ms = _mm256_setzero_si256();
                    for k in 0..4 {
                        let pair = _mm256_set1_epi32(*xt[t].add(1 + k) as i32);
                        ms = _mm256_add_epi32(ms, _mm256_madd_epi16(mins[k], pair));
                    }
                    let da = _mm256_set1_ps(f32::from_bits(*xt[t]));
                    let v = &mut acc[half][t];
                    *v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sumi[t]), _mm256_mul_ps(d, da), *v);
                    *v = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(ms), _mm256_mul_ps(dmin, da), *v);
                }
            }
        }
    }
    // SAFETY: forwarded contract (the first `valid` outputs of each token row are writable).
    unsafe { store(acc, out, out_stride, valid) };
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn q6_k_tile<const T: usize>(
    nb: usize,
    w: *const u8,
    a: *const u8,
    a_stride: usize,
    _aux: *const u32,
    out: *mut f32,
    out_stride: usize,
    valid: usize,
) {
    let m4 = _mm256_set1_epi8(0x0f);
    let m30 = _mm256_set1_epi8(0x30);
    let mut acc = [[_mm256_setzero_ps(); T]; 2];
    for b in 0..nb {
        // SAFETY: record `b` and activation block `b` exist for every token (caller contract); offsets
        // below stay inside them (`o` picks a 32-byte half of 64-byte chunks, `8 * half` of 16 scales).
        unsafe {
            let r = w.add(b * Q6K_REC);
            let blk: [*const u8; T] = std::array::from_fn(|t| a.add(t * a_stride + b * Q8_K_BYTES));
            for half in 0..2 {
                let o = 32 * half;
                let scale = |g: usize| r.add(Q6K_SCALES + 16 * g + 8 * half);
                let mut sumi = [_mm256_setzero_si256(); T];
                for h in 0..2 {
                    for quarter in 0..2 {
                        // Groups of elements l, l+32, l+64, l+96 for l in this 16-wide quarter.
                        let sc: [__m256i; 4] =
                            std::array::from_fn(|k| i8_pairs(scale(8 * h + 2 * k + quarter)));
                        for pp in 0..2 {
                            // Quants of the 4 groups at two 4-byte positions (their i16 sums fit), built
                            // once for all tokens; then one group at a time, so only T i16 sums live.
                            let mut q = [[_mm256_setzero_si256(); 2]; 4];
                            for j in 0..2 {
                                let l = 16 * quarter + 4 * (2 * pp + j);
                                let at_w = r.add(Q6K_QL + 192 * (8 * h + l / 4) + o);
                                let (va, vb, vh) =
                                    (load(at_w), load(at_w.add(64)), load(at_w.add(128)));
                                q[0][j] = _mm256_or_si256(
                                    _mm256_and_si256(va, m4),
                                    _mm256_and_si256(_mm256_slli_epi16::<4>(vh), m30),
                                );
                                q[1][j] = _mm256_or_si256(
                                    _mm256_and_si256(vb, m4),
                                    _mm256_and_si256(_mm256_slli_epi16::<2>(vh), m30),
                                );
                                q[2][j] = _mm256_or_si256(
                                    _mm256_and_si256(_mm256_srli_epi16::<4>(va), m4),
                                    _mm256_and_si256(vh, m30),
                                );
                                q[3][j] = _mm256_or_si256(
                                    _mm256_and_si256(_mm256_srli_epi16::<4>(vb), m4),
                                    _mm256_and_si256(_mm256_srli_epi16::<2>(vh), m30),
                                );
                            }
                            let l = 16 * quarter + 8 * pp;
                            for k in 0..4 {
                                let mut acc16 = [_mm256_setzero_si256(); T];
                                for j in 0..2 {
                                    for t in 0..T {
                                        let p = blk[t].add(4 + 128 * h + 32 * k + l + 4 * j);
                                        acc16[t] = _mm256_add_epi16(
                                            acc16[t],
                                            _mm256_maddubs_epi16(q[k][j], word(p)),
                                        );
                                    }
                                }
                                for t in 0..T {
                                    sumi[t] = _mm256_add_epi32(
                                        sumi[t],
                                        _mm256_madd_epi16(acc16[t], sc[k]),
                                    );
                                }
                            }
                        }
                    }
                }
                // (sc_g, sc_g+1) per row for the −32·Σ_g sc_g·bs_g correction.
                let sc_pairs: [__m256i; 8] = std::array::from_fn(|j| {
                    let (s0, s1) = (
                        _mm_loadl_epi64(scale(2 * j).cast()),
                        _mm_loadl_epi64(scale(2 * j + 1).cast()),
                    );
                    _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(s0, s1))
                });
                let d = load_f16x8(r.add(16 * half));
                for t in 0..T {
                    let mut corr = _mm256_setzero_si256();
                    for j in 0..8 {
                        let bs = word(blk[t].add(Q8K_BSUMS + 4 * j));
                        corr = _mm256_add_epi32(corr, _mm256_madd_epi16(sc_pairs[j], bs));
                    }
                    let s = _mm256_sub_epi32(sumi[t], _mm256_slli_epi32::<5>(corr));
                    let da = _mm256_set1_ps(blk[t].cast::<f32>().read_unaligned());
                    let v = &mut acc[half][t];
                    *v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(d, da), *v);
                }
            }
        }
    }
    // SAFETY: forwarded contract (the first `valid` outputs of each token row are writable).
    unsafe { store(acc, out, out_stride, valid) };
}

/// The level's tiles of 1, 2, 3 and `T_TILE` tokens (the `by_tokens` of a tile table), each a
/// `target_feature` wrapper of the generic tile.
macro_rules! tiles {
    ($($name:ident: $kind:tt;)*) => {$(
        pub(crate) const $name: [GroupTileFn; T_TILE] = {
            /// # Safety
            /// AVX2, FMA and F16C are available; pointer contract of `packed::GroupTileFn`.
            #[target_feature(enable = "avx2,fma,f16c")]
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

/// Fills the per (token, super-block) words of [`Q4K_AUX`] (Q6_K has none). A `FillAuxFn`.
pub(crate) fn fill_aux(
    ty: GgmlType,
    act: &[u8],
    n_tokens: usize,
    stride: usize,
    _nb: usize,
    aux: &mut Vec<u32>,
) {
    aux.clear();
    if ty == GgmlType::Q6_K {
        return;
    }
    for t in 0..n_tokens {
        for blk in act[t * stride..(t + 1) * stride].chunks_exact(Q8_K_BYTES) {
            aux.push(u32::from_le_bytes([blk[0], blk[1], blk[2], blk[3]]));
            let bs = |g: usize| {
                let at = Q8K_BSUMS + 2 * g;
                i32::from(i16::from_le_bytes([blk[at], blk[at + 1]]))
            };
            // At most 32 · 128 in magnitude: fits an i16.
            let sub = |j: usize| (bs(2 * j) + bs(2 * j + 1)) as u16;
            for (j0, j1) in [(0, 2), (1, 3), (4, 6), (5, 7)] {
                aux.push(u32::from(sub(j0)) | (u32::from(sub(j1)) << 16));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::cpu::{Isa, Kernels, Pool, QMatrix, Scratch, VecDotType};
    use crate::quant::GgmlType;

    /// xorshift64 bytes.
    fn bytes(state: &mut u64, n: usize) -> Vec<u8> {
        (0..n)
            .map(|_| {
                *state ^= *state << 13;
                *state ^= *state >> 7;
                *state ^= *state << 17;
                (*state >> 24) as u8
            })
            .collect()
    }

    /// Random k-quant rows: every quant, scale and min byte random (the extremes the i16 sums must
    /// survive), `d` and `dmin` finite.
    fn random_rows(ty: GgmlType, rows: usize, cols: usize, state: &mut u64) -> Vec<u8> {
        let mut data = bytes(state, rows * ty.bytes_for(cols).expect("size"));
        let (bb, d_at): (usize, &[usize]) = match ty {
            GgmlType::Q4_K => (144, &[0, 2]),
            _ => (210, &[208]),
        };
        for (i, blk) in data.chunks_exact_mut(bb).enumerate() {
            for &at in d_at {
                let d = half::f16::from_f32(0.001 * (1 + (i * 7 + at) % 13) as f32);
                blk[at..at + 2].copy_from_slice(&d.to_le_bytes());
            }
        }
        data
    }

    /// A token's outputs are bit-identical through the 1-token and the 4-token tile, and close to the
    /// scalar dot on weights with extreme quants and scales.
    #[test]
    fn one_and_four_token_tiles_agree_bitwise() {
        let Some(k) = Kernels::for_isa(Isa::Avx2) else {
            return;
        };
        let scalar = Kernels::for_isa(Isa::Scalar).expect("scalar");
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let pool = Pool::new(1);
        let mut s = Scratch::new();
        for ty in [GgmlType::Q4_K, GgmlType::Q6_K] {
            for (rows, cols) in [(16, 256), (37, 512), (9, 768)] {
                let data = random_rows(ty, rows, cols, &mut state);
                let m = QMatrix::new(ty, rows, cols, &data).expect("matrix");
                let p = k.pack(&m).expect("pack");
                assert!(p.is_interleaved(), "{ty:?}");
                let n = 5;
                let x: Vec<f32> = bytes(&mut state, n * cols)
                    .into_iter()
                    .map(|b| (f32::from(b) - 127.5) / 32.0)
                    .collect();
                let mut batch = vec![f32::NAN; n * rows];
                k.matmul_packed(&pool, &p, &x, n, &mut batch, &mut s)
                    .expect("batch");
                let vt = VecDotType::of(ty);
                for t in 0..n {
                    let xt = &x[t * cols..(t + 1) * cols];
                    let mut one = vec![f32::NAN; rows];
                    k.matmul_packed(&pool, &p, xt, 1, &mut one, &mut s)
                        .expect("one");
                    let got = &batch[t * rows..(t + 1) * rows];
                    assert_eq!(
                        got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        one.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        "{ty:?} {rows}x{cols} token {t}"
                    );
                    let mut act = vec![0u8; vt.bytes_for(cols)];
                    scalar
                        .quantize_activations(vt, xt, &mut act)
                        .expect("quantize");
                    for r in 0..rows {
                        let want = scalar
                            .vec_dot(ty, cols, m.row(r).expect("row"), &act)
                            .expect("dot");
                        let tol = 1e-4 * want.abs().max(1.0);
                        assert!(
                            (got[r] - want).abs() <= tol,
                            "{ty:?} {rows}x{cols} t={t} r={r}: {} vs scalar {want}",
                            got[r]
                        );
                    }
                }
            }
        }
    }

    /// Rough timing of packed vs per-row AVX2 matmul: `cargo test -p tessera-kernels --release --
    /// --ignored avx2_packed_k_timing --nocapture`.
    #[test]
    #[ignore]
    fn avx2_packed_k_timing() {
        let Some(k) = Kernels::for_isa(Isa::Avx2) else {
            return;
        };
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let pool = Pool::new(1);
        let mut s = Scratch::new();
        let (rows, cols) = (2048, 2048);
        for ty in [GgmlType::Q4_K, GgmlType::Q6_K] {
            let data = random_rows(ty, rows, cols, &mut state);
            let m = QMatrix::new(ty, rows, cols, &data).expect("matrix");
            let p = k.pack(&m).expect("pack");
            for n in [1, 16] {
                let x: Vec<f32> = bytes(&mut state, n * cols)
                    .into_iter()
                    .map(|b| (f32::from(b) - 127.5) / 32.0)
                    .collect();
                let mut y = vec![0.0; n * rows];
                let reps = if n == 1 { 200 } else { 20 };
                let mut time = |packed: bool| {
                    let t0 = std::time::Instant::now();
                    for _ in 0..reps {
                        if packed {
                            k.matmul_packed(&pool, &p, &x, n, &mut y, &mut s)
                        } else {
                            k.matmul(&pool, &m, &x, n, &mut y, &mut s)
                        }
                        .expect("matmul");
                    }
                    t0.elapsed().as_secs_f64() / reps as f64 * 1e6
                };
                let (rowwise, packed) = (time(false), time(true));
                println!(
                    "{ty:?} {rows}x{cols} n={n}: per-row {rowwise:.0} us, packed {packed:.0} us ({:.2}x)",
                    rowwise / packed
                );
            }
        }
    }
}
