//! The real SmolLM2-135M-Instruct (DESIGN.md §5; `scripts/fetch-smollm2.sh` puts it in
//! `$TESSERA_CACHE/models`, default `~/.cache/tessera/models`): greedy decoding of "The capital of France is"
//! gives " Paris", as in llama.cpp, and llama.cpp's greedy token at every prompt position is reproduced.
//! Skipped when the file is absent. `TESSERA_THREADS=N` sets the kernel threads; `TESSERA_DUMP_LOGITS=DIR` writes the engine's logits for comparison with
//! llama.cpp outside the test.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use tessera_worker::{Batch, Logits};

/// llama.cpp's `llama-tokenize` of "The capital of France is" (no BOS: SmolLM2 does not add one).
const PROMPT: [u32; 5] = [504, 3575, 282, 4649, 314];
/// llama.cpp's greedy token after each prompt position (the last one is " Paris"), identical for the
/// Q4_1, Q8_0, F16, BF16 and F32 files and for F32 or F16 KV caches.
const GREEDY: [usize; 5] = [29, 282, 260, 314, 7042];

fn model(kind: &str) -> Option<PathBuf> {
    Some(models_dir()?.join(format!("SmolLM2-135M-Instruct.{kind}.gguf"))).filter(|p| p.is_file())
}

#[test]
fn smollm2_says_paris() {
    for kind in ["Q4_1", "Q8_0", "F16", "BF16", "F32"] {
        let Some(path) = model(kind) else {
            missing(format!("SmolLM2 {kind} not cached"));
            continue;
        };
        let ckpt = shard_tool::checkpoint::Checkpoint::open(&[path]).unwrap();
        let threads = std::env::var("TESSERA_THREADS")
            .ok()
            .and_then(|t| t.parse().ok())
            .unwrap_or(1);
        let mut engine = single_threads(&ckpt, threads);
        let v = ckpt.config.n_vocab;
        let t0 = std::time::Instant::now();
        let logits = prefill_all(&mut engine, &PROMPT);
        let prefill = t0.elapsed();
        if let Some(dir) = std::env::var_os("TESSERA_DUMP_LOGITS") {
            let bytes: Vec<u8> = logits.iter().flat_map(|x| x.to_le_bytes()).collect();
            std::fs::write(
                Path::new(&dir).join(format!("smollm2.{kind}.engine.f32")),
                bytes,
            )
            .unwrap();
        }
        let greedy: Vec<usize> = logits.chunks_exact(v).map(argmax).collect();
        assert_eq!(greedy, GREEDY, "{kind}");

        // A few decode steps after the prompt, with the cache carried over.
        let mut cache = engine.new_cache(64, None).unwrap();
        let mut batch = Batch::new();
        batch.push_tokens(0, &PROMPT, Logits::Last);
        let mut next = greedy_next(&mut engine, &batch, &mut cache);
        let t0 = std::time::Instant::now();
        let mut generated = vec![next];
        for pos in PROMPT.len()..PROMPT.len() + 16 {
            batch.clear();
            batch.push_tokens(pos, &[next as u32], Logits::Last);
            next = greedy_next(&mut engine, &batch, &mut cache);
            generated.push(next);
        }
        eprintln!(
            "SmolLM2 {kind}: prefill of 5 tokens {prefill:?}, 16 decode steps {:?}, tokens {generated:?}",
            t0.elapsed()
        );
        assert_eq!(generated[0], 7042);
    }
}
