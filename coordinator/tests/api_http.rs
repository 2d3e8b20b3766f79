//! The OpenAI-compatible HTTP API (`tessera::api::openai`) over a scheduler double that generates a scripted
//! text through the real sampler and stop-string path (tests/api_support): response shapes, SSE framing,
//! parameter parsing and every error mapping. The last test drives a real TCP server with the official
//! `openai` Python package (tests/clients/openai_check.py) when it is installed.

mod api_support;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use api_support::{FakeBackend, MAX_CONTEXT, SCRIPT, state, tiny_model};
use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tessera::api::openai::router;
use tessera::chat::ChatMessage;
use tessera::serve::ServeError;
use tower::ServiceExt;

fn app() -> (Router, Arc<FakeBackend>) {
    let fake = FakeBackend::new(tiny_model(MAX_CONTEXT));
    (router(state(&fake)), fake)
}

async fn call(
    app: &Router,
    method: Method,
    path: &str,
    body: &str,
) -> (StatusCode, HeaderMap, String) {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json")
        .body(Body::from(body.to_owned()))
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    (
        parts.status,
        parts.headers,
        String::from_utf8(bytes.to_vec()).unwrap(),
    )
}

async fn post(app: &Router, path: &str, body: Value) -> (StatusCode, Value) {
    let (status, _, text) = call(app, Method::POST, path, &body.to_string()).await;
    let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    (status, v)
}

/// The SSE events of a stream body: each `data:` payload, in order. Checks the framing on the way.
fn sse_events(body: &str) -> Vec<String> {
    assert!(
        body.ends_with("\n\n"),
        "events end with a blank line: {body:?}"
    );
    body.split("\n\n")
        .filter(|e| !e.is_empty() && !e.starts_with(':'))
        .map(|e| {
            let data = e
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("event without data: {e:?}"));
            assert!(!data.contains('\n'), "one data line per event: {e:?}");
            data.to_owned()
        })
        .collect()
}

async fn stream(app: &Router, path: &str, body: Value) -> (StatusCode, HeaderMap, Vec<String>) {
    let (status, headers, text) = call(app, Method::POST, path, &body.to_string()).await;
    (status, headers, sse_events(&text))
}

fn json_chunks(events: &[String]) -> Vec<Value> {
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect()
}

fn assert_error(v: &Value, param: &str) {
    let e = &v["error"];
    assert_eq!(e["type"], "invalid_request_error", "{v}");
    assert_eq!(e["param"], param, "{v}");
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
}

fn prefix(n_tokens: usize, fake: &FakeBackend) -> String {
    let ids = fake.script();
    fake.model.tokenizer.decode(&ids[..n_tokens], false)
}

#[tokio::test]
async fn completion_whole() {
    let (app, fake) = app();
    let (status, v) = post(
        &app,
        "/v1/completions",
        json!({"model": "tiny-llama", "prompt": "Hello", "max_tokens": 5, "temperature": 0, "user": "u1"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["model"], "tiny-llama");
    assert!(v["created"].as_u64().unwrap() > 1_600_000_000);
    let choice = &v["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["text"], prefix(5, &fake));
    assert_eq!(choice["finish_reason"], "length");
    assert_eq!(choice["logprobs"], Value::Null);
    let prompt = fake.model.tokenizer.encode("Hello", true, false).unwrap();
    assert_eq!(fake.last_request().prompt, prompt);
    assert_eq!(v["usage"]["prompt_tokens"], prompt.len());
    assert_eq!(v["usage"]["completion_tokens"], 5);
    assert_eq!(v["usage"]["total_tokens"], prompt.len() + 5);
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 0);

    // Without max_tokens a completion gets OpenAI's 16; the whole script ends with "stop".
    let (_, v) = post(
        &app,
        "/v1/completions",
        json!({"prompt": "Hello", "temperature": 0}),
    )
    .await;
    assert_eq!(fake.last_request().params.max_tokens, Some(16));
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    let (_, v) = post(
        &app,
        "/v1/completions",
        json!({"prompt": "Hello", "temperature": 0, "max_tokens": 100}),
    )
    .await;
    assert_eq!(v["choices"][0]["text"], SCRIPT);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
}

#[tokio::test]
async fn completion_prompt_forms() {
    let (app, fake) = app();
    for prompt in [json!([283, 51, 257]), json!([[283, 51, 257]])] {
        let (status, v) = post(
            &app,
            "/v1/completions",
            json!({"prompt": prompt, "max_tokens": 2}),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{v}");
        assert_eq!(fake.last_request().prompt, vec![283, 51, 257]);
    }
    let (status, _) = post(
        &app,
        "/v1/completions",
        json!({"prompt": ["Hi"], "max_tokens": 2}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        fake.last_request().prompt,
        fake.model.tokenizer.encode("Hi", true, false).unwrap()
    );
    for (body, param) in [
        (json!({"prompt": []}), "prompt"),
        (json!({"prompt": ["a", []]}), "prompt"),
        (json!({"prompt": ["a", 5]}), "prompt"),
        (json!({"prompt": [1, -2]}), "prompt"),
        (json!({"prompt": [1, 100000]}), "prompt"),
        (json!({"prompt": 5}), "prompt"),
        (json!({}), "prompt"),
        (json!({"prompt": "x", "n": 0}), "n"),
        (json!({"prompt": "x", "n": 129}), "n"),
        (json!({"prompt": ["x", "y"], "n": 65}), "n"),
        (json!({"prompt": vec!["x"; 129]}), "prompt"),
        (json!({"prompt": "x", "best_of": 3}), "best_of"),
        (json!({"prompt": "x", "n": 2, "best_of": 1}), "best_of"),
        (json!({"prompt": "x", "echo": 1}), "echo"),
        (json!({"prompt": "x", "max_tokens": 0}), "max_tokens"),
        (json!({"prompt": "x", "suffix": "y"}), "suffix"),
    ] {
        let (status, v) = post(&app, "/v1/completions", body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {v}");
        assert_error(&v, param);
    }
}

/// The text of choice `i` of a whole response, and its finish reason.
fn choice_text(v: &Value, i: usize) -> (String, String) {
    let c = &v["choices"][i];
    assert_eq!(c["index"], i, "{v}");
    let text = c["text"]
        .as_str()
        .or_else(|| c["message"]["content"].as_str())
        .unwrap_or_else(|| panic!("choice {i} has no text: {v}"));
    (
        text.to_owned(),
        c["finish_reason"].as_str().unwrap().to_owned(),
    )
}

/// `n` and a batch of prompts: choice `p·n + j` is prompt `p` sampled with `seed + j`, and is exactly what
/// that prompt and seed give in a request of its own; usage counts each prompt once.
#[tokio::test]
async fn several_choices_and_prompts() {
    let (app, fake) = app();
    // Temperature 1 over the fake's logits (script token +8 over a 32000-token vocabulary) makes every seed
    // sample a different text.
    let sampled = |prompt: Value, seed: u64| json!({"prompt": prompt, "max_tokens": 6, "temperature": 1.0, "seed": seed});
    let alone = |prompt: &'static str, seed: u64| {
        let app = app.clone();
        async move {
            let (status, v) = post(&app, "/v1/completions", sampled(json!(prompt), seed)).await;
            assert_eq!(status, StatusCode::OK, "{v}");
            choice_text(&v, 0)
        }
    };
    let prompts = ["Hello", "Once upon a time"];
    let mut want = Vec::new();
    for p in prompts {
        for j in 0..3 {
            want.push(alone(p, 40 + j).await);
        }
    }
    assert!(
        want[0] != want[1] && want[1] != want[2],
        "different seeds sample different texts: {want:?}"
    );
    fake.take_requests();

    // Each sequence reports 2 prompt tokens copied from a kept prefix: like prompt_tokens, they count once
    // per prompt however many choices continue it.
    fake.config.lock().unwrap().cached_tokens = 2;
    let mut body = sampled(json!(prompts), 40);
    body["n"] = json!(3);
    let (status, v) = post(&app, "/v1/completions", body.clone()).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let got: Vec<_> = (0..6).map(|i| choice_text(&v, i)).collect();
    assert_eq!(got, want);
    assert_eq!(v["choices"].as_array().unwrap().len(), 6);
    let reqs = fake.take_requests();
    let seeds: Vec<_> = reqs.iter().map(|r| r.params.seed).collect();
    assert_eq!(seeds, [40, 41, 42, 40, 41, 42].map(Some));
    let tok = &fake.model.tokenizer;
    let prompt_tokens: usize = prompts
        .iter()
        .map(|p| tok.encode(p, true, false).unwrap().len())
        .sum();
    assert_eq!(reqs[3].prompt, tok.encode(prompts[1], true, false).unwrap());
    assert_eq!(v["usage"]["prompt_tokens"], prompt_tokens, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 6 * 6, "{v}");
    assert_eq!(v["usage"]["total_tokens"], prompt_tokens + 36, "{v}");
    assert_eq!(
        v["usage"]["prompt_tokens_details"]["cached_tokens"],
        2 * 2,
        "{v}"
    );

    // Streamed: each choice's chunks carry its index and join to its whole text; one finish chunk per
    // choice, then the usage of all of them and one [DONE].
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let (status, _, events) = stream(&app, "/v1/completions", body).await;
    assert_eq!(status, StatusCode::OK);
    let chunks = json_chunks(&events);
    let (usage, rest) = chunks.split_last().unwrap();
    assert_eq!(usage["usage"], v["usage"]);
    let mut texts = vec![String::new(); 6];
    let mut finishes = vec![Vec::new(); 6];
    for c in rest {
        assert_eq!(c["choices"].as_array().unwrap().len(), 1, "{c}");
        let choice = &c["choices"][0];
        let i = choice["index"].as_u64().unwrap() as usize;
        texts[i].push_str(choice["text"].as_str().unwrap());
        if let Some(f) = choice["finish_reason"].as_str() {
            finishes[i].push(f.to_owned());
        }
    }
    let whole: Vec<_> = got
        .iter()
        .map(|(t, f)| (t.clone(), vec![f.clone()]))
        .collect();
    assert_eq!(texts.into_iter().zip(finishes).collect::<Vec<_>>(), whole);
    assert_eq!(fake.take_requests().len(), 6);
    fake.config.lock().unwrap().cached_tokens = 0;

    // Chat: n choices, each stream opening with its own role chunk.
    let (status, v) = post(
        &app,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "Hi"}], "n": 2, "max_tokens": 4, "seed": 7,
               "temperature": 1.0}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["choices"].as_array().unwrap().len(), 2);
    let seeds: Vec<_> = fake.take_requests().iter().map(|r| r.params.seed).collect();
    assert_eq!(seeds, [Some(7), Some(8)]);
    let (_, _, events) = stream(
        &app,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "Hi"}], "n": 2, "max_tokens": 4, "seed": 7,
               "temperature": 1.0, "stream": true}),
    )
    .await;
    let chunks = json_chunks(&events);
    let roles: Vec<_> = chunks
        .iter()
        .filter(|c| c["choices"][0]["delta"]["role"] == "assistant")
        .map(|c| c["choices"][0]["index"].as_u64().unwrap())
        .collect();
    assert_eq!(roles, [0, 1]);
    let mut texts = vec![String::new(); 2];
    for c in &chunks {
        let choice = &c["choices"][0];
        if let Some(t) = choice["delta"]["content"].as_str() {
            texts[choice["index"].as_u64().unwrap() as usize].push_str(t);
        }
    }
    assert_eq!(texts, [choice_text(&v, 0).0, choice_text(&v, 1).0]);
    assert_eq!(fake.finished.load(Ordering::SeqCst), 6 + 6 + 6 + 2 + 2);
}

/// A batch whose second prompt is too long names it; the first prompt's sequences are not left running.
#[tokio::test]
async fn batch_errors_name_the_prompt() {
    let (app, fake) = app();
    let long: Vec<u32> = vec![283; MAX_CONTEXT];
    let (status, v) = post(
        &app,
        "/v1/completions",
        json!({"prompt": [[283, 51], long], "max_tokens": 2}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    assert_error(&v, "prompt");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.starts_with("prompt 1 of the batch: "), "{message}");
    assert!(fake.take_requests().is_empty(), "nothing was submitted");

    // The scheduler refuses the second sequence (queue full): the answer is 429 and the first sequence,
    // already running, is cancelled.
    {
        let mut config = fake.config.lock().unwrap();
        config.token_delay = Duration::from_millis(20);
        config.submit_error = Some(ServeError::Overloaded("queue full".into()));
        config.submits_before_error = 1;
    }
    let (status, v) = post(
        &app,
        "/v1/completions",
        json!({"prompt": ["Hello", "Hi"], "max_tokens": 2}),
    )
    .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{v}");
    assert_eq!(fake.take_requests().len(), 2);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(fake.cancelled.load(Ordering::SeqCst), 1);
    assert_eq!(fake.finished.load(Ordering::SeqCst), 0);
}

/// `echo`: the prompt's text comes first; with `logprobs`, every prompt token's log-probability (null for the
/// first, with null alternatives) comes first in `logprobs`; `max_tokens: 0` scores the prompt alone, as
/// lm-evaluation-harness asks. Streamed, the echo is the first chunk of each choice.
#[tokio::test]
async fn echo_returns_the_prompt_and_its_logprobs() {
    let (app, fake) = app();
    let prompt = [283u32, 51, 257];
    let prompt_text = fake.model.tokenizer.decode(&prompt, false);
    let (status, v) = post(
        &app,
        "/v1/completions",
        json!({"prompt": prompt, "echo": true, "logprobs": 1, "max_tokens": 3, "temperature": 0}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(fake.last_request().params.prompt_logprobs, Some(1));
    let (text, finish) = choice_text(&v, 0);
    assert_eq!(text, prompt_text + &prefix(3, &fake));
    assert_eq!(finish, "length");
    let lp = &v["choices"][0]["logprobs"];
    let token_lps = lp["token_logprobs"].as_array().unwrap();
    assert_eq!(token_lps.len(), 3 + 3);
    assert_eq!(token_lps[0], Value::Null);
    assert_eq!(token_lps[1].as_f64().unwrap() as f32, -0.1);
    assert_eq!(token_lps[2].as_f64().unwrap() as f32, -0.2);
    assert_eq!(lp["top_logprobs"][0], Value::Null);
    assert_eq!(lp["top_logprobs"][1].as_object().unwrap().len(), 1);
    assert_eq!(v["usage"]["completion_tokens"], 3);

    // Scoring only: the prompt and its log-probabilities, nothing generated.
    let (status, v) = post(
        &app,
        "/v1/completions",
        json!({"prompt": ["Hello", prompt], "echo": true, "logprobs": 0, "max_tokens": 0}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(fake.last_request().params.max_tokens, Some(1));
    assert_eq!(choice_text(&v, 0).0, "Hello");
    assert_eq!(
        choice_text(&v, 1).0,
        fake.model.tokenizer.decode(&prompt, false)
    );
    let hello = fake.model.tokenizer.encode("Hello", true, false).unwrap();
    assert_eq!(
        v["choices"][0]["logprobs"]["tokens"]
            .as_array()
            .unwrap()
            .len(),
        hello.len()
    );
    assert_eq!(v["usage"]["completion_tokens"], 0, "{v}");
    assert_eq!(v["usage"]["prompt_tokens"], hello.len() + 3, "{v}");

    // Echo without logprobs asks for no prompt log-probabilities; streamed, each choice opens with it.
    let (_, _, events) = stream(
        &app,
        "/v1/completions",
        json!({"prompt": "Hello", "echo": true, "max_tokens": 2, "n": 2, "temperature": 0,
               "stream": true}),
    )
    .await;
    assert_eq!(fake.last_request().params.prompt_logprobs, None);
    let chunks = json_chunks(&events);
    let mut texts = vec![String::new(); 2];
    for c in &chunks {
        let choice = &c["choices"][0];
        texts[choice["index"].as_u64().unwrap() as usize]
            .push_str(choice["text"].as_str().unwrap());
    }
    let want = format!("Hello{}", prefix(2, &fake));
    assert_eq!(texts, [want.clone(), want]);
    assert_eq!(chunks[0]["choices"][0]["text"], "Hello");
    assert_eq!(chunks[1]["choices"][0]["text"], "Hello");

    // Streamed scoring: one echo chunk with the prompt's log-probabilities, then the finish chunk.
    let (_, _, events) = stream(
        &app,
        "/v1/completions",
        json!({"prompt": prompt, "echo": true, "logprobs": 1, "max_tokens": 0, "stream": true,
               "stream_options": {"include_usage": true}}),
    )
    .await;
    let chunks = json_chunks(&events);
    assert_eq!(chunks.len(), 3, "{chunks:?}");
    assert_eq!(
        chunks[0]["choices"][0]["text"],
        prompt_text_of(&fake, &prompt)
    );
    assert_eq!(
        chunks[0]["choices"][0]["logprobs"]["token_logprobs"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
    assert_eq!(chunks[1]["choices"][0]["finish_reason"], "length");
    assert_eq!(chunks[2]["usage"]["completion_tokens"], 0);
}

fn prompt_text_of(fake: &FakeBackend, ids: &[u32]) -> String {
    fake.model.tokenizer.decode(ids, false)
}

#[tokio::test]
async fn completion_stream_framing() {
    let (app, fake) = app();
    let (status, headers, events) = stream(
        &app,
        "/v1/completions",
        json!({"prompt": "Hello", "max_tokens": 100, "temperature": 0, "stream": true}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let chunks = json_chunks(&events);
    assert!(chunks.len() > 3);
    let id = chunks[0]["id"].as_str().unwrap();
    assert!(id.starts_with("cmpl-"));
    let mut text = String::new();
    for (i, c) in chunks.iter().enumerate() {
        assert_eq!(c["id"], id);
        assert_eq!(c["object"], "text_completion");
        assert_eq!(c["model"], "tiny-llama");
        assert!(c.get("usage").is_none(), "no usage field unless asked: {c}");
        let choice = &c["choices"][0];
        text.push_str(choice["text"].as_str().unwrap());
        let last = i + 1 == chunks.len();
        assert_eq!(
            choice["finish_reason"],
            if last { json!("stop") } else { Value::Null }
        );
    }
    assert_eq!(text, SCRIPT);
    assert_eq!(fake.finished.load(Ordering::SeqCst), 1);

    // include_usage: every chunk carries "usage": null, then a usage chunk with no choices.
    let (_, _, events) = stream(
        &app,
        "/v1/completions",
        json!({"prompt": "Hello", "max_tokens": 3, "temperature": 0, "stream": true,
               "stream_options": {"include_usage": true}}),
    )
    .await;
    let chunks = json_chunks(&events);
    let (usage, rest) = chunks.split_last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 3);
    assert!(rest.iter().all(|c| c["usage"].is_null()));
    assert_eq!(
        rest.last().unwrap()["choices"][0]["finish_reason"],
        "length"
    );
}

#[tokio::test]
async fn chat_whole_and_stream() {
    let (app, fake) = app();
    let messages = json!([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]},
    ]);
    let (status, v) = post(
        &app,
        "/v1/chat/completions",
        json!({"messages": messages, "temperature": 0, "seed": 7}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(
        v["choices"][0]["message"],
        json!({"role": "assistant", "content": SCRIPT})
    );
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let expected = tessera::api::prompt::encode_chat(
        &fake.model.tokenizer,
        &fake.model.template,
        &[
            ChatMessage::new("system", "Be brief."),
            ChatMessage::new("user", "Hi\nthere"),
        ],
    )
    .unwrap();
    let req = fake.last_request();
    assert_eq!(req.prompt, expected);
    assert_eq!(
        req.params.max_tokens, None,
        "chat has no default max_tokens"
    );
    assert_eq!(req.params.seed, Some(7));
    assert_eq!(v["usage"]["prompt_tokens"], expected.len());

    let (status, _, events) = stream(
        &app,
        "/v1/chat/completions",
        json!({"messages": messages, "temperature": 0, "stream": true,
               "stream_options": {"include_usage": true}}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let chunks = json_chunks(&events);
    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    let mut text = String::new();
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        if let Some(choice) = c["choices"].get(0)
            && let Some(t) = choice["delta"]["content"].as_str()
        {
            text.push_str(t);
        }
    }
    assert_eq!(text, SCRIPT);
    let n = chunks.len();
    assert_eq!(chunks[n - 2]["choices"][0]["delta"], json!({}));
    assert_eq!(chunks[n - 2]["choices"][0]["finish_reason"], "stop");
    assert_eq!(chunks[n - 1]["choices"], json!([]));
    assert_eq!(chunks[n - 1]["usage"]["prompt_tokens"], expected.len());
}

#[tokio::test]
async fn logprobs_shapes() {
    let (app, fake) = app();
    let (status, v) = post(
        &app,
        "/v1/completions",
        json!({"prompt": "Hello", "max_tokens": 4, "temperature": 0, "logprobs": 2}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(fake.last_request().params.logprobs, Some(2));
    let lp = &v["choices"][0]["logprobs"];
    let tokens = lp["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), 4);
    assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), 4);
    assert!(
        lp["token_logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .all(|x| x.as_f64().unwrap() <= 0.0)
    );
    let tops = lp["top_logprobs"].as_array().unwrap();
    assert!(
        tops.iter().all(|t| t.as_object().unwrap().len() == 2),
        "{lp}"
    );
    let offsets: Vec<u64> = lp["text_offset"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    assert_eq!(offsets[0], 0);
    let joined: String = tokens.iter().map(|t| t.as_str().unwrap()).collect();
    assert_eq!(joined, v["choices"][0]["text"].as_str().unwrap());
    let mut at = 0;
    for (t, o) in tokens.iter().zip(&offsets) {
        assert_eq!(*o, at);
        at += t.as_str().unwrap().chars().count() as u64;
    }

    let (status, v) = post(
        &app,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0,
               "logprobs": true, "top_logprobs": 3}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), 3);
    for c in content {
        let token = c["token"].as_str().unwrap();
        assert!(c["logprob"].as_f64().unwrap() <= 0.0);
        let bytes: Vec<u8> = c["bytes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_u64().unwrap() as u8)
            .collect();
        assert_eq!(String::from_utf8(bytes).unwrap(), token);
        let top = c["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        assert_eq!(
            top[0]["token"], token,
            "greedy: the chosen token is the most likely"
        );
        assert!(top[0].get("bytes").is_some() && top[0].get("logprob").is_some());
    }
    // logprobs without top_logprobs: no alternatives.
    post(
        &app,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "logprobs": true}),
    )
    .await;
    assert_eq!(fake.last_request().params.logprobs, Some(0));

    // Streamed chat chunks carry their token's logprobs.
    let (_, _, events) = stream(
        &app,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0,
               "logprobs": true, "top_logprobs": 1, "stream": true}),
    )
    .await;
    let chunks = json_chunks(&events);
    let with_lp: Vec<&Value> = chunks
        .iter()
        .filter(|c| !c["choices"][0]["logprobs"].is_null())
        .collect();
    assert_eq!(with_lp.len(), 3);
    for c in with_lp {
        let content = c["choices"][0]["logprobs"]["content"].as_array().unwrap();
        assert_eq!(content.len(), 1);
        assert_eq!(content[0]["token"], c["choices"][0]["delta"]["content"]);
    }

    // Completions: logprobs over 20 and chat top_logprobs rules.
    let (status, v) = post(
        &app,
        "/v1/completions",
        json!({"prompt": "x", "logprobs": 21}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_error(&v, "logprobs");
    let chat = |extra: Value| {
        let mut body = json!({"messages": [{"role": "user", "content": "Hi"}]});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        body
    };
    for (body, param) in [
        (chat(json!({"top_logprobs": 2})), "top_logprobs"),
        (
            chat(json!({"logprobs": true, "top_logprobs": 21})),
            "top_logprobs",
        ),
        (chat(json!({"logprobs": 1})), "logprobs"),
    ] {
        let (status, v) = post(&app, "/v1/chat/completions", body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
        assert_error(&v, param);
    }
}

#[tokio::test]
async fn max_tokens_stop_and_sampling_fields() {
    let (app, fake) = app();
    let chat = |extra: Value| {
        let mut body = json!({"messages": [{"role": "user", "content": "Hi"}], "temperature": 0});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        body
    };
    let (_, v) = post(
        &app,
        "/v1/chat/completions",
        chat(json!({"max_completion_tokens": 3})),
    )
    .await;
    assert_eq!(v["usage"]["completion_tokens"], 3);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["choices"][0]["message"]["content"], prefix(3, &fake));
    // Both given: the smaller wins.
    post(
        &app,
        "/v1/chat/completions",
        chat(json!({"max_tokens": 5, "max_completion_tokens": 3})),
    )
    .await;
    assert_eq!(fake.last_request().params.max_tokens, Some(3));
    post(
        &app,
        "/v1/chat/completions",
        chat(json!({"max_tokens": 2, "max_completion_tokens": 9})),
    )
    .await;
    assert_eq!(fake.last_request().params.max_tokens, Some(2));
    let (status, v) = post(
        &app,
        "/v1/chat/completions",
        chat(json!({"max_completion_tokens": 0})),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_error(&v, "max_completion_tokens");

    // stop: a string or an array; the text ends before it.
    let (_, v) = post(&app, "/v1/chat/completions", chat(json!({"stop": "fox"}))).await;
    assert_eq!(v["choices"][0]["message"]["content"], " The quick brown ");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let (_, v) = post(
        &app,
        "/v1/completions",
        json!({"prompt": "a", "temperature": 0, "max_tokens": 50,
        "stop": ["zzz", "lazy"]}),
    )
    .await;
    assert_eq!(
        v["choices"][0]["text"],
        " The quick brown fox jumps over the "
    );
    assert_eq!(fake.last_request().params.stop, vec!["zzz", "lazy"]);

    // Every sampling field reaches the scheduler.
    let (status, v) = post(
        &app,
        "/v1/completions",
        json!({"prompt": "a", "max_tokens": 2, "temperature": 0.5, "top_p": 0.9, "top_k": 40, "min_p": 0.1,
               "repetition_penalty": 1.1, "frequency_penalty": 0.5, "presence_penalty": -0.5, "seed": -1,
               "logit_bias": {"7": 5, "3": -100}}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let p = fake.last_request().params;
    assert_eq!(
        (p.temperature, p.top_p, p.top_k, p.min_p),
        (0.5, 0.9, 40, 0.1)
    );
    assert_eq!(
        (
            p.repetition_penalty,
            p.frequency_penalty,
            p.presence_penalty
        ),
        (1.1, 0.5, -0.5)
    );
    assert_eq!(p.seed, Some(u64::MAX));
    assert_eq!(p.logit_bias, vec![(3, -100.0), (7, 5.0)]);
    post(
        &app,
        "/v1/completions",
        json!({"prompt": "a", "max_tokens": 1, "top_k": -1}),
    )
    .await;
    assert_eq!(fake.last_request().params.top_k, 0);
}

#[tokio::test]
async fn bad_requests_name_the_field() {
    let (app, _fake) = app();
    // Malformed JSON: 400 with the position.
    let (status, _, text) =
        call(&app, Method::POST, "/v1/completions", "{\"prompt\": \"x\",").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("line 1 column"),
        "{v}"
    );
    let (status, _, text) = call(&app, Method::POST, "/v1/chat/completions", "[1, 2]").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
    let (status, _, text) = call(&app, Method::POST, "/v1/chat/completions", "").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");

    let msgs = json!([{"role": "user", "content": "Hi"}]);
    let cases = [
        (
            json!({"messages": msgs, "temperature": "hot"}),
            "temperature",
        ),
        (json!({"messages": msgs, "temperature": 3.0}), "temperature"),
        (json!({"messages": msgs, "temperature": -1}), "temperature"),
        (json!({"messages": msgs, "top_p": 0}), "top_p"),
        (json!({"messages": msgs, "min_p": 2}), "min_p"),
        (json!({"messages": msgs, "top_k": -3}), "top_k"),
        (json!({"messages": msgs, "top_k": "x"}), "top_k"),
        (
            json!({"messages": msgs, "frequency_penalty": 3}),
            "frequency_penalty",
        ),
        (
            json!({"messages": msgs, "presence_penalty": [1]}),
            "presence_penalty",
        ),
        (
            json!({"messages": msgs, "repetition_penalty": 0}),
            "repetition_penalty",
        ),
        (json!({"messages": msgs, "max_tokens": "10"}), "max_tokens"),
        (json!({"messages": msgs, "max_tokens": 1.5}), "max_tokens"),
        (json!({"messages": msgs, "max_tokens": -1}), "max_tokens"),
        (json!({"messages": msgs, "seed": "x"}), "seed"),
        (json!({"messages": msgs, "stop": 5}), "stop"),
        (json!({"messages": msgs, "stop": [""]}), "stop"),
        (json!({"messages": msgs, "stop": ["a", 1]}), "stop"),
        (
            json!({"messages": msgs, "logit_bias": {"x": 1}}),
            "logit_bias",
        ),
        (
            json!({"messages": msgs, "logit_bias": {"1": 200}}),
            "logit_bias",
        ),
        (
            json!({"messages": msgs, "logit_bias": {"100000": 1}}),
            "logit_bias",
        ),
        (json!({"messages": msgs, "logit_bias": [1]}), "logit_bias"),
        (json!({"messages": msgs, "stream": "yes"}), "stream"),
        (
            json!({"messages": msgs, "stream_options": {"include_usage": 1}}),
            "stream_options.include_usage",
        ),
        (json!({"messages": msgs, "n": 0}), "n"),
        (json!({"messages": msgs, "n": 1000}), "n"),
        (
            json!({"messages": msgs, "tools": [{"type": "function"}]}),
            "tools",
        ),
        (
            json!({"messages": msgs, "response_format": {"type": "json_object"}}),
            "response_format",
        ),
        (json!({"messages": msgs, "model": 5}), "model"),
        (json!({"messages": "Hi"}), "messages"),
        (json!({"messages": []}), "messages"),
        (json!({}), "messages"),
        (json!({"messages": [5]}), "messages[0]"),
        (json!({"messages": [{"content": "x"}]}), "messages[0].role"),
        (
            json!({"messages": [{"role": "robot", "content": "x"}]}),
            "messages[0].role",
        ),
        (
            json!({"messages": [{"role": "user", "content": 5}]}),
            "messages[0].content",
        ),
        (
            json!({"messages": [{"role": "user"}]}),
            "messages[0].content",
        ),
        (
            json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}),
            "messages[0].content[0].type",
        ),
        (
            json!({"messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]}),
            "messages[0].content[0].text",
        ),
    ];
    for (body, param) in cases {
        let (status, v) = post(&app, "/v1/chat/completions", body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {v}");
        assert_error(&v, param);
    }

    // Unknown model: 400 on "model" with OpenAI's code.
    let (status, v) = post(
        &app,
        "/v1/chat/completions",
        json!({"messages": msgs, "model": "gpt-4"}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_error(&v, "model");
    assert_eq!(v["error"]["code"], "model_not_found");
    assert!(v["error"]["message"].as_str().unwrap().contains("gpt-4"));

    // Prompts longer than the context.
    let long = "word ".repeat(200);
    let (status, v) = post(&app, "/v1/completions", json!({"prompt": long})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_error(&v, "prompt");
    let (status, v) = post(
        &app,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": long}]}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_error(&v, "messages");
    let ids: Vec<u32> = vec![5; MAX_CONTEXT];
    let (status, v) = post(&app, "/v1/completions", json!({"prompt": ids})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_error(&v, "prompt");

    // Unknown routes and methods answer in the same shape.
    let (status, _, text) = call(&app, Method::GET, "/v1/nothing", "").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(serde_json::from_str::<Value>(&text).unwrap()["error"]["message"].is_string());
    let (status, _, text) = call(&app, Method::GET, "/v1/completions", "").await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert!(serde_json::from_str::<Value>(&text).unwrap()["error"]["message"].is_string());
}

#[tokio::test]
async fn scheduler_errors_map_to_statuses() {
    let (app, fake) = app();
    let body = json!({"prompt": "Hello", "max_tokens": 5});
    for (err, status, kind) in [
        (
            ServeError::Overloaded("queue full".into()),
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
        ),
        (
            ServeError::Unavailable("worker 1 down".into()),
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable_error",
        ),
        (
            ServeError::Internal("bug".into()),
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
        ),
        (
            ServeError::invalid("prompt", "too long"),
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
        ),
    ] {
        fake.config.lock().unwrap().submit_error = Some(err.clone());
        for stream in [false, true] {
            let mut b = body.clone();
            b["stream"] = json!(stream);
            let (got, headers, text) =
                call(&app, Method::POST, "/v1/completions", &b.to_string()).await;
            assert_eq!(got, status, "{err:?}: {text}");
            let v: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(v["error"]["type"], kind);
            assert_eq!(headers.contains_key("retry-after"), err.is_retryable());
        }
    }
    // The scheduler's "prompt" is the chat request's "messages".
    let (_, v) = post(
        &app,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "x"}]}),
    )
    .await;
    assert_error(&v, "messages");

    // An error before the first token still gets its status; after it, an SSE error event ends the stream.
    fake.config.lock().unwrap().submit_error = None;
    fake.config.lock().unwrap().fail_after =
        Some((0, ServeError::Unavailable("worker lost".into())));
    let (status, _, _) = call(
        &app,
        Method::POST,
        "/v1/completions",
        &json!({"prompt": "Hello", "stream": true}).to_string(),
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let (status, _) = post(&app, "/v1/completions", json!({"prompt": "Hello"})).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    fake.config.lock().unwrap().fail_after =
        Some((3, ServeError::Unavailable("worker lost".into())));
    let (status, _, events) = stream(
        &app,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "x"}], "stream": true, "temperature": 0}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_ne!(events.last().unwrap(), "[DONE]");
    let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
    assert_eq!(last["error"]["type"], "unavailable_error", "{last}");
    assert!(
        last["error"]["message"]
            .as_str()
            .unwrap()
            .contains("worker lost")
    );
    assert_eq!(
        events.len(),
        1 + 3 + 1,
        "role, three tokens, error: {events:?}"
    );
}

#[tokio::test]
async fn client_disconnect_cancels_the_request() {
    let (app, fake) = app();
    fake.config.lock().unwrap().token_delay = Duration::from_millis(20);
    let req = Request::builder()
        .method(Method::POST)
        .uri("/v1/completions")
        .body(Body::from(
            json!({"prompt": "Hello", "max_tokens": 40, "stream": true}).to_string(),
        ))
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let frame = body.frame().await.unwrap().unwrap();
    assert!(frame.data_ref().is_some());
    drop(body);
    for _ in 0..100 {
        if fake.cancelled.load(Ordering::SeqCst) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(fake.cancelled.load(Ordering::SeqCst), 1);
    assert_eq!(fake.finished.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn models_health_metrics() {
    let (app, fake) = app();
    let (status, _, text) = call(&app, Method::GET, "/v1/models", "").await;
    assert_eq!(status, StatusCode::OK);
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"].as_array().unwrap().len(), 1);
    assert_eq!(v["data"][0]["id"], "tiny-llama");
    assert_eq!(v["data"][0]["object"], "model");
    assert_eq!(v["data"][0]["owned_by"], "tessera");
    assert!(v["data"][0]["created"].is_u64());
    let (status, _, text) = call(&app, Method::GET, "/v1/models/tiny-llama", "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        serde_json::from_str::<Value>(&text).unwrap()["id"],
        "tiny-llama"
    );
    let (status, _, _) = call(&app, Method::GET, "/v1/models/other", "").await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let (status, _, text) = call(&app, Method::GET, "/health", "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        serde_json::from_str::<Value>(&text).unwrap(),
        json!({"status": "ok"})
    );
    assert_eq!(fake.health_calls.load(Ordering::SeqCst), 1);
    fake.unhealthy.store(true, Ordering::SeqCst);
    let (status, _, text) = call(&app, Method::GET, "/health", "").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["status"], "unavailable");
    assert!(v["message"].as_str().unwrap().contains("marked unhealthy"));

    post(
        &app,
        "/v1/completions",
        json!({"prompt": "Hello", "max_tokens": 1}),
    )
    .await;
    post(
        &app,
        "/v1/completions",
        json!({"prompt": "Hello", "temperature": 9}),
    )
    .await;
    let (status, headers, text) = call(&app, Method::GET, "/metrics", "").await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    assert!(
        text.contains("# TYPE tessera_http_requests_total counter"),
        "{text}"
    );
    for needle in [
        r#"tessera_http_requests_total{route="/v1/completions",status="200"}"#,
        r#"tessera_http_requests_total{route="/v1/completions",status="400"}"#,
        r#"tessera_http_requests_total{route="/health",status="503"}"#,
        r#"tessera_http_requests_total{route="/v1/models",status="200"}"#,
        "tessera_http_request_duration_seconds_bucket{",
    ] {
        assert!(text.contains(needle), "{needle} missing from:\n{text}");
    }

    // Without a metrics handle, /metrics is a 404.
    let state = Arc::new(tessera::api::AppState::with_backend(
        fake.model.clone(),
        fake.clone(),
        None,
    ));
    let (status, _, _) = call(&router(state), Method::GET, "/metrics", "").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

/// The official `openai` Python client against a real server (skipped when python3 or the package is missing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_python_client() {
    let have = std::process::Command::new("python3")
        .args(["-c", "import openai"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        eprintln!(
            "skipped: python3 with the `openai` package is not installed (pip install openai)"
        );
        return;
    }
    let fake = FakeBackend::new(tiny_model(MAX_CONTEXT));
    let listener = tessera::api::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(tessera::api::serve_http(listener, state(&fake), async {
        let _ = stop_rx.await;
    }));
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/clients/openai_check.py"
    );
    let out = tokio::process::Command::new("python3")
        .args([
            script,
            "--base-url",
            &format!("http://{addr}"),
            "--model",
            "tiny-llama",
            "--prompt",
            "Hello",
            "--max-tokens",
            "100",
            "--strict",
        ])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}");
    assert!(
        out.status.success(),
        "stdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["models"], json!(["tiny-llama"]));
    for key in ["chat", "chat_stream", "completion", "completion_stream"] {
        assert_eq!(v[key]["text"], SCRIPT, "{key}: {v}");
        assert_eq!(v[key]["finish_reason"], "stop", "{key}: {v}");
        assert!(
            v[key]["usage"]["completion_tokens"].as_u64().unwrap() > 0,
            "{key}: {v}"
        );
    }
    assert_eq!(v["chat_stream"]["role"], "assistant");
    assert_eq!(
        v["batch"]["texts"],
        json!([SCRIPT, SCRIPT, SCRIPT, SCRIPT]),
        "{v}"
    );
    assert_eq!(v["batch"]["indexes"], json!([0, 1, 2, 3]), "{v}");
    assert_eq!(v["batch_matches"], true, "{v}");
    assert_eq!(v["echo_ok"], true, "{v}");
    stop_tx.send(()).unwrap();
    server.await.unwrap().unwrap();
}
