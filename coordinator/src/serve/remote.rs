//! `RemotePipeline`: the model on worker processes, one per (stage, rank) of a shard set, over gRPC
//! (`tessera.worker.v1`, whose proto comments specify epochs, JoinGroup and the error codes).
//!
//! # Group state
//!
//! The pipeline is `Down(reason)` or `Healthy { epoch }`. [`RemotePipeline::connect`] returns at once, Down
//! ("connecting"), and spawns a supervisor that forms the group whenever it is Down: Describe every worker,
//! check each against the manifest (stage, rank, topology, shard file and checksum), pick an epoch above
//! every epoch any worker has seen, JoinGroup all ranks of every stage at once, then Healthy. Any failed,
//! timed-out or nonsensical Forward sets Down with a reason naming the worker and the gRPC status; the
//! supervisor then re-forms every `reform_interval` until the workers answer again. A worker that restarted
//! is thus re-joined automatically under a new epoch; sequences of the old epoch are lost (their requests
//! already failed with `Unavailable`). While Healthy, the supervisor Describes every worker each
//! `probe_interval`, so that a worker that restarted or vanished while idle is noticed before a request
//! runs into it.
//!
//! # Forward
//!
//! Every batch gets the epoch's next number (`ForwardRequest.order`, 1, 2, …) and goes to every rank of every
//! stage at once; the workers run the batches in that order, whatever order they arrive in. So every rank
//! of a stage runs the same batches in the same order, a stage's next batch is already queued while the
//! current one runs (its workers do not idle while logits travel back, are sampled and the next request
//! travels out), and micro-batches of different scheduler lanes overlap across stages. The first stage gets
//! the token ids; with several stages the workers hand the hidden states on themselves (`hand_off`: rank r
//! of a stage to rank r of the next, named in JoinGroup's `hand_to`), so they never pass through the
//! coordinator. The last stage's ranks each return a slice of the vocabulary, placed into full
//! `n_logits × n_vocab` rows, or for a sequence with `top_k` the best logits of their slice and its
//! log-sum-exp, merged into the row's best (see `merge_top`).
//!
//! Errors: every rank of a stage answering RESOURCE_EXHAUSTED (KV memory) is `ResourceExhausted`, every rank
//! answering INVALID_ARGUMENT is `Internal` (the batch was malformed; the workers refuse it before computing
//! anything, so the epoch stays usable); the later stages of a refused batch answer ABORTED and the earliest
//! refusal is reported once every stage has answered. Anything else — another status, a mix, a timeout, a
//! transport error, an answer of the wrong shape — sets Down and is `Unavailable`, at the first such answer,
//! without waiting for the other ranks and stages.
//!
//! # Limits
//!
//! [`Pipeline::info`] comes from the last successful Describe round: the smallest `max_batch_tokens` and
//! `max_context` over all workers and the smallest `max_logits` of the last stage. Before the first round it
//! is derived from the manifest and the worker's defaults (512 batch tokens, 64 logits rows, the model's
//! training context capped at 4096); call [`RemotePipeline::wait_healthy`] before starting a scheduler to
//! have the real limits from the start (the scheduler re-reads them at every step anyway).

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, Weak};
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use futures::StreamExt;
use futures::future::{BoxFuture, join_all};
use futures::stream::FuturesUnordered;
use shard_tool::manifest::Manifest;
use tessera_proto::worker::v1::worker_client::WorkerClient;
use tessera_proto::worker::v1::{
    DescribeRequest, DescribeResponse, ForwardRequest, ForwardResponse, JoinGroupRequest,
    LogitsMode, NcclIdRequest, ReleaseRequest, SeqInput,
};
use thiserror::Error;
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint};
use tracing::{debug, info, warn};

use super::pipeline::HEALTH_SEQ_ID;
use super::pipeline::TopLogits;
use super::{BatchLogits, LogitsRow, Pipeline, PipelineError, PipelineInfo, SeqStep, StepBatch};
use tessera_kernels::softmax_reduce;

/// Largest gRPC message either way: a batch's hidden states or logits rows exceed tonic's 4 MiB default by
/// far (64 rows of a 128k vocabulary are 32 MiB).
pub const MAX_MESSAGE_BYTES: usize = 1 << 30;

/// The worker's defaults, for [`Pipeline::info`] before the workers answered.
const DEFAULT_MAX_BATCH_TOKENS: usize = 512;
const DEFAULT_MAX_LOGITS: usize = 64;
const DEFAULT_MAX_CONTEXT: usize = 4096;

/// Where the worker serving one (stage, rank) of the shard set listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerAddr {
    pub stage: usize,
    pub rank: usize,
    /// `host:port`, or a URL (`http://host:port`).
    pub addr: String,
}

/// Timeouts and intervals of a [`RemotePipeline`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteOptions {
    /// Opening a connection to a worker.
    pub connect_timeout: Duration,
    /// HTTP/2 pings on every connection, idle or not, and how long a ping may go unanswered before the
    /// connection is dropped: a vanished worker (host down, cable pulled) fails calls within seconds.
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// One stage's Forward (the longest prefill batch must fit).
    pub forward_timeout: Duration,
    /// Describe, JoinGroup and Release.
    pub rpc_timeout: Duration,
    /// Pause between attempts to form the group while Down.
    pub reform_interval: Duration,
    /// Describe round while Healthy, to notice restarted or vanished workers between requests.
    pub probe_interval: Duration,
    /// [`Pipeline::health`]'s one-token forward.
    pub health_timeout: Duration,
}

impl Default for RemoteOptions {
    fn default() -> Self {
        RemoteOptions {
            connect_timeout: Duration::from_secs(2),
            keepalive_interval: Duration::from_secs(1),
            keepalive_timeout: Duration::from_secs(3),
            forward_timeout: Duration::from_secs(60),
            rpc_timeout: Duration::from_secs(10),
            reform_interval: Duration::from_millis(500),
            probe_interval: Duration::from_secs(2),
            health_timeout: Duration::from_secs(5),
        }
    }
}

/// Whether the worker group can serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupState {
    /// Not formed, or failed; the reason names the worker and what went wrong.
    Down(String),
    /// Every worker joined `epoch`.
    Healthy { epoch: u64 },
}

/// The worker list does not fit the manifest (found before anything starts).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RemoteError {
    #[error("workers: {0}")]
    Workers(String),
    #[error("manifest: {0}")]
    Manifest(String),
}

/// The cluster pipeline; see the module doc.
pub struct RemotePipeline {
    /// For tasks that outlive a call (health probes), without keeping the pipeline alive from the supervisor.
    me: Weak<RemotePipeline>,
    manifest: Manifest,
    opts: RemoteOptions,
    stages: Vec<Stage>,
    state: watch::Sender<GroupState>,
    layout: RwLock<Arc<Layout>>,
    /// The highest epoch this pipeline asked for: the next one is above it even if workers forgot it.
    last_epoch: AtomicU64,
    /// One health probe at a time (they share [`HEALTH_SEQ_ID`]).
    probe: tokio::sync::Mutex<()>,
    /// `(epoch, order of the last batch numbered)`; see the module doc.
    order: Mutex<(u64, u64)>,
}

struct Stage {
    index: usize,
    ranks: Vec<Rank>,
}

struct Rank {
    stage: usize,
    rank: usize,
    addr: String,
    client: WorkerClient<Channel>,
}

impl Rank {
    fn name(&self) -> String {
        format!(
            "worker {} (stage {} rank {})",
            self.addr, self.stage, self.rank
        )
    }
}

/// What the workers' Describe answers say about the group.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Layout {
    info: PipelineInfo,
    /// Vocabulary rows of each last-stage rank, in rank order.
    vocab: Vec<Range<usize>>,
}

impl std::fmt::Debug for RemotePipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemotePipeline")
            .field("state", &self.state())
            .field("info", &self.info())
            .finish()
    }
}

fn status_text(status: &tonic::Status) -> String {
    format!("gRPC status {:?}: {}", status.code(), status.message())
}

impl RemotePipeline {
    /// Checks that `workers` name every (stage, rank) of the manifest's plan exactly once, opens (lazy)
    /// connections, and spawns the supervisor that forms the group (call inside a tokio runtime). Returns at
    /// once, Down ("connecting"); see [`RemotePipeline::wait_healthy`].
    pub fn connect(
        manifest: Manifest,
        workers: Vec<WorkerAddr>,
        opts: RemoteOptions,
    ) -> Result<Arc<RemotePipeline>, RemoteError> {
        let by_slot = check_workers(&manifest, &workers)?;
        let (tp, pp) = (manifest.plan.topology.tp, manifest.plan.topology.pp);
        let mut stages = Vec::with_capacity(pp);
        for stage in 0..pp {
            let mut ranks = Vec::with_capacity(tp);
            for rank in 0..tp {
                let addr = by_slot[&(stage, rank)].clone();
                let client = client(&addr, &opts).map_err(|msg| {
                    RemoteError::Workers(format!(
                        "stage {stage} rank {rank}: address {addr:?}: {msg}"
                    ))
                })?;
                ranks.push(Rank {
                    stage,
                    rank,
                    addr,
                    client,
                });
            }
            stages.push(Stage {
                index: stage,
                ranks,
            });
        }
        let layout = Layout {
            info: PipelineInfo {
                max_batch_tokens: DEFAULT_MAX_BATCH_TOKENS,
                max_logits: DEFAULT_MAX_LOGITS,
                max_context: match manifest.config.n_ctx_train {
                    0 => DEFAULT_MAX_CONTEXT,
                    n => n.min(DEFAULT_MAX_CONTEXT),
                },
                n_vocab: manifest.config.n_vocab,
                n_stages: pp,
                tp,
            },
            vocab: Vec::new(),
        };
        let (state, rx) = watch::channel(GroupState::Down("connecting".into()));
        let pipeline = Arc::new_cyclic(|me| RemotePipeline {
            me: me.clone(),
            manifest,
            opts,
            stages,
            state,
            layout: RwLock::new(Arc::new(layout)),
            last_epoch: AtomicU64::new(0),
            probe: tokio::sync::Mutex::new(()),
            order: Mutex::new((0, 0)),
        });
        tokio::spawn(supervise(Arc::downgrade(&pipeline), rx));
        Ok(pipeline)
    }

    pub fn state(&self) -> GroupState {
        self.state.borrow().clone()
    }

    /// Waits until the group is Healthy; `Unavailable` with the last reason after `timeout`.
    pub async fn wait_healthy(&self, timeout: Duration) -> Result<(), PipelineError> {
        let mut rx = self.state.subscribe();
        let healthy = tokio::time::timeout(
            timeout,
            rx.wait_for(|s| matches!(s, GroupState::Healthy { .. })),
        )
        .await;
        match healthy {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(PipelineError::Unavailable(
                "the pipeline is shutting down".into(),
            )),
            Err(_) => Err(PipelineError::Unavailable(format!(
                "the workers did not form a group within {:.1} s: {}",
                timeout.as_secs_f64(),
                match self.state() {
                    GroupState::Down(reason) => reason,
                    GroupState::Healthy { .. } => "healthy now".into(),
                }
            ))),
        }
    }

    fn layout(&self) -> Arc<Layout> {
        self.layout
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn ranks(&self) -> impl Iterator<Item = &Rank> {
        self.stages.iter().flat_map(|s| s.ranks.iter())
    }

    /// Marks the group Down, if it is still in `epoch` (a failure of an older epoch says nothing about a
    /// newer one, and the first reason of a failure is the informative one).
    fn fail(&self, epoch: u64, reason: String) {
        let changed = self.state.send_if_modified(|s| match s {
            GroupState::Healthy { epoch: e } if *e == epoch => {
                *s = GroupState::Down(reason.clone());
                true
            }
            _ => false,
        });
        if changed {
            warn!(epoch, "worker group down: {reason}");
        }
    }

    /// One attempt to form the group; returns the new epoch, or why it cannot be formed.
    async fn form(&self) -> Result<u64, String> {
        let timeout = self.opts.rpc_timeout;
        let answers =
            join_all(
                self.ranks().map(|r| {
                    let mut client = r.client.clone();
                    async move {
                        tokio::time::timeout(timeout, client.describe(DescribeRequest {})).await
                    }
                }),
            )
            .await;
        let mut described = Vec::with_capacity(answers.len());
        for (r, answer) in self.ranks().zip(answers) {
            let d = match answer {
                Ok(Ok(d)) => d.into_inner(),
                Ok(Err(status)) => {
                    return Err(format!(
                        "{}: Describe failed: {}",
                        r.name(),
                        status_text(&status)
                    ));
                }
                Err(_) => {
                    return Err(format!(
                        "{}: no Describe answer within {:.1} s",
                        r.name(),
                        timeout.as_secs_f64()
                    ));
                }
            };
            check_describe(&self.manifest, r.stage, r.rank, &r.addr, &d)?;
            described.push(d);
        }
        let layout = layout_from(&self.manifest, self.ranks().zip(&described))?;
        let epoch = described
            .iter()
            .map(|d| d.epoch)
            .chain([self.last_epoch.load(Ordering::Acquire)])
            .max()
            .unwrap_or(0)
            + 1;
        // Workers that join remember the epoch even if another rank fails: never ask for it again.
        self.last_epoch.store(epoch, Ordering::Release);

        let mut peers: Vec<Vec<String>> = vec![Vec::new(); self.stages.len()];
        let mut devices: Vec<Vec<&str>> = vec![Vec::new(); self.stages.len()];
        for (r, d) in self.ranks().zip(&described) {
            peers[r.stage].push(d.peer_addr.clone());
            devices[r.stage].push(&d.device);
        }
        // Stages whose ranks are all GPUs all-reduce over NCCL: rank 0 makes the id, every rank gets it.
        let mut nccl_ids: Vec<bytes::Bytes> = vec![bytes::Bytes::new(); self.stages.len()];
        for (stage, s) in self.stages.iter().enumerate() {
            if !uses_nccl(&devices[stage]) {
                continue;
            }
            let mut client = s.ranks[0].client.clone();
            match tokio::time::timeout(timeout, client.nccl_id(NcclIdRequest {})).await {
                Ok(Ok(id)) => nccl_ids[stage] = id.into_inner().id,
                Ok(Err(status)) => warn!(
                    stage,
                    "NcclId failed, the stage all-reduces over its peer links: {}",
                    status_text(&status)
                ),
                Err(_) => warn!(
                    stage,
                    "no NcclId answer, the stage all-reduces over its peer links"
                ),
            }
        }
        // Every rank of a stage must be asked concurrently (JoinGroup returns once all links are up); all
        // stages at once too.
        let joins = join_all(self.ranks().map(|r| {
            let mut client = r.client.clone();
            let request = JoinGroupRequest {
                epoch,
                peers: peers[r.stage].clone(),
                nccl_id: nccl_ids[r.stage].clone(),
                // Every stage has the same number of ranks (the plan's tp).
                hand_to: self
                    .stages
                    .get(r.stage + 1)
                    .map(|next| vec![next.ranks[r.rank].addr.clone()])
                    .unwrap_or_default(),
            };
            async move { tokio::time::timeout(timeout, client.join_group(request)).await }
        }))
        .await;
        for (r, joined) in self.ranks().zip(joins) {
            match joined {
                Ok(Ok(_)) => {}
                Ok(Err(status)) => {
                    return Err(format!(
                        "{}: JoinGroup (epoch {epoch}) failed: {}",
                        r.name(),
                        status_text(&status)
                    ));
                }
                Err(_) => {
                    return Err(format!(
                        "{}: JoinGroup (epoch {epoch}) did not finish within {:.1} s",
                        r.name(),
                        timeout.as_secs_f64()
                    ));
                }
            }
        }
        *self.layout.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(layout);
        Ok(epoch)
    }

    /// While Healthy: a Describe round. A worker in another epoch (it restarted) or unreachable sets Down;
    /// a slow answer alone does not (the worker may be busy with a long batch).
    async fn probe_workers(&self, epoch: u64) {
        let timeout = self.opts.rpc_timeout;
        let answers =
            join_all(
                self.ranks().map(|r| {
                    let mut client = r.client.clone();
                    async move {
                        tokio::time::timeout(timeout, client.describe(DescribeRequest {})).await
                    }
                }),
            )
            .await;
        for (r, answer) in self.ranks().zip(answers) {
            match answer {
                Ok(Ok(d)) if d.get_ref().epoch == epoch => {}
                Ok(Ok(d)) => {
                    return self.fail(
                        epoch,
                        format!(
                            "{} is in epoch {}, the group in {epoch} (it restarted or re-joined)",
                            r.name(),
                            d.get_ref().epoch
                        ),
                    );
                }
                Ok(Err(status)) => {
                    return self.fail(
                        epoch,
                        format!("{}: Describe failed: {}", r.name(), status_text(&status)),
                    );
                }
                Err(_) => debug!("{}: no Describe answer within {timeout:?}", r.name()),
            }
        }
    }

    /// The `order` of the next batch in `epoch`. Numbers restart at 1 in a newer epoch; a batch of an older
    /// one (every worker refuses it for its epoch) must not reset the count of the current one.
    fn next_order(&self, epoch: u64) -> u64 {
        let mut order = self.order.lock().unwrap_or_else(PoisonError::into_inner);
        if epoch > order.0 {
            *order = (epoch, 0);
        } else if epoch < order.0 {
            return u64::MAX;
        }
        order.1 += 1;
        order.1
    }

    async fn run(&self, batch: &StepBatch) -> Result<BatchLogits, PipelineError> {
        let epoch = match &*self.state.borrow() {
            GroupState::Healthy { epoch } => *epoch,
            GroupState::Down(reason) => {
                return Err(PipelineError::Unavailable(format!(
                    "the worker group is down: {reason}"
                )));
            }
        };
        let layout = self.layout();
        let n_tokens = batch.n_tokens();
        let n_logits = batch.n_logits();
        if n_tokens == 0 {
            return Err(PipelineError::Internal("an empty batch".into()));
        }
        let seqs = batch
            .seqs
            .iter()
            .map(seq_input)
            .collect::<Result<Vec<_>, _>>()?;
        let tokens: Vec<u32> = batch
            .seqs
            .iter()
            .flat_map(|s| s.tokens.iter().copied())
            .collect();
        let n_stages = self.stages.len();
        let order = self.next_order(epoch);
        let mut pending: FuturesUnordered<_> = self
            .stages
            .iter()
            .map(|stage| {
                let request = ForwardRequest {
                    epoch,
                    seqs: seqs.clone(),
                    tokens: if stage.index == 0 {
                        tokens.clone()
                    } else {
                        Vec::new()
                    },
                    hidden: Bytes::new(),
                    order,
                    hand_off: n_stages > 1,
                };
                async move { (stage, self.forward_stage(epoch, stage, &request).await) }
            })
            .collect();
        let mut logits = None;
        // A stage that refused the batch (KV memory, malformed) makes the later stages answer ABORTED; the
        // earliest refusal is the one to report, once every stage has answered (a stage dropped now would
        // leave its workers' batch order with a gap).
        let mut refused: Option<(usize, PipelineError)> = None;
        while let Some((stage, answer)) = pending.next().await {
            let answers = match answer {
                Ok(answers) => answers,
                Err(e @ PipelineError::Unavailable(_)) => return Err(e),
                Err(e) => {
                    if refused.as_ref().is_none_or(|(s, _)| stage.index < *s) {
                        refused = Some((stage.index, e));
                    }
                    continue;
                }
            };
            if stage.index + 1 < n_stages {
                continue;
            }
            if let Some((r, a)) = stage
                .ranks
                .iter()
                .zip(&answers)
                .zip(&layout.vocab)
                .find(|((_, a), v)| (a.vocab_start as usize..a.vocab_end as usize) != **v)
                .map(|(ra, _)| ra)
            {
                let reason = format!(
                    "{}: Forward returned logits for vocabulary rows {}..{}, its Describe said {:?}",
                    r.name(),
                    a.vocab_start,
                    a.vocab_end,
                    layout.vocab[r.rank]
                );
                self.fail(epoch, reason.clone());
                return Err(PipelineError::Unavailable(reason));
            }
            let parts: Vec<LogitsPart<'_>> = stage
                .ranks
                .iter()
                .zip(&answers)
                .map(|(r, a)| LogitsPart {
                    worker: &r.addr,
                    rows: a.n_logit_rows as usize,
                    vocab: a.vocab_start as usize..a.vocab_end as usize,
                    bytes: &a.logits,
                    top: TopPart {
                        counts: &a.top_counts,
                        ids: &a.top_ids,
                        logits: &a.top_logits,
                        lse: &a.top_lse,
                    },
                })
                .collect();
            let n_vocab = layout.info.n_vocab;
            let ks: Vec<usize> = batch
                .seqs
                .iter()
                .map(SeqStep::row_top_k)
                .filter(|&k| k > 0)
                .collect();
            let assembled = assemble_logits(n_logits - ks.len(), n_vocab, &parts)
                .and_then(|whole| Ok((whole, merge_top(&ks, &parts)?)));
            let (whole, tops) = assembled.map_err(|msg| {
                self.fail(epoch, msg.clone());
                PipelineError::Unavailable(msg)
            })?;
            let mut tops = tops.into_iter();
            let rows = batch
                .seqs
                .iter()
                .flat_map(|s| {
                    let top = if s.row_top_k() > 0 { tops.next() } else { None };
                    std::iter::repeat_n(top, s.n_rows())
                })
                .collect();
            logits = Some(BatchLogits::from_rows(n_vocab, whole, rows));
        }
        if let Some((_, e)) = refused {
            return Err(e);
        }
        logits.ok_or_else(|| PipelineError::Internal("the pipeline has no stages".into()))
    }

    /// Sends `request` to every rank of `stage` at once and sorts out the answers (see the module doc for
    /// the classification). A transport error, a timeout or an unexpected status fails at once, without
    /// waiting for the other ranks (which would only sit in an all-reduce with the failed one until their
    /// link timeout): the group is Down and re-forms under a new epoch whatever they do.
    async fn forward_stage(
        &self,
        epoch: u64,
        stage: &Stage,
        request: &ForwardRequest,
    ) -> Result<Vec<ForwardResponse>, PipelineError> {
        let timeout = self.opts.forward_timeout;
        let mut pending: FuturesUnordered<_> = stage
            .ranks
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let mut client = r.client.clone();
                let request = request.clone();
                async move {
                    (
                        i,
                        tokio::time::timeout(timeout, client.forward(request)).await,
                    )
                }
            })
            .collect();
        let mut answers: Vec<Option<ForwardResponse>> = vec![None; stage.ranks.len()];
        let mut refused: Vec<(usize, tonic::Status)> = Vec::new();
        while let Some((i, answer)) = pending.next().await {
            let r = &stage.ranks[i];
            let reason = match answer {
                Ok(Ok(response)) => {
                    answers[i] = Some(response.into_inner());
                    continue;
                }
                Ok(Err(status))
                    if matches!(
                        status.code(),
                        tonic::Code::ResourceExhausted
                            | tonic::Code::InvalidArgument
                            | tonic::Code::Aborted
                    ) =>
                {
                    refused.push((i, status));
                    continue;
                }
                Ok(Err(status)) => {
                    format!("{}: Forward failed: {}", r.name(), status_text(&status))
                }
                Err(_) => format!(
                    "{}: no Forward answer within {:.1} s",
                    r.name(),
                    timeout.as_secs_f64()
                ),
            };
            self.fail(epoch, reason.clone());
            return Err(PipelineError::Unavailable(reason));
        }
        let Some((i, status)) = refused.first() else {
            return Ok(answers.into_iter().flatten().collect());
        };
        let reason = format!(
            "{}: Forward failed: {}",
            stage.ranks[*i].name(),
            status_text(status)
        );
        // Workers check a batch before computing anything, so every rank refuses it alike and the epoch
        // stays usable; ranks that disagree are no longer in lockstep.
        let uniform = refused.len() == stage.ranks.len()
            && refused.iter().all(|(_, s)| s.code() == status.code());
        match status.code() {
            tonic::Code::ResourceExhausted if uniform => {
                Err(PipelineError::ResourceExhausted(reason))
            }
            tonic::Code::InvalidArgument if uniform => Err(PipelineError::Internal(reason)),
            // An earlier stage refused the batch (`run` reports that stage's answer instead).
            tonic::Code::Aborted if uniform => Err(PipelineError::Internal(reason)),
            _ => {
                self.fail(epoch, reason.clone());
                Err(PipelineError::Unavailable(reason))
            }
        }
    }

    async fn release_in(&self, epoch: u64, seq_ids: &[u64]) {
        let timeout = self.opts.rpc_timeout;
        let answers = join_all(self.ranks().map(|r| {
            let mut client = r.client.clone();
            let request = ReleaseRequest {
                epoch,
                seq_ids: seq_ids.to_vec(),
            };
            async move { tokio::time::timeout(timeout, client.release(request)).await }
        }))
        .await;
        for (r, answer) in self.ranks().zip(answers) {
            match answer {
                Ok(Ok(_)) => {}
                Ok(Err(status)) => debug!("{}: Release failed: {}", r.name(), status_text(&status)),
                Err(_) => debug!("{}: no Release answer within {timeout:?}", r.name()),
            }
        }
    }

    async fn probe_once(&self) -> Result<(), PipelineError> {
        let _one = self.probe.lock().await;
        let epoch = match self.state() {
            GroupState::Healthy { epoch } => epoch,
            GroupState::Down(reason) => {
                return Err(PipelineError::Unavailable(format!(
                    "the worker group is down: {reason}"
                )));
            }
        };
        // A probe cut short earlier may have left the sequence on some stage.
        self.release_in(epoch, &[HEALTH_SEQ_ID]).await;
        let batch = StepBatch {
            seqs: vec![SeqStep {
                seq_id: HEALTH_SEQ_ID,
                start_pos: 0,
                tokens: vec![0],
                want_logits: true,
                all_logits: false,
                top_k: 0,
                context: 1,
                prefix_from: None,
            }],
        };
        let result = self.run(&batch).await;
        self.release_in(epoch, &[HEALTH_SEQ_ID]).await;
        let logits = result?;
        if matches!(logits.row(0), Some(LogitsRow::Whole(row)) if row.iter().any(|l| l.is_finite()))
        {
            Ok(())
        } else {
            Err(PipelineError::Internal(
                "the health probe's logits have no finite value".into(),
            ))
        }
    }
}

/// The wire form of one sequence's part of a batch.
fn seq_input(s: &SeqStep) -> Result<SeqInput, PipelineError> {
    let u32_of = |field: &str, v: usize| {
        u32::try_from(v).map_err(|_| {
            PipelineError::Internal(format!(
                "seq_id {}: {field} {v} does not fit the worker API's 32 bits",
                s.seq_id
            ))
        })
    };
    Ok(SeqInput {
        seq_id: s.seq_id,
        start_pos: u32_of("start_pos", s.start_pos)?,
        n_tokens: u32_of("n_tokens", s.tokens.len())?,
        logits: match (s.want_logits, s.all_logits) {
            (false, _) => LogitsMode::None,
            (true, false) => LogitsMode::Last,
            (true, true) => LogitsMode::All,
        } as i32,
        context: u32_of("context", s.context)?,
        top_k: u32_of("top_k", s.row_top_k())?,
        prefix_from: s.prefix_from,
    })
}

/// Opens a lazy channel: connections are made (and re-made) on use, so `connect` never blocks.
fn client(addr: &str, opts: &RemoteOptions) -> Result<WorkerClient<Channel>, String> {
    let url = if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    };
    let endpoint = Endpoint::from_shared(url)
        .map_err(|e| e.to_string())?
        .connect_timeout(opts.connect_timeout)
        .http2_keep_alive_interval(opts.keepalive_interval)
        .keep_alive_timeout(opts.keepalive_timeout)
        .keep_alive_while_idle(true)
        .tcp_nodelay(true);
    Ok(WorkerClient::new(endpoint.connect_lazy())
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

/// Every (stage, rank) of the plan exactly once, each with a manifest entry; returns the address of each.
fn check_workers(
    manifest: &Manifest,
    workers: &[WorkerAddr],
) -> Result<HashMap<(usize, usize), String>, RemoteError> {
    let (tp, pp) = (manifest.plan.topology.tp, manifest.plan.topology.pp);
    if tp == 0 || pp == 0 {
        return Err(RemoteError::Manifest(format!(
            "the plan's topology is tp={tp} pp={pp}; both must be at least 1"
        )));
    }
    for stage in 0..pp {
        for rank in 0..tp {
            let shard = manifest.shard(stage, rank).ok_or_else(|| {
                RemoteError::Manifest(format!("no shard file for stage {stage} rank {rank}"))
            })?;
            parse_xxh3(&shard.entry.xxh3).map_err(|msg| {
                RemoteError::Manifest(format!(
                    "shard {} (stage {stage} rank {rank}): {msg}",
                    shard.entry.file
                ))
            })?;
        }
    }
    let mut by_slot = HashMap::new();
    let mut by_addr: HashMap<&str, (usize, usize)> = HashMap::new();
    for w in workers {
        if w.stage >= pp || w.rank >= tp {
            return Err(RemoteError::Workers(format!(
                "{} is given as stage {} rank {}, but the shard set has stages 0..{pp} and ranks 0..{tp} \
                 (tp={tp}, pp={pp})",
                w.addr, w.stage, w.rank
            )));
        }
        if let Some(other) = by_slot.insert((w.stage, w.rank), w.addr.clone()) {
            return Err(RemoteError::Workers(format!(
                "stage {} rank {} is given twice: {other} and {}",
                w.stage, w.rank, w.addr
            )));
        }
        if let Some((s, r)) = by_addr.insert(&w.addr, (w.stage, w.rank)) {
            return Err(RemoteError::Workers(format!(
                "{} is given for stage {s} rank {r} and for stage {} rank {}; one worker serves one shard",
                w.addr, w.stage, w.rank
            )));
        }
    }
    let missing: Vec<String> = (0..pp)
        .flat_map(|s| (0..tp).map(move |r| (s, r)))
        .filter(|slot| !by_slot.contains_key(slot))
        .map(|(s, r)| format!("stage {s} rank {r}"))
        .collect();
    if !missing.is_empty() {
        return Err(RemoteError::Workers(format!(
            "no worker for {} (the shard set has tp={tp}, pp={pp}: {} workers)",
            missing.join(", "),
            tp * pp
        )));
    }
    Ok(by_slot)
}

fn parse_xxh3(hex: &str) -> Result<u64, String> {
    if hex.len() != 16 {
        return Err(format!("xxh3 {hex:?} is not 16 hexadecimal digits"));
    }
    u64::from_str_radix(hex, 16).map_err(|_| format!("xxh3 {hex:?} is not 16 hexadecimal digits"))
}

/// Whether the worker at `addr`, expected to serve (stage, rank), serves that shard of this manifest's set.
/// Whether a stage whose ranks run on `devices` (Describe's `device`, in rank order) all-reduces over NCCL:
/// more than one rank, every one on a GPU. Groups mixing GPU and CPU ranks use the peer links.
fn uses_nccl(devices: &[&str]) -> bool {
    devices.len() > 1 && devices.iter().all(|d| d.starts_with("cuda"))
}

fn check_describe(
    manifest: &Manifest,
    stage: usize,
    rank: usize,
    addr: &str,
    d: &DescribeResponse,
) -> Result<(), String> {
    let (tp, pp) = (manifest.plan.topology.tp, manifest.plan.topology.pp);
    if (d.stage as usize, d.rank as usize) != (stage, rank) {
        return Err(format!(
            "worker {addr} serves stage {} rank {} (shard {}), expected stage {stage} rank {rank}",
            d.stage, d.rank, d.shard_file
        ));
    }
    if (d.tp as usize, d.pp as usize) != (tp, pp) {
        return Err(format!(
            "worker {addr} serves a shard of a tp={} pp={} set (shard {}), expected one of the manifest's tp={tp} \
             pp={pp} set",
            d.tp, d.pp, d.shard_file
        ));
    }
    // Checked at connect.
    let Some(shard) = manifest.shard(stage, rank) else {
        return Err(format!(
            "the manifest has no shard for stage {stage} rank {rank}"
        ));
    };
    let want = parse_xxh3(&shard.entry.xxh3)?;
    if d.shard_file != shard.entry.file || d.shard_xxh3 != want {
        return Err(format!(
            "worker {addr} serves shard {} (xxh3 {:016x}) as stage {stage} rank {rank}, expected {} (xxh3 {}): \
             it runs another shard set",
            d.shard_file, d.shard_xxh3, shard.entry.file, shard.entry.xxh3
        ));
    }
    if d.n_vocab as usize != manifest.config.n_vocab || d.n_embd as usize != manifest.config.n_embd
    {
        return Err(format!(
            "worker {addr} has n_vocab {} and n_embd {}, the manifest's model {} and {}",
            d.n_vocab, d.n_embd, manifest.config.n_vocab, manifest.config.n_embd
        ));
    }
    let limits = [
        ("max_batch_tokens", d.max_batch_tokens),
        ("max_context", d.max_context),
    ];
    for (field, v) in limits {
        if v == 0 {
            return Err(format!("worker {addr} reports {field} 0"));
        }
    }
    if stage + 1 == pp && d.max_logits == 0 {
        return Err(format!(
            "worker {addr} reports max_logits 0 on the last stage"
        ));
    }
    Ok(())
}

/// The group's limits and vocabulary split from checked Describe answers, in (stage, rank) order.
fn layout_from<'a>(
    manifest: &Manifest,
    described: impl Iterator<Item = (&'a Rank, &'a DescribeResponse)>,
) -> Result<Layout, String> {
    let (tp, pp) = (manifest.plan.topology.tp, manifest.plan.topology.pp);
    let n_vocab = manifest.config.n_vocab;
    let mut info = PipelineInfo {
        max_batch_tokens: usize::MAX,
        max_logits: usize::MAX,
        max_context: usize::MAX,
        n_vocab,
        n_stages: pp,
        tp,
    };
    let mut vocab = Vec::with_capacity(tp);
    for (r, d) in described {
        info.max_batch_tokens = info.max_batch_tokens.min(d.max_batch_tokens as usize);
        info.max_context = info.max_context.min(d.max_context as usize);
        if r.stage + 1 == pp {
            info.max_logits = info.max_logits.min(d.max_logits as usize);
            vocab.push(d.vocab_start as usize..d.vocab_end as usize);
        }
    }
    let mut sorted = vocab.clone();
    sorted.sort_by_key(|v| v.start);
    let mut next = 0;
    for v in &sorted {
        if v.start != next || v.end < v.start {
            return Err(format!(
                "the last stage's vocabulary slices {vocab:?} do not tile 0..{n_vocab}"
            ));
        }
        next = v.end;
    }
    if next != n_vocab {
        return Err(format!(
            "the last stage's vocabulary slices {vocab:?} do not tile 0..{n_vocab}"
        ));
    }
    Ok(Layout { info, vocab })
}

/// One last-stage rank's logits: `rows` rows of its vocabulary slice `vocab`, f32 little-endian.
#[derive(Debug, Clone)]
struct LogitsPart<'a> {
    worker: &'a str,
    rows: usize,
    vocab: Range<usize>,
    bytes: &'a [u8],
    top: TopPart<'a>,
}

/// A last-stage rank's best logits of the rows that asked for them (`ForwardResponse.top_*`).
#[derive(Debug, Clone, Default)]
struct TopPart<'a> {
    counts: &'a [u32],
    ids: &'a [u32],
    logits: &'a [f32],
    lse: &'a [f64],
}

/// Each row's best logits over the whole vocabulary from every rank's best of its slice: the `ks[i]` best of
/// their union (so the same set and order as the best of the whole row) and the log-sum-exp of the ranks'
/// log-sum-exps.
fn merge_top(ks: &[usize], parts: &[LogitsPart<'_>]) -> Result<Vec<TopLogits>, String> {
    let mut rows: Vec<TopLogits> = ks
        .iter()
        .map(|&k| TopLogits {
            best: Vec::with_capacity(k * parts.len()),
            lse: f64::NEG_INFINITY,
        })
        .collect();
    let mut lses: Vec<Vec<f64>> = vec![Vec::with_capacity(parts.len()); ks.len()];
    for p in parts {
        let t = &p.top;
        let total: usize = t.counts.iter().map(|&c| c as usize).sum();
        if t.counts.len() != ks.len()
            || t.lse.len() != ks.len()
            || t.ids.len() != total
            || t.logits.len() != total
        {
            return Err(format!(
                "worker {}: Forward returned best logits for {} rows ({} log-sum-exps, {} ids, {} logits for {total} \
                 entries), expected {} rows",
                p.worker,
                t.counts.len(),
                t.lse.len(),
                t.ids.len(),
                t.logits.len(),
                ks.len()
            ));
        }
        let mut at = 0;
        for (i, &count) in t.counts.iter().enumerate() {
            let count = count as usize;
            if count > ks[i] {
                return Err(format!(
                    "worker {}: Forward returned {count} best logits for a row that asked for {}",
                    p.worker, ks[i]
                ));
            }
            for j in at..at + count {
                let id = t.ids[j];
                if !p.vocab.contains(&(id as usize)) {
                    return Err(format!(
                        "worker {}: Forward returned token {id} among the best logits of its vocabulary rows {:?}",
                        p.worker, p.vocab
                    ));
                }
                rows[i].best.push((t.logits[j], id));
            }
            at += count;
            lses[i].push(t.lse[i]);
        }
    }
    for ((row, &k), lse) in rows.iter_mut().zip(ks).zip(lses) {
        row.best.sort_unstable_by(softmax_reduce::by_logit_desc);
        row.best.truncate(k);
        let m = lse.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        if m.is_finite() {
            row.lse = m + lse.iter().map(|l| (l - m).exp()).sum::<f64>().ln();
        }
    }
    Ok(rows)
}

/// Places every rank's slice into full `n_rows × n_vocab` rows. The slices must tile the vocabulary.
fn assemble_logits(
    n_rows: usize,
    n_vocab: usize,
    parts: &[LogitsPart<'_>],
) -> Result<Vec<f32>, String> {
    let mut order: Vec<&LogitsPart<'_>> = parts.iter().collect();
    order.sort_by_key(|p| p.vocab.start);
    let mut next = 0;
    for p in &order {
        let width = p.vocab.end.saturating_sub(p.vocab.start);
        if p.vocab.start != next || p.vocab.end > n_vocab || p.vocab.end < p.vocab.start {
            let all: Vec<_> = parts.iter().map(|p| (p.worker, p.vocab.clone())).collect();
            return Err(format!(
                "the last stage's logits slices {all:?} do not tile the vocabulary 0..{n_vocab}"
            ));
        }
        if p.rows != n_rows {
            return Err(format!(
                "worker {}: Forward returned {} logits rows, expected {n_rows}",
                p.worker, p.rows
            ));
        }
        if p.bytes.len() != n_rows * width * 4 {
            return Err(format!(
                "worker {}: Forward returned {} bytes of logits, expected {} ({n_rows} rows × {width} vocabulary \
                 entries × 4)",
                p.worker,
                p.bytes.len(),
                n_rows * width * 4
            ));
        }
        next = p.vocab.end;
    }
    if next != n_vocab {
        let all: Vec<_> = parts.iter().map(|p| (p.worker, p.vocab.clone())).collect();
        return Err(format!(
            "the last stage's logits slices {all:?} do not tile the vocabulary 0..{n_vocab}"
        ));
    }
    let mut out = vec![0.0f32; n_rows * n_vocab];
    for p in parts {
        let width = p.vocab.len();
        if width == 0 {
            continue;
        }
        for (row, src) in p.bytes.chunks_exact(width * 4).enumerate() {
            let dst = &mut out[row * n_vocab + p.vocab.start..row * n_vocab + p.vocab.end];
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *d = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
            }
        }
    }
    Ok(out)
}

/// Forms the group whenever it is Down; probes it while Healthy. Holds the pipeline only while working, so
/// dropping the last `Arc<RemotePipeline>` stops it.
async fn supervise(me: Weak<RemotePipeline>, mut rx: watch::Receiver<GroupState>) {
    let mut last_reason = String::new();
    loop {
        let state = rx.borrow_and_update().clone();
        let Some(pipeline) = me.upgrade() else {
            return;
        };
        match state {
            GroupState::Down(_) => {
                match pipeline.form().await {
                    Ok(epoch) => {
                        info!(
                            epoch,
                            workers = pipeline.ranks().count(),
                            "worker group formed"
                        );
                        last_reason.clear();
                        pipeline.state.send_replace(GroupState::Healthy { epoch });
                    }
                    Err(reason) => {
                        // Every 500 ms while a worker is away: log changes only.
                        if reason != last_reason {
                            warn!("cannot form the worker group: {reason}");
                            last_reason.clone_from(&reason);
                        }
                        pipeline.state.send_replace(GroupState::Down(reason));
                        let pause = pipeline.opts.reform_interval;
                        drop(pipeline);
                        tokio::time::sleep(pause).await;
                    }
                }
            }
            GroupState::Healthy { epoch } => {
                let pause = pipeline.opts.probe_interval;
                drop(pipeline);
                tokio::select! {
                    changed = rx.changed() => {
                        if changed.is_err() {
                            return;
                        }
                    }
                    () = tokio::time::sleep(pause) => {
                        let Some(pipeline) = me.upgrade() else {
                            return;
                        };
                        pipeline.probe_workers(epoch).await;
                    }
                }
            }
        }
    }
}

impl Pipeline for RemotePipeline {
    fn info(&self) -> PipelineInfo {
        self.layout().info
    }

    /// The group's epoch while Healthy; while Down, one no sequence was made in.
    fn epoch(&self) -> u64 {
        match self.state() {
            GroupState::Healthy { epoch } => epoch,
            GroupState::Down(_) => u64::MAX,
        }
    }

    fn forward<'a>(
        &'a self,
        batch: &'a StepBatch,
    ) -> BoxFuture<'a, Result<BatchLogits, PipelineError>> {
        self.run(batch).boxed()
    }

    /// Sends the Release calls from a task of its own and returns at once: a worker answers only after the
    /// batch it is running, and the scheduler's lane should not wait for that.
    fn release<'a>(&'a self, seq_ids: &'a [u64]) -> BoxFuture<'a, ()> {
        // A Down group's sequences are dropped by the next JoinGroup anyway.
        if let (GroupState::Healthy { epoch }, Some(me)) = (self.state(), self.me.upgrade()) {
            let seq_ids = seq_ids.to_vec();
            tokio::spawn(async move { me.release_in(epoch, &seq_ids).await });
        }
        futures::future::ready(()).boxed()
    }

    fn health(&self) -> BoxFuture<'_, Result<(), PipelineError>> {
        async move {
            let Some(me) = self.me.upgrade() else {
                return Err(PipelineError::Unavailable(
                    "the pipeline is shutting down".into(),
                ));
            };
            // The probe runs to completion in its own task even if this caller gives up: a Forward abandoned
            // after some ranks of a stage received it would leave the others waiting in an all-reduce.
            let probe = tokio::spawn(async move { me.probe_once().await });
            match tokio::time::timeout(self.opts.health_timeout, probe).await {
                Ok(Ok(result)) => result,
                Ok(Err(e)) => Err(PipelineError::Internal(format!("health probe: {e}"))),
                Err(_) => Err(PipelineError::Unavailable(format!(
                    "a one-token forward through every stage did not finish within {:.1} s",
                    self.opts.health_timeout.as_secs_f64()
                ))),
            }
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shard_tool::checkpoint::Checkpoint;
    use shard_tool::manifest::{
        FileEntry, MANIFEST_VERSION, ShardFile, SourceInfo, shard_file_name,
    };
    use shard_tool::plan::{Topology, plan};

    /// A manifest for the tiny fixture cut into `tp × pp` shards (files are not needed here).
    fn manifest(tp: usize, pp: usize) -> Manifest {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/gguf/tiny_llama.gguf");
        let ckpt = Checkpoint::open(&[path]).unwrap();
        let plan = plan(&ckpt.config, &ckpt.tensors, &Topology::new(tp, pp)).unwrap();
        let shards = plan
            .shards
            .iter()
            .map(|s| ShardFile {
                stage: s.stage,
                rank: s.rank,
                entry: FileEntry {
                    file: shard_file_name(s.stage, s.rank),
                    bytes: 1,
                    xxh3: format!("{:016x}", 0xabc0 + s.stage * 16 + s.rank),
                },
            })
            .collect();
        Manifest {
            format_version: MANIFEST_VERSION,
            created_by: "test".into(),
            source: SourceInfo {
                format: "GGUF v3".into(),
                paths: Vec::new(),
                bytes: 0,
            },
            config: ckpt.config.clone(),
            tokenizer_files: Vec::new(),
            chat_template: None,
            plan,
            shards,
        }
    }

    fn addr(stage: usize, rank: usize) -> WorkerAddr {
        WorkerAddr {
            stage,
            rank,
            addr: format!("127.0.0.{}:7001", 1 + stage * 2 + rank),
        }
    }

    #[test]
    fn nccl_only_for_all_gpu_groups_of_two_or_more() {
        assert!(uses_nccl(&["cuda:0", "cuda:1"]));
        assert!(uses_nccl(&["cuda:0", "cuda:1", "cuda:2", "cuda:3"]));
        assert!(!uses_nccl(&["cuda:0"]), "one rank has nothing to sum");
        assert!(
            !uses_nccl(&["cuda:0", "cpu"]),
            "mixed groups use the peer links"
        );
        assert!(!uses_nccl(&["cpu", "cpu"]));
        assert!(
            !uses_nccl(&["", ""]),
            "workers from before the device field"
        );
    }

    #[test]
    fn worker_lists_must_cover_the_plan_exactly_once() {
        let m = manifest(2, 2);
        let all = vec![addr(0, 0), addr(0, 1), addr(1, 0), addr(1, 1)];
        assert_eq!(check_workers(&m, &all).unwrap().len(), 4);
        let err = |workers: Vec<WorkerAddr>| check_workers(&m, &workers).unwrap_err().to_string();
        assert_eq!(
            err(vec![addr(0, 0), addr(1, 1)]),
            "workers: no worker for stage 0 rank 1, stage 1 rank 0 (the shard set has tp=2, pp=2: 4 workers)"
        );
        assert_eq!(
            err(vec![
                addr(0, 0),
                addr(0, 1),
                addr(1, 0),
                addr(1, 1),
                addr(2, 0)
            ]),
            "workers: 127.0.0.5:7001 is given as stage 2 rank 0, but the shard set has stages 0..2 and ranks \
             0..2 (tp=2, pp=2)"
        );
        let mut twice = all.clone();
        twice[1] = WorkerAddr {
            addr: "10.0.0.9:1".into(),
            ..addr(0, 0)
        };
        assert_eq!(
            err(twice),
            "workers: stage 0 rank 0 is given twice: 127.0.0.1:7001 and 10.0.0.9:1"
        );
        let mut same = all.clone();
        same[3].addr = same[0].addr.clone();
        assert_eq!(
            err(same),
            "workers: 127.0.0.1:7001 is given for stage 0 rank 0 and for stage 1 rank 1; one worker serves one \
             shard"
        );
        let mut bad = manifest(2, 2);
        bad.shards[1].entry.xxh3 = "xyz".into();
        assert_eq!(
            check_workers(&bad, &all).unwrap_err().to_string(),
            "manifest: shard stage00-rank01.gguf (stage 0 rank 1): xxh3 \"xyz\" is not 16 hexadecimal digits"
        );
    }

    /// What a correct worker for (stage, rank) of `m` answers.
    fn describe(m: &Manifest, stage: usize, rank: usize) -> DescribeResponse {
        let spec = m.plan.shard(stage, rank).unwrap();
        let shard = m.shard(stage, rank).unwrap();
        DescribeResponse {
            stage: stage as u32,
            rank: rank as u32,
            tp: m.plan.topology.tp as u32,
            pp: m.plan.topology.pp as u32,
            shard_file: shard.entry.file.clone(),
            shard_xxh3: u64::from_str_radix(&shard.entry.xxh3, 16).unwrap(),
            is_last: stage + 1 == m.plan.topology.pp,
            vocab_start: spec.vocab_rows.start as u32,
            vocab_end: spec.vocab_rows.end as u32,
            n_embd: m.config.n_embd as u32,
            n_vocab: m.config.n_vocab as u32,
            max_batch_tokens: 512,
            max_logits: 64,
            max_context: 4096,
            ..Default::default()
        }
    }

    #[test]
    fn describe_answers_are_checked_against_the_manifest() {
        let m = manifest(2, 2);
        let a = "127.0.0.3:7001";
        assert_eq!(check_describe(&m, 1, 1, a, &describe(&m, 1, 1)), Ok(()));
        assert_eq!(
            check_describe(&m, 0, 1, a, &describe(&m, 1, 0)).unwrap_err(),
            "worker 127.0.0.3:7001 serves stage 1 rank 0 (shard stage01-rank00.gguf), expected stage 0 rank 1"
        );
        let mut d = describe(&m, 0, 1);
        d.shard_xxh3 = 0x1234;
        assert_eq!(
            check_describe(&m, 0, 1, a, &d).unwrap_err(),
            "worker 127.0.0.3:7001 serves shard stage00-rank01.gguf (xxh3 0000000000001234) as stage 0 rank 1, \
             expected stage00-rank01.gguf (xxh3 000000000000abc1): it runs another shard set"
        );
        let mut d = describe(&m, 0, 1);
        d.tp = 1;
        d.pp = 4;
        assert_eq!(
            check_describe(&m, 0, 1, a, &d).unwrap_err(),
            "worker 127.0.0.3:7001 serves a shard of a tp=1 pp=4 set (shard stage00-rank01.gguf), expected one \
             of the manifest's tp=2 pp=2 set"
        );
        let mut d = describe(&m, 1, 0);
        d.max_logits = 0;
        assert_eq!(
            check_describe(&m, 1, 0, a, &d).unwrap_err(),
            "worker 127.0.0.3:7001 reports max_logits 0 on the last stage"
        );
    }

    #[test]
    fn limits_come_from_the_smallest_worker() {
        let m = manifest(2, 2);
        let opts = RemoteOptions::default();
        let ranks: Vec<Rank> = [(0, 0), (0, 1), (1, 0), (1, 1)]
            .into_iter()
            .map(|(stage, rank)| Rank {
                stage,
                rank,
                addr: addr(stage, rank).addr,
                client: {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap();
                    let _g = rt.enter();
                    client(&addr(stage, rank).addr, &opts).unwrap()
                },
            })
            .collect();
        let mut ds: Vec<DescribeResponse> = ranks
            .iter()
            .map(|r| describe(&m, r.stage, r.rank))
            .collect();
        ds[0].max_batch_tokens = 100;
        ds[1].max_logits = 1; // not the last stage: does not limit logits
        ds[2].max_logits = 16;
        ds[3].max_context = 300;
        let layout = layout_from(&m, ranks.iter().zip(&ds)).unwrap();
        assert_eq!(
            layout.info,
            PipelineInfo {
                max_batch_tokens: 100,
                max_logits: 16,
                max_context: 300,
                n_vocab: 288,
                n_stages: 2,
                tp: 2
            }
        );
        assert_eq!(layout.vocab, vec![0..144, 144..288]);
        ds[3].vocab_start = 150;
        let err = layout_from(&m, ranks.iter().zip(&ds)).unwrap_err();
        assert_eq!(
            err,
            "the last stage's vocabulary slices [0..144, 150..288] do not tile 0..288"
        );
    }

    fn le(values: &[f32]) -> Vec<u8> {
        tessera_proto::f32s_to_bytes(values)
    }

    /// Each rank's best of its slice, merged: the best of the whole row, and its log-sum-exp.
    #[test]
    fn best_logits_of_slices_merge_into_the_best_of_the_row() {
        let rows: Vec<Vec<f32>> = (0..3)
            .map(|r| {
                (0..1000)
                    .map(|i| (((i * 7919 + r * 104_729) % 997) / 10) as f32 * 0.25)
                    .collect()
            })
            .collect();
        let ks = [1usize, 5, 64];
        let slices = [0..300, 300..650, 650..1000];
        struct Owned {
            counts: Vec<u32>,
            ids: Vec<u32>,
            logits: Vec<f32>,
            lse: Vec<f64>,
        }
        let owned: Vec<Owned> = slices
            .iter()
            .map(|v| {
                let mut o = Owned {
                    counts: vec![],
                    ids: vec![],
                    logits: vec![],
                    lse: vec![],
                };
                for (row, &k) in rows.iter().zip(&ks) {
                    let best = softmax_reduce::top_m(&row[v.clone()], k, v.start as u32);
                    o.counts.push(best.len() as u32);
                    o.ids.extend(best.iter().map(|b| b.1));
                    o.logits.extend(best.iter().map(|b| b.0));
                    o.lse
                        .push(softmax_reduce::log_sum_exp(&row[v.clone()]).unwrap());
                }
                o
            })
            .collect();
        let parts: Vec<LogitsPart<'_>> = owned
            .iter()
            .zip(&slices)
            .map(|(o, v)| LogitsPart {
                worker: "w:1",
                rows: 0,
                vocab: v.clone(),
                bytes: &[],
                top: TopPart {
                    counts: &o.counts,
                    ids: &o.ids,
                    logits: &o.logits,
                    lse: &o.lse,
                },
            })
            .collect();
        let merged = merge_top(&ks, &parts).unwrap();
        for ((row, &k), got) in rows.iter().zip(&ks).zip(&merged) {
            assert_eq!(got.best, softmax_reduce::top_m(row, k, 0));
            // Both sums add e^x in f32 lanes (relative rounding ~1e-7), split at different places.
            let want = softmax_reduce::log_sum_exp(row).unwrap();
            assert!((got.lse - want).abs() < 1e-6, "{} vs {want}", got.lse);
        }

        // A token outside the rank's slice, or more entries than asked for, is an error naming the worker.
        let mut bad = parts.clone();
        bad[0].vocab = 0..10;
        let err = merge_top(&ks, &bad).unwrap_err();
        assert!(
            err.contains("w:1") && err.contains("among the best"),
            "{err}"
        );
        let err = merge_top(&[1, 1, 1], &parts).unwrap_err();
        assert!(err.contains("asked for 1"), "{err}");
    }

    #[test]
    fn logits_slices_are_placed_into_full_rows() {
        // Two rows of a 5-token vocabulary, split 0..2 and 2..5, answered out of order.
        let hi = le(&[12.0, 13.0, 14.0, 22.0, 23.0, 24.0]);
        let lo = le(&[10.0, 11.0, 20.0, 21.0]);
        let part = |worker, vocab: Range<usize>, bytes| LogitsPart {
            worker,
            rows: 2,
            vocab,
            bytes,
            top: TopPart::default(),
        };
        let parts = [part("b:1", 2..5, &hi[..]), part("a:1", 0..2, &lo[..])];
        assert_eq!(
            assemble_logits(2, 5, &parts).unwrap(),
            [10.0, 11.0, 12.0, 13.0, 14.0, 20.0, 21.0, 22.0, 23.0, 24.0]
        );
        // No rows at all (a batch without logits) is fine.
        let empty = [part("a:1", 0..5, &[][..])];
        assert_eq!(
            assemble_logits(
                0,
                5,
                &[LogitsPart {
                    rows: 0,
                    ..empty[0].clone()
                }]
            )
            .unwrap(),
            Vec::<f32>::new()
        );

        let gap = [part("a:1", 0..2, &lo[..]), part("b:1", 3..5, &hi[..])];
        assert_eq!(
            assemble_logits(2, 5, &gap).unwrap_err(),
            "the last stage's logits slices [(\"a:1\", 0..2), (\"b:1\", 3..5)] do not tile the vocabulary 0..5"
        );
        let short = [part("a:1", 0..2, &lo[..]), part("b:1", 2..4, &hi[..16])];
        assert!(
            assemble_logits(2, 5, &short)
                .unwrap_err()
                .contains("do not tile")
        );
        let rows = [
            part("a:1", 0..2, &lo[..]),
            LogitsPart {
                rows: 1,
                ..part("b:1", 2..5, &hi[..])
            },
        ];
        assert_eq!(
            assemble_logits(2, 5, &rows).unwrap_err(),
            "worker b:1: Forward returned 1 logits rows, expected 2"
        );
        let bytes = [part("a:1", 0..2, &lo[..6]), part("b:1", 2..5, &hi[..])];
        assert_eq!(
            assemble_logits(2, 5, &bytes).unwrap_err(),
            "worker a:1: Forward returned 6 bytes of logits, expected 16 (2 rows × 2 vocabulary entries × 4)"
        );
    }
}
