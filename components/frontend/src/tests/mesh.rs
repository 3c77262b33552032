//! The mesh page's routes: the page's files come from the binary, the JSON
//! shows every worker with its load and state, each routed request leaves a
//! decision that can be looked up by its request id, and the settings (API
//! keys, `--mesh-page off`) are obeyed.

use super::kv::kv_stack;
use super::{Stack, chat, post, stack};
use crate::FrontendArgs;
use crate::http::{REQUEST_ID, ROUTE, WORKER_ID};
use crate::mesh::MeshPage;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use serde_json::{Value, json};

const KEY: &str = "sk-mesh-0123456789";

async fn fetch(stack: &Stack, path: &str, key: Option<&str>) -> (StatusCode, String, String) {
    let mut request = Request::get(path);
    if let Some(key) = key {
        request = request.header(header::AUTHORIZATION, format!("Bearer {key}"));
    }
    let response = stack.call(request.body(Body::empty()).unwrap()).await;
    let status = response.status();
    let content_type = response
        .headers()
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, content_type, String::from_utf8(body.to_vec()).unwrap())
}

async fn mesh_json(stack: &Stack) -> Value {
    let (status, _, body) = fetch(stack, "/api/mesh", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// A chat request with our own request id; returns the response's headers.
async fn routed(stack: &Stack, request_id: &str) -> axum::http::HeaderMap {
    let mut request = post("/v1/chat/completions", chat(json!({"max_tokens": 2})).to_string());
    request.headers_mut().insert(REQUEST_ID, request_id.parse().unwrap());
    let response = stack.call(request).await;
    assert_eq!(response.status(), StatusCode::OK);
    let headers = response.headers().clone();
    let _ = response.into_body().collect().await.unwrap();
    headers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_and_its_files_come_from_the_binary_and_load_nothing_from_elsewhere() {
    let stack = stack(FrontendArgs::default(), None).await;
    for (path, kind) in [
        ("/", "text/html"),
        ("/mesh.js", "text/javascript"),
        ("/mesh.css", "text/css"),
    ] {
        let (status, content_type, body) = fetch(&stack, path, None).await;
        assert_eq!(status, StatusCode::OK, "{path}");
        assert!(content_type.starts_with(kind), "{path}: {content_type}");
        assert!(!body.contains("https://"), "{path} must not reach out: {body}");
        assert!(!body.contains("src=\"http") && !body.contains("href=\"http"), "{path}");
    }
    let (_, _, page) = fetch(&stack, "/", None).await;
    assert!(page.contains("src=\"mesh.js\"") && page.contains("href=\"mesh.css\""));
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_json_lists_every_worker_and_a_kv_decision_is_found_by_request_id() {
    let (stack, workers) = kv_stack(2, 0.0, FrontendArgs::default()).await;
    let headers = routed(&stack, "mesh-kv-1").await;

    let mesh = mesh_json(&stack).await;
    assert_eq!(mesh["frontend"]["router_mode"], "kv");
    assert_eq!(mesh["frontend"]["discovery"], "mem");
    assert!(mesh["kv_events"]["gaps"].is_u64(), "{mesh}");
    let model = &mesh["models"][0];
    assert_eq!(model["name"], "mock-model");
    let mut shown: Vec<&str> = model["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap())
        .collect();
    shown.sort_unstable();
    let mut expected: Vec<String> = workers.iter().map(|(_, id)| format!("{id:x}")).collect();
    expected.sort_unstable();
    assert_eq!(shown, expected);
    let instance = &model["instances"][0];
    assert_eq!(instance["request_plane"], "tcp");
    assert_eq!(instance["ejected"], false);
    assert!(
        instance["inflight"].is_u64() && instance["kv_blocks"].is_u64(),
        "{instance}"
    );
    assert_eq!(mesh["decisions"][0]["request_id"], "mesh-kv-1");

    let (status, _, body) = fetch(&stack, "/api/mesh/decisions/mesh-kv-1", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let decision: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(decision["model"], "mock-model");
    assert_eq!(decision["mode"], "kv");
    assert_eq!(decision["worker"], headers[WORKER_ID].to_str().unwrap());
    assert_eq!(decision["explanation"], headers[ROUTE].to_str().unwrap());
    assert!(decision["blocks"].is_u64() && decision["cost"].is_f64(), "{decision}");
    assert!(
        decision["runner_up"]["worker"].is_string(),
        "two workers, so a runner-up: {decision}"
    );

    let (status, _, body) = fetch(&stack, "/api/mesh/decisions/never-sent", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert!(body.contains("never-sent"), "{body}");
    for (runtime, _) in workers {
        runtime.shutdown().await;
    }
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_based_decision_gives_the_load_and_an_ejection_shows_with_its_reason() {
    let stack = stack(FrontendArgs::default(), Some(0.0)).await;
    let headers = routed(&stack, "mesh-ll-1").await;
    let (_, _, body) = fetch(&stack, "/api/mesh/decisions/mesh-ll-1", None).await;
    let decision: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(decision["mode"], "least_loaded");
    assert_eq!(decision["worker"], headers[WORKER_ID].to_str().unwrap());
    assert_eq!(decision["load"], 1, "its own request counts: {decision}");
    assert!(
        decision["explanation"]
            .as_str()
            .unwrap()
            .starts_with("mode=least_loaded;worker=")
    );

    let model = stack.state.models.get("mock-model").unwrap();
    let worker = model.router.client().instance_ids()[0];
    model.router.eject(worker, "test: stream broke");
    let mesh = mesh_json(&stack).await;
    let instance = &mesh["models"][0]["instances"][0];
    assert_eq!(instance["id"], format!("{worker:x}"));
    assert_eq!(instance["ejected"], true, "{instance}");
    assert_eq!(instance["last_error"]["message"], "test: stream broke");
    assert_eq!(mesh["frontend"]["router_ejections"], 1, "{mesh}");
    assert_eq!(mesh["frontend"]["event_gaps"], 0);
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_api_keys_the_json_needs_the_key_and_the_page_files_do_not() {
    let args = FrontendArgs {
        api_keys: vec![KEY.into()],
        ..FrontendArgs::default()
    };
    let stack = stack(args, None).await;
    let (status, _, _) = fetch(&stack, "/", None).await;
    assert_eq!(status, StatusCode::OK, "the page itself holds no data");
    for path in ["/api/mesh", "/api/mesh/history", "/api/mesh/decisions/anything"] {
        let (status, _, body) = fetch(&stack, path, None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}: {body}");
        let (status, _, _) = fetch(&stack, path, Some("sk-wrong")).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}");
    }
    let (status, _, _) = fetch(&stack, "/api/mesh", Some(KEY)).await;
    assert_eq!(status, StatusCode::OK);
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_page_off_serves_none_of_it() {
    let args = FrontendArgs {
        mesh_page: MeshPage::Off,
        ..FrontendArgs::default()
    };
    let stack = stack(args, None).await;
    for path in [
        "/",
        "/mesh.js",
        "/api/mesh",
        "/api/mesh/history",
        "/api/mesh/decisions/x",
    ] {
        let (status, _, _) = fetch(&stack, path, None).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
    }
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_load_history_is_sampled_each_second_and_read_incrementally() {
    let stack = stack(FrontendArgs::default(), Some(0.0)).await;
    let worker = stack
        .state
        .models
        .get("mock-model")
        .unwrap()
        .router
        .client()
        .instance_ids()[0];
    let history = |since: Option<u64>| {
        let path = since.map_or("/api/mesh/history".to_string(), |s| {
            format!("/api/mesh/history?since={s}")
        });
        let stack = &stack;
        async move {
            let (status, _, body) = fetch(stack, &path, None).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            serde_json::from_str::<Value>(&body).unwrap()
        }
    };
    // The first sample is taken at start, the next a second later.
    let mut all = history(None).await;
    for _ in 0..40 {
        if all["samples"].as_array().unwrap().len() >= 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        all = history(None).await;
    }
    let samples = all["samples"].as_array().unwrap();
    assert!(samples.len() >= 2, "{all}");
    assert_eq!(all["step_ms"], 1000);
    assert_eq!(samples[0]["loads"][format!("{worker:x}")], 0, "{all}");
    let first = samples[0]["at_ms"].as_u64().unwrap();
    let newer = history(Some(first)).await;
    assert_eq!(
        newer["samples"].as_array().unwrap().len(),
        samples.len() - 1,
        "only those after `since`"
    );
    let (status, _, body) = fetch(&stack, "/api/mesh/history?since=yesterday", None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    stack.shutdown().await;
}
