//! `cluster-bench`: what tensor parallelism over worker processes costs, and what continuous batching buys.
//!
//! 1. Per-token decode latency: the single process (the engine in-process, `--threads` threads) against a
//!    TP=2 cluster (two `tessera worker` processes on 127.0.0.2/3, `--threads / 2` threads each), both
//!    driven through the same `Pipeline` interface with the same teacher-forced tokens after the same prompt.
//! 2. The all-reduce round trip per call, as the workers measure it (`Stats.all_reduce_us / all_reduces`).
//! 3. Aggregate generated tokens/s with 1, 8 and 32 concurrent requests through the scheduler on the TP=2
//!    cluster (greedy, fixed lengths: no request stops early).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use tessera::launcher::{LaunchSpec, LocalCluster, prepare_shards};
use tessera::sampling::SamplingParams;
use tessera::serve::local::LocalPipeline;
use tessera::serve::remote::{RemoteOptions, RemotePipeline};
use tessera::serve::{
    GenEvent, GenRequest, Pipeline, Scheduler, SchedulerConfig, SeqStep, StepBatch,
};
use tessera_proto::worker::v1::StatsRequest;
use tessera_proto::worker::v1::worker_client::WorkerClient;
use tessera_worker::EngineOptions;

#[derive(Parser)]
#[command(about = "Tensor-parallel latency and concurrent-stream throughput of a Tessera cluster")]
struct Args {
    model: PathBuf,
    /// Total compute threads (the single process gets all; each of the TP=2 workers half).
    #[arg(short = 't', long, default_value_t = 2)]
    threads: usize,
    /// Prompt tokens before the timed decode steps.
    #[arg(short = 'p', long, default_value_t = 32)]
    prompt: usize,
    /// Timed decode steps.
    #[arg(short = 'n', long, default_value_t = 64)]
    n_gen: usize,
    /// Concurrent streams to measure (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    streams: Vec<usize>,
    /// Tokens each stream generates in the throughput runs.
    #[arg(long, default_value_t = 32)]
    stream_tokens: usize,
    /// The `tessera` binary that runs workers.
    #[arg(long, default_value = "target/release/tessera")]
    tessera: PathBuf,
    /// Where shards and worker logs go.
    #[arg(long, default_value = "target/cluster-bench")]
    work_dir: PathBuf,
}

fn tokens(n: usize, vocab: usize, salt: u64) -> Vec<u32> {
    (0..n as u64)
        .map(|i| ((i * 2_654_435_761 + 12_345 + salt * 7919) % vocab as u64) as u32)
        .collect()
}

/// Mean seconds per decode step after a prompt, teacher-forced.
async fn decode_latency(p: &dyn Pipeline, prompt: &[u32], steps: &[u32]) -> Result<f64> {
    let ctx = prompt.len() + steps.len() + 1;
    let seq = |start: usize, toks: Vec<u32>| StepBatch {
        seqs: vec![SeqStep {
            seq_id: 7,
            start_pos: start,
            tokens: toks,
            want_logits: true,
            all_logits: false,
            // What the scheduler asks for a greedy request: the best logit of each rank's slice.
            top_k: 1,
            context: ctx,
            prefix_from: None,
        }],
    };
    p.forward(&seq(0, prompt.to_vec())).await?;
    // One untimed step warms caches and the links.
    p.forward(&seq(prompt.len(), vec![steps[0]])).await?;
    let started = Instant::now();
    for (i, &t) in steps[1..].iter().enumerate() {
        p.forward(&seq(prompt.len() + 1 + i, vec![t])).await?;
    }
    let secs = started.elapsed().as_secs_f64() / (steps.len() - 1) as f64;
    p.release(&[7]).await;
    Ok(secs)
}

/// Aggregate generated tokens/s of `n` concurrent greedy requests of `len` tokens each.
async fn throughput(
    sched: &tessera::serve::SchedulerHandle,
    n: usize,
    len: usize,
    prompt_len: usize,
    vocab: usize,
) -> Result<f64> {
    let started = Instant::now();
    let mut rxs = Vec::new();
    for i in 0..n {
        let params = SamplingParams {
            max_tokens: Some(len),
            ..SamplingParams::greedy()
        };
        // Random-weight models rarely emit an end token; a request that stops early would only lower the
        // count, never inflate it.
        rxs.push(sched.submit(GenRequest {
            prompt: tokens(prompt_len, vocab, i as u64 + 1),
            params,
        })?);
    }
    let mut total = 0usize;
    for mut rx in rxs {
        while let Some(ev) = rx.recv().await {
            match ev {
                GenEvent::Token(_) => total += 1,
                // Not asked for here.
                GenEvent::Prompt(_) => {}
                GenEvent::Done { .. } => break,
                GenEvent::Error(e) => anyhow::bail!("request failed: {e}"),
            }
        }
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

fn main() -> Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let _guard = rt.enter();
    let options = EngineOptions {
        max_batch_tokens: 512,
        max_logits: 64,
        ..tessera_worker::EngineOptions::default()
    };
    let ctx = 1024;
    let (local, model) = LocalPipeline::open(
        std::slice::from_ref(&args.model),
        args.threads,
        ctx,
        options,
    )
    .context("opening the model in-process")?;
    let vocab = model.config.n_vocab;
    let prompt = tokens(args.prompt, vocab, 0);
    let steps = tokens(args.n_gen + 1, vocab, 99);
    let single = rt.block_on(decode_latency(&local, &prompt, &steps))?;
    drop(local);

    let (shards, manifest) = prepare_shards(
        std::slice::from_ref(&args.model),
        Some(2),
        Some(1),
        Some(args.work_dir.join("shards-tp2")),
        false,
    )?;
    let cluster = LocalCluster::start(LaunchSpec {
        worker_command: vec![args.tessera.to_string_lossy().into_owned(), "worker".into()],
        shard_dir: shards,
        tp: 2,
        pp: 1,
        threads: (args.threads / 2).max(1),
        devices: Vec::new(),
        extra_args: vec!["--max-context".into(), ctx.to_string()],
        run_dir: args.work_dir.join("run"),
        ready_timeout: Duration::from_secs(600),
    })?;
    let addrs = cluster.worker_addrs();
    let remote = RemotePipeline::connect(manifest, addrs.clone(), RemoteOptions::default())?;
    rt.block_on(remote.wait_healthy(Duration::from_secs(120)))?;
    let stats = |addr: String| async move {
        let mut c = WorkerClient::connect(format!("http://{addr}")).await?;
        let s = c.stats(StatsRequest {}).await?.into_inner();
        anyhow::Ok((s.all_reduces, s.all_reduce_us, s.compute_us))
    };
    let before = rt.block_on(stats(addrs[0].addr.clone()))?;
    let tp2 = rt.block_on(decode_latency(remote.as_ref(), &prompt, &steps))?;
    let after = rt.block_on(stats(addrs[0].addr.clone()))?;
    let calls = after.0 - before.0;
    let ar_us = (after.1 - before.1) as f64 / calls.max(1) as f64;

    println!("model: {}", args.model.display());
    println!(
        "| decode ms/token: single process ({} threads) | TP=2 ({} thread(s) each) | TP=2 overhead |",
        args.threads,
        (args.threads / 2).max(1)
    );
    println!("|---|---|---|");
    println!(
        "| {:.3} | {:.3} | {:+.1}% |",
        single * 1e3,
        tp2 * 1e3,
        (tp2 / single - 1.0) * 100.0
    );
    println!(
        "all-reduce (rank 0, during the TP=2 decode): {calls} calls, mean {ar_us:.1} µs per call (incl. waiting for the peer)"
    );

    let sched = Scheduler::start(
        remote.clone(),
        model.tokenizer.clone(),
        SchedulerConfig::default(),
    );
    println!(
        "| concurrent streams (TP=2) | aggregate tokens/s | × one stream | rank 0 busy (compute incl. all-reduce) |"
    );
    println!("|---|---|---|---|");
    let mut one = None;
    for &n in &args.streams {
        let before = rt.block_on(stats(addrs[0].addr.clone()))?;
        let started = Instant::now();
        let tps = rt.block_on(throughput(&sched, n, args.stream_tokens, 16, vocab))?;
        let wall = started.elapsed().as_secs_f64();
        let after = rt.block_on(stats(addrs[0].addr.clone()))?;
        let busy = (after.2 - before.2) as f64 / 1e6 / wall;
        let base = *one.get_or_insert(tps);
        println!(
            "| {n} | {tps:.1} | {:.2} | {:.0}% |",
            tps / base,
            busy * 100.0
        );
    }
    drop(cluster);
    Ok(())
}
