//! The OpenAI-compatible HTTP API, as clients of OpenAI, vLLM, TGI and llama.cpp's server expect it.
//!
//! Routes:
//! - `POST /v1/completions`: `prompt` is a string, an array of token ids, or a batch: an array of strings or
//!   of token-id arrays. Each prompt is its own sequence; choice `p·n + j` is prompt `p`'s `j`-th sample.
//! - `POST /v1/chat/completions`: `messages` with roles system / user / assistant (`developer` = system),
//!   content a string or an array of `{"type": "text", "text": …}` parts (joined with "\n").
//! - `GET /v1/models`, `GET /v1/models/{id}`: the one served model.
//! - `GET /health`: 200 `{"status":"ok"}` once the scheduler's health check (a real forward pass) passes,
//!   else 503 `{"status":"unavailable","message":…}`.
//! - `GET /metrics`: Prometheus text (404 when the server runs without metrics).
//!
//! Request fields: `model` (absent or the served id, else 400 `model_not_found`), `max_tokens` /
//! `max_completion_tokens` (both given: the smaller wins; completions default to 16 as OpenAI's, chat to "until
//! end of generation or the context is full"), `stop` (string or array), `seed`, `temperature`, `top_p`,
//! `frequency_penalty`, `presence_penalty`, `logit_bias` (token-id strings → bias), `logprobs` (completions:
//! integer 0..=20; chat: bool, with `top_logprobs` 0..=20), `stream`, `stream_options.include_usage`, `n`
//! (choices per prompt, at most [`MAX_CHOICES`] sequences per request; with a `seed`, choice `j` samples with
//! `seed + j`, so choice 0 is what the same request with `n = 1` gives and a batch of prompts gives what each
//! prompt gives alone), `best_of` (equal to `n` when given: every sequence generated is returned), `user`
//! (ignored), and the extensions `top_k` (-1 or 0 = off), `min_p`,
//! `repetition_penalty`. Completions take `echo`: the prompt comes back before the completion, and with
//! `logprobs` every prompt token's log-probability under the model (the first's is null) comes first in
//! `logprobs` — with `max_tokens: 0` only the prompt is scored (one token is generated and dropped), which is
//! how lm-evaluation-harness computes log-likelihoods. Unknown fields are ignored (clients send many); a `suffix`, `tools` /
//! `functions` and a `response_format` other than text are refused with a 400 naming the field.
//!
//! `usage` has `prompt_tokens`, `completion_tokens`, `total_tokens` and `prompt_tokens_details.cached_tokens`:
//! the prompt tokens copied from a kept prefix (`--prefix-cache-tokens`) rather than computed, counted once
//! per prompt like `prompt_tokens`.
//!
//! Errors use OpenAI's body `{"error": {"message", "type", "param", "code"}}`: a bad request is 400
//! `invalid_request_error` with `param` naming the field (malformed JSON names the line and column); a full
//! queue 429 `rate_limit_error`; a worker down or the cluster re-forming 503 `unavailable_error` (both with
//! `Retry-After`); a bug 500 `internal_error`. Streams wait for the first event before answering, so errors
//! found before any token still get their status; an error after that is sent as a last SSE event
//! `data: {"error": {…}}` with no `[DONE]` after it.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, MatchedPath, Path, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::Stream;
use serde_json::{Map, Value, json};

use super::choices::{self, Choices};
use super::prompt::{self, PromptInput};
use super::{AppState, metrics as api_metrics};
use crate::chat::ChatMessage;
use crate::generate::FinishReason;
use crate::sampling::{MAX_LOGPROBS, SamplingParams};
use crate::serve::{GenEvent, ServeError, TokenEvent, Usage};
use crate::tokenizer::Tokenizer;

/// Largest request body accepted (a long prompt as a JSON array of token ids is a few MB).
pub const MAX_BODY_BYTES: usize = 32 << 20;
/// `max_tokens` of a completion request that gives none (OpenAI's default).
pub const DEFAULT_COMPLETION_MAX_TOKENS: usize = 16;
/// Most sequences one request may ask for (prompts × `n`; OpenAI's limit on `n`).
pub const MAX_CHOICES: usize = 128;

/// The HTTP API's router (tests drive it with `tower::ServiceExt::oneshot`).
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{id}", get(get_model))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn(track))
        .with_state(state)
}

// ---------------------------------------------------------------------------------------------------------
// Errors

/// An error answer in OpenAI's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// OpenAI's `type`: "invalid_request_error", "rate_limit_error", "unavailable_error", "internal_error".
    pub kind: &'static str,
    /// The request field at fault.
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    /// 400 `invalid_request_error` on `param`.
    pub fn invalid(param: Option<&str>, message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(str::to_owned),
            code: None,
        }
    }

    fn field(param: &str, message: impl Into<String>) -> ApiError {
        ApiError::invalid(Some(param), message)
    }

    /// `{"error": {"message", "type", "param", "code"}}`.
    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl From<ServeError> for ApiError {
    fn from(e: ServeError) -> ApiError {
        match e {
            ServeError::InvalidArgument { field, message } => ApiError {
                status: StatusCode::BAD_REQUEST,
                message,
                kind: "invalid_request_error",
                code: (field == "model").then_some("model_not_found"),
                param: Some(field),
            },
            ServeError::Overloaded(m) => ApiError {
                status: StatusCode::TOO_MANY_REQUESTS,
                message: format!("The server is overloaded ({m}); retry later"),
                kind: "rate_limit_error",
                param: None,
                code: Some("overloaded"),
            },
            ServeError::Unavailable(m) => ApiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                message: format!("The model is unavailable ({m}); retry later"),
                kind: "unavailable_error",
                param: None,
                code: Some("unavailable"),
            },
            ServeError::Internal(m) => ApiError {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                message: format!("Internal error: {m}"),
                kind: "internal_error",
                param: None,
                code: Some("internal_error"),
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let retry = matches!(
            self.status,
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
        );
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if retry {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

async fn not_found(req: Request) -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        message: format!("No route {} {}", req.method(), req.uri().path()),
        kind: "invalid_request_error",
        param: None,
        code: Some("not_found"),
    }
}

async fn method_not_allowed(req: Request) -> ApiError {
    ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        message: format!("{} does not accept {}", req.uri().path(), req.method()),
        kind: "invalid_request_error",
        param: None,
        code: Some("method_not_allowed"),
    }
}

// ---------------------------------------------------------------------------------------------------------
// Metrics middleware

async fn track(matched: Option<MatchedPath>, req: Request, next: Next) -> Response {
    let route = matched.map_or_else(|| "unmatched".to_owned(), |m| m.as_str().to_owned());
    let started = Instant::now();
    let response = next.run(req).await;
    let status = response.status().as_u16().to_string();
    ::metrics::counter!(api_metrics::HTTP_REQUESTS, "route" => route.clone(), "status" => status)
        .increment(1);
    ::metrics::histogram!(api_metrics::HTTP_DURATION, "route" => route)
        .record(started.elapsed().as_secs_f64());
    response
}

// ---------------------------------------------------------------------------------------------------------
// JSON bodies

/// A JSON object request body. Unlike axum's `Json`, every failure is a 400 (413 when too large) in OpenAI's
/// error shape, and the content type is not checked (curl sends form-urlencoded by default).
pub struct JsonBody(pub Map<String, Value>);

impl<S: Send + Sync> FromRequest<S> for JsonBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|e: BytesRejection| {
                let status = e.status();
                if status == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError {
                        status,
                        message: format!(
                            "The request body is larger than {} MiB",
                            MAX_BODY_BYTES >> 20
                        ),
                        kind: "invalid_request_error",
                        param: None,
                        code: Some("request_too_large"),
                    }
                } else {
                    ApiError::invalid(
                        None,
                        format!("Cannot read the request body: {}", e.body_text()),
                    )
                }
            })?;
        match serde_json::from_slice::<Value>(&bytes) {
            Ok(Value::Object(map)) => Ok(JsonBody(map)),
            Ok(other) => Err(ApiError::invalid(
                None,
                format!(
                    "The request body must be a JSON object, got {}",
                    describe(&other)
                ),
            )),
            Err(e) => Err(ApiError::invalid(
                None,
                format!("The request body is not valid JSON: {e}"),
            )),
        }
    }
}

/// A short description of a JSON value for error messages.
fn describe(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) if s.chars().count() > 40 => {
            format!("the string {:?}…", s.chars().take(40).collect::<String>())
        }
        Value::String(s) => format!("the string {s:?}"),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

fn type_error(key: &str, what: &str, v: &Value) -> ApiError {
    ApiError::field(key, format!("`{key}` must be {what}, got {}", describe(v)))
}

/// Typed access to a request object's fields; `null` counts as absent. Errors name the field.
struct Fields(Map<String, Value>);

impl Fields {
    fn take(&mut self, key: &str) -> Option<Value> {
        self.0.remove(key).filter(|v| !v.is_null())
    }

    fn f32(&mut self, key: &str) -> Result<Option<f32>, ApiError> {
        self.take(key)
            .map(|v| {
                v.as_f64()
                    .map(|x| x as f32)
                    .ok_or_else(|| type_error(key, "a number", &v))
            })
            .transpose()
    }

    fn uint(&mut self, key: &str) -> Result<Option<u64>, ApiError> {
        self.take(key)
            .map(|v| {
                v.as_u64()
                    .ok_or_else(|| type_error(key, "a non-negative integer", &v))
            })
            .transpose()
    }

    fn int(&mut self, key: &str) -> Result<Option<i64>, ApiError> {
        self.take(key)
            .map(|v| v.as_i64().ok_or_else(|| type_error(key, "an integer", &v)))
            .transpose()
    }

    fn bool(&mut self, key: &str) -> Result<Option<bool>, ApiError> {
        self.take(key)
            .map(|v| {
                v.as_bool()
                    .ok_or_else(|| type_error(key, "true or false", &v))
            })
            .transpose()
    }

    fn string(&mut self, key: &str) -> Result<Option<String>, ApiError> {
        self.take(key)
            .map(|v| match v {
                Value::String(s) => Ok(s),
                other => Err(type_error(key, "a string", &other)),
            })
            .transpose()
    }
}

// ---------------------------------------------------------------------------------------------------------
// Requests

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Completion,
    Chat,
}

/// A parsed request: what to continue and how.
#[derive(Debug)]
struct Parsed {
    /// One per prompt (a chat request has one).
    inputs: Vec<PromptInput>,
    common: Common,
    echo: Echo,
}

/// What a completion echoes of its prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Echo {
    Off,
    /// The prompt's text, then the completion.
    Prompt,
    /// The prompt only (`max_tokens: 0`): the one token generated to score it is dropped.
    PromptOnly,
}

/// The fields completions and chat completions share.
#[derive(Debug)]
struct Common {
    params: SamplingParams,
    /// Choices per prompt.
    n: usize,
    stream: bool,
    include_usage: bool,
}

fn parse_common(f: &mut Fields, state: &AppState, kind: Kind) -> Result<Common, ApiError> {
    if let Some(model) = f.string("model")? {
        state.check_model(&model)?;
    }
    let n = match f.uint("n")? {
        None => 1,
        Some(n) if (1..=MAX_CHOICES as u64).contains(&n) => n as usize,
        Some(n) => {
            return Err(ApiError::field(
                "n",
                format!("`n` must be in [1, {MAX_CHOICES}], got {n}"),
            ));
        }
    };
    let _ = f.take("user");
    let mut max_tokens = None;
    for key in ["max_tokens", "max_completion_tokens"] {
        if let Some(n) = f.uint(key)? {
            if n == 0 {
                return Err(ApiError::field(
                    key,
                    format!("`{key}` must be at least 1, got 0"),
                ));
            }
            let n = usize::try_from(n).unwrap_or(usize::MAX);
            max_tokens = Some(max_tokens.map_or(n, |m: usize| m.min(n)));
        }
    }
    if max_tokens.is_none() && kind == Kind::Completion {
        max_tokens = Some(DEFAULT_COMPLETION_MAX_TOKENS);
    }
    let d = SamplingParams::default();
    let top_k = match f.int("top_k")? {
        None | Some(-1) | Some(0) => 0,
        Some(k) if k > 0 => usize::try_from(k).unwrap_or(usize::MAX),
        Some(k) => {
            return Err(ApiError::field(
                "top_k",
                format!("`top_k` must be a positive integer, or 0 or -1 for off, got {k}"),
            ));
        }
    };
    let seed = match f.take("seed") {
        None => None,
        // OpenAI's seed is an int64: negative seeds are taken bit for bit.
        Some(v) => Some(
            v.as_u64()
                .or_else(|| v.as_i64().map(|s| s as u64))
                .ok_or_else(|| type_error("seed", "an integer", &v))?,
        ),
    };
    let stop = match f.take("stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s],
        Some(Value::Array(items)) => items
            .into_iter()
            .map(|v| match v {
                Value::String(s) => Ok(s),
                other => Err(type_error(
                    "stop",
                    "a string or an array of strings",
                    &other,
                )),
            })
            .collect::<Result<_, _>>()?,
        Some(other) => {
            return Err(type_error(
                "stop",
                "a string or an array of strings",
                &other,
            ));
        }
    };
    let logit_bias = match f.take("logit_bias") {
        None => Vec::new(),
        Some(Value::Object(map)) => {
            let mut bias = Vec::with_capacity(map.len());
            for (k, v) in map {
                let id = k.trim().parse::<u32>().map_err(|_| {
                    ApiError::field(
                        "logit_bias",
                        format!("`logit_bias` keys must be token ids, got {k:?}"),
                    )
                })?;
                let b = v
                    .as_f64()
                    .ok_or_else(|| type_error("logit_bias", "a map of token ids to numbers", &v))?;
                bias.push((id, b as f32));
            }
            bias.sort_by_key(|&(id, _)| id);
            bias
        }
        Some(other) => {
            return Err(type_error(
                "logit_bias",
                "a map of token ids to numbers",
                &other,
            ));
        }
    };
    let params = SamplingParams {
        temperature: f.f32("temperature")?.unwrap_or(d.temperature),
        top_k,
        top_p: f.f32("top_p")?.unwrap_or(d.top_p),
        min_p: f.f32("min_p")?.unwrap_or(d.min_p),
        repetition_penalty: f.f32("repetition_penalty")?.unwrap_or(d.repetition_penalty),
        frequency_penalty: f.f32("frequency_penalty")?.unwrap_or(d.frequency_penalty),
        presence_penalty: f.f32("presence_penalty")?.unwrap_or(d.presence_penalty),
        logit_bias,
        seed,
        max_tokens,
        stop,
        logprobs: None,
        prompt_logprobs: None,
    };
    let stream = f.bool("stream")?.unwrap_or(false);
    let include_usage = match f.take("stream_options") {
        None => false,
        Some(Value::Object(o)) => match o.get("include_usage") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(other) => {
                return Err(type_error(
                    "stream_options.include_usage",
                    "true or false",
                    other,
                ));
            }
        },
        Some(other) => return Err(type_error("stream_options", "an object", &other)),
    };
    Ok(Common {
        params,
        n,
        stream,
        include_usage,
    })
}

fn parse_completion(body: Map<String, Value>, state: &AppState) -> Result<Parsed, ApiError> {
    let mut f = Fields(body);
    let inputs = match f.take("prompt") {
        None => return Err(ApiError::field("prompt", "`prompt` is required")),
        Some(v) => parse_prompts(v)?,
    };
    let mut echo = match f.bool("echo")? {
        Some(true) => Echo::Prompt,
        _ => Echo::Off,
    };
    // Scoring the prompt alone: a sequence ends after a generated token, so one is sampled from the last
    // prompt row (no extra forward pass) and left out of the answer.
    if echo == Echo::Prompt {
        for key in ["max_tokens", "max_completion_tokens"] {
            if f.0.get(key).and_then(Value::as_u64) == Some(0) {
                f.0.insert(key.into(), json!(1));
                echo = Echo::PromptOnly;
            }
        }
    }
    if f.string("suffix")?.is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::field("suffix", "`suffix` is not supported"));
    }
    let best_of = f.uint("best_of")?;
    let logprobs = f.uint("logprobs")?;
    let mut common = parse_common(&mut f, state, Kind::Completion)?;
    if let Some(b) = best_of
        && b != common.n as u64
    {
        return Err(ApiError::field(
            "best_of",
            format!(
                "`best_of` must equal `n` ({}), got {b}: this server returns every sequence it generates",
                common.n
            ),
        ));
    }
    if inputs.len() * common.n > MAX_CHOICES {
        return Err(ApiError::field(
            if common.n > 1 { "n" } else { "prompt" },
            format!(
                "{} prompts × `n` = {} asks for {} sequences; one request may ask for at most {MAX_CHOICES}",
                inputs.len(),
                common.n,
                inputs.len() * common.n
            ),
        ));
    }
    common.params.logprobs = logprobs.map(|n| usize::try_from(n).unwrap_or(usize::MAX));
    if echo != Echo::Off {
        common.params.prompt_logprobs = common.params.logprobs;
    }
    Ok(Parsed {
        inputs,
        common,
        echo,
    })
}

fn token_ids(items: Vec<Value>) -> Result<Vec<u32>, ApiError> {
    items
        .into_iter()
        .map(|v| {
            v.as_u64()
                .and_then(|id| u32::try_from(id).ok())
                .ok_or_else(|| type_error("prompt", "a string or an array of token ids", &v))
        })
        .collect()
}

/// `prompt`: a string, an array of token ids, or a batch (an array of strings or of token-id arrays).
fn parse_prompts(v: Value) -> Result<Vec<PromptInput>, ApiError> {
    const WHAT: &str =
        "a string, an array of token ids, or an array of strings or of token-id arrays";
    let Value::Array(items) = v else {
        return match v {
            Value::String(s) => Ok(vec![PromptInput::Text(s)]),
            other => Err(type_error("prompt", WHAT, &other)),
        };
    };
    match items.first() {
        None => Err(ApiError::field("prompt", "`prompt` must not be empty")),
        Some(Value::Number(_)) => Ok(vec![PromptInput::Tokens(token_ids(items)?)]),
        Some(Value::String(_) | Value::Array(_)) => items
            .into_iter()
            .enumerate()
            .map(|(i, item)| match item {
                Value::String(s) => Ok(PromptInput::Text(s)),
                Value::Array(ids) if ids.is_empty() => Err(ApiError::field(
                    "prompt",
                    format!("`prompt[{i}]` must not be empty"),
                )),
                Value::Array(ids) => Ok(PromptInput::Tokens(token_ids(ids)?)),
                other => Err(ApiError::field(
                    "prompt",
                    format!(
                        "`prompt[{i}]` must be a string or an array of token ids, got {}",
                        describe(&other)
                    ),
                )),
            })
            .collect(),
        Some(other) => Err(type_error("prompt", WHAT, other)),
    }
}

fn parse_chat(body: Map<String, Value>, state: &AppState) -> Result<Parsed, ApiError> {
    let mut f = Fields(body);
    let messages = match f.take("messages") {
        None => return Err(ApiError::field("messages", "`messages` is required")),
        Some(v) => parse_messages(v)?,
    };
    for key in ["tools", "functions"] {
        if let Some(v) = f.take(key)
            && v.as_array().is_none_or(|a| !a.is_empty())
        {
            return Err(ApiError::field(
                key,
                format!("`{key}` (tool calling) is not supported"),
            ));
        }
    }
    if let Some(v) = f.take("response_format") {
        let kind = v.get("type").and_then(Value::as_str);
        if kind != Some("text") {
            return Err(ApiError::field(
                "response_format",
                "`response_format` must be {\"type\": \"text\"}: structured output is not supported",
            ));
        }
    }
    let logprobs = f.bool("logprobs")?.unwrap_or(false);
    let top_logprobs = f.uint("top_logprobs")?;
    if let Some(n) = top_logprobs {
        if !logprobs && n > 0 {
            return Err(ApiError::field(
                "top_logprobs",
                "`top_logprobs` needs `logprobs: true`",
            ));
        }
        if n > MAX_LOGPROBS as u64 {
            return Err(ApiError::field(
                "top_logprobs",
                format!("`top_logprobs` must be in [0, {MAX_LOGPROBS}], got {n}"),
            ));
        }
    }
    let mut common = parse_common(&mut f, state, Kind::Chat)?;
    common.params.logprobs = logprobs.then(|| top_logprobs.unwrap_or(0) as usize);
    Ok(Parsed {
        inputs: vec![PromptInput::Chat(messages)],
        common,
        echo: Echo::Off,
    })
}

fn parse_messages(v: Value) -> Result<Vec<ChatMessage>, ApiError> {
    let Value::Array(items) = v else {
        return Err(type_error("messages", "a non-empty array of messages", &v));
    };
    if items.is_empty() {
        return Err(ApiError::field("messages", "`messages` must not be empty"));
    }
    items
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            let at = format!("messages[{i}]");
            let Value::Object(mut m) = m else {
                return Err(type_error(&at, "an object with `role` and `content`", &m));
            };
            let role_field = format!("{at}.role");
            let role = match m.remove("role") {
                Some(Value::String(r)) => r,
                None | Some(Value::Null) => {
                    return Err(ApiError::field(&role_field, format!("`{role_field}` is required")));
                }
                Some(other) => return Err(type_error(&role_field, "a string", &other)),
            };
            let role = prompt::normalize_role(&role, &role_field)?;
            let content_field = format!("{at}.content");
            let content = match m.remove("content") {
                Some(Value::String(s)) => s,
                // An assistant turn that only called tools has no content.
                None | Some(Value::Null) if role == "assistant" => String::new(),
                None | Some(Value::Null) => {
                    return Err(ApiError::field(
                        &content_field,
                        format!("`{content_field}` is required"),
                    ));
                }
                Some(Value::Array(parts)) => {
                    let mut texts = Vec::with_capacity(parts.len());
                    for (j, part) in parts.into_iter().enumerate() {
                        let part_field = format!("{content_field}[{j}]");
                        let kind = part.get("type").and_then(Value::as_str);
                        match (kind, part.get("text")) {
                            (Some("text"), Some(Value::String(t))) => texts.push(t.clone()),
                            (Some("text"), other) => {
                                return Err(type_error(
                                    &format!("{part_field}.text"),
                                    "a string",
                                    other.unwrap_or(&Value::Null),
                                ));
                            }
                            (Some(other), _) => {
                                return Err(ApiError::field(
                                    &format!("{part_field}.type"),
                                    format!(
                                        "`{part_field}.type` must be \"text\" (this model reads text only), got {other:?}"
                                    ),
                                ));
                            }
                            (None, _) => {
                                return Err(type_error(
                                    &part_field,
                                    "an object {\"type\": \"text\", \"text\": …}",
                                    &part,
                                ));
                            }
                        }
                    }
                    texts.join("\n")
                }
                Some(other) => {
                    return Err(type_error(
                        &content_field,
                        "a string or an array of text parts",
                        &other,
                    ));
                }
            };
            Ok(ChatMessage::new(role, content))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------------------
// Handlers

async fn completions(
    State(state): State<Arc<AppState>>,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    let parsed = parse_completion(body, &state)?;
    generate(state, parsed, Kind::Completion).await
}

async fn chat_completions(
    State(state): State<Arc<AppState>>,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    let parsed = parse_chat(body, &state)?;
    generate(state, parsed, Kind::Chat).await
}

/// The InvalidArgument field names of this front end: the prompt is `messages` in a chat request, and a chat
/// request's alternatives are `top_logprobs`.
fn rename_fields(e: ServeError, kind: Kind) -> ServeError {
    match kind {
        Kind::Completion => e,
        Kind::Chat => prompt::rename_field(
            prompt::rename_field(e, "prompt", "messages"),
            "logprobs",
            "top_logprobs",
        ),
    }
}

async fn generate(state: Arc<AppState>, parsed: Parsed, kind: Kind) -> Result<Response, ApiError> {
    let Parsed {
        inputs,
        common,
        echo,
    } = parsed;
    state
        .validate_params(&common.params)
        .map_err(|e| rename_fields(e, kind))?;
    let batch = inputs.len() > 1;
    let prompts = inputs
        .iter()
        .enumerate()
        .map(|(p, input)| {
            prompt::build_prompt(&state.model, input).map_err(|e| match e {
                ServeError::InvalidArgument { field, message } if batch => {
                    ApiError::field(&field, format!("prompt {p} of the batch: {message}"))
                }
                e => e.into(),
            })
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    tracing::debug!(
        kind = ?kind,
        prompts = prompts.len(),
        n = common.n,
        prompt_tokens = prompts.iter().map(Vec::len).sum::<usize>(),
        stream = common.stream,
        "submitting a request"
    );
    // The prompt as the client gave it: its text, or its token ids decoded.
    let echo_texts: Vec<String> = match echo {
        Echo::Off => Vec::new(),
        Echo::Prompt | Echo::PromptOnly => inputs
            .iter()
            .zip(&prompts)
            .map(|(input, ids)| match input {
                PromptInput::Text(t) => t.clone(),
                _ => state.model.tokenizer.decode(ids, false),
            })
            .collect(),
    };
    let mut choices = choices::submit(state.scheduler.as_ref(), prompts, common.n, &common.params)
        .map_err(|e| rename_fields(e, kind))?;
    let mut out = Responder {
        id: super::request_id(match kind {
            Kind::Completion => "cmpl-",
            Kind::Chat => "chatcmpl-",
        }),
        created: super::unix_now(),
        model: state.model.id.clone(),
        kind,
        logprobs: common.params.logprobs.is_some(),
        include_usage: common.include_usage,
        tokenizer: state.model.tokenizer.clone(),
        text_offset: vec![0; choices.len()],
        echo,
        echoed: echo_texts,
        per_prompt: common.n,
    };
    if !common.stream {
        let mut done: Vec<Choice> = (0..choices.len()).map(|_| Choice::default()).collect();
        while let Some((i, ev)) = choices.next().await {
            match ev {
                GenEvent::Prompt(entries) => done[i].prompt = entries,
                GenEvent::Token(t) => {
                    done[i].text.push_str(&t.text);
                    done[i].tokens.push(t);
                }
                GenEvent::Done { finish, text, .. } => {
                    done[i].text.push_str(&text);
                    done[i].finish = Some(finish);
                }
                GenEvent::Error(e) => return Err(rename_fields(e, kind).into()),
            }
        }
        let usage = out.shown_usage(choices.usage());
        return Ok(axum::Json(out.whole(&done, usage)).into_response());
    }
    // Wait for the first event so that an error before any token gets its HTTP status.
    let first = match choices.next().await {
        Some((_, GenEvent::Error(e))) => return Err(rename_fields(e, kind).into()),
        None => return Err(choices::ended_early().into()),
        Some(ev) => ev,
    };
    let mut pending = VecDeque::new();
    if kind == Kind::Chat {
        for i in 0..choices.len() {
            pending.push_back(out.data(&out.chunk(json!({
                "index": i,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": null,
                "finish_reason": null,
            }))));
        }
    }
    // Without prompt log-probabilities no `Prompt` event comes: the echo opens every choice's stream now.
    if echo != Echo::Off && common.params.prompt_logprobs.is_none() {
        for i in 0..choices.len() {
            let chunk = out.echo_chunk(i, &[]);
            pending.push_back(out.data(&chunk));
        }
    }
    let mut sse = SseState {
        choices,
        out,
        pending,
        done: false,
    };
    sse.on_event(Some(first));
    Ok(Sse::new(sse.into_stream())
        .keep_alive(KeepAlive::default())
        .into_response())
}

fn finish_reason(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

fn usage_json(u: Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    })
}

/// One finished choice of a non-streamed response.
#[derive(Default)]
struct Choice {
    /// The prompt's log-probabilities (echo with logprobs).
    prompt: Vec<TokenEvent>,
    text: String,
    tokens: Vec<TokenEvent>,
    finish: Option<FinishReason>,
}

/// Builds response objects and stream chunks of one request.
struct Responder {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
    logprobs: bool,
    include_usage: bool,
    tokenizer: Arc<Tokenizer>,
    /// Characters of token text so far, per choice (completions' `text_offset`).
    text_offset: Vec<usize>,
    echo: Echo,
    /// Per prompt, its text when echoed.
    echoed: Vec<String>,
    /// Choices per prompt.
    per_prompt: usize,
}

impl Responder {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Completion, _) => "text_completion",
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
        }
    }

    fn token_text(&self, id: u32) -> String {
        String::from_utf8_lossy(self.tokenizer.piece(id, false)).into_owned()
    }

    /// The whole (non-streamed) response.
    fn whole(&mut self, choices: &[Choice], usage: Usage) -> Value {
        let choices: Vec<Value> = choices
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let (text, logprobs) = match self.echo {
                    Echo::Off => (c.text.clone(), self.logprobs(i, &c.tokens)),
                    Echo::Prompt => {
                        let all: Vec<TokenEvent> =
                            c.prompt.iter().chain(&c.tokens).cloned().collect();
                        (self.echo_text(i) + &c.text, self.logprobs(i, &all))
                    }
                    Echo::PromptOnly => (self.echo_text(i), self.logprobs(i, &c.prompt)),
                };
                // Every choice has its `Done` once `Choices::next` has ended without an error.
                let finish = c.finish.map(finish_reason);
                match self.kind {
                    Kind::Completion => json!({
                        "index": i,
                        "text": text,
                        "logprobs": logprobs,
                        "finish_reason": finish,
                    }),
                    Kind::Chat => json!({
                        "index": i,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": logprobs,
                        "finish_reason": finish,
                    }),
                }
            })
            .collect();
        json!({
            "id": self.id,
            "object": self.object(false),
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": usage_json(usage),
        })
    }

    /// `logprobs` of choice `i` for `tokens` (`null` when the request did not ask).
    fn logprobs(&mut self, i: usize, tokens: &[TokenEvent]) -> Value {
        if !self.logprobs {
            return Value::Null;
        }
        match self.kind {
            Kind::Completion => {
                let mut texts = Vec::with_capacity(tokens.len());
                let mut offsets = Vec::with_capacity(tokens.len());
                let mut tops = Vec::with_capacity(tokens.len());
                for t in tokens {
                    let text = self.token_text(t.id);
                    offsets.push(self.text_offset[i]);
                    self.text_offset[i] += text.chars().count();
                    texts.push(text);
                    // A prompt's first token has no log-probability and no alternatives: null, as OpenAI's.
                    if t.logprob.is_none() {
                        tops.push(Value::Null);
                        continue;
                    }
                    let top: Map<String, Value> = t
                        .top_logprobs
                        .iter()
                        .map(|&(id, lp)| (self.token_text(id), json!(lp)))
                        .collect();
                    tops.push(Value::Object(top));
                }
                json!({
                    "tokens": texts,
                    "token_logprobs": tokens.iter().map(|t| t.logprob).collect::<Vec<_>>(),
                    "top_logprobs": tops,
                    "text_offset": offsets,
                })
            }
            Kind::Chat => {
                let entry = |id: u32, lp: Option<f32>| {
                    let bytes = self.tokenizer.piece(id, false);
                    json!({
                        "token": String::from_utf8_lossy(bytes),
                        "logprob": lp,
                        "bytes": bytes,
                    })
                };
                let content: Vec<Value> = tokens
                    .iter()
                    .map(|t| {
                        let mut e = entry(t.id, t.logprob);
                        e["top_logprobs"] = t
                            .top_logprobs
                            .iter()
                            .map(|&(id, lp)| entry(id, Some(lp)))
                            .collect();
                        e
                    })
                    .collect();
                json!({ "content": content })
            }
        }
    }

    /// A stream chunk with one choice.
    fn chunk(&self, choice: Value) -> Value {
        let mut c = json!({
            "id": self.id,
            "object": self.object(true),
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        });
        if self.include_usage {
            c["usage"] = Value::Null;
        }
        c
    }

    fn text_chunk(&mut self, i: usize, text: &str, tokens: &[TokenEvent]) -> Value {
        let logprobs = if tokens.is_empty() {
            Value::Null
        } else {
            self.logprobs(i, tokens)
        };
        self.chunk(match self.kind {
            Kind::Completion => json!({
                "index": i, "text": text, "logprobs": logprobs, "finish_reason": null,
            }),
            Kind::Chat => json!({
                "index": i, "delta": {"content": text}, "logprobs": logprobs, "finish_reason": null,
            }),
        })
    }

    /// The usage the client sees: the token generated only to score a prompt (`max_tokens: 0`) is not
    /// counted.
    fn shown_usage(&self, mut usage: Usage) -> Usage {
        if self.echo == Echo::PromptOnly {
            usage.completion_tokens = 0;
        }
        usage
    }

    /// The echoed prompt text of choice `i`.
    fn echo_text(&self, i: usize) -> String {
        self.echoed
            .get(i / self.per_prompt.max(1))
            .cloned()
            .unwrap_or_default()
    }

    /// The stream chunk that echoes choice `i`'s prompt, with its log-probabilities when asked for.
    fn echo_chunk(&mut self, i: usize, entries: &[TokenEvent]) -> Value {
        let text = self.echo_text(i);
        self.text_chunk(i, &text, entries)
    }

    fn data(&self, v: &Value) -> Event {
        Event::default().data(v.to_string())
    }
}

/// The SSE stream of one request: owns its choices' receivers, so dropping the response body (the client
/// went away) cancels every sequence of the request.
struct SseState {
    choices: Choices,
    out: Responder,
    pending: VecDeque<Event>,
    done: bool,
}

impl SseState {
    fn on_event(&mut self, ev: Option<(usize, GenEvent)>) {
        let prompt_only = self.out.echo == Echo::PromptOnly;
        match ev {
            Some((i, GenEvent::Prompt(entries))) => {
                let chunk = self.out.echo_chunk(i, &entries);
                self.pending.push_back(self.out.data(&chunk));
            }
            // Scoring the prompt only: the token generated to do it is not shown.
            Some((_, GenEvent::Token(_))) if prompt_only => {}
            Some((i, GenEvent::Token(t))) => {
                if !t.text.is_empty() || self.out.logprobs {
                    let text = t.text.clone();
                    let chunk = self.out.text_chunk(i, &text, std::slice::from_ref(&t));
                    self.pending.push_back(self.out.data(&chunk));
                }
            }
            Some((i, GenEvent::Done { finish, text, .. })) => {
                if !text.is_empty() && !prompt_only {
                    let chunk = self.out.text_chunk(i, &text, &[]);
                    self.pending.push_back(self.out.data(&chunk));
                }
                let last = match self.out.kind {
                    Kind::Completion => json!({
                        "index": i, "text": "", "logprobs": null, "finish_reason": finish_reason(finish),
                    }),
                    Kind::Chat => json!({
                        "index": i, "delta": {}, "logprobs": null, "finish_reason": finish_reason(finish),
                    }),
                };
                let last = self.out.chunk(last);
                self.pending.push_back(self.out.data(&last));
            }
            Some((_, GenEvent::Error(e))) => self.fail(rename_fields(e, self.out.kind)),
            // Every choice is done.
            None => {
                let usage = self.out.shown_usage(self.choices.usage());
                if self.out.include_usage {
                    let u = json!({
                        "id": self.out.id,
                        "object": self.out.object(true),
                        "created": self.out.created,
                        "model": self.out.model,
                        "choices": [],
                        "usage": usage_json(usage),
                    });
                    self.pending.push_back(self.out.data(&u));
                }
                self.pending.push_back(Event::default().data("[DONE]"));
                self.done = true;
            }
        }
    }

    fn fail(&mut self, e: ServeError) {
        tracing::warn!(id = %self.out.id, "request failed while streaming: {e}");
        let body = ApiError::from(e).body();
        self.pending.push_back(self.out.data(&body));
        self.done = true;
    }

    fn into_stream(self) -> impl Stream<Item = Result<Event, Infallible>> + Send + 'static {
        futures::stream::unfold(self, |mut st| async move {
            loop {
                if let Some(ev) = st.pending.pop_front() {
                    return Some((Ok(ev), st));
                }
                if st.done {
                    return None;
                }
                let ev = st.choices.next().await;
                st.on_event(ev);
            }
        })
    }
}

// ---------------------------------------------------------------------------------------------------------
// Models, health, metrics

fn model_object(state: &AppState) -> Value {
    json!({
        "id": state.model.id,
        "object": "model",
        "created": state.started,
        "owned_by": "tessera",
        "max_model_len": state.model.max_context,
    })
}

async fn list_models(State(state): State<Arc<AppState>>) -> Response {
    axum::Json(json!({"object": "list", "data": [model_object(&state)]})).into_response()
}

async fn get_model(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    if id != state.model.id {
        return Err(ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!(
                "The model `{id}` does not exist: this server serves `{}`",
                state.model.id
            ),
            kind: "invalid_request_error",
            param: Some("model".into()),
            code: Some("model_not_found"),
        });
    }
    Ok(axum::Json(model_object(&state)).into_response())
}

async fn health(State(state): State<Arc<AppState>>) -> Response {
    match super::check_health(&state).await {
        Ok(()) => axum::Json(json!({"status": "ok"})).into_response(),
        Err(e) => {
            let mut r = (
                StatusCode::SERVICE_UNAVAILABLE,
                axum::Json(json!({"status": "unavailable", "message": e.to_string()})),
            )
                .into_response();
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            r
        }
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let Some(handle) = &state.metrics else {
        return Err(ApiError {
            status: StatusCode::NOT_FOUND,
            message: "This server runs without metrics".into(),
            kind: "invalid_request_error",
            param: None,
            code: Some("not_found"),
        });
    };
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        api_metrics::render(handle),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_forms() {
        let text = |t: &str| PromptInput::Text(t.into());
        let cases = [
            (json!("hi"), vec![text("hi")]),
            (json!(["hi"]), vec![text("hi")]),
            (json!([1, 2]), vec![PromptInput::Tokens(vec![1, 2])]),
            (json!([[1, 2]]), vec![PromptInput::Tokens(vec![1, 2])]),
            (json!(["a", "b"]), vec![text("a"), text("b")]),
            (
                json!([[1], [2, 3]]),
                vec![
                    PromptInput::Tokens(vec![1]),
                    PromptInput::Tokens(vec![2, 3]),
                ],
            ),
            (
                json!(["a", [2]]),
                vec![text("a"), PromptInput::Tokens(vec![2])],
            ),
        ];
        for (v, want) in cases {
            assert_eq!(parse_prompts(v.clone()).unwrap(), want, "{v}");
        }
        for bad in [
            json!([]),
            json!([1, "a"]),
            json!(["a", 1]),
            json!([[1], []]),
            json!([[1], [-1]]),
            json!([4294967296u64]),
            json!([true]),
            json!({}),
        ] {
            let e = parse_prompts(bad.clone()).unwrap_err();
            assert_eq!(e.param.as_deref(), Some("prompt"), "{bad}");
            assert_eq!(e.status, StatusCode::BAD_REQUEST);
        }
    }

    #[test]
    fn serve_errors_map_to_openai_errors() {
        let e = ApiError::from(ServeError::invalid("model", "no such model"));
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(
            e.body(),
            json!({"error": {"message": "no such model", "type": "invalid_request_error", "param": "model",
                             "code": "model_not_found"}})
        );
        let e = ApiError::from(ServeError::invalid("top_p", "bad"));
        assert_eq!(e.code, None);
        let cases = [
            (ServeError::Overloaded("x".into()), 429, "rate_limit_error"),
            (
                ServeError::Unavailable("x".into()),
                503,
                "unavailable_error",
            ),
            (ServeError::Internal("x".into()), 500, "internal_error"),
        ];
        for (err, status, kind) in cases {
            let e = ApiError::from(err);
            assert_eq!((e.status.as_u16(), e.kind), (status, kind));
            assert!(e.message.contains('x'));
        }
    }

    #[test]
    fn type_errors_describe_the_value() {
        let long = "y".repeat(100);
        let e = type_error("stop", "a string", &json!(long));
        assert!(e.message.ends_with("…"), "{}", e.message);
        assert_eq!(
            type_error("n", "an integer", &json!(null)).message,
            "`n` must be an integer, got null"
        );
        let mut f = Fields(
            json!({"a": null, "b": 2, "c": 2.5})
                .as_object()
                .unwrap()
                .clone(),
        );
        assert_eq!(f.uint("a").unwrap(), None);
        assert_eq!(f.uint("b").unwrap(), Some(2));
        assert_eq!(f.uint("c").unwrap_err().param.as_deref(), Some("c"));
        assert_eq!(f.f32("missing").unwrap(), None);
    }
}
