//! KV-aware routing over processes: a `--router-mode kv` frontend and two
//! mocker workers that publish their KV events on ZMQ, the frontend
//! subscribed to each engine directly.

use serde_json::{Value, json};
use std::collections::HashMap;
use std::time::Duration;
use switchyard_test_support::switchyard::{start_frontend, start_mocker};
use switchyard_test_support::worker_process::WorkerProcess;
use tokio::time::Instant;

/// The fields of an `x-switchyard-route` header.
fn route(response: &reqwest::Response) -> HashMap<String, String> {
    let text = response
        .headers()
        .get("x-switchyard-route")
        .expect("a KV-routed answer says why")
        .to_str()
        .unwrap();
    text.split(';')
        .filter_map(|field| field.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A frontend metric's value (the first sample named `name`).
async fn metric(http: &reqwest::Client, url: &str, name: &str) -> f64 {
    let Ok(response) = http.get(format!("{url}/metrics")).send().await else {
        return 0.0;
    };
    let text = response.text().await.unwrap_or_default();
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

async fn until(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let started = Instant::now();
    while !check().await {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_routing_follows_the_engines_events_across_processes() {
    let dir = std::env::temp_dir().join(format!("switchyard-kv-{:016x}", rand::random::<u64>()));
    let dir_text = dir.to_str().unwrap().to_string();
    let env = [
        ("DYN_DISCOVERY_BACKEND", "file"),
        ("DYN_FILE_KV", dir_text.as_str()),
        ("DYN_LOG", "info"),
        ("DYN_LEASE_TTL", "1s"),
    ];
    let workers: Vec<WorkerProcess> = (0..2).map(|_| start_mocker(&["--speedup-ratio", "0"], &env)).collect();
    let (frontend, url) = start_frontend(&["--router-mode", "kv"], &env);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    until("both workers' KV event subscriptions", async || {
        frontend.log().matches("following KV events").count() == 2
    })
    .await;

    let prompt: String = (0..500).map(|i| format!("warm{i} ")).collect();
    let ask = |suffix: &str| {
        json!({"model": "mock-model", "max_tokens": 2,
               "messages": [{"role": "user", "content": format!("{prompt}{suffix}")}]})
    };
    let post = async |body: Value| {
        let response = http
            .post(format!("{url}/v1/chat/completions"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        route(&response)
    };

    let first = post(ask("one")).await;
    assert_eq!(first["index"], "events", "{first:?}");
    assert_eq!(first["overlap"], "0");
    let blocks: f64 = first["blocks"].parse().unwrap();
    until("the warm engine's blocks in the frontend's index", async || {
        metric(&http, &url, "dynamo_frontend_kv_indexed_blocks").await >= blocks - 1.0
    })
    .await;
    assert!(metric(&http, &url, "dynamo_frontend_kv_events_total").await >= 1.0);

    let second = post(ask("two")).await;
    assert_eq!(
        second["worker"], first["worker"],
        "the warm worker holds the prefix: {second:?}"
    );
    assert!(second["overlap"].parse::<f64>().unwrap() >= blocks - 1.0, "{second:?}");
    assert_eq!(second["runner_up_overlap"], "0");

    // The warm worker dies: once its lease lapses its card leaves, its
    // blocks leave the index, and the prefix goes to the other worker.
    let warm = workers
        .iter()
        .position(|w| w.log().contains(&first["worker"]))
        .expect("the warm worker logged its instance id");
    workers[warm].signal("-KILL");
    until("the warm worker's blocks to leave the index", async || {
        metric(&http, &url, "dynamo_frontend_kv_indexed_blocks").await == 0.0
    })
    .await;
    let third = post(ask("three")).await;
    assert_ne!(third["worker"], first["worker"]);
    assert_eq!(third["overlap"], "0", "nobody holds the prefix now: {third:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
