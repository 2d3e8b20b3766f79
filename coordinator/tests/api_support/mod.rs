//! Shared by the API tests: the tiny fixture model as a `ServedModel`, and `FakeBackend`, a scheduler double
//! that "generates" a scripted text through the real sampler / stop-string / detokenizer path
//! (`DecodeState`), so the front ends see the same event sequences as from the real scheduler, and can be
//! told to fail in each way the real one can.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use shard_tool::checkpoint::Checkpoint;
use tessera::api::{AppState, Backend};
use tessera::chat::ChatTemplate;
use tessera::generate::DecodeState;
use tessera::serve::{
    GenEvent, GenReceiver, GenRequest, PipelineInfo, ServeError, ServedModel, TokenEvent, Usage,
};
use tessera::tokenizer::Tokenizer;
use tokio::sync::mpsc;

/// What the fake generates (greedy decoding reproduces it; stop strings and max_tokens cut it).
pub const SCRIPT: &str = " The quick brown fox jumps over the lazy dog.";
/// Context of the fake model.
pub const MAX_CONTEXT: usize = 128;

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/gguf")
        .join(name)
}

/// The tiny Llama fixture as a served model named "tiny-llama" with a context of `max_context`.
pub fn tiny_model(max_context: usize) -> Arc<ServedModel> {
    let ckpt = Checkpoint::open(&[fixture("tiny_llama.gguf")]).unwrap();
    let tokenizer = Arc::new(Tokenizer::from_checkpoint(&ckpt).unwrap());
    let template = ChatTemplate::for_model(ckpt.chat_template.as_deref(), &tokenizer).unwrap();
    Arc::new(ServedModel {
        id: "tiny-llama".into(),
        tokenizer,
        template,
        config: ckpt.config.clone(),
        max_context,
        tp: 1,
        pp: 1,
    })
}

/// How the fake behaves.
#[derive(Default)]
pub struct FakeConfig {
    /// `submit` fails with this (after `submits_before_error` submits since the last `take_requests`).
    pub submit_error: Option<ServeError>,
    pub submits_before_error: usize,
    /// After this many tokens the request fails with the error.
    pub fail_after: Option<(usize, ServeError)>,
    /// `health` answers this (`None`: Ok).
    pub health_error: Option<ServeError>,
    /// Pause between tokens.
    pub token_delay: Duration,
    /// Prompt tokens each request reports as copied from a kept prefix (at most the prompt's).
    pub cached_tokens: usize,
}

pub struct FakeBackend {
    pub model: Arc<ServedModel>,
    pub config: Mutex<FakeConfig>,
    /// The last request submitted.
    pub last: Mutex<Option<GenRequest>>,
    /// Every request submitted, in order.
    pub all: Mutex<Vec<GenRequest>>,
    /// Requests whose receiver was dropped before they finished.
    pub cancelled: Arc<AtomicUsize>,
    /// Requests that ran to the end.
    pub finished: Arc<AtomicUsize>,
    pub health_calls: AtomicUsize,
    pub unhealthy: AtomicBool,
}

impl FakeBackend {
    pub fn new(model: Arc<ServedModel>) -> Arc<FakeBackend> {
        Arc::new(FakeBackend {
            model,
            config: Mutex::new(FakeConfig::default()),
            last: Mutex::new(None),
            all: Mutex::new(Vec::new()),
            cancelled: Arc::new(AtomicUsize::new(0)),
            finished: Arc::new(AtomicUsize::new(0)),
            health_calls: AtomicUsize::new(0),
            unhealthy: AtomicBool::new(false),
        })
    }

    pub fn last_request(&self) -> GenRequest {
        self.last
            .lock()
            .unwrap()
            .clone()
            .expect("a request was submitted")
    }

    /// The requests submitted since the last call (all of them the first time).
    pub fn take_requests(&self) -> Vec<GenRequest> {
        std::mem::take(&mut *self.all.lock().unwrap())
    }

    /// The scripted token ids, then end of generation.
    pub fn script(&self) -> Vec<u32> {
        let tok = &self.model.tokenizer;
        let mut ids = tok.encode(SCRIPT, false, false).unwrap();
        ids.push(tok.eos().unwrap());
        ids
    }
}

/// An [`AppState`] serving the tiny model through `fake`, with the process's metrics recorder.
pub fn state(fake: &Arc<FakeBackend>) -> Arc<AppState> {
    Arc::new(AppState::with_backend(
        fake.model.clone(),
        fake.clone(),
        Some(tessera::api::metrics::install()),
    ))
}

impl Backend for FakeBackend {
    fn submit(&self, req: GenRequest) -> Result<GenReceiver, ServeError> {
        *self.last.lock().unwrap() = Some(req.clone());
        let earlier = {
            let mut all = self.all.lock().unwrap();
            all.push(req.clone());
            all.len() - 1
        };
        let config = self.config.lock().unwrap();
        if let Some(e) = &config.submit_error
            && earlier >= config.submits_before_error
        {
            return Err(e.clone());
        }
        let n_vocab = self.model.config.n_vocab;
        if req.prompt.is_empty() || req.prompt.len() >= self.model.max_context {
            return Err(ServeError::invalid("prompt", "the prompt does not fit"));
        }
        let mut state = DecodeState::new(&req.params, n_vocab, &req.prompt, self.model.max_context)
            .map_err(tessera::serve::scheduler::sampling_error)?;
        let script = self.script();
        let fail_after = config.fail_after.clone();
        let delay = config.token_delay;
        let tokenizer = self.model.tokenizer.clone();
        let (cancelled, finished) = (self.cancelled.clone(), self.finished.clone());
        let prompt_tokens = req.prompt.len();
        let cached_tokens = config.cached_tokens.min(prompt_tokens);
        let want_logprobs = req.params.logprobs.is_some();
        // Prompt log-probabilities: token i scores -i/10, its alternatives are the token itself and token 0.
        let prompt_event = req.params.prompt_logprobs.map(|k| {
            let entries = req
                .prompt
                .iter()
                .enumerate()
                .map(|(i, &id)| {
                    let lp = -(i as f32) / 10.0;
                    TokenEvent {
                        id,
                        text: String::new(),
                        logprob: (i > 0).then_some(lp),
                        top_logprobs: if i > 0 {
                            [(id, lp), (0, -20.0)].into_iter().take(k).collect()
                        } else {
                            Vec::new()
                        },
                    }
                })
                .collect();
            GenEvent::Prompt(entries)
        });
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            if let Some(ev) = prompt_event
                && tx.send(ev).await.is_err()
            {
                return;
            }
            let mut step = 0;
            loop {
                if let Some((n, e)) = &fail_after
                    && step == *n
                {
                    let _ = tx.send(GenEvent::Error(e.clone())).await;
                    return;
                }
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                let mut logits = vec![0.0f32; n_vocab];
                logits[script[step.min(script.len() - 1)] as usize] = 8.0;
                let sampled = state.sample(&logits).unwrap();
                let accepted = state.accept(&tokenizer, sampled.id);
                step += 1;
                if accepted.is_token {
                    let ev = GenEvent::Token(TokenEvent {
                        id: sampled.id,
                        text: accepted.text,
                        logprob: want_logprobs.then_some(sampled.logprob),
                        top_logprobs: sampled.top_logprobs,
                    });
                    if tx.send(ev).await.is_err() {
                        cancelled.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                }
                if let Some(finish) = accepted.finish {
                    let usage = Usage {
                        prompt_tokens,
                        completion_tokens: state.generated(),
                        cached_tokens,
                    };
                    let text = state.finish();
                    if tx
                        .send(GenEvent::Done {
                            finish,
                            usage,
                            text,
                        })
                        .await
                        .is_err()
                    {
                        cancelled.fetch_add(1, Ordering::SeqCst);
                    } else {
                        finished.fetch_add(1, Ordering::SeqCst);
                    }
                    return;
                }
            }
        });
        Ok(rx)
    }

    fn info(&self) -> PipelineInfo {
        PipelineInfo {
            max_batch_tokens: 64,
            max_logits: 8,
            max_context: self.model.max_context,
            n_vocab: self.model.config.n_vocab,
            n_stages: 1,
            tp: 1,
        }
    }

    fn health(&self) -> BoxFuture<'_, Result<(), ServeError>> {
        self.health_calls.fetch_add(1, Ordering::SeqCst);
        let r = match &self.config.lock().unwrap().health_error {
            Some(e) => Err(e.clone()),
            None if self.unhealthy.load(Ordering::SeqCst) => {
                Err(ServeError::Unavailable("marked unhealthy".into()))
            }
            None => Ok(()),
        };
        Box::pin(async move { r })
    }
}
