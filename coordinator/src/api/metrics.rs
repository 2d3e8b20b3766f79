//! Prometheus metrics: one recorder per process, rendered by `GET /metrics`.
//!
//! The `metrics` crate has one global recorder, and `metrics::set_global_recorder` fails once one is set;
//! [`install`] sets it the first time it is called and returns the same handle every time after (tests start
//! several servers in one process). Metric names: `tessera_http_requests_total{route,status}`,
//! `tessera_http_request_duration_seconds{route}`, `tessera_grpc_requests_total{method,code}`, plus whatever
//! the scheduler records. Histograms whose names end in `_seconds` get latency buckets (Prometheus
//! histograms); other histograms are rendered as summaries.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Bucket bounds (seconds) for `*_seconds` histograms: 1 ms to 5 min.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0,
];

/// Metric names of the front ends.
pub const HTTP_REQUESTS: &str = "tessera_http_requests_total";
pub const HTTP_DURATION: &str = "tessera_http_request_duration_seconds";
pub const GRPC_REQUESTS: &str = "tessera_grpc_requests_total";

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the Prometheus recorder as the process's global `metrics` recorder (first call) and returns its
/// handle (every call). If another recorder was installed first by someone else, the returned handle renders
/// only what reaches it (nothing), and a warning is logged.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .unwrap_or_else(|e| unreachable!("the latency buckets are not empty: {e}"))
                .build_recorder();
            let handle = recorder.handle();
            if let Err(e) = metrics::set_global_recorder(recorder) {
                tracing::warn!(
                    "another metrics recorder is installed; /metrics will be empty: {e}"
                );
            } else {
                describe();
            }
            // Histograms and summaries keep samples until upkeep folds them in; without an exporter of its own
            // the recorder needs someone to run it (a scrape also does, see `render`).
            let upkeep = handle.clone();
            let spawned = std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(Duration::from_secs(5));
                        upkeep.run_upkeep();
                    }
                });
            if let Err(e) = spawned {
                tracing::warn!("cannot start the metrics upkeep thread: {e}");
            }
            handle
        })
        .clone()
}

/// The Prometheus text exposition of everything recorded so far.
pub fn render(handle: &PrometheusHandle) -> String {
    handle.run_upkeep();
    handle.render()
}

fn describe() {
    metrics::describe_counter!(
        HTTP_REQUESTS,
        "HTTP requests answered, by route and status code"
    );
    metrics::describe_histogram!(
        HTTP_DURATION,
        metrics::Unit::Seconds,
        "Time to the response head (the first event of a stream), by route"
    );
    metrics::describe_counter!(
        GRPC_REQUESTS,
        "tessera.v1 gRPC calls answered, by method and status code"
    );
}
