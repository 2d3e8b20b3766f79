//! Single-sequence generation on a local engine: prefill the prompt in chunks, then sample, decode and
//! stream text until end of generation, `max_tokens`, a stop string or a full context. This is what
//! `tessera run` does; the cluster's scheduler drives the same engine with batches of many sequences.

use std::time::{Duration, Instant};

use tessera_worker::{Batch, Engine, KvCache, Logits};
use thiserror::Error;

use crate::sampling::{
    SampledToken, Sampler, SamplingError, SamplingParams, StopMatcher, TopLogits,
};
use crate::tokenizer::{StreamDecoder, Tokenizer};

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
    let mut state = DecodeState::new(params, engine.config.n_vocab, prompt, ctx)?;
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
            next = state.sample(logits)?.id;
        }
        pos += piece.len();
    }
    let prefill_time = started.elapsed();

    let decode_started = Instant::now();
    let mut tokens = Vec::new();
    let mut text = String::new();
    let finish = loop {
        let step = state.accept(tokenizer, next);
        if step.is_token {
            tokens.push(next);
            on_text(&step.text);
            text.push_str(&step.text);
        }
        if let Some(finish) = step.finish {
            break finish;
        }
        batch.clear();
        batch.push_tokens(pos, &[next], Logits::Last);
        let out = engine.forward(&batch, &mut [&mut *cache])?;
        let logits = out.logits().ok_or(GenerateError::NotWholeModel)?;
        next = state.sample(logits)?.id;
        pos += 1;
    };
    let rest = state.finish();
    on_text(&rest);
    text.push_str(&rest);
    Ok(Generation {
        tokens,
        text,
        finish,
        prompt_tokens: prompt.len(),
        prefill_time,
        decode_time: decode_started.elapsed(),
    })
}

/// One sequence's way from logits to text: its sampler (seeded, with the penalties' counts), end-of-generation
/// tokens, stop strings, the streaming detokenizer, `max_tokens` and the context limit. [`generate`] and the
/// serving scheduler both drive sequences through it, so a request ends the same way (same tokens, same text,
/// same finish reason) whether it runs alone here or batched with others in a server.
#[derive(Debug, Clone)]
pub struct DecodeState {
    sampler: Sampler,
    stops: StopMatcher,
    decoder: StreamDecoder,
    prompt_len: usize,
    ctx: usize,
    max_tokens: usize,
    generated: usize,
}

/// What [`DecodeState::accept`] makes of one sampled token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// The token is part of the output; false for an end-of-generation token, which is never emitted.
    pub is_token: bool,
    /// Text that became final with this token (may be empty).
    pub text: String,
    /// `Some` when generation ends with this token; call [`DecodeState::finish`] for the held-back text.
    pub finish: Option<FinishReason>,
}

impl DecodeState {
    /// A sequence of `prompt` whose KV cache holds `ctx` positions, over `n_vocab` logits. Validates `params`.
    pub fn new(
        params: &SamplingParams,
        n_vocab: usize,
        prompt: &[u32],
        ctx: usize,
    ) -> Result<DecodeState, SamplingError> {
        let mut sampler = Sampler::new(params.clone(), n_vocab)?;
        sampler.observe(prompt);
        Ok(DecodeState {
            sampler,
            stops: StopMatcher::new(&params.stop),
            decoder: StreamDecoder::new(true),
            prompt_len: prompt.len(),
            ctx,
            max_tokens: params.max_tokens.unwrap_or(usize::MAX),
            generated: 0,
        })
    }

    /// Chooses the next token from one full-vocabulary logits row.
    pub fn sample(&mut self, logits: &[f32]) -> Result<SampledToken, SamplingError> {
        self.sampler.sample(logits)
    }

    /// Chooses the next token from a row's best logits ([`Sampler::sample_top`]).
    pub fn sample_top(&mut self, top: &TopLogits) -> Result<SampledToken, SamplingError> {
        self.sampler.sample_top(top)
    }

    /// How many best logits the next token needs instead of the whole row; 0: the whole row
    /// ([`Sampler::candidates_needed`]).
    pub fn candidates_needed(&self) -> usize {
        self.sampler.candidates_needed()
    }

    /// Takes the sampled token `id`: decodes its text through the stop strings and says whether generation
    /// ends here (end-of-generation token or stop string: `Stop`; `max_tokens` or a full context: `Length`).
    pub fn accept(&mut self, tokenizer: &Tokenizer, id: u32) -> Accepted {
        if tokenizer.is_eog(id) {
            return Accepted {
                is_token: false,
                text: String::new(),
                finish: Some(FinishReason::Stop),
            };
        }
        self.generated += 1;
        let out = self.stops.push(&self.decoder.push(tokenizer, id));
        let finish = if out.stopped.is_some() {
            Some(FinishReason::Stop)
        } else if self.generated >= self.max_tokens
            // The token just accepted sits at position prompt + generated - 1; the next would not fit.
            || self.prompt_len + self.generated >= self.ctx
        {
            Some(FinishReason::Length)
        } else {
            None
        };
        Accepted {
            is_token: true,
            text: out.text,
            finish,
        }
    }

    /// Ends the sequence: the text held back (an unfinished character, a possible stop-string prefix) that
    /// becomes final now. Empty after a stop string, whose match already cut the output.
    pub fn finish(&mut self) -> String {
        if self.stops.stopped().is_some() {
            return String::new();
        }
        let tail = self.decoder.finish();
        let out = self.stops.push(&tail);
        if out.stopped.is_none() {
            format!("{}{}", out.text, self.stops.finish())
        } else {
            out.text
        }
    }

    /// Tokens accepted as output so far (end-of-generation tokens excluded).
    pub fn generated(&self) -> usize {
        self.generated
    }

    pub fn params(&self) -> &SamplingParams {
        self.sampler.params()
    }
}
