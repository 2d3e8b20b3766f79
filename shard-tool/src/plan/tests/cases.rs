//! Worked examples with hand-checked numbers: head and FFN splits, stage balancing (against brute force),
//! JSON round trip, and the memory report of Llama 3.1 405B.

use std::ops::Range;

use tessera_kernels::quant::GgmlType;

use super::{layer_of, model, plan_ok};
use crate::plan::*;
use crate::shapes::{Preset, tensor_descs};

#[test]
fn heads_follow_kv_groups_unevenly() {
    // SmolLM2: 9 query heads in 3 KV groups. tp=2: rank r gets KV heads [⌊3r/2⌋, ⌊3(r+1)/2⌋): 1 group, then 2.
    let (config, tensors) = model(Preset::SmolLm, GgmlType::Q8_0);
    let p = plan_ok(&config, &tensors, Topology::new(2, 1));
    let heads: Vec<_> = p
        .shards
        .iter()
        .map(|s| (s.q_heads.clone(), s.kv_heads.clone()))
        .collect();
    assert_eq!(heads, vec![(0..3, 0..1), (3..9, 1..3)]);
    let q = &p.shards[1]
        .tensors
        .iter()
        .find(|t| t.name == "blk.0.attn_q.weight")
        .unwrap();
    assert_eq!(
        (q.slice, q.shape.clone()),
        (
            Slice::Rows {
                start: 192,
                end: 576
            },
            vec![576, 384]
        )
    );
    let o = &p.shards[1]
        .tensors
        .iter()
        .find(|t| t.name == "blk.0.attn_output.weight")
        .unwrap();
    assert_eq!(
        o.slice,
        Slice::Cols {
            start: 192,
            end: 576
        }
    );

    // tp=4 > 3 KV heads: KV head 0 serves ranks 0 and 1 (its 3 query heads split 1 + 2), heads 1 and 2 one rank each.
    let p = plan_ok(&config, &tensors, Topology::new(4, 1));
    let heads: Vec<_> = p
        .shards
        .iter()
        .map(|s| (s.q_heads.clone(), s.kv_heads.clone()))
        .collect();
    assert_eq!(
        heads,
        vec![(0..1, 0..1), (1..3, 0..1), (3..6, 1..2), (6..9, 2..3)]
    );
}

#[test]
fn heads_405b_tp16_replicate_each_kv_head_on_two_ranks() {
    let (config, tensors) = model(Preset::Llama3_405B, GgmlType::BF16);
    let p = plan_ok(&config, &tensors, Topology::new(16, 1));
    for s in &p.shards {
        assert_eq!(s.q_heads.len(), 8, "rank {}", s.rank);
        assert_eq!(s.q_heads.start, 8 * s.rank);
        assert_eq!(s.kv_heads, s.rank / 2..s.rank / 2 + 1);
        assert_eq!(s.ffn_rows.len(), 53_248 / 16);
        let k = s
            .tensors
            .iter()
            .find(|t| t.name == "blk.7.attn_k.weight")
            .unwrap();
        assert_eq!(k.shape, vec![16_384, 128]);
        let o = s
            .tensors
            .iter()
            .find(|t| t.name == "blk.7.attn_output.weight")
            .unwrap();
        assert_eq!(o.shape, vec![1024, 16_384]);
    }
}

#[test]
fn ffn_cuts_fall_on_ffn_down_blocks() {
    // SmolLM2 n_ff 1536: Q8_0 → 48 blocks of 32; tp=5 → 9 or 10 blocks per rank.
    let (config, tensors) = model(Preset::SmolLm, GgmlType::Q8_0);
    let p = plan_ok(&config, &tensors, Topology::new(5, 1));
    let ffn: Vec<_> = p.shards.iter().map(|s| s.ffn_rows.clone()).collect();
    assert_eq!(ffn, vec![0..288, 288..608, 608..896, 896..1216, 1216..1536]);
    // Q4_K ffn_down (1536 = 6 blocks of 256) at tp=4: 1, 2, 1, 2 blocks.
    let (config, tensors) = model(Preset::SmolLm, GgmlType::Q4_K);
    let p = plan_ok(&config, &tensors, Topology::new(4, 1));
    let ffn: Vec<_> = p.shards.iter().map(|s| s.ffn_rows.clone()).collect();
    assert_eq!(ffn, vec![0..256, 256..768, 768..1024, 1024..1536]);
}

/// Bytes of a stage as the balancer defines it, from names and full tensor sizes.
fn stage_cost(tensors: &[TensorDesc], layers: Range<usize>, first: bool, last: bool) -> u64 {
    let tied = !tensors.iter().any(|t| t.name == "output.weight");
    tensors
        .iter()
        .filter(|t| match t.name.as_str() {
            "token_embd.weight" => first || (last && tied),
            "output.weight" | "output_norm.weight" => last,
            "rope_freqs.weight" => false,
            n => layers.contains(&layer_of(n).unwrap()),
        })
        .map(|t| t.n_bytes().unwrap())
        .sum()
}

#[test]
fn stage_balance_matches_brute_force() {
    // Seven layers of very different sizes: each layer in its own type.
    let types = [
        GgmlType::F32,
        GgmlType::Q4_0,
        GgmlType::BF16,
        GgmlType::Q2_K,
        GgmlType::Q8_0,
        GgmlType::F32,
        GgmlType::Q6_K,
    ];
    for tied in [false, true] {
        let mut config = Preset::Tiny.config_with_layers(Some(types.len()));
        config.tied_embeddings = tied;
        let mut tensors = tensor_descs(&config, GgmlType::Q4_K);
        for t in &mut tensors {
            if let Some(l) = layer_of(&t.name).filter(|_| t.shape.len() == 2) {
                t.ty = types[l];
            }
        }
        let n = types.len();
        for pp in 1..=n {
            let p = plan_ok(&config, &tensors, Topology::new(1, pp));
            let worst = |ranges: &[Range<usize>]| {
                ranges
                    .iter()
                    .enumerate()
                    .map(|(i, r)| stage_cost(&tensors, r.clone(), i == 0, i == pp - 1))
                    .max()
                    .unwrap()
            };
            let planned: Vec<_> = p.stages.iter().map(|s| s.layers.clone()).collect();
            // All ways to cut n layers into pp non-empty contiguous stages (choose pp-1 of n-1 cut points).
            let mut best = u64::MAX;
            for mask in 0u32..1 << (n - 1) {
                if mask.count_ones() as usize != pp - 1 {
                    continue;
                }
                let mut ranges = Vec::new();
                let mut start = 0;
                for cut in 1..n {
                    if mask & (1 << (cut - 1)) != 0 {
                        ranges.push(start..cut);
                        start = cut;
                    }
                }
                ranges.push(start..n);
                best = best.min(worst(&ranges));
            }
            assert_eq!(worst(&planned), best, "tied={tied} pp={pp}: {planned:?}");
        }
    }
}

#[test]
fn stage_balance_accounts_for_embedding_and_head() {
    // SmolLM2 Q8_0: token_embd (tied, so also the head) weighs about 8 layers; pp=4 puts 4 layers on each end.
    let (config, tensors) = model(Preset::SmolLm, GgmlType::Q8_0);
    let p = plan_ok(&config, &tensors, Topology::new(1, 4));
    let ranges: Vec<_> = p.stages.iter().map(|s| s.layers.clone()).collect();
    assert_eq!(ranges, vec![0..4, 4..15, 15..26, 26..30]);
    // 405B pp=2: the two ends are the same size (embedding vs output + norm), so 63 + 63.
    let (config, tensors) = model(Preset::Llama3_405B, GgmlType::BF16);
    let p = plan(&config, &tensors, &Topology::new(8, 2)).unwrap();
    assert_eq!(p.stages[0].layers, 0..63);
}

#[test]
fn plan_is_deterministic_and_round_trips_through_json() {
    let (config, tensors) = model(Preset::Llama3_8B, GgmlType::Q4_K);
    let topo = Topology::new(4, 2);
    let a = plan(&config, &tensors, &topo).unwrap();
    assert_eq!(a, plan(&config, &tensors, &topo).unwrap());
    let json = serde_json::to_string(&a).unwrap();
    assert!(
        json.contains(r#""slice":{"kind":"rows","start":0,"end":1024}"#),
        "{}",
        &json[..400]
    );
    let back: ShardPlan = serde_json::from_str(&json).unwrap();
    assert_eq!(back, a);
}

/// Independent weight bytes of one rank of Llama 3.1 405B in BF16 (norms and rope_freqs F32), from the shapes.
fn bf16_405b_rank_bytes(tp: u64, layers: u64, embedding: bool, head: bool) -> u64 {
    let (embd, head_dim, n_head, n_kv, ff, vocab) = (16_384u64, 128, 128, 8, 53_248, 128_256);
    let q_heads = n_head / tp;
    let kv_heads = (n_kv / tp).max(1); // replicated when tp > 8
    let per_layer_elems =
        2 * embd * q_heads * head_dim + 2 * embd * kv_heads * head_dim + 3 * embd * (ff / tp);
    let per_layer = per_layer_elems * 2 + 2 * embd * 4;
    let vocab_slice = vocab / tp * embd * 2; // 128256 is divisible by 16
    let rope = 64 * 4;
    layers * per_layer
        + rope
        + if embedding { vocab_slice } else { 0 }
        + if head { vocab_slice + embd * 4 } else { 0 }
}

#[test]
fn memory_report_405b_bf16() {
    let (config, tensors) = model(Preset::Llama3_405B, GgmlType::BF16);
    let (ctx, batch) = (8192, 1);

    // tp=16, pp=1: each rank one KV head (shared with its neighbour), all 126 layers.
    let p = plan(&config, &tensors, &Topology::new(16, 1)).unwrap();
    let report = memory_report(&p, &config, ctx, batch, 2);
    assert_eq!(report.len(), 16);
    let kv = 8192 * 126 * 128 * 2 * 2; // ctx · layers · 1 kv head · head_dim · (K,V) · bf16
    assert_eq!(kv, 528_482_304);
    let weights = bf16_405b_rank_bytes(16, 126, true, true);
    assert_eq!(weights, 51_276_218_624);
    for m in &report {
        assert_eq!(
            (m.weight_bytes, m.kv_cache_bytes, m.total),
            (weights, kv, weights + kv),
            "rank {}",
            m.rank
        );
    }
    // Against the parameter count: 405.85e9 · 2 / 16, plus what is not divided by 16: the doubled KV
    // projections (2 · 16384 · 64 extra elements per layer), F32 norms on every rank, rope_freqs.
    let even_share = crate::shapes::parameter_count(&config) * 2 / 16;
    assert_eq!(even_share, 50_731_673_600);
    let replicated = 126 * (2 * 16_384 * 64 * 2)
        + 126 * (2 * 16_384 * 4 - 2 * 16_384 * 2 / 16)
        + (16_384 * 4 - 16_384 * 2 / 16)
        + 256;
    assert_eq!(weights, even_share + replicated);
    assert!((weights as f64 / 405.9e9 / 2.0 * 16.0 - 1.0).abs() < 0.011);

    // tp=8, pp=2: 63 layers per stage, one KV head per rank, no replication.
    let p = plan(&config, &tensors, &Topology::new(8, 2)).unwrap();
    let report = memory_report(&p, &config, ctx, batch, 2);
    assert_eq!(report.len(), 16);
    let kv = 8192 * 63 * 128 * 2 * 2;
    assert_eq!(kv, 264_241_152);
    for m in &report {
        let weights = bf16_405b_rank_bytes(8, 63, m.stage == 0, m.stage == 1);
        assert_eq!(
            (m.weight_bytes, m.kv_cache_bytes, m.total),
            (weights, kv, weights + kv),
            "{m:?}"
        );
    }
    assert_eq!(report[0].weight_bytes, 50_739_413_248);
    assert_eq!(
        report[8].weight_bytes, 50_739_478_784,
        "last stage adds output_norm (64 KiB F32)"
    );
    // Batch and context scale the KV cache linearly.
    let big = memory_report(&p, &config, 4096, 4, 2);
    assert_eq!(big[0].kv_cache_bytes, 2 * kv);
}
