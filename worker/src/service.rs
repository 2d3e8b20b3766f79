//! The worker's gRPC service (`tessera.worker.v1.Worker`, see `proto/tessera/worker/v1/worker.proto`): one
//! shard's [`Sequences`] behind Describe / JoinGroup / Forward / Release / Stats.
//!
//! The engine is synchronous and CPU-bound, so it runs on one dedicated OS thread that owns the
//! `Sequences<'static>` (the [`ShardDir`] is leaked: a worker holds one shard for its life, and the weights
//! borrow its memory map). Handlers validate and convert a request on the async threads, send it to the engine
//! thread over a channel and await the answer on a oneshot; Describe and Stats are answered from shared state
//! without waiting for a running batch.
//!
//! Order: a Forward numbered `order = n` waits (on the async side) until batch n - 1 of its epoch is on the
//! engine thread's queue, so a coordinator can send a stage's next batch while the current one runs and the
//! engine thread goes straight from one to the next.
//!
//! Epochs: JoinGroup starts one; Forward and Release of another epoch get FAILED_PRECONDITION. An all-reduce
//! failure or an engine failure in the middle of a batch poisons the epoch (the ranks of the stage may no
//! longer be in lockstep): UNAVAILABLE until the next JoinGroup. A malformed batch is INVALID_ARGUMENT, naming
//! the field; running out of KV cache memory is RESOURCE_EXHAUSTED. Neither poisons: the engine checks a
//! batch before it computes anything, so every rank of a stage refuses the same batch the same way.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tessera_kernels::cpu::Pool;
use tessera_kernels::softmax_reduce;
use tessera_proto::worker::v1::worker_client::WorkerClient;
use tessera_proto::worker::v1::worker_server::{Worker, WorkerServer};
use tessera_proto::worker::v1::{
    DescribeRequest, DescribeResponse, ForwardRequest, ForwardResponse, HandOffRequest,
    HandOffResponse, JoinGroupRequest, JoinGroupResponse, LogitsMode, NcclIdRequest,
    NcclIdResponse, ReleaseRequest, ReleaseResponse, StatsRequest, StatsResponse,
};
use tessera_proto::{bytes_to_f32s, f32s_to_bytes};
use tokio::sync::oneshot;
use tonic::{Request, Response, Status};
use tracing::{error, info, warn};

use crate::batch::{Logits, Output};
use crate::collective::{Collective, CollectiveError, SingleRank};
use crate::engine::{Engine, EngineOptions};
use crate::error::{Error, Result};
use crate::peer::{AllReduceStats, DEFAULT_LINK_TIMEOUT, DEFAULT_SPIN, PeerGroup, PeerListener};
use crate::sequences::{SeqInput, Sequences};
use crate::weights::{ShardDir, Weights};

/// Largest gRPC message the service sends or accepts: hidden states of a full batch and logits rows exceed
/// tonic's 4 MiB default by far (512 tokens × 8192 floats is 16 MiB; 64 rows of a 128k vocabulary 32 MiB).
pub const MAX_MESSAGE_BYTES: usize = 1 << 30;

/// How the service runs its shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceOptions {
    /// Kernel threads (the engine thread included).
    pub threads: usize,
    pub engine: EngineOptions,
    /// Longest context of a sequence (its KV cache size); at most the model's training context.
    pub max_context: usize,
    /// All sequences' KV caches together; `None`: no limit.
    pub kv_budget_bytes: Option<u64>,
    /// How long an all-reduce waits for the other ranks before it fails and poisons the epoch.
    pub link_timeout: Duration,
    /// How long JoinGroup waits for every peer link.
    pub join_timeout: Duration,
    /// Busy-poll before blocking in an all-reduce (see [`PeerGroup::set_spin`]).
    pub spin: Duration,
}

impl Default for ServiceOptions {
    fn default() -> Self {
        ServiceOptions {
            threads: 1,
            engine: EngineOptions::default(),
            max_context: 4096,
            kv_budget_bytes: None,
            link_timeout: DEFAULT_LINK_TIMEOUT,
            join_timeout: Duration::from_secs(60),
            spin: DEFAULT_SPIN,
        }
    }
}

/// The `Worker` gRPC service of one shard. Cheap to clone (shared state).
#[derive(Clone)]
pub struct WorkerService {
    shared: Arc<Shared>,
}

struct Shared {
    /// Everything Describe reports except the epoch.
    info: DescribeResponse,
    tp: usize,
    listener: Arc<PeerListener>,
    options: ServiceOptions,
    /// To the engine thread; when the last service clone is dropped, the thread ends.
    commands: mpsc::Sender<Command>,
    /// Serializes JoinGroups (each replaces the group).
    join: tokio::sync::Mutex<()>,
    /// `(epoch, order of the last batch taken)`: numbered Forwards wait here for their predecessor.
    order: tokio::sync::watch::Sender<(u64, u64)>,
    /// Where this rank sends the hidden states of `hand_off` batches (JoinGroup's `hand_to`).
    hand_to: Mutex<Vec<(String, WorkerClient<tonic::transport::Channel>)>>,
    /// Hidden states handed to this rank by the previous stage, by batch order.
    mailbox: Mutex<Mailbox>,
    core: Arc<Core>,
}

/// State the handlers and the engine thread share.
struct Core {
    stage: usize,
    rank: usize,
    is_last: bool,
    state: Mutex<EpochState>,
    counters: Counters,
    all_reduce: Arc<AllReduceStats>,
}

#[derive(Debug)]
struct EpochState {
    /// 0 before the first JoinGroup.
    epoch: u64,
    /// Why the current epoch serves no requests (group not formed yet, or failed).
    poisoned: Option<String>,
}

#[derive(Debug, Default)]
struct Counters {
    forward_calls: AtomicU64,
    tokens: AtomicU64,
    compute_us: AtomicU64,
    /// Mirrors of the engine thread's `Sequences`, updated after every command.
    sequences: AtomicU64,
    kv_bytes: AtomicU64,
}

enum Command {
    Join {
        epoch: u64,
        collective: Box<dyn Collective>,
        /// NCCL unique id of the stage's GPU group; empty: all-reduce over `collective`.
        nccl_id: Vec<u8>,
        reply: oneshot::Sender<Result<(), Status>>,
    },
    Forward {
        epoch: u64,
        seqs: Vec<SeqInput>,
        tokens: Vec<u32>,
        hidden: Vec<f32>,
        /// Return the hidden states on every rank (each hands its copy on), not only rank 0.
        hand_off: bool,
        /// Per sequence: 0 for whole logits rows, k for each row's k best logits (`SeqInput.top_k`).
        top_k: Vec<u32>,
        reply: oneshot::Sender<Result<ForwardResponse, Status>>,
    },
    Release {
        epoch: u64,
        seq_ids: Vec<u64>,
        reply: oneshot::Sender<Result<(), Status>>,
    },
}

/// The previous stage's hidden states (or why it did not run the batch), by batch order, for one epoch.
#[derive(Default)]
struct Mailbox {
    epoch: u64,
    slots: HashMap<u64, Slot>,
}

enum Slot {
    Arrived(std::result::Result<Bytes, String>),
    Awaited(oneshot::Sender<std::result::Result<Bytes, String>>),
}

/// A lazily connecting client of a next-stage worker.
fn hand_off_client(addr: &str) -> Result<WorkerClient<tonic::transport::Channel>, Status> {
    let url = if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    };
    let endpoint = tonic::transport::Endpoint::from_shared(url)
        .map_err(|e| Status::invalid_argument(format!("hand_to: {addr:?}: {e}")))?
        .tcp_nodelay(true);
    Ok(WorkerClient::new(endpoint.connect_lazy())
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

/// The hidden states a HandOff brought (checked with the Forward's own `hidden`), or ABORTED with why the
/// previous stage did not run the batch.
fn hand_off_result(order: u64, got: std::result::Result<Bytes, String>) -> Result<Bytes, Status> {
    got.map_err(|why| {
        Status::aborted(format!(
            "the previous stage did not run batch {order}: {why}"
        ))
    })
}

/// A numbered batch's turn (see `ForwardRequest.order`): the next number may go once this is dropped, on
/// every path — queued, refused, or the handler cancelled.
struct Turn<'a> {
    order: &'a tokio::sync::watch::Sender<(u64, u64)>,
    epoch: u64,
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        let epoch = self.epoch;
        self.order.send_modify(|o| {
            if o.0 == epoch {
                o.1 += 1;
            }
        });
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Plain maps and lists, consistent after every statement; a panic elsewhere cannot break them.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl WorkerService {
    /// Loads the shard of `shard` (leaked: it lives as long as the process) and starts the engine thread.
    /// `peers` is where the lower ranks of the stage connect at JoinGroup.
    pub fn start(
        shard: ShardDir,
        peers: PeerListener,
        options: ServiceOptions,
    ) -> Result<WorkerService> {
        Self::start_advertised(shard, peers, options, None)
    }

    /// As [`WorkerService::start`], reporting `advertise` (HOST:PORT) as the peer-link address in Describe
    /// instead of the listener's own address: for a listener bound to 0.0.0.0, or behind NAT / a Kubernetes
    /// Service, the address the other ranks must dial.
    pub fn start_advertised(
        shard: ShardDir,
        peers: PeerListener,
        options: ServiceOptions,
        advertise: Option<String>,
    ) -> Result<WorkerService> {
        let shard: &'static ShardDir = Box::leak(Box::new(shard));
        let config = shard.config();
        let spec = &shard.spec;
        let (stage, rank) = (spec.stage, spec.rank);
        let spec_err = |msg: String| Error::Spec { stage, rank, msg };
        if options.max_context == 0 || options.max_context > config.n_ctx_train {
            return Err(spec_err(format!(
                "max_context {} must be between 1 and the model's training context of {} tokens",
                options.max_context, config.n_ctx_train
            )));
        }
        let topology = &shard.manifest.plan.topology;
        let entry = shard
            .manifest
            .shard(stage, rank)
            .ok_or_else(|| spec_err("the manifest lists no file for this shard".into()))?;
        let shard_xxh3 = u64::from_str_radix(&entry.entry.xxh3, 16).map_err(|e| {
            spec_err(format!(
                "the manifest's xxh3 `{}` of {} is not a hex number: {e}",
                entry.entry.xxh3, entry.entry.file
            ))
        })?;

        let started = Instant::now();
        let weights = Weights::from_shard_dir_with(shard, &options.engine)?;
        let (is_first, is_last) = (weights.is_first, weights.is_last);
        let layers = weights.layers.clone();
        let pool = Arc::new(Pool::new(options.threads));
        let placeholder = Box::new(NoGroup {
            rank,
            world_size: topology.tp.max(rank + 1),
        });
        let engine = Engine::new(
            weights,
            config.clone(),
            spec.clone(),
            placeholder,
            pool,
            options.engine,
        )?;
        let vocab = if is_last { engine.vocab_rows() } else { 0..0 };
        let sequences = Sequences::new(engine, options.max_context, options.kv_budget_bytes);
        info!(
            stage,
            rank,
            layers = ?layers,
            file = %entry.entry.file,
            seconds = started.elapsed().as_secs_f64(),
            "shard loaded"
        );

        let model = shard
            .manifest
            .source
            .paths
            .first()
            .and_then(|p| p.file_stem())
            .map(|s| s.to_string_lossy().into_owned())
            .or_else(|| config.name.clone())
            .unwrap_or_default();
        let info = DescribeResponse {
            stage: stage as u32,
            rank: rank as u32,
            tp: topology.tp as u32,
            pp: topology.pp as u32,
            shard_file: entry.entry.file.clone(),
            shard_xxh3,
            first_layer: layers.start as u32,
            end_layer: layers.end as u32,
            is_first,
            is_last,
            vocab_start: vocab.start as u32,
            vocab_end: vocab.end as u32,
            n_embd: config.n_embd as u32,
            n_vocab: config.n_vocab as u32,
            max_batch_tokens: options.engine.max_batch_tokens as u32,
            max_logits: options.engine.max_logits as u32,
            max_context: options.max_context as u32,
            peer_addr: advertise.unwrap_or_else(|| peers.local_addr().to_string()),
            epoch: 0,
            model,
            device: options.engine.device.to_string(),
        };

        let core = Arc::new(Core {
            stage,
            rank,
            is_last,
            state: Mutex::new(EpochState {
                epoch: 0,
                poisoned: None,
            }),
            counters: Counters::default(),
            all_reduce: Arc::default(),
        });
        let (commands, rx) = mpsc::channel();
        let thread_core = Arc::clone(&core);
        std::thread::Builder::new()
            .name(format!("tessera-engine-{stage}-{rank}"))
            .spawn(move || EngineThread::new(sequences, thread_core).run(rx))
            .map_err(|e| spec_err(format!("cannot start the engine thread: {e}")))?;
        Ok(WorkerService {
            shared: Arc::new(Shared {
                info,
                tp: topology.tp,
                listener: Arc::new(peers),
                options,
                commands,
                join: tokio::sync::Mutex::new(()),
                order: tokio::sync::watch::Sender::new((0, 0)),
                hand_to: Mutex::new(Vec::new()),
                mailbox: Mutex::new(Mailbox::default()),
                core,
            }),
        })
    }

    /// What Describe answers now.
    pub fn describe_now(&self) -> DescribeResponse {
        let mut info = self.shared.info.clone();
        info.epoch = self.shared.core.state().epoch;
        info
    }

    /// The address peers connect to at JoinGroup.
    pub fn peer_addr(&self) -> SocketAddr {
        self.shared.listener.local_addr()
    }

    /// Checks a Forward and puts it on the engine thread's queue; the receiver gets the answer.
    fn queue_forward(
        &self,
        req: ForwardRequest,
    ) -> Result<oneshot::Receiver<Result<ForwardResponse, Status>>, Status> {
        let seqs = req
            .seqs
            .iter()
            .enumerate()
            .map(|(i, q)| {
                let logits = match LogitsMode::try_from(q.logits) {
                    Ok(LogitsMode::None) => Logits::None,
                    Ok(LogitsMode::Last) => Logits::Last,
                    Ok(LogitsMode::All) => Logits::All,
                    Err(_) => {
                        return Err(Status::invalid_argument(format!(
                            "seqs[{i}].logits: unknown LogitsMode {} (seq_id {})",
                            q.logits, q.seq_id
                        )));
                    }
                };
                Ok(SeqInput {
                    seq_id: q.seq_id,
                    start_pos: q.start_pos as usize,
                    n_tokens: q.n_tokens as usize,
                    logits,
                    context: q.context as usize,
                    prefix_from: q.prefix_from,
                })
            })
            .collect::<Result<Vec<_>, Status>>()?;
        let hidden = bytes_to_f32s(&req.hidden).ok_or_else(|| {
            Status::invalid_argument(format!(
                "hidden: {} bytes is not a whole number of f32 values (4 bytes each)",
                req.hidden.len()
            ))
        })?;
        let (reply, rx) = oneshot::channel();
        let top_k = req.seqs.iter().map(|q| q.top_k).collect();
        self.shared.send(Command::Forward {
            epoch: req.epoch,
            seqs,
            tokens: req.tokens,
            hidden,
            hand_off: req.hand_off,
            top_k,
            reply,
        })?;
        Ok(rx)
    }

    /// Waits until batch `order` of `epoch` is the next to go (see `ForwardRequest.order`). No time limit of
    /// its own: the predecessor may legitimately wait long for its hidden states; a predecessor that never
    /// comes means the coordinator failed the epoch, and it cancels this call or re-joins (which wakes it).
    async fn take_turn(&self, epoch: u64, order: u64) -> Result<Turn<'_>, Status> {
        let s = &self.shared;
        let mut turn = s.order.subscribe();
        let (now_epoch, taken) = match turn
            .wait_for(|&(e, taken)| e != epoch || taken + 1 >= order)
            .await
        {
            Ok(state) => *state,
            Err(_) => return Err(Status::internal("the batch order was dropped")),
        };
        if now_epoch != epoch {
            return Err(Status::failed_precondition(format!(
                "epoch: the request is for epoch {epoch}, this worker re-joined in epoch {now_epoch} while \
                 the batch waited for its turn"
            )));
        }
        if taken + 1 > order {
            return Err(Status::invalid_argument(format!(
                "order: batch {order} of epoch {epoch} was already taken (the next is {})",
                taken + 1
            )));
        }
        Ok(Turn {
            order: &s.order,
            epoch,
        })
    }

    /// The hidden states of batch `order` from the previous stage, once its HandOff arrives.
    async fn receive_hand_off(&self, epoch: u64, order: u64) -> Result<Bytes, Status> {
        let rx = {
            let mut mb = lock(&self.shared.mailbox);
            if mb.epoch != epoch {
                return Err(Status::failed_precondition(format!(
                    "epoch: the request is for epoch {epoch}, this worker is in epoch {}",
                    mb.epoch
                )));
            }
            match mb.slots.remove(&order) {
                Some(Slot::Arrived(got)) => return hand_off_result(order, got),
                _ => {
                    let (tx, rx) = oneshot::channel();
                    mb.slots.insert(order, Slot::Awaited(tx));
                    rx
                }
            }
        };
        match rx.await {
            Ok(got) => hand_off_result(order, got),
            Err(_) => Err(Status::failed_precondition(format!(
                "epoch: this worker re-joined a new group while batch {order} of epoch {epoch} waited for the \
                 previous stage's hidden states"
            ))),
        }
    }

    /// Sends batch `order`'s hidden states (or why there are none) to the next stage's `hand_to` workers.
    async fn send_hand_off(
        &self,
        epoch: u64,
        order: u64,
        got: std::result::Result<Bytes, String>,
    ) -> Result<(), Status> {
        let targets = lock(&self.shared.hand_to).clone();
        if targets.is_empty() {
            return Err(Status::failed_precondition(
                "hand_off: this rank of a non-last stage got no hand_to workers in JoinGroup",
            ));
        }
        let (hidden, failed) = match got {
            Ok(h) => (h, String::new()),
            Err(why) => (Bytes::new(), why),
        };
        let limit = self.shared.options.link_timeout;
        // One target with the planner's equal tensor-parallel degree on every stage.
        for (addr, mut client) in targets {
            let request = HandOffRequest {
                epoch,
                order,
                hidden: hidden.clone(),
                failed: failed.clone(),
            };
            match tokio::time::timeout(limit, client.hand_off(request)).await {
                Ok(Ok(_)) => {}
                Ok(Err(status)) => {
                    return Err(Status::unavailable(format!(
                        "HandOff of batch {order} to {addr} failed: {:?}: {}",
                        status.code(),
                        status.message()
                    )));
                }
                Err(_) => {
                    return Err(Status::unavailable(format!(
                        "HandOff of batch {order} to {addr}: no answer within {:.1} s",
                        limit.as_secs_f64()
                    )));
                }
            }
        }
        Ok(())
    }

    /// The tonic server for this service, with message limits of [`MAX_MESSAGE_BYTES`].
    pub fn into_server(self) -> WorkerServer<WorkerService> {
        WorkerServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }
}

/// Serves `service` and `grpc.health.v1` (SERVING for the worker service) on `listener` until `shutdown`
/// completes.
pub async fn serve(
    service: WorkerService,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> std::result::Result<(), tonic::transport::Error> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<WorkerServer<WorkerService>>().await;
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(service.into_server())
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}

impl Core {
    fn state(&self) -> MutexGuard<'_, EpochState> {
        // The state is two plain fields, consistent after every assignment; a panic elsewhere cannot break it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a request of `epoch` may run now.
    fn admit(&self, epoch: u64) -> Result<(), Status> {
        let st = self.state();
        if st.epoch == 0 {
            return Err(Status::failed_precondition(
                "this worker has not joined a group yet (epoch 0): call JoinGroup first",
            ));
        }
        if epoch != st.epoch {
            return Err(Status::failed_precondition(format!(
                "epoch: the request is for epoch {epoch}, this worker is in epoch {} (it restarted or its group \
                 was re-formed)",
                st.epoch
            )));
        }
        if let Some(why) = &st.poisoned {
            return Err(Status::unavailable(format!(
                "epoch {} is unusable: {why}; JoinGroup a new epoch",
                st.epoch
            )));
        }
        Ok(())
    }

    /// Replaces the "not finished" reason of a JoinGroup with why it failed (if `epoch` is still current).
    fn join_failed(&self, epoch: u64, why: String) {
        let mut st = self.state();
        if st.epoch == epoch {
            warn!(stage = self.stage, rank = self.rank, epoch, reason = %why, "JoinGroup failed");
            st.poisoned = Some(why);
        }
    }

    /// Marks `epoch` unusable (if it is still the current one).
    fn poison(&self, epoch: u64, why: String) {
        let mut st = self.state();
        if st.epoch == epoch && st.poisoned.is_none() {
            error!(
                stage = self.stage,
                rank = self.rank,
                epoch,
                reason = %why,
                "epoch poisoned"
            );
            st.poisoned = Some(why);
        }
    }
}

impl Shared {
    fn send(&self, cmd: Command) -> Result<(), Status> {
        self.commands
            .send(cmd)
            .map_err(|_| Status::internal("the engine thread has stopped"))
    }
}

async fn answer<T>(rx: oneshot::Receiver<Result<T, Status>>) -> Result<T, Status> {
    rx.await
        .unwrap_or_else(|_| Err(Status::internal("the engine thread dropped the request")))
}

#[tonic::async_trait]
impl Worker for WorkerService {
    async fn describe(
        &self,
        _request: Request<DescribeRequest>,
    ) -> Result<Response<DescribeResponse>, Status> {
        Ok(Response::new(self.describe_now()))
    }

    async fn join_group(
        &self,
        request: Request<JoinGroupRequest>,
    ) -> Result<Response<JoinGroupResponse>, Status> {
        let req = request.into_inner();
        let s = &self.shared;
        let _one_at_a_time = s.join.lock().await;
        let core = &s.core;
        let mut hand_to = Vec::with_capacity(req.hand_to.len());
        for addr in &req.hand_to {
            hand_to.push((addr.clone(), hand_off_client(addr)?));
        }
        {
            let mut st = core.state();
            if req.epoch <= st.epoch {
                return Err(Status::failed_precondition(format!(
                    "epoch: {} is not above this worker's epoch {}",
                    req.epoch, st.epoch
                )));
            }
            if req.peers.len() != s.tp {
                return Err(Status::invalid_argument(format!(
                    "peers: {} addresses, but the stage has tp = {} ranks",
                    req.peers.len(),
                    s.tp
                )));
            }
            st.epoch = req.epoch;
            st.poisoned = Some("JoinGroup has not finished".into());
        }
        // Wakes numbered Forwards of the old epoch still waiting for a predecessor or their hidden states
        // (they fail).
        s.order.send_replace((req.epoch, 0));
        *lock(&s.mailbox) = Mailbox {
            epoch: req.epoch,
            slots: HashMap::new(),
        };
        *lock(&s.hand_to) = hand_to;
        let epoch = req.epoch;
        let own = s.info.peer_addr.clone();
        if req.peers[core.rank] != own {
            warn!(
                epoch,
                rank = core.rank,
                given = %req.peers[core.rank],
                own = %own,
                "peers[rank] is not this worker's peer address"
            );
        }
        let collective: Box<dyn Collective> = if s.tp == 1 {
            Box::new(SingleRank)
        } else {
            let (listener, rank, opts) = (Arc::clone(&s.listener), core.rank, s.options);
            let peers = req.peers;
            let joined = tokio::task::spawn_blocking(move || {
                PeerGroup::connect(&listener, epoch, rank, &peers, opts.join_timeout)
            })
            .await
            .unwrap_or_else(|e| {
                Err(CollectiveError::Transport(format!(
                    "the connecting task failed: {e}"
                )))
            });
            match joined {
                Ok(mut group) => {
                    group.set_link_timeout(opts.link_timeout);
                    group.set_spin(opts.spin);
                    group.share_stats(Arc::clone(&core.all_reduce));
                    Box::new(group)
                }
                Err(e) => {
                    let msg = format!("JoinGroup failed: {e}");
                    core.join_failed(epoch, msg.clone());
                    return Err(Status::unavailable(msg));
                }
            }
        };
        let (reply, rx) = oneshot::channel();
        s.send(Command::Join {
            epoch,
            collective,
            nccl_id: req.nccl_id.to_vec(),
            reply,
        })?;
        if let Err(e) = answer(rx).await {
            core.join_failed(epoch, format!("JoinGroup failed: {}", e.message()));
            return Err(e);
        }
        let mut st = core.state();
        if st.epoch == epoch {
            st.poisoned = None;
        }
        drop(st);
        info!(
            epoch,
            stage = core.stage,
            rank = core.rank,
            tp = s.tp,
            "joined group"
        );
        Ok(Response::new(JoinGroupResponse {}))
    }

    async fn forward(
        &self,
        request: Request<ForwardRequest>,
    ) -> Result<Response<ForwardResponse>, Status> {
        let mut req = request.into_inner();
        let s = &self.shared;
        s.core.admit(req.epoch)?;
        if req.order == 0 {
            if req.hand_off {
                return Err(Status::invalid_argument(
                    "hand_off: a batch whose stages hand hidden states on needs an order number",
                ));
            }
            return answer(self.queue_forward(req)?).await.map(Response::new);
        }
        let (epoch, order, hand_off) = (req.epoch, req.order, req.hand_off);
        let (is_first, is_last) = (s.info.is_first, s.info.is_last);
        let turn = self.take_turn(epoch, order).await?;
        let mut result = Ok(());
        if hand_off && !is_first {
            match self.receive_hand_off(epoch, order).await {
                Ok(hidden) => req.hidden = hidden,
                Err(status) => result = Err(status),
            }
        }
        // The turn is held until this batch is on the engine thread's queue (or refused): the next number
        // may go as soon as its place behind this one is fixed, not when this one has run.
        let queued = result.and_then(|()| self.queue_forward(req));
        drop(turn);
        let result = match queued {
            Ok(rx) => answer(rx).await,
            Err(status) => Err(status),
        };
        if !hand_off || is_last {
            return result.map(Response::new);
        }
        match result {
            Ok(mut resp) => {
                let hidden = std::mem::take(&mut resp.hidden);
                self.send_hand_off(epoch, order, Ok(hidden)).await?;
                Ok(Response::new(resp))
            }
            Err(status) => {
                // The next stage waits for this batch: tell it why it will not come.
                let why = format!("{:?}: {}", status.code(), status.message());
                if let Err(e) = self.send_hand_off(epoch, order, Err(why)).await {
                    warn!(epoch, order, "{}", e.message());
                }
                Err(status)
            }
        }
    }

    async fn hand_off(
        &self,
        request: Request<HandOffRequest>,
    ) -> Result<Response<HandOffResponse>, Status> {
        let req = request.into_inner();
        let got = if req.failed.is_empty() {
            Ok(req.hidden)
        } else {
            Err(req.failed)
        };
        let mut mb = lock(&self.shared.mailbox);
        if mb.epoch != req.epoch {
            return Err(Status::failed_precondition(format!(
                "epoch: the hand-off is for epoch {}, this worker is in epoch {}",
                req.epoch, mb.epoch
            )));
        }
        match mb.slots.remove(&req.order) {
            // The Forward may have gone (its coordinator call was cancelled); nothing waits then.
            Some(Slot::Awaited(tx)) => drop(tx.send(got)),
            Some(Slot::Arrived(earlier)) => {
                mb.slots.insert(req.order, Slot::Arrived(earlier));
                return Err(Status::invalid_argument(format!(
                    "order: batch {} of epoch {} was already handed off",
                    req.order, req.epoch
                )));
            }
            None => {
                mb.slots.insert(req.order, Slot::Arrived(got));
            }
        }
        Ok(Response::new(HandOffResponse {}))
    }

    async fn release(
        &self,
        request: Request<ReleaseRequest>,
    ) -> Result<Response<ReleaseResponse>, Status> {
        let req = request.into_inner();
        self.shared.core.admit(req.epoch)?;
        let (reply, rx) = oneshot::channel();
        self.shared.send(Command::Release {
            epoch: req.epoch,
            seq_ids: req.seq_ids,
            reply,
        })?;
        answer(rx).await?;
        Ok(Response::new(ReleaseResponse {}))
    }

    async fn nccl_id(
        &self,
        _request: Request<NcclIdRequest>,
    ) -> Result<Response<NcclIdResponse>, Status> {
        let device = self.shared.options.engine.device;
        let id = crate::backend::nccl_unique_id(device)
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        Ok(Response::new(NcclIdResponse { id: id.into() }))
    }

    async fn stats(
        &self,
        _request: Request<StatsRequest>,
    ) -> Result<Response<StatsResponse>, Status> {
        let core = &self.shared.core;
        let c = &core.counters;
        let (all_reduces, all_reduce_us) = core.all_reduce.snapshot();
        Ok(Response::new(StatsResponse {
            epoch: core.state().epoch,
            sequences: c.sequences.load(Ordering::Relaxed) as u32,
            kv_cache_bytes: c.kv_bytes.load(Ordering::Relaxed),
            forward_calls: c.forward_calls.load(Ordering::Relaxed),
            tokens: c.tokens.load(Ordering::Relaxed),
            compute_us: c.compute_us.load(Ordering::Relaxed),
            all_reduces,
            all_reduce_us,
        }))
    }
}

/// The engine thread: runs commands one at a time until the service (every sender) is gone.
struct EngineThread {
    seqs: Sequences<'static>,
    core: Arc<Core>,
    /// The epoch whose group the engine holds (it lags the shared epoch while a JoinGroup connects).
    epoch: u64,
}

impl EngineThread {
    fn new(seqs: Sequences<'static>, core: Arc<Core>) -> Self {
        EngineThread {
            seqs,
            core,
            epoch: 0,
        }
    }

    fn run(mut self, rx: mpsc::Receiver<Command>) {
        while let Ok(cmd) = rx.recv() {
            // A reply can only fail to send when the client went away; nothing to do then.
            match cmd {
                Command::Join {
                    epoch,
                    collective,
                    nccl_id,
                    reply,
                } => {
                    let r = self.join(epoch, collective, &nccl_id);
                    self.publish();
                    let _ = reply.send(r);
                }
                Command::Forward {
                    epoch,
                    seqs,
                    tokens,
                    hidden,
                    hand_off,
                    top_k,
                    reply,
                } => {
                    let r = self.forward(epoch, &seqs, &tokens, &hidden, hand_off, &top_k);
                    self.publish();
                    let _ = reply.send(r);
                }
                Command::Release {
                    epoch,
                    seq_ids,
                    reply,
                } => {
                    let r = self.admit(epoch).map(|()| self.seqs.release(&seq_ids));
                    self.publish();
                    let _ = reply.send(r);
                }
            }
        }
        info!("engine thread stopped");
    }

    /// Updates the counters Stats reads — before a command is answered, so a client that got the answer
    /// sees its effect.
    fn publish(&self) {
        let c = &self.core.counters;
        c.sequences.store(self.seqs.len() as u64, Ordering::Relaxed);
        c.kv_bytes.store(self.seqs.kv_bytes(), Ordering::Relaxed);
    }

    fn join(
        &mut self,
        epoch: u64,
        collective: Box<dyn Collective>,
        nccl_id: &[u8],
    ) -> Result<(), Status> {
        self.seqs.reset();
        self.epoch = epoch;
        let engine = self.seqs.engine_mut();
        engine
            .set_collective(collective)
            .map_err(|e| Status::internal(e.to_string()))?;
        // Blocks until every rank of the stage has joined the communicator (they are asked concurrently).
        engine
            .set_nccl((!nccl_id.is_empty()).then_some(nccl_id))
            .map_err(|e| Status::failed_precondition(format!("nccl_id: {e}")))
    }

    fn admit(&self, epoch: u64) -> Result<(), Status> {
        if epoch != self.epoch {
            return Err(Status::failed_precondition(format!(
                "epoch: the request is for epoch {epoch}, this worker's engine is in epoch {}",
                self.epoch
            )));
        }
        self.core.admit(epoch)
    }

    fn forward(
        &mut self,
        epoch: u64,
        seqs: &[SeqInput],
        tokens: &[u32],
        hidden: &[f32],
        hand_off: bool,
        top_k: &[u32],
    ) -> Result<ForwardResponse, Status> {
        self.admit(epoch)?;
        let started = Instant::now();
        let core = &self.core;
        let out = self.seqs.forward(seqs, tokens, hidden);
        let compute_us = started.elapsed().as_micros() as u64;
        let out = match out {
            Ok(out) => out,
            Err(e) => {
                let (status, poisons) = classify(&e);
                if poisons {
                    core.poison(epoch, e.to_string());
                }
                return Err(status);
            }
        };
        let c = &core.counters;
        c.forward_calls.fetch_add(1, Ordering::Relaxed);
        c.tokens.fetch_add(
            seqs.iter().map(|s| s.n_tokens as u64).sum(),
            Ordering::Relaxed,
        );
        c.compute_us.fetch_add(compute_us, Ordering::Relaxed);
        let mut resp = ForwardResponse {
            compute_us,
            ..ForwardResponse::default()
        };
        match out {
            // Every rank computed the same hidden states: each hands its copy to its own next-stage rank, or
            // rank 0's goes back to the client.
            Output::Hidden(h) if hand_off || core.rank == 0 => {
                resp.hidden = Bytes::from(f32s_to_bytes(h))
            }
            Output::Hidden(_) => {}
            Output::Logits { data, vocab } => {
                debug_assert!(core.is_last);
                resp.vocab_start = vocab.start as u32;
                resp.vocab_end = vocab.end as u32;
                if top_k.iter().all(|&k| k == 0) {
                    resp.n_logit_rows = (data.len() / vocab.len().max(1)) as u32;
                    resp.logits = Bytes::from(f32s_to_bytes(data));
                } else {
                    split_rows(&mut resp, seqs, top_k, data, vocab)?;
                }
            }
        }
        Ok(resp)
    }
}

/// Logits rows of a batch with `top_k` sequences: whole slice rows for the others, each row's best logits
/// and log-sum-exp for them (see `ForwardResponse.top_*`).
fn split_rows(
    resp: &mut ForwardResponse,
    seqs: &[SeqInput],
    top_k: &[u32],
    data: &[f32],
    vocab: std::ops::Range<usize>,
) -> Result<(), Status> {
    let width = vocab.len().max(1);
    let mut rows = data.chunks_exact(width);
    let mut whole = Vec::new();
    let mut clean = Vec::with_capacity(width);
    for (s, &k) in seqs.iter().zip(top_k) {
        let n = match s.logits {
            Logits::None => 0,
            Logits::Last => 1,
            Logits::All => s.n_tokens,
        };
        for _ in 0..n {
            let row = rows.next().ok_or_else(|| {
                Status::internal("the engine returned fewer logits rows than the batch asked for")
            })?;
            if k == 0 {
                whole.extend_from_slice(row);
                resp.n_logit_rows += 1;
                continue;
            }
            // As the coordinator's sampler reads a whole row.
            clean.clear();
            clean.extend(row.iter().map(|&l| softmax_reduce::sampling_logit(l)));
            let best = softmax_reduce::top_m(&clean, k as usize, vocab.start as u32);
            resp.top_counts.push(best.len() as u32);
            resp.top_ids.extend(best.iter().map(|b| b.1));
            resp.top_logits.extend(best.iter().map(|b| b.0));
            resp.top_lse
                .push(softmax_reduce::log_sum_exp(&clean).unwrap_or(f64::NEG_INFINITY));
        }
    }
    resp.logits = Bytes::from(f32s_to_bytes(&whole));
    Ok(())
}

/// The gRPC status of an engine error, and whether it poisons the epoch (the ranks may have diverged).
fn classify(e: &Error) -> (Status, bool) {
    match e {
        Error::Batch(msg) => (Status::invalid_argument(msg.clone()), false),
        Error::KvMemory(_) | Error::KvCache(_) => {
            (Status::resource_exhausted(e.to_string()), false)
        }
        Error::Collective(_) => (
            Status::unavailable(format!("{e}; the epoch is poisoned")),
            true,
        ),
        _ => (
            Status::internal(format!("engine failure: {e}; the epoch is poisoned")),
            true,
        ),
    }
}

/// The collective of an engine before its first JoinGroup: no request reaches the engine then (epoch 0 is
/// refused), so an all-reduce here is a bug, reported as an error rather than a wrong sum.
struct NoGroup {
    rank: usize,
    world_size: usize,
}

impl Collective for NoGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce_sum(&self, _buf: &mut [f32]) -> Result<(), CollectiveError> {
        Err(CollectiveError::Transport(
            "no tensor-parallel group: JoinGroup first".into(),
        ))
    }
}
