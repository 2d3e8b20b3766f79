//! `tessera-worker`: serves one shard of a shard directory to a Tessera coordinator (see `cli.rs`).

use clap::Parser;
use tessera_worker::cli::{WorkerArgs, run};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "tessera-worker",
    version,
    about = "Serve one shard (pipeline stage, tensor-parallel rank) of a Tessera shard directory over gRPC",
    after_help = "Example:\n  shard-tool split model.gguf --tp 2 --pp 1 -o shards/\n  tessera-worker --shard-dir shards/ \
                  --stage 0 --rank 0 --listen 10.0.0.5:7000 --peer-listen 10.0.0.5:7001\n\nLogging: RUST_LOG \
                  (default info)."
)]
struct Cli {
    #[command(flatten)]
    args: WorkerArgs,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    run(cli.args)
}
