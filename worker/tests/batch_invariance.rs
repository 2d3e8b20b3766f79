//! A sequence's logits must not depend on what else is in its batch: the server batches unrelated requests
//! together, and a request must get the same tokens as when it runs alone (same seed, same output).
mod common;

use common::{missing, models_dir, open};
use shard_tool::checkpoint::Checkpoint;
use tessera_worker::{Batch, Engine, KvCache, Logits};

/// Decode logits of `a` after its prompt, alone, then batched with other sequences' decode tokens and a
/// prefill chunk, must be bit-identical.
fn check(ckpt: &Checkpoint, threads: usize) {
    let mut engine = common::single_threads(ckpt, threads);
    let v = ckpt.config.n_vocab;
    let prompt_a: Vec<u32> = (1..9).collect();
    let prompt_b: Vec<u32> = (20..31).collect();
    let prompt_c: Vec<u32> = (40..57).collect();
    let run_alone = |engine: &mut Engine<'_>| -> Vec<f32> {
        let mut cache = engine.new_cache(64, None).unwrap();
        let mut batch = Batch::new();
        batch.push_tokens(0, &prompt_a, Logits::Last);
        engine.forward(&batch, &mut [&mut cache]).unwrap();
        batch.clear();
        batch.push_tokens(prompt_a.len(), &[5], Logits::Last);
        engine
            .forward(&batch, &mut [&mut cache])
            .unwrap()
            .logits()
            .unwrap()
            .to_vec()
    };
    let alone = run_alone(&mut engine);
    // Together: A and B prefilled together, then A's decode token with B's decode and C's prefill.
    let mut caches: Vec<KvCache> = (0..3)
        .map(|_| engine.new_cache(64, None).unwrap())
        .collect();
    let mut batch = Batch::new();
    batch.push_tokens(0, &prompt_b, Logits::Last);
    batch.push_tokens(0, &prompt_a, Logits::Last);
    {
        let (c0, rest) = caches.split_at_mut(1);
        engine
            .forward(&batch, &mut [&mut c0[0], &mut rest[0]])
            .unwrap();
    }
    batch.clear();
    batch.push_tokens(prompt_b.len(), &[7], Logits::Last);
    batch.push_tokens(prompt_a.len(), &[5], Logits::Last);
    batch.push_tokens(0, &prompt_c, Logits::Last);
    let [c0, c1, c2] = &mut caches[..] else {
        unreachable!()
    };
    let out = engine
        .forward(&batch, &mut [c0, c1, c2])
        .unwrap()
        .logits()
        .unwrap()
        .to_vec();
    let together = &out[v..2 * v];
    let diff = alone
        .iter()
        .zip(together)
        .filter(|(a, b)| a.to_bits() != b.to_bits())
        .count();
    let maxd = alone
        .iter()
        .zip(together)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    eprintln!("threads {threads}: {diff} of {v} logits differ, max {maxd:e}");
    assert_eq!(
        diff, 0,
        "batched decode logits differ from alone (max {maxd:e})"
    );
}

#[test]
fn tiny_f32_batch_invariant() {
    check(&open("gguf/tiny_llama.gguf"), 1);
    check(&open("gguf/tiny_llama_q8_0.gguf"), 2);
}

#[test]
fn every_weight_type_batch_invariant() {
    let Some(dir) = models_dir() else {
        return missing("no cache dir".into());
    };
    for f in [
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct.Q4_0.gguf",
        "SmolLM2-135M-Instruct.Q8_0.gguf",
        "SmolLM2-135M-Instruct.F16.gguf",
        "SmolLM2-135M-Instruct.BF16.gguf",
        "SmolLM2-135M-Instruct.F32.gguf",
        "synth-llama3-kq.Q2_K.gguf",
        "synth-llama3-kq.Q3_K.gguf",
        "synth-llama3-kq.Q4_K.gguf",
        "synth-llama3-kq.Q5_K.gguf",
        "synth-llama3-kq.Q6_K.gguf",
    ] {
        let p = dir.join(f);
        if !p.exists() {
            return missing(format!("{} not found", p.display()));
        }
        let ckpt = Checkpoint::open(&[p]).unwrap();
        eprintln!("{f}");
        check(&ckpt, 2);
    }
}
