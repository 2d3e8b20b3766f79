//! `RemotePipeline` against real worker services in this process: the tiny fixture split for tp=2, pp=2 by
//! `shard-tool split`, one `WorkerService` per (stage, rank) on 127.0.0.1. The group forms by itself, batched
//! requests through the scheduler get the tokens they get alone, a worker that goes away fails the requests
//! in flight with `Unavailable` and is re-joined under a new epoch when it comes back, and a worker list that
//! does not match the manifest keeps the group down with a reason naming the worker.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use shard_tool::checkpoint::Checkpoint;
use shard_tool::manifest::Manifest;
use shard_tool::plan::{Topology, plan};
use shard_tool::split::{SplitOptions, split};
use tessera::sampling::SamplingParams;
use tessera::serve::remote::{GroupState, RemoteOptions, RemotePipeline, WorkerAddr};
use tessera::serve::{
    GenEvent, GenReceiver, GenRequest, Pipeline, PipelineError, PipelineInfo, Scheduler,
    SchedulerConfig, ServeError,
};
use tessera::tokenizer::Tokenizer;
use tessera_worker::service::{ServiceOptions, WorkerService, serve};
use tessera_worker::{EngineOptions, PeerListener, ShardDir};

fn tiny_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/gguf/tiny_llama.gguf")
}

fn split_tiny(tp: usize, pp: usize, out: &Path) -> Manifest {
    let ckpt = Checkpoint::open(&[tiny_path()]).unwrap();
    let plan = plan(&ckpt.config, &ckpt.tensors, &Topology::new(tp, pp)).unwrap();
    split(
        &ckpt,
        &plan,
        &SplitOptions {
            out_dir: out.to_owned(),
            force: false,
            progress: false,
        },
    )
    .unwrap()
}

fn service_options() -> ServiceOptions {
    ServiceOptions {
        threads: 1,
        engine: EngineOptions {
            max_batch_tokens: 64,
            max_logits: 16,
            ..tessera_worker::EngineOptions::default()
        },
        max_context: 128,
        kv_budget_bytes: None,
        link_timeout: Duration::from_secs(5),
        join_timeout: Duration::from_secs(10),
        spin: Duration::from_micros(50),
    }
}

/// A running worker; dropping `stop` shuts its server down.
struct Worker {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

/// Starts the worker of (stage, rank) on `addr` (port 0: any).
async fn start(dir: &Path, stage: usize, rank: usize, addr: SocketAddr) -> Worker {
    let shard = ShardDir::open(dir, stage, rank).unwrap();
    let peers = PeerListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let service =
        tokio::task::spawn_blocking(move || WorkerService::start(shard, peers, service_options()))
            .await
            .unwrap()
            .unwrap();
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(serve(service, listener, async {
        let _ = stopped.await;
    }));
    Worker {
        addr,
        stop: Some(stop),
    }
}

fn options() -> RemoteOptions {
    RemoteOptions {
        reform_interval: Duration::from_millis(100),
        probe_interval: Duration::from_millis(300),
        ..RemoteOptions::default()
    }
}

async fn collect(mut rx: GenReceiver) -> (Vec<u32>, Option<ServeError>) {
    tokio::time::timeout(Duration::from_secs(60), async move {
        let mut tokens = Vec::new();
        loop {
            match rx.recv().await {
                Some(GenEvent::Token(t)) => tokens.push(t.id),
                Some(GenEvent::Prompt(_)) => panic!("prompt log-probabilities nobody asked for"),
                Some(GenEvent::Done { .. }) => return (tokens, None),
                Some(GenEvent::Error(e)) => return (tokens, Some(e)),
                None => panic!("the stream ended without Done or Error"),
            }
        }
    })
    .await
    .expect("a request hung")
}

fn requests(tok: &Tokenizer) -> Vec<GenRequest> {
    let texts = [
        "The capital of France is",
        "Hello, world!",
        "numbers 12345 and 3.14",
        "café 🦙 日本",
        "multi\nline\n\ttabbed",
        "a",
    ];
    texts
        .iter()
        .enumerate()
        .map(|(i, t)| GenRequest {
            prompt: tok.encode(t, true, false).unwrap(),
            params: SamplingParams {
                temperature: [0.0, 0.7, 1.0][i % 3],
                seed: Some(i as u64),
                max_tokens: Some(12 + i),
                logit_bias: tok.eos_ids().iter().map(|&id| (id, -100.0)).collect(),
                ..SamplingParams::default()
            },
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_forms_serves_and_reforms_after_a_worker_restart() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = split_tiny(2, 2, dir.path());
    let mut workers = Vec::new();
    for stage in 0..2 {
        for rank in 0..2 {
            let w = start(dir.path(), stage, rank, "127.0.0.1:0".parse().unwrap()).await;
            workers.push((stage, rank, w));
        }
    }
    let addrs: Vec<WorkerAddr> = workers
        .iter()
        .map(|(stage, rank, w)| WorkerAddr {
            stage: *stage,
            rank: *rank,
            addr: w.addr.to_string(),
        })
        .collect();
    let pipeline = RemotePipeline::connect(manifest.clone(), addrs, options()).unwrap();
    pipeline
        .wait_healthy(Duration::from_secs(30))
        .await
        .unwrap();
    let GroupState::Healthy { epoch: first_epoch } = pipeline.state() else {
        unreachable!()
    };
    assert_eq!(
        pipeline.info(),
        PipelineInfo {
            max_batch_tokens: 64,
            max_logits: 16,
            max_context: 128,
            n_vocab: 288,
            n_stages: 2,
            tp: 2,
        }
    );
    assert_eq!(pipeline.health().await, Ok(()));

    let tok = Arc::new(Tokenizer::from_gguf_file(&tiny_path()).unwrap());
    let reqs = requests(&tok);
    let config = SchedulerConfig {
        prefill_chunk: 4,
        ..SchedulerConfig::default()
    };
    let handle = Scheduler::start(pipeline.clone(), tok.clone(), config);
    assert_eq!(handle.stats().lanes, 3);
    let mut alone = Vec::new();
    for r in &reqs {
        alone.push(collect(handle.submit(r.clone()).unwrap()).await);
    }
    let together = join_all(
        reqs.iter()
            .map(|r| collect(handle.submit(r.clone()).unwrap())),
    )
    .await;
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(a.1, None, "request {i}");
        assert_eq!(a.0.len(), 12 + i);
        assert_eq!(a, t, "request {i}: batched tokens differ from solo ones");
    }

    // Stage 1 rank 1 goes away: requests fail with Unavailable naming it, and nothing hangs.
    let gone = workers
        .iter_mut()
        .find(|(s, r, _)| (*s, *r) == (1, 1))
        .unwrap();
    let gone_addr = gone.2.addr;
    drop(gone.2.stop.take());
    let outs = join_all(
        reqs.iter()
            .map(|r| collect(handle.submit(r.clone()).unwrap())),
    )
    .await;
    let mut failed = 0;
    for (tokens, err) in &outs {
        match err {
            Some(ServeError::Unavailable(m)) => {
                failed += 1;
                assert!(m.contains(&gone_addr.to_string()), "{m}");
            }
            // A request may have finished before the worker's connection broke.
            None => assert!(!tokens.is_empty()),
            Some(e) => panic!("expected Unavailable, got {e}"),
        }
    }
    assert!(failed > 0);
    match pipeline.state() {
        GroupState::Down(reason) => assert!(reason.contains(&gone_addr.to_string()), "{reason}"),
        GroupState::Healthy { epoch } => panic!("healthy in epoch {epoch} with a worker gone"),
    }
    assert!(matches!(
        handle.health().await,
        Err(ServeError::Unavailable(_))
    ));

    // It comes back on the same address: the group re-forms in a new epoch and serves the same tokens.
    let back = start(dir.path(), 1, 1, gone_addr).await;
    pipeline
        .wait_healthy(Duration::from_secs(30))
        .await
        .unwrap();
    let GroupState::Healthy { epoch } = pipeline.state() else {
        unreachable!()
    };
    assert!(epoch > first_epoch);
    let again = join_all(
        reqs.iter()
            .map(|r| collect(handle.submit(r.clone()).unwrap())),
    )
    .await;
    assert_eq!(again, alone);
    drop(back);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swapped_workers_keep_the_group_down_with_a_clear_reason() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = split_tiny(1, 2, dir.path());
    let w0 = start(dir.path(), 0, 0, "127.0.0.1:0".parse().unwrap()).await;
    let w1 = start(dir.path(), 1, 0, "127.0.0.1:0".parse().unwrap()).await;
    let addrs = vec![
        WorkerAddr {
            stage: 0,
            rank: 0,
            addr: w1.addr.to_string(),
        },
        WorkerAddr {
            stage: 1,
            rank: 0,
            addr: w0.addr.to_string(),
        },
    ];
    let pipeline = RemotePipeline::connect(manifest, addrs, options()).unwrap();
    let err = pipeline
        .wait_healthy(Duration::from_secs(2))
        .await
        .unwrap_err();
    let want = format!(
        "worker {} serves stage 1 rank 0 (shard stage01-rank00.gguf), expected stage 0 rank 0",
        w1.addr
    );
    match err {
        PipelineError::Unavailable(m) => assert!(m.contains(&want), "{m}"),
        e => panic!("{e}"),
    }
    let batch = tessera::serve::StepBatch::default();
    assert!(matches!(
        pipeline.forward(&batch).await,
        Err(PipelineError::Unavailable(m)) if m.contains(&want)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_workers_are_reported_not_hung() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = split_tiny(1, 1, dir.path());
    // Nothing listens here.
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let addrs = vec![WorkerAddr {
        stage: 0,
        rank: 0,
        addr: free.to_string(),
    }];
    let pipeline = RemotePipeline::connect(manifest, addrs, options()).unwrap();
    let started = std::time::Instant::now();
    let err = pipeline
        .wait_healthy(Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(err.to_string().contains(&free.to_string()), "{err}");
    assert!(matches!(
        pipeline.health().await,
        Err(PipelineError::Unavailable(_))
    ));
}
