//! Weights repacked once at load time into 16-row interleaved blocks, so that one 512-bit load holds four
//! bytes of each of 16 rows and `vpdpbusd` against one broadcast activation word yields 16 row sums in 16
//! lanes: one lane per output instead of one lane per element. Float work (scale, convert, accumulate)
//! then happens once per block for 16 rows, and a weight load serves every token of the tile. This is the
//! layout idea of llama.cpp's `repack.cpp` (`block_q4_0x8` and friends), sized for AVX-512.
//!
//! Record of rows `16g..16g+16`, block `b` (records of a group back to back, groups back to back):
//! - Q4_0 (288 bytes = 16 × 18): 16 f16 `d`, then for `c` in 0..4 a 64-byte chunk holding bytes
//!   `qs[4c..4c+4]` of each row (low nibbles: elements `4c..4c+4`, high nibbles: `16+4c..16+4c+4`).
//! - Q4_1 (320 = 16 × 20): 16 `d`, 16 `m`, then the same 4 chunks.
//! - Q8_0 (544 = 16 × 34): 16 `d`, then for `c` in 0..8 a chunk of `qs[4c..4c+4] ^ 0x80` per row (signed to
//!   unsigned, corrected with `-128 Σa` per activation block).
//!
//! - Q4_K, Q6_K: see [`Q4K_QS`] and [`Q6K_QL`]; Q4_K keeps its packed 6-bit scales and mins (the tile
//!   unpacks them), Q6_K's 8-bit scales are transposed to one byte per row.
//!
//! - F32, F16, BF16: per group, for each column (BF16: each column pair) the 16 rows' values back to back,
//!   so a load is one column of 16 rows and the activation is broadcast (no horizontal sums).
//!
//! Rows past the end of the matrix are zero. Types and CPUs without a packed kernel keep the GGUF layout
//! in an owned copy and go through the ordinary kernels, so callers can pack every matrix unconditionally.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::isa::{Isa, Kernels};
use super::layout::VecDotType;
use super::{KernelError, Pool, QMatrix, Scratch, check_len};
use crate::quant::GgmlType;

/// Rows interleaved per packed group.
pub(crate) const GROUP: usize = 16;

/// A weight matrix in the layout the packing table's matmul wants (see the module docs). Build with
/// [`PackedMatrix::new`] (best kernels) or [`Kernels::pack`]; multiply with [`matmul_packed`].
#[derive(Debug, Clone)]
pub struct PackedMatrix {
    ty: GgmlType,
    rows: usize,
    cols: usize,
    /// The table that packed it; its matmul must be used.
    isa: Isa,
    /// Whether `data` is interleaved (else the GGUF layout).
    interleaved: bool,
    pub(crate) data: Vec<u8>,
}

impl PackedMatrix {
    /// Packs `w` for the best kernels of this CPU.
    pub fn new(w: &QMatrix) -> Result<Self, KernelError> {
        Kernels::best().pack(w)
    }

    /// As [`PackedMatrix::new`], packing `rows_per_chunk` rows at a time (rounded up to whole 16-row groups)
    /// and calling `done(rows)` after each chunk, so the caller can drop source pages it no longer needs: while
    /// a memory-mapped model is packed, resident memory then grows by one chunk instead of one whole matrix.
    /// The result is identical to [`PackedMatrix::new`]'s (the layouts are 16-row-group-major).
    pub fn new_chunked(
        w: &QMatrix,
        rows_per_chunk: usize,
        mut done: impl FnMut(std::ops::Range<usize>),
    ) -> Result<Self, KernelError> {
        let k = Kernels::best();
        let step = rows_per_chunk.max(1).div_ceil(GROUP) * GROUP;
        let checked = QMatrix::new(w.ty, w.rows, w.cols, w.data)?;
        if checked.rows <= step {
            let p = k.pack(&checked)?;
            if p.interleaved {
                done(0..checked.rows);
            }
            return Ok(p);
        }
        let row_bytes = checked.data.len() / checked.rows;
        let mut data = Vec::new();
        for start in (0..checked.rows).step_by(step) {
            let end = (start + step).min(checked.rows);
            let sub = QMatrix::new(
                w.ty,
                end - start,
                w.cols,
                &checked.data[start * row_bytes..end * row_bytes],
            )?;
            let p = k.pack(&sub)?;
            if !p.interleaved {
                // No packed layout for this type: a plain copy, made in one piece.
                return k.pack(&checked);
            }
            if start == 0 {
                // Every layout is the same number of bytes per 16-row group: reserve exactly once.
                let per_group = p.data.len() / step.div_ceil(GROUP);
                data.reserve_exact(per_group * checked.rows.div_ceil(GROUP));
            }
            data.extend_from_slice(&p.data);
            done(start..end);
        }
        Ok(PackedMatrix {
            ty: w.ty,
            rows: w.rows,
            cols: w.cols,
            isa: k.isa,
            interleaved: true,
            data,
        })
    }

    pub fn ty(&self) -> GgmlType {
        self.ty
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Whether the data is interleaved for a packed kernel (false: a plain copy).
    pub fn is_interleaved(&self) -> bool {
        self.interleaved
    }

    /// The matrix in GGUF layout, when it was not interleaved.
    pub fn as_qmatrix(&self) -> Option<QMatrix<'_>> {
        (!self.interleaved).then(|| QMatrix {
            ty: self.ty,
            rows: self.rows,
            cols: self.cols,
            data: &self.data,
        })
    }
}

/// Bytes of the leading per-row fields (scales, mins) in a record, and of one record.
pub(crate) const fn record_layout(ty: GgmlType) -> Option<(usize, usize)> {
    match ty {
        GgmlType::Q4_0 => Some((32, 288)),
        GgmlType::Q4_1 => Some((64, 320)),
        GgmlType::Q8_0 => Some((32, 544)),
        GgmlType::Q4_K => Some((Q4K_QS, Q4K_QS + 2048)),
        GgmlType::Q6_K => Some((Q6K_QL, Q6K_QL + 3072)),
        _ => None,
    }
}

/// Q4_K record, the size of 16 GGUF blocks: `d` ×16 at 0, `dmin` ×16 at 32, the 12 bytes of packed 6-bit
/// scales and mins as three words per row (`[k][row] = scales[4k..4k+4]`) at [`Q4K_SCALES`] (unpacked in
/// the kernel with a few byte-wise ops for 16 rows at once), then 32 chunks of `qs[4c..4c+4]` per row at
/// [`Q4K_QS`]. Keeping the 6-bit packing, rather than one byte or word per scale, saves 8% of the bytes
/// that decode streams.
pub(crate) const Q4K_SCALES: usize = 64;
pub(crate) const Q4K_QS: usize = 256;
/// Q6_K record: `d` ×16 at 0, the 16 group scales as i8 (`[g][row]`) at [`Q6K_SCALES`], then from
/// [`Q6K_QL`] for each half `h` and 4-byte position `l` (in that order) three chunks: `ql[64h+l..+4]`,
/// `ql[64h+32+l..+4]` and `qh[32h+l..+4]` of every row (same size as 16 GGUF blocks).
pub(crate) const Q6K_SCALES: usize = 32;
pub(crate) const Q6K_QL: usize = 288;

/// Interleaves a Q4_K or Q6_K matrix into the records above.
fn interleave_k(w: &QMatrix, rec: usize) -> Vec<u8> {
    let bb = w.ty.type_size();
    let nb = w.cols / 256;
    let groups = w.rows.div_ceil(GROUP);
    let mut out = vec![0u8; groups * nb * rec];
    let row_bytes = nb * bb;
    for g in 0..groups {
        for b in 0..nb {
            let r_out = &mut out[(g * nb + b) * rec..][..rec];
            for lane in 0..GROUP.min(w.rows - g * GROUP) {
                let blk = &w.data[(g * GROUP + lane) * row_bytes + b * bb..][..bb];
                let mut chunks = |at: usize, src: &[u8]| {
                    for (c, q) in src.chunks_exact(4).enumerate() {
                        r_out[at + 64 * c + 4 * lane..][..4].copy_from_slice(q);
                    }
                };
                if w.ty == GgmlType::Q4_K {
                    chunks(Q4K_QS, &blk[16..144]);
                    chunks(Q4K_SCALES, &blk[4..16]);
                    r_out[2 * lane..][..2].copy_from_slice(&blk[0..2]);
                    r_out[32 + 2 * lane..][..2].copy_from_slice(&blk[2..4]);
                } else {
                    // In kernel order, so a record streams front to back: for each half `h` and 4-byte
                    // position `l`, the words `ql[64h+l]`, `ql[64h+32+l]` and `qh[32h+l]`.
                    for h in 0..2 {
                        for l in (0..32).step_by(4) {
                            let at = Q6K_QL + 192 * (8 * h + l / 4) + 4 * lane;
                            r_out[at..at + 4].copy_from_slice(&blk[64 * h + l..][..4]);
                            r_out[at + 64..at + 68].copy_from_slice(&blk[64 * h + 32 + l..][..4]);
                            r_out[at + 128..at + 132]
                                .copy_from_slice(&blk[128 + 32 * h + l..][..4]);
                        }
                    }
                    r_out[2 * lane..][..2].copy_from_slice(&blk[208..210]);
                    for gi in 0..16 {
                        r_out[Q6K_SCALES + 16 * gi + lane] = blk[192 + gi];
                    }
                }
            }
        }
    }
    out
}

/// Interleaves `w` (a type with a [`record_layout`]).
fn interleave(w: &QMatrix, head: usize, rec: usize) -> Vec<u8> {
    let bb = w.ty.type_size();
    let nb = w.cols / 32;
    let groups = w.rows.div_ceil(GROUP);
    let mut out = vec![0u8; groups * nb * rec];
    let row_bytes = nb * bb;
    // Per-row field offsets inside a GGUF block, and where the 32-element quants start.
    let (fields, qs_at, qs_len): (&[usize], usize, usize) = match w.ty {
        GgmlType::Q4_0 => (&[0], 2, 16),
        GgmlType::Q4_1 => (&[0, 2], 4, 16),
        _ => (&[0], 2, 32),
    };
    let flip = if w.ty == GgmlType::Q8_0 { 0x80 } else { 0 };
    for g in 0..groups {
        for b in 0..nb {
            let r_out = &mut out[(g * nb + b) * rec..][..rec];
            for lane in 0..GROUP {
                let r = g * GROUP + lane;
                if r >= w.rows {
                    continue;
                }
                let blk = &w.data[r * row_bytes + b * bb..][..bb];
                for (f, &off) in fields.iter().enumerate() {
                    r_out[f * 32 + 2 * lane..][..2].copy_from_slice(&blk[off..off + 2]);
                }
                for c in 0..qs_len / 4 {
                    for k in 0..4 {
                        r_out[head + 64 * c + 4 * lane + k] = blk[qs_at + 4 * c + k] ^ flip;
                    }
                }
            }
        }
    }
    out
}

/// Bytes per row per step of the float layouts: F32 and F16 one element, BF16 a pair (for `vdpbf16ps`).
pub(crate) const fn float_unit(ty: GgmlType) -> Option<usize> {
    match ty {
        GgmlType::F32 | GgmlType::BF16 => Some(4),
        GgmlType::F16 => Some(2),
        _ => None,
    }
}

/// Float types: groups of 16 rows, then for each step the step's `unit` bytes of each row (64 or 32 bytes
/// per step), so one load gives the same column(s) of 16 rows.
fn interleave_float(w: &QMatrix, unit: usize) -> Vec<u8> {
    let row_bytes = w.data.len() / w.rows.max(1);
    let steps = row_bytes / unit;
    let groups = w.rows.div_ceil(GROUP);
    let mut out = vec![0u8; groups * steps * GROUP * unit];
    for (r, row) in w.data.chunks_exact(row_bytes).enumerate() {
        let (g, lane) = (r / GROUP, r % GROUP);
        for (s, v) in row.chunks_exact(unit).enumerate() {
            out[((g * steps + s) * GROUP + lane) * unit..][..unit].copy_from_slice(v);
        }
    }
    out
}

impl Kernels {
    /// Packs `w` for this table's [`Kernels::matmul_packed`]: interleaved when the table has a packed kernel
    /// for `w.ty`, else an owned copy in GGUF layout.
    pub fn pack(&self, w: &QMatrix) -> Result<PackedMatrix, KernelError> {
        let checked = QMatrix::new(w.ty, w.rows, w.cols, w.data)?;
        let packs = self.packed.is_some() && self.packed_types.contains(&w.ty);
        let layout = record_layout(w.ty).filter(|_| packs);
        let unit = float_unit(w.ty)
            .filter(|_| packs && w.rows > 0 && w.cols > 0)
            .filter(|&u| (w.cols * w.ty.type_size()).is_multiple_of(u));
        let (interleaved, data) = match (layout, unit) {
            (Some((_, rec)), _) if w.ty.block_size() == 256 => (true, interleave_k(&checked, rec)),
            (Some((head, rec)), _) => (true, interleave(&checked, head, rec)),
            (None, Some(u)) => (true, interleave_float(&checked, u)),
            _ => (false, w.data.to_vec()),
        };
        Ok(PackedMatrix {
            ty: w.ty,
            rows: w.rows,
            cols: w.cols,
            isa: self.isa,
            interleaved,
            data,
        })
    }

    /// [`matmul_packed`] with this table's kernels; `w` must have been packed by the same table.
    pub fn matmul_packed(
        &self,
        pool: &Pool,
        w: &PackedMatrix,
        x: &[f32],
        n_tokens: usize,
        y: &mut [f32],
        scratch: &mut Scratch,
    ) -> Result<(), KernelError> {
        if w.isa != self.isa {
            return Err(KernelError::Invalid(
                "matmul_packed: matrix was packed for another ISA level",
            ));
        }
        if let Some(m) = w.as_qmatrix() {
            return self.matmul(pool, &m, x, n_tokens, y, scratch);
        }
        match self.packed {
            Some(f) => f(
                self, pool, w.ty, w.rows, w.cols, &w.data, x, n_tokens, y, scratch,
            ),
            None => Err(KernelError::Invalid("matmul_packed: no packed kernel")),
        }
    }
}

/// The packed matmul of an ISA level: `(kernels, pool, ty, rows, cols, interleaved data, x, n_tokens, y,
/// scratch)`. Implementations check `x` and `y` lengths.
pub(crate) type PackedMatmulFn = fn(
    &Kernels,
    &Pool,
    GgmlType,
    usize,
    usize,
    &[u8],
    &[f32],
    usize,
    &mut [f32],
    &mut Scratch,
) -> Result<(), KernelError>;

/// `y = W x` for a [`PackedMatrix`], with the kernels that packed it (see [`super::matmul`] for the
/// semantics, which are the same up to float summation order).
pub fn matmul_packed(
    pool: &Pool,
    w: &PackedMatrix,
    x: &[f32],
    n_tokens: usize,
    y: &mut [f32],
    scratch: &mut Scratch,
) -> Result<(), KernelError> {
    let k = Kernels::for_isa(w.isa).ok_or(KernelError::Invalid(
        "matmul_packed: matrix was packed for an ISA this CPU lacks",
    ))?;
    k.matmul_packed(pool, w, x, n_tokens, y, scratch)
}

/// Tokens per tile of the packed kernels: a weight load serves this many tokens.
pub(crate) const T_TILE: usize = 4;

/// One 16-row group × `T` tokens of a quantized packed layout: `(nb, w, a, a_stride, aux, out,
/// out_stride, valid)`. `w`: the group's `nb` records; `a`: token 0's converted activation row, tokens
/// `a_stride` bytes apart; `aux`: token 0's aux words (the level's `aux_words` per block), tokens
/// `aux_words * nb` words apart; `out`: `y` at (token 0, the group's first row), tokens `out_stride` floats
/// apart, of which the first `valid` rows are written.
pub(crate) type GroupTileFn =
    unsafe fn(usize, *const u8, *const u8, usize, *const u32, *mut f32, usize, usize);

/// Fills the per (token, block) aux words a level's tiles read, from the converted activations:
/// `(ty, act, n_tokens, stride, nb, aux)`.
pub(crate) type FillAuxFn = fn(GgmlType, &[u8], usize, usize, usize, &mut Vec<u32>);

/// An ISA level's kernels for one quantized packed type.
#[derive(Clone, Copy)]
pub(crate) struct QuantTiles {
    /// The tiles of 1 (decode), 2, 3 and [`T_TILE`] tokens: a token block runs in 4-token tiles and one
    /// tail tile of the rest. Each computes every token exactly as the others do (bit for bit), so a
    /// token's result does not depend on its batch.
    pub(crate) by_tokens: [GroupTileFn; T_TILE],
    /// Aux words per (token, block).
    pub(crate) aux_words: usize,
    pub(crate) fill_aux: FillAuxFn,
}

impl QuantTiles {
    /// Tiles of Q4_0 / Q4_1 / Q8_0, whose aux is [`fill_aux_legacy`]'s.
    pub(crate) fn legacy(by_tokens: [GroupTileFn; T_TILE]) -> Self {
        QuantTiles {
            by_tokens,
            aux_words: 2,
            fill_aux: fill_aux_legacy,
        }
    }
}

/// Per activation block of Q4_0 / Q4_1 / Q8_0: f32 `d` and either the `Σa` correction (`-8 Σa` for Q4_0,
/// `-128 Σa` for Q8_0's unsigned-flipped weights) or Q8_1's `s` as f32, as two words.
pub(crate) fn fill_aux_legacy(
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

/// The matmul output pointer shared by the pool's threads of one packed matmul.
#[derive(Clone, Copy)]
pub(crate) struct SharedOut(pub(crate) *mut f32);
// SAFETY: each packed matmul's threads write disjoint (token, row group) outputs, and `Pool::run` joins them
// before the borrow of the output ends.
unsafe impl Send for SharedOut {}
// SAFETY: as above.
unsafe impl Sync for SharedOut {}
impl SharedOut {
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// Tokens per block (for the quantized and the float layouts): activations of about 256 KiB, which stay
/// in L2 (1–2 MiB per core on AVX-512 parts, 512 KiB on Zen 2/3) while each group's weights, read once
/// from memory, serve every 4-token tile of the block from L1/L2. Every block streams the whole matrix
/// from memory again, so the block decides how often a batch re-reads the weights: with 24 KiB (L1)
/// blocks, a 32-sequence decode step of the llama3-1b-shaped Q4_K_M model read its 0.8 GB 4–8 times and
/// ran at 141–150 tok/s; with 256 KiB, 182–189 tok/s, and pp512 no slower (engine-bench --parallel 32 /
/// -p 512, 2 threads, bench/RESULTS.md).
pub(crate) fn token_block(stride: usize) -> usize {
    ((256 << 10) / stride.max(1)).max(T_TILE) / T_TILE * T_TILE
}

/// Runs `tile(group, first_token, tokens)` over every 16-row group of a `rows`-row packed matrix and every
/// token of `n_tokens` (activation rows of `stride` bytes) on the pool: 4-token tiles, then one tile of the
/// 1–3 tokens left (a 1-token tile per leftover token unpacked the weights again for each: 23% of a
/// 32-sequence serving run's time went there when its batches were not multiples of 4).
/// Work items are (token block, run of row groups): a token block's activations stay in L1/L2 while every
/// group of the run streams its weights past them. With `guided` and a single token block (decode, and
/// batches up to ~100 tokens of a 2048-wide row: one pass over the matrix, bound by memory bandwidth),
/// runs shrink with the work left, so each thread streams long contiguous runs first and the threads still
/// finish together, instead of one waiting out the other's last equal-sized chunk.
fn for_each_tile(
    pool: &Pool,
    rows: usize,
    n_tokens: usize,
    stride: usize,
    guided: bool,
    tile: impl Fn(usize, usize, usize) + Sync,
) {
    let groups = rows.div_ceil(GROUP);
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
    let guided = guided && n_tblocks == 1 && n_threads > 1;
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
    pool.run(|_, _| {
        while let Some((tb, run)) = claim() {
            let (t_lo, t_hi) = (tb * t_block, ((tb + 1) * t_block).min(n_tokens));
            for g in run {
                let mut t = t_lo;
                while t < t_hi {
                    let step = (t_hi - t).min(T_TILE);
                    tile(g, t, step);
                    t += step;
                }
            }
        }
    });
}

/// The packed matmul of a quantized type with one level's `tiles`: converts the activations, fills the
/// aux words, and runs the tiles over (token block, run of row groups) work items on the pool.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_quant(
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
    tiles: QuantTiles,
) -> Result<(), KernelError> {
    check_io(rows, cols, x, n_tokens, y)?;
    let Some((_, rec)) = record_layout(ty) else {
        return Err(KernelError::Invalid(
            "matmul_packed: type has no packed layout",
        ));
    };
    let QuantTiles {
        by_tokens,
        aux_words,
        fill_aux,
    } = tiles;
    let nb = cols / ty.block_size();
    let groups = rows.div_ceil(GROUP);
    check_len("packed matrix bytes", groups * nb * rec, data.len())?;
    if n_tokens == 0 || rows == 0 {
        return Ok(());
    }
    let vt = VecDotType::of(ty);
    let stride = vt.bytes_for(cols);
    let mut act = std::mem::take(&mut scratch.act);
    k.quantize_tokens(pool, vt, x, n_tokens, cols, stride, &mut act);
    fill_aux(ty, &act, n_tokens, stride, nb, &mut scratch.aux);
    let (act_ref, aux) = (&act[..n_tokens * stride], &scratch.aux[..]);
    let out = SharedOut(y.as_mut_ptr());
    for_each_tile(pool, rows, n_tokens, stride, true, |g, t, step| {
        let f = by_tokens[step - 1];
        // SAFETY: group `g` has `nb` records in `data` (length checked); tokens t..t+step have `stride`
        // activation bytes and `aux_words * nb` aux words each; outputs (t.., g*16 .. g*16+valid) lie
        // inside `y` and belong to this tile only. The tiles come from the table `k`, built only after
        // its CPU features were detected.
        unsafe {
            f(
                nb,
                data[g * nb * rec..].as_ptr(),
                act_ref.as_ptr().add(t * stride),
                stride,
                aux.as_ptr().add(t * aux_words * nb),
                out.get().add(t * rows + g * GROUP),
                rows,
                (rows - g * GROUP).min(GROUP),
            )
        };
    });
    scratch.act = act;
    Ok(())
}

/// One 16-row group × `T` tokens of a float packed layout: `(steps, w, a, a_stride, out, out_stride,
/// valid)`. `w`: the group's `steps` steps (64 bytes each; F16: 32); `a`: token 0's activations (f32 for
/// F32/F16, bf16 for BF16), tokens `a_stride` bytes apart; `out`: `y` at (token 0, the group's first row),
/// tokens `out_stride` floats apart; the first `valid` rows are written.
pub(crate) type FloatTileFn = unsafe fn(usize, *const u8, *const u8, usize, *mut f32, usize, usize);

/// An ISA level's kernels for one float packed type.
#[derive(Clone, Copy)]
pub(crate) struct FloatTiles {
    /// The tiles of 1, 2, 3 and [`T_TILE`] tokens (as [`QuantTiles::by_tokens`]).
    pub(crate) by_tokens: [FloatTileFn; T_TILE],
    /// `x` rounded to f16 (nearest even, as F16C converts) and back, as little-endian f32 bytes in `out`
    /// (`out.len() >= 4 * x.len()`): F16 weights meet activations as llama.cpp converts them.
    pub(crate) round_through_f16: unsafe fn(&[f32], &mut [u8]),
}

/// The packed matmul of a float type with one level's `tiles`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_float(
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
    tiles: FloatTiles,
) -> Result<(), KernelError> {
    check_io(rows, cols, x, n_tokens, y)?;
    let groups = rows.div_ceil(GROUP);
    let step_bytes = if ty == GgmlType::F16 { 32 } else { 64 };
    let steps = if ty == GgmlType::BF16 { cols / 2 } else { cols };
    check_len(
        "packed matrix bytes",
        groups * steps * step_bytes,
        data.len(),
    )?;
    if n_tokens == 0 || rows == 0 {
        return Ok(());
    }
    let FloatTiles {
        by_tokens,
        round_through_f16,
    } = tiles;
    // Activations: F32 as given, F16 rounded through f16 (kept as f32 for broadcasting), BF16 as bf16.
    let mut act = std::mem::take(&mut scratch.act);
    let stride;
    let act_ref: &[u8] = match ty {
        GgmlType::F32 => {
            stride = 4 * cols;
            // SAFETY: any f32 is 4 valid bytes; the view lives no longer than `x`.
            unsafe { std::slice::from_raw_parts(x.as_ptr().cast::<u8>(), std::mem::size_of_val(x)) }
        }
        GgmlType::F16 => {
            stride = 4 * cols;
            act.resize(4 * x.len(), 0);
            // SAFETY: `act` holds 4 bytes per value of `x`; the level's features were detected with `k`.
            unsafe { round_through_f16(x, &mut act) };
            &act
        }
        _ => {
            stride = 2 * cols;
            k.quantize_tokens(pool, VecDotType::BF16, x, n_tokens, cols, stride, &mut act);
            &act[..n_tokens * stride]
        }
    };
    let out = SharedOut(y.as_mut_ptr());
    let group_bytes = steps * step_bytes;
    for_each_tile(pool, rows, n_tokens, stride, false, |g, t, step| {
        let f = by_tokens[step - 1];
        // SAFETY: group `g` has `group_bytes` bytes in `data` (length checked); tokens t..t+step have
        // `stride` activation bytes; outputs (t.., g*16 .. g*16+valid) lie inside `y` and belong to this
        // tile only. The tiles' features were detected with the table `k`.
        unsafe {
            f(
                steps,
                data.as_ptr().add(g * group_bytes),
                act_ref.as_ptr().add(t * stride),
                stride,
                out.get().add(t * rows + g * GROUP),
                rows,
                (rows - g * GROUP).min(GROUP),
            )
        };
    });
    scratch.act = act;
    Ok(())
}

/// Shape checks shared by packed implementations.
pub(crate) fn check_io(
    rows: usize,
    cols: usize,
    x: &[f32],
    n_tokens: usize,
    y: &[f32],
) -> Result<(), KernelError> {
    check_len(
        "matmul input length (n_tokens * cols)",
        n_tokens * cols,
        x.len(),
    )?;
    check_len(
        "matmul output length (n_tokens * rows)",
        n_tokens * rows,
        y.len(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Packing in row chunks gives the bytes of packing at once, for every layout and a partial last group.
    #[test]
    fn chunked_packing_equals_whole_packing() {
        let types = [
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q8_0,
            GgmlType::Q4_K,
            GgmlType::Q6_K,
            GgmlType::Q5_K,
            GgmlType::F16,
            GgmlType::BF16,
            GgmlType::F32,
        ];
        let (rows, cols) = (37, 256);
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        for ty in types {
            let bytes = ty.bytes_for(cols).unwrap() * rows;
            let data: Vec<u8> = (0..bytes)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect();
            let w = QMatrix::new(ty, rows, cols, &data).unwrap();
            let whole = PackedMatrix::new(&w).unwrap();
            for chunk in [1, 16, 20, 64] {
                let mut seen = Vec::new();
                let parts = PackedMatrix::new_chunked(&w, chunk, |r| seen.push(r)).unwrap();
                assert_eq!(parts.data, whole.data, "{ty:?} chunk {chunk}");
                assert_eq!(parts.interleaved, whole.interleaved, "{ty:?}");
                if whole.interleaved {
                    assert_eq!(seen.first().map(|r| r.start), Some(0), "{ty:?}");
                    assert!(seen.windows(2).all(|w| w[0].end == w[1].start), "{ty:?}");
                    assert_eq!(seen.last().map(|r| r.end), Some(rows), "{ty:?}");
                }
            }
        }
    }
}
