//! Continuous batching: every forward pass carries one decode token of each running sequence plus prefill
//! chunks of newly admitted prompts, so requests join and leave the batch at any step (Orca's iteration-level
//! scheduling, vLLM's chunked prefill).
//!
//! # Design
//!
//! - One admission queue (bounded by `max_queued`; beyond it [`SchedulerHandle::submit`] answers
//!   `Overloaded`) feeds *lanes* ([`Pipeline::micro_batches`]: `n_stages + 1` for workers, 1 for the engine
//!   on this process's CPU), tokio tasks that each own a set of sequences and run one micro-batch at a time.
//!   With `pp` pipeline stages, `pp` micro-batches are in the pipeline at once (stage 1 runs lane A's batch
//!   while stage 0 runs lane B's) and one more is being sampled at the coordinator; a sequence stays in its
//!   lane because its next token depends on its previous step.
//! - A lane's step: drop sequences whose client went away, admit queued requests while the lane has room
//!   (`max_running` split across lanes, never more than the pipeline's `max_logits`), then build one
//!   [`StepBatch`]: a decode token (asking for logits) for every decoding sequence, then prefill chunks of
//!   prompts within the token budget, logits only on a prompt's last chunk.
//! - Prompts are cut into chunks at fixed multiples of the chunk size, whatever else is in the batch: a chunk
//!   that does not fit waits for the next step instead of being shortened. A sequence's positions are thus
//!   computed in the same groups whether it runs alone or among 63 others, which keeps its logits (and so
//!   its tokens) independent of the traffic around it, given a batch-invariant engine. The chunk size and the
//!   lane's room are chosen so that at least one chunk always fits beside the decode tokens.
//! - Sampling, stop strings and detokenization go through [`DecodeState`], as single-sequence generation
//!   does; each sequence has its own seeded sampler, so its tokens depend only on its own logits. A step's
//!   sampling runs on blocking threads (32 sequences × 128k vocabulary is milliseconds of CPU).
//! - Failures: `Unavailable` (a worker died; every sequence on the pipeline is lost) fails the lane's
//!   sequences that have state on the pipeline and bumps a failure generation, so that other lanes fail
//!   their older sequences at their next step instead of sending them to a re-formed pipeline that no longer
//!   knows them. `ResourceExhausted` (KV memory for new sequences): on a single-stage pipeline, which
//!   refuses a batch as a whole, a batch with several new sequences is run again with one new sequence per
//!   step until a sequence retires, and a lone new sequence that still does not fit fails with `Overloaded`
//!   (the client may retry; the scheduler does not); the batch's running sequences are untouched. On a
//!   multi-stage pipeline earlier stages may have run the batch, so its new sequences fail with `Overloaded`
//!   and its running ones with `Unavailable`. `Internal` fails the batch's sequences.
//! - Prompt prefixes (`prefix_cache_tokens` > 0, see `serve::prefix`): a finished sequence's KV caches stay
//!   on the pipeline, and a new prompt that starts with its tokens copies them (`SeqStep::prefix_from`) and
//!   prefills only the rest. Kept sequences are the first to go when the pipeline runs out of KV memory.
//!
//! Request ids are sequence ids from one process-wide counter, so schedulers sharing a pipeline never clash.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use futures::future::join_all;
use tokio::sync::{Notify, mpsc};
use tracing::{debug, error, warn};

use super::prefix::PrefixCache;
use super::{
    BatchLogits, GenEvent, GenReceiver, GenRequest, LogitsRow, Pipeline, PipelineError,
    PipelineInfo, SeqStep, ServeError, StepBatch, TokenEvent, Usage,
};
use crate::generate::{DecodeState, FinishReason};
use crate::sampling::{SamplingError, token_logprobs};
use crate::tokenizer::Tokenizer;

/// Metric names (the front end's Prometheus recorder renders them).
pub const REQUESTS_TOTAL: &str = "tessera_requests_total";
pub const PROMPT_TOKENS_TOTAL: &str = "tessera_prompt_tokens_total";
pub const GENERATION_TOKENS_TOTAL: &str = "tessera_generation_tokens_total";
pub const REQUESTS_RUNNING: &str = "tessera_requests_running";
pub const REQUESTS_QUEUED: &str = "tessera_requests_queued";
/// Prompt tokens whose keys and values were copied from a kept sequence instead of computed.
pub const PREFIX_REUSED_TOKENS_TOTAL: &str = "tessera_prefix_reused_tokens_total";
pub const TIME_TO_FIRST_TOKEN: &str = "tessera_time_to_first_token_seconds";
pub const STEP_SECONDS: &str = "tessera_step_seconds";

/// How long [`SchedulerHandle::health`] reuses a probe's answer: health checks from several load balancers
/// should not each cost a forward pass.
const HEALTH_CACHE: Duration = Duration::from_secs(1);

/// Sequences sampled by one blocking task; a step with more spreads over several threads.
const SAMPLE_GROUP: usize = 8;

/// Sequence ids of every scheduler in the process. Starts at 1; pipelines reserve ids near `u64::MAX` for
/// their health probes.
static NEXT_SEQ_ID: AtomicU64 = AtomicU64::new(1);

/// Scheduler limits. Zeros are treated as 1 by [`Scheduler::start`]; [`SchedulerConfig::validate`] rejects
/// them with the field named, for command-line checking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Sequences in flight (prefilling or decoding), all lanes together.
    pub max_running: usize,
    /// Requests waiting for a slot; a request beyond this is refused with `Overloaded`.
    pub max_queued: usize,
    /// Prompt tokens of one sequence per step (smaller chunks interleave long prompts with decoding more
    /// finely; larger ones prefill faster).
    pub prefill_chunk: usize,
    /// Tokens per step; `None`: the pipeline's `max_batch_tokens` (a larger value is capped to it).
    pub max_batch_tokens: Option<usize>,
    /// KV positions (the sum of their context sizes) that finished sequences may keep on the pipeline for
    /// prompts that start with their tokens; 0 (the default here; `tessera serve` turns it on) keeps none.
    pub prefix_cache_tokens: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            max_running: 64,
            max_queued: 256,
            prefill_chunk: 256,
            max_batch_tokens: None,
            prefix_cache_tokens: 0,
        }
    }
}

impl SchedulerConfig {
    /// Every limit must be at least 1; the error names the field.
    pub fn validate(&self) -> Result<(), ServeError> {
        let fields = [
            ("max_running", Some(self.max_running)),
            ("max_queued", Some(self.max_queued)),
            ("prefill_chunk", Some(self.prefill_chunk)),
            ("max_batch_tokens", self.max_batch_tokens),
        ];
        for (field, value) in fields {
            if value == Some(0) {
                return Err(ServeError::invalid(field, "must be at least 1, got 0"));
            }
        }
        Ok(())
    }

    fn sanitized(&self) -> SchedulerConfig {
        SchedulerConfig {
            max_running: self.max_running.max(1),
            max_queued: self.max_queued.max(1),
            prefill_chunk: self.prefill_chunk.max(1),
            max_batch_tokens: self.max_batch_tokens.map(|b| b.max(1)),
            prefix_cache_tokens: self.prefix_cache_tokens,
        }
    }
}

/// A snapshot of the scheduler's load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerStats {
    /// Requests waiting for a slot.
    pub queued: usize,
    /// Sequences prefilling or decoding.
    pub running: usize,
    pub max_running: usize,
    pub max_queued: usize,
    /// Micro-batch lanes (`Pipeline::micro_batches`).
    pub lanes: usize,
    /// Finished sequences kept for their prompt prefixes.
    pub prefixes_kept: usize,
    /// Prompt tokens copied from kept sequences instead of computed, since the start.
    pub prefix_reused_tokens: u64,
}

/// Starts schedulers; see the module doc.
pub struct Scheduler;

impl Scheduler {
    /// Starts the lanes on the current tokio runtime (call from inside one) and returns the handle the front
    /// ends submit to. The lanes stop once every handle is dropped and their work is done.
    ///
    /// The pipeline's [`PipelineInfo`] is read again at every step, so a remote pipeline whose limits are
    /// only known once its workers answered is followed; the number of lanes ([`Pipeline::micro_batches`]) is
    /// read once here.
    pub fn start(
        pipeline: Arc<dyn Pipeline>,
        tokenizer: Arc<Tokenizer>,
        config: SchedulerConfig,
    ) -> SchedulerHandle {
        if let Err(e) = config.validate() {
            warn!("scheduler config: {e}; using 1");
        }
        // Usually one lane more than stages: while the pipeline runs one micro-batch per stage, the extra
        // lane's sampling and detokenization run on the coordinator instead of leaving the workers idle.
        let n_lanes = pipeline.micro_batches().max(1);
        let shared = Arc::new(Shared {
            pipeline,
            tokenizer,
            config: config.sanitized(),
            n_lanes,
            queue: Mutex::new(VecDeque::new()),
            notify: Notify::new(),
            running: AtomicUsize::new(0),
            shutdown: AtomicBool::new(false),
            failures: AtomicU64::new(0),
            last_failure: Mutex::new(String::new()),
            health: tokio::sync::Mutex::new(None),
            prefixes: Mutex::new(PrefixCache::new(config.prefix_cache_tokens)),
            prefix_reused: AtomicU64::new(0),
        });
        for index in 0..n_lanes {
            let lane = Lane {
                index,
                shared: shared.clone(),
                running: Vec::new(),
                new_limit: usize::MAX,
                to_release: Vec::new(),
            };
            tokio::spawn(lane.run());
        }
        SchedulerHandle {
            owner: Arc::new(Owner(shared.clone())),
            shared,
        }
    }
}

/// What the front ends hold: submit requests, read limits, load and health. Cheap to clone.
#[derive(Clone)]
pub struct SchedulerHandle {
    shared: Arc<Shared>,
    /// The last handle dropped tells the lanes to stop once idle.
    #[allow(dead_code)]
    owner: Arc<Owner>,
}

struct Owner(Arc<Shared>);

impl Drop for Owner {
    fn drop(&mut self) {
        self.0.shutdown.store(true, Ordering::Release);
        self.0.notify.notify_waiters();
    }
}

impl std::fmt::Debug for SchedulerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SchedulerHandle")
            .field("stats", &self.stats())
            .finish()
    }
}

impl SchedulerHandle {
    /// Validates `req` and queues it. The receiver gets the request's [`GenEvent`]s; dropping it cancels the
    /// request (its sequence is released at the next step).
    ///
    /// Errors: `InvalidArgument` naming the field (`prompt` empty, too long for the context or holding an id
    /// outside the vocabulary; any sampling parameter), `Overloaded` when `max_queued` requests are waiting.
    pub fn submit(&self, req: GenRequest) -> Result<GenReceiver, ServeError> {
        let info = self.shared.pipeline.info();
        let context = match check_request(&req, &info) {
            Ok(context) => context,
            Err(e) => {
                count_request("error");
                return Err(e);
            }
        };
        // Events are at most one per token the context leaves room for, plus the prompt's log-probabilities
        // and `Done`: a channel this large never refuses a send, so a slow client never stalls its lane.
        let (tx, rx) = mpsc::channel(context - req.prompt.len() + 2);
        {
            let mut queue = self.shared.queue();
            let max = self.shared.config.max_queued;
            if queue.len() >= max {
                drop(queue);
                count_request("error");
                return Err(ServeError::Overloaded(format!(
                    "{max} requests are already waiting (max_queued); retry later"
                )));
            }
            queue.push_back(Pending {
                prompt: req.prompt,
                params: req.params,
                context,
                tx,
                submitted: Instant::now(),
            });
            metrics::gauge!(REQUESTS_QUEUED).set(queue.len() as f64);
        }
        self.shared.notify.notify_one();
        Ok(rx)
    }

    /// The pipeline's limits now (a remote pipeline's may change when its workers re-form).
    pub fn info(&self) -> PipelineInfo {
        self.shared.pipeline.info()
    }

    /// Whether the pipeline can serve: a real one-token forward through every stage, its answer reused for
    /// about a second. Concurrent callers share one probe.
    pub async fn health(&self) -> Result<(), ServeError> {
        let mut cached = self.shared.health.lock().await;
        if let Some((at, result)) = cached.as_ref()
            && at.elapsed() < HEALTH_CACHE
        {
            return result.clone();
        }
        let result = self
            .shared
            .pipeline
            .health()
            .await
            .map_err(ServeError::from);
        *cached = Some((Instant::now(), result.clone()));
        result
    }

    pub fn stats(&self) -> SchedulerStats {
        SchedulerStats {
            queued: self.shared.queue().len(),
            running: self.shared.running.load(Ordering::Acquire),
            max_running: self.shared.config.max_running,
            max_queued: self.shared.config.max_queued,
            lanes: self.shared.n_lanes,
            prefixes_kept: self.shared.prefixes().len(),
            prefix_reused_tokens: self.shared.prefix_reused.load(Ordering::Acquire),
        }
    }
}

impl From<PipelineError> for ServeError {
    fn from(e: PipelineError) -> ServeError {
        match e {
            PipelineError::Unavailable(m) => ServeError::Unavailable(m),
            PipelineError::ResourceExhausted(m) => ServeError::Overloaded(m),
            PipelineError::Internal(m) => ServeError::Internal(m),
        }
    }
}

/// A sampling-parameter error as the request field it is about.
pub fn sampling_error(e: SamplingError) -> ServeError {
    let field = match &e {
        SamplingError::OutOfRange { field, .. } => *field,
        SamplingError::BiasTokenOutOfVocab { .. } | SamplingError::BiasTokenRepeated(_) => {
            "logit_bias"
        }
        SamplingError::TooManyStops(_) | SamplingError::EmptyStop => "stop",
        // Not request fields: the pipeline handed the sampler bad logits.
        SamplingError::LogitsLength { .. }
        | SamplingError::NoFiniteLogits
        | SamplingError::NeedsWholeRow => {
            return ServeError::Internal(e.to_string());
        }
    };
    ServeError::invalid(field, e.to_string())
}

/// Checks a request against the pipeline's limits; returns the KV cache size its sequence needs.
fn check_request(req: &GenRequest, info: &PipelineInfo) -> Result<usize, ServeError> {
    let n = req.prompt.len();
    if n == 0 {
        return Err(ServeError::invalid(
            "prompt",
            "the prompt is empty; it needs at least one token",
        ));
    }
    if n + 1 > info.max_context {
        return Err(ServeError::invalid(
            "prompt",
            format!(
                "the prompt has {n} tokens, but the context holds {} tokens (prompt and at least one \
                 generated token): shorten it to at most {} tokens",
                info.max_context,
                info.max_context.saturating_sub(1)
            ),
        ));
    }
    if let Some((i, id)) = req
        .prompt
        .iter()
        .enumerate()
        .find(|(_, id)| **id as usize >= info.n_vocab)
    {
        return Err(ServeError::invalid(
            "prompt",
            format!(
                "token {i} is id {id}, outside the model's vocabulary of {} tokens",
                info.n_vocab
            ),
        ));
    }
    req.params.validate(info.n_vocab).map_err(sampling_error)?;
    Ok(match req.params.max_tokens {
        Some(m) => n.saturating_add(m).min(info.max_context),
        None => info.max_context,
    })
}

fn count_request(outcome: &'static str) {
    metrics::counter!(REQUESTS_TOTAL, "outcome" => outcome).increment(1);
}

/// A lane's per-step limits, derived from the pipeline's and the config's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Limits {
    /// Tokens per batch.
    budget: usize,
    /// Sequences one lane runs at once (also bounds the batch's logits rows).
    lane_cap: usize,
    /// Prompt chunk size.
    chunk: usize,
}

impl Limits {
    fn new(info: &PipelineInfo, config: &SchedulerConfig, n_lanes: usize) -> Limits {
        let budget = config
            .max_batch_tokens
            .map_or(info.max_batch_tokens, |b| b.min(info.max_batch_tokens))
            .max(1);
        let lane_cap = config
            .max_running
            .div_ceil(n_lanes.max(1))
            .min(info.max_logits)
            .min(budget)
            .max(1);
        let chunk = config.prefill_chunk.min(budget).max(1);
        // A prefilling sequence is one of the lane's, so beside it at most lane_cap - 1 decode tokens: one
        // chunk always fits when lane_cap - 1 + chunk <= budget. Otherwise give up lane room rather than
        // shrink chunks below half the budget.
        if lane_cap - 1 + chunk <= budget {
            return Limits {
                budget,
                lane_cap,
                chunk,
            };
        }
        let chunk = chunk.min((budget / 2).max(1));
        Limits {
            budget,
            lane_cap: lane_cap.min(budget + 1 - chunk),
            chunk,
        }
    }
}

struct Shared {
    pipeline: Arc<dyn Pipeline>,
    tokenizer: Arc<Tokenizer>,
    config: SchedulerConfig,
    n_lanes: usize,
    queue: Mutex<VecDeque<Pending>>,
    /// Wakes idle lanes: a request was queued, a slot freed, or shutdown.
    notify: Notify,
    /// Sequences admitted and not yet retired, all lanes.
    running: AtomicUsize,
    shutdown: AtomicBool,
    /// Forwards that failed with `Unavailable`: a sequence started under an older count has lost its KV
    /// caches.
    failures: AtomicU64,
    last_failure: Mutex<String>,
    health: tokio::sync::Mutex<Option<(Instant, Result<(), ServeError>)>>,
    prefixes: Mutex<PrefixCache>,
    prefix_reused: AtomicU64,
}

impl Shared {
    /// Nothing panics while holding these locks, but a poisoned lock must not take the server down.
    fn queue(&self) -> MutexGuard<'_, VecDeque<Pending>> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn prefixes(&self) -> MutexGuard<'_, PrefixCache> {
        self.prefixes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn note_failure(&self, reason: &str) {
        *self
            .last_failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = reason.to_owned();
        self.failures.fetch_add(1, Ordering::AcqRel);
    }

    fn last_failure(&self) -> String {
        self.last_failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set_running_gauge(&self) {
        metrics::gauge!(REQUESTS_RUNNING).set(self.running.load(Ordering::Acquire) as f64);
    }
}

/// A validated request waiting for a slot.
struct Pending {
    prompt: Vec<u32>,
    params: crate::sampling::SamplingParams,
    context: usize,
    tx: mpsc::Sender<GenEvent>,
    submitted: Instant,
}

/// A running sequence.
struct Seq {
    id: u64,
    tx: mpsc::Sender<GenEvent>,
    prompt: Vec<u32>,
    /// KV cache size.
    context: usize,
    state: DecodeState,
    logprobs: bool,
    /// Alternatives per prompt token when the request asked for prompt log-probabilities.
    prompt_logprobs: Option<usize>,
    /// Prompt tokens' log-probabilities so far (sent as one event before the first generated token).
    prompt_entries: Vec<TokenEvent>,
    /// Positions in the KV cache: prompt tokens while prefilling, then prompt + fed generated tokens.
    pos: usize,
    /// The sampled token to feed at `pos` (decoding); `None` while prefilling.
    next: Option<u32>,
    /// The failure generation when the sequence first reached the pipeline; `None` before.
    started: Option<u64>,
    /// The kept sequence whose first `pos` positions this one copies in its first forward (pinned there
    /// until then).
    prefix_from: Option<u64>,
    /// Generated tokens fed back (their keys and values are in the cache after the prompt's).
    fed: Vec<u32>,
    /// Prompt positions copied from a kept prefix (reported in the usage).
    cached: usize,
    submitted: Instant,
    emitted: bool,
}

/// How a sequence's step ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Continue,
    Finished(FinishReason),
    Cancelled,
    Failed,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Continue => "running",
            Outcome::Finished(FinishReason::Stop) => "stop",
            Outcome::Finished(FinishReason::Length) => "length",
            Outcome::Cancelled => "cancelled",
            Outcome::Failed => "error",
        }
    }
}

impl Seq {
    /// False when the receiver is gone (the client cancelled).
    fn send(&self, event: GenEvent) -> bool {
        match self.tx.try_send(event) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Closed(_)) => false,
            Err(mpsc::error::TrySendError::Full(_)) => {
                // The channel holds every event the context allows; a full one is a bug. Drop the request
                // rather than block the lane.
                error!(
                    seq_id = self.id,
                    "event channel full; cancelling the request"
                );
                false
            }
        }
    }

    fn fail(&self, e: ServeError) {
        debug!(seq_id = self.id, "request failed: {e}");
        self.send(GenEvent::Error(e));
    }

    /// Takes this step's logits rows: prompt log-probabilities from a chunk's rows (sent once the prompt is
    /// done), then the next token from the last row when the step samples.
    fn take_rows(&mut self, p: &Planned, logits: &BatchLogits, tokenizer: &Tokenizer) -> Outcome {
        // While prefilling (`next` is set by the first sample), every token of the chunk has its row.
        if let Some(top) = self.prompt_logprobs
            && self.next.is_none()
            && p.n_rows == p.n_tokens
        {
            // Row j of the chunk is the distribution of the prompt token after the chunk's j-th.
            let start = self.pos - p.n_tokens;
            for j in 0..p.n_rows {
                let Some(&next) = self.prompt.get(start + j + 1) else {
                    break;
                };
                let entry = match logits.row(p.first_row + j) {
                    Some(LogitsRow::Whole(row)) => token_logprobs(row, next, top),
                    _ => None,
                };
                let Some((logprob, top_logprobs)) = entry else {
                    self.fail(ServeError::Internal(format!(
                        "sequence {}: no whole logits row for prompt token {}",
                        self.id,
                        start + j + 1
                    )));
                    return Outcome::Failed;
                };
                self.prompt_entries.push(TokenEvent {
                    id: next,
                    text: String::new(),
                    logprob: Some(logprob),
                    top_logprobs,
                });
            }
            if p.sample {
                let entries = std::mem::take(&mut self.prompt_entries);
                if !self.send(GenEvent::Prompt(entries)) {
                    return Outcome::Cancelled;
                }
            }
        }
        if !p.sample {
            return Outcome::Continue;
        }
        match logits.row(p.first_row + p.n_rows - 1) {
            Some(row) => self.sample(row, tokenizer),
            None => {
                self.fail(ServeError::Internal(format!(
                    "sequence {}: the batch's answer has no logits row {}",
                    self.id,
                    p.first_row + p.n_rows - 1
                )));
                Outcome::Failed
            }
        }
    }

    /// Samples the next token from this sequence's logits row, streams it, and says whether it continues.
    fn sample(&mut self, logits: LogitsRow<'_>, tokenizer: &Tokenizer) -> Outcome {
        let sampled = match logits {
            LogitsRow::Whole(row) => self.state.sample(row),
            LogitsRow::Top(top) => self.state.sample_top(top),
        };
        let sampled = match sampled {
            Ok(s) => s,
            Err(e) => {
                self.fail(ServeError::Internal(format!(
                    "sampling sequence {}: {e}",
                    self.id
                )));
                return Outcome::Failed;
            }
        };
        let accepted = self.state.accept(tokenizer, sampled.id);
        if accepted.is_token {
            let event = TokenEvent {
                id: sampled.id,
                text: accepted.text,
                logprob: self.logprobs.then_some(sampled.logprob),
                top_logprobs: sampled.top_logprobs,
            };
            if !self.send(GenEvent::Token(event)) {
                return Outcome::Cancelled;
            }
            metrics::counter!(GENERATION_TOKENS_TOTAL).increment(1);
            if !self.emitted {
                self.emitted = true;
                metrics::histogram!(TIME_TO_FIRST_TOKEN)
                    .record(self.submitted.elapsed().as_secs_f64());
            }
        }
        match accepted.finish {
            None => {
                self.next = Some(sampled.id);
                Outcome::Continue
            }
            Some(finish) => {
                let text = self.state.finish();
                let usage = Usage {
                    prompt_tokens: self.prompt.len(),
                    completion_tokens: self.state.generated(),
                    cached_tokens: self.cached,
                };
                // A receiver dropped just now changes nothing: the request is complete either way.
                self.send(GenEvent::Done {
                    finish,
                    usage,
                    text,
                });
                Outcome::Finished(finish)
            }
        }
    }
}

/// One sequence's part of the batch being run.
#[derive(Debug, Clone, Copy)]
struct Planned {
    /// Index into the lane's `running`.
    index: usize,
    n_tokens: usize,
    /// The first of its logits rows in the batch's answer.
    first_row: usize,
    /// Its logits rows: one per token for prompt log-probabilities, else 1 for a decode token or a prompt's
    /// last chunk, else 0.
    n_rows: usize,
    /// Its last row samples the next token (a decode token or a prompt's last chunk).
    sample: bool,
    /// The sequence's first chunk (creates it on the pipeline).
    new: bool,
}

/// A micro-batch lane; see the module doc.
struct Lane {
    index: usize,
    shared: Arc<Shared>,
    running: Vec<Seq>,
    /// New sequences per batch: 1 after the pipeline ran out of KV memory, until a sequence retires.
    new_limit: usize,
    /// Retired sequences whose KV caches the pipeline may hold; released before the next forward, so that a
    /// new sequence can use their memory.
    to_release: Vec<u64>,
}

impl Lane {
    async fn run(mut self) {
        debug!(lane = self.index, "scheduler lane started");
        loop {
            let info = self.shared.pipeline.info();
            let limits = Limits::new(&info, &self.shared.config, self.shared.n_lanes);
            self.drop_dead();
            if !self.to_release.is_empty() {
                let ids = std::mem::take(&mut self.to_release);
                self.shared.pipeline.release(&ids).await;
            }
            self.admit(limits, info.n_vocab);
            if self.running.is_empty() {
                let notified = self.shared.notify.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                let queued = !self.shared.queue().is_empty();
                let room =
                    self.shared.running.load(Ordering::Acquire) < self.shared.config.max_running;
                if queued && room {
                    continue;
                }
                if !queued && self.shared.shutdown.load(Ordering::Acquire) {
                    break;
                }
                notified.await;
                continue;
            }
            self.step(limits, &info).await;
        }
        debug!(lane = self.index, "scheduler lane stopped");
    }

    /// Retires sequences whose client went away, and those whose KV caches a failure elsewhere destroyed.
    fn drop_dead(&mut self) {
        let current = self.shared.failures.load(Ordering::Acquire);
        let dead = |s: &Seq| s.tx.is_closed() || s.started.is_some_and(|g| g < current);
        if !self.running.iter().any(dead) {
            return;
        }
        let mut release = Vec::new();
        let seqs = std::mem::take(&mut self.running);
        for s in seqs {
            if s.tx.is_closed() {
                self.retire(s, Outcome::Cancelled, &mut release);
            } else if s.started.is_some_and(|g| g < current) {
                s.fail(ServeError::Unavailable(self.shared.last_failure()));
                self.retire(s, Outcome::Failed, &mut release);
            } else {
                self.running.push(s);
            }
        }
        self.release(release);
    }

    /// Moves queued requests into this lane while it and the scheduler have room.
    fn admit(&mut self, limits: Limits, n_vocab: usize) {
        let max_running = self.shared.config.max_running;
        let mut admitted = false;
        while self.running.len() < limits.lane_cap {
            let reserved =
                self.shared
                    .running
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                        (n < max_running).then_some(n + 1)
                    });
            if reserved.is_err() {
                break;
            }
            let pending = {
                let mut queue = self.shared.queue();
                let p = queue.pop_front();
                metrics::gauge!(REQUESTS_QUEUED).set(queue.len() as f64);
                p
            };
            let Some(p) = pending else {
                self.shared.running.fetch_sub(1, Ordering::AcqRel);
                break;
            };
            if p.tx.is_closed() {
                self.shared.running.fetch_sub(1, Ordering::AcqRel);
                count_request("cancelled");
                continue;
            }
            match DecodeState::new(&p.params, n_vocab, &p.prompt, p.context) {
                Ok(state) => {
                    let id = NEXT_SEQ_ID.fetch_add(1, Ordering::Relaxed);
                    debug!(
                        lane = self.index,
                        seq_id = id,
                        prompt = p.prompt.len(),
                        context = p.context,
                        "admitted"
                    );
                    // The first prompt token has no log-probability: nothing comes before it.
                    let prompt_entries = match p.params.prompt_logprobs {
                        Some(_) => vec![TokenEvent {
                            id: p.prompt[0],
                            text: String::new(),
                            logprob: None,
                            top_logprobs: Vec::new(),
                        }],
                        None => Vec::new(),
                    };
                    // A prompt that asks for every token's log-probability needs every row: no reuse.
                    let hit = if p.params.prompt_logprobs.is_none() {
                        let generation = (
                            self.shared.failures.load(Ordering::Acquire),
                            self.shared.pipeline.epoch(),
                        );
                        self.shared
                            .prefixes()
                            .lookup(&p.prompt, generation, &mut self.to_release)
                    } else {
                        None
                    };
                    if let Some(hit) = hit {
                        debug!(
                            seq_id = id,
                            from = hit.seq_id,
                            tokens = hit.len,
                            "reusing a prompt prefix"
                        );
                        metrics::counter!(PREFIX_REUSED_TOKENS_TOTAL).increment(hit.len as u64);
                        self.shared
                            .prefix_reused
                            .fetch_add(hit.len as u64, Ordering::AcqRel);
                    }
                    self.running.push(Seq {
                        id,
                        tx: p.tx,
                        logprobs: p.params.logprobs.is_some(),
                        prompt_logprobs: p.params.prompt_logprobs,
                        prompt_entries,
                        prompt: p.prompt,
                        context: p.context,
                        state,
                        pos: hit.map_or(0, |h| h.len),
                        next: None,
                        started: None,
                        prefix_from: hit.map(|h| h.seq_id),
                        fed: Vec::new(),
                        cached: hit.map_or(0, |h| h.len),
                        submitted: p.submitted,
                        emitted: false,
                    });
                    admitted = true;
                }
                Err(e) => {
                    // Validated at submit; only a vocabulary that changed since (workers re-formed with
                    // another model) gets here.
                    self.shared.running.fetch_sub(1, Ordering::AcqRel);
                    let _ = p.tx.try_send(GenEvent::Error(sampling_error(e)));
                    count_request("error");
                }
            }
        }
        if admitted {
            self.shared.set_running_gauge();
        }
    }

    /// Decode tokens first, then prompt chunks in admission order.
    fn build(&self, limits: Limits, max_logits: usize) -> (StepBatch, Vec<Planned>) {
        let mut batch = StepBatch::default();
        let mut plan = Vec::new();
        let mut tokens = 0;
        let mut rows = 0;
        let mut new = 0;
        // With limits unchanged since admission, every decode token fits (lane_cap <= budget, max_logits);
        // after the pipeline's limits shrank, the sequences beyond them wait a step.
        for (index, s) in self.running.iter().enumerate() {
            let Some(next) = s.next else { continue };
            if tokens + 1 > limits.budget || rows + 1 > max_logits {
                break;
            }
            batch.seqs.push(SeqStep {
                seq_id: s.id,
                start_pos: s.pos,
                tokens: vec![next],
                want_logits: true,
                all_logits: false,
                top_k: s.state.candidates_needed(),
                context: s.context,
                prefix_from: None,
            });
            plan.push(Planned {
                index,
                n_tokens: 1,
                first_row: rows,
                n_rows: 1,
                sample: true,
                new: false,
            });
            tokens += 1;
            rows += 1;
        }
        for (index, s) in self.running.iter().enumerate() {
            if s.next.is_some() {
                continue;
            }
            // Chunk boundaries at multiples of `chunk` from the prompt's start, whatever the batch holds. A
            // prompt whose every token returns a logits row comes in chunks of at most `max_logits`.
            let all = s.prompt_logprobs.is_some();
            let chunk = if all {
                limits.chunk.min(max_logits)
            } else {
                limits.chunk
            };
            let end = (s.pos / chunk + 1) * chunk;
            let end = end.min(s.prompt.len());
            let n = end - s.pos;
            let last = end == s.prompt.len();
            let n_rows = if all { n } else { usize::from(last) };
            let first = s.started.is_none();
            if tokens + n > limits.budget
                || rows + n_rows > max_logits
                || (first && new >= self.new_limit)
            {
                continue;
            }
            new += usize::from(first);
            batch.seqs.push(SeqStep {
                seq_id: s.id,
                start_pos: s.pos,
                tokens: s.prompt[s.pos..end].to_vec(),
                want_logits: n_rows > 0,
                all_logits: all,
                top_k: s.state.candidates_needed(),
                context: s.context,
                prefix_from: if first { s.prefix_from } else { None },
            });
            plan.push(Planned {
                index,
                n_tokens: n,
                first_row: rows,
                n_rows,
                sample: last,
                new: first,
            });
            tokens += n;
            rows += n_rows;
        }
        (batch, plan)
    }

    async fn step(&mut self, limits: Limits, info: &PipelineInfo) {
        let generation = self.shared.failures.load(Ordering::Acquire);
        let (batch, plan) = self.build(limits, info.max_logits.max(1));
        if plan.is_empty() {
            // Only when the pipeline's limits shrank below a pending chunk; wait for them to change.
            warn!(
                lane = self.index,
                "no sequence fits the pipeline's batch limits {limits:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
            return;
        }
        let started = Instant::now();
        let result = self.shared.pipeline.forward(&batch).await;
        metrics::histogram!(STEP_SECONDS).record(started.elapsed().as_secs_f64());
        let n_vocab = info.n_vocab;
        match result {
            Ok(logits) if logits.len() == batch.n_logits() && logits.n_vocab() == n_vocab => {
                self.advance(&plan, logits, generation).await;
            }
            Ok(logits) => {
                let e = ServeError::Internal(format!(
                    "the pipeline returned {} logits rows of {} for {} rows of {n_vocab}",
                    logits.len(),
                    logits.n_vocab(),
                    batch.n_logits()
                ));
                error!(lane = self.index, "{e}");
                let mut in_batch = vec![false; self.running.len()];
                for p in &plan {
                    in_batch[p.index] = true;
                }
                self.fail_where(|i| in_batch[i], |_| e.clone());
            }
            Err(e) => self.on_error(e, &plan, info.n_stages),
        }
    }

    /// After a successful forward: positions advance, and sequences with a logits row sample their next
    /// token.
    async fn advance(&mut self, plan: &[Planned], logits: BatchLogits, generation: u64) {
        let mut rows: Vec<Option<Planned>> = vec![None; self.running.len()];
        let mut prompt_tokens = 0;
        for p in plan {
            let s = &mut self.running[p.index];
            s.started.get_or_insert(generation);
            s.pos += p.n_tokens;
            if let Some(fed) = s.next {
                s.fed.push(fed);
            }
            if let Some(from) = s.prefix_from.take() {
                self.shared.prefixes().unpin(from);
            }
            if s.next.is_none() && p.sample {
                prompt_tokens += s.prompt.len() as u64;
            }
            rows[p.index] = Some(*p);
        }
        if prompt_tokens > 0 {
            metrics::counter!(PROMPT_TOKENS_TOTAL).increment(prompt_tokens);
        }

        // Sequences move to blocking threads and back, in groups of SAMPLE_GROUP that sample; order is kept.
        let logits = Arc::new(logits);
        let mut groups: Vec<Vec<(Seq, Option<Planned>)>> = Vec::new();
        let mut group = Vec::new();
        let mut sampling = 0;
        for (s, row) in std::mem::take(&mut self.running).into_iter().zip(rows) {
            sampling += usize::from(row.is_some_and(|p| p.n_rows > 0));
            group.push((s, row));
            if sampling == SAMPLE_GROUP {
                groups.push(std::mem::take(&mut group));
                sampling = 0;
            }
        }
        if !group.is_empty() {
            groups.push(group);
        }
        let ids: Vec<Vec<(u64, bool)>> = groups
            .iter()
            .map(|g| g.iter().map(|(s, _)| (s.id, s.started.is_some())).collect())
            .collect();
        let tasks = groups.into_iter().map(|group| {
            let logits = logits.clone();
            let tokenizer = self.shared.tokenizer.clone();
            tokio::task::spawn_blocking(move || {
                group
                    .into_iter()
                    .map(|(mut s, planned)| {
                        let outcome = match planned {
                            Some(p) => s.take_rows(&p, &logits, &tokenizer),
                            None => Outcome::Continue,
                        };
                        (s, outcome)
                    })
                    .collect::<Vec<_>>()
            })
        });
        let results = join_all(tasks).await;
        let mut release = Vec::new();
        for (result, ids) in results.into_iter().zip(ids) {
            match result {
                Ok(seqs) => {
                    for (s, outcome) in seqs {
                        if outcome == Outcome::Continue {
                            self.running.push(s);
                        } else {
                            self.retire(s, outcome, &mut release);
                        }
                    }
                }
                Err(e) => {
                    // A panic in sampling (a bug): the group's sequences are gone with their senders, so their
                    // clients see the stream end without `Done`. Keep the books straight.
                    error!(lane = self.index, "sampling task failed: {e}");
                    self.shared.running.fetch_sub(ids.len(), Ordering::AcqRel);
                    for _ in &ids {
                        count_request("error");
                    }
                    release.extend(
                        ids.iter()
                            .filter(|(_, started)| *started)
                            .map(|(id, _)| *id),
                    );
                }
            }
        }
        self.release(release);
    }

    fn on_error(&mut self, err: PipelineError, plan: &[Planned], n_stages: usize) {
        let mut in_batch = vec![None; self.running.len()];
        for p in plan {
            in_batch[p.index] = Some(p.new);
        }
        match err {
            PipelineError::Unavailable(msg) => {
                warn!(lane = self.index, "pipeline unavailable: {msg}");
                self.shared.note_failure(&msg);
                let e = ServeError::Unavailable(msg);
                // Every sequence with state on the pipeline is lost, as are the batch's new ones; queued
                // prompts not yet sent keep their place.
                let mut failed = Vec::with_capacity(in_batch.len());
                for (i, s) in self.running.iter().enumerate() {
                    failed.push(in_batch[i].is_some() || s.started.is_some());
                }
                self.fail_where(|i| failed[i], |_| e.clone());
            }
            PipelineError::ResourceExhausted(msg) => {
                warn!(lane = self.index, "pipeline out of KV memory: {msg}");
                let kept = self.shared.prefixes().evict_unpinned();
                if !kept.is_empty() && n_stages == 1 {
                    // The single stage refused the batch as a whole: run it again once the kept prefixes'
                    // memory is free.
                    debug!(
                        lane = self.index,
                        n = kept.len(),
                        "dropping kept prefixes for memory"
                    );
                    self.release(kept);
                    return;
                }
                self.to_release.extend(kept);
                let n_new = in_batch.iter().filter(|b| **b == Some(true)).count();
                let overloaded = ServeError::Overloaded(format!(
                    "not enough KV cache memory for new requests: {msg}"
                ));
                if n_new > 1 && n_stages == 1 {
                    // Perhaps some of them fit: try them one at a time.
                    self.new_limit = 1;
                } else if n_new == 0 {
                    // Without a new sequence to drop, running the batch again would fail again.
                    let e = ServeError::Internal(format!(
                        "the pipeline ran out of KV cache memory on a batch without new sequences: {msg}"
                    ));
                    self.fail_where(|i| in_batch[i].is_some(), |_| e.clone());
                } else if n_stages > 1 {
                    // Earlier stages may have run the batch: the old sequences' positions no longer agree
                    // across stages.
                    let partway = ServeError::Unavailable(format!(
                        "a batch failed partway through the pipeline (out of KV cache memory): {msg}"
                    ));
                    self.fail_where(
                        |i| in_batch[i].is_some(),
                        |i| {
                            if in_batch[i] == Some(true) {
                                overloaded.clone()
                            } else {
                                partway.clone()
                            }
                        },
                    );
                } else {
                    // One stage refuses the whole batch before running it: the others run again next step.
                    self.fail_where(|i| in_batch[i] == Some(true), |_| overloaded.clone());
                }
            }
            PipelineError::Internal(msg) => {
                error!(lane = self.index, "pipeline error: {msg}");
                let e = ServeError::Internal(msg);
                self.fail_where(|i| in_batch[i].is_some(), |_| e.clone());
            }
        }
    }

    /// Fails the sequences at the indices where `pred` holds with `error(index)`, and releases them (even new
    /// ones: earlier stages may have created them before a later one failed).
    fn fail_where(&mut self, pred: impl Fn(usize) -> bool, error: impl Fn(usize) -> ServeError) {
        let mut release = Vec::new();
        let seqs = std::mem::take(&mut self.running);
        for (i, s) in seqs.into_iter().enumerate() {
            if pred(i) {
                s.fail(error(i));
                let id = s.id;
                if !self.retire(s, Outcome::Failed, &mut release) {
                    release.push(id);
                }
            } else {
                self.running.push(s);
            }
        }
        self.release(release);
    }

    /// Removes a finished, failed or cancelled sequence from the books; its id joins `release` (and this
    /// returns true) if the pipeline holds its KV cache.
    fn retire(&mut self, mut s: Seq, outcome: Outcome, release: &mut Vec<u64>) -> bool {
        debug!(
            lane = self.index,
            seq_id = s.id,
            outcome = outcome.label(),
            generated = s.state.generated(),
            "retired"
        );
        self.shared.running.fetch_sub(1, Ordering::AcqRel);
        count_request(outcome.label());
        if let Some(from) = s.prefix_from.take() {
            self.shared.prefixes().unpin(from);
        }
        let Some(failures) = s.started else {
            return false;
        };
        let generation = (failures, self.shared.pipeline.epoch());
        // Its KV memory is about to be freed (or kept for its prefix, evicting when memory runs out): new
        // sequences may fit again.
        self.new_limit = usize::MAX;
        if matches!(outcome, Outcome::Finished(_)) && s.prompt.len() + s.fed.len() == s.pos {
            let mut tokens = std::mem::take(&mut s.prompt);
            tokens.append(&mut s.fed);
            release.extend(
                self.shared
                    .prefixes()
                    .insert(s.id, tokens, s.context, generation),
            );
        } else {
            release.push(s.id);
        }
        true
    }

    /// After retiring sequences: queues their KV caches for release, and lets an idle lane take the freed
    /// slots.
    fn release(&mut self, ids: Vec<u64>) {
        self.shared.set_running_gauge();
        if !self.shared.queue().is_empty() {
            self.shared.notify.notify_one();
        }
        self.to_release.extend(ids);
    }
}
