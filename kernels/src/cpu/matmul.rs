//! The matmul driver: converts activations to the weight type's `vec_dot_type` once, then splits weight
//! rows across the pool in chunks claimed from an atomic counter (ggml's `current_chunk`), so a thread slowed
//! by a neighbour on a shared core does not hold the others back. With several tokens, each row is dotted
//! in 4-row × 4-token tiles (4 × 1 for the last tokens and for decode) where the ISA has them, reusing each
//! activation load for 4 rows and each decoded weight for 4 tokens.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::isa::{DotFn, Kernels};
use super::layout::{VecDotType, type_slot};
use super::{KernelError, Pool, QMatrix, Scratch, check_len};

/// A raw output pointer shared by the pool's threads, each writing disjoint elements.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: threads write disjoint indices (distinct rows) and `run` joins them before the borrow ends.
unsafe impl Send for OutPtr {}
// SAFETY: as above.
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// Method access makes closures capture the whole (`Sync`) wrapper, not its raw-pointer field.
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Tokens that go through a tile together.
const TOKEN_TILE: usize = 4;
/// Below this many tokens, activations are converted on the calling thread (a pool round trip costs more).
const PARALLEL_QUANTIZE_TOKENS: usize = 8;

impl Kernels {
    /// [`super::matmul`] with this table's kernels.
    pub fn matmul(
        &self,
        pool: &Pool,
        w: &QMatrix,
        x: &[f32],
        n_tokens: usize,
        y: &mut [f32],
        scratch: &mut Scratch,
    ) -> Result<(), KernelError> {
        let (rows, cols) = (w.rows, w.cols);
        check_len(
            "matmul input length (n_tokens * cols)",
            n_tokens * cols,
            x.len(),
        )?;
        check_len(
            "matmul output length (n_tokens * rows)",
            n_tokens * rows,
            y.len(),
        )?;
        let row_bytes = w.ty.bytes_for(cols)?;
        check_len("matrix data bytes", row_bytes * rows, w.data.len())?;
        if n_tokens == 0 || rows == 0 {
            return Ok(());
        }
        let vt = VecDotType::of(w.ty);
        let stride = vt.bytes_for(cols);
        let act: &[u8] = if vt == VecDotType::F32 {
            // SAFETY: any f32 bit pattern is 4 valid bytes; the view lives no longer than `x`. Activations are
            // read as little-endian f32, which on x86-64 (the only SIMD target) is the native order.
            unsafe { std::slice::from_raw_parts(x.as_ptr().cast::<u8>(), std::mem::size_of_val(x)) }
        } else {
            self.quantize_tokens(pool, vt, x, n_tokens, cols, stride, &mut scratch.act);
            &scratch.act[..n_tokens * stride]
        };

        let slot = type_slot(w.ty);
        let (dot, tile4x1, tile4x4) = (self.dot[slot], self.tile4x1[slot], self.tile4x4[slot]);
        // Work items are (token block, row chunk): a block's activations stay in cache while the chunk's
        // rows stream past them.
        let t_block = ((64 << 10) / stride.max(1)).max(TOKEN_TILE) / TOKEN_TILE * TOKEN_TILE;
        let n_tblocks = n_tokens.div_ceil(t_block);
        let chunk = chunk_rows(rows, pool.n_threads());
        let n_chunks = rows.div_ceil(chunk);
        let n_items = n_tblocks * n_chunks;
        let next = AtomicUsize::new(0);
        let out = OutPtr(y.as_mut_ptr());
        let data = w.data;
        pool.run(|_, _| {
            loop {
                let item = next.fetch_add(1, Ordering::Relaxed);
                if item >= n_items {
                    break;
                }
                let (tb, c) = (item / n_chunks, item % n_chunks);
                let (t_lo, t_hi) = (tb * t_block, ((tb + 1) * t_block).min(n_tokens));
                let (r0, r1) = (c * chunk, ((c + 1) * chunk).min(rows));
                let r4 = r0 + (r1 - r0) / 4 * 4;
                let mut t = t_lo;
                if let Some(tile) = tile4x4 {
                    while t + TOKEN_TILE <= t_hi {
                        for r in (r0..r4).step_by(4) {
                            // SAFETY: rows r..r+4 < rows and tokens t..t+4 < n_tokens exist in `data` / `act`
                            // (lengths checked above); outputs (t.., r..) are inside `y` and belong to this
                            // chunk only. The table's CPU features were detected when it was built.
                            unsafe {
                                tile(
                                    cols,
                                    data.as_ptr().add(r * row_bytes),
                                    row_bytes,
                                    act.as_ptr().add(t * stride),
                                    stride,
                                    out.get().add(t * rows + r),
                                    rows,
                                )
                            };
                        }
                        for r in r4..r1 {
                            for k in t..t + TOKEN_TILE {
                                dot_one(dot, cols, data, row_bytes, act, stride, r, k, out, rows);
                            }
                        }
                        t += TOKEN_TILE;
                    }
                }
                for t in t..t_hi {
                    let mut r = r0;
                    if let Some(tile) = tile4x1 {
                        while r < r4 {
                            // SAFETY: as above, 4 rows and one token.
                            unsafe {
                                tile(
                                    cols,
                                    data.as_ptr().add(r * row_bytes),
                                    row_bytes,
                                    act.as_ptr().add(t * stride),
                                    stride,
                                    out.get().add(t * rows + r),
                                    rows,
                                )
                            };
                            r += 4;
                        }
                    }
                    for r in r..r1 {
                        dot_one(dot, cols, data, row_bytes, act, stride, r, t, out, rows);
                    }
                }
            }
        });
        Ok(())
    }

    /// Converts `n_tokens` rows of `x` into `buf` (grown as needed), on the pool when there are many.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn quantize_tokens(
        &self,
        pool: &Pool,
        vt: VecDotType,
        x: &[f32],
        n_tokens: usize,
        cols: usize,
        stride: usize,
        buf: &mut Vec<u8>,
    ) {
        let need = n_tokens * stride;
        if buf.len() < need {
            buf.resize(need, 0);
        }
        if cols == 0 || stride == 0 {
            return;
        }
        let q = self.quantize[vt.slot()];
        if n_tokens < PARALLEL_QUANTIZE_TOKENS || pool.n_threads() == 1 {
            for (xr, dst) in x.chunks_exact(cols).zip(buf.chunks_exact_mut(stride)) {
                // SAFETY: `xr` is `cols` values (a whole number of blocks: the caller checked the weight row
                // length) and `dst` exactly their bytes.
                unsafe { q(xr, dst) };
            }
            return;
        }
        let out = OutPtr(buf.as_mut_ptr().cast());
        pool.run(|i, n| {
            for t in (i..n_tokens).step_by(n) {
                // SAFETY: token rows are disjoint; thread `i` takes tokens i, i+n, ...; `buf` outlives `run`.
                let dst = unsafe {
                    std::slice::from_raw_parts_mut(out.get().cast::<u8>().add(t * stride), stride)
                };
                // SAFETY: as in the serial branch.
                unsafe { q(&x[t * cols..(t + 1) * cols], dst) };
            }
        });
    }
}

/// One output `y[t * rows + r]` through the single dot product.
#[inline]
#[allow(clippy::too_many_arguments)]
fn dot_one(
    dot: DotFn,
    cols: usize,
    data: &[u8],
    row_bytes: usize,
    act: &[u8],
    stride: usize,
    r: usize,
    t: usize,
    out: OutPtr,
    rows: usize,
) {
    let wr = &data[r * row_bytes..(r + 1) * row_bytes];
    let a = &act[t * stride..(t + 1) * stride];
    // SAFETY: one row and one token of `cols` values; the table's features were detected.
    let v = unsafe { dot(cols, wr, a) };
    // SAFETY: `t * rows + r < y.len()`, and row `r` belongs to the calling chunk only.
    unsafe { *out.get().add(t * rows + r) = v };
}

/// Rows per work chunk: about 8 chunks per thread for balance, a multiple of 4, at least 4.
fn chunk_rows(rows: usize, n_threads: usize) -> usize {
    if n_threads <= 1 {
        return rows.max(1);
    }
    (rows / (n_threads * 8)).next_multiple_of(4).max(4)
}
