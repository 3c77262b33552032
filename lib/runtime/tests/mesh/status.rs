//! The status server as Kubernetes probes and Prometheus see it: every route
//! through `router(state)` with `oneshot`, readiness across an endpoint's
//! life, canaries on healthy and stalled streams, metrics that move with
//! real requests, promtool on a scrape taken under load, and one real socket.

use super::{DEADLINE, Ticker, client, collect, process, serve, wait_until};
use axum::body::Body;
use axum::http::{Request, StatusCode};
use futures::StreamExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;
use switchyard_runtime::discovery::mem::MemRegistry;
use switchyard_runtime::distributed::DistributedRuntime;
use switchyard_runtime::engine::{AsyncEngine, Context, ResponseStream};
use switchyard_runtime::error::RequestError;
use switchyard_runtime::routing::RouterMode;
use switchyard_runtime::routing::push_router::PushRouter;
use switchyard_runtime::status::router;
use tower::ServiceExt;

/// GETs `path` from `drt`'s status routes: status code and body.
async fn get(drt: &DistributedRuntime, path: &str) -> (StatusCode, String) {
    let app = router(drt.status_state(), drt.runtime().config().system());
    let response = app
        .oneshot(Request::get(path).body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let body = axum::body::to_bytes(response.into_body(), 1 << 24).await.unwrap();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

async fn get_json(drt: &DistributedRuntime, path: &str) -> (StatusCode, serde_json::Value) {
    let (status, body) = get(drt, path).await;
    (
        status,
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path} is not JSON ({e}): {body}")),
    )
}

#[tokio::test]
async fn before_any_endpoint_health_follows_the_starting_status_and_live_is_up() {
    let registry = MemRegistry::new();
    let worker = process(&registry, &[]);
    let (status, body) = get_json(&worker, "/health").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["status"], "notready");
    assert!(body["uptime_seconds"].as_f64().is_some(), "{body}");
    assert_eq!(get(&worker, "/live").await.0, StatusCode::OK);

    let ready_first = process(&registry, &[("DYN_SYSTEM_STARTING_HEALTH_STATUS", "ready")]);
    assert_eq!(get(&ready_first, "/health").await.0, StatusCode::OK);
}

#[tokio::test]
async fn custom_probe_paths_replace_the_defaults() {
    let registry = MemRegistry::new();
    let drt = process(
        &registry,
        &[
            ("DYN_SYSTEM_HEALTH_PATH", "/readyz"),
            ("DYN_SYSTEM_LIVE_PATH", "/livez"),
            ("DYN_SYSTEM_STARTING_HEALTH_STATUS", "ready"),
        ],
    );
    assert_eq!(get(&drt, "/readyz").await.0, StatusCode::OK);
    assert_eq!(get(&drt, "/livez").await.0, StatusCode::OK);
    assert_eq!(get(&drt, "/health").await.0, StatusCode::NOT_FOUND);
    assert_eq!(get(&drt, "/live").await.0, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_endpoint_lifecycle_with_fully_qualified_names() {
    let registry = MemRegistry::new();
    let worker = process(&registry, &[("DYN_WORKER_GRACEFUL_SHUTDOWN_TIMEOUT", "10s")]);
    let generate = serve(&worker, "generate", Ticker(Duration::from_millis(20))).await;
    // Another component's `generate` must not collide with this one.
    worker
        .namespace("demo")
        .unwrap()
        .component("prefill")
        .unwrap()
        .endpoint("generate")
        .endpoint_builder()
        .handler(Ticker(Duration::ZERO))
        .spawn()
        .await
        .unwrap();
    let (status, body) = get_json(&worker, "/health").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "ready");
    assert_eq!(
        body["endpoints"],
        serde_json::json!({"demo/backend/generate": "ready", "demo/prefill/generate": "ready"})
    );
    let (_, metadata) = get_json(&worker, "/metadata").await;
    assert_eq!(metadata["endpoints"].as_array().unwrap().len(), 2, "{metadata}");
    assert_eq!(metadata["instance_id"], format!("{:x}", worker.instance_id()));

    // Draining: notready (503) while the in-flight stream finishes; still live.
    let caller = process(&registry, &[]);
    let router = PushRouter::<u64, u64>::from_client(client(&caller, "generate").await, RouterMode::RoundRobin)
        .await
        .unwrap();
    let mut stream = router.generate(20.into()).await.unwrap();
    assert_eq!(stream.next().await.unwrap().unwrap(), 0);
    generate.stop();
    let worker_ref = worker.clone();
    wait_until("the draining endpoint is notready", || {
        worker_ref.health().is_ready("demo/backend/generate") == Some(false)
    })
    .await;
    let (status, body) = get_json(&worker, "/health").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["endpoints"]["demo/backend/generate"], "notready");
    assert_eq!(get(&worker, "/live").await.0, StatusCode::OK, "draining is not dead");
    assert!(collect(stream).await.1.is_none());
    generate.wait().await;

    // Drained: gone from the report; the other endpoint is ready again.
    let (status, body) = get_json(&worker, "/health").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body["endpoints"].get("demo/backend/generate").is_none());

    // Stopping: not live any more.
    worker.runtime().stop().await;
    assert_eq!(get(&worker, "/live").await.0, StatusCode::SERVICE_UNAVAILABLE);
}

/// Streams two items for real requests; for canaries, stalls after the first
/// item while `stall` is set, and counts the canaries it saw.
#[derive(Clone, Default)]
struct Flaky {
    stall: Arc<AtomicBool>,
    canaries: Arc<AtomicUsize>,
}

#[async_trait::async_trait]
impl AsyncEngine<String, String> for Flaky {
    async fn generate(&self, request: Context<String>) -> Result<ResponseStream<String>, RequestError> {
        let canary = request.id().starts_with("canary-");
        if canary {
            self.canaries.fetch_add(1, Ordering::SeqCst);
        }
        let stall = canary && self.stall.load(Ordering::SeqCst);
        let first = futures::stream::iter([Ok("one".to_string())]);
        let rest = futures::stream::once(async move {
            if stall {
                futures::future::pending::<()>().await;
            }
            Ok("two".to_string())
        });
        Ok(Box::pin(first.chain(rest)))
    }
}

async fn serve_flaky(drt: &DistributedRuntime, engine: Flaky) {
    drt.namespace("demo")
        .unwrap()
        .component("backend")
        .unwrap()
        .endpoint("flaky")
        .endpoint_builder()
        .handler(engine)
        .health_check_payload("ping".to_string())
        .spawn()
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_whose_stream_stalls_after_one_item_turns_the_endpoint_notready_until_one_passes() {
    let registry = MemRegistry::new();
    let worker = process(
        &registry,
        &[
            ("DYN_HEALTH_CHECK_ENABLED", "true"),
            ("DYN_CANARY_WAIT_TIME", "100ms"),
            ("DYN_HEALTH_CHECK_REQUEST_TIMEOUT", "300ms"),
        ],
    );
    let engine = Flaky::default();
    serve_flaky(&worker, engine.clone()).await;
    let health = worker.health().clone();
    // Starts notready (the default starting status) and turns ready on the first check.
    wait_until("the first canary passed", || {
        health.is_ready("demo/backend/flaky") == Some(true)
    })
    .await;

    engine.stall.store(true, Ordering::SeqCst);
    wait_until("a stalled canary turned it notready", || {
        health.is_ready("demo/backend/flaky") == Some(false)
    })
    .await;
    assert_eq!(get(&worker, "/health").await.0, StatusCode::SERVICE_UNAVAILABLE);

    engine.stall.store(false, Ordering::SeqCst);
    wait_until("the next passing canary turned it ready", || {
        health.is_ready("demo/backend/flaky") == Some(true)
    })
    .await;
    assert_eq!(get(&worker, "/health").await.0, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_traffic_that_completes_postpones_the_canary() {
    let registry = MemRegistry::new();
    let worker = process(
        &registry,
        &[
            ("DYN_HEALTH_CHECK_ENABLED", "true"),
            ("DYN_CANARY_WAIT_TIME", "400ms"),
            ("DYN_HEALTH_CHECK_REQUEST_TIMEOUT", "1s"),
        ],
    );
    let engine = Flaky::default();
    serve_flaky(&worker, engine.clone()).await;
    let health = worker.health().clone();
    wait_until("the first canary passed", || {
        health.is_ready("demo/backend/flaky") == Some(true)
    })
    .await;
    let after_first = engine.canaries.load(Ordering::SeqCst);

    let caller = process(&registry, &[]);
    let router = PushRouter::<String, String>::from_client(client(&caller, "flaky").await, RouterMode::RoundRobin)
        .await
        .unwrap();
    // Busy for 1.2 s (three canary periods), a request every 100 ms.
    for _ in 0..12 {
        assert_eq!(
            collect(router.generate("hi".to_string().into()).await.unwrap()).await.0,
            ["one", "two"]
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        engine.canaries.load(Ordering::SeqCst),
        after_first,
        "a canary was sent to a busy endpoint"
    );
    // Idle again: the canary resumes, once per wait period and no faster.
    let canaries = engine.canaries.clone();
    wait_until("the canary resumed", || canaries.load(Ordering::SeqCst) > after_first).await;
    let resumed = canaries.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let more = canaries.load(Ordering::SeqCst) - resumed;
    assert!((1..=4).contains(&more), "{more} canaries in 1.2 s with a 400 ms wait");
}

fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|l| l.starts_with(name)).find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let rest = &series[name.len()..];
        if !(rest.is_empty() || rest.starts_with('{')) {
            return None;
        }
        labels
            .iter()
            .all(|(k, v)| series.contains(&format!("{k}=\"{v}\"")))
            .then(|| value.parse().ok())?
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_metrics_move_with_real_requests() {
    let registry = MemRegistry::new();
    let worker = process(&registry, &[]);
    serve(&worker, "ticker", Ticker(Duration::from_millis(5))).await;
    let tokens = worker
        .namespace("demo")
        .unwrap()
        .component("backend")
        .unwrap()
        .endpoint("ticker")
        .metrics()
        .create_counter("tokens_total", "Tokens the test says it made")
        .unwrap();
    tokens.inc_by(7);
    let caller = process(&registry, &[]);
    let router = PushRouter::<u64, u64>::from_client(client(&caller, "ticker").await, RouterMode::RoundRobin)
        .await
        .unwrap();
    for _ in 0..3 {
        assert_eq!(collect(router.generate(4.into()).await.unwrap()).await.0.len(), 4);
    }
    // One request dropped mid-stream: a cancellation.
    let mut stream = router.generate(1000.into()).await.unwrap();
    stream.next().await.unwrap().unwrap();
    drop(stream);
    let labels = [
        ("dynamo_namespace", "demo"),
        ("dynamo_component", "backend"),
        ("dynamo_endpoint", "ticker"),
        ("worker_id", &format!("{:x}", worker.instance_id())),
    ];
    let worker_ref = worker.clone();
    let scrape = || async { get(&worker_ref, "/metrics").await.1 };
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let text = loop {
        let text = scrape().await;
        if metric_value(&text, "dynamo_component_cancellation_total", &labels) == Some(1.0)
            && metric_value(&text, "dynamo_component_inflight_requests", &labels) == Some(0.0)
        {
            break text;
        }
        assert!(tokio::time::Instant::now() < deadline, "metrics never settled:\n{text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        metric_value(&text, "dynamo_component_requests_total", &labels),
        Some(4.0),
        "{text}"
    );
    assert_eq!(
        metric_value(&text, "dynamo_component_request_duration_seconds_count", &labels),
        Some(4.0)
    );
    assert!(metric_value(&text, "dynamo_component_request_bytes_total", &labels).unwrap() > 0.0);
    assert!(metric_value(&text, "dynamo_component_response_bytes_total", &labels).unwrap() > 0.0);
    assert_eq!(metric_value(&text, "dynamo_component_tokens_total", &labels), Some(7.0));
    assert!(
        metric_value(&text, "dynamo_component_uptime_seconds", &[]).is_some(),
        "{text}"
    );
    assert!(
        metric_value(&text, "dynamo_request_plane_connections_total", &[]).is_some(),
        "{text}"
    );

    // A request the engine cannot decode is an `invalid` error.
    let wrong = PushRouter::<String, u64>::from_client(client(&caller, "ticker").await, RouterMode::RoundRobin)
        .await
        .unwrap();
    assert!(
        collect(wrong.generate("x".to_string().into()).await.unwrap())
            .await
            .1
            .is_some()
    );
    let text = scrape().await;
    let mut with_type = labels.to_vec();
    with_type.push(("error_type", "invalid"));
    assert_eq!(
        metric_value(&text, "dynamo_component_errors_total", &with_type),
        Some(1.0),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_accepts_a_scrape_taken_under_load() {
    let registry = MemRegistry::new();
    let worker = process(&registry, &[]);
    serve(&worker, "ticker", Ticker(Duration::from_millis(2))).await;
    let caller = process(&registry, &[]);
    let router = Arc::new(
        PushRouter::<u64, u64>::from_client(client(&caller, "ticker").await, RouterMode::RoundRobin)
            .await
            .unwrap(),
    );
    let load: Vec<_> = (0..20)
        .map(|_| {
            let router = router.clone();
            tokio::spawn(async move { collect(router.generate(50.into()).await.unwrap()).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(30)).await;
    let (status, text) = get(&worker, "/metrics").await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        metric_value(&text, "dynamo_component_inflight_requests", &[]).unwrap_or(0.0) > 0.0,
        "not under load:\n{text}"
    );
    for task in load {
        task.await.unwrap();
    }

    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool is missing: run `make test`, which installs Debian's prometheus package");
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), text.as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success() && said.trim().is_empty(),
        "promtool: {said}\n--- scrape ---\n{text}"
    );
}

#[tokio::test]
async fn the_status_server_answers_on_a_real_socket() {
    let registry = MemRegistry::new();
    let drt = process(&registry, &[("DYN_SYSTEM_HOST", "127.0.0.1"), ("DYN_SYSTEM_PORT", "0")]);
    let address = drt.start_status_server().await.unwrap();
    assert_eq!(drt.status_server_address(), Some(address));
    assert_ne!(address.port(), 0);
    let mut socket = tokio::net::TcpStream::connect(address).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    socket
        .write_all(b"GET /live HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    tokio::time::timeout(DEADLINE, socket.read_to_string(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert!(
        answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200"),
        "{answer}"
    );
    drt.runtime().stop().await;
}
