//! Serving many requests at once: the continuous-batching scheduler and the pipelines it drives.
//!
//! - [`pipeline`]: the [`Pipeline`] trait — run one batch through every stage and return its logits rows
//!   (whole, or a row's best logits where the sampler needs no more) — with [`local::LocalPipeline`] (an in-process engine: `tessera serve MODEL`, and tests) and
//!   [`remote::RemotePipeline`] (worker processes over gRPC: the cluster).
//! - [`scheduler`]: admits requests, batches prefill chunks with decode steps, runs micro-batches through the
//!   pipeline concurrently, samples, and streams [`GenEvent`]s back.
//!
//! The API front ends (`crate::api`) only see the types in this module and [`SchedulerHandle`].
pub mod local;
pub mod pipeline;
mod prefix;
pub mod remote;
pub mod scheduler;

use std::sync::Arc;

use thiserror::Error;
use tokio::sync::mpsc;

use crate::generate::FinishReason;
use crate::sampling::SamplingParams;

pub use pipeline::{
    BatchLogits, LogitsRow, Pipeline, PipelineError, PipelineInfo, SeqStep, StepBatch,
};
pub use scheduler::{Scheduler, SchedulerConfig, SchedulerHandle, SchedulerStats};

/// One generation request, already tokenized and validated by the front end.
#[derive(Debug, Clone)]
pub struct GenRequest {
    /// Prompt token ids (BOS / chat template already applied). Not empty.
    pub prompt: Vec<u32>,
    /// Sampling, `max_tokens`, stop strings and logprobs.
    pub params: SamplingParams,
}

/// A generated token with its text and, when asked for, log-probabilities.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenEvent {
    pub id: u32,
    /// Text that became final with this token (may be empty: an incomplete UTF-8 sequence, or text held back
    /// because it may be the start of a stop string).
    pub text: String,
    /// `Some` when the request asked for logprobs: the chosen token's log-probability.
    pub logprob: Option<f32>,
    /// The requested number of most likely alternatives (id, log-probability), most likely first.
    pub top_logprobs: Vec<(u32, f32)>,
}

/// Token counts of a finished request (OpenAI's `usage`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens whose keys and values were copied from a kept prefix instead of computed (OpenAI's
    /// `prompt_tokens_details.cached_tokens`); counted in `prompt_tokens` too.
    pub cached_tokens: usize,
}

/// What a request's receiver gets, in order: with `prompt_logprobs` one `Prompt`, then any number of
/// `Token`s, then exactly one `Done` or `Error` (an `Error` may come at any point).
#[derive(Debug, Clone, PartialEq)]
pub enum GenEvent {
    /// Every prompt token with its log-probability given the tokens before it (`None` for the first) and
    /// the most likely alternatives there; `text` is empty.
    Prompt(Vec<TokenEvent>),
    Token(TokenEvent),
    /// Generation ended. `text` is what was held back and became final at the end (may be empty).
    Done {
        finish: FinishReason,
        usage: Usage,
        text: String,
    },
    Error(ServeError),
}

/// Why a request failed. Front ends map these to HTTP statuses / gRPC codes.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ServeError {
    /// The request is wrong (HTTP 400, INVALID_ARGUMENT). `field` names the request field.
    #[error("{field}: {message}")]
    InvalidArgument { field: String, message: String },
    /// The queue is full (HTTP 429, RESOURCE_EXHAUSTED); retry later.
    #[error("overloaded: {0}")]
    Overloaded(String),
    /// A worker is unreachable or failed, or the cluster is re-forming (HTTP 503, UNAVAILABLE); retry later.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// A bug or an unexpected worker answer (HTTP 500, INTERNAL).
    #[error("internal error: {0}")]
    Internal(String),
}

impl ServeError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> ServeError {
        ServeError::InvalidArgument {
            field: field.into(),
            message: message.into(),
        }
    }

    /// Whether retrying the same request later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, ServeError::Overloaded(_) | ServeError::Unavailable(_))
    }
}

/// Receives a request's events.
pub type GenReceiver = mpsc::Receiver<GenEvent>;

/// What the front ends need besides the scheduler: the model's tokenizer, template and identity.
pub struct ServedModel {
    /// The id clients pass as `model` (the checkpoint's file stem or `general.name`).
    pub id: String,
    pub tokenizer: Arc<crate::tokenizer::Tokenizer>,
    pub template: crate::chat::ChatTemplate,
    pub config: shard_tool::config::ModelConfig,
    /// Longest prompt + completion of one request.
    pub max_context: usize,
    pub tp: usize,
    pub pp: usize,
}
