//! `Sequences`: the engine keyed by sequence id, as a coordinator drives it. It owns one KV cache per live
//! sequence, creates a sequence's cache when its first chunk arrives (`start_pos` 0), checks that every later
//! chunk continues exactly where the cache ends, and keeps the sum of all caches under a memory budget.
//!
//! Both the worker's gRPC service and the coordinator's in-process pipeline run batches through this type,
//! so the rules for sequences (which the worker API's `SeqInput` states) have one implementation.
//!
//! A call either succeeds or leaves no trace of the sequences it would have created: a batch that fails
//! (checks, memory, or the engine itself) removes them again, and the engine restores the caches of the
//! existing sequences to their previous length.

use std::collections::{HashMap, HashSet};

use crate::batch::{Batch, Logits, Output, SeqSpan};
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::kv_cache::KvCache;

/// One sequence's part of a batch: tokens (or hidden rows) `start_pos .. start_pos + n_tokens` of `seq_id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqInput {
    /// Chosen by the caller, unique among live sequences.
    pub seq_id: u64,
    /// Position of the first token: 0 for a new sequence, else the number of positions already cached.
    pub start_pos: usize,
    pub n_tokens: usize,
    pub logits: Logits,
    /// KV cache size of a new sequence (0: `max_context`); ignored for a known one.
    pub context: usize,
    /// A new sequence that starts at `start_pos` > 0: positions `0..start_pos` of its cache are copied from
    /// this live sequence (prompt-prefix reuse; the source must hold them and not be in the batch). Ignored
    /// for a known sequence.
    pub prefix_from: Option<u64>,
}

/// A shard engine and the KV caches of the sequences it is running. See the module doc.
pub struct Sequences<'m> {
    engine: Engine<'m>,
    caches: HashMap<u64, KvCache>,
    max_context: usize,
    kv_budget_bytes: Option<u64>,
    /// Sum of `caches`' bytes (and of `taken`'s during a call).
    kv_bytes: u64,
    /// Reused for every call.
    batch: Batch,
    /// The batch's caches, moved out of `caches` for one call (the engine takes them as `&mut` together),
    /// with whether this call created them.
    taken: Vec<Taken>,
    /// Ids seen while checking a batch (reused).
    seen: HashSet<u64>,
}

struct Taken {
    seq_id: u64,
    cache: KvCache,
    created: bool,
}

impl<'m> Sequences<'m> {
    /// Sequences on `engine`, each with a KV cache of at most `max_context` positions, all caches together
    /// at most `kv_budget_bytes` (no limit when `None`).
    pub fn new(
        engine: Engine<'m>,
        max_context: usize,
        kv_budget_bytes: Option<u64>,
    ) -> Sequences<'m> {
        Sequences {
            engine,
            caches: HashMap::new(),
            max_context,
            kv_budget_bytes,
            kv_bytes: 0,
            batch: Batch::new(),
            taken: Vec::new(),
            seen: HashSet::new(),
        }
    }

    pub fn engine(&self) -> &Engine<'m> {
        &self.engine
    }

    pub fn engine_mut(&mut self) -> &mut Engine<'m> {
        &mut self.engine
    }

    pub fn max_context(&self) -> usize {
        self.max_context
    }

    /// Runs one batch: `tokens` on the first stage, `hidden` (`n_tokens × n_embd`, sequences in order) on
    /// later stages, as [`Engine::forward`] takes them. A `seq_id` not yet known with `start_pos` 0 creates
    /// its KV cache (of the engine's `kv_type`) of `context` positions (0: `max_context`).
    ///
    /// Errors: [`Error::Batch`] (naming the `seq_id` and field) for an unknown id that does not start at 0, a
    /// known id whose `start_pos` is not its cache length, an id twice in the batch, a new sequence's
    /// `context` above `max_context`, positions beyond a sequence's context, and whatever the engine refuses;
    /// [`Error::KvMemory`] when new caches would exceed the budget. On any error the sequences this call
    /// created are removed again.
    pub fn forward(
        &mut self,
        seqs: &[SeqInput],
        tokens: &[u32],
        hidden: &[f32],
    ) -> Result<Output<'_>> {
        self.check(seqs)?;
        self.take(seqs)?;

        self.batch.clear();
        self.batch.tokens.extend_from_slice(tokens);
        self.batch.hidden.extend_from_slice(hidden);
        for s in seqs {
            self.batch.seqs.push(SeqSpan {
                start_pos: s.start_pos,
                n_tokens: s.n_tokens,
            });
            self.batch
                .logits
                .extend((0..s.n_tokens).map(|i| match s.logits {
                    Logits::None => false,
                    Logits::Last => i + 1 == s.n_tokens,
                    Logits::All => true,
                }));
        }

        let mut caches: Vec<&mut KvCache> = self.taken.iter_mut().map(|t| &mut t.cache).collect();
        let result = self.engine.forward(&self.batch, &mut caches);
        drop(caches);
        put_back(
            &mut self.caches,
            &mut self.taken,
            &mut self.kv_bytes,
            result.is_ok(),
        );
        result
    }

    /// Checks `seqs` against the live sequences and the limits, changing nothing.
    fn check(&mut self, seqs: &[SeqInput]) -> Result<()> {
        let err = |msg: String| Err(Error::Batch(msg));
        self.seen.clear();
        let mut new_bytes = 0u64;
        for s in seqs {
            let id = s.seq_id;
            if !self.seen.insert(id) {
                return err(format!("seq_id {id} appears more than once in the batch"));
            }
            if s.n_tokens == 0 {
                return err(format!("seq_id {id}: n_tokens is 0"));
            }
            let end = s.start_pos.saturating_add(s.n_tokens);
            match self.caches.get(&id) {
                Some(cache) => {
                    if s.start_pos != cache.len() {
                        return err(format!(
                            "seq_id {id}: start_pos is {}, but its KV cache holds positions 0..{} (the next \
                             chunk must start at {})",
                            s.start_pos,
                            cache.len(),
                            cache.len()
                        ));
                    }
                    if end > cache.ctx() {
                        return err(format!(
                            "seq_id {id}: positions {}..{end} exceed its context of {} tokens",
                            s.start_pos,
                            cache.ctx()
                        ));
                    }
                }
                None => {
                    match s.prefix_from {
                        None if s.start_pos != 0 => {
                            return err(format!(
                                "seq_id {id} is unknown (never started, released, or from before a restart) \
                                 and start_pos is {}: a new sequence starts at 0, or copies its first start_pos \
                                 positions from prefix_from",
                                s.start_pos
                            ));
                        }
                        None => {}
                        Some(src) => {
                            if seqs.iter().any(|o| o.seq_id == src) {
                                return err(format!(
                                    "seq_id {id}: its prefix_from {src} is in the same batch"
                                ));
                            }
                            let Some(from) = self.caches.get(&src) else {
                                return err(format!(
                                    "seq_id {id}: prefix_from {src} is not a live sequence (released, or from \
                                     before a restart)"
                                ));
                            };
                            if from.len() < s.start_pos {
                                return err(format!(
                                    "seq_id {id}: start_pos {} but prefix_from {src} holds only {} positions",
                                    s.start_pos,
                                    from.len()
                                ));
                            }
                        }
                    }
                    if s.context > self.max_context {
                        return err(format!(
                            "seq_id {id}: context {} exceeds this worker's max_context of {}",
                            s.context, self.max_context
                        ));
                    }
                    let ctx = self.new_context(s);
                    if end > ctx {
                        return err(format!(
                            "seq_id {id}: positions 0..{end} exceed its context of {ctx} tokens"
                        ));
                    }
                    let bytes = self.engine.cache_bytes(ctx)?;
                    new_bytes = new_bytes.saturating_add(bytes);
                }
            }
        }
        if let Some(budget) = self.kv_budget_bytes {
            let total = self.kv_bytes.saturating_add(new_bytes);
            if total > budget {
                return Err(Error::KvMemory(format!(
                    "the batch's new sequences need {new_bytes} bytes of KV cache, {} bytes are in use by {} \
                     sequences, the budget is {budget} bytes ({:.1} MiB): release finished sequences or ask \
                     for a smaller context",
                    self.kv_bytes,
                    self.caches.len(),
                    budget as f64 / (1024.0 * 1024.0)
                )));
            }
        }
        Ok(())
    }

    fn new_context(&self, s: &SeqInput) -> usize {
        if s.context == 0 {
            self.max_context
        } else {
            s.context
        }
    }

    /// Moves the batch's caches out of the map into `taken`, creating the new ones.
    fn take(&mut self, seqs: &[SeqInput]) -> Result<()> {
        self.taken.clear();
        for s in seqs {
            let taken = match self.caches.remove(&s.seq_id) {
                Some(cache) => Taken {
                    seq_id: s.seq_id,
                    cache,
                    created: false,
                },
                None => match self.new_cache(s) {
                    Ok(cache) => {
                        self.kv_bytes += cache.bytes();
                        Taken {
                            seq_id: s.seq_id,
                            cache,
                            created: true,
                        }
                    }
                    Err(e) => {
                        put_back(&mut self.caches, &mut self.taken, &mut self.kv_bytes, false);
                        return Err(match e {
                            // Allocation failure or a context the model cannot take: memory, for the caller.
                            Error::KvCache(msg) => {
                                Error::KvMemory(format!("seq_id {}: {msg}", s.seq_id))
                            }
                            e => e,
                        });
                    }
                },
            };
            self.taken.push(taken);
        }
        Ok(())
    }

    /// A new sequence's cache, with its prefix copied when it has one (`check` vetted the source).
    fn new_cache(&self, s: &SeqInput) -> Result<KvCache> {
        let mut cache = self.engine.new_cache(self.new_context(s), None)?;
        if let Some(src) = s.prefix_from.and_then(|id| self.caches.get(&id)) {
            cache
                .copy_prefix(src, s.start_pos)
                .map_err(|e| Error::Batch(format!("seq_id {}: prefix_from: {e}", s.seq_id)))?;
        }
        Ok(cache)
    }

    /// Frees the KV caches of `seq_ids`; unknown ids are ignored.
    pub fn release(&mut self, seq_ids: &[u64]) {
        for id in seq_ids {
            if let Some(cache) = self.caches.remove(id) {
                self.kv_bytes -= cache.bytes();
            }
        }
    }

    /// Drops every sequence.
    pub fn reset(&mut self) {
        self.caches.clear();
        self.kv_bytes = 0;
    }

    /// Live sequences.
    pub fn len(&self) -> usize {
        self.caches.len()
    }

    pub fn is_empty(&self) -> bool {
        self.caches.is_empty()
    }

    /// Bytes of all live sequences' KV caches.
    pub fn kv_bytes(&self) -> u64 {
        self.kv_bytes
    }

    /// Whether `seq_id` is live, and how many positions its cache holds.
    pub fn seq_len(&self, seq_id: u64) -> Option<usize> {
        self.caches.get(&seq_id).map(KvCache::len)
    }
}

/// Returns the caches of one call to the map; after a failed call, the ones it created are dropped.
/// (A free function: the caller still holds the engine's output, a borrow of another field.)
fn put_back(
    caches: &mut HashMap<u64, KvCache>,
    taken: &mut Vec<Taken>,
    kv_bytes: &mut u64,
    keep_created: bool,
) {
    for t in taken.drain(..) {
        if t.created && !keep_created {
            *kv_bytes -= t.cache.bytes();
        } else {
            caches.insert(t.seq_id, t.cache);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use shard_tool::checkpoint::Checkpoint;
    use shard_tool::plan::{Topology, plan};
    use tessera_kernels::cpu::Pool;

    use super::*;
    use crate::collective::SingleRank;
    use crate::engine::EngineOptions;
    use crate::weights::Weights;

    fn checkpoint() -> Checkpoint {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/gguf/tiny_llama.gguf");
        Checkpoint::open(&[path]).unwrap()
    }

    fn engine(ckpt: &Checkpoint) -> Engine<'_> {
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
            Arc::new(Pool::new(1)),
            EngineOptions {
                max_batch_tokens: 32,
                max_logits: 32,
                ..EngineOptions::default()
            },
        )
        .unwrap()
    }

    fn prompt(seed: u32, n: usize, n_vocab: usize) -> Vec<u32> {
        (0..n as u32)
            .map(|i| (i * 37 + seed * 101 + 5) % n_vocab as u32)
            .collect()
    }

    fn seq(seq_id: u64, start_pos: usize, n_tokens: usize) -> SeqInput {
        SeqInput {
            seq_id,
            start_pos,
            n_tokens,
            logits: Logits::All,
            context: 0,
            prefix_from: None,
        }
    }

    #[test]
    fn interleaved_sequences_match_separate_runs() {
        let ckpt = checkpoint();
        let v = ckpt.config.n_vocab;
        let a = prompt(1, 10, v);
        let b = prompt(2, 12, v);

        let mut single = engine(&ckpt);
        let mut alone = |tokens: &[u32]| {
            let mut cache = single.new_cache(32, None).unwrap();
            let mut batch = Batch::new();
            batch.push_tokens(0, tokens, Logits::All);
            single
                .forward(&batch, &mut [&mut cache])
                .unwrap()
                .logits()
                .unwrap()
                .to_vec()
        };
        let want_a = alone(&a);
        let want_b = alone(&b);

        let mut seqs = Sequences::new(engine(&ckpt), 32, None);
        // (a's chunk, b's chunk) per step; an empty range leaves the sequence out of that batch.
        let steps = [(0..5, 0..3), (5..6, 3..8), (6..6, 8..9), (6..10, 9..12)];
        let (mut got_a, mut got_b) = (Vec::new(), Vec::new());
        for (ra, rb) in steps {
            let mut inputs = Vec::new();
            let mut tokens = Vec::new();
            for (id, r, t) in [(7u64, &ra, &a), (3u64, &rb, &b)] {
                if !r.is_empty() {
                    inputs.push(seq(id, r.start, r.len()));
                    tokens.extend_from_slice(&t[r.clone()]);
                }
            }
            let out = seqs.forward(&inputs, &tokens, &[]).unwrap();
            let logits = out.logits().unwrap();
            let mut row = 0;
            for (id, r) in [(7u64, &ra), (3u64, &rb)] {
                let rows = &logits[row * v..(row + r.len()) * v];
                if id == 7 { &mut got_a } else { &mut got_b }.extend_from_slice(rows);
                row += r.len();
            }
        }
        assert_eq!((seqs.seq_len(7), seqs.seq_len(3)), (Some(10), Some(12)));
        let diff = |x: &[f32], y: &[f32]| {
            assert_eq!(x.len(), y.len());
            x.iter()
                .zip(y)
                .map(|(p, q)| (p - q).abs())
                .fold(0.0, f32::max)
        };
        assert!(diff(&got_a, &want_a) <= 1e-3);
        assert!(diff(&got_b, &want_b) <= 1e-3);
        assert_eq!(seqs.len(), 2);
        seqs.release(&[7, 99]);
        assert_eq!((seqs.len(), seqs.seq_len(7)), (1, None));
        seqs.reset();
        assert!(seqs.is_empty());
        assert_eq!(seqs.kv_bytes(), 0);
    }

    #[test]
    fn a_copied_prefix_continues_exactly() {
        let ckpt = checkpoint();
        let v = ckpt.config.n_vocab;
        let a = prompt(1, 10, v);
        let other = prompt(5, 4, v);
        let mut seqs = Sequences::new(engine(&ckpt), 32, None);
        let rows = |seqs: &mut Sequences<'_>, input: SeqInput, tokens: &[u32]| {
            let out = seqs.forward(&[input], tokens, &[]).unwrap();
            out.logits().unwrap().to_vec()
        };
        // Sequence 1 runs a[..6] then goes elsewhere; sequence 2 runs all of a in the same two chunks.
        rows(&mut seqs, seq(1, 0, 6), &a[..6]);
        rows(&mut seqs, seq(1, 6, 4), &other);
        rows(&mut seqs, seq(2, 0, 6), &a[..6]);
        let want = rows(&mut seqs, seq(2, 6, 4), &a[6..]);
        // Sequence 3 takes a[..6]'s keys and values from sequence 1 and runs only a[6..].
        let reuse = SeqInput {
            prefix_from: Some(1),
            ..seq(3, 6, 4)
        };
        let got = rows(&mut seqs, reuse, &a[6..]);
        assert_eq!(
            got, want,
            "rows after a copied prefix differ from a full run"
        );
        assert_eq!(
            (seqs.seq_len(1), seqs.seq_len(3)),
            (Some(10), Some(10)),
            "the source is untouched"
        );

        let before = (seqs.len(), seqs.kv_bytes());
        let refused = |seqs: &mut Sequences<'_>, inputs: &[SeqInput], want: &str| {
            let n = inputs.iter().map(|s| s.n_tokens).sum();
            let Err(err) = seqs.forward(inputs, &a[..n], &[]) else {
                panic!("{inputs:?} was accepted");
            };
            assert!(err.to_string().contains(want), "{err}");
        };
        let from = |src: u64, id: u64, start: usize| SeqInput {
            prefix_from: Some(src),
            ..seq(id, start, 1)
        };
        refused(
            &mut seqs,
            &[from(99, 4, 3)],
            "prefix_from 99 is not a live sequence",
        );
        refused(&mut seqs, &[from(1, 4, 11)], "holds only 10 positions");
        refused(
            &mut seqs,
            &[seq(1, 10, 1), from(1, 4, 3)],
            "is in the same batch",
        );
        refused(&mut seqs, &[seq(4, 3, 1)], "a new sequence starts at 0");
        assert_eq!((seqs.len(), seqs.kv_bytes()), before);
    }

    #[test]
    fn bad_batches_name_the_sequence_and_leave_no_state() {
        let ckpt = checkpoint();
        let mut seqs = Sequences::new(engine(&ckpt), 16, None);
        let tokens = [1u32, 2, 3, 4, 5, 6];
        seqs.forward(&[seq(1, 0, 3)], &tokens[..3], &[]).unwrap();
        let bytes = seqs.kv_bytes();
        assert!(bytes > 0);

        let msg = |r: Result<Output<'_>>| match r {
            Err(Error::Batch(m)) => m,
            other => panic!("expected a batch error, got {other:?}"),
        };
        let m = msg(seqs.forward(&[seq(2, 4, 1)], &tokens[..1], &[]));
        assert!(
            m.contains("seq_id 2 is unknown") && m.contains("start_pos is 4"),
            "{m}"
        );
        let m = msg(seqs.forward(&[seq(1, 2, 1)], &tokens[..1], &[]));
        assert!(
            m.contains("seq_id 1: start_pos is 2") && m.contains("0..3"),
            "{m}"
        );
        let m = msg(seqs.forward(&[seq(5, 0, 1), seq(5, 0, 1)], &tokens[..2], &[]));
        assert!(m.contains("seq_id 5 appears more than once"), "{m}");
        let mut big = seq(6, 0, 1);
        big.context = 17;
        let m = msg(seqs.forward(&[big], &tokens[..1], &[]));
        assert!(
            m.contains("seq_id 6: context 17 exceeds") && m.contains("max_context of 16"),
            "{m}"
        );
        let m = msg(seqs.forward(&[seq(1, 3, 14)], &[0; 14], &[]));
        assert!(
            m.contains("seq_id 1: positions 3..17 exceed its context of 16"),
            "{m}"
        );
        let m = msg(seqs.forward(&[seq(8, 0, 0)], &[], &[]));
        assert!(m.contains("seq_id 8: n_tokens is 0"), "{m}");

        // The engine refuses the batch (token count) after the new sequence 9 was created: it is removed
        // again, and sequence 1 keeps its three positions.
        let err = seqs
            .forward(&[seq(1, 3, 1), seq(9, 0, 2)], &tokens[..2], &[])
            .unwrap_err();
        assert!(matches!(err, Error::Batch(_)), "{err}");
        assert_eq!(
            (seqs.len(), seqs.seq_len(1), seqs.seq_len(9)),
            (1, Some(3), None)
        );
        assert_eq!(seqs.kv_bytes(), bytes);
        seqs.forward(&[seq(1, 3, 1), seq(9, 0, 2)], &tokens[..3], &[])
            .unwrap();
        assert_eq!((seqs.seq_len(1), seqs.seq_len(9)), (Some(4), Some(2)));
    }

    #[test]
    fn set_collective_checks_the_rank() {
        let ckpt = checkpoint();
        let mut seqs = Sequences::new(engine(&ckpt), 16, None);
        let mut group = crate::collective::LocalGroup::new(2);
        let err = seqs
            .engine_mut()
            .set_collective(Box::new(group.remove(1)))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("the new collective is rank 1 of 2, the shard is rank 0"),
            "{err}"
        );
        seqs.engine_mut()
            .set_collective(Box::new(SingleRank))
            .unwrap();
        assert_eq!(seqs.engine().collective().world_size(), 1);
    }

    #[test]
    fn kv_budget_is_a_memory_error() {
        let ckpt = checkpoint();
        let one = engine(&ckpt).new_cache(16, None).unwrap().bytes();
        let mut seqs = Sequences::new(engine(&ckpt), 16, Some(2 * one));
        seqs.forward(&[seq(1, 0, 1), seq(2, 0, 1)], &[1, 2], &[])
            .unwrap();
        assert_eq!(seqs.kv_bytes(), 2 * one);
        let err = seqs.forward(&[seq(3, 0, 1)], &[1], &[]).unwrap_err();
        assert!(matches!(err, Error::KvMemory(_)), "{err}");
        assert!(err.to_string().contains("budget"), "{err}");
        assert_eq!(seqs.len(), 2);
        seqs.release(&[1]);
        seqs.forward(&[seq(3, 0, 1)], &[1], &[]).unwrap();
        assert_eq!(seqs.kv_bytes(), 2 * one);
    }
}
