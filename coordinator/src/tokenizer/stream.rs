//! Streaming detokenization: text pieces as generated tokens arrive, never half a UTF-8 character.
//!
//! Byte-level and byte-fallback vocabularies split characters across tokens (an emoji is often three or four
//! tokens). Bytes are held until they complete a character; a byte sequence that can never become valid UTF-8
//! is emitted as U+FFFD at once, as `String::from_utf8_lossy` would, so the concatenation of every piece plus
//! [`StreamDecoder::finish`] equals [`Tokenizer::decode`] of the same tokens (without its leading-space strip:
//! generated text continues the prompt, so a leading space is real).

use super::Tokenizer;

/// Incremental decoder for one generated sequence. It holds no reference to the tokenizer (pass it to
/// [`push`](Self::push)), so it can live in a task beside an `Arc<Tokenizer>`.
#[derive(Debug, Clone, Default)]
pub struct StreamDecoder {
    skip_special: bool,
    /// Bytes of an incomplete character at the end of what has been decoded.
    pending: Vec<u8>,
}

impl StreamDecoder {
    /// `skip_special`: control tokens (`<|eot_id|>`) produce no text.
    pub fn new(skip_special: bool) -> StreamDecoder {
        StreamDecoder {
            skip_special,
            pending: Vec::new(),
        }
    }

    /// Adds one token; returns the text it completes (possibly empty, when it ends inside a character or is a
    /// skipped special token).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> String {
        self.pending
            .extend_from_slice(tokenizer.piece(id, self.skip_special));
        let mut out = String::new();
        let mut rest: &[u8] = &self.pending;
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.push_str(s);
                    rest = &[];
                    break;
                }
                Err(e) => {
                    let (valid, after) = rest.split_at(e.valid_up_to());
                    // The first `valid_up_to` bytes are valid UTF-8, so the default is never taken.
                    out.push_str(std::str::from_utf8(valid).unwrap_or_default());
                    match e.error_len() {
                        // Invalid bytes that no continuation can repair.
                        Some(n) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            rest = &after[n..];
                        }
                        // A character cut short at the end: wait for the next token.
                        None => {
                            rest = after;
                            break;
                        }
                    }
                }
            }
        }
        self.pending = rest.to_vec();
        out
    }

    /// Whether bytes of an unfinished character are held back.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Ends the stream: whatever is held back, as U+FFFD.
    pub fn finish(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        s
    }
}
