//! What one `Engine::forward` call runs and what it returns.
//!
//! A [`Batch`] holds several sequences, each a run of consecutive positions starting at `start_pos`: a prefill
//! chunk (many tokens) and single decode tokens can be mixed in one batch, as in llama.cpp's `llama_batch`
//! and vLLM's chunked prefill. The first pipeline stage takes token ids; later stages take the previous
//! stage's hidden states (`n_tokens × n_embd`). Each token says whether the last stage should return its
//! logits. A batch is reusable: [`Batch::clear`] keeps its allocations.

use std::ops::Range;

/// Which of a pushed sequence's tokens ask for logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    None,
    /// The last token only (prefill then sample, or one decode step).
    Last,
    /// Every token (scoring a text, speculative decoding).
    All,
}

/// One sequence's part of a batch: positions `start_pos .. start_pos + n_tokens` of the sequence whose KV
/// cache is passed at the same index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqSpan {
    /// Position of the first token; the sequence's cache must already hold positions `0..start_pos`.
    pub start_pos: usize,
    pub n_tokens: usize,
}

/// The input of one forward call. Tokens of sequence `i` are the `seqs[i].n_tokens` consecutive batch tokens
/// after those of sequences `0..i`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Batch {
    /// First stage: one token id per batch token. Empty on later stages.
    pub tokens: Vec<u32>,
    /// Later stages: hidden states, row-major `[n_tokens, n_embd]`. Empty on the first stage.
    pub hidden: Vec<f32>,
    /// Per batch token: return its logits (last stage).
    pub logits: Vec<bool>,
    pub seqs: Vec<SeqSpan>,
}

impl Batch {
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty batch with room for `tokens` tokens (`hidden` hidden-state values) in `seqs` sequences, so
    /// that filling it in the decode loop allocates nothing.
    pub fn with_capacity(tokens: usize, hidden: usize, seqs: usize) -> Self {
        Batch {
            tokens: Vec::with_capacity(tokens),
            hidden: Vec::with_capacity(hidden),
            logits: Vec::with_capacity(tokens),
            seqs: Vec::with_capacity(seqs),
        }
    }

    /// Empties the batch, keeping its allocations.
    pub fn clear(&mut self) {
        self.tokens.clear();
        self.hidden.clear();
        self.logits.clear();
        self.seqs.clear();
    }

    /// Appends a sequence's tokens (first stage).
    pub fn push_tokens(&mut self, start_pos: usize, tokens: &[u32], logits: Logits) {
        self.tokens.extend_from_slice(tokens);
        self.push_span(start_pos, tokens.len(), logits);
    }

    /// Appends a sequence's hidden states, `n_tokens` rows of `hidden.len() / n_tokens` (later stages).
    pub fn push_hidden(
        &mut self,
        start_pos: usize,
        n_tokens: usize,
        hidden: &[f32],
        logits: Logits,
    ) {
        self.hidden.extend_from_slice(hidden);
        self.push_span(start_pos, n_tokens, logits);
    }

    fn push_span(&mut self, start_pos: usize, n_tokens: usize, logits: Logits) {
        self.seqs.push(SeqSpan {
            start_pos,
            n_tokens,
        });
        self.logits.extend((0..n_tokens).map(|i| match logits {
            Logits::None => false,
            Logits::Last => i + 1 == n_tokens,
            Logits::All => true,
        }));
    }

    /// Tokens in the batch (sum over sequences).
    pub fn n_tokens(&self) -> usize {
        self.seqs.iter().map(|s| s.n_tokens).sum()
    }

    /// Tokens that asked for logits.
    pub fn n_logits(&self) -> usize {
        self.logits.iter().filter(|&&l| l).count()
    }

    /// Batch-token index range of sequence `i`.
    pub fn seq_tokens(&self, i: usize) -> Range<usize> {
        let start: usize = self.seqs[..i].iter().map(|s| s.n_tokens).sum();
        start..start + self.seqs[i].n_tokens
    }
}

/// The result of a forward call, borrowed from the engine's buffers (valid until the next call).
#[derive(Debug, Clone, PartialEq)]
pub enum Output<'a> {
    /// Not the last stage: hidden states after this stage's layers, row-major `[n_tokens, n_embd]`, to hand
    /// to the next stage (identical on every rank of the stage).
    Hidden(&'a [f32]),
    /// Last stage: one row per token that asked for logits, in batch order, each holding this rank's slice
    /// `vocab` of the vocabulary (`data.len() == rows · vocab.len()`).
    Logits {
        data: &'a [f32],
        vocab: Range<usize>,
    },
}

impl<'a> Output<'a> {
    /// The logits rows, if this is a last-stage output.
    pub fn logits(&self) -> Option<&'a [f32]> {
        match self {
            Output::Logits { data, .. } => Some(data),
            Output::Hidden(_) => None,
        }
    }

    /// The hidden states, if this is an intermediate-stage output.
    pub fn hidden(&self) -> Option<&'a [f32]> {
        match self {
            Output::Hidden(h) => Some(h),
            Output::Logits { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_and_logit_flags() {
        let mut b = Batch::new();
        b.push_tokens(0, &[1, 2, 3], Logits::Last);
        b.push_tokens(7, &[4], Logits::All);
        b.push_tokens(2, &[5, 6], Logits::None);
        assert_eq!(b.n_tokens(), 6);
        assert_eq!(b.logits, [false, false, true, true, false, false]);
        assert_eq!(b.n_logits(), 2);
        assert_eq!(b.seq_tokens(1), 3..4);
        assert_eq!(b.seq_tokens(2), 4..6);
        b.clear();
        assert_eq!(b.n_tokens(), 0);
        assert!(b.tokens.is_empty() && b.logits.is_empty());
    }
}
