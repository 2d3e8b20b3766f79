//! The cluster end to end: real `tessera worker` processes on 127.0.0.x loopback addresses (one per shard,
//! started by the same launcher as `tessera cluster`), the coordinator's remote pipeline and scheduler, all
//! checked against the single-process engine on the same file.
//!
//! Tolerances. Pipeline stages hand exact f32 hidden states on, so PP alone gives bit-identical logits and
//! tokens. Tensor parallelism sums `attn_output` / `ffn_down` per rank and then across ranks: another float
//! summation order. With float weights (SmolLM2 converted to F32; the synthetic model in F16) that stays a
//! float-rounding difference, amplified only by the f16 KV cache (a K or V value on an f16 rounding boundary
//! rounds one ulp differently, 2^-11 relative): 4.9e-3 measured after SmolLM2's 30 layers on logits of range
//! ~40, bound 1e-2 (2.5e-4 of the range); greedy continuations are identical. With the shipped Q4_1 file the activations are quantized
//! to 8 bits before every matmul, so a 1e-6 perturbation can move one across a rounding boundary and change
//! a product by a whole quantization step: 0.86 measured on logits of range ~40, the same size as between
//! two llama.cpp builds (worker/tests/llama_cpp_logits.rs); there the bound is 1.5 and greedy tokens must
//! agree up to a position where the single process's own top-two margin is below 2 × that bound.

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

/// Single-process reference: logits of the last prompt token, `n` greedy tokens, and the top-two margin of
/// the logits that chose each of them.
fn single_process(
    ckpt: &Checkpoint,
    tok: &Tokenizer,
    prompt: &[u32],
    n: usize,
) -> (Vec<f32>, Vec<u32>, Vec<f32>) {
    let spec = plan(&ckpt.config, &ckpt.tensors, &Topology::new(1, 1))
        .unwrap()
        .shards
        .remove(0);
    let weights = Weights::from_checkpoint(ckpt, &spec).unwrap();
    let opts = EngineOptions {
        max_batch_tokens: 512,
        max_logits: 512,
        ..tessera_worker::EngineOptions::default()
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
    let params = SamplingParams {
        max_tokens: Some(n),
        ..SamplingParams::greedy()
    };
    let out = generate(&mut engine, &mut cache, tok, prompt, &params, |_| {}).unwrap();
    // Teacher-forced pass over prompt + continuation: the logits behind every greedy choice.
    let mut all = prompt.to_vec();
    all.extend_from_slice(&out.tokens);
    let mut cache = engine.new_cache(512, None).unwrap();
    let mut batch = tessera_worker::Batch::new();
    batch.push_tokens(0, &all, tessera_worker::Logits::All);
    let logits = engine
        .forward(&batch, &mut [&mut cache])
        .unwrap()
        .logits()
        .unwrap()
        .to_vec();
    let v = ckpt.config.n_vocab;
    let rows: Vec<&[f32]> = logits.chunks_exact(v).collect();
    let margins = (0..out.tokens.len())
        .map(|i| {
            let mut row = rows[prompt.len() - 1 + i].to_vec();
            row.sort_by(|a, b| b.total_cmp(a));
            row[0] - row[1]
        })
        .collect();
    (rows[prompt.len() - 1].to_vec(), out.tokens, margins)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Every token event of a request (id, log-probability, alternatives), or its error.
async fn collect_events(
    mut rx: tessera::serve::GenReceiver,
) -> Result<Vec<(u32, Option<f32>, Vec<(u32, f32)>)>, tessera::serve::ServeError> {
    let mut out = Vec::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            GenEvent::Token(t) => out.push((t.id, t.logprob, t.top_logprobs)),
            GenEvent::Prompt(_) => panic!("prompt log-probabilities nobody asked for"),
            GenEvent::Done { .. } => return Ok(out),
            GenEvent::Error(e) => return Err(e),
        }
    }
    panic!("the event stream ended without Done or Error");
}

/// Every token of a request, or its error.
async fn collect(rx: tessera::serve::GenReceiver) -> Result<Vec<u32>, tessera::serve::ServeError> {
    Ok(collect_events(rx).await?.into_iter().map(|e| e.0).collect())
}

/// The remote pipeline over `workers`, once the group has formed.
async fn healthy_pipeline(workers: &tessera::launcher::LocalCluster) -> Arc<RemotePipeline> {
    let manifest = shard_tool::manifest::Manifest::load(&workers.spec.shard_dir).unwrap();
    let pipeline =
        RemotePipeline::connect(manifest, workers.worker_addrs(), RemoteOptions::default())
            .expect("connect");
    pipeline
        .wait_healthy(Duration::from_secs(60))
        .await
        .expect("cluster becomes healthy");
    pipeline
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
    let rt = runtime();
    let out = rt.block_on(async {
        let pipeline = healthy_pipeline(&workers).await;
        let batch = StepBatch {
            seqs: vec![SeqStep {
                seq_id: 1 << 40,
                start_pos: 0,
                tokens: prompt.to_vec(),
                want_logits: true,
                all_logits: false,
                top_k: 0,
                context: 512,
                prefix_from: None,
            }],
        };
        let logits = pipeline
            .forward(&batch)
            .await
            .expect("forward")
            .into_whole()
            .expect("whole rows");
        pipeline.release(&[1 << 40]).await;
        // Every position's row (prompt log-probabilities), assembled from the ranks' vocabulary slices: one
        // per token, the last one the row above, bit for bit.
        let mut all = batch.clone();
        all.seqs[0].seq_id += 1;
        all.seqs[0].all_logits = true;
        let rows = pipeline
            .forward(&all)
            .await
            .expect("forward with every row")
            .into_whole()
            .expect("whole rows");
        pipeline.release(&[all.seqs[0].seq_id]).await;
        assert_eq!(rows.len(), prompt.len() * logits.len());
        assert!(
            rows[rows.len() - logits.len()..] == logits[..],
            "tp={tp} pp={pp}: the last of every row differs from the last row alone"
        );
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

/// Greedy tokens are identical; with `margin_bound`, they may differ from the first position where the
/// reference's top-two margin is below it (there another summation order may pick the other token).
fn assert_greedy_agrees(what: &str, got: &[u32], want: &[u32], margins: &[f32], margin_bound: f32) {
    let first_diff = got.iter().zip(want).position(|(a, b)| a != b);
    match first_diff {
        None => assert_eq!(got.len(), want.len(), "{what}: continuation lengths differ"),
        Some(i) => assert!(
            margins[i] < margin_bound,
            "{what}: greedy token {i} differs ({} vs {}) where the single process's margin is {} (≥ {margin_bound})",
            got[i],
            want[i],
            margins[i]
        ),
    }
}

/// Every TP ∈ {1,2,3} × PP ∈ {1,2,3} on SmolLM2 in F32 (float tolerance, identical greedy output), and the
/// shipped Q4_1 file at TP 2 and 3 (activation-quantization tolerance, see the module doc).
#[test]
fn smollm2_every_tp_and_pp_matches_the_single_process() {
    let (Some(f32_model), Some(q4_model)) = (model(SMOLLM2_F32), model(SMOLLM2)) else {
        return;
    };
    for (path, combos, bound) in [
        (
            &f32_model,
            (1..=3)
                .flat_map(|pp| (1..=3).map(move |tp| (tp, pp)))
                .collect::<Vec<_>>(),
            1e-2f32,
        ),
        (&q4_model, vec![(2, 1), (3, 1), (2, 2)], 1.5),
    ] {
        let ckpt = Checkpoint::open(std::slice::from_ref(path)).unwrap();
        let tok = Arc::new(Tokenizer::from_checkpoint(&ckpt).unwrap());
        let prompt = tok.encode(PROMPT, true, false).unwrap();
        let (want_logits, want_tokens, margins) = single_process(&ckpt, &tok, &prompt, 16);
        assert_eq!(tok.decode(&want_tokens[..1], true), " Paris");
        let name = path.file_name().unwrap().to_string_lossy();
        for (tp, pp) in combos {
            let (logits, tokens) = cluster_run(path, tp, pp, &prompt, &tok, 16);
            let d = max_abs_diff(&logits, &want_logits);
            eprintln!(
                "{name} tp={tp} pp={pp}: max |Δlogit| {d:e}, {:?}",
                tok.decode(&tokens, true)
            );
            let bound = if tp == 1 { 0.0 } else { bound };
            assert!(
                d <= bound,
                "{name} tp={tp} pp={pp}: logits differ by {d} > {bound}"
            );
            let margin_bound = if bound <= 0.01 { 0.0 } else { 2.0 * bound };
            assert_greedy_agrees(
                &format!("{name} tp={tp} pp={pp}"),
                &tokens,
                &want_tokens,
                &margins,
                margin_bound,
            );
        }
    }
}

/// A Llama-3-shaped model (llama3-1b preset: 32 query heads, 8 KV heads, real 128256-token vocabulary),
/// two layers of F16 weights, made by `shard_tool::synth`: TP 1, 2, 4, 8 (whole KV groups per rank) and 16 (each KV head
/// on two ranks, each with two of its query heads).
#[test]
fn llama3_shaped_tp_up_to_16_matches_the_single_process() {
    let Some(vocab) = model("ggml-vocab-llama-bpe.gguf") else {
        return;
    };
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("synth-llama3-1b-2l.F16.gguf");
    if !path.is_file() {
        shard_tool::synth::synth(&shard_tool::synth::SynthOptions {
            preset: shard_tool::shapes::Preset::Llama3_1B,
            layers: Some(2),
            quant: tessera_kernels::quant::GgmlType::F16,
            tokenizer_from: Some(vocab),
            seed: 7,
            out: path.clone(),
            progress: false,
        })
        .unwrap();
    }
    let ckpt = Checkpoint::open(std::slice::from_ref(&path)).unwrap();
    assert_eq!((ckpt.config.n_head, ckpt.config.n_head_kv), (32, 8));
    let tok = Arc::new(Tokenizer::from_checkpoint(&ckpt).unwrap());
    let prompt = tok
        .encode("Tensor parallel ranks must agree.", true, false)
        .unwrap();
    let (want_logits, want_tokens, margins) = single_process(&ckpt, &tok, &prompt, 8);
    for tp in [1, 2, 4, 8, 16] {
        let (logits, tokens) = cluster_run(&path, tp, 1, &prompt, &tok, 8);
        let d = max_abs_diff(&logits, &want_logits);
        eprintln!("llama3-shaped F16 tp={tp}: max |Δlogit| {d:e}, tokens {tokens:?}");
        let bound = if tp == 1 { 0.0 } else { 1e-2 };
        assert!(d <= bound, "tp={tp}: logits differ by {d} > {bound}");
        assert_greedy_agrees(&format!("tp={tp}"), &tokens, &want_tokens, &margins, 0.0);
    }
}

/// Greedy and top-k requests take each rank's best logits and log-sum-exp instead of whole vocabulary rows;
/// the same request with a zero logit bias (which changes no logit but needs whole rows) must give the same
/// tokens and log-probabilities, through a TP=2 × PP=2 cluster whose ranks each hold half the vocabulary.
#[test]
fn best_logits_give_what_whole_rows_give() {
    let Some(path) = model(SMOLLM2_F32) else {
        return;
    };
    let ckpt = Checkpoint::open(std::slice::from_ref(&path)).unwrap();
    let tok = Arc::new(Tokenizer::from_checkpoint(&ckpt).unwrap());
    let prompt = tok.encode(PROMPT, true, false).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let workers = start_workers(&path, 2, 2, dir.path());
    let cases = [
        SamplingParams {
            max_tokens: Some(12),
            logprobs: Some(5),
            ..SamplingParams::greedy()
        },
        SamplingParams {
            max_tokens: Some(12),
            temperature: 0.9,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.02,
            logprobs: Some(2),
            seed: Some(3),
            ..Default::default()
        },
    ];
    runtime().block_on(async {
        let pipeline = healthy_pipeline(&workers).await;
        let sched = Scheduler::start(pipeline.clone(), tok.clone(), SchedulerConfig::default());
        for params in cases {
            let whole_rows = SamplingParams {
                logit_bias: vec![(0, 0.0)],
                ..params.clone()
            };
            let mut runs = Vec::new();
            for p in [params.clone(), whole_rows] {
                let rx = sched
                    .submit(GenRequest {
                        prompt: prompt.clone(),
                        params: p,
                    })
                    .expect("submit");
                runs.push(collect_events(rx).await.expect("generation"));
            }
            let (best, whole) = (&runs[0], &runs[1]);
            assert_eq!(best.len(), whole.len(), "{params:?}");
            for (b, w) in best.iter().zip(whole) {
                assert_eq!(b.0, w.0, "{params:?}: tokens differ");
                let (lb, lw) = (b.1.unwrap(), w.1.unwrap());
                assert!((lb - lw).abs() < 1e-5, "{params:?}: logprob {lb} vs {lw}");
                assert_eq!(b.2.len(), w.2.len());
                for (x, y) in b.2.iter().zip(&w.2) {
                    assert_eq!(x.0, y.0, "{params:?}: alternatives differ");
                    assert!((x.1 - y.1).abs() < 1e-5, "{params:?}: {x:?} vs {y:?}");
                }
            }
            eprintln!(
                "{params:?}: {:?}",
                tok.decode(&best.iter().map(|e| e.0).collect::<Vec<_>>(), true)
            );
        }
    });
    drop(workers);
}

/// Prompt-prefix reuse across a TP=2 × PP=2 cluster: every rank of every stage copies its slice of the kept
/// sequence's caches, and the next turn of a conversation answers as it does without reuse.
#[test]
fn reused_prefixes_on_a_cluster_answer_as_fresh_runs() {
    let Some(path) = model(SMOLLM2) else {
        return;
    };
    let ckpt = Checkpoint::open(std::slice::from_ref(&path)).unwrap();
    let tok = Arc::new(Tokenizer::from_checkpoint(&ckpt).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let workers = start_workers(&path, 2, 2, dir.path());
    let params = |seed: u64| SamplingParams {
        max_tokens: Some(10),
        temperature: 0.7,
        seed: Some(seed),
        logprobs: Some(2),
        ..Default::default()
    };
    runtime().block_on(async {
        let pipeline = healthy_pipeline(&workers).await;
        // Two schedulers on one pipeline (sequence ids never clash): one keeps prefixes, one does not.
        let kept = Scheduler::start(
            pipeline.clone(),
            tok.clone(),
            SchedulerConfig {
                prefix_cache_tokens: 2048,
                ..SchedulerConfig::default()
            },
        );
        let fresh = Scheduler::start(pipeline.clone(), tok.clone(), SchedulerConfig::default());
        let both = async |prompt: Vec<u32>, seed: u64| {
            let req = GenRequest {
                prompt,
                params: params(seed),
            };
            let a = collect_events(kept.submit(req.clone()).unwrap()).await;
            let b = collect_events(fresh.submit(req).unwrap()).await;
            assert_eq!(a, b, "kept prefixes changed an answer");
            a.expect("generation")
        };
        let turn1 = tok.encode(PROMPT, true, false).unwrap();
        let first = both(turn1.clone(), 1).await;
        let mut turn2 = turn1.clone();
        turn2.extend(first.iter().map(|e| e.0));
        turn2.extend(tok.encode(" And then?", false, false).unwrap());
        both(turn2, 2).await;
        let stats = kept.stats();
        assert!(
            stats.prefix_reused_tokens >= turn1.len() as u64,
            "{stats:?}"
        );
        eprintln!("reused {} prompt tokens", stats.prefix_reused_tokens);
    });
    drop(workers);
}
