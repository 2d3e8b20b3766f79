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

use shard_tool::config::ModelConfig;
use shard_tool::plan::ShardSpec;
use tessera_kernels::cpu::AttnShape;

use crate::backend::{Backend, Buf, SeqAttention, Tensor};
use crate::batch::{Batch, Output};
use crate::collective::Collective;
use crate::engine::{Backends, Engine};
use crate::error::{Error, Result};
use crate::kv_cache::KvCache;
use crate::weights::Weights;

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
            weights,
            config,
            spec,
            collective,
            backend,
            attn,
            logit_rows,
            ..
        } = self;
        logit_rows.clear();
        logit_rows.extend(
            batch
                .logits
                .iter()
                .enumerate()
                .filter(|&(_, &want)| want)
                .map(|(t, _)| t),
        );
        let shard = Shard {
            w: weights,
            config,
            spec,
            attn: *attn,
            logit_rows,
        };
        match backend {
            Backends::Cpu(b) => run(b, &shard, collective.as_mut(), batch, caches, n),
            Backends::Cuda(b) => run(b.as_mut(), &shard, collective.as_mut(), batch, caches, n),
        }
    }
}

/// What the forward pass reads besides the batch: the shard's weights, config and layout.
struct Shard<'a, 'm> {
    w: &'a Weights<'m>,
    config: &'a ModelConfig,
    spec: &'a ShardSpec,
    attn: AttnShape,
    /// Batch rows of the tokens that want logits.
    logit_rows: &'a [usize],
}

/// The forward pass on backend `b` (see the module doc for the graph). `n` is the batch's token count,
/// already checked against the engine's buffers and the caches.
fn run<'b, B: Backend>(
    b: &'b mut B,
    shard: &Shard<'_, '_>,
    collective: &mut dyn Collective,
    batch: &Batch,
    caches: &mut [&mut KvCache],
    n: usize,
) -> Result<Output<'b>> {
    let Shard {
        w,
        config,
        spec,
        attn,
        logit_rows: rows,
    } = *shard;
    let (e, hd, eps) = (config.n_embd, config.head_dim, config.rms_eps);
    let fd = spec.ffn_rows.len();
    let scale = 1.0 / (hd as f32).sqrt();

    // Input: the embedding of this rank's vocabulary rows (all-reduced), or the previous stage's output.
    if w.embedding().is_some() {
        b.embed(w, spec.vocab_rows.start, &batch.tokens)?;
        b.all_reduce(collective, Buf::X, n * e)?;
    } else {
        b.load_hidden(&batch.hidden)?;
    }

    // RoPE angles of every token's position, shared by all layers.
    let positions = batch
        .seqs
        .iter()
        .flat_map(|s| s.start_pos..s.start_pos + s.n_tokens);
    for (rope, pos) in b.rope_angles(n).iter_mut().zip(positions) {
        let freqs = w.rope_freqs.as_deref();
        rope.compute(config.rope_dim, pos, config.rope_theta, freqs)
            .map_err(|source| Error::Kernel {
                op: "rope".into(),
                source,
            })?;
    }
    b.upload_rope(n)?;

    for l in 0..w.blocks.len() {
        // Attention: this rank's heads.
        b.rms_norm(w, Tensor::AttnNorm(l), Buf::X, Buf::Xb, n, eps)?;
        b.matmul(w, Tensor::AttnQ(l), Buf::Xb, Buf::Q, n)?;
        b.matmul(w, Tensor::AttnK(l), Buf::Xb, Buf::K, n)?;
        b.matmul(w, Tensor::AttnV(l), Buf::Xb, Buf::V, n)?;
        let mut t0 = 0;
        for (i, (s, cache)) in batch.seqs.iter().zip(caches.iter_mut()).enumerate() {
            let seq = SeqAttention {
                index: i,
                tokens: t0..t0 + s.n_tokens,
                start_pos: s.start_pos,
            };
            t0 = seq.tokens.end;
            b.rope(Buf::Q, seq.tokens.clone(), attn.n_heads, hd)?;
            b.rope(Buf::K, seq.tokens.clone(), attn.n_kv_heads, hd)?;
            b.attention(l, attn, &seq, cache, scale)?;
        }
        b.matmul(w, Tensor::AttnOutput(l), Buf::Att, Buf::Xb, n)?;
        b.all_reduce(collective, Buf::Xb, n * e)?;
        b.add(Buf::X, Buf::Xb, n * e)?;

        // Feed-forward: this rank's FFN rows.
        b.rms_norm(w, Tensor::FfnNorm(l), Buf::X, Buf::Xb, n, eps)?;
        b.matmul(w, Tensor::FfnGate(l), Buf::Xb, Buf::Gate, n)?;
        b.matmul(w, Tensor::FfnUp(l), Buf::Xb, Buf::Up, n)?;
        b.silu_mul(n * fd)?;
        b.matmul(w, Tensor::FfnDown(l), Buf::Gate, Buf::Xb, n)?;
        b.all_reduce(collective, Buf::Xb, n * e)?;
        b.add(Buf::X, Buf::Xb, n * e)?;
    }

    for (s, cache) in batch.seqs.iter().zip(caches.iter_mut()) {
        cache.set_len(s.start_pos + s.n_tokens);
    }
    if w.lm_head().is_none() || w.output_norm.is_none() {
        return Ok(Output::Hidden(b.host(Buf::X, n * e)?));
    }

    // Final norm of the tokens that asked for logits, then this rank's vocabulary rows of the LM head.
    b.gather_rows(Buf::X, rows, Buf::Xb, e)?;
    b.rms_norm(w, Tensor::OutputNorm, Buf::Xb, Buf::Xl, rows.len(), eps)?;
    b.matmul(w, Tensor::LmHead, Buf::Xl, Buf::Logits, rows.len())?;
    Ok(Output::Logits {
        data: b.host(Buf::Logits, rows.len() * spec.vocab_rows.len())?,
        vocab: spec.vocab_rows.clone(),
    })
}
