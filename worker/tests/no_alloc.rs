//! "Nothing is allocated per token": after one warm-up call, decode steps (and same-sized prefill chunks)
//! make no heap allocation at all. A counting global allocator watches the test's own thread (the engine
//! runs the kernels inline with a one-thread pool).

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::*;
use tessera_worker::{Batch, Logits};

struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);
thread_local! {
    static WATCHING: Cell<bool> = const { Cell::new(false) };
}

// SAFETY: forwards every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if WATCHING.with(Cell::get) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if WATCHING.with(Cell::get) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn decode_allocates_nothing() {
    for model in ["gguf/tiny_llama.gguf", "gguf/tiny_llama_q8_0.gguf"] {
        let ckpt = open(model);
        let mut engine = single(&ckpt);
        let mut caches: Vec<_> = (0..3)
            .map(|_| engine.new_cache(64, None).unwrap())
            .collect();
        let mut batch = Batch::with_capacity(64, 0, 3);
        // Warm-up: the largest batch shape this test uses, so scratch buffers reach their final size.
        for (i, c) in caches.iter_mut().enumerate() {
            batch.clear();
            batch.push_tokens(0, &[283, 51, 257, 220 + i as u32], Logits::All);
            engine.forward(&batch, &mut [c]).unwrap();
        }
        ALLOCATIONS.store(0, Ordering::Relaxed);
        WATCHING.with(|w| w.set(true));
        for pos in 4..20 {
            batch.clear();
            for (i, _) in caches.iter().enumerate() {
                batch.push_tokens(pos, &[(pos * 7 + i) as u32 % 288], Logits::Last);
            }
            let [a, b, c] = &mut caches[..] else {
                unreachable!()
            };
            let out = engine.forward(&batch, &mut [a, b, c]).unwrap();
            assert_eq!(out.logits().unwrap().len(), 3 * 288);
        }
        WATCHING.with(|w| w.set(false));
        assert_eq!(
            ALLOCATIONS.load(Ordering::Relaxed),
            0,
            "{model}: allocations during decode"
        );
    }
}
