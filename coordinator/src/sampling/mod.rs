//! Choosing the next token: request parameters and their validation ([`SamplingParams`]), the sampler over a
//! full-vocabulary logits vector ([`Sampler`]), and stop strings while streaming ([`StopMatcher`]).
//!
//! The order of operations follows llama.cpp's default sampler chain (`common/sampling.cpp`): repetition /
//! frequency / presence penalties → logit bias → top-k → top-p → min-p → temperature → draw; temperature 0
//! is greedy (argmax after penalties and bias). Frequency and presence penalties are OpenAI's
//! (`logit -= count * frequency_penalty + (count > 0) * presence_penalty`, over generated tokens); the
//! repetition penalty is CTRL's / Hugging Face's (positive logits divided, negative multiplied, over prompt
//! and generated tokens), as vLLM applies them.

mod rng;
mod sampler;
mod stop;

use serde::{Deserialize, Serialize};

pub use rng::Rng;
pub use sampler::{MAX_CANDIDATES, SampledToken, Sampler, TopLogits, token_logprobs};
pub use stop::{StopMatcher, StopOutput};

/// Most alternatives a request may ask log-probabilities for (OpenAI's `top_logprobs` limit).
pub const MAX_LOGPROBS: usize = 20;
/// Most stop strings a request may give.
pub const MAX_STOP: usize = 16;

/// Sampling parameters of one request. `Default` is plain sampling at temperature 1 with every filter off.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// Softmax temperature; 0 picks the most likely token. In [0, 2].
    pub temperature: f32,
    /// Keep only the k most likely tokens; 0 = off.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p`; 1 = off. In (0, 1].
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` × the most likely one; 0 = off. In [0, 1].
    pub min_p: f32,
    /// > 1 discourages tokens already in the prompt or output; 1 = off. Positive.
    pub repetition_penalty: f32,
    /// Subtracted once per earlier occurrence in the output. In [-2, 2].
    pub frequency_penalty: f32,
    /// Subtracted once if the token occurred in the output. In [-2, 2].
    pub presence_penalty: f32,
    /// Added to the logits of the given tokens, each in [-100, 100].
    pub logit_bias: Vec<(u32, f32)>,
    /// Same seed, same logits → same tokens, in every Tessera version. `None`: a fresh random seed.
    pub seed: Option<u64>,
    /// Most tokens to generate; `None`: until end of generation or the context is full.
    pub max_tokens: Option<usize>,
    /// Generation ends before the first occurrence of any of these strings.
    pub stop: Vec<String>,
    /// Return the log-probability of each chosen token and of this many most likely alternatives
    /// (0..=20); `None`: no log-probabilities.
    pub logprobs: Option<usize>,
    /// Also return the log-probability of every prompt token after the first (under the model's own
    /// distribution: no penalties, bias or temperature) and of this many most likely alternatives (0..=20);
    /// `None`: none. Costs a whole logits row per prompt token.
    pub prompt_logprobs: Option<usize>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            logit_bias: Vec::new(),
            seed: None,
            max_tokens: None,
            stop: Vec::new(),
            logprobs: None,
            prompt_logprobs: None,
        }
    }
}

/// Invalid sampling parameters, or logits the sampler cannot use. Messages name the request field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SamplingError {
    #[error("`{field}` must be {requirement}, got {value}")]
    OutOfRange {
        field: &'static str,
        requirement: &'static str,
        value: String,
    },
    #[error("`logit_bias` names token {token}, outside the vocabulary of {vocab_size} tokens")]
    BiasTokenOutOfVocab { token: u32, vocab_size: usize },
    #[error("`logit_bias` names token {0} more than once")]
    BiasTokenRepeated(u32),
    #[error("`stop` must hold at most {MAX_STOP} strings, got {0}")]
    TooManyStops(usize),
    #[error("`stop` strings must not be empty")]
    EmptyStop,
    #[error("logits have {got} entries, expected the vocabulary size {expected}")]
    LogitsLength { got: usize, expected: usize },
    #[error("logits have no finite entry")]
    NoFiniteLogits,
    #[error(
        "the pipeline sent the best logits of a row, but this sequence's sampling needs the whole row"
    )]
    NeedsWholeRow,
}

fn out_of_range(
    field: &'static str,
    requirement: &'static str,
    value: impl ToString,
) -> SamplingError {
    SamplingError::OutOfRange {
        field,
        requirement,
        value: value.to_string(),
    }
}

impl SamplingParams {
    /// Greedy decoding: temperature 0, nothing else.
    pub fn greedy() -> SamplingParams {
        SamplingParams {
            temperature: 0.0,
            ..Default::default()
        }
    }

    /// Checks every field against the model's vocabulary size; the error names the first bad field.
    pub fn validate(&self, vocab_size: usize) -> Result<(), SamplingError> {
        // `contains` is false for NaN, so NaN is rejected with the same message.
        if !(0.0..=2.0).contains(&self.temperature) {
            return Err(out_of_range("temperature", "in [0, 2]", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(out_of_range("top_p", "in (0, 1]", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(out_of_range("min_p", "in [0, 1]", self.min_p));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return Err(out_of_range(
                "repetition_penalty",
                "a positive number",
                self.repetition_penalty,
            ));
        }
        if !(-2.0..=2.0).contains(&self.frequency_penalty) {
            return Err(out_of_range(
                "frequency_penalty",
                "in [-2, 2]",
                self.frequency_penalty,
            ));
        }
        if !(-2.0..=2.0).contains(&self.presence_penalty) {
            return Err(out_of_range(
                "presence_penalty",
                "in [-2, 2]",
                self.presence_penalty,
            ));
        }
        let mut seen = std::collections::HashSet::with_capacity(self.logit_bias.len());
        for &(token, bias) in &self.logit_bias {
            if token as usize >= vocab_size {
                return Err(SamplingError::BiasTokenOutOfVocab { token, vocab_size });
            }
            if !(-100.0..=100.0).contains(&bias) {
                return Err(out_of_range(
                    "logit_bias",
                    "in [-100, 100] for every token",
                    bias,
                ));
            }
            if !seen.insert(token) {
                return Err(SamplingError::BiasTokenRepeated(token));
            }
        }
        if self.max_tokens == Some(0) {
            return Err(out_of_range("max_tokens", "at least 1", 0));
        }
        if self.stop.len() > MAX_STOP {
            return Err(SamplingError::TooManyStops(self.stop.len()));
        }
        if self.stop.iter().any(String::is_empty) {
            return Err(SamplingError::EmptyStop);
        }
        if let Some(n) = self.logprobs
            && n > MAX_LOGPROBS
        {
            return Err(out_of_range("logprobs", "in [0, 20]", n));
        }
        if let Some(n) = self.prompt_logprobs
            && n > MAX_LOGPROBS
        {
            return Err(out_of_range("prompt_logprobs", "in [0, 20]", n));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(p: SamplingParams) -> String {
        p.validate(100).unwrap_err().to_string()
    }

    #[test]
    fn validation_messages_name_the_field() {
        assert!(SamplingParams::default().validate(100).is_ok());
        assert!(SamplingParams::greedy().validate(100).is_ok());
        let d = SamplingParams::default;
        assert_eq!(
            err(SamplingParams { top_p: 0.0, ..d() }),
            "`top_p` must be in (0, 1], got 0"
        );
        assert_eq!(
            err(SamplingParams { top_p: 1.5, ..d() }),
            "`top_p` must be in (0, 1], got 1.5"
        );
        assert_eq!(
            err(SamplingParams {
                top_p: f32::NAN,
                ..d()
            }),
            "`top_p` must be in (0, 1], got NaN"
        );
        assert_eq!(
            err(SamplingParams {
                temperature: -0.1,
                ..d()
            }),
            "`temperature` must be in [0, 2], got -0.1"
        );
        assert_eq!(
            err(SamplingParams {
                temperature: 2.5,
                ..d()
            }),
            "`temperature` must be in [0, 2], got 2.5"
        );
        assert_eq!(
            err(SamplingParams { min_p: 1.1, ..d() }),
            "`min_p` must be in [0, 1], got 1.1"
        );
        assert_eq!(
            err(SamplingParams {
                repetition_penalty: 0.0,
                ..d()
            }),
            "`repetition_penalty` must be a positive number, got 0"
        );
        assert_eq!(
            err(SamplingParams {
                frequency_penalty: 3.0,
                ..d()
            }),
            "`frequency_penalty` must be in [-2, 2], got 3"
        );
        assert_eq!(
            err(SamplingParams {
                presence_penalty: -2.5,
                ..d()
            }),
            "`presence_penalty` must be in [-2, 2], got -2.5"
        );
        assert_eq!(
            err(SamplingParams {
                logit_bias: vec![(100, 1.0)],
                ..d()
            }),
            "`logit_bias` names token 100, outside the vocabulary of 100 tokens"
        );
        assert_eq!(
            err(SamplingParams {
                logit_bias: vec![(1, 101.0)],
                ..d()
            }),
            "`logit_bias` must be in [-100, 100] for every token, got 101"
        );
        assert_eq!(
            err(SamplingParams {
                logit_bias: vec![(1, 1.0), (1, 2.0)],
                ..d()
            }),
            "`logit_bias` names token 1 more than once"
        );
        assert_eq!(
            err(SamplingParams {
                max_tokens: Some(0),
                ..d()
            }),
            "`max_tokens` must be at least 1, got 0"
        );
        assert_eq!(
            err(SamplingParams {
                stop: vec![String::new()],
                ..d()
            }),
            "`stop` strings must not be empty"
        );
        assert_eq!(
            err(SamplingParams {
                stop: vec!["x".into(); 17],
                ..d()
            }),
            "`stop` must hold at most 16 strings, got 17"
        );
        assert_eq!(
            err(SamplingParams {
                logprobs: Some(21),
                ..d()
            }),
            "`logprobs` must be in [0, 20], got 21"
        );
    }

    #[test]
    fn params_deserialize_with_defaults() {
        let p: SamplingParams =
            serde_json::from_str(r#"{"temperature": 0.5, "stop": ["\n"]}"#).unwrap();
        assert_eq!(
            p,
            SamplingParams {
                temperature: 0.5,
                stop: vec!["\n".into()],
                ..Default::default()
            }
        );
    }
}
