//! The worker's gRPC service end to end, driven as a coordinator drives it: shard directories written by
//! `shard-tool split`, one in-process service per (stage, rank) on 127.0.0.1 port 0, Describe and JoinGroup,
//! then batches sent to every rank of a stage at once, rank 0's hidden states handed to the next stage and the
//! last stage's vocabulary slices concatenated. The logits must be those of a single-process engine (bounds
//! as in `parallel.rs`: pipeline stages are bit-exact, tensor parallelism with f16 caches within 1e-3).
//! Also: epochs, malformed batches, KV memory, release, and a failed all-reduce poisoning the epoch.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use shard_tool::split::{SplitOptions, split};
use tessera_proto::worker::v1::worker_client::WorkerClient;
use tessera_proto::worker::v1::{
    DescribeRequest, DescribeResponse, ForwardRequest, ForwardResponse, JoinGroupRequest,
    LogitsMode, ReleaseRequest, SeqInput, StatsRequest,
};
use tessera_proto::{bytes_to_f32s, f32s_to_bytes};
use tessera_worker::service::{MAX_MESSAGE_BYTES, ServiceOptions, WorkerService, serve};
use tessera_worker::{KvCache, PeerListener, ShardDir};
use tonic::Code;
use tonic::transport::Channel;

const F32: &str = "gguf/tiny_llama.gguf";

/// Splits the checkpoint at `source` for (tp, pp) into `out`.
fn split_into(source: &Path, tp: usize, pp: usize, out: &Path) {
    let ckpt = shard_tool::checkpoint::Checkpoint::open(&[source.to_owned()]).unwrap();
    let plan = plan_for(&ckpt, tp, pp);
    let opts = SplitOptions {
        out_dir: out.to_owned(),
        force: false,
        progress: false,
    };
    split(&ckpt, &plan, &opts).unwrap();
}

fn service_options() -> ServiceOptions {
    ServiceOptions {
        threads: 1,
        engine: options(),
        max_context: 64,
        kv_budget_bytes: None,
        link_timeout: Duration::from_secs(10),
        join_timeout: Duration::from_secs(20),
        spin: Duration::from_micros(50),
    }
}

/// One running worker, as the coordinator sees it.
struct Worker {
    client: WorkerClient<Channel>,
    channel: Channel,
    /// The gRPC address (`host:port`).
    addr: String,
    info: DescribeResponse,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn start(dir: &Path, stage: usize, rank: usize, opts: ServiceOptions) -> Worker {
    let shard = ShardDir::open(dir, stage, rank).unwrap();
    let peers = PeerListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let service = tokio::task::spawn_blocking(move || WorkerService::start(shard, peers, opts))
        .await
        .unwrap()
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(serve(service, listener, async {
        let _ = stopped.await;
    }));
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = WorkerClient::new(channel.clone())
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let info = client
        .describe(DescribeRequest {})
        .await
        .unwrap()
        .into_inner();
    Worker {
        client,
        channel,
        addr: addr.to_string(),
        info,
        _stop: stop,
    }
}

/// Every (stage, rank) of the shard set in `dir`, `[stage][rank]`.
async fn start_all(dir: &Path, opts: ServiceOptions) -> Vec<Vec<Worker>> {
    let manifest = shard_tool::manifest::Manifest::load(dir).unwrap();
    let (tp, pp) = (manifest.plan.topology.tp, manifest.plan.topology.pp);
    let mut stages = Vec::new();
    for s in 0..pp {
        let mut ranks = Vec::new();
        for r in 0..tp {
            ranks.push(start(dir, s, r, opts).await);
        }
        stages.push(ranks);
    }
    stages
}

/// JoinGroup on every rank of every stage, the ranks of a stage concurrently.
async fn join_all(stages: &[Vec<Worker>], epoch: u64) {
    for ranks in stages {
        let peers: Vec<String> = ranks.iter().map(|w| w.info.peer_addr.clone()).collect();
        let calls: Vec<_> = ranks
            .iter()
            .map(|w| {
                let mut c = w.client.clone();
                let req = JoinGroupRequest {
                    epoch,
                    peers: peers.clone(),
                    ..Default::default()
                };
                tokio::spawn(async move { c.join_group(req).await })
            })
            .collect();
        for call in calls {
            call.await.unwrap().unwrap();
        }
    }
}

/// The same request to every rank at once; the responses in rank order.
async fn forward_stage(
    ranks: &[Worker],
    req: ForwardRequest,
) -> Vec<Result<ForwardResponse, tonic::Status>> {
    let calls: Vec<_> = ranks
        .iter()
        .map(|w| {
            let mut c = w.client.clone();
            let req = req.clone();
            tokio::spawn(async move { c.forward(req).await.map(|r| r.into_inner()) })
        })
        .collect();
    let mut out = Vec::new();
    for call in calls {
        out.push(call.await.unwrap());
    }
    out
}

fn seq(seq_id: u64, start_pos: usize, n_tokens: usize, logits: LogitsMode) -> SeqInput {
    SeqInput {
        seq_id,
        start_pos: start_pos as u32,
        n_tokens: n_tokens as u32,
        logits: logits as i32,
        context: 0,
        top_k: 0,
        prefix_from: None,
    }
}

/// One batch through every stage, as the coordinator runs it; the full-vocabulary logits rows.
async fn run_batch(
    stages: &[Vec<Worker>],
    epoch: u64,
    seqs: Vec<SeqInput>,
    tokens: Vec<u32>,
) -> Vec<f32> {
    let mut hidden = Bytes::new();
    for (s, ranks) in stages.iter().enumerate() {
        let req = ForwardRequest {
            epoch,
            seqs: seqs.clone(),
            tokens: if s == 0 { tokens.clone() } else { Vec::new() },
            hidden: hidden.clone(),
            order: 0,
            hand_off: false,
        };
        let resps: Vec<ForwardResponse> = forward_stage(ranks, req)
            .await
            .into_iter()
            .map(|r| r.unwrap())
            .collect();
        if s + 1 < stages.len() {
            hidden = resps[0].hidden.clone();
            assert!(
                !hidden.is_empty(),
                "stage {s} rank 0 returned no hidden states"
            );
            assert!(resps[1..].iter().all(|r| r.hidden.is_empty()));
            continue;
        }
        let n_vocab = ranks[0].info.n_vocab as usize;
        let rows = resps[0].n_logit_rows as usize;
        let mut full = vec![f32::NAN; rows * n_vocab];
        for (r, resp) in resps.iter().enumerate() {
            let (a, b) = (resp.vocab_start as usize, resp.vocab_end as usize);
            assert_eq!(
                (resp.vocab_start, resp.vocab_end),
                (ranks[r].info.vocab_start, ranks[r].info.vocab_end)
            );
            assert_eq!(resp.n_logit_rows as usize, rows);
            let data = bytes_to_f32s(&resp.logits).unwrap();
            assert_eq!(data.len(), rows * (b - a));
            for row in 0..rows {
                full[row * n_vocab + a..row * n_vocab + b]
                    .copy_from_slice(&data[row * (b - a)..(row + 1) * (b - a)]);
            }
        }
        assert!(
            full.iter().all(|x| x.is_finite()),
            "vocabulary slices leave gaps"
        );
        return full;
    }
    unreachable!("no stages")
}

/// Two sequences through the deployment: a prefill chunk of each, then sequence 1's first decode step in the
/// same batch as sequence 2's remaining chunk, then sequence 1's other decode steps. Returns the logits of
/// every position of each sequence.
async fn two_sequences(stages: &[Vec<Worker>], epoch: u64, a: &[u32], b: &[u32]) -> [Vec<f32>; 2] {
    use LogitsMode::All;
    let v = stages[0][0].info.n_vocab as usize;
    let mut out_a = run_batch(
        stages,
        epoch,
        vec![seq(1, 0, 5, All), seq(2, 0, 3, All)],
        [&a[..5], &b[..3]].concat(),
    )
    .await;
    let mut out_b = out_a.split_off(5 * v);
    let mut mixed = run_batch(
        stages,
        epoch,
        vec![seq(1, 5, 1, All), seq(2, 3, b.len() - 3, All)],
        [&a[5..6], &b[3..]].concat(),
    )
    .await;
    out_b.extend(mixed.split_off(v));
    out_a.extend(mixed);
    for (pos, &token) in a.iter().enumerate().skip(6) {
        out_a.extend(run_batch(stages, epoch, vec![seq(1, pos, 1, All)], vec![token]).await);
    }
    [out_a, out_b]
}

async fn compare_with_single_engine(tp: usize, pp: usize, bound: f32) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("shards");
    split_into(&fixtures().join(F32), tp, pp, &dir);
    let stages = start_all(&dir, service_options()).await;
    join_all(&stages, 1).await;

    let runs = reference_runs();
    let (a, b) = (&runs[0].tokens, &runs[1].tokens);
    let ckpt = open(F32);
    let want_a = prefill_all(&mut single(&ckpt), a);
    let want_b = prefill_all(&mut single(&ckpt), b);
    let [got_a, got_b] = two_sequences(&stages, 1, a, b).await;
    let (da, db) = (max_abs_diff(&got_a, &want_a), max_abs_diff(&got_b, &want_b));
    eprintln!("tp={tp} pp={pp} through gRPC: max abs diff {da:e} / {db:e}");
    assert!(
        da <= bound && db <= bound,
        "tp={tp} pp={pp}: {da} / {db} > {bound}"
    );
    // The peer links sum in rank order like the in-process `LocalGroup`: bit for bit the same logits.
    let whole = run_batch(
        &stages,
        1,
        vec![seq(3, 0, a.len(), LogitsMode::All)],
        a.clone(),
    )
    .await;
    assert_eq!(
        whole,
        Cluster::from_checkpoint(&ckpt, tp, pp).prefill_all(a)
    );

    let stats = stages[0][0]
        .client
        .clone()
        .stats(StatsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.epoch, 1);
    assert_eq!(stats.sequences, 3);
    assert_eq!(stats.tokens as usize, 2 * a.len() + b.len());
    if tp > 1 {
        // The embedding's all-reduce, then two per layer (attention and FFN outputs), every forward call.
        let layers = (stages[0][0].info.end_layer - stages[0][0].info.first_layer) as u64;
        assert_eq!(stats.all_reduces, stats.forward_calls * (2 * layers + 1));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tensor_parallel_workers_match_single_engine() {
    compare_with_single_engine(2, 1, 1e-3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_workers_match_single_engine() {
    compare_with_single_engine(1, 2, 0.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn describe_reports_the_shard() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("shards");
    split_into(&fixtures().join(F32), 2, 2, &dir);
    let manifest = shard_tool::manifest::Manifest::load(&dir).unwrap();
    let stages = start_all(&dir, service_options()).await;
    let ckpt = open(F32);
    let cfg = &ckpt.config;
    for (s, ranks) in stages.iter().enumerate() {
        for (r, w) in ranks.iter().enumerate() {
            let d = &w.info;
            let entry = &manifest.shard(s, r).unwrap().entry;
            let spec = manifest.plan.shard(s, r).unwrap();
            assert_eq!((d.stage, d.rank, d.tp, d.pp), (s as u32, r as u32, 2, 2));
            assert_eq!(d.shard_file, entry.file);
            assert_eq!(format!("{:016x}", d.shard_xxh3), entry.xxh3);
            assert_eq!((d.is_first, d.is_last), (s == 0, s == 1));
            let half = cfg.n_layer as u32 / 2;
            assert_eq!(
                (d.first_layer, d.end_layer),
                (s as u32 * half, (s as u32 + 1) * half)
            );
            if s == 1 {
                assert_eq!(
                    (d.vocab_start as usize)..(d.vocab_end as usize),
                    spec.vocab_rows
                );
            } else {
                assert_eq!((d.vocab_start, d.vocab_end), (0, 0));
            }
            assert_eq!(
                (d.n_embd, d.n_vocab),
                (cfg.n_embd as u32, cfg.n_vocab as u32)
            );
            assert_eq!(
                (d.max_batch_tokens, d.max_logits, d.max_context),
                (64, 64, 64)
            );
            assert!(d.peer_addr.starts_with("127.0.0.1:"));
            assert_eq!(d.epoch, 0);
            assert_eq!(d.model, "tiny_llama");
        }
    }
    let mut health =
        tonic_health::pb::health_client::HealthClient::new(stages[1][1].channel.clone());
    for service in ["", "tessera.worker.v1.Worker"] {
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(
            status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        );
    }
    join_all(&stages, 7).await;
    let d = stages[1][1]
        .client
        .clone()
        .describe(DescribeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.epoch, 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn epochs_and_malformed_requests() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("shards");
    split_into(&fixtures().join(F32), 1, 2, &dir);
    let stages = start_all(&dir, service_options()).await;
    let mut first = stages[0][0].client.clone();
    let mut last = stages[1][0].client.clone();
    let batch = |epoch| ForwardRequest {
        epoch,
        seqs: vec![seq(1, 0, 2, LogitsMode::Last)],
        tokens: vec![3, 4],
        hidden: Bytes::new(),
        order: 0,
        hand_off: false,
    };

    let err = first.forward(batch(0)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("JoinGroup"), "{}", err.message());

    let err = first
        .join_group(JoinGroupRequest {
            epoch: 1,
            peers: vec!["a:1".into(), "b:2".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("peers"), "{}", err.message());

    join_all(&stages, 3).await;
    let err = first
        .join_group(JoinGroupRequest {
            epoch: 3,
            peers: vec![stages[0][0].info.peer_addr.clone()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");

    // Another epoch: the coordinator must not mix caches across a restart.
    for e in [2, 4] {
        let err = first.forward(batch(e)).await.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
        assert!(err.message().contains("epoch"), "{}", err.message());
    }
    let err = first
        .release(ReleaseRequest {
            epoch: 2,
            seq_ids: vec![1],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");

    let hidden = first.forward(batch(3)).await.unwrap().into_inner().hidden;
    let n_embd = stages[0][0].info.n_embd as usize;
    assert_eq!(hidden.len(), 2 * n_embd * 4);

    // Malformed batches: INVALID_ARGUMENT naming the field, and nothing changes.
    let mut req = ForwardRequest {
        epoch: 3,
        seqs: vec![seq(1, 0, 2, LogitsMode::Last)],
        tokens: Vec::new(),
        hidden: hidden.slice(..7),
        order: 0,
        hand_off: false,
    };
    let err = last.forward(req.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().starts_with("hidden: 7 bytes"),
        "{}",
        err.message()
    );
    req.hidden = hidden.slice(..4 * n_embd);
    let err = last.forward(req.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("hidden states"), "{}", err.message());
    req.hidden = hidden.clone();
    req.seqs[0].logits = 9;
    let err = last.forward(req.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("seqs[0].logits"),
        "{}",
        err.message()
    );
    req.seqs[0] = seq(5, 2, 2, LogitsMode::Last);
    let err = last.forward(req.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("seq_id 5"), "{}", err.message());
    req.seqs[0] = seq(1, 0, 2, LogitsMode::Last);
    let resp = last.forward(req).await.unwrap().into_inner();
    assert_eq!(resp.n_logit_rows, 1);
    assert!(resp.hidden.is_empty());

    // The worker of the first stage refuses hidden states, the last stage token ids.
    let mut bad = batch(3);
    bad.seqs[0] = seq(9, 0, 2, LogitsMode::None);
    bad.hidden = Bytes::from(f32s_to_bytes(&vec![0.0; 2 * n_embd]));
    let err = first.forward(bad).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let stats = first.stats(StatsRequest {}).await.unwrap().into_inner();
    assert_eq!(
        (stats.epoch, stats.sequences, stats.forward_calls),
        (3, 1, 1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_frees_and_kv_memory_is_resource_exhausted() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("shards");
    split_into(&fixtures().join(F32), 1, 1, &dir);
    let shard = ShardDir::open(&dir, 0, 0).unwrap();
    let one = KvCache::memory_bytes(shard.config(), &shard.spec, 64).unwrap();
    let opts = ServiceOptions {
        kv_budget_bytes: Some(2 * one),
        ..service_options()
    };
    let stages = start_all(&dir, opts).await;
    join_all(&stages, 1).await;
    let mut w = stages[0][0].client.clone();
    let start = |id| ForwardRequest {
        epoch: 1,
        seqs: vec![seq(id, 0, 1, LogitsMode::Last)],
        tokens: vec![7],
        hidden: Bytes::new(),
        order: 0,
        hand_off: false,
    };
    w.forward(start(1)).await.unwrap();
    w.forward(start(2)).await.unwrap();
    let stats = w.stats(StatsRequest {}).await.unwrap().into_inner();
    assert_eq!((stats.sequences, stats.kv_cache_bytes), (2, 2 * one));

    let err = w.forward(start(3)).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("budget"), "{}", err.message());

    w.release(ReleaseRequest {
        epoch: 1,
        seq_ids: vec![1, 42],
    })
    .await
    .unwrap();
    let stats = w.stats(StatsRequest {}).await.unwrap().into_inner();
    assert_eq!((stats.sequences, stats.kv_cache_bytes), (1, one));
    w.forward(start(3)).await.unwrap();

    // A new epoch drops every sequence.
    join_all(&stages, 2).await;
    let stats = w.stats(StatsRequest {}).await.unwrap().into_inner();
    assert_eq!(
        (stats.epoch, stats.sequences, stats.kv_cache_bytes),
        (2, 0, 0)
    );
}

/// Numbered batches run in their order whatever order they arrive in (a sequence's second batch sent first
/// waits for its first); a number already taken is refused; a batch whose predecessor never comes waits
/// until the group is re-formed and then fails for its epoch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numbered_batches_run_in_their_order() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("shards");
    split_into(&fixtures().join(F32), 1, 1, &dir);
    let stages = start_all(&dir, service_options()).await;
    join_all(&stages, 1).await;
    let w = stages[0][0].client.clone();
    let batch = |order, start_pos, token| ForwardRequest {
        epoch: 1,
        seqs: vec![seq(1, start_pos, 1, LogitsMode::Last)],
        tokens: vec![token],
        hidden: Bytes::new(),
        order,
        hand_off: false,
    };
    // Batch 2 extends the sequence batch 1 creates: run first, it would find an empty cache.
    let second = {
        let mut c = w.clone();
        let req = batch(2, 1, 8);
        tokio::spawn(async move { c.forward(req).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!second.is_finished(), "batch 2 ran before batch 1 arrived");
    let first = w
        .clone()
        .forward(batch(1, 0, 7))
        .await
        .unwrap()
        .into_inner();
    let second = second.await.unwrap().unwrap().into_inner();
    assert_eq!((first.n_logit_rows, second.n_logit_rows), (1, 1));

    let err = w.clone().forward(batch(2, 2, 9)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("already taken"), "{}", err.message());

    // Batch 3 never comes: batch 4 waits until the group is re-formed, then fails for its epoch.
    let fourth = {
        let mut c = w.clone();
        let req = batch(4, 2, 9);
        tokio::spawn(async move { c.forward(req).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!fourth.is_finished(), "batch 4 ran without batch 3");
    join_all(&stages, 2).await;
    let err = fourth.await.unwrap().unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("re-joined"), "{}", err.message());

    // The new epoch numbers from 1 again.
    let mut req = batch(1, 0, 7);
    req.epoch = 2;
    w.clone().forward(req).await.unwrap();
}

/// With `hand_off`, stage 0 sends its hidden states to stage 1 itself: stage 1 (asked first) waits for them
/// and returns the same logits as when the client relays them. A batch stage 0 refuses reaches stage 1 as
/// ABORTED, naming why, and the next batch runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stages_hand_hidden_states_on_themselves() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("shards");
    split_into(&fixtures().join(F32), 1, 2, &dir);
    let stages = start_all(&dir, service_options()).await;
    let tokens = vec![1u32, 2, 3, 4, 5];
    join_all(&stages, 1).await;
    let relayed = run_batch(
        &stages,
        1,
        vec![seq(1, 0, tokens.len(), LogitsMode::All)],
        tokens.clone(),
    )
    .await;

    for (s, ranks) in stages.iter().enumerate() {
        let mut c = ranks[0].client.clone();
        c.join_group(JoinGroupRequest {
            epoch: 2,
            peers: vec![ranks[0].info.peer_addr.clone()],
            hand_to: stages
                .get(s + 1)
                .map(|next| vec![next[0].addr.clone()])
                .unwrap_or_default(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let batch = |order, seqs: Vec<SeqInput>, tokens: Vec<u32>| ForwardRequest {
        epoch: 2,
        seqs,
        tokens,
        hidden: Bytes::new(),
        order,
        hand_off: true,
    };
    let both = |req: ForwardRequest| {
        let (mut first, mut last) = (stages[0][0].client.clone(), stages[1][0].client.clone());
        async move {
            let mut later = req.clone();
            later.tokens.clear();
            let last = tokio::spawn(async move { last.forward(later).await });
            tokio::time::sleep(Duration::from_millis(50)).await;
            let first = first.forward(req).await;
            (first, last.await.unwrap())
        }
    };
    let (first, last) = both(batch(
        1,
        vec![seq(1, 0, tokens.len(), LogitsMode::All)],
        tokens.clone(),
    ))
    .await;
    assert!(first.unwrap().into_inner().hidden.is_empty());
    let last = last.unwrap().into_inner();
    assert_eq!(bytes_to_f32s(&last.logits).unwrap(), relayed);

    // Stage 0 refuses a sequence that does not exist yet at position 9.
    let (first, last) = both(batch(2, vec![seq(2, 9, 1, LogitsMode::Last)], vec![7])).await;
    assert_eq!(first.unwrap_err().code(), Code::InvalidArgument);
    let err = last.unwrap_err();
    assert_eq!(err.code(), Code::Aborted, "{err:?}");
    assert!(
        err.message().contains("previous stage") && err.message().contains("seq_id 2"),
        "{}",
        err.message()
    );

    let (first, last) = both(batch(
        3,
        vec![seq(1, tokens.len(), 1, LogitsMode::Last)],
        vec![6],
    ))
    .await;
    first.unwrap();
    assert_eq!(last.unwrap().into_inner().n_logit_rows, 1);
}

/// A sequence with `top_k` gets each logits row as the k best logits of the rank's slice (vocabulary ids) and
/// the slice's log-sum-exp; the others in the same batch still get whole slice rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_k_rows_are_the_best_of_each_slice() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("shards");
    split_into(&fixtures().join(F32), 2, 1, &dir);
    let stages = start_all(&dir, service_options()).await;
    join_all(&stages, 1).await;
    let batch = |ids: [u64; 2], k: u32| ForwardRequest {
        epoch: 1,
        seqs: vec![
            seq(ids[0], 0, 2, LogitsMode::Last),
            SeqInput {
                top_k: k,
                ..seq(ids[1], 0, 3, LogitsMode::All)
            },
        ],
        tokens: vec![5, 6, 7, 8, 9],
        hidden: Bytes::new(),
        order: 0,
        hand_off: false,
    };
    let whole = forward_stage(&stages[0], batch([1, 2], 0)).await;
    let top = forward_stage(&stages[0], batch([3, 4], 4)).await;
    for (w, t) in whole.into_iter().zip(top) {
        let (w, t) = (w.unwrap(), t.unwrap());
        let width = (w.vocab_end - w.vocab_start) as usize;
        let rows = bytes_to_f32s(&w.logits).unwrap();
        assert_eq!((w.n_logit_rows, t.n_logit_rows), (4, 1));
        assert_eq!(bytes_to_f32s(&t.logits).unwrap(), rows[..width]);
        assert_eq!(t.top_counts, vec![4, 4, 4]);
        for (i, row) in rows.chunks_exact(width).skip(1).enumerate() {
            let best = tessera_kernels::softmax_reduce::top_m(row, 4, w.vocab_start);
            let got: Vec<(f32, u32)> = (4 * i..4 * i + 4)
                .map(|j| (t.top_logits[j], t.top_ids[j]))
                .collect();
            assert_eq!(got, best);
            let lse = tessera_kernels::softmax_reduce::log_sum_exp(row).unwrap();
            assert_eq!(t.top_lse[i], lse);
        }
    }
}

/// A batch sent to only one rank of a tp=2 stage: its all-reduce times out, the epoch is poisoned on both
/// ranks (UNAVAILABLE), and a new JoinGroup recovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_all_reduce_poisons_the_epoch_until_the_next_join() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("shards");
    split_into(&fixtures().join(F32), 2, 1, &dir);
    let opts = ServiceOptions {
        link_timeout: Duration::from_millis(300),
        ..service_options()
    };
    let stages = start_all(&dir, opts).await;
    join_all(&stages, 1).await;
    let req = ForwardRequest {
        epoch: 1,
        seqs: vec![seq(1, 0, 3, LogitsMode::Last)],
        tokens: vec![1, 2, 3],
        hidden: Bytes::new(),
        order: 0,
        hand_off: false,
    };
    let mut rank0 = stages[0][0].client.clone();
    let mut rank1 = stages[0][1].client.clone();
    let err = rank0.forward(req.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("all-reduce"), "{}", err.message());
    let err = rank0.forward(req.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains("poisoned") || err.message().contains("unusable"),
        "{}",
        err.message()
    );
    // Rank 1 finds its link closed by rank 0 when it runs the batch.
    let err = rank1.forward(req.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");

    join_all(&stages, 2).await;
    let mut req = req;
    req.epoch = 2;
    let resps = forward_stage(&stages[0], req).await;
    assert!(
        resps
            .iter()
            .all(|r| r.as_ref().is_ok_and(|r| r.n_logit_rows == 1)),
        "{resps:?}"
    );
}

/// A JoinGroup whose peers do not all join fails after its timeout and leaves the epoch unusable, saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_join_leaves_the_epoch_unavailable() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("shards");
    split_into(&fixtures().join(F32), 2, 1, &dir);
    let opts = ServiceOptions {
        join_timeout: Duration::from_millis(300),
        ..service_options()
    };
    let stages = start_all(&dir, opts).await;
    let peers: Vec<String> = stages[0].iter().map(|w| w.info.peer_addr.clone()).collect();
    let mut rank1 = stages[0][1].client.clone();
    let err = rank1
        .join_group(JoinGroupRequest {
            epoch: 1,
            peers,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains("did not connect"),
        "{}",
        err.message()
    );
    let err = rank1
        .release(ReleaseRequest {
            epoch: 1,
            seq_ids: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains("JoinGroup failed"),
        "{}",
        err.message()
    );
    join_all(&stages, 2).await;
}

/// The worker refuses to serve a shard file whose checksum is not the manifest's.
#[test]
fn corrupted_shard_is_refused_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("shards");
    split_into(&fixtures().join(F32), 1, 1, &dir);
    let file = dir.join(shard_tool::manifest::shard_file_name(0, 0));
    let mut bytes = std::fs::read(&file).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&file, bytes).unwrap();
    let args = worker_args(&dir, &tmp.path().join("addr"));
    let err = format!("{:#}", tessera_worker::cli::run(args).unwrap_err());
    assert!(
        err.contains("xxh3") && err.contains("refusing to serve"),
        "{err}"
    );
    assert!(!tmp.path().join("addr").exists());
}

fn worker_args(dir: &Path, addr_file: &Path) -> tessera_worker::cli::WorkerArgs {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: tessera_worker::cli::WorkerArgs,
    }
    let args: Vec<std::ffi::OsString> = vec![
        "tessera-worker".into(),
        "--shard-dir".into(),
        dir.into(),
        "--stage".into(),
        "0".into(),
        "--addr-file".into(),
        addr_file.into(),
        "--threads".into(),
        "1".into(),
    ];
    Cli::try_parse_from(args).unwrap().args
}

/// The real SmolLM2-135M (Q4_1) split tp=3 (its 3 KV heads, one per rank) through gRPC workers: greedy
/// tokens of every prompt position as llama.cpp's, " Paris" last.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smollm2_tensor_parallel_says_paris() {
    let Some(path) = models_dir()
        .map(|d| d.join("SmolLM2-135M-Instruct.Q4_1.gguf"))
        .filter(|p| p.is_file())
    else {
        missing("SmolLM2-135M-Instruct.Q4_1.gguf not cached".into());
        return;
    };
    const PROMPT: [u32; 5] = [504, 3575, 282, 4649, 314];
    const GREEDY: [usize; 5] = [29, 282, 260, 314, 7042];
    let tmp = tempfile::tempdir().unwrap();
    let dir: PathBuf = tmp.path().join("shards");
    split_into(&path, 3, 1, &dir);
    let stages = start_all(&dir, service_options()).await;
    join_all(&stages, 1).await;
    let logits = run_batch(
        &stages,
        1,
        vec![seq(1, 0, PROMPT.len(), LogitsMode::All)],
        PROMPT.to_vec(),
    )
    .await;
    let v = stages[0][0].info.n_vocab as usize;
    let greedy: Vec<usize> = logits.chunks_exact(v).map(argmax).collect();
    assert_eq!(greedy, GREEDY);
    let ckpt = shard_tool::checkpoint::Checkpoint::open(&[path]).unwrap();
    // Q4_1 weights quantize the activations to Q8_1 at every matmul, which turns tensor parallelism's other
    // summation order into whole quantization steps (see `parallel.rs`): compare with the in-process
    // tensor-parallel engines instead, bit for bit, and report the distance to one rank.
    assert_eq!(
        logits,
        Cluster::from_checkpoint(&ckpt, 3, 1).prefill_all(&PROMPT)
    );
    let want = prefill_all(&mut single(&ckpt), &PROMPT);
    eprintln!(
        "SmolLM2 Q4_1 tp=3 through gRPC vs one rank: max abs diff {:e}",
        max_abs_diff(&logits, &want)
    );
}

/// `--peer-advertise`: Describe reports the given peer-link address instead of the bound one (a worker bound
/// to 0.0.0.0, behind NAT or a Kubernetes Service).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn advertised_peer_address_is_what_describe_reports() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("shards");
    split_into(&fixtures().join(F32), 2, 1, &dir);
    let shard = ShardDir::open(&dir, 0, 1).unwrap();
    let peers = PeerListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let bound = peers.local_addr();
    let opts = service_options();
    let service = tokio::task::spawn_blocking(move || {
        WorkerService::start_advertised(shard, peers, opts, Some("worker-1.tessera:7001".into()))
    })
    .await
    .unwrap()
    .unwrap();
    let d = service.describe_now();
    assert_eq!(d.peer_addr, "worker-1.tessera:7001");
    assert_eq!(service.peer_addr(), bound);
}
