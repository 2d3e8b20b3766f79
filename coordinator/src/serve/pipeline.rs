//! A pipeline runs one batch through every stage of the model and returns full-vocabulary logits rows.
//!
//! The scheduler calls [`Pipeline::forward`] from several micro-batch tasks at once; an implementation with
//! several stages lets them overlap (stage 1 runs micro-batch A while stage 0 runs B), and must run the
//! batches of any one stage one at a time, in the order they reached it, on every tensor-parallel rank.

use futures::future::BoxFuture;
use thiserror::Error;

/// The sequence id of [`Pipeline::health`] probes. Schedulers number their sequences from 1 up and never
/// reach it.
pub const HEALTH_SEQ_ID: u64 = u64::MAX;

/// The model-facing limits of a pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PipelineInfo {
    /// Most tokens in one [`StepBatch`] (smallest over all workers).
    pub max_batch_tokens: usize,
    /// Most tokens of one batch that may ask for logits.
    pub max_logits: usize,
    /// Longest context (KV cache) of one sequence.
    pub max_context: usize,
    pub n_vocab: usize,
    /// Pipeline stages (the scheduler runs this many micro-batches concurrently).
    pub n_stages: usize,
    pub tp: usize,
}

/// One sequence's part of a batch: tokens at positions `start_pos..start_pos + tokens.len()`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqStep {
    /// Unique while the sequence lives; a new `seq_id` with `start_pos == 0` starts a sequence.
    pub seq_id: u64,
    pub start_pos: usize,
    pub tokens: Vec<u32>,
    /// Return the logits of the last token.
    pub want_logits: bool,
    /// KV cache size to allocate for a new sequence (prompt + most tokens it may generate).
    pub context: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StepBatch {
    pub seqs: Vec<SeqStep>,
}

impl StepBatch {
    pub fn n_tokens(&self) -> usize {
        self.seqs.iter().map(|s| s.tokens.len()).sum()
    }

    pub fn n_logits(&self) -> usize {
        self.seqs.iter().filter(|s| s.want_logits).count()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PipelineError {
    /// A worker is down, timed out, restarted, or the group is re-forming. Every sequence in flight is lost;
    /// the pipeline re-forms by itself and serves new sequences once healthy again.
    #[error("{0}")]
    Unavailable(String),
    /// Not enough KV cache memory for the batch's new sequences.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The batch was malformed (a scheduler bug) or a worker answered nonsense.
    #[error("{0}")]
    Internal(String),
}

pub trait Pipeline: Send + Sync + 'static {
    fn info(&self) -> PipelineInfo;

    /// Runs `batch` through every stage. Returns `n_vocab` logits for each sequence with `want_logits`, in
    /// batch order, concatenated (`n_logits × n_vocab`).
    fn forward<'a>(
        &'a self,
        batch: &'a StepBatch,
    ) -> BoxFuture<'a, Result<Vec<f32>, PipelineError>>;

    /// Frees the KV caches of finished sequences (best effort: errors are logged, not returned).
    fn release<'a>(&'a self, seq_ids: &'a [u64]) -> BoxFuture<'a, ()>;

    /// Really runs the model: a one-token sequence through every stage and rank (then released), within a
    /// few seconds. `Ok` means the pipeline can serve now.
    fn health(&self) -> BoxFuture<'_, Result<(), PipelineError>>;
}
