//! `shard-tool`: inspect, plan, split, verify and synthesize Llama-family checkpoints.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use shard_tool::checkpoint::Checkpoint;
use shard_tool::config::ModelConfig;
use shard_tool::plan::{ShardPlan, Topology, memory_report, plan};
use shard_tool::shapes::{Preset, parameter_count, tensor_descs};
use shard_tool::split::{SplitOptions, split};
use shard_tool::synth::{SynthOptions, synth};
use shard_tool::tensor::TensorDesc;
use shard_tool::verify::verify;
use tessera_kernels::quant::GgmlType;

const MODEL_HELP: &str = "MODEL is a GGUF file; the first (or every) file of a gguf-split set \
(name-00001-of-00003.gguf); byte-split pieces in order (x.gguf.cat0 x.gguf.cat1 …, or only .cat0); a llamafile; \
or a Hugging Face directory with config.json and *.safetensors. PyTorch .pth/.bin pickles are refused: convert \
them first.";

#[derive(Parser)]
#[command(
    name = "shard-tool",
    version,
    about = "Reads Llama-family checkpoints and splits them into tensor-parallel × pipeline-parallel shards",
    long_about = "Reads Llama-family checkpoints (GGUF, gguf-split, byte-split pieces, llamafile, safetensors) \
and splits them into one GGUF per (pipeline stage, tensor-parallel rank), plus a manifest that Tessera workers \
and the coordinator read.\n\nTypical use:\n  shard-tool inspect model.gguf\n  shard-tool plan model.gguf --tp 2 --pp 2\n  \
shard-tool split model.gguf --tp 2 --pp 2 -o shards/\n  shard-tool verify shards/ --source model.gguf",
    after_help = MODEL_HELP
)]
struct Cli {
    /// Log more (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show architecture, hyperparameters, parameter count, quantization mix and tokenizer of a checkpoint.
    #[command(after_help = MODEL_HELP)]
    Inspect {
        #[arg(required = true, value_name = "MODEL")]
        model: Vec<PathBuf>,
    },
    /// Print how a model would be split: bytes per shard and memory per node including the KV cache.
    #[command(after_help = MODEL_HELP)]
    Plan {
        /// The checkpoint (or use --shape for a capacity dry-run without a file).
        #[arg(value_name = "MODEL", required_unless_present = "shape")]
        model: Vec<PathBuf>,
        /// A known model shape instead of a file: tiny, smollm, llama3-1b, llama3-8b, llama3-70b, llama3-405b.
        #[arg(long, conflicts_with = "model")]
        shape: Option<Preset>,
        /// Weight type for --shape (F16, BF16, Q8_0, Q4_K, ...).
        #[arg(long, default_value = "BF16", requires = "shape", value_parser = parse_type)]
        quant: GgmlType,
        /// Layers for --shape (default: the real model's).
        #[arg(long, requires = "shape")]
        layers: Option<usize>,
        #[command(flatten)]
        topo: TopologyArgs,
        /// Context length (tokens) each sequence's KV cache holds.
        #[arg(long, default_value_t = 4096)]
        ctx: usize,
        /// Concurrent sequences (KV caches) per node.
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Bytes per KV-cache element (2 = f16).
        #[arg(long, default_value_t = 2)]
        kv_bytes: usize,
        /// Print the per-node memory as JSON (exact bytes) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Write one GGUF shard per (stage, rank) and manifest.json into a directory.
    #[command(after_help = MODEL_HELP)]
    Split {
        #[arg(required = true, value_name = "MODEL")]
        model: Vec<PathBuf>,
        #[command(flatten)]
        topo: TopologyArgs,
        /// Output directory (created if missing).
        #[arg(short, long)]
        out: PathBuf,
        /// Replace a shard set already in the output directory.
        #[arg(long)]
        force: bool,
        /// No progress bar.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Check a shard directory: sizes and checksums, and with --source every slice against the checkpoint.
    Verify {
        /// Directory written by `shard-tool split`.
        dir: PathBuf,
        /// The checkpoint the shards were made from.
        #[arg(long, num_args = 1.., value_name = "MODEL")]
        source: Vec<PathBuf>,
        #[arg(short, long)]
        quiet: bool,
    },
    /// Write a random-weight GGUF with a real model's shape (for tests, benchmarks, capacity dry-runs).
    Synth {
        /// tiny, smollm, llama3-1b, llama3-8b, llama3-70b or llama3-405b.
        #[arg(long)]
        shape: Preset,
        /// Keep only the first N layers.
        #[arg(long)]
        layers: Option<usize>,
        /// Matrix type (norms stay F32; rows not divisible by the block size fall back to Q8_0 / F16).
        #[arg(long, default_value = "Q8_0", value_parser = parse_type)]
        quant: GgmlType,
        /// Copy the tokenizer from this GGUF (e.g. llama.cpp's ggml-vocab-llama-bpe.gguf).
        #[arg(long, value_name = "GGUF")]
        tokenizer: Option<PathBuf>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(short, long)]
        out: PathBuf,
        #[arg(short, long)]
        quiet: bool,
    },
}

#[derive(Args)]
struct TopologyArgs {
    /// Tensor-parallel ranks per stage (heads, FFN rows and vocabulary are divided among them).
    #[arg(long, default_value_t = 1)]
    tp: usize,
    /// Pipeline stages (contiguous layer ranges, balanced by bytes unless --layer-ranges is given).
    #[arg(long, default_value_t = 1)]
    pp: usize,
    /// Explicit inclusive layer ranges per stage, e.g. 0-14,15-29.
    #[arg(long)]
    layer_ranges: Option<String>,
}

impl TopologyArgs {
    fn topology(&self) -> Result<Topology> {
        let mut t = Topology::new(self.tp, self.pp);
        if let Some(text) = &self.layer_ranges {
            t = t.with_layer_ranges(Topology::parse_layer_ranges(text).context("--layer-ranges")?);
        }
        Ok(t)
    }
}

fn parse_type(s: &str) -> Result<GgmlType, String> {
    GgmlType::from_name(s).ok_or_else(|| {
        format!(
            "unknown type `{s}`; use one of {}",
            tessera_kernels::quant::SUPPORTED_TYPES
        )
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default = ["warn", "info", "debug"][cli.verbose.min(2) as usize];
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn open(paths: &[PathBuf]) -> Result<Checkpoint> {
    Checkpoint::open(paths).with_context(|| format!("cannot open {}", paths[0].display()))
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Inspect { model } => inspect(&open(&model)?),
        Command::Plan {
            model,
            shape,
            quant,
            layers,
            topo,
            ctx,
            batch,
            kv_bytes,
            json,
        } => {
            let (config, tensors) = match shape {
                Some(preset) => {
                    let config = preset.config_with_layers(layers);
                    let tensors = tensor_descs(&config, quant);
                    (config, tensors)
                }
                None => {
                    let ckpt = open(&model)?;
                    (ckpt.config.clone(), ckpt.tensors.clone())
                }
            };
            let p = plan(&config, &tensors, &topo.topology()?)?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&memory_report(
                        &p, &config, ctx, batch, kv_bytes
                    ))?
                );
            } else {
                print_plan(&config, &p, ctx, batch, kv_bytes);
            }
            Ok(())
        }
        Command::Split {
            model,
            topo,
            out,
            force,
            quiet,
        } => {
            let ckpt = open(&model)?;
            let p = plan(&ckpt.config, &ckpt.tensors, &topo.topology()?)?;
            let started = std::time::Instant::now();
            let manifest = split(
                &ckpt,
                &p,
                &SplitOptions {
                    out_dir: out.clone(),
                    force,
                    progress: !quiet,
                },
            )
            .with_context(|| format!("splitting into {}", out.display()))?;
            let bytes: u64 = manifest.shards.iter().map(|s| s.entry.bytes).sum();
            let secs = started.elapsed().as_secs_f64();
            println!(
                "wrote {} shards ({}) and manifest.json to {} in {secs:.2} s ({:.2} GB/s)",
                manifest.shards.len(),
                human(bytes),
                out.display(),
                bytes as f64 / secs.max(1e-9) / 1e9
            );
            Ok(())
        }
        Command::Verify { dir, source, quiet } => {
            let ckpt = if source.is_empty() {
                None
            } else {
                Some(open(&source)?)
            };
            let report = verify(&dir, ckpt.as_ref(), !quiet)
                .with_context(|| format!("verifying {}", dir.display()))?;
            println!(
                "ok: {} files, {} checksummed",
                report.files,
                human(report.bytes)
            );
            if ckpt.is_some() {
                println!(
                    "ok: {} tensor slices equal the source bytes",
                    report.tensors_compared
                );
            }
            Ok(())
        }
        Command::Synth {
            shape,
            layers,
            quant,
            tokenizer,
            seed,
            out,
            quiet,
        } => {
            if let Some(l) = layers
                && l == 0
            {
                bail!("--layers must be at least 1");
            }
            let opts = SynthOptions {
                preset: shape,
                layers,
                quant,
                tokenizer_from: tokenizer,
                seed,
                out,
                progress: !quiet,
            };
            let config = synth(&opts).with_context(|| format!("writing {}", opts.out.display()))?;
            println!(
                "wrote {} ({} layers, {} parameters)",
                opts.out.display(),
                config.n_layer,
                parameter_count(&config)
            );
            Ok(())
        }
    }
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

fn inspect(ckpt: &Checkpoint) -> Result<()> {
    let c = &ckpt.config;
    println!(
        "file:            {}",
        ckpt.paths
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!("format:          {}", ckpt.format);
    println!(
        "architecture:    {}{}",
        c.arch,
        c.name
            .as_ref()
            .map(|n| format!(" ({n})"))
            .unwrap_or_default()
    );
    println!("layers:          {}", c.n_layer);
    println!("hidden size:     {}", c.n_embd);
    println!(
        "heads:           {} (KV heads {}, head dim {})",
        c.n_head, c.n_head_kv, c.head_dim
    );
    println!("FFN size:        {}", c.n_ff);
    println!("vocabulary:      {}", c.n_vocab);
    println!("context (train): {}", c.n_ctx_train);
    print!(
        "rope:            base {}, {} dims",
        c.rope_theta, c.rope_dim
    );
    match (&c.rope_scaling, ckpt.position("rope_freqs.weight")) {
        (Some(s), _) => println!(
            ", llama3 scaling factor {} (original context {})",
            s.factor, s.original_max_position_embeddings
        ),
        (None, Some(_)) => println!(", frequency factors in rope_freqs.weight (Llama 3.1 scaling)"),
        (None, None) => println!(),
    }
    println!("rms eps:         {}", c.rms_eps);
    println!(
        "embeddings:      {}",
        if c.tied_embeddings {
            "tied (LM head = token_embd)"
        } else {
            "separate output.weight"
        }
    );
    let params: u64 = ckpt
        .tensors
        .iter()
        .filter(|t| t.name != "rope_freqs.weight")
        .map(TensorDesc::n_elements)
        .sum();
    let bytes: u64 = ckpt.tensors.iter().filter_map(|t| t.n_bytes().ok()).sum();
    println!(
        "parameters:      {params} ({:.2} B), {} of weights",
        params as f64 / 1e9,
        human(bytes)
    );
    let mut mix: BTreeMap<&str, (usize, u64)> = BTreeMap::new();
    for t in &ckpt.tensors {
        let e = mix.entry(t.ty.name()).or_default();
        e.0 += 1;
        e.1 += t.n_bytes().unwrap_or(0);
    }
    println!(
        "tensor types:    {}",
        mix.iter()
            .map(|(k, (n, b))| format!("{k} ×{n} ({})", human(*b)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let tok = ckpt.tokenizer_summary();
    print!("tokenizer:       {}", tok.kind);
    if let Some(n) = tok.n_tokens {
        print!(", {n} tokens");
    }
    if let (Some(b), Some(e)) = (tok.bos, tok.eos) {
        print!(", bos {b}, eos {e}");
    }
    println!();
    println!(
        "chat template:   {}",
        match &ckpt.chat_template {
            Some(t) => format!("present ({} chars)", t.len()),
            None => "none".into(),
        }
    );
    Ok(())
}

fn print_plan(config: &ModelConfig, p: &ShardPlan, ctx: usize, batch: usize, kv_bytes: usize) {
    println!(
        "topology: tp={} pp={} ({} nodes); KV cache for ctx {ctx} × batch {batch} at {kv_bytes} bytes/element",
        p.topology.tp,
        p.topology.pp,
        p.shards.len()
    );
    for s in &p.stages {
        println!(
            "stage {}: layers {}-{}{}{}",
            s.index,
            s.layers.start,
            s.layers.end.saturating_sub(1),
            if s.embedding { ", token embedding" } else { "" },
            if s.head { ", final norm + LM head" } else { "" }
        );
    }
    println!();
    println!(
        "{:>5} {:>4}  {:>9} {:>9} {:>13} {:>15} {:>12} {:>12} {:>12}",
        "stage",
        "rank",
        "q heads",
        "kv heads",
        "ffn rows",
        "vocab rows",
        "weights",
        "KV cache",
        "total"
    );
    let mem = memory_report(p, config, ctx, batch, kv_bytes);
    for (spec, m) in p.shards.iter().zip(&mem) {
        let r = |r: &std::ops::Range<usize>| {
            if r.is_empty() {
                "-".to_string()
            } else {
                format!("{}-{}", r.start, r.end - 1)
            }
        };
        println!(
            "{:>5} {:>4}  {:>9} {:>9} {:>13} {:>15} {:>12} {:>12} {:>12}",
            spec.stage,
            spec.rank,
            r(&spec.q_heads),
            r(&spec.kv_heads),
            r(&spec.ffn_rows),
            r(&spec.vocab_rows),
            human(m.weight_bytes),
            human(m.kv_cache_bytes),
            human(m.total)
        );
    }
    let max = mem.iter().map(|m| m.total).max().unwrap_or(0);
    let sum: u64 = mem.iter().map(|m| m.total).sum();
    println!(
        "\nlargest node: {}; all nodes: {} (weights + KV cache; activations and runtime overhead not included)",
        human(max),
        human(sum)
    );
}
