//! The vLLM worker's model cards for KV-aware routers, against the mocker
//! standing in for `vllm serve`: managed children publish their KV events
//! where the cards say, attached servers' cards name the given endpoints,
//! and mistakes in the flags stop the worker before anything starts.

use super::{mocker_as_vllm, path_with, run_to_end, start_fake_vllm_server};
use serde_json::{Value, json};
use std::path::Path;
use std::time::Duration;
use switchyard_kv_events::{Delivery, SubscriberConfig, subscribe};
use switchyard_kv_router::events::KvEvent;
use switchyard_test_support::free_port;
use switchyard_test_support::switchyard::{self, START_DEADLINE};
use switchyard_test_support::worker_process::WorkerProcess;
use tokio::time::Instant;

/// Every model card in a `file` discovery directory.
fn cards(dir: &Path) -> Vec<Value> {
    fn walk(dir: &Path, out: &mut Vec<Value>) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, out);
            } else if !entry.file_name().to_string_lossy().starts_with('.')
                && let Ok(text) = std::fs::read_to_string(&path)
                && let Ok(card) = serde_json::from_str::<Value>(&text)
                && card.get("context_length").is_some()
            {
                out.push(card);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, &mut out);
    out
}

/// Waits until `count` cards are registered in `dir`, and returns them.
async fn wait_for_cards(dir: &Path, count: usize) -> Vec<Value> {
    let started = Instant::now();
    loop {
        let found = cards(dir);
        if found.len() == count {
            return found;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{} cards, wanted {count}",
            found.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn discovery_dir() -> (std::path::PathBuf, String) {
    let dir = std::env::temp_dir().join(format!("switchyard-vllm-kv-{:016x}", rand::random::<u64>()));
    let text = dir.to_str().unwrap().to_string();
    (dir, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vllm_managed_children_publish_kv_events_where_their_cards_say() {
    let fake = mocker_as_vllm();
    let path = path_with(&fake);
    let (dir, dir_text) = discovery_dir();
    let env = [
        ("DYN_DISCOVERY_BACKEND", "file"),
        ("DYN_FILE_KV", dir_text.as_str()),
        // The children's own log lines show in the worker's at debug.
        ("DYN_LOG", "info,switchyard_vllm=debug"),
        ("DYN_MOCKER_SPEEDUP_RATIO", "0"),
        ("PATH", path.as_str()),
    ];
    let worker = WorkerProcess::start(
        switchyard::binary(),
        &["worker", "vllm", "--managed", "--model", "m"],
        &env,
        "vllm worker serving",
        START_DEADLINE,
    );
    let card = wait_for_cards(&dir, 1).await.remove(0);
    assert_eq!(card["capacity"]["kv_cache_block_size"], 16, "vLLM's default: {card}");
    let events = &card["kv_events"];
    assert_eq!(events["topic"], "kv-events", "{card}");
    let endpoint = events["endpoint"].as_str().expect("the card names the event endpoint");
    let replay = events["replay_endpoint"].as_str().expect("and the replay endpoint");
    assert!(endpoint.starts_with("tcp://") && replay.starts_with("tcp://"), "{card}");
    assert!(!endpoint.contains('*'), "routers connect to a host, not *: {endpoint}");
    // The child was told to publish on that port, bound as vLLM binds: on every interface.
    let port = endpoint.rsplit(':').next().unwrap();
    let log = worker.log();
    assert!(log.contains("--enable-prefix-caching"), "{log}");
    assert!(
        log.contains(&format!("tcp://0.0.0.0:{port}")),
        "the stand-in publishes on the card's port:\n{log}"
    );

    let (sink, mut deliveries) = tokio::sync::mpsc::channel(64);
    let stop = tokio_util::sync::CancellationToken::new();
    let _subscription = subscribe(
        SubscriberConfig {
            replay_endpoint: Some(replay.to_string()),
            topic: "kv-events".to_string(),
            ..SubscriberConfig::new(endpoint)
        },
        sink,
        stop.clone(),
    )
    .unwrap();
    let child = log
        .lines()
        .find(|line| line.contains("started vllm"))
        .and_then(|line| line.split("port=").nth(1)?.split_whitespace().next())
        .expect("the worker logged the child's port")
        .to_string();
    let prompt: String = (0..200).map(|i| format!("word{i} ")).collect();
    let started = Instant::now();
    let stored = loop {
        // PUB drops what is sent before the subscription is connected: ask
        // again until a store is seen, with a fresh prompt each time — fresh
        // at its start, or its blocks would already be cached and stored
        // no more (a loaded machine can lose the first request's events).
        let answer = reqwest::Client::new()
            .post(format!("http://127.0.0.1:{child}/v1/completions"))
            .json(
                &json!({"model": "m", "prompt": format!("{} {prompt}", started.elapsed().as_nanos()), "max_tokens": 2}),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200);
        let waited = tokio::time::timeout(Duration::from_millis(500), async {
            while let Some(delivery) = deliveries.recv().await {
                if let Delivery::Batch { batch, .. } = delivery
                    && let Some(stored) = batch.events.iter().find_map(|event| match event {
                        KvEvent::BlockStored(stored) => Some(stored.clone()),
                        _ => None,
                    })
                {
                    return Some(stored);
                }
            }
            None
        })
        .await;
        if let Ok(Some(stored)) = waited {
            break stored;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no BlockStored from {endpoint}"
        );
    };
    assert_eq!(stored.block_size, 16, "{stored:?}");
    assert!(!stored.block_hashes.is_empty());
    stop.cancel();
    drop(worker);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&fake);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vllm_attach_cards_name_the_given_kv_event_endpoints_block_size_and_tokenizer() {
    let port = free_port();
    let _vllm = start_fake_vllm_server(port, "m");
    let url = format!("http://127.0.0.1:{port}");
    let (dir, dir_text) = discovery_dir();
    let tokenizer = dir.join("model");
    std::fs::create_dir_all(&tokenizer).unwrap();
    std::fs::write(tokenizer.join("tokenizer.json"), "{}").unwrap();
    let env = [
        ("DYN_DISCOVERY_BACKEND", "file"),
        ("DYN_FILE_KV", dir_text.as_str()),
        ("DYN_LOG", "info"),
    ];
    let worker = WorkerProcess::start(
        switchyard::binary(),
        &[
            "worker",
            "vllm",
            "--attach",
            &url,
            "--model",
            "m",
            "--kv-events-endpoint",
            "tcp://10.0.0.7:5557",
            "--kv-events-replay-endpoint",
            "tcp://10.0.0.7:5558",
            "--kv-events-topic",
            "kv-events",
            "--kv-cache-block-size",
            "32",
            "--tokenizer-dir",
            tokenizer.to_str().unwrap(),
        ],
        &env,
        "vllm worker serving",
        START_DEADLINE,
    );
    let card = wait_for_cards(&dir, 1).await.remove(0);
    assert_eq!(
        card["kv_events"],
        json!({"endpoint": "tcp://10.0.0.7:5557", "replay_endpoint": "tcp://10.0.0.7:5558", "topic": "kv-events"})
    );
    assert_eq!(card["capacity"]["kv_cache_block_size"], 32);
    assert_eq!(
        card["tokenizer"],
        json!({"kind": "hf_dir", "path": std::fs::canonicalize(&tokenizer).unwrap().to_str().unwrap()})
    );
    drop(worker);
    let _ = std::fs::remove_dir_all(&dir);

    // Without the flags: no events in the card (routers use their approximate index), vLLM's block size.
    let (dir, dir_text) = discovery_dir();
    let env = [
        ("DYN_DISCOVERY_BACKEND", "file"),
        ("DYN_FILE_KV", dir_text.as_str()),
        ("DYN_LOG", "info"),
    ];
    let _worker = WorkerProcess::start(
        switchyard::binary(),
        &["worker", "vllm", "--attach", &url, "--model", "m"],
        &env,
        "vllm worker serving",
        START_DEADLINE,
    );
    let card = wait_for_cards(&dir, 1).await.remove(0);
    assert!(
        card.get("kv_events").is_none() && card.get("tokenizer").is_none(),
        "{card}"
    );
    assert_eq!(card["capacity"]["kv_cache_block_size"], 16);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vllm_kv_flag_mistakes_stop_the_worker_with_what_is_wrong() {
    let mem = [("DYN_DISCOVERY_BACKEND", "mem")];
    let attach = [
        "worker",
        "vllm",
        "--model",
        "m",
        "--attach",
        "http://127.0.0.1:1,http://127.0.0.1:2",
    ];
    let cases: [(&[&str], &[&str]); 5] = [
        (
            &["--kv-events-endpoint", "tcp://h:5557"],
            &["--kv-events-endpoint names 1", "--attach names 2"],
        ),
        (
            &["--kv-events-endpoint", "tcp://h:1,tcp://*:5557"],
            &["\"tcp://*:5557\"", "tcp://HOST:PORT"],
        ),
        (
            &[
                "--kv-events-endpoint",
                "tcp://h:1,tcp://h:2",
                "--kv-events-replay-endpoint",
                "tcp://h:3",
            ],
            &["--kv-events-replay-endpoint names 1", "--kv-events-endpoint names 2"],
        ),
        (
            &["--tokenizer-dir", "/nonexistent/model"],
            &["/nonexistent/model", "tokenizer.json"],
        ),
        (&["--kv-cache-block-size", "0"], &["--kv-cache-block-size"]),
    ];
    for (flags, expected) in cases {
        let (ok, stderr) = run_to_end(&[&attach[..], flags].concat(), &mem).await;
        assert!(!ok, "{flags:?}");
        for text in expected {
            assert!(stderr.contains(text), "{flags:?}: {text:?} not in {stderr}");
        }
    }

    let (ok, stderr) = run_to_end(
        &[
            "worker",
            "vllm",
            "--managed",
            "--model",
            "m",
            "--kv-events-endpoint",
            "tcp://h:1",
        ],
        &mem,
    )
    .await;
    assert!(
        !ok && stderr.contains("--kv-events-endpoint is for --attach"),
        "{stderr}"
    );
    let (ok, stderr) = run_to_end(
        &[
            "worker",
            "vllm",
            "--managed",
            "--model",
            "m",
            "--vllm-arg=--kv-events-config",
            "--vllm-arg={}",
        ],
        &mem,
    )
    .await;
    assert!(!ok && stderr.contains("--kv-events false"), "{stderr}");

    // The stand-in reads vLLM's JSON as vLLM would, and says when it cannot.
    let (ok, stderr) = run_to_end(&["mocker-vllm", "serve", "m", "--kv-events-config", "{enable"], &mem).await;
    assert!(
        !ok && stderr.contains("--kv-events-config {enable is not a JSON object"),
        "{stderr}"
    );
}
