//! Checkpoint readers and the shard planner/splitter.
//!
//! - [`source`]: a checkpoint's files memory-mapped as one logical byte string (byte-split pieces, windows).
//! - [`gguf`]: GGUF v2/v3 reading and writing, gguf-split sets; [`llamafile`]: GGUF stored inside a ZIP.
//! - [`safetensors`] and [`hf`]: Hugging Face checkpoints (`config.json`, tensor names, Q/K row order).
//! - [`config`]: one `ModelConfig` from either source.
//! - [`checkpoint`]: opens whatever the user has and lists tensors in Tessera's canonical (GGUF) naming.
//! - [`plan`]: the pure function from (config, tensors, topology) to per-(stage, rank) slices.
pub mod config;
pub mod error;
pub mod source;
pub mod tensor;

pub use error::{Error, Result};
