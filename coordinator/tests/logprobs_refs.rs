//! OpenAI log-probabilities over HTTP against llama.cpp's: `/v1/completions` with `echo`, `logprobs: 5` and
//! 8 greedy tokens on SmolLM2 F32, served in this process and by a TP=2 cluster of worker processes (whose
//! rows are assembled from each rank's vocabulary slice), both with f32 KV caches (`--cache-type f32`).
//!
//! The reference is `tests/fixtures/engine/llama_cpp.json` (`scripts/gen_engine_refs.py refs`): llama.cpp's
//! logits for the same 64-token prompt and greedy continuation, with each row's log-sum-exp taken in
//! float64, so a log-probability is `logit − logsumexp` of llama.cpp's own row. The engine's logits are
//! within 1e-5 of the row range of llama.cpp's on this file (`worker/tests/engine_refs.rs`), so a
//! log-probability, a difference of two such logits' functions, is held to twice that.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use support::*;
use tessera::serve::local::LocalPipeline;
use tessera::serve::remote::{RemoteOptions, RemotePipeline};
use tessera::tokenizer::Tokenizer;
use tessera_worker::{EngineOptions, KvType};

const N_GENERATED: usize = 8;
const TOP: usize = 5;

/// The `smollm2-f32` run of the llama.cpp fixture.
struct Reference {
    prompt: Vec<u32>,
    /// `top_ids[p]` with their logits (`<run>.top32.f32`), the first `TOP + 1` of each row.
    top: Vec<Vec<(u32, f32)>>,
    row_range: Vec<f32>,
    logsumexp: Vec<f64>,
    next_token_logit: Vec<f64>,
    greedy: Vec<u32>,
    greedy_logit: Vec<f64>,
    greedy_logsumexp: Vec<f64>,
}

fn engine_fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/engine")
}

fn reference() -> Reference {
    let dir = engine_fixtures();
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("llama_cpp.json")).unwrap())
            .unwrap();
    let run = json["runs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["run"] == "smollm2-f32")
        .expect("smollm2-f32 run");
    let u32s = |v: &Value| -> Vec<u32> {
        v.as_array()
            .unwrap_or_else(|| panic!("not an array: {v}"))
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    let f64s = |v: &Value| -> Vec<f64> {
        v.as_array()
            .unwrap_or_else(|| panic!("not an array (rerun scripts/gen_engine_refs.py refs?): {v}"))
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    };
    let bin = std::fs::read(dir.join(run["top_logits"]["file"].as_str().unwrap())).unwrap();
    let top_logits: Vec<f32> = bin
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let k = json["top_k"].as_u64().unwrap() as usize;
    let top = run["top_ids"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(p, ids)| {
            u32s(ids)
                .into_iter()
                .zip(&top_logits[p * k..])
                .take(TOP + 1)
                .map(|(id, &l)| (id, l))
                .collect()
        })
        .collect();
    let (lo, hi) = (f64s(&run["row_min"]), f64s(&run["row_max"]));
    Reference {
        prompt: u32s(&json["prompts"]["smollm2"]["ids"]),
        top,
        row_range: lo.iter().zip(&hi).map(|(l, h)| (h - l) as f32).collect(),
        logsumexp: f64s(&run["logsumexp"]),
        next_token_logit: f64s(&run["next_token_logit"]),
        greedy: u32s(&run["greedy"]["ids"]),
        greedy_logit: f64s(&run["greedy"]["logits"]),
        greedy_logsumexp: f64s(&run["greedy"]["logsumexp"]),
    }
}

/// Sends the scoring request and holds every number in the answer to llama.cpp's; returns the worst
/// log-probability difference.
fn check_against_llama_cpp(
    http_addr: SocketAddr,
    (model_id, tokenizer): (String, Arc<Tokenizer>),
    r: &Reference,
    what: &str,
) -> f64 {
    let body = json!({
        "model": model_id,
        "prompt": r.prompt,
        "max_tokens": N_GENERATED,
        "temperature": 0,
        "echo": true,
        "logprobs": TOP,
    });
    let (status, text) = http(
        http_addr,
        "POST",
        "/v1/completions",
        Some(&body.to_string()),
    );
    assert_eq!(status, 200, "{what}: {text}");
    let answer: Value = serde_json::from_str(&text).unwrap();
    let lp = &answer["choices"][0]["logprobs"];
    let n = r.prompt.len();
    let tokens = lp["tokens"].as_array().unwrap();
    let token_lp = lp["token_logprobs"].as_array().unwrap();
    let tops = lp["top_logprobs"].as_array().unwrap();
    assert_eq!(tokens.len(), n + N_GENERATED, "{what}: tokens");
    assert_eq!(token_lp.len(), n + N_GENERATED, "{what}: token_logprobs");
    assert!(
        token_lp[0].is_null() && tops[0].is_null(),
        "{what}: first prompt token"
    );

    let text_of = |id: u32| String::from_utf8_lossy(tokenizer.piece(id, false)).into_owned();
    let ids: Vec<u32> = r
        .prompt
        .iter()
        .chain(&r.greedy[..N_GENERATED])
        .copied()
        .collect();
    for (i, &id) in ids.iter().enumerate() {
        assert_eq!(tokens[i], json!(text_of(id)), "{what}: token {i}");
    }
    let mut worst = 0f64;
    // Entry i > 0 is predicted by row i − 1: prompt rows for i < n, then the greedy steps' rows.
    for i in 1..n + N_GENERATED {
        let row = i - 1;
        let (want, lse) = if i < n {
            (r.next_token_logit[row] - r.logsumexp[row], r.logsumexp[row])
        } else {
            let s = i - n;
            (
                r.greedy_logit[s] - r.greedy_logsumexp[s],
                r.greedy_logsumexp[s],
            )
        };
        // Greedy rows are not in the per-position fixture: bound them by the last prompt row's range.
        let tol = 2.0 * 1e-5 * f64::from(r.row_range[row.min(n - 1)]);
        let got = token_lp[i]
            .as_f64()
            .unwrap_or_else(|| panic!("{what}: token_logprobs[{i}] is {}", token_lp[i]));
        worst = worst.max((got - want).abs());
        assert!(
            (got - want).abs() <= tol,
            "{what}: token_logprobs[{i}] = {got}, llama.cpp {want} (tolerance {tol:.1e})"
        );
        // The alternatives: llama.cpp's top 5 of prompt rows (the fixture has no greedy rows' top ids),
        // wherever the 5th and 6th are far enough apart that membership does not depend on rounding.
        if i >= n {
            continue;
        }
        let top = tops[i]
            .as_object()
            .unwrap_or_else(|| panic!("{what}: top_logprobs[{i}] is {}", tops[i]));
        let cut = f64::from(r.top[row][TOP - 1].1 - r.top[row][TOP].1);
        if cut <= 2.0 * tol {
            continue;
        }
        for &(id, logit) in &r.top[row][..TOP] {
            let want = f64::from(logit) - lse;
            let key = text_of(id);
            let got = top
                .get(&key)
                .and_then(Value::as_f64)
                .unwrap_or_else(|| panic!("{what}: top_logprobs[{i}] lacks {key:?}: {top:?}"));
            worst = worst.max((got - want).abs());
            assert!(
                (got - want).abs() <= tol,
                "{what}: top_logprobs[{i}][{key:?}] = {got}, llama.cpp {want} (tolerance {tol:.1e})"
            );
        }
    }
    worst
}

#[test]
fn in_process_logprobs_equal_llama_cpp() {
    let Some(path) = model(SMOLLM2_F32) else {
        return;
    };
    let r = reference();
    let (pipeline, model) = LocalPipeline::open(
        &[path],
        2,
        512,
        EngineOptions {
            max_batch_tokens: 128,
            max_logits: 64,
            kv_type: KvType::F32,
            ..EngineOptions::default()
        },
    )
    .unwrap();
    let who = (model.id.clone(), model.tokenizer.clone());
    let served = start_coordinator(model, move || Arc::new(pipeline));
    let worst = check_against_llama_cpp(served.bound.http.unwrap(), who, &r, "in-process");
    eprintln!("in-process: worst |Δ log-probability| against llama.cpp {worst:.2e}");
    drop(served);
}

#[test]
fn tensor_parallel_logprobs_equal_llama_cpp() {
    let Some(path) = model(SMOLLM2_F32) else {
        return;
    };
    let r = reference();
    let dir = tempfile::tempdir().unwrap();
    let workers = start_workers_with(&path, 2, 1, dir.path(), &["--cache-type", "f32"]);
    let manifest = shard_tool::manifest::Manifest::load(&workers.spec.shard_dir).unwrap();
    let model =
        tessera::server::model_from_shards(&workers.spec.shard_dir, &manifest, 512).unwrap();
    let addrs = workers.worker_addrs();
    let who = (model.id.clone(), model.tokenizer.clone());
    let served = start_coordinator(model, move || {
        RemotePipeline::connect(manifest, addrs, RemoteOptions::default()).expect("connect")
    });
    let addr = served.bound.http.unwrap();
    let started = std::time::Instant::now();
    while http(addr, "GET", "/health", None).0 != 200 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the cluster did not become healthy"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let worst = check_against_llama_cpp(addr, who, &r, "TP=2 cluster");
    eprintln!("TP=2 cluster: worst |Δ log-probability| against llama.cpp {worst:.2e}");
    drop(served);
    drop(workers);
}
