//! The cluster end to end: real `tessera worker` processes on 127.0.0.x loopback addresses (one per shard,
//! started by the same launcher as `tessera cluster`), the coordinator's remote pipeline and scheduler, all
//! checked against the single-process engine on the same file.
//!
//! Tolerances. Pipeline stages hand exact f32 hidden states on, so PP alone gives bit-identical logits.
//! Tensor parallelism sums `attn_output` / `ffn_down` per rank and then across ranks: a different float
//! summation order, whose ~1e-6 perturbations can move a Q8_1-quantized activation across a rounding
//! boundary (one quantization step of 1/127 of a block's range). SmolLM2 Q4_1 over 30 layers: bound 0.5 on
//! logits of range ~40 (worker/tests/parallel.rs and llama_cpp_logits.rs measure the same effect); greedy
//! tokens are compared only where the single-process top-two margin exceeds twice that bound.

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use shard_tool::checkpoint::Checkpoint;
use shard_tool::plan::{Topology, plan};
use support::*;
use tessera::generate::generate;
use tessera::sampling::SamplingParams;
use tessera::serve::remote::{RemoteOptions, RemotePipeline};
use tessera::serve::{
    GenEvent, GenRequest, Pipeline, Scheduler, SchedulerConfig, SeqStep, StepBatch,
};
use tessera::tokenizer::Tokenizer;
use tessera_kernels::cpu::Pool;
use tessera_worker::{Engine, EngineOptions, SingleRank, Weights};

const PROMPT: &str = "The capital of France is";

/// Logits of the last prompt token and `n` greedy tokens from the single-process engine.
fn single_process(
    ckpt: &Checkpoint,
    tok: &Tokenizer,
    prompt: &[u32],
    n: usize,
) -> (Vec<f32>, Vec<u32>) {
    let spec = plan(&ckpt.config, &ckpt.tensors, &Topology::new(1, 1))
        .unwrap()
        .shards
        .remove(0);
    let weights = Weights::from_checkpoint(ckpt, &spec).unwrap();
    let opts = EngineOptions {
        max_batch_tokens: 512,
        max_logits: 64,
    };
    let mut engine = Engine::new(
        weights,
        ckpt.config.clone(),
        spec,
        Box::new(SingleRank),
        Arc::new(Pool::new(2)),
        opts,
    )
    .unwrap();
    let mut cache = engine.new_cache(512, None).unwrap();
    let mut batch = tessera_worker::Batch::new();
    batch.push_tokens(0, prompt, tessera_worker::Logits::Last);
    let logits = engine
        .forward(&batch, &mut [&mut cache])
        .unwrap()
        .logits()
        .unwrap()
        .to_vec();
    let mut cache = engine.new_cache(512, None).unwrap();
    let params = SamplingParams {
        max_tokens: Some(n),
        ..SamplingParams::greedy()
    };
    let out = generate(&mut engine, &mut cache, tok, prompt, &params, |_| {}).unwrap();
    (logits, out.tokens)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Every token of a request, or its error.
async fn collect(
    mut rx: tessera::serve::GenReceiver,
) -> Result<Vec<u32>, tessera::serve::ServeError> {
    let mut ids = Vec::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            GenEvent::Token(t) => ids.push(t.id),
            GenEvent::Done { .. } => return Ok(ids),
            GenEvent::Error(e) => return Err(e),
        }
    }
    panic!("the event stream ended without Done or Error");
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Runs the prompt through a `tp × pp` cluster of worker processes: last-token logits via the pipeline, and
/// `n` greedy tokens via the scheduler.
fn cluster_run(
    model: &Path,
    tp: usize,
    pp: usize,
    prompt: &[u32],
    tok: &Arc<Tokenizer>,
    n: usize,
) -> (Vec<f32>, Vec<u32>) {
    let dir = tempfile::tempdir().unwrap();
    let workers = start_workers(model, tp, pp, dir.path());
    let manifest = shard_tool::manifest::Manifest::load(&workers.spec.shard_dir).unwrap();
    let rt = runtime();
    let out = rt.block_on(async {
        let pipeline =
            RemotePipeline::connect(manifest, workers.worker_addrs(), RemoteOptions::default())
                .expect("connect");
        pipeline
            .wait_healthy(Duration::from_secs(60))
            .await
            .expect("cluster becomes healthy");
        let batch = StepBatch {
            seqs: vec![SeqStep {
                seq_id: 1,
                start_pos: 0,
                tokens: prompt.to_vec(),
                want_logits: true,
                context: 512,
            }],
        };
        let logits = pipeline.forward(&batch).await.expect("forward");
        pipeline.release(&[1]).await;
        let sched = Scheduler::start(pipeline.clone(), tok.clone(), SchedulerConfig::default());
        let params = SamplingParams {
            max_tokens: Some(n),
            ..SamplingParams::greedy()
        };
        let rx = sched
            .submit(GenRequest {
                prompt: prompt.to_vec(),
                params,
            })
            .expect("submit");
        let tokens = collect(rx).await.expect("generation");
        (logits, tokens)
    });
    drop(workers);
    out
}

/// Greedy tokens agree up to the first position where the reference's top-two margin is within `margin`
/// (there a float-order difference may legitimately pick the other token).
fn assert_greedy_agrees(what: &str, got: &[u32], want: &[u32]) {
    assert_eq!(
        got, want,
        "{what}: greedy tokens differ from the single process"
    );
}

#[test]
fn smollm2_every_tp_and_pp_matches_the_single_process() {
    let Some(model) = model(SMOLLM2) else { return };
    let ckpt = Checkpoint::open(&[model.clone()]).unwrap();
    let tok = Arc::new(Tokenizer::from_checkpoint(&ckpt).unwrap());
    let prompt = tok.encode(PROMPT, true, false).unwrap();
    let (want_logits, want_tokens) = single_process(&ckpt, &tok, &prompt, 16);
    assert_eq!(tok.decode(&want_tokens[..1], true), " Paris");
    for pp in 1..=3 {
        for tp in 1..=3 {
            let (logits, tokens) = cluster_run(&model, tp, pp, &prompt, &tok, 16);
            let d = max_abs_diff(&logits, &want_logits);
            eprintln!(
                "SmolLM2 Q4_1 tp={tp} pp={pp}: max |Δlogit| {d:e}, tokens {:?}",
                tok.decode(&tokens, true)
            );
            let bound = if tp == 1 { 0.0 } else { 0.5 };
            assert!(
                d <= bound,
                "tp={tp} pp={pp}: logits differ by {d} > {bound}"
            );
            assert_greedy_agrees(&format!("tp={tp} pp={pp}"), &tokens, &want_tokens);
        }
    }
}

/// A Llama-3-shaped model (llama3-1b preset: 32 query heads, 8 KV heads, real 128256-token vocabulary),
/// two layers, made by `shard_tool::synth`: TP 1, 2, 4, 8 (whole KV groups per rank) and 16 (each KV head
/// on two ranks, each with two of its query heads).
#[test]
fn llama3_shaped_tp_up_to_16_matches_the_single_process() {
    let Some(vocab) = model("ggml-vocab-llama-bpe.gguf") else {
        return;
    };
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("synth-llama3-1b-2l.Q8_0.gguf");
    if !path.is_file() {
        shard_tool::synth::synth(&shard_tool::synth::SynthOptions {
            preset: shard_tool::shapes::Preset::Llama3_1b,
            layers: Some(2),
            quant: tessera_kernels::quant::GgmlType::Q8_0,
            tokenizer_from: Some(vocab),
            seed: 7,
            out: path.clone(),
            progress: false,
        })
        .unwrap();
    }
    let ckpt = Checkpoint::open(&[path.clone()]).unwrap();
    assert_eq!((ckpt.config.n_head, ckpt.config.n_head_kv), (32, 8));
    let tok = Arc::new(Tokenizer::from_checkpoint(&ckpt).unwrap());
    let prompt = tok
        .encode("Tensor parallel ranks must agree.", true, false)
        .unwrap();
    let (want_logits, want_tokens) = single_process(&ckpt, &tok, &prompt, 6);
    for tp in [1, 2, 4, 8, 16] {
        let (logits, tokens) = cluster_run(&path, tp, 1, &prompt, &tok, 6);
        let d = max_abs_diff(&logits, &want_logits);
        eprintln!("llama3-shaped Q8_0 tp={tp}: max |Δlogit| {d:e}, tokens {tokens:?}");
        let bound = if tp == 1 { 0.0 } else { 0.5 };
        assert!(d <= bound, "tp={tp}: logits differ by {d} > {bound}");
        assert_greedy_agrees(&format!("tp={tp}"), &tokens, &want_tokens);
    }
}
