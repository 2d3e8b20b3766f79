//! Helpers of the process-level cluster tests: model files, worker processes through the launcher, the
//! single-process reference, and a minimal HTTP/1.1 client (no client crate needed for a few requests).
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use std::sync::Arc;

use tessera::launcher::{LaunchSpec, LocalCluster, prepare_shards};
use tessera::serve::{Pipeline, SchedulerConfig, ServedModel};
use tessera::server::BoundAddrs;

/// `$TESSERA_CACHE/models` (default `~/.cache/tessera/models`), filled by `scripts/fetch-test-data.sh`.
pub fn models_dir() -> PathBuf {
    std::env::var_os("TESSERA_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/tessera")))
        .expect("HOME or TESSERA_CACHE is set")
        .join("models")
}

/// A downloaded model, or `None` after saying why (a failure under `CI=true`: CI must not pass by skipping).
pub fn model(name: &str) -> Option<PathBuf> {
    let p = models_dir().join(name);
    if p.is_file() {
        return Some(p);
    }
    let msg = format!("{} is missing: run scripts/fetch-test-data.sh", p.display());
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{msg} (CI=true: reference tests must not be skipped)");
    }
    eprintln!("skipping: {msg}");
    None
}

pub const SMOLLM2: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// SmolLM2 dequantized to F32 by `scripts/prepare-engine-models.sh`.
pub const SMOLLM2_F32: &str = "SmolLM2-135M-Instruct.F32.gguf";

/// The worker command of the `tessera` binary under test.
pub fn worker_command() -> Vec<String> {
    vec![
        env!("CARGO_BIN_EXE_tessera").to_owned(),
        "worker".to_owned(),
    ]
}

/// Splits `model` into `dir` for tp × pp and starts one worker process per shard (one thread each).
pub fn start_workers(model: &Path, tp: usize, pp: usize, dir: &Path) -> LocalCluster {
    start_workers_with(model, tp, pp, dir, &[])
}

/// As [`start_workers`], with `extra` appended to every worker's command line.
pub fn start_workers_with(
    model: &Path,
    tp: usize,
    pp: usize,
    dir: &Path,
    extra: &[&str],
) -> LocalCluster {
    let (shards, _) = prepare_shards(
        &[model.to_owned()],
        Some(tp),
        Some(pp),
        Some(dir.join("shards")),
        false,
    )
    .expect("split");
    LocalCluster::start(LaunchSpec {
        worker_command: worker_command(),
        shard_dir: shards,
        tp,
        pp,
        threads: 1,
        devices: Vec::new(),
        extra_args: ["--max-context", "512"]
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect(),
        run_dir: dir.join("run"),
        ready_timeout: Duration::from_secs(120),
    })
    .expect("workers start")
}

/// The coordinator's front ends (scheduler, HTTP and gRPC on 127.0.0.1) over the pipeline `make` returns,
/// called on the returned runtime (a remote pipeline spawns its links there), until `stop` fires.
pub struct Coordinator {
    pub rt: tokio::runtime::Runtime,
    pub bound: BoundAddrs,
    pub stop: Option<tokio::sync::oneshot::Sender<()>>,
}

pub fn start_coordinator(
    model: ServedModel,
    make: impl FnOnce() -> Arc<dyn Pipeline> + Send + 'static,
) -> Coordinator {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (tx, rx) = std::sync::mpsc::channel();
    rt.spawn(async move {
        let result = tessera::server::run(
            model,
            make(),
            SchedulerConfig::default(),
            Some("127.0.0.1:0".parse().unwrap()),
            Some("127.0.0.1:0".parse().unwrap()),
            move |bound| {
                tx.send(bound).unwrap();
                Ok(())
            },
            async move {
                let _ = stopped.await;
            },
        )
        .await;
        if let Err(e) = result {
            panic!("server: {e:#}");
        }
    });
    let bound = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("server binds");
    Coordinator {
        rt,
        bound,
        stop: Some(stop),
    }
}

/// One HTTP/1.1 exchange (`Connection: close`); returns status and body.
pub fn http(addr: SocketAddr, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(rest)
    } else {
        rest.to_owned()
    };
    (status, body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}
