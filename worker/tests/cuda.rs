//! The engine on `Device::Cuda`. Without an NVIDIA driver (this repository's CI machine) asking for a GPU is
//! a clear error naming the missing library, never a panic. With one (the lent GPU machine), the CUDA
//! forward pass matches the CPU engine on the tiny fixture.

mod common;

use std::sync::Arc;

use common::*;
use tessera_kernels::cpu::Pool;
use tessera_kernels::cuda::library_status;
use tessera_worker::{Batch, Device, Engine, EngineOptions, Error, Logits, SingleRank, Weights};

const F32: &str = "gguf/tiny_llama.gguf";

fn engine_on(
    ckpt: &shard_tool::checkpoint::Checkpoint,
    device: Device,
) -> Result<Engine<'_>, Error> {
    let spec = plan_for(ckpt, 1, 1).shards.remove(0);
    let weights = Weights::from_checkpoint_for(ckpt, &spec, device)?;
    let options = EngineOptions {
        device,
        ..options()
    };
    Engine::new(
        weights,
        ckpt.config.clone(),
        spec,
        Box::new(SingleRank),
        Arc::new(Pool::new(1)),
        options,
    )
}

#[test]
fn cuda_without_a_driver_is_a_clear_error() {
    if library_status().driver {
        eprintln!("an NVIDIA driver is present: cuda_matches_cpu_on_tiny covers this machine");
        return;
    }
    let ckpt = open(F32);
    let err = engine_on(&ckpt, Device::Cuda(0))
        .err()
        .expect("no driver, yet the engine opened");
    let msg = err.to_string();
    assert!(matches!(err, Error::Device { .. }), "{err:?}");
    assert!(msg.starts_with("device cuda:0: "), "{msg}");
    assert!(
        msg.contains("libcuda"),
        "the message names the missing library: {msg}"
    );
    assert!(
        msg.contains("--device cpu"),
        "the message says what works instead: {msg}"
    );
}

#[test]
fn cuda_matches_cpu_on_tiny() {
    if !library_status().driver {
        eprintln!(
            "no NVIDIA driver on this machine: nothing to compare (see cuda_without_a_driver_is_a_clear_error)"
        );
        return;
    }
    let ckpt = open(F32);
    let tokens: Vec<u32> = (1..40).map(|i| (i * 37 % 200) as u32).collect();
    let run = |device| {
        let mut engine = engine_on(&ckpt, device).unwrap();
        let mut cache = engine.new_cache(64, None).unwrap();
        assert_eq!(cache.is_on_gpu(), device != Device::Cpu);
        let mut logits = Vec::new();
        // A prefill chunk, then decode steps: both attention paths.
        let mut batch = Batch::new();
        batch.push_tokens(0, &tokens[..32], Logits::All);
        logits.extend_from_slice(
            engine
                .forward(&batch, &mut [&mut cache])
                .unwrap()
                .logits()
                .unwrap(),
        );
        for (i, &t) in tokens[32..].iter().enumerate() {
            batch.clear();
            batch.push_tokens(32 + i, &[t], Logits::Last);
            logits.extend_from_slice(
                engine
                    .forward(&batch, &mut [&mut cache])
                    .unwrap()
                    .logits()
                    .unwrap(),
            );
        }
        logits
    };
    let (cpu, gpu) = (run(Device::Cpu), run(Device::Cuda(0)));
    assert_eq!(cpu.len(), gpu.len());
    let range =
        cpu.iter().fold(f32::MIN, |a, &b| a.max(b)) - cpu.iter().fold(f32::MAX, |a, &b| a.min(b));
    let max_diff = cpu
        .iter()
        .zip(&gpu)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    eprintln!("tiny F32: max |Δlogit| {max_diff:.3e} of a logit range {range:.2}");
    // f32 weights and activations on both; the CPU quantizes no activations for F32 matmuls. What differs is
    // summation order and the f16 KV cache rounding, which both devices do.
    assert!(
        max_diff <= 1e-3 * range,
        "max |Δlogit| {max_diff} > 1e-3 × range {range}"
    );
}
