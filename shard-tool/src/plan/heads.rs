//! What each tensor-parallel rank holds along the split dimensions: query/KV heads, FFN intermediate rows and
//! vocabulary rows. The same split applies on every pipeline stage.
//!
//! Heads go by KV group (a KV head with the `q_per_kv` query heads that read it):
//! - `tp ≤ n_head_kv`: rank `r` gets KV heads `[⌊r·n_kv/tp⌋, ⌊(r+1)·n_kv/tp⌋)` and all their query heads; uneven
//!   is fine (SmolLM2, 3 KV heads at tp=2: rank 0 gets 1 group, rank 1 gets 2).
//! - `n_head_kv < tp ≤ n_head`: rank `r` serves KV head `⌊r·n_kv/tp⌋`; the ranks serving one KV head each hold a
//!   copy of it and split its query heads as evenly as possible (Llama 3.1 405B, 8 KV heads at tp=16: each KV
//!   head on 2 ranks with 8 of its 16 query heads each). Fewer query heads than ranks cannot be split.
//!
//! `attn_output` is cut along its input columns at query-head boundaries, so those cuts must be multiples of
//! the tensor's quant block; the FFN cut is chosen on multiples of `ffn_down`'s block to begin with.

use std::ops::Range;

use tessera_kernels::quant::GgmlType;

use super::roles::Inventory;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::roles::{LayerTensor, Role};
use crate::tensor::TensorDesc;

/// One rank's share of every split dimension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Splits {
    pub q: Range<usize>,
    pub kv: Range<usize>,
    pub ffn: Range<usize>,
    pub vocab: Range<usize>,
}

/// Largest tp tried when suggesting sizes that would work.
const SUGGEST_UP_TO: usize = 256;

/// `⌊i·n / parts⌋` without intermediate overflow; 0 when `parts` is 0.
pub(crate) fn cut(i: usize, n: usize, parts: usize) -> usize {
    if parts == 0 {
        return 0;
    }
    (i as u128 * n as u128 / parts as u128) as usize
}

/// Query and KV head ranges of every rank of a TP group of `tp`.
pub(crate) fn head_ranges(
    n_head: usize,
    n_kv: usize,
    tp: usize,
) -> Result<Vec<(Range<usize>, Range<usize>)>> {
    if n_kv == 0 || !n_head.is_multiple_of(n_kv) {
        return Err(Error::Plan(format!(
            "{n_head} query heads cannot be grouped over {n_kv} KV heads"
        )));
    }
    if tp == 0 || tp > n_head {
        return Err(Error::Plan(format!(
            "tp={tp} exceeds the model's {n_head} query heads ({n_kv} KV heads); every rank needs at least one \
             query head, so use tp ≤ {n_head}"
        )));
    }
    let q_per_kv = n_head / n_kv;
    let ranges = (0..tp)
        .map(|r| {
            if tp <= n_kv {
                let kv = cut(r, n_kv, tp)..cut(r + 1, n_kv, tp);
                (kv.start * q_per_kv..kv.end * q_per_kv, kv)
            } else {
                let k = cut(r, n_kv, tp);
                // Ranks serving KV head k: the r with ⌊r·n_kv/tp⌋ = k, i.e. ⌈k·tp/n_kv⌉ ≤ r < ⌈(k+1)·tp/n_kv⌉.
                let first = ceil_cut(k, tp, n_kv);
                let sharing = ceil_cut(k + 1, tp, n_kv) - first;
                let i = r.saturating_sub(first);
                let base = k * q_per_kv;
                (
                    base + cut(i, q_per_kv, sharing)..base + cut(i + 1, q_per_kv, sharing),
                    k..k + 1,
                )
            }
        })
        .collect();
    Ok(ranges)
}

/// `⌈i·n / parts⌉`, `parts > 0`.
fn ceil_cut(i: usize, n: usize, parts: usize) -> usize {
    (i as u128 * n as u128).div_ceil(parts as u128) as usize
}

/// The first `attn_output` column cut of a tp-way head split that is not a multiple of `block`, with its rank.
fn misaligned_cut(
    config: &ModelConfig,
    tp: usize,
    block: usize,
) -> Result<Option<(usize, usize, usize)>> {
    let heads = head_ranges(config.n_head, config.n_head_kv, tp)?;
    Ok(heads.iter().enumerate().skip(1).find_map(|(rank, (q, _))| {
        let col = q.start.saturating_mul(config.head_dim);
        (!col.is_multiple_of(block)).then_some((rank, q.start, col))
    }))
}

/// tp sizes (up to `SUGGEST_UP_TO`) whose head split puts every `attn_output` cut on a multiple of `block`.
fn working_tps(config: &ModelConfig, block: usize) -> Vec<usize> {
    (1..=config.n_head.min(SUGGEST_UP_TO))
        .filter(|&tp| matches!(misaligned_cut(config, tp, block), Ok(None)))
        .collect()
}

fn list(values: &[usize]) -> String {
    values
        .iter()
        .map(|v| v.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Every rank's split, after checking that each cut is legal for the tensors it cuts.
pub(crate) fn rank_splits(
    config: &ModelConfig,
    inventory: &Inventory,
    tensors: &[TensorDesc],
    tp: usize,
) -> Result<Vec<Splits>> {
    let heads = head_ranges(config.n_head, config.n_head_kv, tp)?;
    let typed = |part: LayerTensor| {
        tensors
            .iter()
            .zip(&inventory.roles)
            .filter(move |(_, role)| matches!(role, Role::Layer(_, p) if *p == part))
    };

    // attn_output: input columns cut at query-head boundaries.
    let mut checked: Vec<GgmlType> = Vec::new();
    for (t, _) in typed(LayerTensor::AttnOutput) {
        if checked.contains(&t.ty) {
            continue;
        }
        checked.push(t.ty);
        let block = t.ty.block_size();
        if let Some((rank, head, col)) = misaligned_cut(config, tp, block)? {
            let works = working_tps(config, block);
            return Err(Error::Plan(format!(
                "tensor `{}` is {} (block size {block}): tp={tp} cuts its input columns at column {col} (rank \
                 {rank} starts at query head {head}, head_dim {}), which is not a multiple of {block}; tp sizes \
                 whose cuts fall on {block}-element blocks: {}",
                t.name,
                t.ty.name(),
                config.head_dim,
                list(&works)
            )));
        }
    }

    // FFN: cut on multiples of every ffn_down block (block sizes are 1, 32, 256, so the lcm is the largest).
    let mut block = 1usize;
    let mut widest: Option<&TensorDesc> = None;
    for (t, _) in typed(LayerTensor::FfnDown) {
        let b = t.ty.block_size();
        block = lcm(block, b)
            .ok_or_else(|| Error::Plan(format!("tensor `{}`: block sizes overflow", t.name)))?;
        if widest.is_none_or(|w| b > w.ty.block_size()) {
            widest = Some(t);
        }
    }
    if !config.n_ff.is_multiple_of(block) {
        return Err(Error::Plan(format!(
            "feed_forward_length {} is not a multiple of the ffn_down block sizes' common multiple {block}",
            config.n_ff
        )));
    }
    let n_blocks = config.n_ff / block;
    if n_blocks < tp {
        let (name, ty) = widest.map_or(("ffn_down", "?"), |t| (t.name.as_str(), t.ty.name()));
        return Err(Error::Plan(format!(
            "tensor `{name}` is {ty} (block size {block}): its {} input columns are {n_blocks} blocks, too few to \
             give each of tp={tp} ranks a block-aligned FFN slice; use tp ≤ {n_blocks}",
            config.n_ff
        )));
    }

    if config.n_vocab < tp {
        return Err(Error::Plan(format!(
            "tp={tp} exceeds the vocabulary size {}",
            config.n_vocab
        )));
    }

    Ok(heads
        .into_iter()
        .enumerate()
        .map(|(r, (q, kv))| Splits {
            q,
            kv,
            ffn: cut(r, n_blocks, tp) * block..cut(r + 1, n_blocks, tp) * block,
            vocab: cut(r, config.n_vocab, tp)..cut(r + 1, config.n_vocab, tp),
        })
        .collect())
}

fn lcm(a: usize, b: usize) -> Option<usize> {
    fn gcd(a: usize, b: usize) -> usize {
        if b == 0 { a } else { gcd(b, a % b) }
    }
    match a.checked_div(gcd(a, b)) {
        Some(q) => q.checked_mul(b),
        None => Some(0), // a = b = 0
    }
}
