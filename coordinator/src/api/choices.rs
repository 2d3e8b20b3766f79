//! One client request that asks for several sequences — OpenAI's `n` choices per prompt and a batch of
//! prompts — as scheduler requests, one per choice, whose events arrive merged and tagged with the choice
//! index.
//!
//! Choice `p·n + j` is prompt `p`'s `j`-th sequence (OpenAI's and vLLM's order). With a seed `s`, choice `j`
//! samples with `s + j` (wrapping): choice 0 is what the same request with `n = 1` gives, and every prompt of
//! a batch gets what it gets alone. Dropping [`Choices`] drops every receiver, which cancels every sequence.

use futures::stream::{BoxStream, SelectAll, StreamExt};

use super::Backend;
use crate::sampling::SamplingParams;
use crate::serve::{GenEvent, GenRequest, ServeError, Usage};

/// The merged events of a request's choices.
pub struct Choices {
    events: SelectAll<BoxStream<'static, (usize, GenEvent)>>,
    len: usize,
    per_prompt: usize,
    open: usize,
    usage: Usage,
}

/// Submits `n` sequences for each of `prompts`. An error of prompt `p` of a batch says which prompt it is
/// (the field stays "prompt"); the sequences already submitted are cancelled.
pub fn submit(
    backend: &dyn Backend,
    prompts: Vec<Vec<u32>>,
    n: usize,
    params: &SamplingParams,
) -> Result<Choices, ServeError> {
    let batch = prompts.len() > 1;
    let mut streams = Vec::with_capacity(prompts.len() * n);
    for (p, prompt) in prompts.into_iter().enumerate() {
        for j in 0..n {
            let mut params = params.clone();
            params.seed = params.seed.map(|s| s.wrapping_add(j as u64));
            let rx = backend
                .submit(GenRequest {
                    prompt: prompt.clone(),
                    params,
                })
                .map_err(|e| if batch { name_prompt(e, p) } else { e })?;
            let index = streams.len();
            streams.push(
                futures::stream::unfold(rx, move |mut rx| async move {
                    rx.recv().await.map(|ev| ((index, ev), rx))
                })
                .boxed(),
            );
        }
    }
    let len = streams.len();
    Ok(Choices {
        events: futures::stream::select_all(streams),
        len,
        per_prompt: n,
        open: len,
        usage: Usage::default(),
    })
}

/// Prefixes an `InvalidArgument` on the prompt with the prompt's place in the batch.
fn name_prompt(e: ServeError, p: usize) -> ServeError {
    match e {
        ServeError::InvalidArgument { field, message } if field == "prompt" => {
            ServeError::InvalidArgument {
                field,
                message: format!("prompt {p} of the batch: {message}"),
            }
        }
        other => other,
    }
}

impl Choices {
    /// How many choices the request has.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The next event of any choice, with the choice's index. `None` once every choice has ended; a
    /// receiver that closes without its `Done` or `Error` is reported as an `Error`. A `Done`'s usage is
    /// added to [`Choices::usage`].
    pub async fn next(&mut self) -> Option<(usize, GenEvent)> {
        if self.open == 0 {
            return None;
        }
        let Some((i, ev)) = self.events.next().await else {
            self.open = 0;
            return Some((0, GenEvent::Error(ended_early())));
        };
        match &ev {
            GenEvent::Done { usage, .. } => {
                self.open -= 1;
                // A prompt's tokens count once, however many choices continue it (as OpenAI counts).
                if i % self.per_prompt == 0 {
                    self.usage.prompt_tokens += usage.prompt_tokens;
                    self.usage.cached_tokens += usage.cached_tokens;
                }
                self.usage.completion_tokens += usage.completion_tokens;
            }
            GenEvent::Error(_) => self.open = 0,
            GenEvent::Prompt(_) | GenEvent::Token(_) => {}
        }
        Some((i, ev))
    }

    /// The usage of the choices finished so far: prompt tokens once per prompt, completion tokens of all.
    pub fn usage(&self) -> Usage {
        self.usage
    }
}

/// A scheduler that dropped a request without finishing it (a bug).
pub fn ended_early() -> ServeError {
    ServeError::Internal("the scheduler ended the request without a result".into())
}
