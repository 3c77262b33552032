//! The edge: API keys, admission control, the deadlines that bound every
//! wait on a worker or a client, and what error bodies may say.

use super::{Stack, chat, drt, eventually, frontend, post, stack};
use crate::FrontendArgs;
use crate::auth::MetricsAccess;
use crate::http::router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use std::time::Duration;
use switchyard_llm::model_card::{ModelCard, ModelKind};
use switchyard_llm::protocol::{LlmOutput, LlmRequest};
use switchyard_mocker_worker::MockerArgs;
use switchyard_runtime::config::RuntimeConfig;
use switchyard_runtime::discovery::mem::MemRegistry;
use switchyard_runtime::engine::{AsyncEngine, Context, ResponseStream};
use switchyard_runtime::error::RequestError;
use switchyard_runtime::runtime::Runtime;
use tower::ServiceExt;

const KEY: &str = "sk-test-0123456789";

fn with_key(mut request: Request<Body>, key: &str) -> Request<Body> {
    let value = format!("Bearer {key}").parse().unwrap();
    request.headers_mut().insert(header::AUTHORIZATION, value);
    request
}

fn get(path: &str) -> Request<Body> {
    Request::get(path).body(Body::empty()).unwrap()
}

async fn read(response: axum::response::Response) -> (StatusCode, axum::http::HeaderMap, Value) {
    let (parts, body) = response.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    (
        parts.status,
        parts.headers,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_guard_the_openai_routes_and_leave_the_probes_open() {
    let args = FrontendArgs {
        api_keys: vec![KEY.into()],
        ..FrontendArgs::default()
    };
    let stack = stack(args, Some(0.0)).await;
    let request = || post("/v1/chat/completions", chat(json!({"max_tokens": 2})).to_string());

    let (status, headers, body) = read(stack.call(request()).await).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(headers[header::WWW_AUTHENTICATE], "Bearer");
    assert_eq!(body["error"]["code"], "invalid_api_key");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    let (status, _, body) = read(stack.call(with_key(request(), "sk-wrong-0123456789")).await).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    let (status, _, body) = read(stack.call(with_key(request(), KEY)).await).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    assert_eq!(
        read(stack.call(get("/v1/models")).await).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        read(stack.call(with_key(get("/v1/models"), KEY)).await).await.0,
        StatusCode::OK
    );
    // Probes need no secret; /metrics needs the key by default.
    assert_eq!(read(stack.call(get("/live")).await).await.0, StatusCode::OK);
    assert_eq!(read(stack.call(get("/health")).await).await.0, StatusCode::OK);
    assert_eq!(
        read(stack.call(get("/metrics")).await).await.0,
        StatusCode::UNAUTHORIZED
    );
    let metrics = stack.call(with_key(get("/metrics"), KEY)).await;
    assert_eq!(metrics.status(), StatusCode::OK);
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_on_the_api_port_can_be_open_or_off() {
    for (access, expected) in [
        (MetricsAccess::Open, StatusCode::OK),
        (MetricsAccess::Off, StatusCode::NOT_FOUND),
    ] {
        let args = FrontendArgs {
            api_keys: vec![KEY.into()],
            http_metrics: access,
            ..FrontendArgs::default()
        };
        let stack = stack(args, None).await;
        assert_eq!(stack.call(get("/metrics")).await.status(), expected, "{access:?}");
        stack.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_model_is_named_but_the_served_ones_are_not_listed() {
    let stack = stack(FrontendArgs::default(), Some(0.0)).await;
    let body = json!({"model": "nope", "messages": [{"role": "user", "content": "hi"}]});
    let (status, _, text) = stack.post("/v1/chat/completions", body).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(text.contains("nope"), "{text}");
    assert!(!text.contains("mock-model"), "the 404 lists no served model: {text}");
    stack.shutdown().await;
}

/// A streamed request that holds its place for a while (50 tokens on a slow mocker).
fn long_stream() -> Request<Body> {
    post(
        "/v1/chat/completions",
        chat(json!({"max_tokens": 50, "stream": true})).to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_in_flight_cap_requests_wait_then_get_503_with_retry_after() {
    let args = FrontendArgs {
        max_inflight_requests: 1,
        max_queued_requests: 1,
        http_queue_timeout: Duration::from_millis(200),
        ..FrontendArgs::default()
    };
    let stack = stack(args, Some(0.05)).await;
    let first = stack.call(long_stream()).await;
    assert_eq!(first.status(), StatusCode::OK);
    // The place is held while the answer streams: the next request waits
    // its 200 ms in the queue, then is refused.
    let started = tokio::time::Instant::now();
    let (status, headers, body) = read(stack.call(long_stream()).await).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert_eq!(headers[header::RETRY_AFTER], "1");
    assert_eq!(body["error"]["code"], "overloaded");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--http-queue-timeout-ms"),
        "{body}"
    );
    let rejections = stack.scrape().await;
    assert!(
        rejections.contains("dynamo_frontend_admission_rejections_total{reason=\"queue_timeout\"} 1"),
        "{rejections}"
    );
    // Once the first answer is gone, its place is free.
    drop(first);
    let (status, _, body) = read(
        stack
            .call(post("/v1/chat/completions", chat(json!({"max_tokens": 1})).to_string()))
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_past_its_request_rate_gets_429_and_other_keys_do_not() {
    let other = "sk-other-0123456789";
    let args = FrontendArgs {
        api_keys: vec![KEY.into(), other.into()],
        rate_limit_requests_per_second: Some(1.0),
        ..FrontendArgs::default()
    };
    let stack = stack(args, Some(0.0)).await;
    let request = || {
        post(
            "/v1/completions",
            json!({"model": "mock-model", "prompt": "hi", "max_tokens": 1}).to_string(),
        )
    };
    assert_eq!(stack.call(with_key(request(), KEY)).await.status(), StatusCode::OK);
    let (status, headers, body) = read(stack.call(with_key(request(), KEY)).await).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(headers[header::RETRY_AFTER], "1");
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    assert_eq!(stack.call(with_key(request(), other)).await.status(), StatusCode::OK);
    stack.shutdown().await;
}

/// An engine that takes requests and never answers: a wedged worker.
struct Silent;

#[async_trait::async_trait]
impl AsyncEngine<LlmRequest, LlmOutput> for Silent {
    async fn generate(&self, _request: Context<LlmRequest>) -> Result<ResponseStream<LlmOutput>, RequestError> {
        Ok(Box::pin(futures::stream::pending()))
    }
}

/// A worker serving `mock-model` with [`Silent`], on its own runtime.
async fn silent_worker(registry: &MemRegistry) -> Runtime {
    let runtime = Runtime::new(RuntimeConfig::local());
    let drt = drt(&runtime, registry);
    let endpoint = drt
        .namespace("dynamo")
        .unwrap()
        .component("backend")
        .unwrap()
        .endpoint("generate");
    let serving = endpoint.endpoint_builder().handler(Silent).spawn().await.unwrap();
    let card = ModelCard::new(
        "mock-model",
        &endpoint,
        vec![ModelKind::Chat, ModelKind::Completions],
        8192,
    );
    card.register(&endpoint).await.unwrap();
    std::mem::forget(serving);
    runtime
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_never_sends_a_first_token_loses_the_request_to_another() {
    let registry = MemRegistry::new();
    let silent = silent_worker(&registry).await;
    let good_runtime = Runtime::new(RuntimeConfig::local());
    let good_args = MockerArgs {
        speedup_ratio: 0.0,
        ..MockerArgs::default()
    };
    let _good = switchyard_mocker_worker::serve(&drt(&good_runtime, &registry), &good_args)
        .await
        .unwrap();
    let args = FrontendArgs {
        router_mode: switchyard_runtime::routing::RouterMode::RoundRobin,
        first_token_timeout: Duration::from_millis(300),
        ..FrontendArgs::default()
    };
    let (runtime, state) = frontend(&registry, args).await;
    eventually("both workers", || {
        state.models.get("mock-model").is_some_and(|m| m.cards.len() == 2)
    })
    .await;
    let app = router(state.clone());
    // Round robin sends one of every two to the silent worker: each of those
    // moves on after 300 ms, so all four answer.
    for _ in 0..4 {
        let request = post("/v1/chat/completions", chat(json!({"max_tokens": 3})).to_string());
        let (status, _, body) = read(app.clone().oneshot(request).await.unwrap()).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let metrics = read_text(app.oneshot(get("/metrics")).await.unwrap()).await;
    let retried = metrics
        .lines()
        .find_map(|line| line.strip_prefix("dynamo_router_retries_total "))
        .and_then(|n| n.parse::<u64>().ok());
    assert!(retried >= Some(1), "a request left the silent worker: {retried:?}");
    runtime.shutdown().await;
    good_runtime.shutdown().await;
    silent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_worker_answering_the_first_token_deadline_ends_the_request_with_504() {
    let registry = MemRegistry::new();
    let silent = silent_worker(&registry).await;
    let args = FrontendArgs {
        migration_limit: 0,
        first_token_timeout: Duration::from_millis(300),
        ..FrontendArgs::default()
    };
    let (runtime, state) = frontend(&registry, args).await;
    eventually("the silent worker", || state.models.get("mock-model").is_some()).await;
    for stream in [false, true] {
        let request = post(
            "/v1/chat/completions",
            chat(json!({"max_tokens": 3, "stream": stream})).to_string(),
        );
        let started = tokio::time::Instant::now();
        let (status, _, body) = read(router(state.clone()).oneshot(request).await.unwrap()).await;
        assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");
        assert!(started.elapsed() < Duration::from_secs(5));
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains("--first-token-timeout-secs"), "{message}");
    }
    runtime.shutdown().await;
    silent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_off_at_the_write_deadline_and_the_engine_frees_its_work() {
    let args = FrontendArgs {
        http_write_timeout: Duration::from_millis(300),
        ..FrontendArgs::default()
    };
    // Real-time decoding: the answer takes far longer than the deadline.
    let stack = stack(args, Some(1.0)).await;
    let response = stack
        .call(post(
            "/v1/chat/completions",
            chat(json!({"max_tokens": 2000, "stream": true})).to_string(),
        ))
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let engine = stack.worker().engine.clone();
    eventually("the engine to see the cancel", || engine.stats().cancelled == 1).await;
    assert_eq!(engine.load().running, 0);
    assert_eq!(stack.state.metrics.disconnected.get(), 1);
    // The body ends (early, without [DONE]) rather than hanging.
    let body = tokio::time::timeout(Duration::from_secs(5), response.into_body().collect())
        .await
        .expect("the body ends")
        .unwrap()
        .to_bytes();
    assert!(!String::from_utf8_lossy(&body).contains("[DONE]"));
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_failures_reach_the_client_without_worker_addresses() {
    let stack = stack(FrontendArgs::default(), Some(0.0)).await;
    let error = RequestError::new(
        switchyard_runtime::error::ErrorKind::Unreachable,
        "cannot connect to 10.1.2.3:40001",
    );
    let api = crate::error::ApiError::from_request("mock-model", &error);
    assert_eq!(api.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(!api.message.contains("10.1.2.3"), "{}", api.message);
    let engine = RequestError::new(
        switchyard_runtime::error::ErrorKind::Engine,
        "http://10.1.2.3:8001 said 500",
    );
    assert!(
        !crate::error::ApiError::from_request("m", &engine)
            .message
            .contains("10.1.2.3")
    );
    // What the client itself got wrong is passed on word for word.
    let invalid = RequestError::new(switchyard_runtime::error::ErrorKind::Invalid, "prompt too long");
    assert_eq!(
        crate::error::ApiError::from_request("m", &invalid).message,
        "prompt too long"
    );
    stack.shutdown().await;
}

async fn read_text(response: axum::response::Response) -> String {
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

impl Stack {
    /// The frontend's /metrics text.
    async fn scrape(&self) -> String {
        read_text(self.call(get("/metrics")).await).await
    }
}

/// A TLS session to `address` offering only `alpn`, trusting `ca`.
async fn tls_session(
    address: std::net::SocketAddr,
    ca: &std::path::Path,
    alpn: &[u8],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_file(ca).unwrap()).unwrap();
    let provider = std::sync::Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut config = tokio_rustls::rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(address).await.unwrap();
    let name = ServerName::try_from("127.0.0.1").unwrap();
    connector.connect(name, tcp).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_http2_and_http1_by_alpn_and_plain_http_is_refused() {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let certificates = switchyard_test_support::etcd_server::TestCertificates::generate();
    let runtime = Runtime::new(RuntimeConfig::local());
    let args = FrontendArgs {
        http_host: "127.0.0.1".into(),
        http_port: 0,
        tls_cert_path: Some(certificates.server_cert.clone()),
        tls_key_path: Some(certificates.server_key.clone()),
        ..FrontendArgs::default()
    };
    let frontend = crate::start(&drt(&runtime, &MemRegistry::new()), &args).await.unwrap();
    let live = || {
        Request::get("/live")
            .header(header::HOST, "127.0.0.1")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap()
    };

    let session = tls_session(frontend.address, &certificates.ca, b"h2").await;
    assert_eq!(session.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut h2, connection) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(session))
        .await
        .unwrap();
    tokio::spawn(connection);
    let response = h2.send_request(live()).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.version(), axum::http::Version::HTTP_2);

    let session = tls_session(frontend.address, &certificates.ca, b"http/1.1").await;
    assert_eq!(session.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (mut h1, connection) = hyper::client::conn::http1::handshake(TokioIo::new(session))
        .await
        .unwrap();
    tokio::spawn(connection);
    let response = h1.send_request(live()).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.version(), axum::http::Version::HTTP_11);

    // Plain HTTP on the TLS port gets no HTTP answer.
    let status = super::raw_exchange(frontend.address, b"GET /live HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(status, None);
    runtime.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_certificate_or_key_stops_start_up_naming_the_file() {
    let runtime = Runtime::new(RuntimeConfig::local());
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "not a pem file").unwrap();
    let args = FrontendArgs {
        http_host: "127.0.0.1".into(),
        http_port: 0,
        tls_cert_path: Some(junk.clone()),
        tls_key_path: Some(junk.clone()),
        ..FrontendArgs::default()
    };
    let error = crate::start(&drt(&runtime, &MemRegistry::new()), &args)
        .await
        .unwrap_err();
    let text = switchyard_runtime::error::Report(&error).to_string();
    assert!(text.contains("junk.pem") && text.contains("--tls-cert-path"), "{text}");
    runtime.shutdown().await;
}
