//! CPU compute kernels for Llama-family inference: quantized matmul against GGUF weights (activations
//! quantized to the weight type's `vec_dot_type` first, as llama.cpp's CPU backend does), row lookup, RMS
//! norm, RoPE, SwiGLU, softmax and attention over an f16 KV cache, with a persistent thread pool.
//!
//! Numerics follow ggml's CPU backend (`ggml-cpu/ops.cpp`, `vec.cpp`, `arch/x86/quants.c` of the llama.cpp
//! vendored in llama-cpp-python 0.3.36) so that results agree with llama.cpp to float-rounding level; each
//! function says what it matches. Kernels exist per instruction set (`scalar`, `avx2`, `avx512` sibling
//! modules with the same file names); [`Kernels::best`] picks one table at run time by CPU-feature detection
//! (never `target-cpu=native`), and every SIMD kernel is tested against its scalar twin.
//!
//! # Use
//! - Pack every weight matrix once at load time with [`PackedMatrix::new`] and multiply with
//!   [`matmul_packed`]: on AVX-512 VNNI and on AVX2 machines Q4_0, Q4_1, Q8_0, Q4_K, Q6_K, F16, BF16 and
//!   F32 are interleaved 16 rows at a time (4-5× faster than the GGUF layout for quantized decode, 3-4×
//!   for prefill); other types and CPUs keep an owned GGUF-layout copy and the ordinary kernels. [`matmul`] on
//!   a borrowed [`QMatrix`] (e.g. straight from the mmap) stays available and gives the same results up to
//!   summation order.
//! - Keep the embedding table as a [`QMatrix`] for [`get_row`] (bit-exact dequantization); a tied output
//!   matrix can be packed separately.
//! - One [`Pool`] per process (threads = physical cores) and one [`Scratch`] per calling thread.
//!
//! Layouts: a token's activations are a row of `cols` f32; `n_tokens` rows back to back. Outputs likewise
//! (`y[t * rows + r]`). Nothing here allocates per call except through [`Scratch`], which grows once and is
//! reused. The KV cache is position-major `[pos][kv_head][head_dim]` f16.

use thiserror::Error;

use crate::quant::{GgmlType, QuantError, dequantize_row};

mod attention;
pub mod ggml_f32;
mod isa;
mod layout;
mod matmul;
mod ops;
mod packed;
pub mod pool;
mod scalar;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;

pub use attention::{AttnShape, attention, attention_batch};
pub use isa::{ISA_ENV, Isa, IsaEnvError, Kernels};
pub use layout::VecDotType;
pub use ops::{RopeCache, rms_norm, rope, silu_mul, softmax};
pub use packed::{PackedMatrix, matmul_packed};
pub use pool::Pool;

/// Shape and length errors of kernel calls. Kernels never panic on caller input.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum KernelError {
    /// A buffer or dimension does not have the size the other arguments imply.
    #[error("{what}: expected {expected}, got {got}")]
    Shape {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    /// A row index past the end of a matrix.
    #[error("row {row} out of range for a matrix of {rows} rows")]
    RowOutOfRange { row: usize, rows: usize },
    /// A parameter outside its domain (odd `rope_dim`, `n_heads` not a multiple of `n_kv_heads`, ...).
    #[error("invalid argument: {0}")]
    Invalid(&'static str),
    /// Block alignment or byte length of quantized data.
    #[error(transparent)]
    Quant(#[from] QuantError),
}

pub(crate) fn check_len(
    what: &'static str,
    expected: usize,
    got: usize,
) -> Result<(), KernelError> {
    if expected == got {
        Ok(())
    } else {
        Err(KernelError::Shape {
            what,
            expected,
            got,
        })
    }
}

/// A row-major weight matrix in a GGML type: `rows` rows of `cols` elements, rows back to back (a GGUF 2-D
/// tensor with `ne0 = cols`, `ne1 = rows`). Borrowed, typically from a memory-mapped file; no alignment
/// is required.
#[derive(Debug, Clone, Copy)]
pub struct QMatrix<'a> {
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    pub data: &'a [u8],
}

impl<'a> QMatrix<'a> {
    /// Checks that `cols` is a whole number of blocks and `data` exactly `rows` rows of it.
    pub fn new(
        ty: GgmlType,
        rows: usize,
        cols: usize,
        data: &'a [u8],
    ) -> Result<Self, KernelError> {
        let row_bytes = ty.bytes_for(cols)?;
        let expected = row_bytes
            .checked_mul(rows)
            .ok_or(QuantError::SizeOverflow { ty, n: cols })?;
        check_len("matrix data bytes", expected, data.len())?;
        Ok(Self {
            ty,
            rows,
            cols,
            data,
        })
    }

    /// Bytes of one row.
    pub fn row_bytes(&self) -> usize {
        self.data.len().checked_div(self.rows).unwrap_or(0)
    }

    /// The bytes of row `r`, or `None` past the end.
    pub fn row(&self, r: usize) -> Option<&'a [u8]> {
        if r >= self.rows {
            return None;
        }
        let b = self.row_bytes();
        self.data.get(r * b..(r + 1) * b)
    }
}

/// Reusable scratch memory for [`matmul`] (the quantized activations) and attention; grows to the largest
/// call and is kept. One per thread of the caller (the pool's workers need none).
#[derive(Debug, Default)]
pub struct Scratch {
    pub(crate) act: Vec<u8>,
    /// Per activation block values of the packed kernels (scale, `Σa` correction).
    pub(crate) aux: Vec<u32>,
}

impl Scratch {
    pub fn new() -> Self {
        Self::default()
    }
}

/// `y[t*rows + r] = Σ_c W[r][c] · x[t*cols + c]` for `t` in `0..n_tokens`, with the best kernels for this CPU.
///
/// Like llama.cpp, `x` is first converted to the weight type's [`VecDotType`] (Q4_0, Q5_0, Q8_0 → Q8_0;
/// Q4_1, Q5_1 → Q8_1; k-quants → Q8_K; F16 → F16; BF16 → BF16; F32 stays F32), so results match llama.cpp
/// to float-rounding level. Rows are split across the pool's threads; with several tokens, each weight row
/// is dotted with 4 tokens at a time to reuse its decoded values.
pub fn matmul(
    pool: &Pool,
    w: &QMatrix,
    x: &[f32],
    n_tokens: usize,
    y: &mut [f32],
    scratch: &mut Scratch,
) -> Result<(), KernelError> {
    Kernels::best().matmul(pool, w, x, n_tokens, y, scratch)
}

/// Dequantizes row `r` of `w` into `dst` (`dst.len() == w.cols`): the embedding lookup. Bit-exact with
/// ggml's `dequantize_row_*` (`get_rows`).
pub fn get_row(w: &QMatrix, r: usize, dst: &mut [f32]) -> Result<(), KernelError> {
    check_len("get_row destination length", w.cols, dst.len())?;
    let row = w.row(r).ok_or(KernelError::RowOutOfRange {
        row: r,
        rows: w.rows,
    })?;
    dequantize_row(w.ty, row, dst)?;
    Ok(())
}
