//! The tensor-parallel communicator the engine is given: one trait, an all-reduce(sum) of f32 buffers.
//!
//! The forward pass calls [`Collective::all_reduce_sum`] at exactly the Megatron-LM points (Shoeybi et al.
//! 2019, <https://arxiv.org/abs/1909.08053>, §3): after the vocabulary-parallel embedding lookup, after
//! attention's row-parallel output projection and after the FFN's row-parallel down projection. Everything
//! else a rank computes is local. Implementations:
//! - [`SingleRank`]: world size 1, a no-op (single-process generation is the same engine).
//! - [`LocalGroup`]: ranks as threads of one process, a barrier-based all-reduce. A test double for the
//!   tensor-parallel equivalence tests, and for the cluster's own tests.
//! - [`crate::peer::PeerGroup`]: ranks as worker processes, TCP links. NCCL between GPUs would implement the
//!   same trait.
//!
//! Every rank must receive the same result bit for bit (ranks then stay in lockstep on identical hidden
//! states); `LocalGroup` guarantees it by summing contributions in rank order on every rank.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use thiserror::Error;

/// Why an all-reduce failed. After an error the group is unusable: every later call fails too.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum CollectiveError {
    /// Ranks passed buffers of different lengths (they are running different batches).
    #[error("all-reduce: rank {rank} passed {got} floats, but rank {other} passed {expected}")]
    LengthMismatch {
        rank: usize,
        got: usize,
        other: usize,
        expected: usize,
    },
    /// A rank left the group (its engine failed or was dropped) while others still needed it.
    #[error("all-reduce: rank {rank} of {world_size} left the group")]
    PeerGone { rank: usize, world_size: usize },
    /// Not every rank arrived within the group's timeout.
    #[error("all-reduce: only {arrived} of {world_size} ranks arrived within {timeout:?}")]
    Timeout {
        arrived: usize,
        world_size: usize,
        timeout: Duration,
    },
    /// A transport failure of a networked implementation.
    #[error("all-reduce transport: {0}")]
    Transport(String),
}

/// A tensor-parallel group as one rank sees it.
pub trait Collective: Send + Sync {
    /// This rank's index in `0..world_size()`.
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Replaces `buf` on every rank with the element-wise sum of all ranks' `buf` (same length everywhere).
    /// Every rank must get bit-identical results.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CollectiveError>;
}

/// A group of one: all-reduce is the identity.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleRank;

impl Collective for SingleRank {
    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        1
    }

    fn all_reduce_sum(&self, _buf: &mut [f32]) -> Result<(), CollectiveError> {
        Ok(())
    }
}

/// How long [`LocalGroup`] ranks wait for each other by default before giving up.
pub const LOCAL_GROUP_TIMEOUT: Duration = Duration::from_secs(60);

/// One rank of an in-process tensor-parallel group (each rank on its own thread, typically with its own
/// `Engine`). Made by [`LocalGroup::new`]; dropping a member makes the others' pending and future calls fail
/// with [`CollectiveError::PeerGone`] instead of hanging.
pub struct LocalGroup {
    rank: usize,
    shared: Arc<Shared>,
}

struct Shared {
    world_size: usize,
    timeout: Duration,
    state: Mutex<State>,
    cond: Condvar,
}

struct State {
    /// Each rank's contribution to the current round (reused between rounds: no allocation once warm).
    slots: Vec<Vec<f32>>,
    /// Ranks waiting at the barrier of the current generation.
    arrived: usize,
    generation: u64,
    /// Set when the group broke (a rank left, or buffers disagreed): every later call fails with it.
    broken: Option<CollectiveError>,
}

impl LocalGroup {
    /// The `world_size` members of a new group, in rank order, with [`LOCAL_GROUP_TIMEOUT`].
    pub fn new(world_size: usize) -> Vec<LocalGroup> {
        Self::with_timeout(world_size, LOCAL_GROUP_TIMEOUT)
    }

    /// As [`LocalGroup::new`], waiting at most `timeout` for the other ranks at each step.
    pub fn with_timeout(world_size: usize, timeout: Duration) -> Vec<LocalGroup> {
        let world_size = world_size.max(1);
        let shared = Arc::new(Shared {
            world_size,
            timeout,
            state: Mutex::new(State {
                slots: vec![Vec::new(); world_size],
                arrived: 0,
                generation: 0,
                broken: None,
            }),
            cond: Condvar::new(),
        });
        (0..world_size)
            .map(|rank| LocalGroup {
                rank,
                shared: Arc::clone(&shared),
            })
            .collect()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave `State` inconsistent in a way that matters: the worst
        // case is a half-written slot, and the round then fails on the barrier timeout or a departed peer.
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until every rank has called `barrier` for this generation.
    fn barrier<'a>(
        &self,
        mut st: MutexGuard<'a, State>,
    ) -> Result<MutexGuard<'a, State>, CollectiveError> {
        if let Some(e) = &st.broken {
            return Err(e.clone());
        }
        let generation = st.generation;
        st.arrived += 1;
        if st.arrived == self.shared.world_size {
            st.arrived = 0;
            st.generation += 1;
            self.shared.cond.notify_all();
            return Ok(st);
        }
        let deadline = Instant::now() + self.shared.timeout;
        while st.generation == generation {
            if let Some(e) = &st.broken {
                return Err(e.clone());
            }
            let now = Instant::now();
            if now >= deadline {
                let e = CollectiveError::Timeout {
                    arrived: st.arrived,
                    world_size: self.shared.world_size,
                    timeout: self.shared.timeout,
                };
                st.broken = Some(e.clone());
                self.shared.cond.notify_all();
                return Err(e);
            }
            st = self
                .shared
                .cond
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(st)
    }
}

impl Collective for LocalGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.world_size
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        if self.shared.world_size == 1 {
            return Ok(());
        }
        let mut st = self.lock();
        if let Some(e) = &st.broken {
            return Err(e.clone());
        }
        let slot = &mut st.slots[self.rank];
        slot.clear();
        slot.extend_from_slice(buf);
        // Round: everyone contributes, everyone sums in rank order, everyone has read before slots change.
        let mut st = self.barrier(st)?;
        if let Some((other, s)) = st
            .slots
            .iter()
            .enumerate()
            .find(|(_, s)| s.len() != buf.len())
        {
            let e = CollectiveError::LengthMismatch {
                rank: self.rank,
                got: buf.len(),
                other,
                expected: s.len(),
            };
            st.broken = Some(e.clone());
            self.shared.cond.notify_all();
            return Err(e);
        }
        buf.copy_from_slice(&st.slots[0]);
        for s in &st.slots[1..] {
            for (b, v) in buf.iter_mut().zip(s) {
                *b += v;
            }
        }
        drop(self.barrier(st)?);
        Ok(())
    }
}

impl Drop for LocalGroup {
    fn drop(&mut self) {
        let mut st = self.lock();
        if st.broken.is_none() {
            st.broken = Some(CollectiveError::PeerGone {
                rank: self.rank,
                world_size: self.shared.world_size,
            });
        }
        self.shared.cond.notify_all();
    }
}

impl std::fmt::Debug for LocalGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalGroup")
            .field("rank", &self.rank)
            .field("world_size", &self.shared.world_size)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_rank_is_identity() {
        let mut v = [1.0, -2.0];
        SingleRank.all_reduce_sum(&mut v).unwrap();
        assert_eq!(v, [1.0, -2.0]);
        assert_eq!((SingleRank.rank(), SingleRank.world_size()), (0, 1));
    }

    #[test]
    fn local_group_sums_in_rank_order_on_every_rank() {
        for world in [1, 2, 3, 4] {
            let group = LocalGroup::new(world);
            let results: Vec<Vec<f32>> = std::thread::scope(|s| {
                let handles: Vec<_> = group
                    .iter()
                    .map(|member| {
                        s.spawn(move || {
                            let mut out = Vec::new();
                            for round in 0..50 {
                                let r = member.rank() as f32;
                                let mut buf = vec![r + round as f32, 1.0, 0.1 * r];
                                member.all_reduce_sum(&mut buf).unwrap();
                                out.extend(buf);
                            }
                            out
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let n = world as f32;
            let rank_sum = (0..world).map(|r| r as f32).sum::<f32>();
            for r in &results {
                assert_eq!(r, &results[0], "ranks disagree");
                assert_eq!(r[0], rank_sum);
                assert_eq!(r[1], n);
                assert_eq!(r[3 * 49], rank_sum + n * 49.0);
            }
        }
    }

    #[test]
    fn length_mismatch_is_an_error_on_every_rank() {
        let group = LocalGroup::new(2);
        let errs: Vec<_> = std::thread::scope(|s| {
            let hs: Vec<_> = group
                .iter()
                .map(|m| {
                    s.spawn(move || {
                        let mut buf = vec![0.0; 3 + m.rank()];
                        m.all_reduce_sum(&mut buf)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for e in errs {
            let msg = e.unwrap_err().to_string();
            assert!(msg.contains("passed"), "{msg}");
        }
    }

    #[test]
    fn departed_peer_fails_instead_of_hanging() {
        let mut group = LocalGroup::new(2);
        let survivor = group.remove(0);
        drop(group);
        let err = survivor.all_reduce_sum(&mut [1.0]).unwrap_err();
        assert_eq!(
            err,
            CollectiveError::PeerGone {
                rank: 1,
                world_size: 2
            }
        );
    }

    #[test]
    fn missing_peer_times_out() {
        let group = LocalGroup::with_timeout(2, Duration::from_millis(20));
        let err = group[0].all_reduce_sum(&mut [1.0]).unwrap_err();
        assert!(
            matches!(err, CollectiveError::Timeout { arrived: 1, .. }),
            "{err}"
        );
    }
}
