//! Tessera coordinator library: what sits between clients and the workers.
//!
//! - [`api`]: the client-facing front ends: OpenAI-compatible HTTP, `tessera.v1` gRPC, health and metrics.
//! - [`tokenizer`]: text ↔ token ids from GGUF metadata or `tokenizer.json`, special tokens, streaming decode.
//! - [`chat`]: chat templates (Jinja, Hugging Face semantics) rendering messages into a prompt.
//! - [`generate`]: single-sequence generation on a local engine (`tessera run`).
//! - [`sampling`]: request sampling parameters, their validation, the token sampler and stop strings.
//! - [`serve`]: continuous-batching scheduler over a pipeline (in-process engine, or workers over gRPC).
//! - [`server`]: a scheduler and the front ends put together (`tessera serve`, `tessera cluster`).
//! - [`launcher`]: worker processes on loopback addresses for `tessera cluster` and the cluster tests.
pub mod api;
pub mod chat;
pub mod generate;
pub mod launcher;
pub mod sampling;
pub mod serve;
pub mod server;
pub mod tokenizer;

pub use chat::{ChatError, ChatMessage, ChatTemplate};
pub use sampling::{SampledToken, Sampler, SamplingError, SamplingParams, StopMatcher};
pub use tokenizer::{StreamDecoder, TokenKind, Tokenizer, TokenizerError};

/// The engine shares these across tasks and threads.
const _: () = {
    const fn shared<T: Send + Sync>() {}
    shared::<Tokenizer>();
    shared::<ChatTemplate>();
    shared::<Sampler>();
    shared::<StreamDecoder>();
    shared::<StopMatcher>();
};
