//! Finished sequences whose KV caches the pipeline keeps, so that a prompt that starts with the same tokens
//! (the next turn of a chat, a shared system prompt, the same few-shot examples) copies their keys and values
//! (`SeqStep::prefix_from`) instead of computing them again: llama.cpp server's `cache_prompt`, vLLM's
//! automatic prefix caching. The copy is exact, so a request answers the same with or without it.
//!
//! Bounded by KV positions: the sum of the kept sequences' context sizes (what their caches take on the
//! workers). The least recently used go first; an entry whose copy is in flight (pinned from admission to
//! the new sequence's first forward) is never evicted, and entries from before a pipeline failure (whose
//! caches may be gone) are never used.

/// The scheduler's failure count when a sequence started and the pipeline's epoch: a kept sequence is only
/// used while both are unchanged (its caches may be gone otherwise).
pub(crate) type Generation = (u64, u64);

/// A reusable prefix for a new sequence: copy positions `0..len` of `seq_id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Hit {
    pub seq_id: u64,
    pub len: usize,
}

#[derive(Debug)]
struct Entry {
    seq_id: u64,
    /// The tokens at positions `0..tokens.len()` of its cache.
    tokens: Vec<u32>,
    context: usize,
    /// When the sequence ran: see [`Generation`].
    generation: Generation,
    pins: usize,
    last_used: u64,
}

#[derive(Debug)]
pub(crate) struct PrefixCache {
    entries: Vec<Entry>,
    /// Most KV positions (sum of `context`) kept; 0 keeps nothing.
    budget: usize,
    tick: u64,
}

impl PrefixCache {
    pub fn new(budget: usize) -> PrefixCache {
        PrefixCache {
            entries: Vec::new(),
            budget,
            tick: 0,
        }
    }

    /// Positions held by the kept sequences.
    fn used(&self) -> usize {
        self.entries.iter().map(|e| e.context).sum()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// The longest prefix of `prompt` a kept sequence of this `generation` holds, at most all but the last
    /// prompt token (whose logits the new sequence needs), pinned until [`PrefixCache::unpin`]. Entries of
    /// an older generation are dropped; their ids join `release`.
    pub fn lookup(
        &mut self,
        prompt: &[u32],
        generation: Generation,
        release: &mut Vec<u64>,
    ) -> Option<Hit> {
        self.entries.retain(|e| {
            let stale = e.generation != generation && e.pins == 0;
            if stale {
                release.push(e.seq_id);
            }
            !stale
        });
        let limit = prompt.len().saturating_sub(1);
        let (best, len) = self
            .entries
            .iter_mut()
            .filter(|e| e.generation == generation)
            .map(|e| {
                let len = common_prefix(&e.tokens, prompt).min(limit);
                (e, len)
            })
            .max_by_key(|(e, len)| (*len, e.last_used))?;
        if len == 0 {
            return None;
        }
        self.tick += 1;
        best.last_used = self.tick;
        best.pins += 1;
        Some(Hit {
            seq_id: best.seq_id,
            len,
        })
    }

    /// The sequence that copied from `seq_id` has run its first forward (or is gone).
    pub fn unpin(&mut self, seq_id: u64) {
        if let Some(e) = self.entries.iter_mut().find(|e| e.seq_id == seq_id) {
            e.pins = e.pins.saturating_sub(1);
        }
    }

    /// Keeps a finished sequence whose cache holds `tokens` at a context of `context` positions. Returns the
    /// ids whose caches the pipeline should free: entries this one makes redundant (their tokens are a
    /// prefix of its), the least recently used beyond the budget, or this one when it does not fit.
    pub fn insert(
        &mut self,
        seq_id: u64,
        tokens: Vec<u32>,
        context: usize,
        generation: Generation,
    ) -> Vec<u64> {
        let mut release = Vec::new();
        if context > self.budget || tokens.is_empty() {
            release.push(seq_id);
            return release;
        }
        self.entries.retain(|e| {
            let redundant = e.pins == 0 && tokens.starts_with(&e.tokens);
            if redundant {
                release.push(e.seq_id);
            }
            !redundant
        });
        while self.used() + context > self.budget {
            let lru = self
                .entries
                .iter()
                .enumerate()
                .filter(|(_, e)| e.pins == 0)
                .min_by_key(|(_, e)| e.last_used)
                .map(|(i, _)| i);
            match lru {
                Some(i) => release.push(self.entries.swap_remove(i).seq_id),
                None => {
                    // Everything left is pinned: keep those, not this one.
                    release.push(seq_id);
                    return release;
                }
            }
        }
        self.tick += 1;
        self.entries.push(Entry {
            seq_id,
            tokens,
            context,
            generation,
            pins: 0,
            last_used: self.tick,
        });
        release
    }

    /// Drops every entry not pinned (the pipeline ran out of KV memory): their ids, to release.
    pub fn evict_unpinned(&mut self) -> Vec<u64> {
        let mut release = Vec::new();
        self.entries.retain(|e| {
            if e.pins == 0 {
                release.push(e.seq_id);
            }
            e.pins > 0
        });
        release
    }
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_prefix_wins_and_the_last_prompt_token_runs() {
        let mut c = PrefixCache::new(100);
        let mut release = Vec::new();
        assert!(c.insert(1, vec![1, 2, 3, 4], 10, (0, 0)).is_empty());
        assert!(c.insert(2, vec![1, 2, 9], 10, (0, 0)).is_empty());
        let hit = c.lookup(&[1, 2, 3, 7, 8], (0, 0), &mut release);
        assert_eq!(hit, Some(Hit { seq_id: 1, len: 3 }));
        // The whole prompt cached: all but its last token are reused.
        let hit = c.lookup(&[1, 2, 3, 4], (0, 0), &mut release);
        assert_eq!(hit, Some(Hit { seq_id: 1, len: 3 }));
        assert_eq!(c.lookup(&[5, 1, 2], (0, 0), &mut release), None);
        assert_eq!(c.lookup(&[1], (0, 0), &mut release), None);
        assert!(release.is_empty());
    }

    #[test]
    fn the_budget_evicts_the_least_recently_used_but_never_a_pinned_entry() {
        let mut c = PrefixCache::new(30);
        let mut release = Vec::new();
        c.insert(1, vec![1, 1], 10, (0, 0));
        c.insert(2, vec![2, 2], 10, (0, 0));
        c.insert(3, vec![3, 3], 10, (0, 0));
        // 1 is used (and pinned), so 2 is the least recently used.
        assert_eq!(
            c.lookup(&[1, 1, 5], (0, 0), &mut release).unwrap().seq_id,
            1
        );
        assert_eq!(c.insert(4, vec![4, 4], 10, (0, 0)), vec![2]);
        // Pinned 1 stays; 3 and 4 go to make room for 20 positions.
        assert_eq!(c.insert(5, vec![5, 5], 20, (0, 0)), vec![3, 4]);
        assert_eq!(c.len(), 2);
        // Only the pinned entry and no room: the new one is not kept.
        assert_eq!(c.insert(6, vec![6, 6], 25, (0, 0)), vec![5, 6]);
        c.unpin(1);
        assert_eq!(c.insert(7, vec![7, 7], 25, (0, 0)), vec![1]);
        // Larger than the whole budget: never kept.
        assert_eq!(c.insert(8, vec![8], 31, (0, 0)), vec![8]);
        assert_eq!(c.evict_unpinned(), vec![7]);
        assert_eq!(c.len(), 0);
    }

    #[test]
    fn a_longer_turn_replaces_its_prefix_and_old_generations_are_dropped() {
        let mut c = PrefixCache::new(100);
        let mut release = Vec::new();
        c.insert(1, vec![1, 2, 3], 10, (0, 0));
        assert_eq!(c.insert(2, vec![1, 2, 3, 4, 5], 10, (0, 0)), vec![1]);
        assert_eq!(c.len(), 1);
        // A failure since: the entry's cache may be gone.
        assert_eq!(c.lookup(&[1, 2, 3, 4, 5, 6], (1, 0), &mut release), None);
        assert_eq!(release, vec![2]);
        assert_eq!(c.len(), 0);
    }
}
