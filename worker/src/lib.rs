//! The Tessera worker's CPU engine: one shard (a pipeline stage's layers, a tensor-parallel rank's slice of
//! heads, FFN rows and vocabulary) of a Llama-family model, run on batches of mixed prefill and decode tokens.
//!
//! - [`weights`]: the shard's tensors as views into the memory-mapped checkpoint or shard file.
//! - [`collective`]: the all-reduce the forward pass calls at the three Megatron points; `SingleRank`,
//!   `LocalGroup` (threads); `PeerGroup` (processes) is in [`peer`].
//! - [`kv_cache`]: per-sequence K/V cache (f16, or f32 for reference comparisons), sized and checked up front.
//! - [`batch`]: the input (token ids or hidden states, several sequences) and output (hidden states or logits).
//! - [`engine`]: `Engine::forward`, the llama.cpp `llama` architecture's math, written once against the
//!   [`backend::Backend`] operations.
//! - [`backend`]: [`Device`] (`cpu`, `cuda:N`) and the backends that run the forward pass's operations on it.
//! - [`sequences`]: `Sequences`, the engine keyed by sequence id (creates, checks, budgets and releases the
//!   KV caches); the one batch runner of both the worker service and the coordinator's in-process pipeline.
//! - [`peer`]: `PeerGroup`, the tensor-parallel all-reduce between worker processes over raw TCP links (the
//!   framing at the end of `worker.proto`).
//! - [`service`]: `WorkerService`, the `tessera.worker.v1.Worker` gRPC service: one engine thread, epochs,
//!   error codes.
//! - [`cli`]: `WorkerArgs` and `run`, the `tessera-worker` command line (also the coordinator's hidden
//!   `tessera worker`).
//!
//! Single-process generation is this engine with one stage, one rank and [`collective::SingleRank`]:
//!
//! ```no_run
//! use std::sync::Arc;
//! use shard_tool::{checkpoint::Checkpoint, plan::{Topology, plan}};
//! use tessera_kernels::cpu::Pool;
//! use tessera_worker::{Batch, Engine, EngineOptions, Logits, SingleRank, Weights};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let ckpt = Checkpoint::open(&["model.gguf".into()])?;
//! let spec = plan(&ckpt.config, &ckpt.tensors, &Topology::new(1, 1))?.shards.remove(0);
//! let weights = Weights::from_checkpoint(&ckpt, &spec)?;
//! let pool = Arc::new(Pool::new(2));
//! let mut engine = Engine::new(weights, ckpt.config.clone(), spec, Box::new(SingleRank), pool, EngineOptions::default())?;
//! let mut cache = engine.new_cache(4096, None)?;
//! let mut batch = Batch::new();
//! batch.push_tokens(0, &[504, 3575, 282, 4649, 314], Logits::Last);
//! let logits = engine.forward(&batch, &mut [&mut cache])?.logits().unwrap_or_default().to_vec();
//! # Ok(()) }
//! ```
mod attention_f32; // TODO(kernels): f32-cache attention stand-in
pub mod backend;
pub mod batch;
pub mod cli;
pub mod collective;
pub mod engine;
pub mod error;
mod forward;
pub mod kv_cache;
pub mod peer;
pub mod sequences;
pub mod service;
pub mod weights;

pub use backend::Device;
pub use batch::{Batch, Logits, Output, SeqSpan};
pub use collective::{Collective, CollectiveError, LocalGroup, SingleRank};
pub use engine::{Engine, EngineOptions, Numerics};
pub use error::{Error, Result};
pub use kv_cache::{KvCache, KvType};
pub use peer::{AllReduceStats, PeerGroup, PeerListener};
pub use sequences::{SeqInput, Sequences};
pub use weights::{LayerWeights, Matrix, ShardDir, Weights};
