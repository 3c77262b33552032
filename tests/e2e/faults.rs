//! The fault matrix: a frontend and two mocker workers as processes on file
//! discovery, under steady streaming load from a few clients, while one
//! fault strikes. The history of every request is checked afterwards by
//! [`history::check`](super::history::check): every request ended exactly
//! once, none was lost, every completed answer is byte for byte the answer
//! the cluster gave before the fault (migrated or not), failures carry an
//! error a client can act on, and no worker got a request more than one TTL
//! after it had left discovery.
//!
//! The chaos run (`chaos.rs`) does the same at scale, with many faults.

use crate::history::{self, Ending, Expectations, Load, Presence, Record, Tally, failures};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use switchyard_runtime::discovery::file::FileDiscovery;
use switchyard_test_support::etcd_server::EtcdServer;
use switchyard_test_support::free_port;
use switchyard_test_support::nats_server::NatsServer;
use switchyard_test_support::switchyard::{start_frontend, start_mocker};
use switchyard_test_support::worker_process::WorkerProcess;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Output tokens per request: long enough (~0.9 s) that faults hit streams mid-answer.
const TOKENS: usize = 120;
/// A request that has not ended this long after the load stopped is lost.
const LOST_AFTER: Duration = Duration::from_secs(20);
/// The registration lifetime of the file-discovery clusters: short, so that a
/// frozen worker leaves discovery while the scenario runs.
const TTL: Duration = Duration::from_secs(1);

struct Cluster {
    frontend: WorkerProcess,
    workers: Vec<WorkerProcess>,
    /// Each worker's status server (for `vllm:num_requests_running`).
    status_ports: Vec<u16>,
    url: String,
    dir: std::path::PathBuf,
    /// Whether the processes share file discovery in `dir` (else etcd).
    file_discovery: bool,
    /// Who was in discovery when (file discovery only).
    presence: Option<Presence>,
    /// Stops the presence watcher.
    stop: CancellationToken,
    /// The answer to [`chat`] before any fault: what every answer must be.
    answer: Vec<String>,
}

/// The one request of the fault matrix, streamed.
fn chat() -> serde_json::Value {
    json!({"model": "mock-model", "max_tokens": TOKENS, "stream": true,
           "messages": [{"role": "user", "content": "tell me about trains"}]})
}

impl Cluster {
    fn start(drain_seconds: &str, frontend_flags: &[&str]) -> Self {
        Self::start_with(drain_seconds, frontend_flags, &[])
    }

    /// With `extra_env` after the defaults (so it wins): another discovery backend, NATS.
    fn start_with(drain_seconds: &str, frontend_flags: &[&str], extra_env: &[(&str, &str)]) -> Self {
        let dir = std::env::temp_dir().join(format!("switchyard-faults-{:016x}", rand::random::<u64>()));
        let dir_text = dir.to_str().unwrap().to_string();
        let env = [
            ("DYN_DISCOVERY_BACKEND", "file"),
            ("DYN_FILE_KV", dir_text.as_str()),
            ("DYN_LOG", "info"),
            ("DYN_WORKER_GRACEFUL_SHUTDOWN_TIMEOUT", drain_seconds),
            ("DYN_LEASE_TTL", "1s"),
        ];
        let env: Vec<(&str, &str)> = env.iter().chain(extra_env).copied().collect();
        let status_ports: Vec<u16> = (0..2).map(|_| free_port()).collect();
        let workers = status_ports
            .iter()
            .map(|port| {
                let port = port.to_string();
                let mut env = env.clone();
                env.push(("DYN_SYSTEM_PORT", &port));
                start_mocker(&["--speedup-ratio", "1"], &env)
            })
            .collect();
        let (frontend, url) = start_frontend(frontend_flags, &env);
        Self {
            frontend,
            workers,
            status_ports,
            url,
            dir,
            file_discovery: !extra_env.iter().any(|(name, _)| *name == "DYN_DISCOVERY_BACKEND"),
            presence: None,
            stop: CancellationToken::new(),
            answer: Vec::new(),
        }
    }

    /// Waits until the frontend routes to both workers; on file discovery,
    /// starts recording who is in discovery.
    async fn ready(&mut self) {
        if self.file_discovery && self.presence.is_none() {
            let discovery = FileDiscovery::open(self.dir.clone(), TTL, TaskTracker::new(), self.stop.clone())
                .await
                .unwrap();
            self.presence = Some(Presence::watch(Arc::new(discovery), self.stop.clone()).await);
        }
        let started = Instant::now();
        loop {
            let ok = reqwest::get(format!("{}/health", self.url))
                .await
                .is_ok_and(|r| r.status() == 200);
            if ok {
                // Both workers' cards: /v1/models lists one model either way, so give discovery a beat.
                tokio::time::sleep(Duration::from_millis(300)).await;
                if self.answer.is_empty() {
                    self.answer.push(self.fault_free_answer().await);
                }
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the frontend never became ready"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The answer to [`chat`] while nothing is wrong.
    async fn fault_free_answer(&self) -> String {
        let history = history::History::default();
        history.lock().unwrap().push(Record::new(0));
        let ending = history::stream_chat(&reqwest::Client::new(), &self.url, &chat(), &history, 0).await;
        match ending {
            Ending::Completed { text, finished: true } if history.lock().unwrap()[0].violations.is_empty() => text,
            other => panic!("the fault-free request failed: {other:?} {:?}", history.lock().unwrap()),
        }
    }

    /// Checks `history` against the fault-free answer (and, on file
    /// discovery, who was in discovery) and prints its row of the table.
    async fn check(&self, scenario: &str, history: &[Record]) -> (Tally, u64) {
        let expected = Expectations {
            answers: &self.answer,
            presence: self.presence.as_ref(),
            ttl: TTL,
        };
        let tally = history::check(scenario, history, &expected);
        let migrated = self.migrations().await;
        println!(
            "| {scenario} | {} | {} | {migrated} | {} | {} |",
            tally.sent, tally.completed, tally.failed, tally.lost
        );
        (tally, migrated)
    }

    /// Requests running in worker `index`'s engine.
    async fn running(&self, index: usize) -> u64 {
        let url = format!("http://127.0.0.1:{}/metrics", self.status_ports[index]);
        let Ok(response) = reqwest::get(url).await else {
            return 0;
        };
        let text = response.text().await.unwrap_or_default();
        text.lines()
            .find(|l| l.starts_with("vllm:num_requests_running"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0) as u64
    }

    /// Waits until worker 0 is in the middle of answering, so the fault hits streams.
    async fn worker_zero_busy(&self) {
        let started = Instant::now();
        while self.running(0).await == 0 {
            assert!(started.elapsed() < Duration::from_secs(10), "worker 0 never got work");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn migrations(&self) -> u64 {
        let Ok(response) = reqwest::get(format!("{}/metrics", self.url)).await else {
            return 0;
        };
        let text = response.text().await.unwrap_or_default();
        text.lines()
            .filter(|l| l.starts_with("dynamo_frontend_model_migration_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop.cancel();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The cluster, ready, with four clients streaming for a while already.
async fn under_load(cluster: &mut Cluster) -> Load {
    cluster.ready().await;
    let load = Load::start(
        std::slice::from_ref(&cluster.url),
        4,
        Arc::new(vec![chat()]),
        0,
        LOST_AFTER,
    );
    // Mid-way through the second round of answers (one takes ~0.9 s), not at
    // the edge between two rounds, where every stream is about to finish.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    load
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_matrix_worker_kill_drain_freeze_and_frontend_drain() {
    println!("| fault | sent | completed | migrated | failed | lost |");
    println!("|---|---:|---:|---:|---:|---:|");

    // A worker killed outright mid-stream: its streams move to the other worker.
    let mut cluster = Cluster::start("30", &[]);
    let load = under_load(&mut cluster).await;
    cluster.worker_zero_busy().await;
    cluster.workers[0].signal("-KILL");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let history = load.finish().await;
    let (tally, migrated) = cluster.check("worker SIGKILL mid-stream", &history).await;
    assert_eq!(
        tally.failed,
        0,
        "a worker was left, so nothing may fail: {:?}",
        failures(&history)
    );
    assert!(migrated >= 1, "the killed worker's streams migrated");
    drop(cluster);

    // A worker drained with a short deadline: it leaves discovery, finishes
    // what it can, and the rest move on at the deadline.
    let mut cluster = Cluster::start("0.2", &[]);
    let load = under_load(&mut cluster).await;
    cluster.worker_zero_busy().await;
    cluster.workers[0].signal("-TERM");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let history = load.finish().await;
    let (tally, migrated) = cluster.check("worker SIGTERM (drain, 0.2 s deadline)", &history).await;
    let (_, drained_log) = cluster.workers.remove(0).wait(Duration::from_secs(5));
    let drained_log = format!("{drained_log}\n--- frontend ---\n{}", cluster.frontend.log());
    assert_eq!(
        tally.failed,
        0,
        "a worker was left, so nothing may fail: {:?}; the drained worker's log:\n{drained_log}",
        failures(&history)
    );
    assert!(
        migrated >= 1,
        "streams still running at the drain deadline migrated; the drained worker's log:\n{drained_log}"
    );
    drop(cluster);

    // A worker frozen (SIGSTOP) for longer than the stall deadline: its
    // streams go silent without closing, so after 1 s the frontend ejects it
    // and moves them; it is thawed (SIGCONT) later.
    let mut cluster = Cluster::start("30", &["--stream-stall-timeout-secs", "1"]);
    let load = under_load(&mut cluster).await;
    cluster.worker_zero_busy().await;
    cluster.workers[0].signal("-STOP");
    tokio::time::sleep(Duration::from_secs(3)).await;
    cluster.workers[0].signal("-CONT");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let history = load.finish().await;
    let (tally, migrated) = cluster
        .check("worker SIGSTOP 3 s (stall deadline 1 s), then SIGCONT", &history)
        .await;
    assert_eq!(
        tally.failed,
        0,
        "a worker was left, so nothing may fail: {:?}",
        failures(&history)
    );
    assert!(migrated >= 1, "the frozen worker's streams migrated");
    let departures = cluster.presence.as_ref().map_or(0, Presence::departures);
    assert!(
        departures >= 1,
        "the frozen worker left discovery after a TTL, so the no-work-after-leaving check had something to check"
    );
    drop(cluster);

    // The frontend drained: answers in flight finish; afterwards nobody
    // listens, so new requests fail to connect (no frontend was left).
    let mut cluster = Cluster::start("30", &[]);
    let load = under_load(&mut cluster).await;
    let in_flight_before = load.history.lock().unwrap().len();
    cluster.frontend.signal("-TERM");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let history = load.finish().await;
    let (tally, _) = cluster.check("frontend SIGTERM", &history).await;
    let cut_off: Vec<&Record> = history[..in_flight_before]
        .iter()
        .filter(|r| matches!(r.ending, Some(Ending::Failed(ref why)) if why != "transport"))
        .collect();
    assert!(
        cut_off.is_empty(),
        "requests already streaming were cut off: {cut_off:?}"
    );
    assert!(tally.completed >= 4, "the streams in flight at SIGTERM completed");
}

/// Discovery on etcd and the event plane on NATS, each stopped and restarted
/// under load. Requests do not go through either (the request plane is
/// TCP), so nothing may fail; the registrations must come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_matrix_etcd_and_nats_restarts() {
    println!("| fault | sent | completed | migrated | failed | lost |");
    println!("|---|---:|---:|---:|---:|---:|");
    let mut etcd = EtcdServer::start();
    let mut nats = NatsServer::start();
    let (etcd_url, nats_url) = (etcd.url(), nats.url());
    let env = [
        ("DYN_DISCOVERY_BACKEND", "etcd"),
        ("ETCD_ENDPOINTS", etcd_url.as_str()),
        ("NATS_SERVER", nats_url.as_str()),
        ("DYN_EVENT_PLANE", "nats"),
        ("DYN_LEASE_TTL", "1s"),
    ];
    let mut cluster = Cluster::start_with("30", &[], &env);

    // etcd down for three lease TTLs, then back.
    let load = under_load(&mut cluster).await;
    etcd.stop();
    tokio::time::sleep(Duration::from_secs(3)).await;
    etcd.restart();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let history = load.finish().await;
    let (tally, _) = cluster
        .check("etcd stopped 3 s (3 × lease TTL), restarted", &history)
        .await;
    let reasons: Vec<_> = history
        .iter()
        .filter_map(|r| r.ending.clone())
        .filter(|e| matches!(e, Ending::Failed(_)))
        .collect();
    assert_eq!(tally.failed, 0, "requests do not need etcd: {reasons:?}");
    // Both workers are registered again: the frontend still serves the model.
    let health = reqwest::get(format!("{}/health", cluster.url)).await.unwrap();
    assert_eq!(health.status(), 200, "the model is served after etcd came back");

    // NATS (load reports) restarted.
    let load = Load::start(
        std::slice::from_ref(&cluster.url),
        4,
        Arc::new(vec![chat()]),
        0,
        LOST_AFTER,
    );
    tokio::time::sleep(Duration::from_millis(1200)).await;
    nats.restart();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let history = load.finish().await;
    let (tally, _) = cluster.check("NATS restarted", &history).await;
    assert_eq!(tally.failed, 0, "requests do not need NATS");
}

/// Start order does not matter for the event plane: a worker and a frontend
/// started on etcd while their NATS event plane is down serve at once,
/// say so in `/health`, and start exchanging load reports when NATS comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_started_before_their_nats_event_plane_serve_and_catch_up() {
    let etcd = EtcdServer::start();
    let mut nats = NatsServer::start();
    nats.stop();
    let (etcd_url, nats_url) = (etcd.url(), nats.url());
    let status_port = free_port().to_string();
    let env = [
        ("DYN_DISCOVERY_BACKEND", "etcd"),
        ("ETCD_ENDPOINTS", etcd_url.as_str()),
        ("NATS_SERVER", nats_url.as_str()),
        ("DYN_EVENT_PLANE", "nats"),
    ];
    let mut worker_env = env.to_vec();
    worker_env.push(("DYN_SYSTEM_PORT", status_port.as_str()));
    let worker = start_mocker(&["--speedup-ratio", "0"], &worker_env);
    let (frontend, url) = start_frontend(&[], &env);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let health = async || -> serde_json::Value {
        let response = http.get(format!("http://127.0.0.1:{status_port}/health")).send().await;
        match response {
            Ok(response) => response.json().await.unwrap_or_default(),
            Err(_) => serde_json::Value::Null,
        }
    };
    let chat = json!({"model": "mock-model", "max_tokens": 3,
                      "messages": [{"role": "user", "content": "hello"}]});
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let response = http.post(format!("{url}/v1/chat/completions")).json(&chat).send().await;
        if response.is_ok_and(|r| r.status() == 200) {
            break;
        }
        assert!(Instant::now() < deadline, "no answer without NATS: {}", frontend.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before = health().await;
    assert_eq!(before["event_plane"], "connecting", "{before}");
    assert_eq!(before["status"], "ready", "it serves without its event plane: {before}");
    assert!(
        worker.log().contains("NATS event plane is unreachable"),
        "{}",
        worker.log()
    );

    nats.restart();
    let reported = async || -> bool {
        let Ok(response) = http.get(format!("{url}/api/mesh")).send().await else {
            return false;
        };
        let mesh: serde_json::Value = response.json().await.unwrap_or_default();
        mesh["models"][0]["instances"][0]["reported_load"].is_u64()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while health().await["event_plane"] != "connected" || !reported().await {
        assert!(
            Instant::now() < deadline,
            "NATS came up but the load reports did not flow: {}\n{}",
            health().await,
            worker.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
