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

/// POSTs `body` to `url`, expects 200, and returns its route's fields.
async fn routed(http: &reqwest::Client, url: &str, body: Value) -> HashMap<String, String> {
    let response = http.post(url).json(&body).send().await.unwrap();
    assert_eq!(response.status(), 200);
    route(&response)
}

/// A frontend metric's value (the first sample named `name`).
pub(crate) async fn metric(http: &reqwest::Client, url: &str, name: &str) -> f64 {
    let Ok(response) = http.get(format!("{url}/metrics")).send().await else {
        return 0.0;
    };
    let text = response.text().await.unwrap_or_default();
    text.lines()
        .find_map(|line| {
            let rest = line.strip_prefix(name)?;
            // Unlabelled, or labelled with the one model.
            let value = rest
                .strip_prefix(' ')
                .or_else(|| rest.strip_prefix("{model=\"mock-model\"} "))?;
            value.trim().parse().ok()
        })
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
    let post = async |body: Value| routed(&http, &format!("{url}/v1/chat/completions"), body).await;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_event_batch_is_seen_as_a_gap_and_recovered_by_replay_across_processes() {
    let dir = std::env::temp_dir().join(format!("switchyard-kv-gap-{:016x}", rand::random::<u64>()));
    let dir_text = dir.to_str().unwrap().to_string();
    let env = [
        ("DYN_DISCOVERY_BACKEND", "file"),
        ("DYN_FILE_KV", dir_text.as_str()),
        ("DYN_LOG", "info"),
    ];
    // Every second batch the engine publishes is kept for replay but never
    // sent, as if the network had lost it.
    let _worker = start_mocker(&["--speedup-ratio", "0", "--kv-events-withhold-every", "2"], &env);
    let (frontend, url) = start_frontend(&["--router-mode", "kv"], &env);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    until("the worker's KV event subscription", async || {
        frontend.log().contains("following KV events")
    })
    .await;

    let ask = |tag: &str| {
        let prompt: String = (0..300).map(|i| format!("{tag}{i} ")).collect();
        json!({"model": "mock-model", "max_tokens": 1, "prompt": prompt})
    };
    let post = async |body: Value| routed(&http, &format!("{url}/v1/completions"), body).await;
    // One batch per prompt (each is prefilled in one engine step): the
    // second prompt's batch is withheld, and the third's reveals the gap.
    let tags = ["alpha", "bravo", "charlie", "delta"];
    let mut blocks = HashMap::new();
    for tag in tags {
        let first = post(ask(tag)).await;
        blocks.insert(tag, first["blocks"].parse::<f64>().unwrap());
    }
    until("a gap seen and asked of the replay socket", async || {
        metric(&http, &url, "dynamo_frontend_kv_event_gaps_total").await >= 1.0
            && metric(&http, &url, "dynamo_frontend_kv_event_replays_total").await >= 1.0
    })
    .await;
    assert_eq!(
        metric(&http, &url, "dynamo_frontend_kv_event_lost_batches_total").await,
        0.0,
        "replay covered the gap"
    );
    // Past the predicted index's 5 s, only the engine's events can say the
    // prefixes are cached: every one of the first three is, the withheld
    // one included.
    tokio::time::sleep(Duration::from_secs(6)).await;
    for tag in &tags[..3] {
        let again = post(ask(tag)).await;
        assert_eq!(again["index"], "events", "{again:?}");
        let overlap: f64 = again["overlap"].parse().unwrap();
        assert!(overlap >= blocks[tag] - 1.0, "{tag}: {again:?}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
