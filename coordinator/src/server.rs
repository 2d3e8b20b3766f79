//! Putting a server together: the served model from a shard directory, the scheduler over a pipeline, and
//! the HTTP and gRPC listeners bound up front (so `--http 127.0.0.1:0` reports the port it got).

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use shard_tool::manifest::Manifest;

use crate::api::{self, AppState};
use crate::chat::ChatTemplate;
use crate::serve::{Pipeline, Scheduler, SchedulerConfig, ServedModel};
use crate::tokenizer::Tokenizer;

/// The model a shard directory holds, as the front ends describe it. `max_context`: longest prompt +
/// completion of one request (the workers' limit is checked again when the pipeline forms).
pub fn model_from_shards(
    dir: &Path,
    manifest: &Manifest,
    max_context: usize,
) -> anyhow::Result<ServedModel> {
    let tokenizer = Tokenizer::from_shard_dir(dir, manifest)
        .with_context(|| format!("reading the tokenizer of {}", dir.display()))?;
    let template = ChatTemplate::for_model(manifest.chat_template.as_deref(), &tokenizer)
        .context("compiling the model's chat template")?;
    let source = manifest.source.paths.first().cloned().unwrap_or_default();
    let id = crate::serve::local::model_id(&source, manifest.config.name.as_deref());
    Ok(ServedModel {
        id,
        tokenizer: Arc::new(tokenizer),
        template,
        config: manifest.config.clone(),
        max_context,
        tp: manifest.plan.topology.tp,
        pp: manifest.plan.topology.pp,
    })
}

/// Addresses the server listens on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BoundAddrs {
    pub http: Option<SocketAddr>,
    pub grpc: Option<SocketAddr>,
}

impl BoundAddrs {
    /// Writes `http=ADDR` and `grpc=ADDR` lines to `path` (temp file + rename: readers never see half).
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let mut text = String::new();
        if let Some(a) = self.http {
            text.push_str(&format!("http={a}\n"));
        }
        if let Some(a) = self.grpc {
            text.push_str(&format!("grpc={a}\n"));
        }
        let tmp = PathBuf::from(format!("{}.tmp", path.display()));
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, path)
    }
}

/// Serves `model` through a scheduler over `pipeline` on the given listeners until `shutdown` completes.
/// `on_bound` is called once both listeners are bound.
pub async fn run(
    model: ServedModel,
    pipeline: Arc<dyn Pipeline>,
    config: SchedulerConfig,
    http: Option<SocketAddr>,
    grpc: Option<SocketAddr>,
    on_bound: impl FnOnce(BoundAddrs) -> anyhow::Result<()>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let tokenizer = model.tokenizer.clone();
    let scheduler = Scheduler::start(pipeline, tokenizer, config);
    let state = Arc::new(AppState::new(
        Arc::new(model),
        scheduler,
        Some(api::metrics::install()),
    ));
    let (http_listener, grpc_listener) = api::bind_listeners(http, grpc).await?;
    let bound = BoundAddrs {
        http: http_listener.as_ref().map(|l| l.local_addr()).transpose()?,
        grpc: grpc_listener.as_ref().map(|l| l.local_addr()).transpose()?,
    };
    on_bound(bound)?;
    api::serve_bound(state, http_listener, grpc_listener, shutdown).await
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("cannot watch SIGTERM: {e}");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
}
