//! `engine-bench`: Tessera's engine measured the way `llama-bench` measures llama.cpp, so the two can run
//! side by side on the same file (bench/engine.sh): `pp` = one batch of N prompt tokens into an empty
//! context; `tg` = N single-token decode steps from an empty context. Prints tokens/s per repetition.
//!
//! `--parallel 1,8,32` measures batched decoding the way `llama-batched-bench -npp P -ntg N -npl 1,8,32`
//! does: B sequences with their own caches, their B×P prompt tokens in one batch, then N steps that each
//! decode one token of every sequence (logits for all B). Prints pp, tg and total (all tokens / all time)
//! tokens/s per B: the continuous-batching ceiling of the engine itself, before any transport.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;
use shard_tool::checkpoint::Checkpoint;
use shard_tool::plan::{Topology, plan};
use tessera_kernels::cpu::Pool;
use tessera_worker::{Batch, Engine, EngineOptions, Logits, SingleRank, Weights};

#[derive(Parser)]
#[command(about = "Prefill and decode tokens/s of the Tessera engine, llama-bench style")]
struct Args {
    model: PathBuf,
    /// Prompt tokens processed in one batch (llama-bench -p).
    #[arg(short = 'p', long, default_value_t = 512)]
    prompt: usize,
    /// Tokens generated one at a time (llama-bench -n).
    #[arg(short = 'n', long, default_value_t = 128)]
    n_gen: usize,
    #[arg(short = 't', long, default_value_t = 2)]
    threads: usize,
    #[arg(short = 'r', long, default_value_t = 3)]
    reps: usize,
    /// Also measure this machine's memory read bandwidth with `threads` threads and print the weight
    /// bytes one decode step reads, for the bandwidth bound of decode (bandwidth / bytes per token).
    #[arg(long)]
    bandwidth: bool,
    /// Batched decoding of this many sequences at once (comma-separated, llama-batched-bench -npl) instead of
    /// the pp / tg runs; -p and -n are then per sequence.
    #[arg(long, value_delimiter = ',')]
    parallel: Vec<usize>,
}

/// Best-of-5 read bandwidth in GB/s: `threads` threads summing disjoint parts of a 1 GiB buffer (far larger
/// than any cache), as a decode step streams its weights.
fn read_bandwidth(threads: usize) -> f64 {
    let words = (1usize << 30) / 8;
    let buf: Vec<u64> = (0..words as u64).collect();
    let part = words.div_ceil(threads.max(1));
    let mut best = 0f64;
    for _ in 0..5 {
        let t = Instant::now();
        let sum: u64 = std::thread::scope(|s| {
            let handles: Vec<_> = buf
                .chunks(part)
                .map(|c| s.spawn(move || c.iter().fold(0u64, |a, &x| a.wrapping_add(x))))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or(0))
                .fold(0, u64::wrapping_add)
        });
        std::hint::black_box(sum);
        best = best.max((words * 8) as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    best
}

fn main() -> Result<()> {
    let args = Args::parse();
    let ckpt = Checkpoint::open(std::slice::from_ref(&args.model)).context("opening the model")?;
    let spec = plan(&ckpt.config, &ckpt.tensors, &Topology::new(1, 1))?
        .shards
        .remove(0);
    let weights = Weights::from_checkpoint(&ckpt, &spec)?;
    let pool = Arc::new(Pool::new(args.threads));
    let most_seqs = args.parallel.iter().copied().max().unwrap_or(1);
    let options = EngineOptions {
        max_batch_tokens: (args.prompt * most_seqs).max(most_seqs).max(1),
        max_logits: most_seqs,
        ..tessera_worker::EngineOptions::default()
    };
    let mut engine = Engine::new(
        weights,
        ckpt.config.clone(),
        spec,
        Box::new(SingleRank),
        pool,
        options,
    )?;
    // Fixed pseudo-random token ids, like llama-bench's random prompt.
    let vocab = ckpt.config.n_vocab as u64;
    let tokens_of = |n: usize, salt: u64| -> Vec<u32> {
        (0..n as u64)
            .map(|i| ((i * 2_654_435_761 + 12_345 + salt * 7919) % vocab) as u32)
            .collect()
    };
    let name = args
        .model
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if !args.parallel.is_empty() {
        return parallel(&mut engine, &args, &name, &tokens_of);
    }
    let ctx = args.prompt.max(args.n_gen) + 1;
    let mut cache = engine.new_cache(ctx, None)?;
    let tokens = tokens_of(args.prompt, 0);
    let mut batch = Batch::with_capacity(args.prompt.max(1), 0, 1);
    // One warm-up of each (llama-bench also warms up).
    for rep in 0..=args.reps {
        if args.prompt > 0 {
            cache.clear();
            batch.clear();
            batch.push_tokens(0, &tokens, Logits::Last);
            let t = Instant::now();
            engine.forward(&batch, &mut [&mut cache])?;
            let s = t.elapsed().as_secs_f64();
            if rep > 0 {
                println!("{name}\tpp{}\t{:.2}", args.prompt, args.prompt as f64 / s);
            }
        }
        if args.n_gen > 0 {
            cache.clear();
            let t = Instant::now();
            for pos in 0..args.n_gen {
                batch.clear();
                batch.push_tokens(pos, &[tokens.get(pos).copied().unwrap_or(1)], Logits::Last);
                engine.forward(&batch, &mut [&mut cache])?;
            }
            let s = t.elapsed().as_secs_f64();
            if rep > 0 {
                println!("{name}\ttg{}\t{:.2}", args.n_gen, args.n_gen as f64 / s);
            }
        }
    }
    if args.bandwidth {
        // A decode step reads every matrix once, except the embedding (one row) unless it is also the LM
        // head (tied embeddings).
        let w = &engine.weights;
        let mut bytes = w.bytes();
        if let (Some(e), Some(h)) = (w.embedding(), w.lm_head())
            && !std::ptr::eq(e, h)
        {
            bytes -= e.data.len();
        }
        println!("{name}\tweight_bytes_per_token\t{bytes}");
        println!(
            "{name}\tread_bandwidth_GBps\t{:.2}",
            read_bandwidth(args.threads)
        );
    }
    Ok(())
}

/// `--parallel`: for each B, B sequences prefilled together (B × P tokens in one batch), then N steps of one
/// token per sequence; one warm-up repetition per B.
fn parallel(
    engine: &mut Engine<'_>,
    args: &Args,
    name: &str,
    tokens_of: &dyn Fn(usize, u64) -> Vec<u32>,
) -> Result<()> {
    let (p, n) = (args.prompt.max(1), args.n_gen);
    for &b in &args.parallel {
        let mut caches = (0..b)
            .map(|_| engine.new_cache(p + n + 1, None))
            .collect::<Result<Vec<_>, _>>()?;
        let prompts: Vec<Vec<u32>> = (0..b).map(|s| tokens_of(p, s as u64)).collect();
        let mut batch = Batch::with_capacity(b * p, 0, b);
        for rep in 0..=args.reps {
            caches.iter_mut().for_each(|c| c.clear());
            batch.clear();
            for prompt in &prompts {
                batch.push_tokens(0, prompt, Logits::Last);
            }
            let mut refs: Vec<_> = caches.iter_mut().collect();
            let t = Instant::now();
            engine.forward(&batch, &mut refs)?;
            let t_pp = t.elapsed().as_secs_f64();
            let t = Instant::now();
            for step in 0..n {
                batch.clear();
                for prompt in &prompts {
                    batch.push_tokens(p + step, &[prompt[step % p]], Logits::Last);
                }
                engine.forward(&batch, &mut refs)?;
            }
            let t_tg = t.elapsed().as_secs_f64();
            if rep > 0 {
                println!("{name}\tpl{b}_pp{p}\t{:.2}", (b * p) as f64 / t_pp);
                println!("{name}\tpl{b}_tg{n}\t{:.2}", (b * n) as f64 / t_tg);
                println!(
                    "{name}\tpl{b}_total\t{:.2}",
                    (b * (p + n)) as f64 / (t_pp + t_tg)
                );
            }
        }
    }
    Ok(())
}
