//! Per-node memory estimate of a plan: the shard's weights plus its KV cache.
//!
//! KV cache bytes of a node = ctx · batch · (layers in its stage) · (KV heads on its rank) · head_dim · 2 (K and
//! V) · element bytes. Replicated KV heads (tp > n_head_kv) count on every rank holding them, because each rank
//! computes and stores them. Not included: activations, attention scratch, logits buffers, communication
//! buffers and allocator overhead — for a large model at long context they are small next to weights + KV, but
//! leave headroom (a few percent, more for large prefill batches).

use serde::{Deserialize, Serialize};

use super::ShardPlan;
use crate::config::ModelConfig;

/// Estimated memory of one (stage, rank).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeMemory {
    pub stage: usize,
    pub rank: usize,
    /// Bytes of the shard's tensor slices.
    pub weight_bytes: u64,
    /// Bytes of K and V for `ctx · batch` token positions of this stage's layers and this rank's KV heads.
    pub kv_cache_bytes: u64,
    /// `weight_bytes + kv_cache_bytes` (excludes activations and scratch; see the module doc).
    pub total: u64,
}

/// Memory per (stage, rank) of `plan` for `batch` sequences of `ctx` tokens with KV elements of
/// `kv_elem_bytes` (2 for f16/bf16). Saturates instead of overflowing.
pub fn memory_report(
    plan: &ShardPlan,
    config: &ModelConfig,
    ctx: usize,
    batch: usize,
    kv_elem_bytes: usize,
) -> Vec<NodeMemory> {
    // K and V of one head for one token (`ModelConfig::kv_bytes_per_token_per_head`, but saturating).
    let per_head_token = 2u64
        .saturating_mul(config.head_dim as u64)
        .saturating_mul(kv_elem_bytes as u64);
    plan.shards
        .iter()
        .map(|shard| {
            let layers = plan.stages.get(shard.stage).map_or(0, |s| s.layers.len());
            let kv_heads = shard.kv_heads.len();
            let kv_cache_bytes = [ctx, batch, layers, kv_heads]
                .into_iter()
                .fold(per_head_token, |acc, v| acc.saturating_mul(v as u64));
            let weight_bytes = shard.bytes();
            NodeMemory {
                stage: shard.stage,
                rank: shard.rank,
                weight_bytes,
                kv_cache_bytes,
                total: weight_bytes.saturating_add(kv_cache_bytes),
            }
        })
        .collect()
}
