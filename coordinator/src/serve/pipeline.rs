//! A pipeline runs one batch through every stage of the model and returns its logits rows ([`BatchLogits`]):
//! whole vocabulary rows, or for sequences that allow it ([`SeqStep::top_k`]) a row's best logits.
//!
//! The scheduler calls [`Pipeline::forward`] from several micro-batch tasks at once; an implementation with
//! several stages lets them overlap (stage 1 runs micro-batch A while stage 0 runs B), and must run the
//! batches of any one stage one at a time, in the order they reached it, on every tensor-parallel rank.

use futures::future::BoxFuture;
use thiserror::Error;

pub use crate::sampling::TopLogits;

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
    /// With `want_logits`: a whole row for every token of the step, not only the last (prompt
    /// log-probabilities); `top_k` does not apply.
    pub all_logits: bool,
    /// With `want_logits`: 0 for the whole vocabulary row; k > 0 lets the pipeline return the row's k best
    /// logits and its log-sum-exp instead ([`TopLogits`]; enough when the sequence's sampler says so, see
    /// `Sampler::candidates_needed`).
    pub top_k: usize,
    /// KV cache size to allocate for a new sequence (prompt + most tokens it may generate).
    pub context: usize,
    /// A new sequence starting at `start_pos` > 0 copies positions `0..start_pos` from this live sequence
    /// (a reused prompt prefix, see `serve::prefix`).
    pub prefix_from: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StepBatch {
    pub seqs: Vec<SeqStep>,
}

impl StepBatch {
    pub fn n_tokens(&self) -> usize {
        self.seqs.iter().map(|s| s.tokens.len()).sum()
    }

    /// Logits rows the batch asks for.
    pub fn n_logits(&self) -> usize {
        self.seqs.iter().map(SeqStep::n_rows).sum()
    }
}

impl SeqStep {
    /// Logits rows this step asks for: none, the last token's, or one per token.
    pub fn n_rows(&self) -> usize {
        match (self.want_logits, self.all_logits) {
            (false, _) => 0,
            (true, false) => 1,
            (true, true) => self.tokens.len(),
        }
    }

    /// The best-logits count the pipeline may use for this step's rows (0: whole rows).
    pub fn row_top_k(&self) -> usize {
        if self.want_logits && !self.all_logits {
            self.top_k
        } else {
            0
        }
    }
}

/// A batch's logits: the rows the sequences ask for ([`SeqStep::n_rows`]), in batch order, each the whole
/// vocabulary or (for a sequence with `top_k`) its best logits.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BatchLogits {
    n_vocab: usize,
    /// The whole rows, `n_vocab` each, in the order of `rows`.
    whole: Vec<f32>,
    rows: Vec<Row>,
}

#[derive(Debug, Clone, PartialEq)]
enum Row {
    /// Index into the whole rows.
    Whole(usize),
    Top(TopLogits),
}

/// One row of a [`BatchLogits`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LogitsRow<'a> {
    Whole(&'a [f32]),
    Top(&'a TopLogits),
}

impl BatchLogits {
    /// Every row whole: `data` holds `data.len() / n_vocab` rows.
    pub fn whole(n_vocab: usize, data: Vec<f32>) -> BatchLogits {
        let n = data.len().checked_div(n_vocab).unwrap_or(0);
        BatchLogits::from_rows(n_vocab, data, vec![None; n])
    }

    /// Rows in order: `None` takes the next whole row of `whole` (`n_vocab` values each), `Some` is a row's
    /// best logits. `None`s beyond the rows `whole` holds are dropped.
    pub fn from_rows(n_vocab: usize, whole: Vec<f32>, rows: Vec<Option<TopLogits>>) -> BatchLogits {
        let n_whole = whole.len().checked_div(n_vocab).unwrap_or(0);
        let mut next = 0;
        let rows = rows
            .into_iter()
            .filter_map(|r| match r {
                Some(top) => Some(Row::Top(top)),
                None if next < n_whole => {
                    next += 1;
                    Some(Row::Whole(next - 1))
                }
                None => None,
            })
            .collect();
        BatchLogits {
            n_vocab,
            whole,
            rows,
        }
    }

    pub fn n_vocab(&self) -> usize {
        self.n_vocab
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn row(&self, i: usize) -> Option<LogitsRow<'_>> {
        Some(match self.rows.get(i)? {
            Row::Whole(w) => {
                LogitsRow::Whole(&self.whole[w * self.n_vocab..(w + 1) * self.n_vocab])
            }
            Row::Top(top) => LogitsRow::Top(top),
        })
    }

    /// The rows concatenated (`len() × n_vocab`), when every row is whole.
    pub fn into_whole(self) -> Option<Vec<f32>> {
        self.rows
            .iter()
            .all(|r| matches!(r, Row::Whole(_)))
            .then_some(self.whole)
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

    /// Runs `batch` through every stage. Returns the logits rows the sequences ask for ([`SeqStep::n_rows`]),
    /// in batch order: the whole vocabulary, or for a sequence with `top_k` possibly its best logits.
    fn forward<'a>(
        &'a self,
        batch: &'a StepBatch,
    ) -> BoxFuture<'a, Result<BatchLogits, PipelineError>>;

    /// Frees the KV caches of finished sequences (best effort: errors are logged, not returned).
    fn release<'a>(&'a self, seq_ids: &'a [u64]) -> BoxFuture<'a, ()>;

    /// Really runs the model: a one-token sequence through every stage and rank (then released), within a
    /// few seconds. `Ok` means the pipeline can serve now.
    fn health(&self) -> BoxFuture<'_, Result<(), PipelineError>>;

    /// How many micro-batches the scheduler keeps in flight (its lanes). The default, one per stage plus
    /// one, keeps every stage busy while the coordinator samples the extra lane's batch: right when the
    /// stages compute elsewhere (other processes or machines, a GPU). A pipeline computing on the very CPU
    /// cores the coordinator samples on gains nothing from that overlap and loses batch size (each lane's
    /// batch reads the weights once), so it asks for one.
    fn micro_batches(&self) -> usize {
        self.info().n_stages.max(1) + 1
    }

    /// Names the pipeline's current set of live sequences: it changes when they are all lost (the workers
    /// re-formed), so that sequences kept from before are not referred to again. Constant in process.
    fn epoch(&self) -> u64 {
        0
    }
}
