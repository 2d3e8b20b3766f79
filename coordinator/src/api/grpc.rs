//! The `tessera.v1.Tessera` gRPC service (proto/tessera/v1/tessera.proto), served next to
//! `grpc.health.v1.Health` and server reflection (v1 and v1alpha: grpcurl 1.8 and Python's grpcio-reflection
//! still speak v1alpha).
//!
//! Status codes: a bad request is INVALID_ARGUMENT, its message naming the field (also in the `tessera-field`
//! metadata entry: "model", "prompt", "chat", "prompt_ids", "temperature", "max_tokens", "logprobs" …); a
//! full queue RESOURCE_EXHAUSTED; a worker down or the cluster re-forming UNAVAILABLE; a bug INTERNAL.
//! Health: NOT_SERVING until the first check passes, then every [`HEALTH_POLL`] a real check
//! ([`Backend::health`](super::Backend::health)) sets SERVING / NOT_SERVING for "" and `tessera.v1.Tessera`.
//! A cancelled call drops the request's event receiver, which cancels it in the scheduler.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use tessera_proto::v1 as pb;
use tessera_proto::v1::generate_request::Input;
use tessera_proto::v1::tessera_server::{Tessera, TesseraServer};
use tokio::net::TcpListener;
use tonic::metadata::MetadataValue;
use tonic::transport::server::TcpIncoming;
use tonic::{Code, Request, Response, Status};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use super::prompt::{self, PromptInput};
use super::{AppState, metrics as api_metrics};
use crate::chat::ChatMessage;
use crate::generate::FinishReason;
use crate::sampling::SamplingParams;
use crate::serve::{GenEvent, GenReceiver, GenRequest, ServeError, TokenEvent};
use crate::tokenizer::Tokenizer;

/// How often the health service re-checks the scheduler.
pub const HEALTH_POLL: Duration = Duration::from_secs(2);
/// The fully qualified name of the service (also its health-check name).
pub const SERVICE_NAME: &str = "tessera.v1.Tessera";

/// Serves `tessera.v1.Tessera`, health and reflection on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (reporter, health_service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", ServingStatus::NotServing)
        .await;
    reporter
        .set_service_status(SERVICE_NAME, ServingStatus::NotServing)
        .await;
    let poller = AbortOnDrop(tokio::spawn(poll_health(state.clone(), reporter)));
    // Both reflection services describe every service, each other included.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .include_reflection_service(false)
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            )
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .add_service(TesseraServer::new(TesseraService::new(state)))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    drop(poller);
    Ok(())
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn poll_health(state: Arc<AppState>, reporter: HealthReporter) {
    let mut last = None;
    loop {
        let status = match super::check_health(&state).await {
            Ok(()) => ServingStatus::Serving,
            Err(e) => {
                // Before the first success the cluster is still forming: not worth a warning.
                if last == Some(ServingStatus::Serving) {
                    tracing::warn!("health check failed: {e}");
                } else if last.is_none() {
                    tracing::info!("not serving yet: {e}");
                }
                ServingStatus::NotServing
            }
        };
        if last != Some(status) {
            reporter.set_service_status("", status).await;
            reporter.set_service_status(SERVICE_NAME, status).await;
            last = Some(status);
        }
        tokio::time::sleep(HEALTH_POLL).await;
    }
}

/// A [`ServeError`] as a gRPC status (see the module docs).
pub fn status(e: ServeError) -> Status {
    match e {
        ServeError::InvalidArgument { field, message } => {
            let text = if message.contains(&field) {
                message
            } else {
                format!("{field}: {message}")
            };
            let mut s = Status::invalid_argument(text);
            if let Ok(v) = MetadataValue::try_from(field.as_str()) {
                s.metadata_mut().insert("tessera-field", v);
            }
            s
        }
        ServeError::Overloaded(m) => {
            Status::resource_exhausted(format!("the server is overloaded ({m}); retry later"))
        }
        ServeError::Unavailable(m) => {
            Status::unavailable(format!("the model is unavailable ({m}); retry later"))
        }
        ServeError::Internal(m) => Status::internal(m),
    }
}

/// `Code`'s canonical name ("OK", "INVALID_ARGUMENT" …) for metric labels.
fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

fn record<T>(method: &'static str, r: &Result<T, Status>) {
    let code = r.as_ref().map_or_else(|s| s.code(), |_| Code::Ok);
    ::metrics::counter!(api_metrics::GRPC_REQUESTS, "method" => method, "code" => code_name(code))
        .increment(1);
}

/// The `tessera.v1.Tessera` implementation.
pub struct TesseraService {
    state: Arc<AppState>,
}

impl TesseraService {
    pub fn new(state: Arc<AppState>) -> TesseraService {
        TesseraService { state }
    }

    /// Checks `req`, builds its prompt and submits it. Errors name the proto fields.
    fn start(&self, req: pb::GenerateRequest) -> Result<GenReceiver, ServeError> {
        let state = &self.state;
        state.check_model(&req.model)?;
        let (input, field) = match req.input {
            None => {
                return Err(ServeError::invalid(
                    "input",
                    "one of `prompt`, `chat` or `prompt_ids` is required",
                ));
            }
            Some(Input::Prompt(text)) => (PromptInput::Text(text), "prompt"),
            Some(Input::PromptIds(ids)) => (PromptInput::Tokens(ids.ids), "prompt_ids"),
            Some(Input::Chat(chat)) => (
                PromptInput::Chat(
                    chat.messages
                        .into_iter()
                        .map(|m| ChatMessage::new(m.role, m.content))
                        .collect(),
                ),
                "chat",
            ),
        };
        let s = req.sampling.unwrap_or_default();
        let d = SamplingParams::default();
        let params = SamplingParams {
            temperature: s.temperature.unwrap_or(d.temperature),
            top_k: s.top_k.map_or(d.top_k, |k| k as usize),
            top_p: s.top_p.unwrap_or(d.top_p),
            min_p: s.min_p.unwrap_or(d.min_p),
            repetition_penalty: s.repetition_penalty.unwrap_or(d.repetition_penalty),
            frequency_penalty: s.frequency_penalty.unwrap_or(d.frequency_penalty),
            presence_penalty: s.presence_penalty.unwrap_or(d.presence_penalty),
            logit_bias: {
                let mut b: Vec<(u32, f32)> = s.logit_bias.into_iter().collect();
                b.sort_by_key(|&(id, _)| id);
                b
            },
            seed: s.seed,
            max_tokens: (req.max_tokens > 0).then_some(req.max_tokens as usize),
            stop: req.stop,
            logprobs: req.logprobs.map(|n| n as usize),
            prompt_logprobs: None,
        };
        state.validate_params(&params)?;
        let rename = |e: ServeError| match e {
            ServeError::InvalidArgument { field: f, message }
                if f == "prompt" || f == "messages" || f.starts_with("messages[") =>
            {
                let to = if let Some(rest) = f.strip_prefix("messages[") {
                    format!("chat.messages[{rest}")
                } else {
                    field.to_owned()
                };
                ServeError::InvalidArgument {
                    message: message.replace(&format!("`{f}`"), &format!("`{to}`")),
                    field: to,
                }
            }
            other => other,
        };
        let ids = prompt::build_prompt(&state.model, &input).map_err(rename)?;
        state
            .scheduler
            .submit(GenRequest {
                prompt: ids,
                params,
            })
            .map_err(rename)
    }

    async fn generate_inner(
        &self,
        req: pb::GenerateRequest,
    ) -> Result<pb::GenerateResponse, Status> {
        let mut rx = self.start(req).map_err(status)?;
        let tokenizer = &self.state.model.tokenizer;
        let mut text = String::new();
        let mut tokens = Vec::new();
        loop {
            match rx.recv().await {
                // gRPC requests never ask for prompt log-probabilities.
                Some(GenEvent::Prompt(_)) => {}
                Some(GenEvent::Token(t)) => {
                    text.push_str(&t.text);
                    tokens.push(generated_token(tokenizer, &t));
                }
                Some(GenEvent::Done {
                    finish,
                    usage,
                    text: tail,
                }) => {
                    text.push_str(&tail);
                    return Ok(pb::GenerateResponse {
                        text,
                        tokens,
                        finish_reason: finish_reason(finish) as i32,
                        usage: Some(usage_pb(usage)),
                    });
                }
                Some(GenEvent::Error(e)) => return Err(status(e)),
                None => return Err(status(ended_early())),
            }
        }
    }
}

fn ended_early() -> ServeError {
    ServeError::Internal("the scheduler ended the request without a result".into())
}

fn finish_reason(f: FinishReason) -> pb::FinishReason {
    match f {
        FinishReason::Stop => pb::FinishReason::Stop,
        FinishReason::Length => pb::FinishReason::Length,
    }
}

fn usage_pb(u: crate::serve::Usage) -> pb::Usage {
    pb::Usage {
        prompt_tokens: u32::try_from(u.prompt_tokens).unwrap_or(u32::MAX),
        completion_tokens: u32::try_from(u.completion_tokens).unwrap_or(u32::MAX),
        cached_tokens: u32::try_from(u.cached_tokens).unwrap_or(u32::MAX),
    }
}

fn piece_text(tokenizer: &Tokenizer, id: u32) -> String {
    String::from_utf8_lossy(tokenizer.piece(id, false)).into_owned()
}

fn generated_token(tokenizer: &Tokenizer, t: &TokenEvent) -> pb::GeneratedToken {
    pb::GeneratedToken {
        id: t.id,
        text: piece_text(tokenizer, t.id),
        logprob: t.logprob,
        top_logprobs: t
            .top_logprobs
            .iter()
            .map(|&(id, logprob)| pb::TopLogprob {
                id,
                text: piece_text(tokenizer, id),
                logprob,
            })
            .collect(),
    }
}

type GenerateStream =
    Pin<Box<dyn Stream<Item = Result<pb::GenerateStreamResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Tessera for TesseraService {
    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<pb::GenerateResponse>, Status> {
        let r = self.generate_inner(request.into_inner()).await;
        record("Generate", &r);
        r.map(Response::new)
    }

    type GenerateStreamStream = GenerateStream;

    async fn generate_stream(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStreamStream>, Status> {
        let r = self.start(request.into_inner()).map_err(status);
        record("GenerateStream", &r);
        let rx = r?;
        let tokenizer = self.state.model.tokenizer.clone();
        // The stream owns the receiver: a cancelled call drops it, which cancels the request.
        let stream = futures::stream::unfold(Some(rx), move |rx| {
            let tokenizer = tokenizer.clone();
            async move {
                let mut rx = rx?;
                let item = loop {
                    break match rx.recv().await {
                        // gRPC requests never ask for prompt log-probabilities.
                        Some(GenEvent::Prompt(_)) => continue,
                        Some(GenEvent::Token(t)) => {
                            let msg = pb::GenerateStreamResponse {
                                text: t.text.clone(),
                                tokens: vec![generated_token(&tokenizer, &t)],
                                finish_reason: pb::FinishReason::Unspecified as i32,
                                usage: None,
                            };
                            return Some((Ok(msg), Some(rx)));
                        }
                        Some(GenEvent::Done {
                            finish,
                            usage,
                            text,
                        }) => Ok(pb::GenerateStreamResponse {
                            text,
                            tokens: Vec::new(),
                            finish_reason: finish_reason(finish) as i32,
                            usage: Some(usage_pb(usage)),
                        }),
                        Some(GenEvent::Error(e)) => Err(status(e)),
                        None => Err(status(ended_early())),
                    };
                };
                Some((item, None))
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn tokenize(
        &self,
        request: Request<pb::TokenizeRequest>,
    ) -> Result<Response<pb::TokenizeResponse>, Status> {
        let req = request.into_inner();
        let r = self
            .state
            .model
            .tokenizer
            .encode(&req.text, req.add_special, req.parse_special)
            .map(|ids| pb::TokenizeResponse { ids })
            .map_err(|e| status(ServeError::Internal(format!("tokenizing: {e}"))));
        record("Tokenize", &r);
        r.map(Response::new)
    }

    async fn detokenize(
        &self,
        request: Request<pb::DetokenizeRequest>,
    ) -> Result<Response<pb::DetokenizeResponse>, Status> {
        let req = request.into_inner();
        let tokenizer = &self.state.model.tokenizer;
        let n = tokenizer.vocab_size();
        let r = match req.ids.iter().find(|&&id| id as usize >= n) {
            Some(bad) => Err(status(ServeError::invalid(
                "ids",
                format!("`ids` holds token id {bad}, outside the vocabulary of {n} tokens"),
            ))),
            None => Ok(pb::DetokenizeResponse {
                text: tokenizer.decode(&req.ids, req.skip_special),
            }),
        };
        record("Detokenize", &r);
        r.map(Response::new)
    }

    async fn model_info(
        &self,
        _request: Request<pb::ModelInfoRequest>,
    ) -> Result<Response<pb::ModelInfoResponse>, Status> {
        let m = &self.state.model;
        let c = &m.config;
        let u = |x: usize| u32::try_from(x).unwrap_or(u32::MAX);
        let r = Ok(pb::ModelInfoResponse {
            id: m.id.clone(),
            architecture: c.arch.clone(),
            n_layers: u(c.n_layer),
            n_embd: u(c.n_embd),
            n_heads: u(c.n_head),
            n_kv_heads: u(c.n_head_kv),
            n_vocab: u(c.n_vocab),
            max_context: u(m.max_context),
            tp: u(m.tp),
            pp: u(m.pp),
        });
        record("ModelInfo", &r);
        r.map(Response::new)
    }
}
