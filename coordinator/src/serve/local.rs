//! `LocalPipeline`: the whole model in this process (one stage, one rank) — `tessera serve MODEL.gguf`
//! without workers, and the scheduler's test double.
//!
//! The engine is synchronous and CPU-bound (its kernels have their own thread pool), so it lives on one
//! dedicated OS thread that takes commands over a std channel and answers over tokio oneshots: async tasks
//! never run it, and batches reach it one at a time in the order they were sent.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use shard_tool::checkpoint::Checkpoint;
use shard_tool::manifest::MANIFEST_NAME;
use shard_tool::plan::{Topology, plan};
use tessera_kernels::cpu::Pool;
use tessera_worker::{
    Device, Engine, EngineOptions, Logits, Output, SeqInput, Sequences, ShardDir, SingleRank,
    Weights,
};
use thiserror::Error;
use tokio::sync::oneshot;
use tracing::{debug, info, warn};

use super::pipeline::HEALTH_SEQ_ID;
use super::{BatchLogits, Pipeline, PipelineError, PipelineInfo, ServedModel, StepBatch};
use crate::chat::{ChatError, ChatTemplate};
use crate::tokenizer::{Tokenizer, TokenizerError};

/// How long a health probe may wait. It queues behind at most the batch the engine is running (the
/// scheduler has one lane for a one-stage pipeline), so only a wedged engine or a single enormous batch
/// exceeds it.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Error)]
pub enum LocalError {
    #[error(
        "a local pipeline needs the whole model (one stage, one rank, the whole vocabulary), but the engine holds \
         stage {stage} rank {rank} (first stage: {is_first}, last stage: {is_last}, vocabulary rows {vocab:?} of \
         {n_vocab}, {world} ranks)"
    )]
    NotWholeModel {
        stage: usize,
        rank: usize,
        is_first: bool,
        is_last: bool,
        vocab: std::ops::Range<usize>,
        n_vocab: usize,
        world: usize,
    },
    #[error("{field} must be at least 1, got 0")]
    Zero { field: &'static str },
    #[error("{} holds {shards} shards (tp={tp}, pp={pp}); serve a shard set with workers (`tessera cluster`)", path.display())]
    ShardSet {
        path: PathBuf,
        shards: usize,
        tp: usize,
        pp: usize,
    },
    #[error("starting the engine thread: {0}")]
    Thread(#[source] std::io::Error),
    #[error("opening {}: {source}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: shard_tool::Error,
    },
    #[error(transparent)]
    Engine(#[from] tessera_worker::Error),
    #[error("building the tokenizer: {0}")]
    Tokenizer(#[from] TokenizerError),
    #[error("the chat template: {0}")]
    Chat(#[from] ChatError),
}

/// What the engine thread holds now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalStats {
    /// Live sequences (KV caches).
    pub sequences: usize,
    pub kv_bytes: u64,
}

enum Command {
    Forward {
        batch: StepBatch,
        reply: oneshot::Sender<Result<Vec<f32>, PipelineError>>,
    },
    Release {
        seq_ids: Vec<u64>,
    },
    Health {
        reply: oneshot::Sender<Result<(), PipelineError>>,
    },
    Stats {
        reply: oneshot::Sender<LocalStats>,
    },
}

/// The in-process pipeline; see the module doc. Dropping it stops the engine thread once its queued
/// commands are done.
pub struct LocalPipeline {
    commands: std_mpsc::Sender<Command>,
    info: PipelineInfo,
    /// 1 on the CPU, 2 on a GPU (see [`Pipeline::micro_batches`]).
    micro_batches: usize,
}

impl std::fmt::Debug for LocalPipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalPipeline")
            .field("info", &self.info)
            .finish()
    }
}

fn stopped() -> PipelineError {
    PipelineError::Unavailable("the local engine thread has stopped".into())
}

impl LocalPipeline {
    /// Starts the engine thread on `seqs`, whose engine must hold the whole model (tp = pp = 1).
    pub fn new(seqs: Sequences<'static>) -> Result<LocalPipeline, LocalError> {
        let engine = seqs.engine();
        let n_vocab = engine.config.n_vocab;
        let world = engine.collective().world_size();
        if !engine.weights.is_first
            || !engine.weights.is_last
            || engine.vocab_rows() != (0..n_vocab)
            || world != 1
        {
            return Err(LocalError::NotWholeModel {
                stage: engine.spec.stage,
                rank: engine.spec.rank,
                is_first: engine.weights.is_first,
                is_last: engine.weights.is_last,
                vocab: engine.vocab_rows(),
                n_vocab,
                world,
            });
        }
        let options = engine.options();
        if options.max_logits == 0 {
            return Err(LocalError::Zero {
                field: "max_logits",
            });
        }
        if seqs.max_context() == 0 {
            return Err(LocalError::Zero {
                field: "max_context",
            });
        }
        // On the CPU the engine's threads and the coordinator's sampling share the cores: one batch of
        // every running sequence at a time (measured with bench/serving.sh on the 1B-shaped Q4_K_M file,
        // 2 threads: 8 streams 75-81 vs 58-60 tok/s, 32 streams 102-109 vs 89 with two lanes).
        let micro_batches = if engine.device() == Device::Cpu { 1 } else { 2 };
        let info = PipelineInfo {
            max_batch_tokens: options.max_batch_tokens,
            max_logits: options.max_logits,
            max_context: seqs.max_context(),
            n_vocab,
            n_stages: 1,
            tp: 1,
        };
        let (commands, rx) = std_mpsc::channel();
        std::thread::Builder::new()
            .name("tessera-engine".into())
            .spawn(move || engine_thread(seqs, rx))
            .map_err(LocalError::Thread)?;
        Ok(LocalPipeline {
            commands,
            info,
            micro_batches,
        })
    }

    /// Opens a model for serving in this process: a checkpoint (GGUF file, gguf-split set, llamafile,
    /// safetensors directory …) or a shard directory holding a single shard (see [`open_model`]). `threads`
    /// run the kernels; `max_context` is the longest prompt + completion of one request.
    pub fn open(
        paths: &[PathBuf],
        threads: usize,
        max_context: usize,
        options: EngineOptions,
    ) -> Result<(LocalPipeline, ServedModel), LocalError> {
        if max_context == 0 {
            return Err(LocalError::Zero {
                field: "max_context",
            });
        }
        let OpenedModel {
            engine,
            tokenizer,
            template,
            id,
        } = open_model(paths, threads, options)?;
        let n_ctx_train = engine.config.n_ctx_train;
        if n_ctx_train > 0 && max_context > n_ctx_train {
            warn!(
                "max_context {max_context} exceeds the {n_ctx_train} tokens the model was trained on; quality may \
                 degrade beyond them"
            );
        }
        let config = engine.config.clone();
        let template = ChatTemplate::for_model(template.as_deref(), &tokenizer)?;
        let pipeline = LocalPipeline::new(Sequences::new(engine, max_context, None))?;
        info!(
            model = %id,
            tokenizer = tokenizer.description(),
            max_context,
            "serving the model in this process"
        );
        let served = ServedModel {
            id,
            tokenizer: Arc::new(tokenizer),
            template,
            config,
            max_context,
            tp: 1,
            pp: 1,
        };
        Ok((pipeline, served))
    }

    /// Live sequences and their KV memory, as the engine thread sees them after the commands sent before.
    pub async fn stats(&self) -> Result<LocalStats, PipelineError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Stats { reply })?;
        rx.await.map_err(|_| stopped())
    }

    fn send(&self, command: Command) -> Result<(), PipelineError> {
        self.commands.send(command).map_err(|_| stopped())
    }
}

/// The file stem (what the operator named the model) or, without one, the checkpoint's `general.name`.
/// A whole model opened in this process: the engine (one stage, one rank), its tokenizer, chat template
/// source and id.
pub struct OpenedModel {
    pub engine: Engine<'static>,
    pub tokenizer: Tokenizer,
    pub template: Option<String>,
    /// The id clients pass as `model` (file stem, else `general.name`).
    pub id: String,
}

/// Opens `paths` — any checkpoint the readers accept, or a shard directory holding a single shard — as one
/// engine on a pool of `threads` threads: what `tessera run` and `tessera serve MODEL` both run. The
/// checkpoint (or shard directory) is leaked: a process holds its model for its whole life.
pub fn open_model(
    paths: &[PathBuf],
    threads: usize,
    options: EngineOptions,
) -> Result<OpenedModel, LocalError> {
    if threads == 0 {
        return Err(LocalError::Zero { field: "threads" });
    }
    let pool = Arc::new(Pool::new(threads));
    let first = paths.first().cloned().unwrap_or_default();
    if paths.len() == 1 && first.join(MANIFEST_NAME).is_file() {
        let dir = ShardDir::open(&first, 0, 0)?;
        let (shards, topo) = (dir.manifest.plan.shards.len(), &dir.manifest.plan.topology);
        if shards != 1 {
            return Err(LocalError::ShardSet {
                path: first,
                shards,
                tp: topo.tp,
                pp: topo.pp,
            });
        }
        let dir: &'static ShardDir = Box::leak(Box::new(dir));
        let tokenizer = Tokenizer::from_shard_dir(&first, &dir.manifest)?;
        let weights = Weights::from_shard_dir_with(dir, &options)?;
        let engine = Engine::new(
            weights,
            dir.config().clone(),
            dir.spec.clone(),
            Box::new(SingleRank),
            pool,
            options,
        )?;
        let id = model_id(&first, dir.config().name.as_deref());
        return Ok(OpenedModel {
            engine,
            tokenizer,
            template: dir.manifest.chat_template.clone(),
            id,
        });
    }
    let ckpt = Checkpoint::open(paths).map_err(|source| LocalError::Open {
        path: first.clone(),
        source,
    })?;
    let ckpt: &'static Checkpoint = Box::leak(Box::new(ckpt));
    let tokenizer = Tokenizer::from_checkpoint(ckpt)?;
    let spec = plan(&ckpt.config, &ckpt.tensors, &Topology::new(1, 1))
        .map_err(|source| LocalError::Open {
            path: first.clone(),
            source,
        })?
        .shards
        .remove(0);
    let weights = Weights::from_checkpoint_with(ckpt, &spec, &options)?;
    let engine = Engine::new(
        weights,
        ckpt.config.clone(),
        spec,
        Box::new(SingleRank),
        pool,
        options,
    )?;
    Ok(OpenedModel {
        engine,
        tokenizer,
        template: ckpt.chat_template.clone(),
        id: model_id(&first, ckpt.config.name.as_deref()),
    })
}

/// The id clients pass as `model`: the file stem of `path`, else the model's name, else "model".
pub(crate) fn model_id(path: &Path, name: Option<&str>) -> String {
    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .filter(|s| !s.is_empty());
    stem.or(name).unwrap_or("model").to_owned()
}

impl Pipeline for LocalPipeline {
    fn info(&self) -> PipelineInfo {
        self.info
    }

    fn micro_batches(&self) -> usize {
        self.micro_batches
    }

    fn forward<'a>(
        &'a self,
        batch: &'a StepBatch,
    ) -> BoxFuture<'a, Result<BatchLogits, PipelineError>> {
        let (reply, rx) = oneshot::channel();
        let sent = self.send(Command::Forward {
            batch: batch.clone(),
            reply,
        });
        let n_vocab = self.info.n_vocab;
        // In one process the whole rows cost nothing to pass: `top_k` is not needed.
        async move {
            sent?;
            let rows = rx.await.map_err(|_| stopped())??;
            Ok(BatchLogits::whole(n_vocab, rows))
        }
        .boxed()
    }

    fn release<'a>(&'a self, seq_ids: &'a [u64]) -> BoxFuture<'a, ()> {
        if let Err(e) = self.send(Command::Release {
            seq_ids: seq_ids.to_vec(),
        }) {
            debug!("release: {e}");
        }
        futures::future::ready(()).boxed()
    }

    fn health(&self) -> BoxFuture<'_, Result<(), PipelineError>> {
        let (reply, rx) = oneshot::channel();
        let sent = self.send(Command::Health { reply });
        async move {
            sent?;
            match tokio::time::timeout(HEALTH_TIMEOUT, rx).await {
                Ok(answer) => answer.map_err(|_| stopped())?,
                Err(_) => Err(PipelineError::Unavailable(format!(
                    "the local engine did not run a one-token health probe within {} s",
                    HEALTH_TIMEOUT.as_secs()
                ))),
            }
        }
        .boxed()
    }
}

fn engine_thread(mut seqs: Sequences<'static>, commands: std_mpsc::Receiver<Command>) {
    debug!("engine thread started");
    let mut inputs = Vec::new();
    let mut tokens = Vec::new();
    while let Ok(command) = commands.recv() {
        match command {
            Command::Forward { batch, reply } => {
                let result = forward(&mut seqs, &batch, &mut inputs, &mut tokens);
                // The caller may have given up (a cancelled request); nothing to do then.
                let _ = reply.send(result);
            }
            Command::Release { seq_ids } => seqs.release(&seq_ids),
            Command::Health { reply } => {
                let _ = reply.send(health(&mut seqs));
            }
            Command::Stats { reply } => {
                let _ = reply.send(LocalStats {
                    sequences: seqs.len(),
                    kv_bytes: seqs.kv_bytes(),
                });
            }
        }
    }
    debug!("engine thread stopped");
}

fn forward(
    seqs: &mut Sequences<'static>,
    batch: &StepBatch,
    inputs: &mut Vec<SeqInput>,
    tokens: &mut Vec<u32>,
) -> Result<Vec<f32>, PipelineError> {
    inputs.clear();
    tokens.clear();
    for s in &batch.seqs {
        inputs.push(SeqInput {
            seq_id: s.seq_id,
            start_pos: s.start_pos,
            n_tokens: s.tokens.len(),
            logits: match (s.want_logits, s.all_logits) {
                (false, _) => Logits::None,
                (true, false) => Logits::Last,
                (true, true) => Logits::All,
            },
            context: s.context,
            prefix_from: s.prefix_from,
        });
        tokens.extend_from_slice(&s.tokens);
    }
    run(seqs, inputs, tokens)
}

/// Runs one batch and copies out the full-vocabulary logits rows.
fn run(
    seqs: &mut Sequences<'static>,
    inputs: &[SeqInput],
    tokens: &[u32],
) -> Result<Vec<f32>, PipelineError> {
    let n_vocab = seqs.engine().config.n_vocab;
    match seqs.forward(inputs, tokens, &[]) {
        Ok(Output::Logits { data, vocab }) if vocab == (0..n_vocab) => Ok(data.to_vec()),
        Ok(Output::Logits { vocab, .. }) => Err(PipelineError::Internal(format!(
            "the engine returned logits for vocabulary rows {vocab:?}, not all {n_vocab}"
        ))),
        Ok(Output::Hidden(_)) => Err(PipelineError::Internal(
            "the engine returned hidden states, not logits: it is not the last stage".into(),
        )),
        Err(tessera_worker::Error::KvMemory(msg)) => Err(PipelineError::ResourceExhausted(msg)),
        Err(e) => Err(PipelineError::Internal(e.to_string())),
    }
}

/// A one-token sequence through the whole model, then released.
fn health(seqs: &mut Sequences<'static>) -> Result<(), PipelineError> {
    let input = SeqInput {
        seq_id: HEALTH_SEQ_ID,
        start_pos: 0,
        n_tokens: 1,
        logits: Logits::Last,
        context: 1,
        prefix_from: None,
    };
    // A probe that died halfway (it never does; belt and braces) must not block the next one.
    seqs.release(&[HEALTH_SEQ_ID]);
    let result = run(seqs, &[input], &[0]);
    seqs.release(&[HEALTH_SEQ_ID]);
    let logits = result?;
    if logits.iter().any(|l| l.is_finite()) {
        Ok(())
    } else {
        Err(PipelineError::Internal(
            "the health probe's logits have no finite value".into(),
        ))
    }
}
