//! AVX-512 VNNI matmul over 16-row interleaved weights (layout in `cpu::packed`): per block, four or eight
//! 64-byte weight loads, `vpdpbusd` against broadcast 4-byte activation words (one lane per row), then one
//! convert / scale / FMA per token for all 16 rows. Per-block activation scales and `Σa` corrections are
//! computed once per call into scratch.
//!
//! # Safety
//! The `unsafe fn`s need AVX-512 F/BW/VL/DQ + VNNI (the table is built only after detecting them); the
//! pointer contracts are stated on each.

use std::arch::x86_64::*;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::cpu::isa::Kernels;
use crate::cpu::layout::VecDotType;
use crate::cpu::packed::{GROUP, check_io, record_layout};
use crate::cpu::{KernelError, Pool, Scratch};
use crate::quant::GgmlType;

use super::{SharedOut, packed_k};

const Q4_0: u8 = 0;
const Q4_1: u8 = 1;
const Q8_0: u8 = 2;

/// Tokens per tile.
const T_TILE: usize = 4;

/// The 4 activation bytes at `p` broadcast to every lane.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,avx512vnni")]
unsafe fn word(p: *const u8) -> __m512i {
    // SAFETY: the caller guarantees 4 readable bytes.
    _mm512_set1_epi32(unsafe { p.cast::<i32>().read_unaligned() })
}

/// One 16-row group × `T` tokens. `w`: the group's records (`nb` of `rec` bytes); `a`: token 0's activation
/// row, tokens `a_stride` bytes apart; `aux`: token 0's `(d, bias-or-s)` pairs for its `nb` blocks, tokens
/// `2 * nb` words apart; `out`: `y` at (token 0, the group's first row), tokens `out_stride` floats apart,
/// of which the first `valid` rows are written.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,avx512vnni")]
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
unsafe fn group_tile<const KIND: u8, const T: usize>(
    nb: usize,
    w: *const u8,
    a: *const u8,
    a_stride: usize,
    aux: *const u32,
    out: *mut f32,
    out_stride: usize,
    valid: usize,
) {
    let (head, rec) = match KIND {
        Q4_0 => (32, 288),
        Q4_1 => (64, 320),
        _ => (32, 544),
    };
    let (ab, qs) = if KIND == Q4_1 { (36, 4) } else { (34, 2) };
    let m4 = _mm512_set1_epi8(0x0f);
    let mut acc = [_mm512_setzero_ps(); T];
    for b in 0..nb {
        // SAFETY: record `b` of the group, block `b` of each token's activations and aux entries exist
        // (caller contract); every offset below stays inside them.
        unsafe {
            let r = w.add(b * rec);
            let dw = _mm512_cvtph_ps(_mm256_loadu_si256(r.cast()));
            let mut isum = [_mm512_setzero_si512(); T];
            let mut isum2 = [_mm512_setzero_si512(); T];
            let at: [*const u8; T] = std::array::from_fn(|t| a.add(t * a_stride + b * ab + qs));
            let xt: [*const u32; T] = std::array::from_fn(|t| aux.add(t * 2 * nb + 2 * b));
            if KIND != Q4_1 {
                for t in 0..T {
                    isum[t] = _mm512_set1_epi32(*xt[t].add(1) as i32);
                }
            }
            if KIND == Q8_0 {
                for c in 0..8 {
                    let v = _mm512_loadu_si512(r.add(head + 64 * c).cast());
                    for t in 0..T {
                        if c % 2 == 0 {
                            isum[t] = _mm512_dpbusd_epi32(isum[t], v, word(at[t].add(4 * c)));
                        } else {
                            isum2[t] = _mm512_dpbusd_epi32(isum2[t], v, word(at[t].add(4 * c)));
                        }
                    }
                }
            } else {
                for c in 0..4 {
                    let v = _mm512_loadu_si512(r.add(head + 64 * c).cast());
                    let lo = _mm512_and_si512(v, m4);
                    let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(v), m4);
                    for t in 0..T {
                        isum[t] = _mm512_dpbusd_epi32(isum[t], lo, word(at[t].add(4 * c)));
                        isum2[t] = _mm512_dpbusd_epi32(isum2[t], hi, word(at[t].add(16 + 4 * c)));
                    }
                }
            }
            let mw = if KIND == Q4_1 {
                _mm512_cvtph_ps(_mm256_loadu_si256(r.add(32).cast()))
            } else {
                _mm512_setzero_ps()
            };
            for t in 0..T {
                let s = _mm512_cvtepi32_ps(_mm512_add_epi32(isum[t], isum2[t]));
                let da = _mm512_set1_ps(f32::from_bits(*xt[t]));
                acc[t] = _mm512_fmadd_ps(s, _mm512_mul_ps(dw, da), acc[t]);
                if KIND == Q4_1 {
                    let sa = _mm512_set1_ps(f32::from_bits(*xt[t].add(1)));
                    acc[t] = _mm512_fmadd_ps(mw, sa, acc[t]);
                }
            }
        }
    }
    let k: __mmask16 = if valid >= 16 {
        0xffff
    } else {
        (1u16 << valid) - 1
    };
    for t in 0..T {
        // SAFETY: the first `valid` outputs of each token row exist (caller contract).
        unsafe { _mm512_mask_storeu_ps(out.add(t * out_stride), k, acc[t]) };
    }
}

macro_rules! tiles {
    ($($name:ident: $kind:expr, $t:literal;)*) => {$(
        /// # Safety
        /// See `group_tile`.
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,avx512vnni")]
        #[allow(clippy::too_many_arguments)]
        unsafe fn $name(
            nb: usize, w: *const u8, a: *const u8, a_stride: usize, aux: *const u32, out: *mut f32,
            out_stride: usize, valid: usize,
        ) {
            // SAFETY: forwarded contract.
            unsafe { group_tile::<$kind, $t>(nb, w, a, a_stride, aux, out, out_stride, valid) }
        }
    )*};
}

tiles! {
    q4_0_t1: Q4_0, 1;
    q4_0_t4: Q4_0, 4;
    q4_1_t1: Q4_1, 1;
    q4_1_t4: Q4_1, 4;
    q8_0_t1: Q8_0, 1;
    q8_0_t4: Q8_0, 4;
}

type GroupTileFn =
    unsafe fn(usize, *const u8, *const u8, usize, *const u32, *mut f32, usize, usize);

/// Per activation block: f32 `d` and either the `Σa` correction (`-8 Σa` for Q4_0, `-128 Σa` for Q8_0) or
/// Q8_1's `s` as f32, as two words.
fn fill_aux(
    ty: GgmlType,
    act: &[u8],
    n_tokens: usize,
    stride: usize,
    nb: usize,
    aux: &mut Vec<u32>,
) {
    aux.clear();
    aux.reserve(n_tokens * nb * 2);
    let ab = VecDotType::of(ty).type_size();
    let h = |b: &[u8], at: usize| half::f16::from_le_bytes([b[at], b[at + 1]]).to_f32();
    for t in 0..n_tokens {
        for blk in act[t * stride..(t + 1) * stride].chunks_exact(ab) {
            aux.push(h(blk, 0).to_bits());
            let second = match ty {
                GgmlType::Q4_1 => h(blk, 2).to_bits(),
                _ => {
                    let sum: i32 = blk[2..34].iter().map(|&q| i32::from(q as i8)).sum();
                    let k = if ty == GgmlType::Q8_0 { -128 } else { -8 };
                    (k * sum) as u32
                }
            };
            aux.push(second);
        }
    }
}

/// The VNNI packed matmul (a `PackedMatmulFn`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul(
    k: &Kernels,
    pool: &Pool,
    ty: GgmlType,
    rows: usize,
    cols: usize,
    data: &[u8],
    x: &[f32],
    n_tokens: usize,
    y: &mut [f32],
    scratch: &mut Scratch,
) -> Result<(), KernelError> {
    if matches!(ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) {
        return super::packed_f::matmul(k, pool, ty, rows, cols, data, x, n_tokens, y, scratch);
    }
    check_io(rows, cols, x, n_tokens, y)?;
    let Some((_, rec)) = record_layout(ty) else {
        return Err(KernelError::Invalid(
            "matmul_packed: type has no packed layout",
        ));
    };
    let (t1, t4, aux_words): (GroupTileFn, GroupTileFn, usize) = match ty {
        GgmlType::Q4_0 => (q4_0_t1, q4_0_t4, 2),
        GgmlType::Q4_1 => (q4_1_t1, q4_1_t4, 2),
        GgmlType::Q8_0 => (q8_0_t1, q8_0_t4, 2),
        GgmlType::Q4_K => (packed_k::q4_k_t1, packed_k::q4_k_t4, packed_k::Q4K_AUX),
        _ => (packed_k::q6_k_t1, packed_k::q6_k_t4, packed_k::Q6K_AUX),
    };
    let nb = cols / ty.block_size();
    let groups = rows.div_ceil(GROUP);
    check_len_data(groups * nb * rec, data.len())?;
    if n_tokens == 0 || rows == 0 {
        return Ok(());
    }
    let vt = VecDotType::of(ty);
    let stride = vt.bytes_for(cols);
    let mut act = std::mem::take(&mut scratch.act);
    k.quantize_tokens(pool, vt, x, n_tokens, cols, stride, &mut act);
    match ty {
        GgmlType::Q4_K | GgmlType::Q6_K => packed_k::fill_aux(
            ty == GgmlType::Q6_K,
            &act,
            n_tokens,
            stride,
            &mut scratch.aux,
        ),
        _ => fill_aux(ty, &act, n_tokens, stride, nb, &mut scratch.aux),
    }
    let (act_ref, aux) = (&act[..n_tokens * stride], &scratch.aux[..]);
    // Work items are (token block, run of row groups). A token block's activations stay in L1/L2 while
    // every group of the run streams its weights past them; within a group, 4-token tiles reuse each
    // weight load.
    let t_block = token_block(stride);
    let n_tblocks = n_tokens.div_ceil(t_block);
    let n_threads = pool.n_threads().max(1);
    let per_thread = (groups * n_tblocks).div_ceil(n_threads);
    let chunk = if n_threads <= 1 {
        groups
    } else {
        (per_thread / 6).clamp(1, groups)
    };
    let n_gchunks = groups.div_ceil(chunk);
    let n_items = n_tblocks * n_gchunks;
    // One token block (decode, and batches of up to ~100 tokens of a 2048-wide row) is a single pass over
    // the matrix, bound by memory bandwidth for one token: runs shrink with the work left (guided
    // scheduling), so each thread streams long contiguous runs first and the threads still finish
    // together, instead of one waiting out the other's last equal-sized chunk.
    let guided = n_tblocks == 1 && n_threads > 1;
    let next = AtomicUsize::new(0);
    let claim = || -> Option<(usize, std::ops::Range<usize>)> {
        if guided {
            let mut cur = next.load(Ordering::Relaxed);
            loop {
                if cur >= groups {
                    return None;
                }
                let size = ((groups - cur) / (2 * n_threads)).max(1);
                match next.compare_exchange_weak(
                    cur,
                    cur + size,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => return Some((0, cur..cur + size)),
                    Err(c) => cur = c,
                }
            }
        }
        let item = next.fetch_add(1, Ordering::Relaxed);
        if item >= n_items {
            return None;
        }
        let (tb, gc) = (item / n_gchunks, item % n_gchunks);
        Some((tb, gc * chunk..((gc + 1) * chunk).min(groups)))
    };
    let out = SharedOut(y.as_mut_ptr());
    pool.run(|_, _| {
        while let Some((tb, run)) = claim() {
            let (t_lo, t_hi) = (tb * t_block, ((tb + 1) * t_block).min(n_tokens));
            for g in run {
                let wg = data[g * nb * rec..].as_ptr();
                let valid = (rows - g * GROUP).min(GROUP);
                let mut t = t_lo;
                while t < t_hi {
                    let (f, step) = if t + T_TILE <= t_hi {
                        (t4, T_TILE)
                    } else {
                        (t1, 1)
                    };
                    // SAFETY: group `g` has `nb` records in `data` (length checked); tokens t..t+step have
                    // `stride` activation bytes and `aux_words * nb` aux words each; outputs (t..,
                    // g*16 .. g*16+valid) lie inside `y` and belong to this item only. Features were
                    // detected with the table.
                    unsafe {
                        f(
                            nb,
                            wg,
                            act_ref.as_ptr().add(t * stride),
                            stride,
                            aux.as_ptr().add(t * aux_words * nb),
                            out.get().add(t * rows + g * GROUP),
                            rows,
                            valid,
                        )
                    };
                    t += step;
                }
            }
        }
    });
    scratch.act = act;
    Ok(())
}

/// Tokens per block (for the quantized and the float layouts): activations of about 256 KiB, which stay in L2 (1–2 MiB per core on AVX-512 parts)
/// while each group's weights, read once from memory, serve every 4-token tile of the block from L1/L2.
/// Every block streams the whole matrix from memory again, so the block decides how often a batch
/// re-reads the weights: with 24 KiB (L1) blocks, a 32-sequence decode step of the llama3-1b-shaped Q4_K_M
/// model read its 0.8 GB 4–8 times and ran at 141–150 tok/s; with 256 KiB, 182–189 tok/s, and pp512 no
/// slower (engine-bench --parallel 32 / -p 512, 2 threads, bench/RESULTS.md).
pub(super) fn token_block(stride: usize) -> usize {
    ((256 << 10) / stride.max(1)).max(T_TILE) / T_TILE * T_TILE
}

fn check_len_data(expected: usize, got: usize) -> Result<(), KernelError> {
    crate::cpu::check_len("packed matrix bytes", expected, got)
}
