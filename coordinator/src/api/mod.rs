//! The coordinator's client-facing front ends, both over the same [`AppState`]:
//!
//! - [`openai`]: the OpenAI-compatible HTTP API (`/v1/completions`, `/v1/chat/completions`, `/v1/models`),
//!   plus `GET /health` and `GET /metrics` (axum).
//! - [`grpc`]: the `tessera.v1.Tessera` gRPC service, `grpc.health.v1.Health`, and server reflection v1 and
//!   v1alpha (tonic).
//! - [`choices`]: a request's prompts × `n` sequences as scheduler requests, their events merged.
//! - [`prompt`]: request → prompt token ids (completion text, chat messages, token ids), shared by both and by
//!   `tessera run`.
//! - [`metrics`]: the process-wide Prometheus recorder.
//!
//! The front ends parse and check requests, build the prompt, and hand a [`GenRequest`] to the scheduler
//! through the [`Backend`] trait ([`SchedulerHandle`](crate::serve::SchedulerHandle) in the server, a test
//! double in tests); dropping the event receiver cancels the request, which happens when an HTTP client
//! disconnects or a gRPC call is cancelled.
//!
//! To print real addresses when port 0 is asked for, bind first ([`bind`]), read `local_addr`, then
//! [`serve_http`] / [`serve_grpc`] on the listeners; [`serve`] does all of it.

pub mod choices;
pub mod grpc;
pub mod metrics;
pub mod openai;
pub mod prompt;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::FutureExt;
use futures::future::BoxFuture;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;

use crate::sampling::SamplingParams;
use crate::serve::{GenReceiver, GenRequest, PipelineInfo, ServeError, ServedModel};

/// What the front ends need from the scheduler. [`SchedulerHandle`](crate::serve::SchedulerHandle)
/// implements it; tests implement it with doubles.
pub trait Backend: Send + Sync + 'static {
    /// Queues a request; its events arrive on the receiver (dropping it cancels the request). Fails at once
    /// when the request is invalid (`InvalidArgument`, field "prompt" for the prompt) or the queue is full.
    fn submit(&self, req: GenRequest) -> Result<GenReceiver, ServeError>;

    /// The pipeline's limits.
    fn info(&self) -> PipelineInfo;

    /// Really runs the model (cached briefly); `Ok` means requests can be served now.
    fn health(&self) -> BoxFuture<'_, Result<(), ServeError>>;
}

impl Backend for crate::serve::SchedulerHandle {
    fn submit(&self, req: GenRequest) -> Result<GenReceiver, ServeError> {
        crate::serve::SchedulerHandle::submit(self, req)
    }

    fn info(&self) -> PipelineInfo {
        crate::serve::SchedulerHandle::info(self)
    }

    fn health(&self) -> BoxFuture<'_, Result<(), ServeError>> {
        Box::pin(crate::serve::SchedulerHandle::health(self))
    }
}

/// Everything a front end serves from: the model (tokenizer, template, identity), the scheduler, and the
/// metrics handle (`None`: `GET /metrics` answers 404).
pub struct AppState {
    pub model: Arc<ServedModel>,
    pub scheduler: Arc<dyn Backend>,
    pub metrics: Option<PrometheusHandle>,
    /// Unix time the state was made (`created` of the model in `/v1/models`).
    pub started: u64,
}

impl AppState {
    /// State serving `model` through `scheduler`.
    pub fn new(
        model: Arc<ServedModel>,
        scheduler: crate::serve::SchedulerHandle,
        metrics: Option<PrometheusHandle>,
    ) -> AppState {
        AppState::with_backend(model, Arc::new(scheduler), metrics)
    }

    /// State serving `model` through any [`Backend`] (tests use doubles).
    pub fn with_backend(
        model: Arc<ServedModel>,
        scheduler: Arc<dyn Backend>,
        metrics: Option<PrometheusHandle>,
    ) -> AppState {
        AppState {
            model,
            scheduler,
            metrics,
            started: unix_now(),
        }
    }

    /// Checks a request's sampling parameters against the model's vocabulary (the scheduler checks them
    /// again); the error names the field.
    pub fn validate_params(&self, params: &SamplingParams) -> Result<(), ServeError> {
        params
            .validate(self.model.config.n_vocab)
            .map_err(crate::serve::scheduler::sampling_error)
    }

    /// `Ok` when `requested` (a request's `model` field) is empty or the served model's id.
    pub fn check_model(&self, requested: &str) -> Result<(), ServeError> {
        if requested.is_empty() || requested == self.model.id {
            Ok(())
        } else {
            Err(ServeError::invalid(
                "model",
                format!(
                    "The model `{requested}` does not exist: this server serves `{}`",
                    self.model.id
                ),
            ))
        }
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A fresh request id: `prefix` then 24 random hex digits ("cmpl-…", "chatcmpl-…").
pub fn request_id(prefix: &str) -> String {
    let a = crate::sampling::Rng::entropy_seed();
    let b = crate::sampling::Rng::entropy_seed();
    format!("{prefix}{a:016x}{:08x}", b as u32)
}

/// Binds a TCP listener (port 0 picks a free port: read it with `local_addr`).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves the OpenAI-compatible HTTP API on `listener` until `shutdown` completes, then lets requests in
/// flight finish.
pub async fn serve_http(
    listener: TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, openai::router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

/// Serves `tessera.v1.Tessera`, `grpc.health.v1.Health` (updated every [`grpc::HEALTH_POLL`] from
/// [`Backend::health`]) and reflection on `listener` until `shutdown` completes.
pub async fn serve_grpc(
    listener: TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    grpc::serve(listener, state, shutdown).await
}

/// Binds and serves the HTTP API on `http` and the gRPC API on `grpc` (either may be `None`) until
/// `shutdown` completes. Logs the bound addresses.
pub async fn serve(
    state: Arc<AppState>,
    http: Option<SocketAddr>,
    grpc: Option<SocketAddr>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (http_listener, grpc_listener) = bind_listeners(http, grpc).await?;
    serve_bound(state, http_listener, grpc_listener, shutdown).await
}

/// Binds the HTTP and gRPC listeners (either may be `None`; port 0 picks a free port) and logs where they
/// listen.
pub async fn bind_listeners(
    http: Option<SocketAddr>,
    grpc: Option<SocketAddr>,
) -> anyhow::Result<(Option<TcpListener>, Option<TcpListener>)> {
    Ok((
        bind_logged(http, "OpenAI-compatible HTTP API").await?,
        bind_logged(grpc, "tessera.v1 gRPC API").await?,
    ))
}

async fn bind_logged(addr: Option<SocketAddr>, what: &str) -> anyhow::Result<Option<TcpListener>> {
    use anyhow::Context;
    let Some(addr) = addr else { return Ok(None) };
    let listener = bind(addr)
        .await
        .with_context(|| format!("binding the {what} address {addr}"))?;
    tracing::info!("{what} on {}", listener.local_addr()?);
    Ok(Some(listener))
}

/// Serves the HTTP API and the gRPC API on listeners already bound (either may be `None`) until `shutdown`
/// completes.
pub async fn serve_bound(
    state: Arc<AppState>,
    http: Option<TcpListener>,
    grpc: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    use anyhow::Context;
    let shutdown = shutdown.boxed().shared();
    let http_task = {
        let (state, shutdown) = (state.clone(), shutdown.clone());
        async move {
            if let Some(listener) = http {
                serve_http(listener, state, shutdown)
                    .await
                    .context("serving HTTP")?;
            }
            anyhow::Ok(())
        }
    };
    let grpc_task = async move {
        if let Some(listener) = grpc {
            serve_grpc(listener, state, shutdown)
                .await
                .context("serving gRPC")?;
        }
        anyhow::Ok(())
    };
    tokio::try_join!(http_task, grpc_task)?;
    Ok(())
}

/// How long a health endpoint waits for [`Backend::health`] before answering "unavailable".
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(30);

/// [`Backend::health`] bounded by [`HEALTH_TIMEOUT`].
pub async fn check_health(state: &AppState) -> Result<(), ServeError> {
    match tokio::time::timeout(HEALTH_TIMEOUT, state.scheduler.health()).await {
        Ok(r) => r,
        Err(_) => Err(ServeError::Unavailable(format!(
            "the health check did not finish within {} s",
            HEALTH_TIMEOUT.as_secs()
        ))),
    }
}
