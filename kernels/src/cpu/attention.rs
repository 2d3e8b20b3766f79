//! Attention of query heads over an f16 KV cache with online softmax (Milakov & Gimelshein 2018,
//! <https://arxiv.org/abs/1805.02867>; Rabe & Staats 2021, <https://arxiv.org/abs/2112.05682>), so long
//! contexts need no `n_kv`-sized score buffer.
//!
//! What is matched: llama.cpp's CPU flash-attention path (`ggml_compute_forward_flash_attn_ext_f16`), which
//! is its default (`flash_attn_type = AUTO` resolves to enabled on CPU). Q is rounded to f16 (K's
//! `vec_dot_type`), `s = (q16 · k_j)` accumulated in f32 as `ggml_vec_dot_f16`, scaled, then the running max
//! / sum update of that function (`ms = expf(M_old - M)`, `vs = expf(s - M)`, `S = S·ms + vs`) and a final
//! multiply by `1/S`. One deliberate difference: ggml accumulates `Σ vs·v_j` in an f16 vector when V is
//! f16; here it stays f32, which is more accurate and differs from ggml by f16 rounding of the output.
//! (llama.cpp's non-flash path also rounds Q to f16 for `K·Q`, and the probabilities to f16 for `V·P`.)
//!
//! KV cache layout: position-major, `[pos][kv_head][head_dim]` f16 for both K and V.

use half::f16;

use super::isa::Kernels;
use super::layout::{VecDotType, type_slot};
use super::{KernelError, Pool, check_len};
use crate::quant::GgmlType;

/// Largest head dimension supported (the f16 query and the accumulator live on the stack).
const MAX_HEAD_DIM: usize = 512;

/// Head counts of one attention layer. Query head `h` reads KV head `h / (n_heads / n_kv_heads)` (GQA, as
/// llama.cpp broadcasts K/V over consecutive query heads).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl AttnShape {
    fn check(&self) -> Result<(), KernelError> {
        if self.n_heads == 0
            || self.n_kv_heads == 0
            || !self.n_heads.is_multiple_of(self.n_kv_heads)
        {
            return Err(KernelError::Invalid(
                "attention: n_heads must be a non-zero multiple of n_kv_heads",
            ));
        }
        if self.head_dim == 0 || self.head_dim > MAX_HEAD_DIM {
            return Err(KernelError::Invalid(
                "attention: head_dim must be in 1..=512",
            ));
        }
        Ok(())
    }
}

fn f16_bytes(x: &[f16]) -> &[u8] {
    // SAFETY: `f16` is a plain 2-byte value (`repr(transparent)` over u16); every byte pattern is valid as u8.
    unsafe { std::slice::from_raw_parts(x.as_ptr().cast::<u8>(), std::mem::size_of_val(x)) }
}

/// Attention of one query head over `n_kv` cached positions:
/// `out[d] = Σ_j softmax_j(scale · q·k_j) · v_j[d]`, where key `j` is `k[j*kv_stride ..][..head_dim]` and
/// value `j` is `v[j*kv_stride ..][..head_dim]`, `head_dim = q.len() = out.len()`. `n_kv == 0` gives zeros.
pub fn attention(
    q: &[f32],
    k: &[f16],
    v: &[f16],
    kv_stride: usize,
    n_kv: usize,
    scale: f32,
    out: &mut [f32],
) -> Result<(), KernelError> {
    let d = q.len();
    check_len("attention output length (head_dim)", d, out.len())?;
    if d == 0 || d > MAX_HEAD_DIM {
        return Err(KernelError::Invalid(
            "attention: head_dim must be in 1..=512",
        ));
    }
    if n_kv > 0 {
        if kv_stride < d {
            return Err(KernelError::Invalid("attention: kv_stride < head_dim"));
        }
        let need = (n_kv - 1) * kv_stride + d;
        for (what, len) in [
            ("attention key cache length", k.len()),
            ("attention value cache length", v.len()),
        ] {
            if len < need {
                return Err(KernelError::Shape {
                    what,
                    expected: need,
                    got: len,
                });
            }
        }
    }
    let kern = Kernels::best();
    if n_kv > 0 {
        // SAFETY: one row of `d` values in `q` and `out` (checked above); keys and values checked above.
        unsafe {
            rows_of_kv_head(
                kern,
                q,
                out.as_mut_ptr(),
                d,
                1,
                1,
                k,
                v,
                kv_stride,
                n_kv,
                d,
                scale,
            )
        };
    } else {
        out.fill(0.0);
    }
    Ok(())
}

/// Rows of one KV head: row `r` is head `r % group` of token `r / group` (rows `tok_stride` floats apart
/// per token, `d` apart within a token) and sees `n_kv0 + r / group` positions. Uses the level's blocked
/// kernel when it has one and `d` suits it, else one row at a time.
///
/// # Safety
/// `q` spans all rows; `out` points at row 0 of an output laid out like `q`, and those rows (only) are
/// writable and not accessed by anyone else during the call; `k`/`v` hold the positions the rows read.
#[allow(clippy::too_many_arguments)]
unsafe fn rows_of_kv_head(
    kern: &Kernels,
    q: &[f32],
    out: *mut f32,
    tok_stride: usize,
    n_tok: usize,
    group: usize,
    k: &[f16],
    v: &[f16],
    kv_stride: usize,
    n_kv0: usize,
    d: usize,
    scale: f32,
) {
    debug_assert!(q.len() >= (n_tok - 1) * tok_stride + group * d);
    #[cfg(target_arch = "x86_64")]
    if let Some(f) = kern.attn_rows
        && d.is_multiple_of(16)
        && d <= super::avx512::attention::MAX_DIM
    {
        use super::avx512::attention::MAX_ROWS;
        let (kb, vb) = (f16_bytes(k), f16_bytes(v));
        let (qp, op) = (q.as_ptr(), out);
        let call = |t0: usize, h0: usize, tokens: usize, heads: usize| {
            let at = t0 * tok_stride + h0 * d;
            // SAFETY: rows (t0.., h0..) of `q`/`out` are inside them (caller contract); the KV head holds the
            // `n_kv0 + t0 + tokens - 1` positions these rows read (checked by the callers); `d` is a multiple
            // of 16 within the kernel's bound; the table's features were detected.
            unsafe {
                f(
                    qp.add(at),
                    op.add(at),
                    tok_stride,
                    tokens * heads,
                    heads,
                    kb.as_ptr(),
                    vb.as_ptr(),
                    2 * kv_stride,
                    n_kv0 + t0,
                    d,
                    scale,
                )
            };
        };
        if group > MAX_ROWS {
            for t in 0..n_tok {
                for h0 in (0..group).step_by(MAX_ROWS) {
                    call(t, h0, 1, (group - h0).min(MAX_ROWS));
                }
            }
        } else {
            let per_call = MAX_ROWS / group;
            for t0 in (0..n_tok).step_by(per_call) {
                call(t0, 0, (n_tok - t0).min(per_call), group);
            }
        }
        return;
    }
    for t in 0..n_tok {
        for h in 0..group {
            let at = t * tok_stride + h * d;
            // SAFETY: row (t, h) of `out` is `d` writable floats owned by this call (caller contract).
            let o = unsafe { std::slice::from_raw_parts_mut(out.add(at), d) };
            head(kern, &q[at..at + d], k, v, kv_stride, n_kv0 + t, scale, o);
        }
    }
}

/// One head, arguments checked.
#[allow(clippy::too_many_arguments)]
fn head(
    kern: &Kernels,
    q: &[f32],
    k: &[f16],
    v: &[f16],
    kv_stride: usize,
    n_kv: usize,
    scale: f32,
    out: &mut [f32],
) {
    let d = q.len();
    let mut q16 = [0u8; 2 * MAX_HEAD_DIM];
    let q16 = &mut q16[..2 * d];
    let dot = kern.dot[type_slot(GgmlType::F16)];
    let axpy = kern.axpy_f16;
    // SAFETY: `q16` holds exactly `d` f16 values; the table's features were detected.
    unsafe { (kern.quantize[VecDotType::F16.slot()])(q, q16) };
    let mut acc = [0.0f32; MAX_HEAD_DIM];
    let acc = &mut acc[..d];
    let (kb, vb) = (f16_bytes(k), f16_bytes(v));
    let (mut m, mut s_sum) = (f32::NEG_INFINITY, 0.0f32);
    for j in 0..n_kv {
        let kj = &kb[2 * j * kv_stride..2 * (j * kv_stride + d)];
        let vj = &vb[2 * j * kv_stride..2 * (j * kv_stride + d)];
        // SAFETY: `kj` and `q16` are `d` f16 values each (lengths checked by the callers).
        let s = unsafe { dot(d, kj, q16) } * scale;
        let (mut ms, mut vs) = (1.0f32, 1.0f32);
        if s > m {
            let old = m;
            m = s;
            ms = (old - m).exp();
            for a in acc.iter_mut() {
                *a *= ms;
            }
        } else {
            vs = (s - m).exp();
        }
        // SAFETY: `vj` holds `d` f16 values, `acc` `d` floats.
        unsafe { axpy(acc, vj, vs) };
        s_sum = s_sum * ms + vs;
    }
    let inv = if s_sum == 0.0 { 0.0 } else { 1.0 / s_sum };
    for (o, a) in out.iter_mut().zip(acc.iter()) {
        *o = a * inv;
    }
}

/// Causal attention of `n_tokens` consecutive query tokens at positions `n_past..n_past + n_tokens` (all
/// heads of each token) against a KV cache already holding positions `0..n_past + n_tokens`; token `t`
/// attends to positions `0..=n_past + t`. Work is split over the pool by (token, KV head), each item doing
/// the KV head's whole group of query heads.
///
/// `q` and `out`: `n_tokens` rows of `n_heads * head_dim`. `k_cache`/`v_cache`: position-major
/// `[pos][n_kv_heads][head_dim]`, at least `n_past + n_tokens` positions. Decode is `n_tokens = 1`.
#[allow(clippy::too_many_arguments)]
pub fn attention_batch(
    pool: &Pool,
    shape: AttnShape,
    q: &[f32],
    n_tokens: usize,
    n_past: usize,
    k_cache: &[f16],
    v_cache: &[f16],
    scale: f32,
    out: &mut [f32],
) -> Result<(), KernelError> {
    Kernels::best().attention_batch(
        pool, shape, q, n_tokens, n_past, k_cache, v_cache, scale, out,
    )
}

impl Kernels {
    /// [`attention_batch`] with this table's kernels.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_batch(
        &self,
        pool: &Pool,
        shape: AttnShape,
        q: &[f32],
        n_tokens: usize,
        n_past: usize,
        k_cache: &[f16],
        v_cache: &[f16],
        scale: f32,
        out: &mut [f32],
    ) -> Result<(), KernelError> {
        attention_batch_with(
            self, pool, shape, q, n_tokens, n_past, k_cache, v_cache, scale, out,
        )
    }
}

#[allow(clippy::too_many_arguments)]
fn attention_batch_with(
    kern: &Kernels,
    pool: &Pool,
    shape: AttnShape,
    q: &[f32],
    n_tokens: usize,
    n_past: usize,
    k_cache: &[f16],
    v_cache: &[f16],
    scale: f32,
    out: &mut [f32],
) -> Result<(), KernelError> {
    shape.check()?;
    let AttnShape {
        n_heads,
        n_kv_heads,
        head_dim,
    } = shape;
    let q_row = n_heads * head_dim;
    check_len(
        "attention query length (n_tokens * n_heads * head_dim)",
        n_tokens * q_row,
        q.len(),
    )?;
    check_len("attention output length", n_tokens * q_row, out.len())?;
    let kv_row = n_kv_heads * head_dim;
    let need = (n_past + n_tokens) * kv_row;
    for (what, len) in [
        ("key cache length", k_cache.len()),
        ("value cache length", v_cache.len()),
    ] {
        if len < need {
            return Err(KernelError::Shape {
                what,
                expected: need,
                got: len,
            });
        }
    }
    let group = n_heads / n_kv_heads;
    // One work item per (tile of tokens, KV head): the group's query heads of several tokens share every
    // key and value load. Items are claimed from a counter since causal rows differ in length.
    let tile = 4;
    let n_tiles = n_tokens.div_ceil(tile);
    let n_items = n_tiles * n_kv_heads;
    let next = std::sync::atomic::AtomicUsize::new(0);
    struct Out(*mut f32);
    // SAFETY: each item writes only its own rows of `out`; `run` joins before returning.
    unsafe impl Sync for Out {}
    impl Out {
        fn get(&self) -> *mut f32 {
            self.0
        }
    }
    let o = Out(out.as_mut_ptr());
    let out_len = out.len();
    pool.run(|_, _| {
        loop {
            let item = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if item >= n_items {
                break;
            }
            let (ti, kvh) = (item / n_kv_heads, item % n_kv_heads);
            let t0 = ti * tile;
            let n_tok = (n_tokens - t0).min(tile);
            let at = t0 * q_row + kvh * group * head_dim;
            let span = (n_tok - 1) * q_row + group * head_dim;
            let off = kvh * head_dim;
            debug_assert!(at + span <= out_len);
            // SAFETY: item (tile, kvh) writes only its KV head's group rows in its tokens (inside `out`:
            // `at + span <= out.len()`), which no other item touches; `run` joins before `out` is released.
            unsafe {
                rows_of_kv_head(
                    kern,
                    &q[at..at + span],
                    o.get().add(at),
                    q_row,
                    n_tok,
                    group,
                    &k_cache[off..],
                    &v_cache[off..],
                    kv_row,
                    n_past + t0 + 1,
                    head_dim,
                    scale,
                )
            };
        }
    });
    Ok(())
}
