//! `tessera`: run and serve Llama-family models. `tessera run` generates on this machine (llamafile-style
//! `-p` completion); `tessera serve` serves one process's model or a cluster of workers over the OpenAI HTTP
//! API and gRPC; `tessera cluster` starts the workers of a split model on this machine and serves them;
//! `tessera worker` is the worker (also shipped as `tessera-worker`).

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use tessera::chat::{ChatMessage, ChatTemplate};
use tessera::generate::generate;
use tessera::launcher::{LaunchSpec, LocalCluster, prepare_shards};
use tessera::sampling::SamplingParams;
use tessera::serve::local::LocalPipeline;
use tessera::serve::remote::{RemoteOptions, RemotePipeline, WorkerAddr};
use tessera::serve::{Pipeline, SchedulerConfig};
use tessera::tokenizer::Tokenizer;
use tessera_worker::{Device, Engine, EngineOptions, KvType, Numerics};

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
    /// Serve a model over the OpenAI-compatible HTTP API and gRPC (tessera.v1).
    #[command(after_help = SERVE_HELP)]
    Serve(ServeArgs),
    /// Split a model (or reuse its shards), start one worker process per shard on this machine, and serve.
    #[command(after_help = CLUSTER_HELP)]
    Cluster(ClusterArgs),
    /// Serve one shard to a coordinator (the same program as `tessera-worker`).
    #[command(hide = true)]
    Worker(tessera_worker::cli::WorkerArgs),
}

const SERVE_HELP: &str = "Two ways to serve:\n\
  In this process:  tessera serve MODEL.gguf --http 127.0.0.1:8080\n\
  A cluster:        tessera serve --shards DIR --worker 10.0.0.2:7000 --worker 10.0.0.3:7000 …\n\
\n\
With --shards, the workers are given in stage-major order (stage 0 rank 0, stage 0 rank 1, …, stage 1 rank 0 …)\n\
with --worker (repeatable, or comma-separated in TESSERA_WORKERS) or --workers-file (lines `STAGE RANK ADDR`, #\n\
comments). The coordinator checks that each worker serves the shard it should, forms the tensor-parallel\n\
groups, and re-forms them by itself when a worker comes back after a failure.\n\
\n\
Clients: POST /v1/chat/completions, /v1/completions (SSE with \"stream\": true), GET /v1/models, /health,\n\
/metrics; gRPC tessera.v1.Tessera with reflection and grpc.health.v1.";

const CLUSTER_HELP: &str = "Example (2 tensor-parallel ranks × 2 pipeline stages = 4 worker processes):\n\
  tessera cluster SmolLM2-135M-Instruct.Q4_1.gguf --tp 2 --pp 2 --http 127.0.0.1:8080\n\
  curl http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' \\\n\
    -d '{\"messages\":[{\"role\":\"user\",\"content\":\"What is the capital of France?\"}]}'\n\
\n\
Shards are written to --shard-dir (default $TESSERA_CACHE/shards/NAME-tpT-ppP, reused when the source is\n\
unchanged); MODEL may also be a shard directory. Workers listen on 127.0.0.2, 127.0.0.3, …; their logs are\n\
in the shard directory's run/ folder. SIGINT/SIGTERM stops every process the launcher started.";

/// Where the client-facing listeners go and how requests are scheduled (shared by serve and cluster).
#[derive(clap::Args)]
struct ListenArgs {
    /// OpenAI-compatible HTTP listener ("off" to disable).
    #[arg(
        long,
        value_name = "ADDR",
        default_value = "127.0.0.1:8080",
        env = "TESSERA_HTTP"
    )]
    http: String,
    /// gRPC listener for tessera.v1 ("off" to disable).
    #[arg(
        long,
        value_name = "ADDR",
        default_value = "127.0.0.1:50051",
        env = "TESSERA_GRPC"
    )]
    grpc: String,
    /// Longest prompt + completion of one request, in tokens.
    #[arg(long, default_value_t = 4096)]
    ctx: usize,
    /// Most sequences generating at once (continuous batching).
    #[arg(long, default_value_t = 64)]
    max_running: usize,
    /// Most requests waiting for a slot; more are refused with 429 / RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = 256)]
    max_queued: usize,
    /// KV cache positions that finished requests keep on the model (the sum of their context sizes) so that
    /// a prompt starting with the same tokens (the next turn of a chat, a shared system prompt) reuses their
    /// keys and values instead of prefilling them again; least recently used first out, and dropped first
    /// when KV memory runs out. 0 turns prompt-prefix reuse off. Kept caches count against the workers'
    /// --kv-memory-mib: with several stages, a batch refused for memory partway fails its requests, so size
    /// the two together.
    #[arg(long, value_name = "N", default_value_t = 8192)]
    prefix_cache_tokens: usize,
    /// Write the bound addresses (`http=ADDR`, `grpc=ADDR`) to this file once listening (useful with port 0).
    #[arg(long, value_name = "PATH")]
    addr_file: Option<PathBuf>,
}

impl ListenArgs {
    fn addr(value: &str, flag: &str) -> Result<Option<SocketAddr>> {
        if value.eq_ignore_ascii_case("off") {
            return Ok(None);
        }
        value.parse().map(Some).with_context(|| {
            format!("--{flag} {value}: expected HOST:PORT (an IP address) or `off`")
        })
    }

    fn scheduler(&self) -> SchedulerConfig {
        SchedulerConfig {
            max_running: self.max_running,
            max_queued: self.max_queued,
            prefix_cache_tokens: self.prefix_cache_tokens,
            ..SchedulerConfig::default()
        }
    }
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Model to serve in this process (any input `tessera run` accepts). Omit it with --shards.
    #[arg(value_name = "MODEL", conflicts_with = "shards")]
    model: Vec<PathBuf>,
    /// Shard directory (manifest.json + tokenizer) of the model the workers serve.
    #[arg(long, value_name = "DIR", requires = "workers_given")]
    shards: Option<PathBuf>,
    /// A worker's gRPC address, in stage-major order; repeat, or comma-separate in TESSERA_WORKERS.
    #[arg(
        long = "worker",
        value_name = "ADDR",
        env = "TESSERA_WORKERS",
        value_delimiter = ',',
        group = "workers_given"
    )]
    workers: Vec<String>,
    /// File listing workers, one `STAGE RANK ADDR` per line.
    #[arg(long, value_name = "FILE", group = "workers_given")]
    workers_file: Option<PathBuf>,
    /// Compute threads and device when serving in this process.
    #[command(flatten)]
    engine: EngineArgs,
    #[command(flatten)]
    listen: ListenArgs,
}

#[derive(clap::Args)]
struct ClusterArgs {
    #[arg(required = true, value_name = "MODEL")]
    model: Vec<PathBuf>,
    /// Tensor-parallel ranks per stage.
    #[arg(long)]
    tp: Option<usize>,
    /// Pipeline stages.
    #[arg(long)]
    pp: Option<usize>,
    /// Where to write (or find) the shards.
    #[arg(long, value_name = "DIR")]
    shard_dir: Option<PathBuf>,
    /// Compute threads of each worker (default: cores / workers, at least 1).
    #[arg(short, long)]
    threads: Option<usize>,
    /// Where the workers run: `cpu`, `cuda:N`, or a comma-separated list with one device per worker in
    /// stage-major order (e.g. `--tp 2 --pp 2 --device cuda:0,cuda:1,cpu,cpu`: stage 0 on two GPUs, stage 1
    /// on the CPU).
    #[arg(
        long,
        value_name = "DEVICE",
        value_delimiter = ',',
        default_value = "cpu"
    )]
    device: Vec<Device>,
    /// KV cache element type: `f16` (the default, as llama.cpp's) or `f32` (no rounding of keys and
    /// values, twice the memory; CPU only), for every worker.
    #[arg(long, value_name = "TYPE", default_value = "f16")]
    cache_type: KvType,
    /// Float summation order of the CPU kernels: `fast` (the default: this CPU's fastest kernels) or
    /// `llama-cpp-avx2` (the orders of llama.cpp's portable AVX2 build, unpacked weights, slower; with
    /// `--cache-type f32` Q8_0 and Q4_1 models give that build's tokens bit for bit).
    #[arg(long, value_name = "ORDER", default_value = "fast")]
    numerics: Numerics,
    /// Restart a worker that exits on its own (the coordinator re-forms the cluster when it is back).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    restart_workers: bool,
    #[command(flatten)]
    listen: ListenArgs,
}

/// Where a model run in this process computes (`tessera run`, `tessera serve MODEL`).
#[derive(clap::Args)]
struct EngineArgs {
    /// Compute threads (default: all cores).
    #[arg(short, long)]
    threads: Option<usize>,
    /// Where to run the model: `cpu`, or `cuda:N` for GPU N (needs an NVIDIA driver).
    #[arg(
        long,
        value_name = "DEVICE",
        default_value = "cpu",
        env = "TESSERA_DEVICE"
    )]
    device: Device,
    /// KV cache element type: `f16` (the default, as llama.cpp's) or `f32` (no rounding of keys and
    /// values, twice the memory; CPU only).
    #[arg(long, value_name = "TYPE", default_value = "f16")]
    cache_type: KvType,
    /// Float summation order of the CPU kernels: `fast` (the default: this CPU's fastest kernels) or
    /// `llama-cpp-avx2` (the orders of llama.cpp's portable AVX2 build, unpacked weights, slower; with
    /// `--cache-type f32` Q8_0 and Q4_1 models give that build's tokens bit for bit).
    #[arg(long, value_name = "ORDER", default_value = "fast")]
    numerics: Numerics,
}

impl EngineArgs {
    /// `--threads`, or every available core.
    fn threads(&self) -> usize {
        self.threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    }
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
    #[command(flatten)]
    engine: EngineArgs,
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
        Command::Run(args) => tessera_worker::cli::check_cpu_kernels().and_then(|()| run(args)),
        Command::Serve(args) => tessera_worker::cli::check_cpu_kernels().and_then(|()| serve(args)),
        Command::Cluster(args) => {
            tessera_worker::cli::check_cpu_kernels().and_then(|()| cluster(args))
        }
        Command::Worker(args) => tessera_worker::cli::run(args),
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
    let threads = args.engine.threads();
    if threads == 0 {
        bail!("--threads must be at least 1");
    }
    let options = EngineOptions {
        max_batch_tokens: 512,
        max_logits: 1,
        device: args.engine.device,
        kv_type: args.engine.cache_type,
        numerics: args.engine.numerics,
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
    let opened = tessera::serve::local::open_model(&args.model, threads, options)
        .with_context(|| format!("opening {}", args.model[0].display()))?;
    run_engine(
        opened.engine,
        &opened.tokenizer,
        opened.template.as_deref(),
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

fn tokio_runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn serve(args: ServeArgs) -> Result<()> {
    let http = ListenArgs::addr(&args.listen.http, "http")?;
    let grpc = ListenArgs::addr(&args.listen.grpc, "grpc")?;
    let rt = tokio_runtime()?;
    let _guard = rt.enter();
    let (model, pipeline): (_, Arc<dyn Pipeline>) = if let Some(dir) = &args.shards {
        let manifest = shard_tool::manifest::Manifest::load(dir)
            .with_context(|| format!("reading the manifest of {}", dir.display()))?;
        let workers = match &args.workers_file {
            Some(file) => read_workers_file(file)?,
            None => stage_major(&args.workers, &manifest)?,
        };
        let model = tessera::server::model_from_shards(dir, &manifest, args.listen.ctx)?;
        let pipeline = RemotePipeline::connect(manifest, workers, RemoteOptions::default())
            .context("connecting to the workers")?;
        (model, pipeline)
    } else {
        if args.model.is_empty() {
            bail!("give a MODEL to serve in this process, or --shards DIR with --worker addresses");
        }
        let threads = args.engine.threads();
        let options = EngineOptions {
            max_batch_tokens: 512,
            max_logits: 64,
            device: args.engine.device,
            kv_type: args.engine.cache_type,
            numerics: args.engine.numerics,
        };
        let (pipeline, model) = LocalPipeline::open(&args.model, threads, args.listen.ctx, options)
            .with_context(|| format!("opening {}", args.model[0].display()))?;
        (model, Arc::new(pipeline))
    };
    let addr_file = args.listen.addr_file.clone();
    rt.block_on(tessera::server::run(
        model,
        pipeline,
        args.listen.scheduler(),
        http,
        grpc,
        move |bound| write_addrs(bound, addr_file.as_deref()),
        tessera::server::shutdown_signal(),
    ))
}

fn write_addrs(bound: tessera::server::BoundAddrs, file: Option<&Path>) -> Result<()> {
    if let Some(f) = file {
        bound
            .write(f)
            .with_context(|| format!("writing {}", f.display()))?;
    }
    Ok(())
}

/// Workers given in stage-major order, paired with the manifest's (stage, rank) positions.
fn stage_major(
    addrs: &[String],
    manifest: &shard_tool::manifest::Manifest,
) -> Result<Vec<WorkerAddr>> {
    let topo = &manifest.plan.topology;
    if addrs.len() != topo.tp * topo.pp {
        bail!(
            "the shard set has tp={} × pp={} = {} shards, but {} worker addresses were given",
            topo.tp,
            topo.pp,
            topo.tp * topo.pp,
            addrs.len()
        );
    }
    Ok(addrs
        .iter()
        .enumerate()
        .map(|(i, a)| WorkerAddr {
            stage: i / topo.tp,
            rank: i % topo.tp,
            addr: a.trim().to_owned(),
        })
        .collect())
}

/// `STAGE RANK ADDR` lines; `#` starts a comment.
fn read_workers_file(path: &Path) -> Result<Vec<WorkerAddr>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let parts: Vec<&str> = line.split_whitespace().collect();
        let bad = || {
            format!(
                "{}:{}: expected `STAGE RANK ADDR`, got `{line}`",
                path.display(),
                i + 1
            )
        };
        let [stage, rank, addr] = parts[..] else {
            bail!(bad());
        };
        out.push(WorkerAddr {
            stage: stage.parse().with_context(bad)?,
            rank: rank.parse().with_context(bad)?,
            addr: addr.to_owned(),
        });
    }
    Ok(out)
}

fn cluster(args: ClusterArgs) -> Result<()> {
    let http = ListenArgs::addr(&args.listen.http, "http")?;
    let grpc = ListenArgs::addr(&args.listen.grpc, "grpc")?;
    let (shards, manifest) = prepare_shards(
        &args.model,
        args.tp,
        args.pp,
        args.shard_dir.clone(),
        std::io::IsTerminal::is_terminal(&std::io::stderr()),
    )
    .with_context(|| format!("preparing shards of {}", args.model[0].display()))?;
    let topo = manifest.plan.topology.clone();
    let n_workers = topo.tp * topo.pp;
    let threads = args.threads.unwrap_or_else(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        (cores / n_workers).max(1)
    });
    let exe = std::env::current_exe().context("finding the tessera executable")?;
    let run_dir = shards.join("run");
    eprintln!(
        "starting {n_workers} workers (tp={} × pp={}, {threads} thread(s) each) for {}",
        topo.tp,
        topo.pp,
        shards.display()
    );
    let cluster = LocalCluster::start(LaunchSpec {
        worker_command: vec![exe.to_string_lossy().into_owned(), "worker".into()],
        shard_dir: shards.clone(),
        tp: topo.tp,
        pp: topo.pp,
        threads,
        devices: args.device.clone(),
        extra_args: vec![
            "--max-context".into(),
            args.listen.ctx.to_string(),
            "--cache-type".into(),
            args.cache_type.to_string(),
            "--numerics".into(),
            args.numerics.to_string(),
        ],
        run_dir: run_dir.clone(),
        ready_timeout: std::time::Duration::from_secs(600),
    })
    .context("starting the workers")?;
    let pids: String = cluster
        .workers
        .iter()
        .map(|w| {
            format!(
                "{} {} {} {}\n",
                w.stage,
                w.rank,
                w.grpc_addr,
                w.pid().unwrap_or(0)
            )
        })
        .collect();
    std::fs::write(run_dir.join("workers.txt"), pids)
        .with_context(|| format!("writing {}", run_dir.join("workers.txt").display()))?;
    let workers = cluster.worker_addrs();
    let cluster = Arc::new(std::sync::Mutex::new(cluster));
    let rt = tokio_runtime()?;
    let _guard = rt.enter();
    if args.restart_workers {
        let cluster = cluster.clone();
        rt.spawn(async move {
            loop {
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                let cluster = cluster.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    let Ok(mut c) = cluster.lock() else { return };
                    for (i, status) in c.exited() {
                        tracing::warn!(worker = i, %status, "worker exited; restarting it");
                        if let Err(e) = c.restart_worker(i) {
                            tracing::error!("restarting worker {i}: {e}");
                        }
                    }
                })
                .await;
            }
        });
    }
    let model = tessera::server::model_from_shards(&shards, &manifest, args.listen.ctx)?;
    let pipeline = RemotePipeline::connect(manifest, workers, RemoteOptions::default())
        .context("connecting to the workers")?;
    let addr_file = args.listen.addr_file.clone();
    let result = rt.block_on(tessera::server::run(
        model,
        pipeline,
        args.listen.scheduler(),
        http,
        grpc,
        move |bound| {
            if let Some(a) = bound.http {
                eprintln!("serving on http://{a} (OpenAI-compatible)");
            }
            if let Some(a) = bound.grpc {
                eprintln!("serving on {a} (gRPC tessera.v1)");
            }
            write_addrs(bound, addr_file.as_deref())
        },
        tessera::server::shutdown_signal(),
    ));
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    if let Ok(mut c) = cluster.lock() {
        c.shutdown(std::time::Duration::from_secs(3));
    }
    result
}
