//! The forward pass of one shard: llama.cpp's `llama` architecture graph (`llm_build_llama`), computed on
//! this rank's slices with an all-reduce at each of the three Megatron points.
//!
//! ```text
//! x = embd[tokens]                        (vocab-parallel: rows this rank holds, zeros elsewhere) → all-reduce
//! per layer:
//!   h = rms_norm(x) · attn_norm
//!   q, k, v = Wq·h, Wk·h, Wv·h            (this rank's heads: column-parallel)
//!   q, k = rope(q, pos), rope(k, pos)     (GGUF "normal" pair rotation; Llama 3.1 frequency factors)
//!   cache[pos] = k, v                     (f16, or f32)
//!   a = softmax(q·Kᵀ / √head_dim, causal) · V   (query head h reads KV head h / q_per_kv)
//!   x += all-reduce(Wo·a)                 (this rank's input columns: row-parallel)
//!   h = rms_norm(x) · ffn_norm
//!   x += all-reduce(Wdown·(silu(Wgate·h) ⊙ Wup·h))   (FFN rows / columns of this rank)
//! logits = Wout · (rms_norm(x) · output_norm)          (this rank's vocabulary rows; last stage only)
//! ```
//!
//! Every kernel follows ggml's CPU numerics (see `tessera_kernels::cpu`), so a single-rank engine agrees with
//! llama.cpp to rounding; tensor-parallel ranks differ from one rank only in the summation order of the
//! row-parallel products.

use tessera_kernels::cpu::{
    self, KernelError, Pool, QMatrix, Scratch, attention_batch, get_row, rms_norm, silu_mul,
};

use crate::attention_f32::attention_batch_f32;
use crate::batch::{Batch, Output};
use crate::engine::{Buffers, Engine};
use crate::error::{Error, Result};
use crate::kv_cache::{KvCache, LayerKv};
use crate::weights::Matrix;

impl Engine<'_> {
    /// Runs `batch` through this shard's layers. `caches[i]` is sequence `i`'s KV cache (made by
    /// [`Engine::new_cache`]); it must hold positions `0..start_pos` and ends up holding
    /// `0..start_pos + n_tokens`. Returns hidden states (not the last stage) or, for the tokens that asked
    /// for them, logits of this rank's vocabulary slice. On error, a cache holds `0..start_pos` again.
    pub fn forward(&mut self, batch: &Batch, caches: &mut [&mut KvCache]) -> Result<Output<'_>> {
        let n = self.check_batch(batch, caches)?;
        for (s, cache) in batch.seqs.iter().zip(caches.iter_mut()) {
            cache.truncate(s.start_pos);
        }
        let Engine {
            weights: w,
            config,
            spec,
            collective,
            pool,
            buffers,
            attn,
            ..
        } = self;
        let (e, hd, eps) = (config.n_embd, config.head_dim, config.rms_eps);
        let (qd, kd, fd) = (attn.n_heads * hd, attn.n_kv_heads * hd, spec.ffn_rows.len());
        let scale = 1.0 / (hd as f32).sqrt();
        let Buffers {
            x,
            xb,
            q,
            k,
            v,
            att,
            gate,
            up,
            xl,
            logits,
            rope,
            scratch,
            scores,
        } = buffers;
        let (x, xb) = (&mut x[..n * e], &mut xb[..n * e]);
        let (q, k, v, att) = (
            &mut q[..n * qd],
            &mut k[..n * kd],
            &mut v[..n * kd],
            &mut att[..n * qd],
        );
        let (gate, up) = (&mut gate[..n * fd], &mut up[..n * fd]);
        let mut mm = |w: &Matrix<'_>, x: &[f32], y: &mut [f32]| matmul(pool, w, x, n, y, scratch);

        // Input: the embedding of this rank's vocabulary rows (all-reduced), or the previous stage's output.
        if let Some(embd) = w.embedding() {
            embed(embd, spec.vocab_rows.start, &batch.tokens, x)?;
            collective.all_reduce_sum(x)?;
        } else {
            x.copy_from_slice(&batch.hidden);
        }

        // RoPE angles of every token's position, shared by all layers.
        let positions = batch
            .seqs
            .iter()
            .flat_map(|s| s.start_pos..s.start_pos + s.n_tokens);
        for (rope, pos) in rope.iter_mut().zip(positions) {
            let freqs = w.rope_freqs.as_deref();
            rope.compute(config.rope_dim, pos, config.rope_theta, freqs)
                .map_err(kernel("rope"))?;
        }

        for (l, layer) in w.blocks.iter().enumerate() {
            // Attention: this rank's heads.
            rms_norm(x, &layer.attn_norm, eps, xb).map_err(kernel("rms_norm (attn_norm)"))?;
            mm(&layer.attn_q, xb, q)?;
            mm(&layer.attn_k, xb, k)?;
            mm(&layer.attn_v, xb, v)?;
            let mut t0 = 0;
            for (i, (s, cache)) in batch.seqs.iter().zip(caches.iter_mut()).enumerate() {
                let toks = t0..t0 + s.n_tokens;
                t0 = toks.end;
                for t in toks.clone() {
                    rope[t]
                        .apply(&mut q[t * qd..(t + 1) * qd], attn.n_heads, hd)
                        .map_err(kernel("rope (q)"))?;
                    rope[t]
                        .apply(&mut k[t * kd..(t + 1) * kd], attn.n_kv_heads, hd)
                        .map_err(kernel("rope (k)"))?;
                }
                let (rows_q, rows_kv) = (
                    toks.start * qd..toks.end * qd,
                    toks.start * kd..toks.end * kd,
                );
                cache.write(l, s.start_pos, &k[rows_kv.clone()], &v[rows_kv]);
                let (q_seq, out) = (&q[rows_q.clone()], &mut att[rows_q]);
                match cache.layer(l) {
                    LayerKv::F16(k_cache, v_cache) => attention_batch(
                        pool,
                        *attn,
                        q_seq,
                        s.n_tokens,
                        s.start_pos,
                        k_cache,
                        v_cache,
                        scale,
                        out,
                    )
                    .map_err(kernel("attention"))?,
                    LayerKv::F32(k_cache, v_cache) => {
                        let need = pool.n_threads() * cache.ctx();
                        if scores.len() < need {
                            scores.resize(need, 0.0);
                        }
                        attention_batch_f32(
                            pool,
                            *attn,
                            q_seq,
                            s.n_tokens,
                            s.start_pos,
                            k_cache,
                            v_cache,
                            scale,
                            out,
                            scores,
                        )
                        .map_err(|msg| Error::Batch(format!("sequence {i}: {msg}")))?
                    }
                }
            }
            mm(&layer.attn_output, att, xb)?;
            collective.all_reduce_sum(xb)?;
            add(x, xb);

            // Feed-forward: this rank's FFN rows.
            rms_norm(x, &layer.ffn_norm, eps, xb).map_err(kernel("rms_norm (ffn_norm)"))?;
            mm(&layer.ffn_gate, xb, gate)?;
            mm(&layer.ffn_up, xb, up)?;
            silu_mul(gate, up).map_err(kernel("silu_mul"))?;
            mm(&layer.ffn_down, gate, xb)?;
            collective.all_reduce_sum(xb)?;
            add(x, xb);
        }

        for (s, cache) in batch.seqs.iter().zip(caches.iter_mut()) {
            cache.set_len(s.start_pos + s.n_tokens);
        }
        let (Some(head), Some(norm)) = (w.lm_head(), w.output_norm.as_deref()) else {
            return Ok(Output::Hidden(x));
        };

        // Final norm of the tokens that asked for logits, then this rank's vocabulary rows of the LM head.
        let mut rows = 0;
        for (t, _) in batch.logits.iter().enumerate().filter(|&(_, &want)| want) {
            let out = &mut xl[rows * e..(rows + 1) * e];
            rms_norm(&x[t * e..(t + 1) * e], norm, eps, out)
                .map_err(kernel("rms_norm (output_norm)"))?;
            rows += 1;
        }
        let logits = &mut logits[..rows * spec.vocab_rows.len()];
        matmul(pool, head, &xl[..rows * e], rows, logits, scratch)?;
        Ok(Output::Logits {
            data: logits,
            vocab: spec.vocab_rows.clone(),
        })
    }
}

/// Rows of `x` (`[n, n_embd]`) for `tokens`: the embedding row of a token this rank's slice (starting at
/// vocabulary row `first`) holds, zeros for the others; the all-reduce that follows completes the lookup.
fn embed(embd: &Matrix<'_>, first: usize, tokens: &[u32], x: &mut [f32]) -> Result<()> {
    let w = qmatrix(embd)?;
    for (&id, row) in tokens.iter().zip(x.chunks_exact_mut(embd.cols)) {
        match (id as usize).checked_sub(first).filter(|&r| r < embd.rows) {
            Some(r) => get_row(&w, r, row).map_err(kernel(&embd.name))?,
            None => row.fill(0.0),
        }
    }
    Ok(())
}

/// `y = W·x` for `n` tokens, errors naming the tensor.
fn matmul(
    pool: &Pool,
    w: &Matrix<'_>,
    x: &[f32],
    n: usize,
    y: &mut [f32],
    scratch: &mut Scratch,
) -> Result<()> {
    match &w.packed {
        Some(p) => cpu::matmul_packed(pool, p, x, n, y, scratch),
        None => cpu::matmul(pool, &qmatrix(w)?, x, n, y, scratch),
    }
    .map_err(kernel(&w.name))
}

fn qmatrix<'a>(w: &'a Matrix<'_>) -> Result<QMatrix<'a>> {
    QMatrix::new(w.ty, w.rows, w.cols, &w.data).map_err(kernel(&w.name))
}

/// `x += d` (the residual connection).
fn add(x: &mut [f32], d: &[f32]) {
    for (a, b) in x.iter_mut().zip(d) {
        *a += b;
    }
}

fn kernel(op: &str) -> impl Fn(KernelError) -> Error + '_ {
    move |source| Error::Kernel {
        op: op.to_owned(),
        source,
    }
}
