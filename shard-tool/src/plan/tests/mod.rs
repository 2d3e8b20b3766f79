//! Planner tests. The central one is the coverage invariant: over many topologies, every element of every
//! tensor is held by exactly the number of (stage, rank) pairs it should be — counted from the slices' actual
//! intervals and the tensor names, never by re-running the planner's split formulas.

use std::collections::HashMap;
use std::ops::Range;

use tessera_kernels::quant::GgmlType;

use super::*;
use crate::shapes::{Preset, tensor_descs};

mod cases;
mod errors;

fn model(preset: Preset, quant: GgmlType) -> (ModelConfig, Vec<TensorDesc>) {
    let config = preset.config();
    let tensors = tensor_descs(&config, quant);
    (config, tensors)
}

/// (columns, rows) of a tensor's elements, half-open.
type Rect = (Range<u64>, Range<u64>);

fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("blk.")?.split('.').next()?.parse().ok()
}

fn part_of(name: &str) -> &str {
    name.split('.').rev().nth(1).unwrap_or("")
}

/// Which stages must hold a tensor, from its name alone (DESIGN.md §2).
fn needs(name: &str, stage: &StagePlan, tied: bool) -> bool {
    match name {
        "rope_freqs.weight" => true,
        "token_embd.weight" => stage.embedding || (stage.head && tied),
        "output.weight" | "output_norm.weight" => stage.head,
        _ => stage
            .layers
            .contains(&layer_of(name).expect("layer tensor")),
    }
}

/// (columns, rows) an element-rectangle of the tensor's ggml coordinates; 1-D tensors have one row.
fn rect(t: &TensorSlice) -> (Range<u64>, Range<u64>) {
    let cols = t.full_shape[0];
    let rows = t.full_shape.iter().skip(1).product::<u64>();
    match t.slice {
        Slice::Whole => (0..cols, 0..rows),
        Slice::Rows { start, end } => (0..cols, start..end),
        Slice::Cols { start, end } => (start..end, 0..rows),
    }
}

/// Splits the tensor into cells on every slice edge and counts how many rectangles cover each cell.
fn coverage(cols: u64, rows: u64, rects: &[Rect]) -> Vec<(Range<u64>, Range<u64>, usize)> {
    let mut cb = vec![0, cols];
    let mut rb = vec![0, rows];
    for (c, r) in rects {
        assert!(
            c.start < c.end && c.end <= cols && r.start < r.end && r.end <= rows,
            "{c:?} x {r:?} out of bounds"
        );
        cb.extend([c.start, c.end]);
        rb.extend([r.start, r.end]);
    }
    for b in [&mut cb, &mut rb] {
        b.sort_unstable();
        b.dedup();
    }
    let mut cells = Vec::new();
    for c in cb.windows(2) {
        for r in rb.windows(2) {
            let n = rects
                .iter()
                .filter(|(rc, rr)| {
                    rc.start <= c[0] && c[1] <= rc.end && rr.start <= r[0] && r[1] <= rr.end
                })
                .count();
            cells.push((c[0]..c[1], r[0]..r[1], n));
        }
    }
    cells
}

/// Everything a correct plan satisfies, checked from the outside.
fn check_invariants(
    config: &ModelConfig,
    tensors: &[TensorDesc],
    topo: &Topology,
    plan: &ShardPlan,
) {
    let ctx = format!("{:?} tp={} pp={}", config.name, topo.tp, topo.pp);
    let (tp, pp, hd) = (topo.tp, topo.pp, config.head_dim as u64);
    let q_per_kv = (config.n_head / config.n_head_kv) as u64;
    assert_eq!(&plan.topology, topo, "{ctx}");

    // Stages tile the layers in order; embedding first, head last.
    assert_eq!(plan.stages.len(), pp, "{ctx}");
    let mut next = 0;
    for (i, s) in plan.stages.iter().enumerate() {
        assert_eq!(
            (s.index, s.layers.start, s.embedding, s.head),
            (i, next, i == 0, i == pp - 1),
            "{ctx}"
        );
        assert!(s.layers.end > s.layers.start, "{ctx}: empty stage {i}");
        next = s.layers.end;
    }
    assert_eq!(next, config.n_layer, "{ctx}");
    if let Some(ranges) = &topo.layer_ranges {
        let got: Vec<_> = plan.stages.iter().map(|s| s.layers.clone()).collect();
        assert_eq!(&got, ranges, "{ctx}");
    }

    // Shards in (stage, rank) order, each with exactly its stage's tensors in source order.
    assert_eq!(plan.shards.len(), tp * pp, "{ctx}");
    let tied = !tensors.iter().any(|t| t.name == "output.weight");
    let source: HashMap<&str, &TensorDesc> = tensors.iter().map(|t| (t.name.as_str(), t)).collect();
    let mut rects: HashMap<&str, Vec<Rect>> = HashMap::new();
    // Per (layer, rank): KV heads read by the rank's query heads, as derived from its attn_q rows.
    let mut groups: HashMap<(usize, usize), Range<u64>> = HashMap::new();
    for (i, shard) in plan.shards.iter().enumerate() {
        let here = format!("{ctx} stage {} rank {}", shard.stage, shard.rank);
        assert_eq!((shard.stage, shard.rank), (i / tp, i % tp), "{here}");
        let stage = &plan.stages[shard.stage];
        let expected: Vec<&str> = tensors
            .iter()
            .filter(|t| needs(&t.name, stage, tied))
            .map(|t| t.name.as_str())
            .collect();
        let got: Vec<&str> = shard.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(got, expected, "{here}");

        let mut by_name: HashMap<&str, Rect> = HashMap::new();
        for t in &shard.tensors {
            let src = source[t.name.as_str()];
            assert_eq!(
                (t.ty, &t.full_shape),
                (src.ty, &src.shape),
                "{here} {}",
                t.name
            );
            let (c, r) = rect(t);
            let expect_shape = if src.shape.len() == 1 {
                vec![c.end - c.start]
            } else {
                vec![c.end - c.start, r.end - r.start]
            };
            assert_eq!(t.shape, expect_shape, "{here} {}", t.name);
            let block = t.ty.block_size() as u64;
            assert!(
                c.start.is_multiple_of(block) && c.end.is_multiple_of(block),
                "{here} {}: cut off a {block} block",
                t.name
            );
            assert_eq!(
                t.bytes() as usize,
                t.ty.bytes_for((c.end - c.start) as usize).unwrap() * (r.end - r.start) as usize
            );
            if matches!(t.slice, Slice::Rows { .. } | Slice::Cols { .. }) {
                assert!(
                    c != (0..src.shape[0]) || r != (0..src.n_rows()),
                    "{here} {}: full cut not Whole",
                    t.name
                );
            }
            rects
                .entry(src.name.as_str())
                .or_default()
                .push((c.clone(), r.clone()));
            by_name.insert(src.name.as_str(), (c, r));
        }
        let total: u64 = shard.tensors.iter().map(|t| t.bytes()).sum();
        assert_eq!(shard.bytes(), total);

        // Shard metadata agrees with the slices, and paired tensors are cut alike.
        let get = |name: &str| by_name.get(name).cloned();
        if let Some((_, rows)) = get("token_embd.weight").or_else(|| get("output.weight")) {
            assert_eq!(
                rows,
                shard.vocab_rows.start as u64..shard.vocab_rows.end as u64,
                "{here}"
            );
        } else {
            assert!(shard.vocab_rows.is_empty(), "{here}");
        }
        if let (Some(a), Some(b)) = (get("token_embd.weight"), get("output.weight")) {
            assert_eq!(a, b, "{here}: embedding and output vocab slices differ");
        }
        for layer in stage.layers.clone() {
            let name = |part: &str| format!("blk.{layer}.{part}.weight");
            let part = |p: &str| by_name[name(p).as_str()].clone();
            let (q, k, v, o) = (
                part("attn_q").1,
                part("attn_k").1,
                part("attn_v").1,
                part("attn_output").0,
            );
            let (gate, up, down) = (part("ffn_gate").1, part("ffn_up").1, part("ffn_down").0);
            assert!(
                !q.is_empty() && q.start.is_multiple_of(hd) && q.end.is_multiple_of(hd),
                "{here} layer {layer}: q rows {q:?}"
            );
            assert_eq!(
                o, q,
                "{here} layer {layer}: attn_output columns must match attn_q rows"
            );
            assert_eq!(k, v, "{here} layer {layer}");
            let kv_needed = q.start / hd / q_per_kv..(q.end / hd).div_ceil(q_per_kv);
            assert_eq!(
                k,
                kv_needed.start * hd..kv_needed.end * hd,
                "{here} layer {layer}: K rows vs query groups"
            );
            assert_eq!(
                q,
                shard.q_heads.start as u64 * hd..shard.q_heads.end as u64 * hd,
                "{here}"
            );
            assert_eq!(
                k,
                shard.kv_heads.start as u64 * hd..shard.kv_heads.end as u64 * hd,
                "{here}"
            );
            assert!(
                gate == up && up == down && !gate.is_empty(),
                "{here} layer {layer}: ffn {gate:?} {up:?} {down:?}"
            );
            assert_eq!(
                gate,
                shard.ffn_rows.start as u64..shard.ffn_rows.end as u64,
                "{here}"
            );
            groups.insert((layer, shard.rank), kv_needed);
        }
    }

    // Every element of every tensor held the right number of times.
    for src in tensors {
        let name = src.name.as_str();
        let holders = plan.stages.iter().filter(|s| needs(name, s, tied)).count();
        assert!(holders >= 1, "{ctx}: {name} on no stage");
        let cells = coverage(src.shape[0], src.n_rows(), &rects[name]);
        for (c, r, n) in cells {
            let within_stage = match part_of(name) {
                "attn_norm" | "ffn_norm" | "output_norm" | "rope_freqs" => tp,
                "attn_k" | "attn_v" => {
                    // A KV head is held by every rank whose query heads read it, and by no other.
                    let layer = layer_of(name).unwrap();
                    let heads = r.start / hd..r.end.div_ceil(hd);
                    let mult = |h: u64| {
                        (0..tp)
                            .filter(|&rk| groups[&(layer, rk)].contains(&h))
                            .count()
                    };
                    let m = mult(heads.start);
                    assert!(
                        heads.clone().all(|h| mult(h) == m),
                        "{ctx}: {name} rows {r:?} mixed replication"
                    );
                    if tp <= config.n_head_kv {
                        assert_eq!(
                            m, 1,
                            "{ctx}: {name}: no replication expected at tp ≤ n_head_kv"
                        );
                    }
                    m
                }
                _ => 1,
            };
            assert_eq!(
                n,
                holders * within_stage,
                "{ctx}: {name} cols {c:?} rows {r:?}"
            );
        }
    }
}

fn plan_ok(config: &ModelConfig, tensors: &[TensorDesc], topo: Topology) -> ShardPlan {
    let p = plan(config, tensors, &topo)
        .unwrap_or_else(|e| panic!("{:?} tp={} pp={}: {e}", config.name, topo.tp, topo.pp));
    check_invariants(config, tensors, &topo, &p);
    p
}

#[test]
fn invariant_smollm_q8_0_every_tp_and_pp() {
    let (config, tensors) = model(Preset::SmolLm, GgmlType::Q8_0);
    for tp in 1..=9 {
        for pp in 1..=5 {
            plan_ok(&config, &tensors, Topology::new(tp, pp));
        }
    }
}

#[test]
fn invariant_tiny_every_type() {
    for quant in GgmlType::ALL {
        let (config, tensors) = model(Preset::Tiny, quant);
        for tp in 1..=4 {
            for pp in 1..=2 {
                let topo = Topology::new(tp, pp);
                match plan(&config, &tensors, &topo) {
                    Ok(p) => check_invariants(&config, &tensors, &topo, &p),
                    // 4 heads of 64: only k-quants (256-element blocks) cannot cut attn_output at tp > 1.
                    Err(Error::Plan(msg)) => {
                        assert!(
                            quant.block_size() == 256 && tp > 1,
                            "{quant:?} tp={tp}: {msg}"
                        );
                        assert!(msg.contains("attn_output") && msg.contains("256"), "{msg}");
                    }
                    Err(e) => panic!("{e}"),
                }
            }
        }
    }
}

#[test]
fn invariant_llama3_8b_q4_k() {
    let (config, tensors) = model(Preset::Llama3_8B, GgmlType::Q4_K);
    for tp in (1..=8).chain([12, 16]) {
        for pp in 1..=4 {
            plan_ok(&config, &tensors, Topology::new(tp, pp));
        }
    }
}

#[test]
fn invariant_llama3_405b() {
    for quant in [GgmlType::BF16, GgmlType::Q4_K] {
        let (config, tensors) = model(Preset::Llama3_405B, quant);
        for tp in [1, 2, 4, 8, 16] {
            for pp in 1..=3 {
                plan_ok(&config, &tensors, Topology::new(tp, pp));
            }
        }
    }
}

#[test]
fn invariant_tied_llama3_1b_and_explicit_ranges() {
    let (config, tensors) = model(Preset::Llama3_1B, GgmlType::Q6_K);
    plan_ok(&config, &tensors, Topology::new(4, 3));
    let (config, tensors) = model(Preset::SmolLm, GgmlType::Q4_0);
    let ranges = Topology::parse_layer_ranges("0-9, 10-19,20-29").unwrap();
    assert_eq!(ranges, vec![0..10, 10..20, 20..30]);
    let p = plan_ok(
        &config,
        &tensors,
        Topology::new(3, 3).with_layer_ranges(ranges),
    );
    // Tied: token_embd is on stage 0 (lookup) and stage 2 (LM head), with the same vocab rows per rank.
    let holders: Vec<usize> = p
        .shards
        .iter()
        .filter(|s| s.tensors.iter().any(|t| t.name == "token_embd.weight"))
        .map(|s| s.stage)
        .collect();
    assert_eq!(holders, vec![0, 0, 0, 2, 2, 2]);
    let one_layer = Topology::new(1, 30).with_layer_ranges(
        Topology::parse_layer_ranges(&(0..30).map(|i| i.to_string()).collect::<Vec<_>>().join(","))
            .unwrap(),
    );
    plan_ok(&config, &tensors, one_layer);
}
