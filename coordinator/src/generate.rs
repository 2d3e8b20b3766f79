//! Single-sequence generation on a local engine: prefill the prompt in chunks, then sample, decode and
//! stream text until end of generation, `max_tokens`, a stop string or a full context. This is what
//! `tessera run` does; the cluster's scheduler drives the same engine with batches of many sequences.

use std::time::{Duration, Instant};

use tessera_worker::{Batch, Engine, KvCache, Logits};
use thiserror::Error;

use crate::sampling::{Sampler, SamplingError, SamplingParams, StopMatcher};
use crate::tokenizer::Tokenizer;

#[derive(Debug, Error)]
pub enum GenerateError {
    #[error(transparent)]
    Engine(#[from] tessera_worker::Error),
    #[error(transparent)]
    Sampling(#[from] SamplingError),
    #[error(
        "the prompt has {prompt} tokens but the context holds {ctx}: pass a larger --ctx or a shorter prompt"
    )]
    PromptTooLong { prompt: usize, ctx: usize },
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error(
        "the engine is not the last pipeline stage or does not hold the whole vocabulary; single-process generation needs tp=1, pp=1"
    )]
    NotWholeModel,
}

/// Why generation ended (OpenAI's `finish_reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-generation token or a stop string.
    Stop,
    /// `max_tokens` reached or the context is full.
    Length,
}

#[derive(Debug, Clone)]
pub struct Generation {
    /// Generated token ids (without the end-of-generation token).
    pub tokens: Vec<u32>,
    pub text: String,
    pub finish: FinishReason,
    pub prompt_tokens: usize,
    pub prefill_time: Duration,
    pub decode_time: Duration,
}

/// Generates a continuation of `prompt` with `engine` (one stage, one rank) and a fresh `cache`, calling
/// `on_text` with each piece of text as soon as it is final.
pub fn generate(
    engine: &mut Engine<'_>,
    cache: &mut KvCache,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    params: &SamplingParams,
    mut on_text: impl FnMut(&str),
) -> Result<Generation, GenerateError> {
    if prompt.is_empty() {
        return Err(GenerateError::EmptyPrompt);
    }
    if engine.vocab_rows() != (0..engine.config.n_vocab) || !engine.weights.is_last {
        return Err(GenerateError::NotWholeModel);
    }
    let ctx = cache.ctx();
    if prompt.len() >= ctx {
        return Err(GenerateError::PromptTooLong {
            prompt: prompt.len(),
            ctx,
        });
    }
    let mut sampler = Sampler::new(params.clone(), engine.config.n_vocab)?;
    sampler.observe(prompt);
    let mut stops = StopMatcher::new(&params.stop);
    let mut decoder = tokenizer.stream_decoder(true);
    let chunk = engine.options().max_batch_tokens;
    let mut batch = Batch::with_capacity(chunk, 0, 1);

    let started = Instant::now();
    let mut pos = 0;
    let mut next = 0;
    for piece in prompt.chunks(chunk) {
        batch.clear();
        let last = pos + piece.len() == prompt.len();
        batch.push_tokens(pos, piece, if last { Logits::Last } else { Logits::None });
        let out = engine.forward(&batch, &mut [&mut *cache])?;
        if last {
            let logits = out.logits().ok_or(GenerateError::NotWholeModel)?;
            next = sampler.sample(logits)?.id;
        }
        pos += piece.len();
    }
    let prefill_time = started.elapsed();

    let decode_started = Instant::now();
    let mut tokens = Vec::new();
    let mut text = String::new();
    let max_tokens = params.max_tokens.unwrap_or(usize::MAX);
    let finish = loop {
        if tokenizer.is_eog(next) {
            break FinishReason::Stop;
        }
        tokens.push(next);
        let out = stops.push(&decoder.push(tokenizer, next));
        on_text(&out.text);
        text.push_str(&out.text);
        if out.stopped.is_some() {
            break FinishReason::Stop;
        }
        if tokens.len() >= max_tokens || pos + 1 >= ctx {
            break FinishReason::Length;
        }
        batch.clear();
        batch.push_tokens(pos, &[next], Logits::Last);
        let out = engine.forward(&batch, &mut [&mut *cache])?;
        let logits = out.logits().ok_or(GenerateError::NotWholeModel)?;
        next = sampler.sample(logits)?.id;
        pos += 1;
    };
    if stops.stopped().is_none() {
        let tail = decoder.finish();
        let out = stops.push(&tail);
        let rest = format!(
            "{}{}",
            out.text,
            if out.stopped.is_none() {
                stops.finish()
            } else {
                String::new()
            }
        );
        on_text(&rest);
        text.push_str(&rest);
    }
    Ok(Generation {
        tokens,
        text,
        finish,
        prompt_tokens: prompt.len(),
        prefill_time,
        decode_time: decode_started.elapsed(),
    })
}
