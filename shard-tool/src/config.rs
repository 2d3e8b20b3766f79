//! `ModelConfig`: the hyperparameters of a Llama-family model, one struct whatever the checkpoint format.
//! GGUF metadata (`llama.*` keys) and Hugging Face `config.json` both convert into it; the shard manifest
//! stores it as JSON, so workers need neither source format to run.

use serde::{Deserialize, Serialize};

/// Llama 3.1 "llama3" RoPE frequency scaling (config.json `rope_scaling` / `rope_parameters`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Llama3RopeScaling {
    pub factor: f32,
    pub low_freq_factor: f32,
    pub high_freq_factor: f32,
    pub original_max_position_embeddings: usize,
}

/// Hyperparameters of a Llama-architecture decoder. Names follow GGUF's `llama.*` keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// `general.architecture` (always "llama" for now; SmolLM2, Llama 2/3/3.1/3.2 all use it).
    pub arch: String,
    /// `general.name`, when the checkpoint has one.
    pub name: Option<String>,
    pub n_vocab: usize,
    /// Hidden size (`llama.embedding_length`, HF `hidden_size`).
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    /// Per-head dimension (`llama.attention.key_length`, default n_embd / n_head).
    pub head_dim: usize,
    /// FFN intermediate size.
    pub n_ff: usize,
    /// Training context (`llama.context_length`, HF `max_position_embeddings`).
    pub n_ctx_train: usize,
    /// RoPE base frequency; read from the file, never assumed (Llama 3 500000, SmolLM2 100000, PoSE 2e6).
    pub rope_theta: f32,
    /// Number of rotated dimensions per head (`llama.rope.dimension_count`, default head_dim).
    pub rope_dim: usize,
    /// Llama 3.1 scaling from config.json. GGUF files instead carry a precomputed `rope_freqs.weight` tensor.
    pub rope_scaling: Option<Llama3RopeScaling>,
    pub rms_eps: f32,
    /// No separate `output.weight`: the LM head reuses `token_embd.weight`.
    pub tied_embeddings: bool,
}

impl ModelConfig {
    /// Query heads that share one KV head.
    pub fn q_per_kv(&self) -> usize {
        self.n_head / self.n_head_kv
    }

    /// Bytes of KV cache per token per layer per KV head for an element size in bytes (K and V).
    pub fn kv_bytes_per_token_per_head(&self, elem_bytes: usize) -> u64 {
        2 * self.head_dim as u64 * elem_bytes as u64
    }

    /// Checks the relations between fields that the engine and planner rely on; `source` names the file.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("vocabulary size", self.n_vocab),
            ("embedding_length", self.n_embd),
            ("block_count", self.n_layer),
            ("attention.head_count", self.n_head),
            ("attention.head_count_kv", self.n_head_kv),
            ("head dimension", self.head_dim),
            ("feed_forward_length", self.n_ff),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(format!("{name} is 0"));
            }
        }
        if !self.n_head.is_multiple_of(self.n_head_kv) {
            return Err(format!(
                "attention.head_count ({}) is not a multiple of attention.head_count_kv ({})",
                self.n_head, self.n_head_kv
            ));
        }
        if self.rope_dim > self.head_dim || !self.rope_dim.is_multiple_of(2) {
            return Err(format!(
                "rope dimension {} must be even and ≤ head dimension {}",
                self.rope_dim, self.head_dim
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(format!(
                "rope theta {} must be a positive number",
                self.rope_theta
            ));
        }
        if !(self.rms_eps.is_finite() && self.rms_eps > 0.0) {
            return Err(format!(
                "rms epsilon {} must be a positive number",
                self.rms_eps
            ));
        }
        Ok(())
    }
}
