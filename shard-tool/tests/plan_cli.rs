//! `shard-tool plan --shape llama3-405b`: the per-node memory it prints equals what the Llama 3.1 405B shapes
//! (DESIGN.md §3: hidden 16384, 126 layers, 128 heads, 8 KV heads, head_dim 128, FFN 53248, vocab 128256)
//! give by hand, for TP=8 × PP=2 and TP=16 × PP=1.

mod common;

use common::{assert_ok, shard_tool, stdout};

const HIDDEN: u64 = 16384;
const LAYERS: u64 = 126;
const HEADS: u64 = 128;
const KV_HEADS: u64 = 8;
const HEAD_DIM: u64 = 128;
const FFN: u64 = 53248;
const VOCAB: u64 = 128256;
const BF16: u64 = 2;
const F32: u64 = 4;

fn nodes(tp: u64, pp: u64, ctx: u64) -> Vec<serde_json::Value> {
    let o = shard_tool([
        "plan",
        "--shape",
        "llama3-405b",
        "--quant",
        "BF16",
        "--tp",
        &tp.to_string(),
        "--pp",
        &pp.to_string(),
        "--ctx",
        &ctx.to_string(),
        "--json",
    ]);
    assert_ok(&o);
    serde_json::from_str(&stdout(&o)).unwrap()
}

/// Weight bytes of one layer on one rank when `tp` ranks share it evenly.
fn layer_bytes_per_rank(tp: u64) -> u64 {
    let q_heads = HEADS / tp;
    let kv_heads = (KV_HEADS / tp).max(1); // replicated when tp > 8
    let attn = (q_heads * HEAD_DIM * HIDDEN) * 2 + 2 * kv_heads * HEAD_DIM * HIDDEN; // q + output, k + v
    let ffn = 3 * (FFN / tp) * HIDDEN;
    (attn + ffn) * BF16 + 2 * HIDDEN * F32 // + attn_norm, ffn_norm
}

#[test]
fn tp16_pp1_memory_matches_the_shapes() {
    let ctx = 8192;
    let got = nodes(16, 1, ctx);
    assert_eq!(got.len(), 16);
    let vocab_rows = VOCAB / 16; // 8016, an even split
    let rope_freqs = HEAD_DIM / 2 * F32;
    let weights = LAYERS * layer_bytes_per_rank(16)
        + 2 * vocab_rows * HIDDEN * BF16
        + HIDDEN * F32
        + rope_freqs;
    let kv = ctx * LAYERS * HEAD_DIM * 2 * BF16; // one KV head per rank
    for n in &got {
        assert_eq!(n["weight_bytes"].as_u64().unwrap(), weights, "{n}");
        assert_eq!(n["kv_cache_bytes"].as_u64().unwrap(), kv, "{n}");
        assert_eq!(n["total"].as_u64().unwrap(), weights + kv);
    }
    // ≈ 405.9e9 parameters · 2 bytes / 16, plus the replicated KV heads and norms.
    assert!((weights as f64 / (405.85e9 * 2.0 / 16.0) - 1.0).abs() < 0.02);
}

#[test]
fn tp8_pp2_memory_matches_the_shapes() {
    let ctx = 4096;
    let got = nodes(8, 2, ctx);
    assert_eq!(got.len(), 16);
    let vocab_rows = VOCAB / 8;
    let stage_layers = LAYERS / 2; // 63 + 63
    let rope_freqs = HEAD_DIM / 2 * F32;
    let first = stage_layers * layer_bytes_per_rank(8) + vocab_rows * HIDDEN * BF16 + rope_freqs;
    let last = stage_layers * layer_bytes_per_rank(8)
        + vocab_rows * HIDDEN * BF16
        + HIDDEN * F32
        + rope_freqs;
    let kv = ctx * stage_layers * HEAD_DIM * 2 * BF16;
    for n in &got {
        let want = if n["stage"] == 0 { first } else { last };
        assert_eq!(n["weight_bytes"].as_u64().unwrap(), want, "{n}");
        assert_eq!(n["kv_cache_bytes"].as_u64().unwrap(), kv, "{n}");
    }
}
