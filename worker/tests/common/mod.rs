//! Helpers shared by the engine's integration tests: fixture paths, llama.cpp reference logits, and engines
//! built from a checkpoint for any (tp, pp) plan.
#![allow(dead_code)]

pub mod reference;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use shard_tool::checkpoint::Checkpoint;
use shard_tool::plan::{ShardPlan, Topology, plan};
use tessera_kernels::cpu::Pool;
use tessera_worker::{
    Batch, Collective, Engine, EngineOptions, KvCache, KvType, Logits, SingleRank, Weights,
};

/// `$TESSERA_CACHE/models` (default `~/.cache/tessera/models`), where `scripts/prepare-engine-models.sh`
/// puts the reference models.
pub fn models_dir() -> Option<PathBuf> {
    std::env::var_os("TESSERA_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/tessera")))
        .map(|c| c.join("models"))
}

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

pub fn open(rel: &str) -> Checkpoint {
    Checkpoint::open(&[fixtures().join(rel)]).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// One llama.cpp run from `tests/fixtures/gguf/tiny_llama.logits.json`.
pub struct RefRun {
    pub model: String,
    pub text: String,
    pub tokens: Vec<u32>,
    /// `[n_tokens, n_vocab]`, row i = logits after token i.
    pub logits: Vec<f32>,
    pub n_vocab: usize,
    pub argmax: Vec<usize>,
}

pub fn reference_runs() -> Vec<RefRun> {
    let dir = fixtures();
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("gguf/tiny_llama.logits.json")).unwrap())
            .unwrap();
    json["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let bytes = std::fs::read(dir.join(r["file"].as_str().unwrap())).unwrap();
            let logits: Vec<f32> = bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            let shape: Vec<usize> = r["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as usize)
                .collect();
            assert_eq!(logits.len(), shape[0] * shape[1]);
            RefRun {
                model: r["model"].as_str().unwrap().to_owned(),
                text: r["text"].as_str().unwrap().to_owned(),
                tokens: r["token_ids"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_u64().unwrap() as u32)
                    .collect(),
                logits,
                n_vocab: shape[1],
                argmax: r["argmax_per_position"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_u64().unwrap() as usize)
                    .collect(),
            }
        })
        .collect()
}

pub fn plan_for(ckpt: &Checkpoint, tp: usize, pp: usize) -> ShardPlan {
    plan(&ckpt.config, &ckpt.tensors, &Topology::new(tp, pp)).unwrap()
}

pub fn options() -> EngineOptions {
    EngineOptions {
        max_batch_tokens: 64,
        max_logits: 64,
        ..EngineOptions::default()
    }
}

/// A single-process engine (tp = pp = 1) over `ckpt`.
pub fn single(ckpt: &Checkpoint) -> Engine<'_> {
    single_threads(ckpt, 1)
}

/// A single-process engine whose kernels run on `n_threads` threads.
pub fn single_threads(ckpt: &Checkpoint, n_threads: usize) -> Engine<'_> {
    single_with(ckpt, n_threads, options())
}

/// A single-process engine over `ckpt` with `options`, its weights laid out for them.
pub fn single_with(ckpt: &Checkpoint, n_threads: usize, options: EngineOptions) -> Engine<'_> {
    let p = plan_for(ckpt, 1, 1);
    let spec = p.shard(0, 0).unwrap().clone();
    let weights = Weights::from_checkpoint_with(ckpt, &spec, &options).unwrap();
    Engine::new(
        weights,
        ckpt.config.clone(),
        spec,
        Box::new(SingleRank),
        Arc::new(Pool::new(n_threads)),
        options,
    )
    .unwrap()
}

/// An engine for shard (stage, rank) of `plan` over `ckpt`.
pub fn shard_engine<'m>(
    ckpt: &'m Checkpoint,
    plan: &ShardPlan,
    stage: usize,
    rank: usize,
    collective: Box<dyn Collective>,
) -> Engine<'m> {
    let spec = plan.shard(stage, rank).unwrap().clone();
    let weights = Weights::from_checkpoint(ckpt, &spec).unwrap();
    Engine::new(
        weights,
        ckpt.config.clone(),
        spec,
        collective,
        Arc::new(Pool::new(1)),
        options(),
    )
    .unwrap()
}

/// Prefills `tokens` as one sequence and returns the logits of every position (this rank's slice).
pub fn prefill_all(engine: &mut Engine<'_>, tokens: &[u32]) -> Vec<f32> {
    prefill_all_kv(engine, tokens, KvType::F16)
}

/// As [`prefill_all`] with a KV cache of type `ty`.
pub fn prefill_all_kv(engine: &mut Engine<'_>, tokens: &[u32], ty: KvType) -> Vec<f32> {
    let mut cache = engine.new_cache_of(64, ty, None).unwrap();
    let mut batch = Batch::new();
    batch.push_tokens(0, tokens, Logits::All);
    engine
        .forward(&batch, &mut [&mut cache])
        .unwrap()
        .logits()
        .unwrap()
        .to_vec()
}

/// Prefills `tokens` one at a time (decode steps) and returns the logits of every position.
pub fn decode_all(engine: &mut Engine<'_>, cache: &mut KvCache, tokens: &[u32]) -> Vec<f32> {
    let mut out = Vec::new();
    let mut batch = Batch::new();
    for (pos, &t) in tokens.iter().enumerate() {
        batch.clear();
        batch.push_tokens(pos, &[t], Logits::Last);
        out.extend_from_slice(
            engine
                .forward(&batch, &mut [&mut *cache])
                .unwrap()
                .logits()
                .unwrap(),
        );
    }
    out
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Runs `batch` (one sequence, logits for its last token) and returns the greedy token.
pub fn greedy_next(engine: &mut Engine<'_>, batch: &Batch, cache: &mut KvCache) -> usize {
    argmax(
        engine
            .forward(batch, &mut [cache])
            .unwrap()
            .logits()
            .unwrap(),
    )
}

pub fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| {
            if v > bv { (i, v) } else { (bi, bv) }
        })
        .0
}

/// A whole (tp, pp) deployment in one process: one engine per (stage, rank), each stage's ranks joined by a
/// `LocalGroup`, hidden states handed from stage to stage. Ranks of a stage run on their own threads.
pub struct Cluster<'m> {
    /// `[stage][rank]`.
    pub stages: Vec<Vec<Engine<'m>>>,
    pub n_vocab: usize,
}

/// One sequence's caches on every shard, `[stage][rank]`.
pub type SeqCaches = Vec<Vec<KvCache>>;

enum Owned {
    Hidden(Vec<f32>),
    Logits(Vec<f32>, std::ops::Range<usize>),
}

impl<'m> Cluster<'m> {
    pub fn from_checkpoint(ckpt: &'m Checkpoint, tp: usize, pp: usize) -> Self {
        let plan = plan_for(ckpt, tp, pp);
        let stages = (0..pp)
            .map(|s| {
                tessera_worker::LocalGroup::new(tp)
                    .into_iter()
                    .enumerate()
                    .map(|(r, g)| shard_engine(ckpt, &plan, s, r, Box::new(g)))
                    .collect()
            })
            .collect();
        Cluster {
            stages,
            n_vocab: ckpt.config.n_vocab,
        }
    }

    pub fn from_shard_dirs(dirs: &'m [tessera_worker::ShardDir]) -> Self {
        let topo = &dirs[0].manifest.plan.topology;
        let (tp, pp) = (topo.tp, topo.pp);
        let mut stages = Vec::new();
        for s in 0..pp {
            let mut engines = Vec::new();
            for (r, g) in tessera_worker::LocalGroup::new(tp).into_iter().enumerate() {
                let dir = dirs
                    .iter()
                    .find(|d| d.spec.stage == s && d.spec.rank == r)
                    .unwrap();
                let weights = Weights::from_shard_dir(dir).unwrap();
                engines.push(
                    Engine::new(
                        weights,
                        dir.config().clone(),
                        dir.spec.clone(),
                        Box::new(g),
                        Arc::new(Pool::new(1)),
                        options(),
                    )
                    .unwrap(),
                );
            }
            stages.push(engines);
        }
        Cluster {
            stages,
            n_vocab: dirs[0].config().n_vocab,
        }
    }

    pub fn new_caches(&self, ctx: usize) -> SeqCaches {
        self.new_caches_of(ctx, KvType::F16)
    }

    pub fn new_caches_of(&self, ctx: usize, ty: KvType) -> SeqCaches {
        self.stages
            .iter()
            .map(|s| {
                s.iter()
                    .map(|e| e.new_cache_of(ctx, ty, None).unwrap())
                    .collect()
            })
            .collect()
    }

    /// Runs `batch` (token ids) through every stage; returns the full-vocabulary logits rows.
    pub fn forward(&mut self, batch: &Batch, seqs: &mut [&mut SeqCaches]) -> Vec<f32> {
        let mut stage_batch = batch.clone();
        let n_stages = self.stages.len();
        for (s, engines) in self.stages.iter_mut().enumerate() {
            let mut per_rank: Vec<Vec<&mut KvCache>> = engines.iter().map(|_| Vec::new()).collect();
            for sc in seqs.iter_mut() {
                for (r, c) in sc[s].iter_mut().enumerate() {
                    per_rank[r].push(c);
                }
            }
            let b = &stage_batch;
            let outs: Vec<Owned> = std::thread::scope(|scope| {
                let handles: Vec<_> = engines
                    .iter_mut()
                    .zip(per_rank)
                    .map(|(e, mut caches)| {
                        scope.spawn(move || match e.forward(b, &mut caches).unwrap() {
                            tessera_worker::Output::Hidden(h) => Owned::Hidden(h.to_vec()),
                            tessera_worker::Output::Logits { data, vocab } => {
                                Owned::Logits(data.to_vec(), vocab)
                            }
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            if s + 1 < n_stages {
                let Owned::Hidden(h) = &outs[0] else {
                    panic!("stage {s} is not the last")
                };
                for o in &outs {
                    let Owned::Hidden(other) = o else { panic!() };
                    assert_eq!(other, h, "ranks of stage {s} disagree on hidden states");
                }
                stage_batch.tokens.clear();
                stage_batch.hidden.clear();
                stage_batch.hidden.extend_from_slice(h);
            } else {
                let rows = batch.n_logits();
                let v = self.n_vocab;
                let mut full = vec![f32::NAN; rows * v];
                for o in outs {
                    let Owned::Logits(data, range) = o else {
                        panic!("last stage returned hidden states")
                    };
                    let w = range.len();
                    for r in 0..rows {
                        full[r * v + range.start..r * v + range.end]
                            .copy_from_slice(&data[r * w..(r + 1) * w]);
                    }
                }
                assert!(
                    full.iter().all(|x| x.is_finite()),
                    "vocabulary slices do not cover the vocabulary"
                );
                return full;
            }
        }
        unreachable!()
    }

    /// Prefills `tokens` as one sequence, logits of every position.
    pub fn prefill_all(&mut self, tokens: &[u32]) -> Vec<f32> {
        self.prefill_all_kv(tokens, KvType::F16)
    }

    /// As [`Cluster::prefill_all`] with KV caches of type `ty`.
    pub fn prefill_all_kv(&mut self, tokens: &[u32], ty: KvType) -> Vec<f32> {
        let mut caches = self.new_caches_of(64, ty);
        let mut batch = Batch::new();
        batch.push_tokens(0, tokens, Logits::All);
        self.forward(&batch, &mut [&mut caches])
    }
}

/// Reports material a test needs but cannot find (a model from `scripts/prepare-engine-models.sh`, a fixture).
/// Outside CI the test skips it with this message; under `CI=true` that is a failure, so CI can never pass
/// by skipping the reference comparisons.
pub fn missing(what: String) {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!(
            "{what} (CI=true: run scripts/prepare-engine-models.sh; reference tests must not be skipped)"
        );
    }
    eprintln!("skipping: {what}");
}
