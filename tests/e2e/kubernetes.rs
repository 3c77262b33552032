//! The `kubernetes` discovery backend end to end: a `switchyard worker
//! mocker` and a `switchyard frontend` as separate processes, each a "Pod"
//! with its downward-API identity, finding each other through the fake API
//! server (there is no cluster in CI) given to them as a kubeconfig. The test
//! plays the kubelet and the EndpointSlice controller: the worker's model is
//! served only while its Pod is ready.

use super::{Stack, chat};
use serde_json::{Value, json};
use std::time::Duration;
use switchyard_test_support::fake_api::FakeApiServer;
use switchyard_test_support::switchyard::{start_frontend, start_mocker};

const NAMESPACE: &str = "switchyard-e2e";

/// `/v1/models` lists the worker's model.
fn served(models: Value) -> bool {
    models["data"][0]["id"] == "mock-model"
}

/// `/v1/models` lists nothing.
fn gone(models: Value) -> bool {
    models["data"] == json!([])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_is_served_through_the_kubernetes_api_only_while_its_pod_is_ready() {
    let api = FakeApiServer::start().await.unwrap();
    let dir = std::env::temp_dir().join(format!("switchyard-e2e-kube-{:016x}", rand::random::<u64>()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
    let kubeconfig = kubeconfig.to_str().unwrap().to_string();
    let env = |pod: &str| -> Vec<(String, String)> {
        [
            ("DYN_DISCOVERY_BACKEND", "kubernetes"),
            ("DYN_EVENT_PLANE", "zmq"),
            ("KUBECONFIG", kubeconfig.as_str()),
            ("POD_NAME", pod),
            ("POD_NAMESPACE", NAMESPACE),
            ("POD_UID", &format!("uid-{pod}")),
            ("DYN_LOG", "info"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    };

    // The worker's Pod exists but is not ready yet.
    api.set_ready(NAMESPACE, "worker-a", false);
    let worker_env = env("worker-a");
    let worker_vars: Vec<(&str, &str)> = worker_env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let worker = start_mocker(&["--speedup-ratio", "0"], &worker_vars);
    let resource = api
        .worker_metadata(NAMESPACE, "worker-a")
        .expect("the worker wrote its resource");
    assert_eq!(resource["metadata"]["ownerReferences"][0]["uid"], "uid-worker-a");
    let keys: Vec<&str> = resource["spec"]["registrations"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["key"].as_str())
        .collect();
    assert!(
        keys.iter().any(|k| k.starts_with("v1/instances/")) && keys.iter().any(|k| k.starts_with("v1/models/")),
        "the worker's instance and model card are in its resource: {keys:?}"
    );

    let frontend_env = env("frontend-0");
    let frontend_vars: Vec<(&str, &str)> = frontend_env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let (frontend, url) = start_frontend(&[], &frontend_vars);
    let stack = Stack {
        _frontend: frontend,
        workers: vec![worker],
        worker_status: vec![],
        url,
        discovery_dir: dir,
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap(),
    };
    let (_, models) = stack.get("/v1/models").await;
    assert_eq!(
        models["data"],
        json!([]),
        "a worker whose Pod is not ready is not served"
    );

    // Ready: the frontend finds the model and answers.
    api.set_ready(NAMESPACE, "worker-a", true);
    stack.eventually("the model to appear", served, "/v1/models").await;
    let answer: Value = stack
        .post("/v1/chat/completions", &chat(4, false))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(answer["usage"]["completion_tokens"], 4, "{answer}");

    // The readiness probe fails: the model goes away; back when ready again.
    api.set_ready(NAMESPACE, "worker-a", false);
    stack.eventually("the model to disappear", gone, "/v1/models").await;
    api.set_ready(NAMESPACE, "worker-a", true);
    stack.eventually("the model to return", served, "/v1/models").await;

    // SIGTERM: the worker drains and deletes its own resource on the way out.
    stack.workers[0].signal("-TERM");
    stack.eventually("the model to disappear", gone, "/v1/models").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while api.worker_metadata(NAMESPACE, "worker-a").is_some() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the worker's resource outlived its process"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
