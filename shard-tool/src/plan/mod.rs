//! The shard planner: a pure function from (model config, tensor list, topology) to the slice of every tensor
//! that each (pipeline stage, tensor-parallel rank) holds. No I/O; the splitter and the manifest consume it.
//!
//! Math (DESIGN.md §2; Megatron-LM, Shoeybi et al. 2019, <https://arxiv.org/abs/1909.08053>, §3):
//! - **Pipeline stages** hold contiguous layer ranges, chosen to minimise the largest stage in bytes
//!   (`token_embd` counts on stage 0; `output_norm` and the LM head on the last stage) — see `stages.rs`.
//! - **Attention** is split by KV group: a rank holds the Q rows of its query heads, the K/V rows of the KV heads
//!   those queries read, and the matching input columns of `attn_output`. With more ranks than KV heads each KV
//!   head is replicated on the ranks sharing its query heads — see `heads.rs`.
//! - **FFN**: rows of `ffn_gate`/`ffn_up` and the same columns of `ffn_down`, cut on `ffn_down`'s quant blocks.
//! - **Vocabulary**: `token_embd` and `output` by rows. With tied embeddings the last stage holds `token_embd`'s
//!   rows as the LM head, so for `pp > 1` it is the one tensor that lives on two stages.
//! - Norms and `rope_freqs` are replicated on every rank of every stage that uses them.
//!
//! A column (input-dimension) cut of a quantized tensor must fall on a quant-block boundary (32 elements for
//! legacy types, 256 for k-quants); row cuts never split a block because every row is whole blocks.
//! Coordinates are ggml's: `shape[0]` is the contiguous input dimension, `shape[1]` counts rows, and in a
//! GGUF query head `h` occupies rows `[h·head_dim, (h+1)·head_dim)` of `attn_q` (llama.cpp's Q/K permutation
//! stays inside each head).

mod heads;
mod memory;
mod roles;
mod stages;
mod summary;

#[cfg(test)]
mod golden;
#[cfg(test)]
mod tests;

use std::ops::Range;

use serde::{Deserialize, Serialize};
use tessera_kernels::quant::GgmlType;

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::tensor::TensorDesc;

pub use memory::{NodeMemory, memory_report};

use crate::roles::{LayerTensor, Role};
use heads::{Splits, rank_splits};
use roles::Inventory;

/// Largest tensor-parallel group the planner accepts (a guard against absurd inputs, far above any cluster).
pub const MAX_TP: usize = 1 << 16;

/// How many ranks and stages to plan for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Topology {
    /// Tensor-parallel ranks per stage.
    pub tp: usize,
    /// Pipeline stages.
    pub pp: usize,
    /// Explicit half-open layer range of each stage; `None` lets the planner balance by bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_ranges: Option<Vec<Range<usize>>>,
}

impl Topology {
    pub fn new(tp: usize, pp: usize) -> Self {
        Topology {
            tp,
            pp,
            layer_ranges: None,
        }
    }

    pub fn with_layer_ranges(mut self, ranges: Vec<Range<usize>>) -> Self {
        self.layer_ranges = Some(ranges);
        self
    }

    /// Parses the command-line form `"0-14,15-29"`: comma-separated inclusive layer ranges (a single number is
    /// a one-layer range). Only syntax is checked here; [`plan`] checks the ranges against the model.
    pub fn parse_layer_ranges(text: &str) -> Result<Vec<Range<usize>>> {
        stages::parse_layer_ranges(text)
    }
}

/// One pipeline stage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagePlan {
    pub index: usize,
    /// Half-open range of transformer layers.
    pub layers: Range<usize>,
    /// Holds the token embedding (first stage).
    pub embedding: bool,
    /// Holds `output_norm` and the LM head (last stage).
    pub head: bool,
}

/// Which part of a tensor a shard holds, in the tensor's ggml coordinates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Slice {
    /// The entire tensor (replicated, or a split of one).
    Whole,
    /// Rows `[start, end)` (`shape[1]`): column-parallel weights, vocabulary slices.
    Rows { start: u64, end: u64 },
    /// Input columns `[start, end)` (`shape[0]`): row-parallel weights; block-aligned.
    Cols { start: u64, end: u64 },
}

/// One tensor, or the part of it, in one shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorSlice {
    pub name: String,
    #[serde(with = "crate::tensor::ggml_type_serde")]
    pub ty: GgmlType,
    /// ggml-order shape of the source tensor.
    pub full_shape: Vec<u64>,
    pub slice: Slice,
    /// ggml-order shape of the slice as stored in the shard.
    pub shape: Vec<u64>,
}

impl TensorSlice {
    /// Bytes of the slice in the shard (saturating on nonsense shapes read back from a manifest).
    pub fn bytes(&self) -> u64 {
        let elements = self
            .shape
            .iter()
            .fold(1u64, |acc, &d| acc.saturating_mul(d));
        (elements / self.ty.block_size() as u64).saturating_mul(self.ty.type_size() as u64)
    }
}

/// Everything one (stage, rank) holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardSpec {
    pub stage: usize,
    pub rank: usize,
    /// Query heads of this rank (all ranks of a TP group see the same split on every stage).
    pub q_heads: Range<usize>,
    /// KV heads of this rank; with `tp > n_head_kv` a KV head is held by several ranks.
    pub kv_heads: Range<usize>,
    /// Slice of the FFN intermediate dimension (rows of `ffn_gate`/`ffn_up`, columns of `ffn_down`).
    pub ffn_rows: Range<usize>,
    /// Vocabulary rows of `token_embd`/`output` held here; empty on stages with neither.
    pub vocab_rows: Range<usize>,
    /// In the order of the source tensor list.
    pub tensors: Vec<TensorSlice>,
}

impl ShardSpec {
    /// Bytes of all tensor slices in this shard.
    pub fn bytes(&self) -> u64 {
        self.tensors
            .iter()
            .fold(0u64, |acc, t| acc.saturating_add(t.bytes()))
    }
}

/// The result of [`plan`]: stages, then one shard per (stage, rank) in (stage, rank) order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardPlan {
    pub topology: Topology,
    pub stages: Vec<StagePlan>,
    pub shards: Vec<ShardSpec>,
}

impl ShardPlan {
    pub fn shard(&self, stage: usize, rank: usize) -> Option<&ShardSpec> {
        self.shards
            .iter()
            .find(|s| s.stage == stage && s.rank == rank)
    }
}

/// Plans the shards of `tensors` (a checkpoint's tensor list in canonical GGUF naming, in file order) for
/// `topo`. Fails with [`Error::Plan`] when the topology does not fit the model: tp or pp of 0, more stages
/// than layers, more ranks than query heads, a column cut off a quant-block boundary, explicit layer ranges
/// that do not tile the model, or a tensor the planner has no rule for.
pub fn plan(config: &ModelConfig, tensors: &[TensorDesc], topo: &Topology) -> Result<ShardPlan> {
    config
        .validate()
        .map_err(|e| Error::Plan(format!("model config: {e}")))?;
    let (tp, pp) = (topo.tp, topo.pp);
    if tp == 0 {
        return Err(Error::Plan(
            "tensor-parallel size tp must be at least 1, got 0".into(),
        ));
    }
    if pp == 0 {
        return Err(Error::Plan(
            "pipeline-parallel size pp must be at least 1, got 0".into(),
        ));
    }
    if tp > MAX_TP {
        return Err(Error::Plan(format!(
            "tp={tp} exceeds the planner's limit of {MAX_TP} ranks per stage"
        )));
    }
    if pp > config.n_layer {
        return Err(Error::Plan(format!(
            "pp={pp} exceeds the model's {} layers; every pipeline stage needs at least one layer",
            config.n_layer
        )));
    }
    let inventory = Inventory::new(config, tensors)?;
    let splits = rank_splits(config, &inventory, tensors, tp)?;
    let layer_ranges = match &topo.layer_ranges {
        Some(ranges) => stages::check_ranges(ranges, pp, config.n_layer)?,
        None => stages::balance(&inventory, pp)?,
    };
    let last = pp - 1;
    let stages: Vec<StagePlan> = layer_ranges
        .into_iter()
        .enumerate()
        .map(|(index, layers)| StagePlan {
            index,
            layers,
            embedding: index == 0,
            head: index == last,
        })
        .collect();

    let mut shards = Vec::with_capacity(pp.saturating_mul(tp));
    for stage in &stages {
        for (rank, split) in splits.iter().enumerate() {
            shards.push(build_shard(config, tensors, &inventory, stage, rank, split));
        }
    }
    Ok(ShardPlan {
        topology: topo.clone(),
        stages,
        shards,
    })
}

/// Whether the tensor with `role` lives on `stage`.
fn on_stage(role: Role, stage: &StagePlan, tied_head: bool) -> bool {
    match role {
        Role::RopeFreqs => true,
        Role::TokenEmbd => stage.embedding || (stage.head && tied_head),
        Role::Output | Role::OutputNorm => stage.head,
        Role::Layer(layer, _) => stage.layers.contains(&layer),
    }
}

fn build_shard(
    config: &ModelConfig,
    tensors: &[TensorDesc],
    inventory: &Inventory,
    stage: &StagePlan,
    rank: usize,
    split: &Splits,
) -> ShardSpec {
    let hd = config.head_dim as u64;
    let scaled = |r: &Range<usize>| r.start as u64 * hd..r.end as u64 * hd;
    let widen = |r: &Range<usize>| r.start as u64..r.end as u64;
    let mut slices = Vec::new();
    for (desc, &role) in tensors.iter().zip(&inventory.roles) {
        if !on_stage(role, stage, inventory.tied_head) {
            continue;
        }
        let (rows, cols) = match role {
            Role::TokenEmbd | Role::Output => (Some(widen(&split.vocab)), None),
            Role::Layer(_, LayerTensor::AttnQ) => (Some(scaled(&split.q)), None),
            Role::Layer(_, LayerTensor::AttnK | LayerTensor::AttnV) => {
                (Some(scaled(&split.kv)), None)
            }
            Role::Layer(_, LayerTensor::AttnOutput) => (None, Some(scaled(&split.q))),
            Role::Layer(_, LayerTensor::FfnGate | LayerTensor::FfnUp) => {
                (Some(widen(&split.ffn)), None)
            }
            Role::Layer(_, LayerTensor::FfnDown) => (None, Some(widen(&split.ffn))),
            Role::RopeFreqs
            | Role::OutputNorm
            | Role::Layer(_, LayerTensor::AttnNorm | LayerTensor::FfnNorm) => (None, None),
        };
        slices.push(slice_of(desc, rows, cols));
    }
    let holds_vocab = stage.embedding || stage.head;
    ShardSpec {
        stage: stage.index,
        rank,
        q_heads: split.q.clone(),
        kv_heads: split.kv.clone(),
        ffn_rows: split.ffn.clone(),
        vocab_rows: if holds_vocab {
            split.vocab.clone()
        } else {
            0..0
        },
        tensors: slices,
    }
}

/// The slice of a validated 2-D (or 1-D, whole) tensor; a cut covering the full axis is `Whole`.
fn slice_of(desc: &TensorDesc, rows: Option<Range<u64>>, cols: Option<Range<u64>>) -> TensorSlice {
    let full_shape = desc.shape.clone();
    let (slice, shape) = match (rows, cols) {
        (Some(r), _) if !(r.start == 0 && r.end == desc.n_rows()) => (
            Slice::Rows {
                start: r.start,
                end: r.end,
            },
            vec![desc.row_len(), r.end - r.start],
        ),
        (_, Some(c)) if !(c.start == 0 && c.end == desc.row_len()) => (
            Slice::Cols {
                start: c.start,
                end: c.end,
            },
            vec![c.end - c.start, desc.n_rows()],
        ),
        _ => (Slice::Whole, full_shape.clone()),
    };
    TensorSlice {
        name: desc.name.clone(),
        ty: desc.ty,
        full_shape,
        slice,
        shape,
    }
}
