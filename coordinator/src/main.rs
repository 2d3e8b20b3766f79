//! `tessera`: run Llama-family models. `tessera run` generates on this machine (llamafile-style `-p`
//! completion); serving a cluster (`tessera serve`, `tessera cluster`) comes with the cluster work.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use shard_tool::checkpoint::Checkpoint;
use shard_tool::manifest::MANIFEST_NAME;
use shard_tool::plan::{Topology, plan};
use tessera::chat::{ChatMessage, ChatTemplate};
use tessera::generate::generate;
use tessera::sampling::SamplingParams;
use tessera::tokenizer::Tokenizer;
use tessera_kernels::cpu::Pool;
use tessera_worker::{Engine, EngineOptions, ShardDir, SingleRank, Weights};

#[derive(Parser)]
#[command(
    name = "tessera",
    version,
    about = "Serve and run Llama-family language models"
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
    /// Generate text from a prompt on this machine, streaming it to stdout.
    #[command(
        after_help = "MODEL is a GGUF file, gguf-split set, byte-split .catN pieces, llamafile, Hugging Face \
safetensors directory, or a shard directory holding a single shard (shard-tool split --tp 1 --pp 1).\n\n\
Example:\n  tessera run SmolLM2-135M-Instruct.Q4_1.gguf -p 'The capital of France is' -n 16 --temp 0"
    )]
    Run(RunArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    #[arg(required = true, value_name = "MODEL")]
    model: Vec<PathBuf>,
    /// The prompt (completion mode), or the user message with --chat.
    #[arg(short, long)]
    prompt: String,
    /// Most tokens to generate.
    #[arg(short = 'n', long, default_value_t = 128)]
    n_predict: usize,
    /// Context length in tokens (KV cache size).
    #[arg(long, default_value_t = 4096)]
    ctx: usize,
    /// Sampling temperature; 0 = greedy.
    #[arg(long, default_value_t = 0.8)]
    temp: f32,
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    #[arg(long, default_value_t = 0.05)]
    min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    /// Random seed (same seed, same output).
    #[arg(long)]
    seed: Option<u64>,
    /// Stop before this string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Wrap the prompt in the model's chat template as a user message.
    #[arg(long)]
    chat: bool,
    /// System message for --chat.
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// Compute threads (default: all cores).
    #[arg(short, long)]
    threads: Option<usize>,
    /// Print the prompt and timings to stderr.
    #[arg(long)]
    verbose_prompt: bool,
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
    let result = match cli.command {
        Command::Run(args) => run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: RunArgs) -> Result<()> {
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if threads == 0 {
        bail!("--threads must be at least 1");
    }
    let pool = Arc::new(Pool::new(threads));
    let options = EngineOptions {
        max_batch_tokens: 512,
        max_logits: 1,
    };
    let params = SamplingParams {
        temperature: args.temp,
        top_k: args.top_k,
        top_p: args.top_p,
        min_p: args.min_p,
        repetition_penalty: args.repeat_penalty,
        seed: args.seed,
        max_tokens: Some(args.n_predict),
        stop: args.stop.clone(),
        ..SamplingParams::default()
    };
    let first = &args.model[0];
    if args.model.len() == 1 && first.join(MANIFEST_NAME).is_file() {
        let dir = ShardDir::open(first, 0, 0)
            .with_context(|| format!("opening shard directory {}", first.display()))?;
        if dir.manifest.plan.shards.len() != 1 {
            bail!(
                "{} holds {} shards (tp={}, pp={}); `tessera run` runs a single shard — serve the set with `tessera serve`",
                first.display(),
                dir.manifest.plan.shards.len(),
                dir.manifest.plan.topology.tp,
                dir.manifest.plan.topology.pp
            );
        }
        let tokenizer = Tokenizer::from_shard_dir(first, &dir.manifest)?;
        let template = dir.manifest.chat_template.clone();
        let weights = Weights::from_shard_dir(&dir)?;
        let engine = Engine::new(
            weights,
            dir.config().clone(),
            dir.spec.clone(),
            Box::new(SingleRank),
            pool,
            options,
        )?;
        return run_engine(engine, &tokenizer, template.as_deref(), &args, &params);
    }
    let ckpt =
        Checkpoint::open(&args.model).with_context(|| format!("opening {}", first.display()))?;
    let tokenizer = Tokenizer::from_checkpoint(&ckpt).context("building the tokenizer")?;
    let spec = plan(&ckpt.config, &ckpt.tensors, &Topology::new(1, 1))?
        .shards
        .remove(0);
    let weights = Weights::from_checkpoint(&ckpt, &spec)?;
    let engine = Engine::new(
        weights,
        ckpt.config.clone(),
        spec,
        Box::new(SingleRank),
        pool,
        options,
    )?;
    run_engine(
        engine,
        &tokenizer,
        ckpt.chat_template.as_deref(),
        &args,
        &params,
    )
}

fn run_engine(
    mut engine: Engine<'_>,
    tokenizer: &Tokenizer,
    template: Option<&str>,
    args: &RunArgs,
    params: &SamplingParams,
) -> Result<()> {
    let prompt = if args.chat {
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(ChatMessage::new("system", system.clone()));
        }
        messages.push(ChatMessage::new("user", args.prompt.clone()));
        let text = ChatTemplate::for_model(template, tokenizer)?.render(&messages, true)?;
        tokenizer.encode(&text, false, true)?
    } else {
        tokenizer.encode(&args.prompt, true, false)?
    };
    let mut cache = engine.new_cache(args.ctx, None)?;
    if args.verbose_prompt {
        eprintln!(
            "prompt ({} tokens): {:?}",
            prompt.len(),
            tokenizer.decode(&prompt, false)
        );
        eprintln!("KV cache: {} bytes for {} tokens", cache.bytes(), args.ctx);
    }
    let mut stdout = std::io::stdout().lock();
    if !args.chat {
        write!(stdout, "{}", args.prompt)?;
    }
    let out = generate(
        &mut engine,
        &mut cache,
        tokenizer,
        &prompt,
        params,
        |text| {
            let _ = write!(stdout, "{text}");
            let _ = stdout.flush();
        },
    )?;
    writeln!(stdout)?;
    if args.verbose_prompt {
        let tps = |n: usize, d: std::time::Duration| n as f64 / d.as_secs_f64().max(1e-9);
        eprintln!(
            "prefill: {} tokens in {:.1} ms ({:.1} tok/s); decode: {} tokens in {:.1} ms ({:.1} tok/s)",
            out.prompt_tokens,
            out.prefill_time.as_secs_f64() * 1e3,
            tps(out.prompt_tokens, out.prefill_time),
            out.tokens.len(),
            out.decode_time.as_secs_f64() * 1e3,
            tps(out.tokens.len(), out.decode_time)
        );
    }
    Ok(())
}
