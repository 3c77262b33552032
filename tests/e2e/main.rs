//! The LLM stack over real sockets and separate processes: one
//! `switchyard frontend` and two `switchyard worker mocker` processes on file
//! discovery, called over HTTP like any OpenAI client would — including the
//! official `openai` Python package.
//!
//! One test binary for the multi-process suites (link time dominates on
//! small machines): the fault matrix and the Kubernetes run are its modules;
//! only `tests/idle.rs` has a binary of its own. Both are test targets of the
//! `switchyard` package (see its Cargo.toml for why).

mod chaos;
mod engines;
mod faults;
mod history;
#[cfg(feature = "kubernetes")]
mod kubernetes;
mod kv;
mod mesh;
mod vllm_kv;

use futures::StreamExt;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::time::Duration;
use switchyard_test_support::free_port;
use switchyard_test_support::switchyard::{self, START_DEADLINE, start_frontend, start_mocker};
use switchyard_test_support::worker_process::WorkerProcess;
use tokio::time::Instant;

/// A frontend and two workers sharing a discovery directory.
struct Stack {
    /// Kept so the process lives as long as the stack (killed on drop).
    _frontend: WorkerProcess,
    workers: Vec<WorkerProcess>,
    /// Each worker's status server (`/metrics`).
    worker_status: Vec<u16>,
    url: String,
    discovery_dir: PathBuf,
    http: reqwest::Client,
}

impl Stack {
    /// Workers at `speedup` (1 = the timing model's real delays).
    async fn start(frontend_args: &[&str], speedup: &str) -> Self {
        Self::start_with(frontend_args, &["--speedup-ratio", speedup]).await
    }

    /// Workers started with `worker_flags`.
    async fn start_with(frontend_args: &[&str], worker_flags: &[&str]) -> Self {
        let discovery_dir = std::env::temp_dir().join(format!("switchyard-e2e-{:016x}", rand::random::<u64>()));
        let dir = discovery_dir.to_str().unwrap().to_string();
        let env = |status_port: &str| -> Vec<(String, String)> {
            vec![
                ("DYN_DISCOVERY_BACKEND".into(), "file".into()),
                ("DYN_FILE_KV".into(), dir.clone()),
                ("DYN_LOG".into(), "info".into()),
                ("DYN_SYSTEM_PORT".into(), status_port.into()),
            ]
        };
        let mut workers = Vec::new();
        let mut worker_status = Vec::new();
        for _ in 0..2 {
            let port = free_port();
            let vars = env(&port.to_string());
            let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            workers.push(start_mocker(worker_flags, &vars));
            worker_status.push(port);
        }
        let vars = env("");
        let vars: Vec<(&str, &str)> = vars
            .iter()
            .filter(|(k, _)| k != "DYN_SYSTEM_PORT")
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let (frontend, url) = start_frontend(frontend_args, &vars);
        let stack = Self {
            _frontend: frontend,
            workers,
            worker_status,
            url,
            discovery_dir,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
        };
        stack
            .eventually(
                "the frontend to be ready",
                |health: Value| health["status"] == "ready",
                "/health",
            )
            .await;
        stack
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        let response = self.http.get(format!("{}{path}", self.url)).send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn post(&self, path: &str, body: &Value) -> reqwest::Response {
        self.http
            .post(format!("{}{path}", self.url))
            .json(body)
            .send()
            .await
            .unwrap()
    }

    /// Polls GET `path` until `check` accepts its JSON, for up to 10 s.
    async fn eventually(&self, what: &str, check: impl Fn(Value) -> bool, path: &str) {
        let started = Instant::now();
        loop {
            if let Ok(response) = self.http.get(format!("{}{path}", self.url)).send().await
                && let Ok(body) = response.json::<Value>().await
                && check(body)
            {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The sum over both workers of a metric's sample value.
    async fn worker_metric(&self, sample: &str) -> f64 {
        let mut total = 0.0;
        for port in &self.worker_status {
            let text = self
                .http
                .get(format!("http://127.0.0.1:{port}/metrics"))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            total += text
                .lines()
                .find_map(|line| line.strip_prefix(sample).and_then(|v| v.trim().parse::<f64>().ok()))
                .unwrap_or(0.0);
        }
        total
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.discovery_dir);
    }
}

fn chat(max_tokens: u32, stream: bool) -> Value {
    json!({"model": "mock-model", "max_tokens": max_tokens, "stream": stream,
           "messages": [{"role": "user", "content": "Write a haiku about trains"}]})
}

/// The `data:` payloads of an SSE body.
fn sse_data(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frontend_and_two_mocker_processes_serve_the_openai_api() {
    let stack = Stack::start(&["--busy-threshold", "1", "--body-limit-mb", "1"], "1").await;

    let (status, models) = stack.get("/v1/models").await;
    assert_eq!(status, 200);
    assert_eq!(models["data"][0]["id"], "mock-model");

    // Whole and streamed, chat and completions.
    let answer: Value = stack
        .post("/v1/chat/completions", &chat(5, false))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(answer["usage"]["completion_tokens"], 5, "{answer}");
    let body = stack
        .post("/v1/chat/completions", &chat(5, true))
        .await
        .text()
        .await
        .unwrap();
    let data = sse_data(&body);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{body}");
    let completion = json!({"model": "mock-model", "prompt": "Once upon a time", "max_tokens": 3});
    let answer: Value = stack.post("/v1/completions", &completion).await.json().await.unwrap();
    assert_eq!(answer["object"], "text_completion");
    assert_eq!(answer["choices"][0]["finish_reason"], "length");
    let mut streamed = completion.clone();
    streamed["stream"] = json!(true);
    let body = stack.post("/v1/completions", &streamed).await.text().await.unwrap();
    assert_eq!(
        sse_data(&body).len(),
        3 + 1 + 1,
        "three tokens, the finish, [DONE]: {body}"
    );

    // Both workers took requests (least-loaded spreads sequential requests too,
    // through the workers' load reports; retry a few times for the reports).
    for _ in 0..6 {
        stack.post("/v1/chat/completions", &chat(2, false)).await;
    }
    for port in &stack.worker_status {
        let text = stack
            .http
            .get(format!("http://127.0.0.1:{port}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        // The series exists from start-up at 0: its value is what counts.
        let completed: f64 = text
            .lines()
            .find_map(|line| {
                line.strip_prefix("switchyard_mocker_completed_requests_total{model_name=\"mock-model\"} ")
            })
            .and_then(|value| value.trim().parse().ok())
            .unwrap_or(0.0);
        assert!(completed >= 1.0, "every worker completed requests:\n{text}");
    }

    // Error statuses.
    let bad = json!({"model": "mock-model", "messages": [{"role": "user", "content": "x"}], "top_p": 7});
    let response = stack.post("/v1/chat/completions", &bad).await;
    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["param"], "top_p");
    let unknown = json!({"model": "gpt-x", "messages": [{"role": "user", "content": "x"}]});
    assert_eq!(stack.post("/v1/chat/completions", &unknown).await.status(), 404);
    let huge = json!({"model": "mock-model", "messages": [{"role": "user", "content": "x".repeat(2 << 20)}]});
    assert_eq!(stack.post("/v1/chat/completions", &huge).await.status(), 413);

    // Busy: one long stream per worker, then a third request is refused.
    let first = stack.post("/v1/chat/completions", &chat(400, true)).await;
    let second = stack.post("/v1/chat/completions", &chat(400, true)).await;
    assert_eq!((first.status().as_u16(), second.status().as_u16()), (200, 200));
    let refused = stack.post("/v1/chat/completions", &chat(1, false)).await;
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers()["retry-after"], "1");

    // A client that leaves cancels its request in the engine.
    let cancelled_before = stack
        .worker_metric("switchyard_mocker_cancelled_requests_total{model_name=\"mock-model\"}")
        .await;
    let mut body = first.bytes_stream();
    assert!(body.next().await.is_some(), "the stream started");
    drop(body);
    drop(second);
    let started = Instant::now();
    loop {
        let cancelled = stack
            .worker_metric("switchyard_mocker_cancelled_requests_total{model_name=\"mock-model\"}")
            .await;
        if cancelled - cancelled_before >= 2.0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the engines saw {cancelled} cancels"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A model whose last worker leaves disappears.
    for worker in &stack.workers {
        worker.signal("-TERM");
    }
    stack
        .eventually(
            "the model to disappear",
            |models| models["data"] == json!([]),
            "/v1/models",
        )
        .await;
    assert_eq!(stack.get("/health").await.0, 503);
}

/// The official client, from the virtualenv `make test` prepares.
/// The test fixtures' own clean-up: what a test process held in `static`s
/// is never dropped, so the next one removes it.
#[test]
fn only_the_scratch_of_gone_test_processes_is_removed() {
    use switchyard_test_support::{SCRATCH_PREFIX, remove_scratch_of_gone_processes, scratch_dir};
    let temp = scratch_dir("sweep-test");
    // Above any pid Linux hands out (pid_max is at most 2^22).
    let gone = temp.join(format!("{SCRATCH_PREFIX}4294967295"));
    let alive = temp.join(format!("{SCRATCH_PREFIX}{}", std::process::id()));
    let other = temp.join(format!("{SCRATCH_PREFIX}something-else"));
    for dir in [&gone, &alive, &other] {
        std::fs::create_dir_all(dir.join("inner")).unwrap();
    }
    remove_scratch_of_gone_processes(&temp);
    assert!(!gone.exists(), "a gone process's scratch stayed");
    assert!(
        alive.exists() && other.exists(),
        "more was removed than a gone process's scratch"
    );
    std::fs::remove_dir_all(&temp).unwrap();
}

/// A client on a real socket that stops reading: once the sockets' buffers
/// are full the HTTP server stops asking for events, and the write deadline
/// cuts the answer off (which also cancels the request on its worker, if the
/// engine is still at it: `tests/edge.rs` in the frontend shows that part).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_its_socket_is_cut_off_at_the_write_deadline() {
    // 200,000 tokens of about 230 bytes each: far more than the sockets hold.
    let stack = Stack::start_with(
        &["--http-write-timeout-secs", "1"],
        &["--speedup-ratio", "0", "--context-length", "250000"],
    )
    .await;
    let body = chat(200_000, true).to_string();
    let address = stack.url.strip_prefix("http://").unwrap();
    // A small receive buffer: loopback's autotuning would take up to 32 MiB
    // of the answer before the frontend saw the client stall.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 * 1024).unwrap();
    let mut socket = socket.connect(address.parse().unwrap()).await.unwrap();
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: {address}\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n{body}",
        body.len()
    );
    tokio::io::AsyncWriteExt::write_all(&mut socket, request.as_bytes())
        .await
        .unwrap();
    // Not a byte read until the frontend has given up on this client.
    let started = Instant::now();
    while kv::metric(&stack.http, &stack.url, "dynamo_frontend_disconnected_clients").await != 1.0 {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the frontend did not cut off a client that stopped reading"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // What the client gets when it reads at last: the answer cut short.
    let mut answer = Vec::new();
    let read = tokio::io::AsyncReadExt::read_to_end(&mut socket, &mut answer);
    let _ = tokio::time::timeout(Duration::from_secs(5), read).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "{}",
        &answer[..answer.len().min(200)]
    );
    assert!(!answer.contains("[DONE]"), "the whole answer arrived");
    let (_, health) = stack.get("/health").await;
    assert_eq!(health["status"], "ready", "the frontend serves on: {health}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_python_client_works_against_the_frontend() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let python = root.join("target/test-venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run `make test` (or `make test-deps`), which creates it with the openai package",
        python.display()
    );
    let stack = Stack::start(&[], "0").await;
    run_openai_client(&python, &[&format!("{}/v1", stack.url)]).await;
}

/// Runs `tests/e2e/openai_client.py` with `args` (URL, then an optional key
/// and CA) and fails the test with its output unless every check passed.
async fn run_openai_client(python: &std::path::Path, args: &[&str]) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let output = tokio::process::Command::new(python)
        .arg(root.join("tests/e2e/openai_client.py"))
        .args(args)
        .output()
        .await
        .unwrap();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "the openai client script failed:\n{log}");
    assert!(log.contains("all openai client checks passed"), "{log}");
}

/// The same client over TLS (a throw-away CA) with an API key, against
/// `switchyard run` (frontend and mocker in one process).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_python_client_works_over_tls_with_an_api_key() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let python = root.join("target/test-venv/bin/python");
    assert!(python.exists(), "{} is missing: run `make test`", python.display());
    let certificates = switchyard_test_support::etcd_server::TestCertificates::generate();
    let port = free_port().to_string();
    let key = "sk-e2e-0123456789abcdef";
    let (cert, server_key) = (
        certificates.server_cert.to_str().unwrap(),
        certificates.server_key.to_str().unwrap(),
    );
    let args = [
        "run",
        "--http-host",
        "127.0.0.1",
        "--http-port",
        &port,
        "--api-key",
        key,
        "--tls-cert-path",
        cert,
        "--tls-key-path",
        server_key,
    ];
    let _run = WorkerProcess::start(switchyard::binary(), &args, &[], "frontend listening", START_DEADLINE);
    let ca = certificates.ca.to_str().unwrap();
    run_openai_client(&python, &[&format!("https://127.0.0.1:{port}/v1"), key, ca]).await;
}

// ---- The vLLM worker, against the mocker standing in for `vllm serve` ----

/// A directory with an executable `vllm` script holding `body`, to put first on PATH.
fn fake_vllm(body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("switchyard-fake-vllm-{:016x}", rand::random::<u64>()));
    std::fs::create_dir_all(&dir).unwrap();
    let script = dir.join("vllm");
    std::fs::write(&script, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// A fake `vllm` that runs the mocker behind vLLM's API (`vllm serve …` → `switchyard mocker-vllm serve …`).
fn mocker_as_vllm() -> PathBuf {
    fake_vllm(&format!(
        "unset DYN_SYSTEM_PORT\nexec {} mocker-vllm \"$@\"",
        switchyard::binary().display()
    ))
}

/// PATH with `dir` first.
fn path_with(dir: &std::path::Path) -> String {
    // The test hands the child a PATH; reading ours is how it keeps the rest.
    #[allow(clippy::disallowed_methods)]
    let path = std::env::var("PATH").unwrap_or_default();
    format!("{}:{path}", dir.display())
}

/// `vllm serve`'s stand-in on `port`, serving `model` (real-time engine delays).
fn start_fake_vllm_server(port: u16, model: &str) -> WorkerProcess {
    let port = port.to_string();
    WorkerProcess::start(
        switchyard::binary(),
        &["mocker-vllm", "serve", "--port", &port, model],
        &[("DYN_LOG", "info"), ("DYN_MOCKER_SPEEDUP_RATIO", "1")],
        "frontend listening",
        START_DEADLINE,
    )
}

/// Runs `switchyard ARGS` to its end (bounded) and returns (success, stderr).
async fn run_to_end(args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let output = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(switchyard::binary())
            .args(args)
            .envs(env.iter().copied())
            .output(),
    )
    .await
    .expect("the command ended")
    .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The pids of the children a managed worker logged as started.
fn started_children(log: &str) -> Vec<u32> {
    log.lines()
        .filter(|line| line.contains("started vllm"))
        .filter_map(|line| line.split("pid=").nth(1)?.split_whitespace().next()?.parse().ok())
        .collect()
}

fn process_exists(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')))
}

async fn wait_until_gone(pids: &[u32]) {
    let started = Instant::now();
    while pids.iter().any(|&pid| process_exists(pid)) {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "children {pids:?} still run"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_prints_each_of_its_causes_exactly_once() {
    // The worker's requests come over NATS, and nothing listens there: the
    // error is nested several deep (endpoint → request plane → NATS → socket).
    // (Without NATS for the event plane alone, a process serves anyway.)
    let nats = format!("nats://127.0.0.1:{}", free_port());
    let (ok, stderr) = run_to_end(
        &["worker", "mocker"],
        &[
            ("DYN_DISCOVERY_BACKEND", "mem"),
            ("DYN_REQUEST_PLANE", "nats"),
            ("NATS_SERVER", &nats),
        ],
    )
    .await;
    assert!(!ok, "{stderr}");
    let line = stderr
        .lines()
        .find(|line| line.starts_with("switchyard: "))
        .unwrap_or_else(|| panic!("no error line in {stderr}"));
    let causes: Vec<&str> = line.trim_start_matches("switchyard: ").split(": ").collect();
    assert!(causes.len() >= 4, "expected the whole chain: {line}");
    for (i, cause) in causes.iter().enumerate() {
        assert!(
            !causes[i + 1..]
                .iter()
                .any(|later| later.contains(cause) || cause.contains(later)),
            "{cause:?} is printed twice: {line}"
        );
    }
    assert_eq!(line.matches(nats.as_str()).count(), 1, "{line}");
    assert_eq!(line.matches("NATS_SERVER").count(), 1, "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vllm_attach_refuses_a_server_that_does_not_serve_the_model() {
    let port = free_port();
    let _vllm = start_fake_vllm_server(port, "other-model");
    let url = format!("http://127.0.0.1:{port}");
    let (ok, stderr) = run_to_end(
        &["worker", "vllm", "--attach", &url, "--model", "wanted"],
        &[("DYN_DISCOVERY_BACKEND", "mem")],
    )
    .await;
    assert!(!ok);
    assert!(
        stderr.contains(&url) && stderr.contains("other-model") && stderr.contains("wanted"),
        "{stderr}"
    );

    let nobody = format!("http://127.0.0.1:{}", free_port());
    let (ok, stderr) = run_to_end(
        &[
            "worker",
            "vllm",
            "--attach",
            &nobody,
            "--model",
            "wanted",
            "--check-timeout-secs",
            "2",
        ],
        &[("DYN_DISCOVERY_BACKEND", "mem")],
    )
    .await;
    assert!(!ok);
    assert!(
        stderr.contains(&nobody) && stderr.contains("did not answer"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vllm_attach_leaves_discovery_when_the_server_dies_and_returns_when_it_is_back() {
    let dir = std::env::temp_dir().join(format!("switchyard-e2e-{:016x}", rand::random::<u64>()));
    let dir_text = dir.to_str().unwrap().to_string();
    let env = [
        ("DYN_DISCOVERY_BACKEND", "file"),
        ("DYN_FILE_KV", dir_text.as_str()),
        ("DYN_LOG", "info"),
    ];
    let port = free_port();
    let vllm = start_fake_vllm_server(port, "m");
    let url = format!("http://127.0.0.1:{port}");
    let _worker = WorkerProcess::start(
        switchyard::binary(),
        &[
            "worker",
            "vllm",
            "--attach",
            &url,
            "--model",
            "m",
            "--health-interval-ms",
            "100",
        ],
        &env,
        "vllm worker serving",
        START_DEADLINE,
    );
    let (_frontend, frontend) = start_frontend(&[], &env);
    let http = reqwest::Client::new();
    let models = || async {
        http.get(format!("{frontend}/v1/models"))
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()["data"]
            .clone()
    };
    let until = |want_model: bool| async move {
        let started = Instant::now();
        loop {
            let listed = models().await.as_array().is_some_and(|d| !d.is_empty());
            if listed == want_model {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "model listed: {listed}, wanted {want_model}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    until(true).await;
    // Streaming through frontend → worker → "vLLM", unknown fields passed along.
    let body = json!({"model": "m", "max_tokens": 4, "stream": true, "top_k": 5,
                      "messages": [{"role": "user", "content": "hello"}]});
    let text = http
        .post(format!("{frontend}/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");

    // A client that leaves cancels the request inside "vLLM" too.
    let long = json!({"model": "m", "max_tokens": 500, "stream": true,
                      "messages": [{"role": "user", "content": "a long story"}]});
    let response = http
        .post(format!("{frontend}/v1/chat/completions"))
        .json(&long)
        .send()
        .await
        .unwrap();
    let mut body = response.bytes_stream();
    assert!(body.next().await.is_some(), "the stream started");
    drop(body);
    let cancelled = "switchyard_mocker_cancelled_requests_total{model_name=\"m\"} 1";
    let started = Instant::now();
    loop {
        let metrics = http
            .get(format!("{url}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if metrics.contains(cancelled) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "vLLM never saw the cancel:\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    vllm.signal("-KILL");
    until(false).await;
    let _back = start_fake_vllm_server(port, "m");
    until(true).await;
    let answer: Value = http
        .post(format!("{frontend}/v1/completions"))
        .json(&json!({"model": "m", "prompt": "again", "max_tokens": 2}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["usage"]["completion_tokens"], 2, "{answer}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vllm_managed_reports_a_child_that_dies_at_start_with_its_log_tail() {
    let dir = fake_vllm("echo 'loading weights'\necho 'RuntimeError: no CUDA device' >&2\nexit 3");
    let path = path_with(&dir);
    let (ok, stderr) = run_to_end(
        &["worker", "vllm", "--managed", "--model", "m"],
        &[("DYN_DISCOVERY_BACKEND", "mem"), ("PATH", &path)],
    )
    .await;
    assert!(!ok);
    assert!(
        stderr.contains("exited") && stderr.contains("RuntimeError: no CUDA device"),
        "{stderr}"
    );

    let (ok, stderr) = run_to_end(
        &[
            "worker",
            "vllm",
            "--managed",
            "--model",
            "m",
            "--vllm-command",
            "/nonexistent/vllm",
        ],
        &[("DYN_DISCOVERY_BACKEND", "mem")],
    )
    .await;
    assert!(!ok);
    assert!(stderr.contains("cannot find the vLLM command"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vllm_managed_children_never_outlive_the_worker() {
    let dir = mocker_as_vllm();
    let path = path_with(&dir);
    let env = [
        ("DYN_DISCOVERY_BACKEND", "mem"),
        ("DYN_LOG", "info"),
        ("PATH", path.as_str()),
    ];
    let args = ["worker", "vllm", "--managed", "--model", "m", "--replicas", "2"];

    // SIGTERM: drain, then the children are stopped in order.
    let mut worker = WorkerProcess::start(switchyard::binary(), &args, &env, "vllm worker serving", START_DEADLINE);
    // Both replicas registered, so the SIGTERM below meets a serving worker.
    worker.wait_for_log_times("vllm worker serving", 2, START_DEADLINE);
    let children = started_children(worker.log());
    assert_eq!(children.len(), 2, "{}", worker.log());
    assert!(children.iter().all(|&pid| process_exists(pid)));
    worker.signal("-TERM");
    let (status, log) = worker.wait(Duration::from_secs(15));
    assert!(status.success(), "{log}");
    wait_until_gone(&children).await;

    // SIGKILL: the kernel takes the children with it (setpriv --pdeathsig).
    let worker = WorkerProcess::start(switchyard::binary(), &args, &env, "vllm worker serving", START_DEADLINE);
    let children = started_children(worker.log());
    assert!(!children.is_empty(), "{}", worker.log());
    worker.signal("-KILL");
    wait_until_gone(&children).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_cluster_script_starts_a_working_cluster_and_stops_all_of_it() {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../local-cluster.sh");
    let http_port = free_port();
    // A base with ~15 free ports above it: etcd, its peer port, NATS, status
    // servers. Below Linux's ephemeral range (32768+), so outgoing
    // connections of other tests cannot be holding them.
    let base_port = 20_000 + (rand::random::<u16>() % 12_000);
    let (http_text, base_text) = (http_port.to_string(), base_port.to_string());
    let binary = switchyard::binary();
    let cluster = WorkerProcess::start(
        PathBuf::from("/bin/sh"),
        // The script reports on stdout; the helper reads stderr.
        &["-c", "exec \"$0\" 1 1>&2", script.to_str().unwrap()],
        &[
            ("SWITCHYARD", binary.to_str().unwrap()),
            ("HTTP_PORT", &http_text),
            ("BASE_PORT", &base_text),
        ],
        "cluster ready",
        START_DEADLINE,
    );
    let answer: Value = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{http_port}/v1/chat/completions"))
        .json(&chat(3, false))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["usage"]["completion_tokens"], 3, "{answer}");
    cluster.signal("-TERM");
    let (_, log) = cluster.wait(Duration::from_secs(20));
    assert!(log.contains("stopping"), "{log}");
    for port in [http_port, base_port, base_port + 10] {
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
            "port {port} still answers after the script stopped:\n{log}"
        );
    }
}
