//! The continuous-batching scheduler on an in-process engine (`LocalPipeline`): batched requests get exactly
//! the tokens they get alone, requests end as their parameters say, and every failure reaches every affected
//! request as an error instead of a hang.
//!
//! The SmolLM2 test reads `$TESSERA_CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf` (default cache
//! `~/.cache/tessera`, filled by scripts/prepare-engine-models.sh); it is skipped with a message when the model
//! is missing on a developer machine and fails under CI (`CI=true`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::FutureExt;
use futures::future::{BoxFuture, join_all};
use shard_tool::checkpoint::Checkpoint;
use shard_tool::plan::{Topology, plan};
use tessera::generate::{FinishReason, generate};
use tessera::sampling::SamplingParams;
use tessera::serve::local::LocalPipeline;
use tessera::serve::{
    BatchLogits, GenEvent, GenReceiver, GenRequest, Pipeline, PipelineError, PipelineInfo,
    Scheduler, SchedulerConfig, SchedulerHandle, ServeError, StepBatch, TokenEvent, Usage,
};
use tessera::tokenizer::Tokenizer;
use tessera_kernels::cpu::Pool;
use tessera_worker::{Engine, EngineOptions, Sequences, SingleRank, Weights};

const TIMEOUT: Duration = Duration::from_secs(120);

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn tiny_path() -> PathBuf {
    fixtures().join("gguf/tiny_llama.gguf")
}

/// A model from the cache; `None` (skip) when missing, except under CI where it is a failure.
fn cached_model(name: &str) -> Option<PathBuf> {
    let cache = match std::env::var_os("TESSERA_CACHE") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/tessera"),
    };
    let path = cache.join("models").join(name);
    if path.exists() {
        return Some(path);
    }
    let msg = format!(
        "{} is missing: run scripts/prepare-engine-models.sh",
        path.display()
    );
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{msg}");
    }
    eprintln!("SKIPPED: {msg}");
    None
}

/// An engine over a leaked checkpoint (tests hold models for the process's life, as a server does).
fn engine(path: &Path, options: EngineOptions) -> Engine<'static> {
    let ckpt: &'static Checkpoint = Box::leak(Box::new(
        Checkpoint::open(&[path.to_path_buf()])
            .unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    ));
    let spec = plan(&ckpt.config, &ckpt.tensors, &Topology::new(1, 1))
        .unwrap()
        .shards
        .remove(0);
    let weights = Weights::from_checkpoint(ckpt, &spec).unwrap();
    Engine::new(
        weights,
        ckpt.config.clone(),
        spec,
        Box::new(SingleRank),
        Arc::new(Pool::new(2)),
        options,
    )
    .unwrap()
}

fn tokenizer(path: &Path) -> Arc<Tokenizer> {
    Arc::new(Tokenizer::from_gguf_file(path).unwrap())
}

fn tiny_options() -> EngineOptions {
    EngineOptions {
        max_batch_tokens: 64,
        max_logits: 16,
        ..EngineOptions::default()
    }
}

const TINY_CONTEXT: usize = 128;

/// The tiny model with room for 16 sequences per batch, a 128-token context and an optional KV budget.
fn tiny_pipeline(kv_budget: Option<u64>) -> Arc<LocalPipeline> {
    let engine = engine(&tiny_path(), tiny_options());
    Arc::new(LocalPipeline::new(Sequences::new(engine, TINY_CONTEXT, kv_budget)).unwrap())
}

fn tiny_config() -> SchedulerConfig {
    SchedulerConfig {
        max_running: 16,
        max_queued: 64,
        // Prompts span several chunks, so prefill chunks and decode tokens share batches.
        prefill_chunk: 16,
        max_batch_tokens: None,
        prefix_cache_tokens: 0,
    }
}

/// Everything a request's receiver got.
#[derive(Debug, Clone, PartialEq)]
struct Output {
    /// The prompt's log-probabilities, when asked for.
    prompt: Option<Vec<TokenEvent>>,
    tokens: Vec<TokenEvent>,
    end: End,
}

#[derive(Debug, Clone, PartialEq)]
enum End {
    Done {
        finish: FinishReason,
        usage: Usage,
        text: String,
    },
    Error(ServeError),
}

impl Output {
    fn ids(&self) -> Vec<u32> {
        self.tokens.iter().map(|t| t.id).collect()
    }

    fn text(&self) -> String {
        let mut text: String = self.tokens.iter().map(|t| t.text.as_str()).collect();
        if let End::Done { text: tail, .. } = &self.end {
            text.push_str(tail);
        }
        text
    }

    /// The output with its usage's cached prompt tokens taken out (set to 0), and their number.
    fn take_cached(mut self) -> (Output, usize) {
        let cached = match &mut self.end {
            End::Done { usage, .. } => std::mem::take(&mut usage.cached_tokens),
            End::Error(_) => 0,
        };
        (self, cached)
    }

    fn error(&self) -> Option<&ServeError> {
        match &self.end {
            End::Error(e) => Some(e),
            End::Done { .. } => None,
        }
    }
}

/// Reads a request's events to the end: any number of tokens, then exactly one `Done` or `Error`, then the
/// stream closes.
async fn collect(mut rx: GenReceiver) -> Output {
    tokio::time::timeout(TIMEOUT, async move {
        let mut tokens = Vec::new();
        let mut prompt = None;
        let end = loop {
            match rx.recv().await {
                Some(GenEvent::Prompt(entries)) => {
                    assert!(tokens.is_empty(), "prompt log-probabilities after a token");
                    assert!(prompt.is_none(), "prompt log-probabilities twice");
                    prompt = Some(entries);
                }
                Some(GenEvent::Token(t)) => tokens.push(t),
                Some(GenEvent::Done {
                    finish,
                    usage,
                    text,
                }) => {
                    break End::Done {
                        finish,
                        usage,
                        text,
                    };
                }
                Some(GenEvent::Error(e)) => break End::Error(e),
                None => panic!(
                    "the stream ended without Done or Error after {} tokens",
                    tokens.len()
                ),
            }
        };
        assert_eq!(rx.recv().await, None, "an event after the end");
        Output {
            prompt,
            tokens,
            end,
        }
    })
    .await
    .expect("a request hung")
}

async fn run_alone(handle: &SchedulerHandle, reqs: &[GenRequest]) -> Vec<Output> {
    let mut out = Vec::new();
    for req in reqs {
        out.push(collect(handle.submit(req.clone()).unwrap()).await);
    }
    out
}

async fn run_together(handle: &SchedulerHandle, reqs: &[GenRequest]) -> Vec<Output> {
    let rxs: Vec<_> = reqs
        .iter()
        .map(|r| handle.submit(r.clone()).unwrap())
        .collect();
    join_all(rxs.into_iter().map(collect)).await
}

/// Requests with different prompts, lengths, seeds, temperatures and filters.
fn varied_requests(prompts: Vec<Vec<u32>>, max_tokens: impl Fn(usize) -> usize) -> Vec<GenRequest> {
    prompts
        .into_iter()
        .enumerate()
        .map(|(i, prompt)| GenRequest {
            prompt,
            params: SamplingParams {
                temperature: [0.0, 0.5, 0.8, 1.0, 1.5][i % 5],
                top_k: [0, 10, 40][i % 3],
                top_p: [1.0, 0.9][i % 2],
                min_p: [0.0, 0.05][(i / 2) % 2],
                repetition_penalty: [1.0, 1.1][(i / 3) % 2],
                seed: Some(1000 + i as u64),
                max_tokens: Some(max_tokens(i)),
                logprobs: (i % 4 == 0).then_some(3),
                ..SamplingParams::default()
            },
        })
        .collect()
}

fn tiny_prompts(tok: &Tokenizer, n: usize) -> Vec<Vec<u32>> {
    let words = [
        "The capital of France is",
        "Hello, world!",
        "numbers 12345 and 3.14",
        "multi\nline\n\ttabbed text that goes on for a while longer than the others do",
        "café 🦙 日本",
        "a",
    ];
    (0..n)
        .map(|i| {
            let mut text = String::new();
            for k in 0..=(i % 4) {
                text.push_str(words[(i + k) % words.len()]);
                text.push(' ');
            }
            tok.encode(text.trim_end(), true, false).unwrap()
        })
        .collect()
}

fn assert_same(alone: &[Output], together: &[Output]) {
    assert_eq!(alone.len(), together.len());
    for (i, (a, t)) in alone.iter().zip(together).enumerate() {
        assert!(a.error().is_none(), "request {i} failed alone: {a:?}");
        assert_eq!(
            a.ids(),
            t.ids(),
            "request {i}: tokens differ between a solo run and a batched one"
        );
        assert_eq!(a, t, "request {i}: events differ (text or logprobs)");
    }
}

/// Wraps a pipeline and records the largest batch and whether a batch mixed prefill chunks with decode
/// tokens, to show that a test really batched.
struct Recorder {
    inner: Arc<LocalPipeline>,
    max_seqs: AtomicUsize,
    mixed: AtomicUsize,
}

impl Recorder {
    fn new(inner: Arc<LocalPipeline>) -> Arc<Recorder> {
        Arc::new(Recorder {
            inner,
            max_seqs: AtomicUsize::new(0),
            mixed: AtomicUsize::new(0),
        })
    }
}

// `micro_batches` is left at the default (stages + 1 = 2 lanes), unlike the local pipeline it wraps: the
// tests through a `Recorder` cover several lanes sharing one pipeline.
impl Pipeline for Recorder {
    fn info(&self) -> PipelineInfo {
        self.inner.info()
    }

    fn forward<'a>(
        &'a self,
        batch: &'a StepBatch,
    ) -> BoxFuture<'a, Result<BatchLogits, PipelineError>> {
        self.max_seqs.fetch_max(batch.seqs.len(), Ordering::SeqCst);
        let decode = batch
            .seqs
            .iter()
            .any(|s| s.start_pos > 0 && s.tokens.len() == 1);
        let prefill = batch.seqs.iter().any(|s| s.tokens.len() > 1);
        if decode && prefill {
            self.mixed.fetch_add(1, Ordering::SeqCst);
        }
        self.inner.forward(batch)
    }

    fn release<'a>(&'a self, seq_ids: &'a [u64]) -> BoxFuture<'a, ()> {
        self.inner.release(seq_ids)
    }

    fn health(&self) -> BoxFuture<'_, Result<(), PipelineError>> {
        self.inner.health()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_batched_requests_match_solo_runs() {
    let tok = tokenizer(&tiny_path());
    let reqs = varied_requests(tiny_prompts(&tok, 14), |i| 10 + 3 * i);
    let recorder = Recorder::new(tiny_pipeline(None));
    let handle = Scheduler::start(recorder.clone(), tok.clone(), tiny_config());
    let alone = run_alone(&handle, &reqs).await;
    assert_eq!(recorder.max_seqs.load(Ordering::SeqCst), 1);
    let together = run_together(&handle, &reqs).await;
    assert_same(&alone, &together);
    // 14 requests over the scheduler's two lanes (one stage + one): 7 sequences in a batch at least.
    assert!(recorder.max_seqs.load(Ordering::SeqCst) >= 7);
    assert!(recorder.mixed.load(Ordering::SeqCst) > 0);
    // Twice in a row: no state leaks from one round into the next.
    let again = run_together(&handle, &reqs).await;
    assert_same(&alone, &again);
    assert!(alone.iter().any(|o| o.tokens.len() > 5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smollm2_batched_requests_match_solo_runs() {
    let Some(path) = cached_model("SmolLM2-135M-Instruct.Q4_1.gguf") else {
        return;
    };
    let tok = tokenizer(&path);
    let texts = [
        "The capital of France is",
        "Once upon a time, in a land far away,",
        "def fibonacci(n):",
        "The three primary colors are",
        "Water boils at",
        "My favourite recipe for pancakes starts with",
        "In 1969, the first humans",
        "The quick brown fox",
        "Translate to French: good morning",
        "A haiku about the sea:",
        "List three prime numbers:",
        "The mitochondria is",
        "SELECT * FROM users WHERE",
        "Dear hiring manager,",
        "The best way to learn a language is",
        "2 + 2 =",
    ];
    let prompts = texts
        .iter()
        .map(|t| tok.encode(t, true, false).unwrap())
        .collect();
    let reqs = varied_requests(prompts, |i| 16 + i);
    let engine = engine(
        &path,
        EngineOptions {
            max_batch_tokens: 256,
            max_logits: 32,
            ..tessera_worker::EngineOptions::default()
        },
    );
    let pipeline = Arc::new(LocalPipeline::new(Sequences::new(engine, 512, None)).unwrap());
    let recorder = Recorder::new(pipeline);
    let config = SchedulerConfig {
        max_running: 32,
        prefill_chunk: 8,
        ..SchedulerConfig::default()
    };
    let handle = Scheduler::start(recorder.clone(), tok, config);
    let alone = run_alone(&handle, &reqs).await;
    let together = run_together(&handle, &reqs).await;
    assert_same(&alone, &together);
    // 16 requests over the scheduler's two lanes: half of them in one batch at least.
    assert!(recorder.max_seqs.load(Ordering::SeqCst) >= 8);
    assert!(recorder.mixed.load(Ordering::SeqCst) > 0);
}

/// The scheduler ends a request exactly as single-sequence generation (`tessera run`) does: same tokens,
/// same text, same finish reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduler_matches_single_sequence_generate() {
    let tok = tokenizer(&tiny_path());
    let mut reqs = varied_requests(tiny_prompts(&tok, 6), |i| 8 + 5 * i);
    // A stop string and a request that runs into the context.
    reqs[1].params.stop = vec!["e".into(), "zz".into()];
    reqs[2].params.max_tokens = None;
    let chunk = 16;
    let handle = Scheduler::start(
        tiny_pipeline(None),
        tok.clone(),
        SchedulerConfig {
            prefill_chunk: chunk,
            ..tiny_config()
        },
    );
    let together = run_together(&handle, &reqs).await;
    let mut engine = engine(
        &tiny_path(),
        EngineOptions {
            max_batch_tokens: chunk,
            max_logits: 1,
            ..tessera_worker::EngineOptions::default()
        },
    );
    for (i, (req, got)) in reqs.iter().zip(&together).enumerate() {
        let context = req
            .params
            .max_tokens
            .map_or(TINY_CONTEXT, |m| (req.prompt.len() + m).min(TINY_CONTEXT));
        let mut cache = engine.new_cache(context, None).unwrap();
        let want = generate(
            &mut engine,
            &mut cache,
            &tok,
            &req.prompt,
            &req.params,
            |_| {},
        )
        .unwrap();
        assert_eq!(got.ids(), want.tokens, "request {i}: tokens");
        assert_eq!(got.text(), want.text, "request {i}: text");
        let End::Done { finish, usage, .. } = &got.end else {
            panic!("request {i} failed: {got:?}");
        };
        assert_eq!(*finish, want.finish, "request {i}: finish reason");
        assert_eq!(
            *usage,
            Usage {
                prompt_tokens: req.prompt.len(),
                completion_tokens: want.tokens.len(),
                cached_tokens: 0,
            }
        );
    }
    let End::Done { finish, .. } = &together[2].end else {
        unreachable!()
    };
    assert_eq!(*finish, FinishReason::Length);
}

/// Prompt log-probabilities over a prompt of several chunks (and more tokens than one batch's logits rows),
/// next to ordinary requests: each prompt token's entry is the log-softmax of the engine's row at the token
/// before it (the whole prompt in one batch with `Logits::All`), with its alternatives; the generated tokens
/// are those of the same request without prompt log-probabilities.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompt_logprobs_are_the_engine_rows() {
    let tok = tokenizer(&tiny_path());
    let prompt: Vec<u32> = tiny_prompts(&tok, 8).concat()[..40].to_vec();
    let params = SamplingParams {
        max_tokens: Some(4),
        prompt_logprobs: Some(3),
        ..SamplingParams::greedy()
    };
    let scored = GenRequest {
        prompt: prompt.clone(),
        params: params.clone(),
    };
    let plain = GenRequest {
        prompt: prompt.clone(),
        params: SamplingParams {
            prompt_logprobs: None,
            ..params
        },
    };
    let mut reqs = varied_requests(tiny_prompts(&tok, 3), |i| 6 + i);
    reqs.extend([scored, plain]);
    let handle = Scheduler::start(tiny_pipeline(None), tok.clone(), tiny_config());
    let out = run_together(&handle, &reqs).await;
    let (scored, plain) = (&out[3], &out[4]);
    assert_eq!(scored.ids(), plain.ids());
    assert_eq!(plain.prompt, None);
    let entries = scored.prompt.as_ref().expect("prompt log-probabilities");
    assert_eq!(entries.len(), prompt.len());
    assert_eq!(entries[0].id, prompt[0]);
    assert_eq!(
        (entries[0].logprob, entries[0].top_logprobs.len()),
        (None, 0)
    );

    let mut engine = engine(
        &tiny_path(),
        EngineOptions {
            max_batch_tokens: 64,
            max_logits: 64,
            ..EngineOptions::default()
        },
    );
    let n_vocab = engine.config.n_vocab;
    let mut cache = engine.new_cache(prompt.len(), None).unwrap();
    let mut batch = tessera_worker::Batch::new();
    batch.push_tokens(0, &prompt, tessera_worker::Logits::All);
    let rows = engine
        .forward(&batch, &mut [&mut cache])
        .unwrap()
        .logits()
        .unwrap()
        .to_vec();
    for (i, e) in entries.iter().enumerate().skip(1) {
        let row = &rows[(i - 1) * n_vocab..i * n_vocab];
        let (want, top) = tessera::sampling::token_logprobs(row, prompt[i], 3).unwrap();
        assert_eq!(e.id, prompt[i], "entry {i}");
        let got = e.logprob.unwrap();
        assert!((got - want).abs() <= 1e-5, "entry {i}: {got} vs {want}");
        assert_eq!(e.top_logprobs.len(), 3, "entry {i}");
        for (&(id, lp), &(want_id, want_lp)) in e.top_logprobs.iter().zip(&top) {
            assert_eq!(id, want_id, "entry {i}");
            assert!((lp - want_lp).abs() <= 1e-5, "entry {i}: {lp} vs {want_lp}");
        }
    }
}

/// Bans every end-of-generation token, so a request runs to `max_tokens`.
fn no_eog(tok: &Tokenizer, params: SamplingParams) -> SamplingParams {
    SamplingParams {
        logit_bias: tok.eos_ids().iter().map(|&id| (id, -100.0)).collect(),
        ..params
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_tokens_ends_with_length_after_exactly_n_tokens() {
    let tok = tokenizer(&tiny_path());
    let handle = Scheduler::start(tiny_pipeline(None), tok.clone(), tiny_config());
    for (n, temperature) in [(1, 0.0), (7, 0.0), (23, 1.0)] {
        let prompt = tok.encode("Hello, world!", true, false).unwrap();
        let params = no_eog(
            &tok,
            SamplingParams {
                temperature,
                seed: Some(7),
                max_tokens: Some(n),
                ..SamplingParams::default()
            },
        );
        let out = collect(
            handle
                .submit(GenRequest {
                    prompt: prompt.clone(),
                    params,
                })
                .unwrap(),
        )
        .await;
        assert_eq!(out.tokens.len(), n, "{out:?}");
        match out.end {
            End::Done { finish, usage, .. } => {
                assert_eq!(finish, FinishReason::Length);
                assert_eq!(
                    usage,
                    Usage {
                        prompt_tokens: prompt.len(),
                        completion_tokens: n,
                        cached_tokens: 0,
                    }
                );
            }
            End::Error(e) => panic!("{e}"),
        }
    }
    // No max_tokens: the context ends it, prompt + completion = max_context.
    let prompt = tok.encode("Hello, world!", true, false).unwrap();
    let out = collect(
        handle
            .submit(GenRequest {
                prompt: prompt.clone(),
                params: no_eog(&tok, SamplingParams::greedy()),
            })
            .unwrap(),
    )
    .await;
    assert_eq!(prompt.len() + out.tokens.len(), TINY_CONTEXT);
    assert!(matches!(
        out.end,
        End::Done {
            finish: FinishReason::Length,
            ..
        }
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_string_ends_generation_before_it() {
    let tok = tokenizer(&tiny_path());
    let handle = Scheduler::start(tiny_pipeline(None), tok.clone(), tiny_config());
    let prompt = tok.encode("The capital of France is", true, false).unwrap();
    let params = no_eog(
        &tok,
        SamplingParams {
            max_tokens: Some(40),
            ..SamplingParams::greedy()
        },
    );
    let free = collect(
        handle
            .submit(GenRequest {
                prompt: prompt.clone(),
                params: params.clone(),
            })
            .unwrap(),
    )
    .await;
    let text = free.text();
    // A stop string from the middle of the free-running output, spanning several tokens.
    let chars: Vec<char> = text.chars().collect();
    assert!(chars.len() >= 12, "too little text to cut: {text:?}");
    let stop: String = chars[8..11].iter().collect();
    let cut = &text[..text.find(&stop).unwrap()];
    let out = collect(
        handle
            .submit(GenRequest {
                prompt,
                params: SamplingParams {
                    stop: vec![stop.clone()],
                    ..params
                },
            })
            .unwrap(),
    )
    .await;
    assert_eq!(out.text(), cut, "stop {stop:?} in {text:?}");
    assert!(matches!(
        out.end,
        End::Done {
            finish: FinishReason::Stop,
            ..
        }
    ));
    assert!(out.tokens.len() < free.tokens.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_invalid_arguments_naming_the_field() {
    let tok = tokenizer(&tiny_path());
    let handle = Scheduler::start(tiny_pipeline(None), tok.clone(), tiny_config());
    let submit = |prompt: Vec<u32>, params: SamplingParams| match handle
        .submit(GenRequest { prompt, params })
    {
        Err(ServeError::InvalidArgument { field, message }) => (field, message),
        other => panic!("expected InvalidArgument, got {other:?}"),
    };
    let (field, message) = submit(vec![1; TINY_CONTEXT], SamplingParams::default());
    assert_eq!(field, "prompt");
    assert!(
        message.contains(&TINY_CONTEXT.to_string()) && message.contains("127"),
        "{message}"
    );
    // One token less leaves room for one generated token.
    assert!(
        handle
            .submit(GenRequest {
                prompt: vec![1; TINY_CONTEXT - 1],
                params: SamplingParams::default()
            })
            .is_ok()
    );
    assert_eq!(submit(vec![], SamplingParams::default()).0, "prompt");
    let (field, message) = submit(vec![1, 288], SamplingParams::default());
    assert_eq!(field, "prompt");
    assert!(message.contains("288"), "{message}");
    let cases = [
        (
            SamplingParams {
                temperature: 3.0,
                ..Default::default()
            },
            "temperature",
        ),
        (
            SamplingParams {
                top_p: 0.0,
                ..Default::default()
            },
            "top_p",
        ),
        (
            SamplingParams {
                max_tokens: Some(0),
                ..Default::default()
            },
            "max_tokens",
        ),
        (
            SamplingParams {
                logit_bias: vec![(9999, 1.0)],
                ..Default::default()
            },
            "logit_bias",
        ),
        (
            SamplingParams {
                stop: vec![String::new()],
                ..Default::default()
            },
            "stop",
        ),
        (
            SamplingParams {
                logprobs: Some(50),
                ..Default::default()
            },
            "logprobs",
        ),
    ];
    for (params, want) in cases {
        let (field, message) = submit(vec![1, 2], params);
        assert_eq!(field, want, "{message}");
    }
}

/// Wraps a pipeline: each `forward` takes a permit (none at first) and is counted.
struct Metered {
    inner: Arc<LocalPipeline>,
    permits: tokio::sync::Semaphore,
    calls: AtomicUsize,
}

impl Metered {
    fn new(inner: Arc<LocalPipeline>) -> Arc<Metered> {
        Arc::new(Metered {
            inner,
            permits: tokio::sync::Semaphore::new(0),
            calls: AtomicUsize::new(0),
        })
    }
}

impl Pipeline for Metered {
    fn info(&self) -> PipelineInfo {
        self.inner.info()
    }

    fn forward<'a>(
        &'a self,
        batch: &'a StepBatch,
    ) -> BoxFuture<'a, Result<BatchLogits, PipelineError>> {
        async move {
            self.permits.acquire().await.unwrap().forget();
            self.calls.fetch_add(1, Ordering::SeqCst);
            self.inner.forward(batch).await
        }
        .boxed()
    }

    fn release<'a>(&'a self, seq_ids: &'a [u64]) -> BoxFuture<'a, ()> {
        self.inner.release(seq_ids)
    }

    fn health(&self) -> BoxFuture<'_, Result<(), PipelineError>> {
        self.inner.health()
    }
}

async fn wait_until(what: &str, mut cond: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting: {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_is_overloaded() {
    let tok = tokenizer(&tiny_path());
    let pipeline = Metered::new(tiny_pipeline(None));
    let config = SchedulerConfig {
        max_running: 1,
        max_queued: 2,
        ..tiny_config()
    };
    let handle = Scheduler::start(pipeline.clone(), tok.clone(), config);
    let req = GenRequest {
        prompt: tok.encode("Hello", true, false).unwrap(),
        params: SamplingParams {
            max_tokens: Some(3),
            ..SamplingParams::greedy()
        },
    };
    let first = handle.submit(req.clone()).unwrap();
    wait_until("the first request runs", async || {
        handle.stats().running == 1
    })
    .await;
    let queued = [
        handle.submit(req.clone()).unwrap(),
        handle.submit(req.clone()).unwrap(),
    ];
    let stats = handle.stats();
    assert_eq!((stats.running, stats.queued), (1, 2));
    match handle.submit(req.clone()) {
        Err(e @ ServeError::Overloaded(_)) => {
            assert!(e.is_retryable());
            assert!(e.to_string().contains("max_queued"), "{e}");
        }
        other => panic!("expected Overloaded, got {other:?}"),
    }
    pipeline.permits.add_permits(1000);
    let want = collect(first).await;
    assert!(want.error().is_none(), "{want:?}");
    for rx in queued {
        assert_eq!(collect(rx).await, want);
    }
    let stats = handle.stats();
    assert_eq!((stats.running, stats.queued), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_receiver_cancels_and_releases_the_sequence() {
    let tok = tokenizer(&tiny_path());
    let inner = tiny_pipeline(None);
    let pipeline = Metered::new(inner.clone());
    let handle = Scheduler::start(pipeline.clone(), tok.clone(), tiny_config());
    // Without end-of-generation tokens or max_tokens, each would run ~120 steps to fill its context.
    let req = GenRequest {
        prompt: tok.encode("Hello, world!", true, false).unwrap(),
        params: no_eog(&tok, SamplingParams::greedy()),
    };
    let mut rxs: Vec<_> = (0..3)
        .map(|_| handle.submit(req.clone()).unwrap())
        .collect();
    // One forward call at a time until every request has two tokens: how the requests spread over the
    // scheduler's lanes does not matter.
    let mut got = [0usize; 3];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while got.iter().any(|&n| n < 2) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no progress: {got:?}"
        );
        if pipeline.permits.available_permits() == 0 {
            pipeline.permits.add_permits(1);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        for (rx, n) in rxs.iter_mut().zip(&mut got) {
            while let Ok(ev) = rx.try_recv() {
                assert!(matches!(ev, GenEvent::Token(_)));
                *n += 1;
            }
        }
    }
    let calls = pipeline.calls.load(Ordering::SeqCst);
    assert_eq!(inner.stats().await.unwrap().sequences, 3);
    drop(rxs);
    pipeline.permits.add_permits(1000);
    wait_until("the cancelled sequences are released", async || {
        inner.stats().await.unwrap().sequences == 0 && handle.stats().running == 0
    })
    .await;
    assert_eq!(inner.stats().await.unwrap().kv_bytes, 0);
    // At most one more call per lane: the one each lane had already sent when the receivers went away.
    let lanes = handle.stats().lanes;
    assert!(pipeline.calls.load(Ordering::SeqCst) <= calls + lanes);
    // The pipeline still serves.
    let out = collect(
        handle
            .submit(GenRequest {
                params: SamplingParams {
                    max_tokens: Some(4),
                    ..req.params.clone()
                },
                ..req.clone()
            })
            .unwrap(),
    )
    .await;
    assert_eq!(out.tokens.len(), 4);
    wait_until("the finished sequence is released", async || {
        inner.stats().await.unwrap().sequences == 0
    })
    .await;
}

/// Wraps a pipeline: forward calls for which `fail` says so return `Unavailable`.
struct Flaky {
    inner: Arc<dyn Pipeline>,
    calls: AtomicUsize,
    fail: fn(usize) -> bool,
}

impl Pipeline for Flaky {
    fn info(&self) -> PipelineInfo {
        self.inner.info()
    }

    fn forward<'a>(
        &'a self,
        batch: &'a StepBatch,
    ) -> BoxFuture<'a, Result<BatchLogits, PipelineError>> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        if (self.fail)(call) {
            return futures::future::ready(Err(PipelineError::Unavailable(
                "worker 127.0.0.1:1 is down (injected)".into(),
            )))
            .boxed();
        }
        self.inner.forward(batch)
    }

    fn release<'a>(&'a self, seq_ids: &'a [u64]) -> BoxFuture<'a, ()> {
        self.inner.release(seq_ids)
    }

    fn health(&self) -> BoxFuture<'_, Result<(), PipelineError>> {
        if (self.fail)(self.calls.load(Ordering::SeqCst)) {
            return futures::future::ready(Err(PipelineError::Unavailable(
                "down (injected)".into(),
            )))
            .boxed();
        }
        self.inner.health()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_pipeline_fails_every_request_without_hanging() {
    let tok = tokenizer(&tiny_path());
    let pipeline = Arc::new(Flaky {
        inner: tiny_pipeline(None),
        calls: AtomicUsize::new(0),
        fail: |_| true,
    });
    let handle = Scheduler::start(pipeline, tok.clone(), tiny_config());
    let reqs = varied_requests(tiny_prompts(&tok, 6), |_| 20);
    for out in run_together(&handle, &reqs).await {
        assert!(out.tokens.is_empty());
        match out.error() {
            Some(ServeError::Unavailable(m)) => assert!(m.contains("127.0.0.1:1"), "{m}"),
            other => panic!("expected Unavailable, got {other:?}"),
        }
    }
    assert!(matches!(
        handle.health().await,
        Err(ServeError::Unavailable(_))
    ));
    assert_eq!(handle.stats().running, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_mid_generation_fails_running_requests_and_later_ones_succeed() {
    let tok = tokenizer(&tiny_path());
    let inner = tiny_pipeline(None);
    let metered = Metered::new(inner.clone());
    let pipeline = Arc::new(Flaky {
        inner: metered.clone(),
        calls: AtomicUsize::new(0),
        fail: |call| call == 6,
    });
    let handle = Scheduler::start(pipeline, tok.clone(), tiny_config());
    let reqs: Vec<_> = varied_requests(tiny_prompts(&tok, 4), |_| 30)
        .into_iter()
        .map(|r| GenRequest {
            params: no_eog(&tok, r.params),
            ..r
        })
        .collect();
    // Every request is submitted before the first step runs, so all four are running at the failure.
    let rxs: Vec<_> = reqs
        .iter()
        .map(|r| handle.submit(r.clone()).unwrap())
        .collect();
    metered.permits.add_permits(10_000);
    for (i, out) in join_all(rxs.into_iter().map(collect))
        .await
        .into_iter()
        .enumerate()
    {
        assert!(
            matches!(out.error(), Some(ServeError::Unavailable(_))),
            "request {i}: {out:?}"
        );
        assert!(out.tokens.len() < 30);
    }
    // The failure freed everything; the pipeline serves new requests.
    let alone = run_alone(&handle, &reqs[..2]).await;
    for out in &alone {
        assert_eq!(out.tokens.len(), 30, "{out:?}");
    }
    wait_until("every sequence is released", async || {
        inner.stats().await.unwrap().sequences == 0 && handle.stats().running == 0
    })
    .await;
    assert_eq!(handle.health().await, Ok(()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_memory_exhaustion_overloads_only_new_requests() {
    let tok = tokenizer(&tiny_path());
    let prompt_len = 6;
    let max_tokens = 20;
    let one = engine(&tiny_path(), tiny_options())
        .new_cache(prompt_len + max_tokens, None)
        .unwrap()
        .bytes();
    // Room for two of the four sequences.
    let pipeline = tiny_pipeline(Some(2 * one + one / 2));
    let handle = Scheduler::start(pipeline.clone(), tok.clone(), tiny_config());
    let reqs: Vec<GenRequest> = (0..4u32)
        .map(|i| GenRequest {
            prompt: (0..prompt_len as u32).map(|k| 1 + i * 10 + k).collect(),
            params: no_eog(
                &tok,
                SamplingParams {
                    seed: Some(u64::from(i)),
                    max_tokens: Some(max_tokens),
                    ..SamplingParams::default()
                },
            ),
        })
        .collect();
    let outs = run_together(&handle, &reqs).await;
    let done: Vec<_> = outs.iter().filter(|o| o.error().is_none()).collect();
    let overloaded = outs
        .iter()
        .filter(|o| matches!(o.error(), Some(ServeError::Overloaded(_))))
        .count();
    assert_eq!((done.len(), overloaded), (2, 2), "{outs:?}");
    for o in done {
        assert_eq!(o.tokens.len(), max_tokens);
    }
    wait_until("every sequence is released", async || {
        pipeline.stats().await.unwrap().sequences == 0
    })
    .await;
    // Memory is free again: all four fit one after another.
    for out in run_alone(&handle, &reqs).await {
        assert_eq!(out.tokens.len(), max_tokens, "{out:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_runs_the_model_and_info_reports_limits() {
    let tok = tokenizer(&tiny_path());
    let pipeline = tiny_pipeline(None);
    let handle = Scheduler::start(pipeline.clone(), tok, tiny_config());
    assert_eq!(handle.health().await, Ok(()));
    assert_eq!(pipeline.stats().await.unwrap().sequences, 0);
    let info = handle.info();
    assert_eq!(
        info,
        PipelineInfo {
            max_batch_tokens: 64,
            max_logits: 16,
            max_context: TINY_CONTEXT,
            n_vocab: 288,
            n_stages: 1,
            tp: 1,
        }
    );
    // The engine on this process's CPU: one lane (`Pipeline::micro_batches`).
    let stats = handle.stats();
    assert_eq!(
        (stats.lanes, stats.max_running, stats.max_queued),
        (1, 16, 64)
    );
}

#[test]
fn local_pipeline_open_serves_a_checkpoint() {
    let (pipeline, model) = LocalPipeline::open(&[tiny_path()], 1, 64, tiny_options()).unwrap();
    assert_eq!(model.id, "tiny_llama");
    assert_eq!((model.max_context, model.tp, model.pp), (64, 1, 1));
    assert_eq!(pipeline.info().max_context, 64);
    let open_err = |paths: &[PathBuf], threads| match LocalPipeline::open(
        paths,
        threads,
        64,
        tiny_options(),
    ) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("opened"),
    };
    let err = open_err(&[tiny_path()], 0);
    assert_eq!(err, "threads must be at least 1, got 0");
    let err = open_err(&[fixtures().join("missing.gguf")], 1);
    assert!(err.contains("missing.gguf"), "{err}");
}

/// Three turns of a conversation and a burst of prompts sharing a preamble, through a scheduler that keeps
/// finished sequences' prefixes and one that does not: every answer (tokens, log-probabilities, usage) is
/// identical, and the first reused what it should.
async fn check_prefix_reuse(path: &Path, options: EngineOptions, context: usize) {
    let tok = tokenizer(path);
    let pipeline = || -> Arc<LocalPipeline> {
        Arc::new(LocalPipeline::new(Sequences::new(engine(path, options), context, None)).unwrap())
    };
    let kept = Scheduler::start(
        pipeline(),
        tok.clone(),
        SchedulerConfig {
            prefix_cache_tokens: 4 * context,
            ..tiny_config()
        },
    );
    let fresh = Scheduler::start(pipeline(), tok.clone(), tiny_config());
    let req = |prompt: Vec<u32>, seed: u64| GenRequest {
        prompt,
        params: no_eog(
            &tok,
            SamplingParams {
                temperature: 0.8,
                seed: Some(seed),
                max_tokens: Some(8),
                logprobs: Some(2),
                ..SamplingParams::default()
            },
        ),
    };
    // The answer with kept prefixes, and how many prompt tokens its usage says came from them.
    let both = async |r: GenRequest| -> (Output, usize) {
        let (a, cached) = collect(kept.submit(r.clone()).unwrap()).await.take_cached();
        let (b, none) = collect(fresh.submit(r).unwrap()).await.take_cached();
        assert!(a.error().is_none(), "{a:?}");
        assert_eq!(none, 0);
        assert_eq!(a, b, "kept prefixes changed an answer");
        (a, cached)
    };
    let cut = |mut v: Vec<u32>, n: usize| {
        v.truncate(n);
        v
    };
    let turn1 = cut(tiny_prompts(&tok, 8).concat(), context / 4);
    let (first, cached) = both(req(turn1.clone(), 1)).await;
    assert_eq!((cached, kept.stats().prefix_reused_tokens), (0, 0));
    // The next turn: the whole first exchange, then more. Its cache holds all but the last token generated.
    let mut turn2 = turn1.clone();
    turn2.extend(first.ids());
    turn2.extend(cut(tiny_prompts(&tok, 2).concat(), 10));
    let (_, cached) = both(req(turn2, 2)).await;
    let reused = turn1.len() + 7;
    assert_eq!(cached, reused);
    assert_eq!(kept.stats().prefix_reused_tokens, reused as u64);
    // The first turn again (a regenerate): all but its last prompt token come from the cache.
    let (_, cached) = both(req(turn1.clone(), 3)).await;
    assert_eq!(cached, turn1.len() - 1);
    let reused = reused + turn1.len() - 1;
    assert_eq!(kept.stats().prefix_reused_tokens, reused as u64);
    // Several at once sharing a preamble, some of them copying from the same kept sequence.
    let burst: Vec<GenRequest> = tiny_prompts(&tok, 5)
        .into_iter()
        .enumerate()
        .map(|(i, tail)| req([turn1.clone(), cut(tail, 10)].concat(), 10 + i as u64))
        .collect();
    let together = run_together(&kept, &burst).await;
    let alone = run_alone(&fresh, &burst).await;
    let (together, cached): (Vec<Output>, Vec<usize>) =
        together.into_iter().map(Output::take_cached).unzip();
    assert_eq!(together, alone, "kept prefixes changed a concurrent answer");
    assert!(cached.iter().all(|&c| c >= turn1.len()), "{cached:?}");
    let burst_reused = kept.stats().prefix_reused_tokens - reused as u64;
    assert_eq!(cached.iter().sum::<usize>() as u64, burst_reused);
    assert!(kept.stats().prefixes_kept >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reused_prompt_prefixes_answer_as_fresh_runs() {
    check_prefix_reuse(&tiny_path(), tiny_options(), TINY_CONTEXT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smollm2_reused_prompt_prefixes_answer_as_fresh_runs() {
    let Some(path) = cached_model("SmolLM2-135M-Instruct.Q4_1.gguf") else {
        return;
    };
    check_prefix_reuse(&path, tiny_options(), 512).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_prefixes_give_way_to_new_requests() {
    let tok = tokenizer(&tiny_path());
    let (prompt_len, max_tokens) = (6, 10);
    let one = engine(&tiny_path(), tiny_options())
        .new_cache(prompt_len + max_tokens, None)
        .unwrap()
        .bytes();
    // Room for one sequence: each request finds the previous one kept, and must have its memory.
    let pipeline = tiny_pipeline(Some(one + one / 2));
    let config = SchedulerConfig {
        prefix_cache_tokens: 1024,
        ..tiny_config()
    };
    let handle = Scheduler::start(pipeline.clone(), tok.clone(), config);
    for i in 0..3u32 {
        let req = GenRequest {
            prompt: (0..prompt_len as u32).map(|k| 1 + i * 10 + k).collect(),
            params: no_eog(
                &tok,
                SamplingParams {
                    max_tokens: Some(max_tokens),
                    ..SamplingParams::default()
                },
            ),
        };
        let out = collect(handle.submit(req).unwrap()).await;
        assert_eq!(out.tokens.len(), max_tokens, "request {i}: {out:?}");
        assert_eq!(handle.stats().prefixes_kept, 1, "request {i}");
    }
    wait_until("the evicted sequences are released", async || {
        pipeline.stats().await.unwrap().sequences == 1
    })
    .await;
}
