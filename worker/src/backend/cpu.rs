//! `CpuBackend`: the forward pass's operations on `tessera_kernels::cpu` (SIMD kernels chosen at run time,
//! threaded on a [`Pool`]), with every activation buffer preallocated in host memory (llama2.c's
//! `RunState`): nothing is allocated per token.

use std::ops::Range;
use std::sync::Arc;

use tessera_kernels::cpu::{
    self, AttnShape, KernelError, Kernels, Pool, QMatrix, RopeCache, Scratch, attention_batch,
    get_row, rms_norm,
};

use super::{Backend, Buf, Device, SeqAttention, Tensor};
use crate::attention_f32::attention_batch_f32;
use crate::collective::Collective;
use crate::error::{Error, Result};
use crate::kv_cache::{KvCache, LayerKv};
use crate::weights::{Matrix, Weights};

pub(crate) struct CpuBackend {
    pool: Arc<Pool>,
    /// The kernel table of the engine's [`crate::Numerics`] (the CPU's best, or llama.cpp's AVX2 level) for
    /// unpacked matmuls, SwiGLU and the f32-cache softmax; packed matrices use the table that packed them.
    kernels: &'static Kernels,
    /// One buffer per [`Buf`], in `Buf::ALL` order, sized by the engine for its largest batch.
    bufs: [Vec<f32>; 10],
    /// RoPE cos/sin of each token's position (computed once per batch, used by every layer).
    rope: Vec<RopeCache>,
    /// Quantized activations for matmul.
    scratch: Scratch,
    /// [threads, ctx] attention scores over an f32 cache (grown to the largest cache seen; unused with f16).
    scores: Vec<f32>,
}

impl CpuBackend {
    /// Buffers of `lens[b]` values for each [`Buf`] `b` (in `Buf::ALL` order) and RoPE angles for
    /// `max_tokens` tokens.
    pub(crate) fn new(
        pool: Arc<Pool>,
        kernels: &'static Kernels,
        lens: [usize; 10],
        max_tokens: usize,
    ) -> Self {
        CpuBackend {
            pool,
            kernels,
            bufs: lens.map(|n| vec![0.0; n]),
            rope: vec![RopeCache::new(); max_tokens],
            scratch: Scratch::new(),
            scores: Vec::new(),
        }
    }

    fn buf(&mut self, b: Buf) -> &mut [f32] {
        &mut self.bufs[b as usize]
    }

    /// `a` to read and `b` to write, at once (`a != b`).
    fn pair(bufs: &mut [Vec<f32>; 10], a: Buf, b: Buf) -> (&[f32], &mut [f32]) {
        let (ia, ib) = (a as usize, b as usize);
        assert_ne!(ia, ib, "a backend operation reads and writes {a:?}");
        if ia < ib {
            let (lo, hi) = bufs.split_at_mut(ib);
            (&lo[ia], &mut hi[0])
        } else {
            let (lo, hi) = bufs.split_at_mut(ia);
            (&hi[0], &mut lo[ib])
        }
    }
}

impl Backend for CpuBackend {
    fn device(&self) -> Device {
        Device::Cpu
    }

    fn embed(&mut self, weights: &Weights<'_>, first: usize, tokens: &[u32]) -> Result<()> {
        let embd = weights
            .embedding()
            .ok_or_else(|| Error::Batch("this stage holds no token embedding".into()))?;
        let x = &mut self.bufs[Buf::X as usize][..tokens.len() * embd.cols];
        embed_rows(embd, first, tokens, x)
    }

    fn load_hidden(&mut self, hidden: &[f32]) -> Result<()> {
        self.buf(Buf::X)[..hidden.len()].copy_from_slice(hidden);
        Ok(())
    }

    fn rope_angles(&mut self, n: usize) -> &mut [RopeCache] {
        &mut self.rope[..n]
    }

    fn upload_rope(&mut self, _n: usize) -> Result<()> {
        Ok(())
    }

    fn rms_norm(
        &mut self,
        weights: &Weights<'_>,
        norm: Tensor,
        x: Buf,
        out: Buf,
        n: usize,
        eps: f32,
    ) -> Result<()> {
        let w = norm_of(weights, norm)?;
        let cols = w.len();
        let (x, out) = Self::pair(&mut self.bufs, x, out);
        rms_norm(&x[..n * cols], w, eps, &mut out[..n * cols]).map_err(|source| Error::Kernel {
            op: format!("rms_norm ({norm:?})"),
            source,
        })
    }

    fn matmul(&mut self, weights: &Weights<'_>, w: Tensor, x: Buf, y: Buf, n: usize) -> Result<()> {
        let w = matrix_of(weights, w)?;
        let (x, y) = Self::pair(&mut self.bufs, x, y);
        let (x, y) = (&x[..n * w.cols], &mut y[..n * w.rows]);
        match &w.packed {
            Some(p) => cpu::matmul_packed(&self.pool, p, x, n, y, &mut self.scratch),
            None => self
                .kernels
                .matmul(&self.pool, &qmatrix(w)?, x, n, y, &mut self.scratch),
        }
        .map_err(kernel(&w.name))
    }

    fn rope(
        &mut self,
        buf: Buf,
        tokens: Range<usize>,
        n_heads: usize,
        head_dim: usize,
    ) -> Result<()> {
        let row = n_heads * head_dim;
        let x = &mut self.bufs[buf as usize];
        for t in tokens {
            self.rope[t]
                .apply(&mut x[t * row..(t + 1) * row], n_heads, head_dim)
                .map_err(|source| Error::Kernel {
                    op: format!("rope ({buf:?})"),
                    source,
                })?;
        }
        Ok(())
    }

    fn attention(
        &mut self,
        layer: usize,
        shape: AttnShape,
        seq: &SeqAttention,
        cache: &mut KvCache,
        scale: f32,
    ) -> Result<()> {
        let (qd, kd) = (
            shape.n_heads * shape.head_dim,
            shape.n_kv_heads * shape.head_dim,
        );
        let toks = seq.tokens.clone();
        let n_tokens = toks.len();
        let rows_kv = toks.start * kd..toks.end * kd;
        let [_, _, q, k, v, att, ..] = &mut self.bufs;
        cache.write(layer, seq.start_pos, &k[rows_kv.clone()], &v[rows_kv])?;
        let (q, out) = (
            &q[toks.start * qd..toks.end * qd],
            &mut att[toks.start * qd..toks.end * qd],
        );
        match cache.layer(layer) {
            LayerKv::F16(k_cache, v_cache) => attention_batch(
                &self.pool,
                shape,
                q,
                n_tokens,
                seq.start_pos,
                k_cache,
                v_cache,
                scale,
                out,
            )
            .map_err(kernel("attention")),
            LayerKv::F32(k_cache, v_cache) => {
                let need = self.pool.n_threads() * cache.ctx().next_multiple_of(8);
                if self.scores.len() < need {
                    self.scores.resize(need, 0.0);
                }
                attention_batch_f32(
                    &self.pool,
                    self.kernels,
                    shape,
                    q,
                    n_tokens,
                    seq.start_pos,
                    k_cache,
                    v_cache,
                    scale,
                    out,
                    &mut self.scores,
                )
                .map_err(|msg| Error::Batch(format!("sequence {}: {msg}", seq.index)))
            }
            LayerKv::Gpu(..) => Err(Error::KvCache(format!(
                "sequence {}: its KV cache is in GPU memory, this engine runs on the CPU",
                seq.index
            ))),
        }
    }

    fn silu_mul(&mut self, len: usize) -> Result<()> {
        let (up, gate) = Self::pair(&mut self.bufs, Buf::Up, Buf::Gate);
        self.kernels
            .silu_mul(&mut gate[..len], &up[..len])
            .map_err(kernel("silu_mul"))
    }

    fn add(&mut self, x: Buf, d: Buf, len: usize) -> Result<()> {
        let (d, x) = Self::pair(&mut self.bufs, d, x);
        for (a, b) in x[..len].iter_mut().zip(&d[..len]) {
            *a += b;
        }
        Ok(())
    }

    fn all_reduce(&mut self, collective: &mut dyn Collective, buf: Buf, len: usize) -> Result<()> {
        collective.all_reduce_sum(&mut self.buf(buf)[..len])?;
        Ok(())
    }

    fn gather_rows(&mut self, src: Buf, rows: &[usize], dst: Buf, cols: usize) -> Result<()> {
        let (src, dst) = Self::pair(&mut self.bufs, src, dst);
        for (i, &r) in rows.iter().enumerate() {
            dst[i * cols..(i + 1) * cols].copy_from_slice(&src[r * cols..(r + 1) * cols]);
        }
        Ok(())
    }

    fn host(&mut self, buf: Buf, len: usize) -> Result<&[f32]> {
        Ok(&self.bufs[buf as usize][..len])
    }
}

/// Rows of `x` (`[n, n_embd]`) for `tokens`: the embedding row of a token this rank's slice (starting at
/// vocabulary row `first`) holds, zeros for the others. Shared with backends that look embeddings up on the
/// host and upload them.
pub(crate) fn embed_rows(
    embd: &Matrix<'_>,
    first: usize,
    tokens: &[u32],
    x: &mut [f32],
) -> Result<()> {
    let w = qmatrix(embd)?;
    for (&id, row) in tokens.iter().zip(x.chunks_exact_mut(embd.cols)) {
        match (id as usize).checked_sub(first).filter(|&r| r < embd.rows) {
            Some(r) => get_row(&w, r, row).map_err(kernel(&embd.name))?,
            None => row.fill(0.0),
        }
    }
    Ok(())
}

pub(crate) fn matrix_of<'w>(weights: &'w Weights<'_>, t: Tensor) -> Result<&'w Matrix<'w>> {
    weights
        .matrix(t)
        .ok_or_else(|| Error::Batch(format!("this shard holds no {t:?} matrix")))
}

pub(crate) fn norm_of<'w>(weights: &'w Weights<'_>, t: Tensor) -> Result<&'w [f32]> {
    weights
        .norm(t)
        .ok_or_else(|| Error::Batch(format!("this shard holds no {t:?} norm")))
}

fn qmatrix<'a>(w: &'a Matrix<'_>) -> Result<QMatrix<'a>> {
    QMatrix::new(w.ty, w.rows, w.cols, &w.data).map_err(kernel(&w.name))
}

pub(crate) fn kernel(op: &str) -> impl Fn(KernelError) -> Error + '_ {
    move |source| Error::Kernel {
        op: op.to_owned(),
        source,
    }
}
