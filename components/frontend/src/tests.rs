//! The frontend's routes over a real mocker worker in the same process:
//! in-memory discovery, the TCP request plane, and `oneshot` HTTP calls.

use crate::FrontendArgs;
use crate::http::{FrontendState, router};
use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;
use switchyard_mocker_worker::{MockerArgs, MockerWorker};
use switchyard_runtime::config::RuntimeConfig;
use switchyard_runtime::discovery::mem::{MemDiscovery, MemRegistry};
use switchyard_runtime::distributed::DistributedRuntime;
use switchyard_runtime::runtime::Runtime;
use tower::ServiceExt;

mod claims;
mod edge;
mod kv;
mod mesh;
mod migration;

/// A frontend and (optionally) one mocker worker sharing a private registry.
struct Stack {
    app: Router,
    state: FrontendState,
    worker: Option<(Runtime, MockerWorker)>,
    frontend_runtime: Runtime,
}

fn drt(runtime: &Runtime, registry: &MemRegistry) -> DistributedRuntime {
    DistributedRuntime::with_discovery(runtime.clone(), Arc::new(MemDiscovery::new(registry.clone()))).unwrap()
}

/// A frontend over `registry` on its own runtime (workers are added by the caller).
async fn frontend(registry: &MemRegistry, args: FrontendArgs) -> (Runtime, FrontendState) {
    let runtime = Runtime::new(RuntimeConfig::local());
    let state = FrontendState::new(&drt(&runtime, registry), &args).await.unwrap();
    (runtime, state)
}

/// A fast worker (no simulated delay) unless `speedup` says otherwise.
async fn stack(frontend: FrontendArgs, speedup: Option<f64>) -> Stack {
    let registry = MemRegistry::new();
    let worker = match speedup {
        Some(speedup_ratio) => {
            let runtime = Runtime::new(RuntimeConfig::local());
            let args = MockerArgs {
                speedup_ratio,
                ..MockerArgs::default()
            };
            let worker = switchyard_mocker_worker::serve(&drt(&runtime, &registry), &args)
                .await
                .unwrap();
            Some((runtime, worker))
        }
        None => None,
    };
    let frontend_runtime = Runtime::new(RuntimeConfig::local());
    let state = FrontendState::new(&drt(&frontend_runtime, &registry), &frontend)
        .await
        .unwrap();
    Stack {
        app: router(state.clone()),
        state,
        worker,
        frontend_runtime,
    }
}

impl Stack {
    async fn call(&self, request: Request<Body>) -> axum::response::Response {
        self.app.clone().oneshot(request).await.unwrap()
    }

    async fn post(&self, path: &str, body: Value) -> (StatusCode, axum::http::HeaderMap, String) {
        let response = self.call(post(path, body.to_string())).await;
        let (parts, body) = response.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        (parts.status, parts.headers, String::from_utf8(bytes.to_vec()).unwrap())
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        let response = self.call(Request::get(path).body(Body::empty()).unwrap()).await;
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    fn worker(&self) -> &MockerWorker {
        &self.worker.as_ref().expect("a stack with a worker").1
    }

    async fn shutdown(self) {
        if let Some((runtime, _)) = &self.worker {
            runtime.shutdown().await;
        }
        self.frontend_runtime.shutdown().await;
    }
}

fn post(path: &str, body: String) -> Request<Body> {
    Request::post(path)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body))
        .unwrap()
}

fn chat(extra: Value) -> Value {
    let mut body = json!({"model": "mock-model", "messages": [{"role": "user", "content": "Tell me a story"}]});
    body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    body
}

/// The JSON payloads of an SSE body, and whether it ended with `[DONE]`.
fn sse_events(body: &str) -> (Vec<Value>, bool) {
    let data: Vec<&str> = body.lines().filter_map(|line| line.strip_prefix("data: ")).collect();
    let done = data.last() == Some(&"[DONE]");
    let events = data
        .iter()
        .filter(|d| **d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    (events, done)
}

/// Polls `check` every 10 ms for up to 5 s.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..500 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_served_model_is_listed_and_health_is_ready() {
    let stack = stack(FrontendArgs::default(), Some(0.0)).await;
    let (status, models) = stack.get("/v1/models").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "mock-model");
    assert_eq!(models["data"][0]["context_window"], 8192);
    let (status, health) = stack.get("/health").await;
    assert_eq!(status, StatusCode::OK, "{health}");
    assert_eq!(health["models"], json!(["mock-model"]));
    assert_eq!(stack.get("/live").await.0, StatusCode::OK);
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_workers_health_is_not_ready_and_models_are_empty() {
    let stack = stack(FrontendArgs::default(), None).await;
    let (status, health) = stack.get("/health").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(health["status"], "notready");
    assert_eq!(stack.get("/v1/models").await.1["data"], json!([]));
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unary_chat_returns_max_tokens_of_text_with_usage() {
    let stack = stack(FrontendArgs::default(), Some(0.0)).await;
    let (status, headers, body) = stack
        .post("/v1/chat/completions", chat(json!({"max_tokens": 12})))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        headers.contains_key("x-request-id"),
        "a request id is generated when none is sent"
    );
    let answer: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["object"], "chat.completion");
    assert_eq!(answer["choices"][0]["message"]["role"], "assistant");
    assert_eq!(answer["choices"][0]["finish_reason"], "length");
    let text = answer["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(text.split_whitespace().count(), 12, "one word per token: {text:?}");
    assert_eq!(answer["usage"]["completion_tokens"], 12);
    assert_eq!(
        answer["usage"]["prompt_tokens"], 6,
        "`user: Tell me a story` and the generation prompt `assistant:` are six words"
    );
    assert_eq!(answer["usage"]["total_tokens"], 18);
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_chat_sends_role_then_tokens_then_finish_then_done() {
    let stack = stack(FrontendArgs::default(), Some(0.0)).await;
    let body = chat(json!({"max_tokens": 6, "stream": true, "stream_options": {"include_usage": true}}));
    let (status, headers, body) = stack.post("/v1/chat/completions", body).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers[header::CONTENT_TYPE], "text/event-stream");
    let (events, done) = sse_events(&body);
    assert!(done, "the stream ends with [DONE]: {body}");
    assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
    let words: String = events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(words.split_whitespace().count(), 6);
    let finish = &events[events.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "length");
    let usage = events.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 6);
    assert!(events.iter().all(|e| e["object"] == "chat.completion.chunk"));
    assert!(events.iter().all(|e| e["id"] == events[0]["id"]), "one id per response");
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_work_whole_and_streamed() {
    let stack = stack(FrontendArgs::default(), Some(0.0)).await;
    let request = json!({"model": "mock-model", "prompt": "Once upon a time", "max_tokens": 4});
    let (status, _, body) = stack.post("/v1/completions", request.clone()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let answer: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["object"], "text_completion");
    assert_eq!(answer["usage"]["completion_tokens"], 4);
    assert_eq!(answer["usage"]["prompt_tokens"], 4);

    let mut streamed = request;
    streamed["stream"] = json!(true);
    let (status, _, body) = stack.post("/v1/completions", streamed).await;
    assert_eq!(status, StatusCode::OK);
    let (events, done) = sse_events(&body);
    assert!(done);
    let text: String = events.iter().filter_map(|e| e["choices"][0]["text"].as_str()).collect();
    assert_eq!(text.split_whitespace().count(), 4);
    assert_eq!(events.last().unwrap()["choices"][0]["finish_reason"], "length");
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_sequence_ends_the_answer_before_it() {
    let stack = stack(FrontendArgs::default(), Some(0.0)).await;
    // The mocker's sentences end with "." within a few dozen words.
    let (status, _, body) = stack
        .post("/v1/chat/completions", chat(json!({"max_tokens": 200, "stop": "."})))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let answer: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["choices"][0]["finish_reason"], "stop");
    let text = answer["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(!text.is_empty() && !text.contains('.'), "{text:?}");
    assert!(answer["usage"]["completion_tokens"].as_u64().unwrap() < 200);
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_openai_shaped_errors_naming_the_problem() {
    let args = FrontendArgs {
        body_limit_mb: 1,
        ..FrontendArgs::default()
    };
    let stack = stack(args, Some(0.0)).await;
    let cases = [
        ("{\"model\":", StatusCode::BAD_REQUEST, "not valid JSON", None),
        (
            r#"{"model":"mock-model","messages":[{"role":"robot","content":"x"}]}"#,
            StatusCode::BAD_REQUEST,
            "robot",
            Some("messages[0].role"),
        ),
        (
            r#"{"model":"mock-model","messages":[{"role":"user","content":"x"}],"temperature":9}"#,
            StatusCode::BAD_REQUEST,
            "between 0 and 2",
            Some("temperature"),
        ),
        (
            r#"{"model":"gpt-9","messages":[{"role":"user","content":"x"}]}"#,
            StatusCode::NOT_FOUND,
            "gpt-9",
            Some("model"),
        ),
    ];
    for (body, status, needle, param) in cases {
        let response = stack.call(post("/v1/chat/completions", body.to_string())).await;
        assert_eq!(response.status(), status, "{body}");
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let error: Value = serde_json::from_slice(&bytes).unwrap();
        let message = error["error"]["message"].as_str().unwrap();
        assert!(message.contains(needle), "{message:?} should mention {needle:?}");
        assert_eq!(error["error"]["param"].as_str(), param, "{error}");
        assert!(error["error"]["type"].is_string() && error["error"]["code"].is_string());
    }

    let huge = format!(
        r#"{{"model":"mock-model","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(2 << 20)
    );
    let response = stack.call(post("/v1/chat/completions", huge)).await;
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        response.headers()[header::CONNECTION],
        "close",
        "the unread rest of the body makes the connection unusable"
    );

    let response = stack
        .call(
            Request::post("/v1/completions")
                .header(header::CONTENT_TYPE, "text/plain")
                .body(Body::from("hello"))
                .unwrap(),
        )
        .await;
    assert_eq!(response.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);

    let (_, metrics) = {
        let response = stack.call(Request::get("/metrics").body(Body::empty()).unwrap()).await;
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        ((), String::from_utf8(bytes.to_vec()).unwrap())
    };
    assert!(
        metrics.contains(
            r#"dynamo_frontend_requests_total{endpoint="chat_completions",model="unknown",request_type="unary",status="error"} 5"#
        ),
        "{metrics}"
    );
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_request_id_is_echoed() {
    let stack = stack(FrontendArgs::default(), Some(0.0)).await;
    let request = Request::post("/v1/chat/completions")
        .header(header::CONTENT_TYPE, "application/json")
        .header("x-request-id", "trace-me-42")
        .body(Body::from(chat(json!({"max_tokens": 1})).to_string()))
        .unwrap();
    let response = stack.call(request).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-request-id"], "trace-me-42");
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_every_worker_is_busy_the_frontend_answers_503_with_retry_after() {
    let args = FrontendArgs {
        busy_threshold: Some(1),
        ..FrontendArgs::default()
    };
    // Slow enough that the first request is still running during the second.
    let stack = stack(args, Some(0.05)).await;
    let first = stack
        .call(post(
            "/v1/chat/completions",
            chat(json!({"max_tokens": 50, "stream": true})).to_string(),
        ))
        .await;
    assert_eq!(first.status(), StatusCode::OK);
    let (status, headers, body) = stack.post("/v1/chat/completions", chat(json!({"max_tokens": 1}))).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(headers[header::RETRY_AFTER], "1");
    let error: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(error["error"]["code"], "overloaded");
    assert_eq!(
        stack
            .state
            .metrics
            .rejections
            .with_label_values(&["mock-model", "chat_completions"])
            .get(),
        1
    );
    drop(first);
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_cancels_the_request_in_the_engine() {
    let stack = stack(FrontendArgs::default(), Some(0.05)).await;
    let response = stack
        .call(post(
            "/v1/chat/completions",
            chat(json!({"max_tokens": 500, "stream": true})).to_string(),
        ))
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert!(first.is_data());
    let engine = stack.worker().engine.clone();
    assert_eq!(engine.load().running, 1);
    let dropped = tokio::time::Instant::now();
    drop(body);
    while engine.stats().cancelled == 0 {
        assert!(
            dropped.elapsed() < Duration::from_secs(5),
            "the engine never saw the cancel"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // The issue's invariant: a client's cancel reaches the engine within 100 ms.
    let latency = dropped.elapsed();
    println!("the cancel reached the engine in {latency:?}");
    assert!(
        latency < Duration::from_millis(100),
        "the cancel took {latency:?} to reach the engine"
    );
    assert_eq!(engine.load().running, 0);
    assert_eq!(engine.load().active_blocks, 0, "blocks freed at once");
    assert_eq!(stack.state.metrics.disconnected.get(), 1);
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_disappears_when_its_last_worker_leaves() {
    let mut stack = stack(FrontendArgs::default(), Some(0.0)).await;
    assert_eq!(stack.get("/v1/models").await.1["data"][0]["id"], "mock-model");
    let (runtime, _worker) = stack.worker.take().unwrap();
    runtime.shutdown().await;
    eventually("the model to leave the list", || stack.state.models.list().is_empty()).await;
    assert_eq!(stack.get("/v1/models").await.1["data"], json!([]));
    assert_eq!(stack.get("/health").await.0, StatusCode::SERVICE_UNAVAILABLE);
    let (status, _, _) = stack.post("/v1/chat/completions", chat(json!({}))).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_wait_queue_a_busy_fleet_delays_a_request_instead_of_refusing_it() {
    let args = FrontendArgs {
        busy_threshold: Some(1),
        router_max_wait: Duration::from_secs(5),
        ..FrontendArgs::default()
    };
    let stack = stack(args, Some(1.0)).await;
    let first = stack
        .call(post(
            "/v1/chat/completions",
            chat(json!({"max_tokens": 10, "stream": true})).to_string(),
        ))
        .await;
    assert_eq!(first.status(), StatusCode::OK);
    let reader = tokio::spawn(async move { first.into_body().collect().await.unwrap() });
    let (status, _, body) = stack.post("/v1/chat/completions", chat(json!({"max_tokens": 1}))).await;
    assert_eq!(status, StatusCode::OK, "the request waited for the worker: {body}");
    reader.await.unwrap();
    assert_eq!(
        stack
            .state
            .metrics
            .rejections
            .with_label_values(&["mock-model", "chat_completions"])
            .get(),
        0
    );
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_longer_than_the_context_gets_400_even_when_streaming() {
    let stack = stack(FrontendArgs::default(), Some(0.0)).await;
    let long = "word ".repeat(9000);
    let body = json!({"model": "mock-model", "prompt": long, "stream": true});
    let (status, _, body) = stack.post("/v1/completions", body).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body.contains("context length"), "{body}");
    stack.shutdown().await;
}

/// Two workers, each on its own runtime, behind one frontend.
async fn two_worker_stack(speedup_ratio: f64) -> (Router, FrontendState, Vec<(Runtime, MockerWorker)>, Runtime) {
    let registry = MemRegistry::new();
    let mut workers = Vec::new();
    for _ in 0..2 {
        let runtime = Runtime::new(RuntimeConfig::local());
        let args = MockerArgs {
            speedup_ratio,
            ..MockerArgs::default()
        };
        let worker = switchyard_mocker_worker::serve(&drt(&runtime, &registry), &args)
            .await
            .unwrap();
        workers.push((runtime, worker));
    }
    let frontend_runtime = Runtime::new(RuntimeConfig::local());
    let state = FrontendState::new(&drt(&frontend_runtime, &registry), &FrontendArgs::default())
        .await
        .unwrap();
    eventually("both workers known", || {
        state.models.get("mock-model").is_some_and(|m| m.cards.len() == 2)
    })
    .await;
    (router(state.clone()), state, workers, frontend_runtime)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_whose_worker_dies_continues_on_another_worker_without_losing_or_repeating_text() {
    let (app, state, mut workers, frontend_runtime) = two_worker_stack(1.0).await;
    let body = chat(json!({"max_tokens": 60, "stream": true})).to_string();
    let response = app.clone().oneshot(post("/v1/chat/completions", body)).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    // Read a few chunks, then stop the worker that is answering.
    let mut text = String::new();
    for _ in 0..5 {
        let frame = body.frame().await.unwrap().unwrap();
        text.push_str(std::str::from_utf8(frame.data_ref().unwrap()).unwrap());
    }
    let busy = workers
        .iter()
        .position(|(_, w)| w.engine.load().running == 1)
        .expect("one worker is answering");
    let (runtime, _) = workers.remove(busy);
    runtime.stop().await;
    while let Some(frame) = body.frame().await {
        text.push_str(std::str::from_utf8(frame.unwrap().data_ref().unwrap()).unwrap());
    }
    let (events, done) = sse_events(&text);
    assert!(done, "the client's stream ended normally: {text}");
    let words: String = events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(
        words.split_whitespace().count(),
        60,
        "no word lost or repeated: {words:?}"
    );
    assert_eq!(events[events.len() - 1]["choices"][0]["finish_reason"], "length");
    assert_eq!(
        state
            .metrics
            .migrations
            .with_label_values(&["mock-model", "ongoing_request"])
            .get(),
        1
    );
    assert_eq!(workers[0].1.engine.stats().completed, 1, "the other worker finished it");
    workers[0].0.shutdown().await;
    frontend_runtime.shutdown().await;
}

/// Garbage, truncated and bit-flipped bodies get 4xx answers (or a normal
/// answer when the mutation left a valid request), never a 5xx or a panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_bodies_get_client_errors_never_server_errors() {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    const INPUTS: usize = 1_500;
    let stack = stack(
        FrontendArgs {
            body_limit_mb: 1,
            ..FrontendArgs::default()
        },
        Some(0.0),
    )
    .await;
    let valid = chat(json!({"max_tokens": 2, "temperature": 0.5, "stop": ["x"]}))
        .to_string()
        .into_bytes();
    let mut rng = StdRng::seed_from_u64(11);
    let mut statuses = std::collections::BTreeMap::new();
    for i in 0..INPUTS {
        let body: Vec<u8> = match i % 3 {
            0 => (0..rng.random_range(0..300)).map(|_| rng.random()).collect(),
            1 => valid[..rng.random_range(0..valid.len())].to_vec(),
            _ => {
                let mut flipped = valid.clone();
                for _ in 0..rng.random_range(1..4) {
                    let at = rng.random_range(0..flipped.len());
                    flipped[at] = rng.random();
                }
                flipped
            }
        };
        let path = if i % 2 == 0 {
            "/v1/chat/completions"
        } else {
            "/v1/completions"
        };
        let request = Request::post(path)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body.clone()))
            .unwrap();
        let response = stack.call(request).await;
        let status = response.status();
        let _ = response.into_body().collect().await;
        assert!(
            !status.is_server_error(),
            "input {i} got {status}: {:?}",
            String::from_utf8_lossy(&body)
        );
        *statuses.entry(status.as_u16()).or_insert(0) += 1;
    }
    println!("{INPUTS} malformed bodies: statuses {statuses:?}");
    assert!(statuses.get(&400).copied().unwrap_or(0) > INPUTS / 2, "{statuses:?}");
    stack.shutdown().await;
}

/// Sends raw bytes to the frontend's socket and reads until it closes (or
/// 5 s pass); returns the HTTP status of the answer, if one came.
async fn raw_exchange(address: std::net::SocketAddr, request: &[u8]) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut socket = tokio::net::TcpStream::connect(address).await.unwrap();
    // The server may close before it has read everything (a refused header).
    let _ = socket.write_all(request).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), socket.read_to_end(&mut answer)).await;
    let text = String::from_utf8_lossy(&answer);
    text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

/// A frontend on a real socket (no workers), with a short idle timeout.
async fn listening_frontend(idle_timeout_secs: f64) -> (Runtime, std::net::SocketAddr) {
    let runtime = Runtime::new(RuntimeConfig::local());
    let args = FrontendArgs {
        http_host: "127.0.0.1".into(),
        http_port: 0,
        http_idle_timeout: Duration::from_secs_f64(idle_timeout_secs),
        body_limit_mb: 1,
        ..FrontendArgs::default()
    };
    let frontend = crate::start(&drt(&runtime, &MemRegistry::new()), &args).await.unwrap();
    (runtime, frontend.address)
}

/// Malformed header sections get a 4xx from the HTTP layer or the handler,
/// never a 5xx, and the server goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_headers_get_client_errors_never_server_errors() {
    let (runtime, address) = listening_frontend(1.0).await;
    let long_value = "v".repeat(512 * 1024);
    let long_id = "r".repeat(10_000);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("a header line without a colon", b"GET /live HTTP/1.1\r\nHost a\r\n\r\n".to_vec()),
        ("a control byte in a header name", b"GET /live HTTP/1.1\r\nHost: a\r\nBad\x01Name: v\r\n\r\n".to_vec()),
        ("a NUL byte in a header value", b"GET /live HTTP/1.1\r\nHost: a\r\nX-A: a\x00b\r\n\r\n".to_vec()),
        ("a 512 KiB header value", format!("GET /live HTTP/1.1\r\nHost: a\r\nX-A: {long_value}\r\n\r\n").into_bytes()),
        ("a non-numeric Content-Length", b"POST /v1/completions HTTP/1.1\r\nHost: a\r\nContent-Length: abc\r\n\r\n".to_vec()),
        (
            "two different Content-Lengths",
            b"POST /v1/completions HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nContent-Length: 7\r\n\r\n{}".to_vec(),
        ),
        (
            "a broken chunked body",
            b"POST /v1/completions HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n".to_vec(),
        ),
        (
            "a body that is not JSON by its Content-Type",
            b"POST /v1/completions HTTP/1.1\r\nHost: a\r\nContent-Type: application/xml\r\nContent-Length: 2\r\n\r\n<>".to_vec(),
        ),
        (
            "a Content-Type with invalid bytes",
            b"POST /v1/completions HTTP/1.1\r\nHost: a\r\nContent-Type: application/\xffjson\r\nContent-Length: 2\r\n\r\n{}".to_vec(),
        ),
        (
            "a 10,000-character request id",
            format!("POST /v1/completions HTTP/1.1\r\nHost: a\r\nX-Request-Id: {long_id}\r\nContent-Length: 2\r\n\r\n{{}}").into_bytes(),
        ),
    ];
    let mut seen = Vec::new();
    for (what, request) in &cases {
        let status = raw_exchange(address, request).await;
        if let Some(status) = status {
            assert!((400..500).contains(&status), "{what}: got {status}");
        }
        seen.push(format!("{what}: {status:?}"));
    }
    println!("malformed headers: {seen:#?}");
    let answered = seen.iter().filter(|line| line.contains("Some(4")).count();
    assert!(
        answered >= cases.len() - 1,
        "most get an answer, not just a closed socket: {seen:#?}"
    );
    assert_eq!(
        raw_exchange(address, b"GET /live HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").await,
        Some(200)
    );
    runtime.shutdown().await;
}

/// A client that sends nothing, stops half-way through its headers, or
/// never finishes its body is cut off at the idle timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_slow_clients_are_cut_off_at_the_idle_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (runtime, address) = listening_frontend(0.5).await;
    let silent = tokio::time::Instant::now();
    let mut socket = tokio::net::TcpStream::connect(address).await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), socket.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "an idle connection was still open after 10 s");
    println!("idle connection closed after {:?}", silent.elapsed());

    // Half a header section, then nothing: closed (hyper may answer 408 first).
    let status = raw_exchange(address, b"GET /live HTTP/1.1\r\nHost: a\r\n").await;
    assert!(status.is_none_or(|s| s == 408), "{status:?}");

    // Headers promising 100 bytes of body, then 10: 408 from the handler.
    let mut socket = tokio::net::TcpStream::connect(address).await.unwrap();
    socket
        .write_all(b"POST /v1/completions HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\":")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), socket.read_to_end(&mut answer)).await;
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("request_timeout"), "{text}");

    // A keep-alive connection idle after an answer is closed too.
    let mut socket = tokio::net::TcpStream::connect(address).await.unwrap();
    socket
        .write_all(b"GET /live HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), socket.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "an idle keep-alive connection was still open after 10 s");
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"));
    runtime.shutdown().await;
}

/// With NATS unreachable, a load-aware router cannot subscribe to load
/// reports; the model is served anyway, routed by the frontend's own counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_is_served_without_load_reports_when_the_event_plane_is_down() {
    let registry = MemRegistry::new();
    let worker_runtime = Runtime::new(RuntimeConfig::local());
    let args = MockerArgs {
        speedup_ratio: 0.0,
        ..MockerArgs::default()
    };
    let _worker = switchyard_mocker_worker::serve(&drt(&worker_runtime, &registry), &args)
        .await
        .unwrap();
    let unreachable_nats = RuntimeConfig::from_vars([
        ("DYN_DISCOVERY_BACKEND", "mem"),
        ("DYN_EVENT_PLANE", "nats"),
        ("NATS_SERVER", "nats://127.0.0.1:1"),
    ])
    .unwrap();
    let frontend_runtime = Runtime::new(unreachable_nats);
    let state = FrontendState::new(&drt(&frontend_runtime, &registry), &FrontendArgs::default())
        .await
        .unwrap();
    let app = router(state);
    let response = app
        .oneshot(post("/v1/chat/completions", chat(json!({"max_tokens": 2})).to_string()))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    frontend_runtime.shutdown().await;
    worker_runtime.shutdown().await;
}
