//! The fault matrix: a frontend and two mocker workers as processes on file
//! discovery, under steady streaming load from a few clients, while one
//! fault strikes. A history of every request (sent, first token, how it
//! ended, the text it got) is checked afterwards: every request ended
//! exactly once, none was lost, completed answers have exactly the tokens
//! asked for (nothing repeated or dropped across a migration), failures
//! carry an error a client can act on, and no worker got a request more
//! than one TTL after it had left discovery (a discovery watcher in the test
//! records when each instance left and came back; the frontend names the
//! worker it routed to in `x-switchyard-worker-id`, and an answer without it
//! is itself a failure).
//!
//! The client reads every stream to its very end, so what it checks can
//! fail: a stream that ends twice (two `[DONE]`s, an error event after
//! `[DONE]`, text after the end), ends without saying how, or fails with no
//! message is a violation, recorded beside the ending and asserted by
//! [`check`]. The `checker_*` tests feed [`check`] bad histories and see it
//! fail.

use futures::StreamExt;
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use switchyard_runtime::discovery::file::FileDiscovery;
use switchyard_runtime::discovery::{Bucket, Discovery, Query, WatchEvent};
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

/// How one request ended.
#[derive(Debug, Clone, PartialEq)]
enum Ending {
    /// `[DONE]` with this many words and a finish reason.
    Completed { words: usize, finished: bool },
    /// An HTTP status, an SSE error event, or a transport failure.
    Failed(String),
    /// Still running when the checker gave up.
    Lost,
}

#[derive(Debug, Clone)]
struct Record {
    sent_at: Instant,
    /// The HTTP status of the answer, when one came.
    status: Option<u16>,
    /// The worker instance the frontend routed the request to.
    worker: Option<u64>,
    first_token: bool,
    ending: Option<Ending>,
    /// What the answer did that no answer may: ending twice, text after
    /// the end, ending without saying how, failing without a message.
    violations: Vec<String>,
}

impl Record {
    fn new() -> Self {
        Record {
            sent_at: Instant::now(),
            status: None,
            worker: None,
            first_token: false,
            ending: None,
            violations: Vec::new(),
        }
    }
}

/// Steady load: `clients` loops sending streaming chats until stopped.
struct Load {
    history: Arc<Mutex<Vec<Record>>>,
    stop: tokio_util::sync::CancellationToken,
    clients: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(url: String, clients: usize) -> Self {
        let history = Arc::new(Mutex::new(Vec::new()));
        let stop = tokio_util::sync::CancellationToken::new();
        let http = reqwest::Client::new();
        let clients = (0..clients)
            .map(|_| {
                let (history, stop, http, url) = (history.clone(), stop.clone(), http.clone(), url.clone());
                tokio::spawn(async move {
                    while !stop.is_cancelled() {
                        let index = {
                            let mut history = history.lock().unwrap();
                            history.push(Record::new());
                            history.len() - 1
                        };
                        let ending = tokio::time::timeout(LOST_AFTER, one(&http, &url, &history, index))
                            .await
                            .unwrap_or(Ending::Lost);
                        let failed = matches!(ending, Ending::Failed(_));
                        history.lock().unwrap()[index].ending = Some(ending);
                        if failed {
                            // A client backs off a little rather than spin on a dead address.
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                })
            })
            .collect();
        Self { history, stop, clients }
    }

    /// Stops sending and waits for every request in flight to end (or be declared lost).
    async fn finish(self) -> Vec<Record> {
        self.stop.cancel();
        for client in self.clients {
            client.await.unwrap();
        }
        self.history.lock().unwrap().clone()
    }
}

async fn one(http: &reqwest::Client, url: &str, history: &Arc<Mutex<Vec<Record>>>, index: usize) -> Ending {
    let body = json!({"model": "mock-model", "max_tokens": TOKENS, "stream": true,
                      "messages": [{"role": "user", "content": "tell me about trains"}]});
    let violation = |what: String| history.lock().unwrap()[index].violations.push(what);
    let response = match http.post(format!("{url}/v1/chat/completions")).json(&body).send().await {
        Ok(response) => response,
        Err(_) => return Ending::Failed("transport".into()),
    };
    let status = response.status();
    history.lock().unwrap()[index].status = Some(status.as_u16());
    if !status.is_success() {
        // A client acts on the status and OpenAI's error body.
        let body: serde_json::Value = response.json().await.unwrap_or_default();
        let message = body["error"]["message"].as_str().unwrap_or_default().to_string();
        if message.is_empty() {
            violation(format!("status {status} without an error message: {body}"));
        }
        return Ending::Failed(format!("{} {message}", status.as_u16()));
    }
    let worker = response
        .headers()
        .get("x-switchyard-worker-id")
        .and_then(|v| u64::from_str_radix(v.to_str().ok()?, 16).ok());
    if worker.is_none() {
        violation("an answer without x-switchyard-worker-id".into());
    }
    history.lock().unwrap()[index].worker = worker;
    let mut answer = Answer::default();
    let mut broken = false;
    let mut bytes = response.bytes_stream();
    while let Some(chunk) = bytes.next().await {
        let Ok(chunk) = chunk else {
            broken = true;
            break;
        };
        answer.feed(&String::from_utf8_lossy(&chunk));
        if answer.first_token {
            history.lock().unwrap()[index].first_token = true;
        }
    }
    let (ending, violations) = answer.finish(broken);
    history.lock().unwrap()[index].violations.extend(violations);
    ending
}

/// A streamed chat answer as the client reads it, to its very end: its
/// text, and every way it said it ended (one is the contract).
#[derive(Debug, Default)]
struct Answer {
    pending: String,
    words: String,
    finish_reasons: usize,
    first_token: bool,
    ends: Vec<Ending>,
    violations: Vec<String>,
}

impl Answer {
    /// Takes the next bytes of the SSE body.
    fn feed(&mut self, text: &str) {
        self.pending.push_str(text);
        while let Some(end) = self.pending.find('\n') {
            let line: String = self.pending.drain(..=end).collect();
            self.line(line.trim_end());
        }
    }

    fn line(&mut self, line: &str) {
        if line.starts_with("event: error") {
            self.ends.push(Ending::Failed("error event".into()));
            return;
        }
        let Some(data) = line.strip_prefix("data: ") else {
            return;
        };
        if let Some(Ending::Failed(why)) = self.ends.last_mut()
            && why == "error event"
        {
            // The error event's own data line says what went wrong.
            let error: serde_json::Value = serde_json::from_str(data).unwrap_or_default();
            let message = error["error"]["message"].as_str().unwrap_or_default();
            if message.is_empty() {
                self.violations
                    .push(format!("an error event without a message: {data}"));
            }
            *why = format!("error event {message}");
            return;
        }
        if data == "[DONE]" {
            self.ends.push(Ending::Completed {
                words: self.words.split_whitespace().count(),
                finished: self.finish_reasons == 1,
            });
            return;
        }
        if !self.ends.is_empty() {
            self.violations.push(format!("data after the answer ended: {data}"));
            return;
        }
        let chunk: serde_json::Value = serde_json::from_str(data).unwrap_or_default();
        if let Some(piece) = chunk["choices"][0]["delta"]["content"].as_str() {
            self.words.push_str(piece);
            self.first_token |= !piece.is_empty();
        }
        if chunk["choices"][0]["finish_reason"].is_string() {
            self.finish_reasons += 1;
        }
    }

    /// How the answer ended, and what it did that no answer may.
    fn finish(mut self, broken: bool) -> (Ending, Vec<String>) {
        if self.ends.len() > 1 {
            let ends = std::mem::take(&mut self.ends);
            self.violations
                .push(format!("the answer ended {} times: {ends:?}", ends.len()));
            self.ends = ends;
        }
        let ending = match self.ends.into_iter().next() {
            Some(ending) => ending,
            None => {
                // Cut off with neither an error event nor [DONE]: the client cannot tell why.
                self.violations.push(format!(
                    "the stream ended without [DONE] or an error event (broken: {broken})"
                ));
                Ending::Failed("stream ended without [DONE]".into())
            }
        };
        (ending, self.violations)
    }
}

/// Per instance: (when, present) in the order a watcher saw them.
type PresenceLog = BTreeMap<u64, Vec<(Instant, bool)>>;

/// When each worker instance was in discovery, as a watcher saw it.
#[derive(Clone, Default)]
struct Presence {
    changes: Arc<Mutex<PresenceLog>>,
}

impl Presence {
    /// Watches the instances registered in the file-discovery directory `dir`.
    async fn watch(dir: &std::path::Path, stop: CancellationToken) -> Self {
        let discovery = FileDiscovery::open(dir.to_path_buf(), TTL, TaskTracker::new(), stop.clone())
            .await
            .unwrap();
        let mut watch = discovery.watch(&Query::bucket(Bucket::Instances)).await.unwrap();
        let presence = Self::default();
        let recorder = presence.clone();
        tokio::spawn(async move {
            // Keys per instance (an instance has one key per endpoint).
            let mut keys: BTreeMap<u64, usize> = BTreeMap::new();
            loop {
                let event = tokio::select! {
                    _ = stop.cancelled() => return,
                    event = watch.next() => match event { Some(Ok(event)) => event, _ => return },
                };
                let before: Vec<u64> = keys.iter().filter(|(_, n)| **n > 0).map(|(id, _)| *id).collect();
                match event {
                    WatchEvent::Snapshot(registrations) => {
                        keys.clear();
                        for registration in registrations {
                            *keys.entry(registration.key.instance_id).or_default() += 1;
                        }
                    }
                    WatchEvent::Put(registration) => *keys.entry(registration.key.instance_id).or_default() += 1,
                    WatchEvent::Delete(key) => {
                        let n = keys.entry(key.instance_id).or_default();
                        *n = n.saturating_sub(1);
                    }
                }
                let now = Instant::now();
                let mut changes = recorder.changes.lock().unwrap();
                for (id, n) in &keys {
                    if (*n > 0) != before.contains(id) {
                        changes.entry(*id).or_default().push((now, *n > 0));
                    }
                }
                for id in before.iter().filter(|id| !keys.contains_key(id)) {
                    changes.entry(*id).or_default().push((now, false));
                }
            }
        });
        presence
    }

    /// How many times an instance left discovery.
    fn departures(&self) -> usize {
        let changes = self.changes.lock().unwrap();
        changes.values().flatten().filter(|(_, present)| !present).count()
    }

    /// When `instance` left discovery, if it was out of it at `at`.
    fn left_before(&self, instance: u64, at: Instant) -> Option<Instant> {
        let changes = self.changes.lock().unwrap();
        let (when, present) = changes.get(&instance)?.iter().rev().find(|(when, _)| *when <= at)?;
        (!present).then_some(*when)
    }
}

/// The counts of one scenario, checked.
#[derive(Debug, Default)]
struct Tally {
    sent: usize,
    completed: usize,
    failed: usize,
    lost: usize,
    migrated: u64,
}

/// Asserts the history's invariants and counts it.
/// The requests that failed, with why.
fn failures(history: &[Record]) -> Vec<&Record> {
    history
        .iter()
        .filter(|r| matches!(r.ending, Some(Ending::Failed(_))))
        .collect()
}

fn check(scenario: &str, history: &[Record], migrated: u64, presence: Option<&Presence>) -> Tally {
    let mut tally = Tally {
        sent: history.len(),
        migrated,
        ..Tally::default()
    };
    for (i, record) in history.iter().enumerate() {
        assert!(
            record.violations.is_empty(),
            "{scenario}: request {i} broke the answer's contract: {:?}",
            record.violations
        );
        if presence.is_some() && record.status == Some(200) {
            assert!(
                record.worker.is_some(),
                "{scenario}: request {i} does not say which worker it went to"
            );
        }
        match record.ending.as_ref().expect("the client ends every request") {
            Ending::Completed { words, finished } => {
                assert_eq!(
                    *words, TOKENS,
                    "{scenario}: request {i} got {words} words, not {TOKENS}"
                );
                assert!(*finished, "{scenario}: request {i} ended without a finish reason");
                assert!(record.first_token);
                tally.completed += 1;
            }
            Ending::Failed(_) => tally.failed += 1,
            Ending::Lost => tally.lost += 1,
        }
        if let (Some(presence), Some(worker)) = (presence, record.worker)
            && let Some(left) = presence.left_before(worker, record.sent_at)
        {
            let late = record.sent_at - left;
            assert!(
                late <= TTL,
                "{scenario}: request {i} went to instance {worker:x} {late:?} after it left discovery"
            );
        }
    }
    assert_eq!(tally.lost, 0, "{scenario}: requests lost: {history:?}");
    println!(
        "| {scenario} | {} | {} | {} | {} | {} |",
        tally.sent, tally.completed, tally.migrated, tally.failed, tally.lost
    );
    tally
}

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
        }
    }

    /// Waits until the frontend routes to both workers; on file discovery,
    /// starts recording who is in discovery.
    async fn ready(&mut self) {
        if self.file_discovery && self.presence.is_none() {
            self.presence = Some(Presence::watch(&self.dir, self.stop.clone()).await);
        }
        let started = Instant::now();
        loop {
            let ok = reqwest::get(format!("{}/health", self.url))
                .await
                .is_ok_and(|r| r.status() == 200);
            if ok {
                // Both workers' cards: /v1/models lists one model either way, so give discovery a beat.
                tokio::time::sleep(Duration::from_millis(300)).await;
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the frontend never became ready"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
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
    let load = Load::start(cluster.url.clone(), 4);
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
    let tally = check(
        "worker SIGKILL mid-stream",
        &history,
        cluster.migrations().await,
        cluster.presence.as_ref(),
    );
    assert_eq!(
        tally.failed,
        0,
        "a worker was left, so nothing may fail: {:?}",
        failures(&history)
    );
    assert!(tally.migrated >= 1, "the killed worker's streams migrated");
    drop(cluster);

    // A worker drained with a short deadline: it leaves discovery, finishes
    // what it can, and the rest move on at the deadline.
    let mut cluster = Cluster::start("0.2", &[]);
    let load = under_load(&mut cluster).await;
    cluster.worker_zero_busy().await;
    cluster.workers[0].signal("-TERM");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let history = load.finish().await;
    let tally = check(
        "worker SIGTERM (drain, 0.2 s deadline)",
        &history,
        cluster.migrations().await,
        cluster.presence.as_ref(),
    );
    let (_, drained_log) = cluster.workers.remove(0).wait(Duration::from_secs(5));
    let drained_log = format!("{drained_log}\n--- frontend ---\n{}", cluster.frontend.log());
    assert_eq!(
        tally.failed,
        0,
        "a worker was left, so nothing may fail: {:?}; the drained worker's log:\n{drained_log}",
        failures(&history)
    );
    assert!(
        tally.migrated >= 1,
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
    let tally = check(
        "worker SIGSTOP 3 s (stall deadline 1 s), then SIGCONT",
        &history,
        cluster.migrations().await,
        cluster.presence.as_ref(),
    );
    assert_eq!(
        tally.failed,
        0,
        "a worker was left, so nothing may fail: {:?}",
        failures(&history)
    );
    assert!(tally.migrated >= 1, "the frozen worker's streams migrated");
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
    let tally = check("frontend SIGTERM", &history, 0, cluster.presence.as_ref());
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
    let tally = check(
        "etcd stopped 3 s (3 × lease TTL), restarted",
        &history,
        cluster.migrations().await,
        None,
    );
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
    let load = Load::start(cluster.url.clone(), 4);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    nats.restart();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let history = load.finish().await;
    let tally = check("NATS restarted", &history, cluster.migrations().await, None);
    assert_eq!(tally.failed, 0, "requests do not need NATS");
}

/// A chat chunk carrying `text`, and one with the finish reason.
fn sse(text: &str) -> String {
    format!("data: {}\n\n", json!({"choices": [{"delta": {"content": text}}]}))
}

const FINISH: &str = "data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n";
const DONE: &str = "data: [DONE]\n\n";

fn read(body: &str) -> (Ending, Vec<String>) {
    let mut answer = Answer::default();
    // Fed in two pieces, cut mid-line, as a network delivers it.
    let (first, second) = body.split_at(body.len() / 2);
    answer.feed(first);
    answer.feed(second);
    answer.finish(false)
}

#[test]
fn checker_reads_a_clean_answer_and_a_clean_failure() {
    let (ending, violations) = read(&format!("{}{}{FINISH}{DONE}", sse("all "), sse("aboard")));
    assert_eq!(
        ending,
        Ending::Completed {
            words: 2,
            finished: true
        }
    );
    assert!(violations.is_empty(), "{violations:?}");
    let failure = "event: error\ndata: {\"error\":{\"message\":\"the worker was lost\"}}\n\n";
    let (ending, violations) = read(&format!("{}{failure}", sse("all ")));
    assert_eq!(ending, Ending::Failed("error event the worker was lost".into()));
    assert!(violations.is_empty(), "{violations:?}");
}

#[test]
fn checker_sees_an_answer_that_ends_twice_or_goes_on_after_its_end() {
    let (_, violations) = read(&format!("{}{FINISH}{DONE}{DONE}", sse("a")));
    assert!(violations.iter().any(|v| v.contains("ended 2 times")), "{violations:?}");
    let error = "event: error\ndata: {\"error\":{\"message\":\"late\"}}\n\n";
    let (_, violations) = read(&format!("{}{FINISH}{DONE}{error}", sse("a")));
    assert!(violations.iter().any(|v| v.contains("ended 2 times")), "{violations:?}");
    let (_, violations) = read(&format!("{}{FINISH}{DONE}{}", sse("a"), sse("more")));
    assert!(
        violations.iter().any(|v| v.contains("after the answer ended")),
        "{violations:?}"
    );
    let (ending, _) = read(&format!("{}{FINISH}{FINISH}{DONE}", sse("a")));
    assert_eq!(
        ending,
        Ending::Completed {
            words: 1,
            finished: false
        },
        "two finish reasons"
    );
}

#[test]
fn checker_sees_an_answer_cut_off_without_a_word_or_failing_without_a_message() {
    let (ending, violations) = read(&sse("a"));
    assert!(matches!(ending, Ending::Failed(_)));
    assert!(
        violations.iter().any(|v| v.contains("without [DONE]")),
        "{violations:?}"
    );
    let (_, violations) = read("event: error\ndata: {}\n\n");
    assert!(
        violations.iter().any(|v| v.contains("without a message")),
        "{violations:?}"
    );
}

/// One request's record, as the client would leave it.
fn record(ending: Ending, worker: Option<u64>) -> Record {
    Record {
        status: Some(200),
        worker,
        first_token: true,
        ending: Some(ending),
        ..Record::new()
    }
}

fn complete() -> Ending {
    Ending::Completed {
        words: TOKENS,
        finished: true,
    }
}

#[test]
fn checker_passes_a_clean_history() {
    let tally = check("clean", &[record(complete(), Some(1))], 0, Some(&Presence::default()));
    assert_eq!((tally.sent, tally.completed), (1, 1));
}

#[test]
#[should_panic(expected = "broke the answer's contract")]
fn checker_fails_a_history_with_a_violation() {
    let mut bad = record(complete(), Some(1));
    bad.violations.push("the answer ended 2 times".into());
    check("violation", &[bad], 0, None);
}

#[test]
#[should_panic(expected = "does not say which worker")]
fn checker_fails_an_answer_without_its_worker_when_presence_is_checked() {
    check("no header", &[record(complete(), None)], 0, Some(&Presence::default()));
}

#[test]
#[should_panic(expected = "got 119 words")]
fn checker_fails_an_answer_with_a_word_missing() {
    let short = Ending::Completed {
        words: TOKENS - 1,
        finished: true,
    };
    check("short", &[record(short, Some(1))], 0, None);
}

#[test]
#[should_panic(expected = "requests lost")]
fn checker_fails_a_lost_request() {
    check("lost", &[record(Ending::Lost, Some(1))], 0, None);
}

#[test]
#[should_panic(expected = "after it left discovery")]
fn checker_fails_a_request_sent_to_a_worker_long_gone() {
    let presence = Presence::default();
    let left = Instant::now();
    presence.changes.lock().unwrap().insert(7, vec![(left, false)]);
    let mut late = record(complete(), Some(7));
    late.sent_at = left + TTL * 2;
    check("late", &[late], 0, Some(&presence));
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
