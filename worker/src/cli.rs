//! The worker's command line: `tessera-worker` (and the coordinator's hidden `tessera worker`) serve one shard
//! of a shard directory over gRPC until SIGINT or SIGTERM.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use tracing::{info, warn};

use crate::backend::Device;
use crate::engine::EngineOptions;
use crate::engine::Numerics;
use crate::kv_cache::KvType;
use crate::peer::PeerListener;
use crate::service::{ServiceOptions, WorkerService, serve};
use crate::weights::ShardDir;

/// Serve one shard (pipeline stage, tensor-parallel rank) of a shard directory to a Tessera coordinator.
#[derive(Debug, Clone, clap::Args)]
pub struct WorkerArgs {
    /// Shard directory written by `shard-tool split` (manifest.json and stageXX-rankYY.gguf files).
    #[arg(long, value_name = "DIR")]
    pub shard_dir: PathBuf,

    /// Pipeline stage of the shard to serve (0 holds the first layers and the embedding).
    #[arg(long, value_name = "S")]
    pub stage: usize,

    /// Tensor-parallel rank of the shard to serve within its stage.
    #[arg(long, value_name = "R", default_value_t = 0)]
    pub rank: usize,

    /// Address of the gRPC service the coordinator calls. Port 0 picks a free port (see --addr-file).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,

    /// Address the other tensor-parallel ranks of this stage connect to for all-reduces (raw TCP).
    /// Default: the IP of --listen with a free port.
    #[arg(long, value_name = "ADDR")]
    pub peer_listen: Option<SocketAddr>,

    /// Peer-link address (HOST:PORT) to report to the coordinator, which hands it to the other ranks of the
    /// stage: needed when --peer-listen binds 0.0.0.0 or the worker is reached through NAT or a Kubernetes
    /// Service. Default: the bound peer-link address.
    #[arg(long, value_name = "ADDR")]
    pub peer_advertise: Option<String>,

    /// Once both listeners are bound, write "GRPC_ADDR PEER_ADDR" (one line) to PATH, so that a launcher
    /// can learn the ports picked for port 0. Written atomically (temporary file, then rename).
    #[arg(long, value_name = "PATH")]
    pub addr_file: Option<PathBuf>,

    /// Where to run the shard: `cpu`, or `cuda:N` for GPU N (weights uploaded to GPU memory once at start;
    /// needs an NVIDIA driver: without one the worker stops with a message naming the missing library).
    #[arg(
        long,
        value_name = "DEVICE",
        default_value = "cpu",
        env = "TESSERA_DEVICE"
    )]
    pub device: Device,

    /// KV cache element type: `f16` (the default, as llama.cpp's) or `f32` (no rounding of keys and values,
    /// twice the memory; CPU only).
    #[arg(long, value_name = "TYPE", default_value = "f16")]
    pub cache_type: KvType,

    /// Float summation order of the CPU kernels: `fast` (the default: this CPU's fastest kernels) or
    /// `llama-cpp-avx2` (the orders of llama.cpp's portable AVX2 build, unpacked weights, slower; with
    /// `--cache-type f32` Q8_0 and Q4_1 models give that build's tokens bit for bit).
    #[arg(long, value_name = "ORDER", default_value = "fast")]
    pub numerics: Numerics,

    /// Threads for the compute kernels. Default: every available core.
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,

    /// Longest context (prompt plus generated tokens) of one sequence; sizes each sequence's KV cache.
    /// Default: the model's training context, at most 4096.
    #[arg(long, value_name = "N")]
    pub max_context: Option<usize>,

    /// Memory for all sequences' KV caches together, in MiB; a batch starting sequences beyond it is
    /// refused (RESOURCE_EXHAUSTED). Default: no limit.
    #[arg(long, value_name = "MIB")]
    pub kv_memory_mib: Option<u64>,

    /// Most tokens in one forward batch (prefill chunks and decode steps together).
    #[arg(long, value_name = "N", default_value_t = 512)]
    pub max_batch_tokens: usize,

    /// Most tokens of one batch that may ask for logits.
    #[arg(long, value_name = "N", default_value_t = 64)]
    pub max_logits: usize,

    /// How long an all-reduce waits for the other ranks before the epoch is given up, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 10_000)]
    pub link_timeout_ms: u64,

    /// How long JoinGroup waits for the links to all other ranks of the stage, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    pub join_timeout_secs: u64,

    /// Microseconds an all-reduce keeps polling its peer links (yielding the core between tries) before it
    /// sleeps until data arrives: lower latency for a little CPU. 0 sleeps at once.
    #[arg(long, value_name = "US", default_value_t = 50)]
    pub spin_us: u64,

    /// Skip checking the shard file's size and xxh3 checksum against the manifest at start (the check reads
    /// the whole file).
    #[arg(long)]
    pub no_verify: bool,
}

/// Runs a worker until SIGINT or SIGTERM: verifies and loads the shard, binds both listeners, serves.
/// Builds its own tokio runtime (two threads for gRPC; the engine has its own thread and kernel pool), so call
/// it from plain `main`, not from inside a runtime. Logging goes through `tracing`: the caller installs the
/// subscriber.
/// Checks `TESSERA_ISA` (a cap on the CPU kernel level, see `tessera_kernels::cpu::ISA_ENV`) before any
/// weight is packed, and logs the level the CPU kernels will use.
pub fn check_cpu_kernels() -> anyhow::Result<()> {
    tessera_kernels::cpu::Isa::cap_from_env()?;
    info!(
        kernels = tessera_kernels::cpu::Kernels::best().isa().name(),
        "CPU kernel level (cap with TESSERA_ISA)"
    );
    Ok(())
}

pub fn run(args: WorkerArgs) -> anyhow::Result<()> {
    check_cpu_kernels()?;
    let (dir, stage, rank) = (&args.shard_dir, args.stage, args.rank);
    if !args.no_verify {
        info!(dir = %dir.display(), stage, rank, "verifying the shard file's checksum (skip with --no-verify)");
        shard_tool::verify::verify_shard_file(dir, stage, rank, std::io::stderr().is_terminal())
            .with_context(|| {
                format!(
                    "verifying shard (stage {stage}, rank {rank}) of {}: refusing to serve it (re-copy or re-split \
                     the shard; --no-verify skips this check)",
                    dir.display()
                )
            })?;
    }
    let shard = ShardDir::open(dir, stage, rank).with_context(|| {
        format!(
            "opening shard (stage {stage}, rank {rank}) of {}",
            dir.display()
        )
    })?;
    let options = options(&args, &shard)?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("tessera-worker-rt")
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let result = runtime.block_on(serve_shard(&args, shard, options));
    // A JoinGroup still connecting runs on a blocking thread: do not wait for its timeout.
    runtime.shutdown_background();
    result
}

fn options(args: &WorkerArgs, shard: &ShardDir) -> anyhow::Result<ServiceOptions> {
    let n_ctx_train = shard.config().n_ctx_train;
    let max_context = match args.max_context {
        Some(0) => bail!("--max-context must be at least 1"),
        Some(n) if n > n_ctx_train => {
            bail!("--max-context {n} exceeds the model's training context of {n_ctx_train} tokens")
        }
        Some(n) => n,
        None if n_ctx_train == 0 => 4096,
        None => n_ctx_train.min(4096),
    };
    if args.max_batch_tokens == 0 {
        bail!("--max-batch-tokens must be at least 1");
    }
    let threads = match args.threads {
        Some(0) => bail!("--threads must be at least 1"),
        Some(n) => n,
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    let kv_budget_bytes = match args.kv_memory_mib {
        Some(mib) => Some(
            mib.checked_mul(1 << 20)
                .with_context(|| format!("--kv-memory-mib {mib} is too large"))?,
        ),
        None => None,
    };
    Ok(ServiceOptions {
        threads,
        engine: EngineOptions {
            max_batch_tokens: args.max_batch_tokens,
            max_logits: args.max_logits,
            device: args.device,
            kv_type: args.cache_type,
            numerics: args.numerics,
        },
        max_context,
        kv_budget_bytes,
        link_timeout: Duration::from_millis(args.link_timeout_ms),
        join_timeout: Duration::from_secs(args.join_timeout_secs),
        spin: Duration::from_micros(args.spin_us),
    })
}

async fn serve_shard(
    args: &WorkerArgs,
    shard: ShardDir,
    options: ServiceOptions,
) -> anyhow::Result<()> {
    let grpc = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding the gRPC address {} (--listen)", args.listen))?;
    let grpc_addr = grpc.local_addr().context("reading the gRPC address")?;
    let peer_bind = args
        .peer_listen
        .unwrap_or_else(|| SocketAddr::new(args.listen.ip(), 0));
    let peers = PeerListener::bind(peer_bind)
        .with_context(|| format!("binding the peer-link address {peer_bind} (--peer-listen)"))?;
    let peer_addr = peers.local_addr();
    if let Some(path) = &args.addr_file {
        write_addr_file(path, grpc_addr, peer_addr)
            .with_context(|| format!("writing --addr-file {}", path.display()))?;
    }
    if peer_addr.ip().is_unspecified() && args.peer_advertise.is_none() {
        warn!(%peer_addr, "the peer address is unspecified (0.0.0.0 / ::) and no --peer-advertise was given: other ranks cannot dial it");
    }

    let (stage, rank) = (args.stage, args.rank);
    let advertise = args.peer_advertise.clone();
    let service = tokio::task::spawn_blocking(move || {
        WorkerService::start_advertised(shard, peers, options, advertise)
    })
    .await
    .context("loading the shard")?
    .with_context(|| format!("loading shard (stage {stage}, rank {rank})"))?;
    let d = service.describe_now();
    info!(
        %grpc_addr,
        %peer_addr,
        model = %d.model,
        shard = %d.shard_file,
        stage,
        rank,
        tp = d.tp,
        pp = d.pp,
        layers = ?(d.first_layer..d.end_layer),
        vocab = ?(d.vocab_start..d.vocab_end),
        max_context = d.max_context,
        threads = options.threads,
        "worker serving"
    );
    serve(service, grpc, shutdown_signal())
        .await
        .context("serving gRPC")?;
    info!("worker stopped");
    Ok(())
}

/// Writes "GRPC_ADDR PEER_ADDR\n" so that a reader never sees a partial line.
fn write_addr_file(path: &Path, grpc: SocketAddr, peer: SocketAddr) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp.{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, format!("{grpc} {peer}\n"))?;
    std::fs::rename(&tmp, path)
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let interrupt = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            warn!(error = %e, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = interrupt => info!("SIGINT: shutting down"),
        () = terminate => info!("SIGTERM: shutting down"),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: WorkerArgs,
    }

    #[test]
    fn flags_and_defaults() {
        let a = Cli::try_parse_from(["w", "--shard-dir", "d", "--stage", "1"])
            .unwrap()
            .args;
        assert_eq!((a.stage, a.rank), (1, 0));
        assert_eq!(a.listen, "127.0.0.1:0".parse().unwrap());
        assert_eq!((a.max_batch_tokens, a.max_logits), (512, 64));
        assert!(a.peer_listen.is_none() && a.max_context.is_none() && !a.no_verify);
        assert!(Cli::try_parse_from(["w", "--stage", "0"]).is_err());
    }

    #[test]
    fn addr_file_is_one_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("addr");
        write_addr_file(
            &path,
            "127.0.0.1:5".parse().unwrap(),
            "127.0.0.1:6".parse().unwrap(),
        )
        .unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "127.0.0.1:5 127.0.0.1:6\n"
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
