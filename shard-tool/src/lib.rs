//! Checkpoint readers and the shard planner/splitter.
//!
//! - [`source`]: a checkpoint's files memory-mapped as one logical byte string (byte-split pieces, windows).
//! - [`gguf`]: GGUF v2/v3 reading and writing, gguf-split sets; [`llamafile`]: GGUF stored inside a ZIP.
//! - [`safetensors`] and [`hf`]: Hugging Face checkpoints (`config.json`, tensor names, Q/K row order).
//! - [`config`]: one `ModelConfig` from either source.
//! - [`checkpoint`]: opens whatever the user has and lists tensors in Tessera's canonical (GGUF) naming.
//! - [`plan`]: the pure function from (config, tensors, topology) to per-(stage, rank) slices.
//! - [`shapes`]: real models' hyperparameters (SmolLM2 … Llama 3.1 405B) and their tensor lists.
//! - [`split`], [`verify`], [`synth`], [`manifest`]: the `shard-tool` operations and the shard directory format.
pub mod checkpoint;
pub mod config;
pub mod error;
pub mod gguf;
pub mod hf;
pub mod llamafile;
pub mod manifest;
pub mod model_keys;
pub mod pickle;
pub mod plan;
pub mod roles;
pub mod safetensors;
pub mod shapes;
pub mod source;
pub mod split;
pub mod synth;
pub mod tensor;
pub mod verify;

pub use error::{Error, Result};
