//! A persistent worker pool for kernels, in the manner of ggml's threadpool: workers spin briefly on an epoch
//! counter and then sleep on a condvar, so a `run` costs a few microseconds when calls come back to back
//! (decode issues hundreds per token) without burning a shared core when the pool is idle.
//!
//! `run(f)` publishes `f` to every worker, runs `f(0, n)` on the caller, then waits until every worker has
//! returned. The closure is borrowed, not boxed: `run` does not return before the last worker is done with it.

use std::any::Any;
use std::cell::UnsafeCell;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long an idle worker (or a caller waiting for workers) spins before sleeping. Decode calls `run` every
/// few microseconds, so a worker that just finished should still be spinning when the next call arrives.
const SPIN: Duration = Duration::from_micros(200);

/// Low half of `Shared::claim`: the next unclaimed thread index of the current job.
const INDEX_MASK: u64 = 0xffff_ffff;

type Job = dyn Fn(usize, usize) + Sync;

struct Shared {
    n_threads: usize,
    /// `epoch << 32 | next index`. Indices are claimed with `fetch_add`; whoever claims index `i < n` runs
    /// `f(i, n)`, so a worker that the OS has not scheduled yet never holds the caller up: the caller claims
    /// and runs the indices nobody took.
    claim: AtomicU64,
    /// Indices of the current job finished.
    done: AtomicUsize,
    /// The current job, lifetime-erased. Written only by `run` while no index is claimable (before
    /// publishing a new epoch, after every index finished).
    job: UnsafeCell<Option<*const Job>>,
    panic: Mutex<Option<Box<dyn Any + Send>>>,
    shutdown: AtomicBool,
    sleepers: AtomicUsize,
    wake_lock: Mutex<()>,
    wake: Condvar,
}

// SAFETY: `job` is only written by the thread holding `Pool::run_lock` while no index can be claimed (the
// protocol above), and the pointee is `Sync`; everything else is atomics and mutexes.
unsafe impl Sync for Shared {}
// SAFETY: as above; the raw job pointer is only dereferenced while its `run` call is blocked.
unsafe impl Send for Shared {}

impl Shared {
    /// Whether the current epoch still has unclaimed indices.
    fn has_work(&self) -> bool {
        (self.claim.load(Ordering::Acquire) & INDEX_MASK) < self.n_threads as u64
    }

    /// Claims and runs indices of the current job until none is left.
    fn work(&self) {
        let n = self.n_threads;
        loop {
            let i = (self.claim.fetch_add(1, Ordering::AcqRel) & INDEX_MASK) as usize;
            if i >= n {
                return;
            }
            // SAFETY: index `i < n` of the current epoch is claimed, so that epoch's `run` cannot return
            // (it waits for `done == n`) and `job` holds its closure, published before the claim counter
            // was reset (release/acquire through `claim`).
            if let Some(job) = unsafe { *self.job.get() } {
                // SAFETY: see above; the pointee outlives this call.
                let f = unsafe { &*job };
                if let Err(p) = catch_unwind(AssertUnwindSafe(|| f(i, n))) {
                    *self.panic.lock().unwrap_or_else(|e| e.into_inner()) = Some(p);
                }
            }
            self.done.fetch_add(1, Ordering::AcqRel);
        }
    }
}

/// Worker threads for kernels. `Pool::new(1)` has no workers and runs closures inline.
pub struct Pool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    run_lock: Mutex<()>,
}

impl Pool {
    /// A pool of `n_threads` threads in all, the caller of [`Pool::run`] included (so `n_threads - 1` workers
    /// are spawned). 0 is taken as 1.
    pub fn new(n_threads: usize) -> Self {
        let n_threads = n_threads.max(1);
        let shared = Arc::new(Shared {
            n_threads,
            // Epoch 0 with every index taken: nothing to do.
            claim: AtomicU64::new(n_threads as u64),
            done: AtomicUsize::new(0),
            job: UnsafeCell::new(None),
            panic: Mutex::new(None),
            shutdown: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            wake_lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        let workers = (1..n_threads)
            .map(|i| {
                let shared = Arc::clone(&shared);
                std::thread::Builder::new()
                    .name(format!("tessera-kernel-{i}"))
                    .spawn(move || worker(&shared))
                    .expect("spawning a kernel worker thread")
            })
            .collect();
        Self {
            shared,
            workers,
            run_lock: Mutex::new(()),
        }
    }

    /// Threads that take part in [`Pool::run`], the caller included.
    pub fn n_threads(&self) -> usize {
        self.shared.n_threads
    }

    /// Runs `f(index, n_threads)` once for every `index` in `0..n_threads` and returns when all have
    /// finished. A panic in any of them is re-raised here.
    ///
    /// Indices go to whichever thread claims them first (the caller takes the ones a descheduled worker has
    /// not reached), so `f` must not rely on each index running on its own thread: no barriers between
    /// indices. Split work by index or, better, by an atomic chunk counter.
    ///
    /// If the pool is already running a job (a nested call from inside `f`, or another thread sharing the
    /// pool), the calls are made one after another on the calling thread instead of deadlocking.
    pub fn run<F: Fn(usize, usize) + Sync>(&self, f: F) {
        let n = self.shared.n_threads;
        let guard = match self.run_lock.try_lock() {
            Ok(g) => g,
            Err(_) => {
                for i in 0..n {
                    f(i, n);
                }
                return;
            }
        };
        if n == 1 {
            f(0, 1);
            return;
        }
        self.run_parallel(&f, guard);
    }

    fn run_parallel<'f>(
        &self,
        f: &'f (dyn Fn(usize, usize) + Sync + 'f),
        _guard: MutexGuard<'_, ()>,
    ) {
        let s = &*self.shared;
        let n = s.n_threads;
        // SAFETY: no index is claimable now (the previous job finished all of its indices, or this is the
        // first), so no thread reads `job`. The lifetime is erased; the pointer is only dereferenced by a
        // thread holding a claimed index, and we wait for every index below before returning.
        unsafe {
            *s.job.get() = Some(std::mem::transmute::<
                &'f (dyn Fn(usize, usize) + Sync + 'f),
                &'static Job,
            >(f) as *const Job);
        }
        s.done.store(0, Ordering::Relaxed);
        let epoch = (s.claim.load(Ordering::Relaxed) >> 32) + 1;
        s.claim.store(epoch << 32, Ordering::SeqCst);
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            let _l = s.wake_lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }

        s.work();

        let start = Instant::now();
        let mut spins = 0u32;
        while s.done.load(Ordering::Acquire) != n {
            spins += 1;
            if spins < 64 || start.elapsed() < SPIN {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        // SAFETY: every index finished and none is claimable, so nobody reads `job`.
        unsafe {
            *s.job.get() = None;
        }
        if let Some(p) = s.panic.lock().unwrap_or_else(|e| e.into_inner()).take() {
            resume_unwind(p);
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let s = &*self.shared;
        s.shutdown.store(true, Ordering::SeqCst);
        {
            let _l = s.wake_lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("n_threads", &self.shared.n_threads)
            .finish()
    }
}

fn worker(s: &Shared) {
    loop {
        // Wait for claimable work: spin first, then sleep.
        let start = Instant::now();
        let mut spins = 0u32;
        while !s.has_work() {
            if s.shutdown.load(Ordering::Relaxed) {
                return;
            }
            spins += 1;
            if spins < 64 || start.elapsed() < SPIN {
                std::hint::spin_loop();
                continue;
            }
            let mut l = s.wake_lock.lock().unwrap_or_else(|e| e.into_inner());
            s.sleepers.fetch_add(1, Ordering::SeqCst);
            while !s.has_work() && !s.shutdown.load(Ordering::SeqCst) {
                l = s.wake.wait(l).unwrap_or_else(|e| e.into_inner());
            }
            s.sleepers.fetch_sub(1, Ordering::SeqCst);
        }
        s.work();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_every_index_once() {
        for n in [1, 2, 3, 5] {
            let pool = Pool::new(n);
            for _ in 0..200 {
                let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                pool.run(|i, nt| {
                    assert_eq!(nt, n);
                    hits[i].fetch_add(1, Ordering::Relaxed);
                });
                assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
            }
        }
    }

    #[test]
    fn nested_run_does_not_deadlock() {
        let pool = Pool::new(2);
        let total = AtomicUsize::new(0);
        pool.run(|_, _| {
            pool.run(|_, _| {
                total.fetch_add(1, Ordering::Relaxed);
            });
        });
        assert_eq!(total.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn worker_panic_reaches_the_caller_and_pool_survives() {
        let pool = Pool::new(2);
        let r = catch_unwind(AssertUnwindSafe(|| {
            pool.run(|i, _| {
                if i == 1 {
                    panic!("boom");
                }
            })
        }));
        assert!(r.is_err());
        let total = AtomicUsize::new(0);
        pool.run(|_, _| {
            total.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(total.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn sleeping_workers_wake_up() {
        let pool = Pool::new(2);
        std::thread::sleep(Duration::from_millis(5));
        let total = AtomicUsize::new(0);
        pool.run(|_, _| {
            total.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(total.load(Ordering::Relaxed), 2);
    }
}
