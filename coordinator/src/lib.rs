//! Tessera coordinator library: what sits between clients and the workers.
//!
//! - [`tokenizer`]: text ↔ token ids from GGUF metadata or `tokenizer.json`, special tokens, streaming decode.
//! - [`chat`]: chat templates (Jinja, Hugging Face semantics) rendering messages into a prompt.
//! - [`generate`]: single-sequence generation on a local engine (`tessera run`).
//! - [`sampling`]: request sampling parameters, their validation, the token sampler and stop strings.
pub mod chat;
pub mod generate;
pub mod sampling;
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
