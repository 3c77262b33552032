//! One model name claimed by workers on two endpoints: a visible conflict,
//! decided by what discovery holds and not by the order cards arrive in,
//! and kept out altogether by `--model-namespace`.

use super::{chat, drt, eventually, frontend, post};
use crate::FrontendArgs;
use crate::http::{FrontendState, router};
use axum::http::StatusCode;
use http_body_util::BodyExt;
use serde_json::{Value, json};
use switchyard_mocker_worker::{MockerArgs, MockerWorker};
use switchyard_runtime::config::RuntimeConfig;
use switchyard_runtime::config::args::EndpointArgs;
use switchyard_runtime::discovery::mem::MemRegistry;
use switchyard_runtime::runtime::Runtime;
use tower::ServiceExt;

/// A fast mocker worker of `mock-model` registered in `namespace`.
async fn worker_in(registry: &MemRegistry, namespace: &str) -> (Runtime, MockerWorker) {
    let runtime = Runtime::new(RuntimeConfig::local());
    let args = MockerArgs {
        speedup_ratio: 0.0,
        kv_events: false,
        identity: EndpointArgs {
            namespace: namespace.into(),
            ..EndpointArgs::default()
        },
        ..MockerArgs::default()
    };
    let worker = switchyard_mocker_worker::serve(&drt(&runtime, registry), &args)
        .await
        .unwrap();
    (runtime, worker)
}

async fn health(state: &FrontendState) -> Value {
    let request = axum::http::Request::get("/health")
        .body(axum::body::Body::empty())
        .unwrap();
    let response = router(state.clone()).oneshot(request).await.unwrap();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&bytes).unwrap()
}

fn serving(state: &FrontendState) -> String {
    state
        .models
        .get("mock-model")
        .map(|m| m.endpoint_path)
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_endpoints_claiming_one_model_are_a_visible_conflict_decided_alike_in_any_order() {
    for first in ["dynamo", "a"] {
        let second = if first == "dynamo" { "a" } else { "dynamo" };
        let registry = MemRegistry::new();
        // The frontend is up before the workers, so the cards arrive one by
        // one in this order (as puts), and a second frontend started after
        // them sees both at once (as a snapshot).
        let (watching_runtime, watching) = frontend(&registry, FrontendArgs::default()).await;
        let (first_runtime, _first) = worker_in(&registry, first).await;
        eventually("the first worker", || watching.models.get("mock-model").is_some()).await;
        let (second_runtime, _second) = worker_in(&registry, second).await;
        eventually("the conflict", || watching.models.conflicts().len() == 1).await;
        let (restarted_runtime, restarted) = frontend(&registry, FrontendArgs::default()).await;
        // Its watcher reads the snapshot in the background.
        eventually("the restarted frontend's snapshot", || {
            restarted.models.conflicts().len() == 1
        })
        .await;
        for state in [&watching, &restarted] {
            assert_eq!(
                serving(state),
                "a/backend/generate",
                "the path that sorts first serves, {first} first"
            );
            let body = health(state).await;
            assert_eq!(
                body["model_conflicts"],
                json!([{"model": "mock-model", "serving": "a/backend/generate", "claimed_by": ["dynamo/backend/generate"]}]),
                "{body}"
            );
        }
        let scraped = switchyard_runtime::status::metrics(axum::extract::State(watching.status.clone())).await;
        let text = String::from_utf8(scraped.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
        assert!(text.contains("dynamo_frontend_model_conflicts 1"), "{text}");

        // The serving endpoint leaves: the other one serves, and the conflict is gone.
        let leaving = if first == "a" { &first_runtime } else { &second_runtime };
        leaving.shutdown().await;
        eventually("the other endpoint to take over", || {
            serving(&watching) == "dynamo/backend/generate"
        })
        .await;
        assert!(watching.models.conflicts().is_empty());
        let request = post("/v1/chat/completions", chat(json!({"max_tokens": 2})).to_string());
        let response = router(watching.clone()).oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        for runtime in [watching_runtime, restarted_runtime, first_runtime, second_runtime] {
            runtime.shutdown().await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_model_namespace_cards_from_elsewhere_are_not_even_considered() {
    let registry = MemRegistry::new();
    let (intruder_runtime, _intruder) = worker_in(&registry, "a").await;
    let (own_runtime, _own) = worker_in(&registry, "dynamo").await;
    let args = FrontendArgs {
        model_namespace: Some("dynamo".into()),
        ..FrontendArgs::default()
    };
    let (runtime, state) = frontend(&registry, args).await;
    assert_eq!(serving(&state), "dynamo/backend/generate");
    assert!(
        state.models.conflicts().is_empty(),
        "the other namespace is not a claimant"
    );
    own_runtime.shutdown().await;
    eventually("the model to leave with its worker", || {
        state.models.get("mock-model").is_none()
    })
    .await;
    runtime.shutdown().await;
    intruder_runtime.shutdown().await;
}
