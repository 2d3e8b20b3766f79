//! The engine's error type. Every load-time variant names the tensor or field at fault, and every run-time
//! variant says which sequence, token or limit, so that a coordinator can report it without a debugger.
//! Bad input (a wrong shard, a malformed batch, a context too long) is always an error, never a panic.

use tessera_kernels::cpu::KernelError;
use thiserror::Error;

use crate::collective::CollectiveError;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, Error)]
pub enum Error {
    /// Opening or reading the checkpoint / shard files failed (the message names file and tensor).
    #[error(transparent)]
    Checkpoint(#[from] shard_tool::Error),
    /// A tensor the shard must hold is absent.
    #[error("missing tensor `{0}`")]
    MissingTensor(String),
    /// A tensor is present but unusable: wrong shape, type or byte length for the config and shard spec.
    #[error("tensor `{tensor}`: {msg}")]
    Tensor { tensor: String, msg: String },
    /// The shard spec does not fit the model config (or the shard files do not match the manifest).
    #[error("shard spec (stage {stage}, rank {rank}): {msg}")]
    Spec {
        stage: usize,
        rank: usize,
        msg: String,
    },
    /// A batch that this engine cannot run; `msg` names the sequence or token.
    #[error("batch: {0}")]
    Batch(String),
    /// A KV cache request that does not fit (context or memory budget), with the numbers.
    #[error("KV cache: {0}")]
    KvCache(String),
    /// The sequences' KV caches together would exceed the worker's KV memory budget (a server at capacity,
    /// not a malformed request: the caller may retry once sequences are released).
    #[error("KV memory: {0}")]
    KvMemory(String),
    /// A kernel refused its arguments (an engine bug or a shard the checks above missed); names the op.
    #[error("{op}: {source}")]
    Kernel {
        op: String,
        #[source]
        source: KernelError,
    },
    /// The device cannot be used (no driver, no such GPU, a GPU library missing or failing); names the device
    /// and the library or call.
    #[error("device {device}: {msg}")]
    Device { device: String, msg: String },
    /// The tensor-parallel group failed to all-reduce.
    #[error(transparent)]
    Collective(#[from] CollectiveError),
}

impl Error {
    pub(crate) fn tensor(tensor: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Tensor {
            tensor: tensor.into(),
            msg: msg.into(),
        }
    }
}
