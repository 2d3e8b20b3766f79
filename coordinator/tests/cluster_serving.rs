//! Serving a cluster of worker processes the way clients see it: real clients (the official `openai` Python
//! package, grpcurl through reflection), 32 concurrent streams, bad requests, a worker killed mid-stream
//! and restarted, and `tessera cluster` stopping every process it started.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::*;
use tessera::launcher::LocalCluster;
use tessera::serve::remote::{RemoteOptions, RemotePipeline};
use tessera_proto::v1::tessera_client::TesseraClient;
use tessera_proto::v1::{GenerateRequest, SamplingParams, generate_request::Input};

/// Workers for `model` at tp × pp, and the coordinator (scheduler + HTTP + gRPC) in this process.
struct Served {
    rt: tokio::runtime::Runtime,
    workers: LocalCluster,
    http: SocketAddr,
    grpc: SocketAddr,
    model_id: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    _dir: tempfile::TempDir,
}

impl Served {
    fn start(model: &Path, tp: usize, pp: usize) -> Served {
        let dir = tempfile::tempdir().unwrap();
        let workers = start_workers(model, tp, pp, dir.path());
        let manifest = shard_tool::manifest::Manifest::load(&workers.spec.shard_dir).unwrap();
        let served =
            tessera::server::model_from_shards(&workers.spec.shard_dir, &manifest, 512).unwrap();
        let model_id = served.id.clone();
        let addrs = workers.worker_addrs();
        let Coordinator { rt, bound, stop } = start_coordinator(served, move || {
            RemotePipeline::connect(manifest, addrs, RemoteOptions::default()).expect("connect")
        });
        let s = Served {
            rt,
            workers,
            http: bound.http.unwrap(),
            grpc: bound.grpc.unwrap(),
            model_id,
            stop,
            _dir: dir,
        };
        s.wait_health(200, Duration::from_secs(60));
        s
    }

    /// Polls `GET /health` until it answers `status`.
    fn wait_health(&self, status: u16, timeout: Duration) -> Duration {
        let started = Instant::now();
        loop {
            let (got, body) = http(self.http, "GET", "/health", None);
            if got == status {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < timeout,
                "/health did not become {status} within {timeout:?} (last: {got} {body})"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn grpc_client(&self) -> TesseraClient<tonic::transport::Channel> {
        let addr = format!("http://{}", self.grpc);
        self.rt
            .block_on(TesseraClient::connect(addr))
            .expect("gRPC connect")
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

fn request(prompt: &str, max_tokens: u32, temperature: f32, seed: u64) -> GenerateRequest {
    GenerateRequest {
        input: Some(Input::Prompt(prompt.to_owned())),
        max_tokens,
        sampling: Some(SamplingParams {
            temperature: Some(temperature),
            seed: Some(seed),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A tool from PyPI (`scripts/requirements-fixtures.txt`); under `CI=true` a missing one is a failure.
fn have(tool: &str, check: &[&str]) -> bool {
    let ok = Command::new(tool)
        .args(check)
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        let msg =
            format!("{tool} {check:?} failed: pip install -r scripts/requirements-fixtures.txt");
        assert!(
            std::env::var("CI").map_or(true, |v| v != "true"),
            "{msg} (CI=true: client tests must not be skipped)"
        );
        eprintln!("skipping: {msg}");
    }
    ok
}

fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// The official `openai` Python client and grpcurl (reflection only) against a 2-stage cluster, whose greedy
/// output equals `tessera run` on the same file (pipeline stages are bit-exact).
#[test]
fn real_clients_against_a_pipeline_cluster() {
    let Some(model) = model(SMOLLM2) else { return };
    let served = Served::start(&model, 1, 2);
    let single = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args([
            "run",
            "-n",
            "16",
            "--temp",
            "0",
            "-p",
            "The capital of France is",
        ])
        .arg(&model)
        .output()
        .unwrap();
    let single = String::from_utf8(single.stdout).unwrap();
    let single = single
        .trim_end_matches('\n')
        .strip_prefix("The capital of France is")
        .unwrap()
        .to_owned();

    if have("python3", &["-c", "import openai"]) {
        let out = Command::new("python3")
            .arg(repo().join("tests/clients/openai_check.py"))
            .args(["--base-url", &format!("http://{}", served.http)])
            .args([
                "--model",
                &served.model_id,
                "--strict",
                "--max-tokens",
                "16",
            ])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "openai client failed: {stderr}");
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        eprintln!("openai client: {v}");
        assert_eq!(v["completion"]["text"].as_str(), Some(single.as_str()));
        assert_eq!(
            v["completion_stream"]["text"].as_str(),
            Some(single.as_str())
        );
        assert!(!v["chat"]["text"].as_str().unwrap().is_empty());
        assert_eq!(v["chat_stream"]["role"].as_str(), Some("assistant"));
        assert_eq!(v["stream_matches"]["chat"], Value::Bool(true));
        // A batch of two prompts with n = 2: each choice is its prompt's lone completion.
        assert_eq!(v["batch"]["texts"][0].as_str(), Some(single.as_str()));
        assert_eq!(v["batch_matches"], Value::Bool(true), "{v}");
        assert_eq!(v["echo_ok"], Value::Bool(true), "{v}");
    }
    if have("grpcurl", &["-version"]) {
        let out = Command::new("bash")
            .arg(repo().join("tests/clients/grpcurl_check.sh"))
            .arg(served.grpc.to_string())
            .args(["The capital of France is", "16"])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "grpcurl failed: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("tessera.v1.Tessera"), "{stdout}");
        assert!(stdout.contains("SERVING"), "{stdout}");
        // grpcurl prints the response as protobuf JSON: the text field carries the completion.
        let text_json = serde_json::to_string(&single).unwrap();
        assert!(
            stdout.contains(&format!("\"text\": {text_json}")),
            "grpcurl's Generate text is not the single process's {text_json}: {stdout}"
        );
    }
}

/// 32 streaming requests with different prompts and seeds at once each get exactly the tokens they get
/// alone (TP 2 × PP 2: the batch composition must not change any sequence's logits).
#[test]
fn concurrent_streams_get_what_they_get_alone() {
    let Some(model) = model(SMOLLM2) else { return };
    let served = Served::start(&model, 2, 2);
    let client = served.grpc_client();
    let topics = [
        "the sea", "a cat", "Paris", "rain", "music", "a robot", "bread", "winter",
    ];
    let requests: Vec<GenerateRequest> = (0..32)
        .map(|i| {
            let prompt = format!("Story {i} about {}:", topics[i % topics.len()]);
            request(&prompt, 12, 0.9, 1000 + i as u64)
        })
        .collect();
    let ids = |r: &tessera_proto::v1::GenerateStreamResponse| -> Vec<u32> {
        r.tokens.iter().map(|t| t.id).collect()
    };
    let together: Vec<(Vec<u32>, String)> = served.rt.block_on(async {
        let streams = requests.iter().map(|req| {
            let mut c = client.clone();
            let req = req.clone();
            async move {
                let mut stream = c.generate_stream(req).await.expect("stream").into_inner();
                let (mut toks, mut text) = (Vec::new(), String::new());
                while let Some(msg) = stream.message().await.expect("stream message") {
                    toks.extend(ids(&msg));
                    text.push_str(&msg.text);
                }
                (toks, text)
            }
        });
        futures::future::join_all(streams).await
    });
    for (i, req) in requests.iter().enumerate() {
        let alone = served
            .rt
            .block_on(client.clone().generate(req.clone()))
            .expect("generate")
            .into_inner();
        let alone_ids: Vec<u32> = alone.tokens.iter().map(|t| t.id).collect();
        assert!(!alone_ids.is_empty());
        assert_eq!(together[i].0, alone_ids, "request {i}: tokens differ");
        assert_eq!(together[i].1, alone.text, "request {i}: text differs");
    }
}

/// Bad requests through the cluster: 400 / INVALID_ARGUMENT naming the field.
#[test]
fn bad_requests_name_the_field() {
    let Some(model) = model(SMOLLM2) else { return };
    let served = Served::start(&model, 2, 1);
    let long = "word ".repeat(600);
    let cases = [
        (
            format!(r#"{{"prompt": "{long}", "max_tokens": 4}}"#),
            "prompt",
        ),
        (
            r#"{"prompt": "hi", "temperature": 7}"#.to_owned(),
            "temperature",
        ),
        (r#"{"prompt": "hi", "model": "gpt-9"}"#.to_owned(), "model"),
        (
            r#"{"prompt": "hi", "max_tokens": "many"}"#.to_owned(),
            "max_tokens",
        ),
    ];
    for (body, field) in &cases {
        let (status, resp) = http(served.http, "POST", "/v1/completions", Some(body));
        assert_eq!(status, 400, "{field}: {resp}");
        let v: Value = serde_json::from_str(&resp).unwrap();
        assert_eq!(v["error"]["param"].as_str(), Some(*field), "{resp}");
    }
    let (status, resp) = http(
        served.http,
        "POST",
        "/v1/completions",
        Some("{\"prompt\": "),
    );
    assert_eq!(status, 400, "{resp}");
    let err = served
        .rt
        .block_on(served.grpc_client().generate(request("hi", 4, 9.0, 1)))
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("temperature"), "{}", err.message());
}

/// A worker killed mid-stream: the client gets UNAVAILABLE within seconds, health turns 503, requests get
/// an OpenAI-style 503 body; after the worker restarts the coordinator re-forms the group by itself and the
/// same request gives the same output as before the failure. Here a tensor-parallel rank (TP=2).
#[test]
fn killed_worker_fails_fast_and_the_cluster_recovers() {
    kill_and_recover(2, 1, 1);
}

/// The same with two pipeline stages, killing stage 0: stage 1's workers are then waiting for hidden states
/// that stage 0 will never hand them.
#[test]
fn killed_first_stage_fails_fast_and_the_cluster_recovers() {
    kill_and_recover(1, 2, 0);
}

fn kill_and_recover(tp: usize, pp: usize, victim: usize) {
    let Some(model) = model(SMOLLM2) else { return };
    let mut served = Served::start(&model, tp, pp);
    let body = r#"{"prompt": "The capital of France is", "max_tokens": 12, "temperature": 0}"#;
    let (status, before) = http(served.http, "POST", "/v1/completions", Some(body));
    assert_eq!(status, 200, "{before}");
    let before: Value = serde_json::from_str(&before).unwrap();

    let mut client = served.grpc_client();
    let mut stream = served
        .rt
        .block_on(client.generate_stream(request("Once upon a time", 400, 1.0, 7)))
        .expect("stream starts")
        .into_inner();
    let first = served.rt.block_on(stream.message()).expect("first message");
    assert!(first.is_some());
    let killed = Instant::now();
    served.workers.kill_worker(victim);
    let err = served.rt.block_on(async {
        loop {
            match tokio::time::timeout(Duration::from_secs(20), stream.message()).await {
                Err(_) => panic!("the stream hung after the worker died"),
                Ok(Ok(Some(_))) => continue,
                Ok(Ok(None)) => panic!("the stream ended normally although a worker died"),
                Ok(Err(status)) => break status,
            }
        }
    });
    let fail_after = killed.elapsed();
    eprintln!(
        "stream failed {fail_after:?} after the kill: {:?} {}",
        err.code(),
        err.message()
    );
    assert_eq!(err.code(), tonic::Code::Unavailable);
    assert!(fail_after < Duration::from_secs(10), "{fail_after:?}");

    let unhealthy_after = served.wait_health(503, Duration::from_secs(10));
    eprintln!("/health 503 after {unhealthy_after:?}");
    let (status, resp) = http(served.http, "POST", "/v1/completions", Some(body));
    assert_eq!(status, 503, "{resp}");
    let v: Value = serde_json::from_str(&resp).unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{resp}"
    );

    served.workers.restart_worker(victim).expect("restart");
    let recovered_after = served.wait_health(200, Duration::from_secs(30));
    eprintln!("/health 200 again {recovered_after:?} after the restart");
    let (status, after) = http(served.http, "POST", "/v1/completions", Some(body));
    assert_eq!(status, 200, "{after}");
    let after: Value = serde_json::from_str(&after).unwrap();
    assert_eq!(after["choices"][0]["text"], before["choices"][0]["text"]);
}

/// `tessera cluster` serves, and SIGTERM stops the launcher and every worker it started.
#[test]
fn tessera_cluster_stops_every_process_it_started() {
    let Some(model) = model(SMOLLM2) else { return };
    let dir = tempfile::tempdir().unwrap();
    let addr_file = dir.path().join("addrs");
    let mut launcher = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .arg("cluster")
        .arg(&model)
        .args(["--tp", "2", "--pp", "2", "--threads", "1", "--ctx", "512"])
        .args(["--http", "127.0.0.1:0", "--grpc", "127.0.0.1:0"])
        .arg("--shard-dir")
        .arg(dir.path().join("shards"))
        .arg("--addr-file")
        .arg(&addr_file)
        .spawn()
        .unwrap();
    let started = Instant::now();
    let http_addr: SocketAddr = loop {
        if let Ok(text) = std::fs::read_to_string(&addr_file)
            && let Some(a) = text.lines().find_map(|l| l.strip_prefix("http="))
        {
            break a.parse().unwrap();
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "tessera cluster did not start"
        );
        assert!(
            launcher.try_wait().unwrap().is_none(),
            "tessera cluster exited"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let healthy = Instant::now();
    while http(http_addr, "GET", "/health", None).0 != 200 {
        assert!(
            healthy.elapsed() < Duration::from_secs(60),
            "cluster never healthy"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let body = r#"{"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4}"#;
    let (status, resp) = http(http_addr, "POST", "/v1/chat/completions", Some(body));
    assert_eq!(status, 200, "{resp}");

    let pids: Vec<i32> = std::fs::read_to_string(dir.path().join("shards/run/workers.txt"))
        .unwrap()
        .lines()
        .map(|l| l.split_whitespace().last().unwrap().parse().unwrap())
        .collect();
    assert_eq!(pids.len(), 4);
    // SAFETY: plain FFI call on the pid of a child we spawned.
    unsafe { libc::kill(launcher.id() as i32, libc::SIGTERM) };
    let stopping = Instant::now();
    let status = loop {
        if let Some(s) = launcher.try_wait().unwrap() {
            break s;
        }
        assert!(
            stopping.elapsed() < Duration::from_secs(15),
            "launcher did not stop"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    eprintln!(
        "launcher exited with {status} after {:?}",
        stopping.elapsed()
    );
    for pid in pids {
        let gone = (0..100).any(|_| {
            // A worker is gone when its /proc entry is (or only a zombie awaiting init is left).
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let running = !stat.is_empty() && !stat.contains(") Z ");
            if running {
                std::thread::sleep(Duration::from_millis(50));
            }
            !running
        });
        assert!(gone, "worker {pid} still runs after the launcher stopped");
    }
}
