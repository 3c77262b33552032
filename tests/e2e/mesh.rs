//! The mesh page in a real browser: headless Chromium (Debian `chromium`,
//! installed by `make test-deps`) driven by `tests/e2e/mesh_page.py` over
//! the DevTools protocol. The page must render without console errors, show
//! the model and every instance id that `/api/mesh` lists, and drop a
//! worker whose process is killed within seconds.

use serde_json::Value;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;
use switchyard_test_support::free_port;
use switchyard_test_support::switchyard::{self, START_DEADLINE, start_frontend, start_mocker};
use switchyard_test_support::worker_process::WorkerProcess;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::time::{Instant, timeout};

/// Longest the browser script may run in all (its own waits are shorter).
const SCRIPT_DEADLINE: Duration = Duration::from_secs(60);
/// How soon the page must show a worker leaving (lease 1 s, the discovery
/// directory rescanned every 0.5 s, the page polling every second) or
/// joining: "within a few seconds", with room for a loaded CI machine.
const CHANGE_DEADLINE: Duration = Duration::from_secs(5);

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/e2e/mesh_page.py")
}

/// The model and sorted instance ids `/api/mesh` lists at `url`, once it
/// lists `count` of them (within 10 s); `key` when the frontend needs one.
async fn instances(url: &str, count: usize, key: Option<&str>) -> (String, Vec<String>) {
    let started = Instant::now();
    let http = reqwest::Client::new();
    loop {
        let mut request = http.get(format!("{url}/api/mesh")).timeout(Duration::from_secs(5));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        if let Ok(response) = request.send().await
            && let Ok(mesh) = response.json::<Value>().await
            && let Some(model) = mesh["models"].get(0)
            && model["instances"].as_array().is_some_and(|i| i.len() == count)
        {
            let mut ids: Vec<String> = model["instances"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i["id"].as_str().unwrap().to_string())
                .collect();
            ids.sort_unstable();
            return (model["name"].as_str().unwrap().to_string(), ids);
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "/api/mesh never listed {count} instances"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The browser script, started on `url`; read its lines with [`Browser::line`].
struct Browser {
    child: Child,
    stdin: ChildStdin,
    lines: tokio::io::Lines<BufReader<ChildStdout>>,
    /// Everything it printed so far, for failure messages.
    log: String,
}

impl Browser {
    fn start(url: &str, model: &str, ids: &[String], extra: &[&str]) -> Self {
        let mut child = Command::new("python3")
            .arg(script())
            .arg(url)
            .args(["--model", model, "--ids", &ids.join(",")])
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("python3 runs the browser script");
        let stdin = child.stdin.take().unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Self {
            child,
            stdin,
            lines,
            log: String::new(),
        }
    }

    /// Its next line of output; fails the test when it ends or stalls.
    async fn line(&mut self) -> String {
        let next = timeout(SCRIPT_DEADLINE, self.lines.next_line()).await;
        match next {
            Ok(Ok(Some(line))) => {
                self.log.push_str(&line);
                self.log.push('\n');
                line
            }
            _ => panic!("the browser script ended or stalled; it said:\n{}", self.log),
        }
    }

    async fn send(&mut self, line: &str) {
        self.stdin.write_all(format!("{line}\n").as_bytes()).await.unwrap();
        self.stdin.flush().await.unwrap();
    }

    /// Tells the script which ids the page should now show; asserts it saw
    /// them within [`CHANGE_DEADLINE`].
    async fn expect(&mut self, ids: &[String]) {
        self.send(&format!("expect {}", ids.join(","))).await;
        let line = self.line().await;
        let seconds: Option<f64> = line
            .strip_prefix("changed after ")
            .and_then(|rest| rest.strip_suffix(" s"))
            .and_then(|n| n.parse().ok());
        let seconds = seconds.unwrap_or_else(|| panic!("the page did not show {ids:?}:\n{}", self.log));
        assert!(seconds <= CHANGE_DEADLINE.as_secs_f64(), "{}", self.log);
    }

    /// Reads until the script's closing line and asserts it passed.
    async fn passes(mut self) {
        loop {
            let line = self.line().await;
            assert!(!line.starts_with("FAIL"), "{}", self.log);
            if line == "mesh page checks passed" {
                break;
            }
        }
        let status = timeout(SCRIPT_DEADLINE, self.child.wait()).await.unwrap().unwrap();
        assert!(status.success(), "{}", self.log);
        // Shown with --nocapture: how long each change took.
        eprintln!("browser script:\n{}", self.log);
    }
}

/// `switchyard run --num-workers 3`: the page shows the model and all three
/// instances, with no console error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mesh_page_shows_switchyard_runs_model_and_three_workers_in_chromium() {
    let port = free_port().to_string();
    let args = [
        "run",
        "--num-workers",
        "3",
        "--http-host",
        "127.0.0.1",
        "--http-port",
        &port,
    ];
    let _run = WorkerProcess::start(switchyard::binary(), &args, &[], "frontend listening", START_DEADLINE);
    let url = format!("http://127.0.0.1:{port}");
    let (model, ids) = instances(&url, 3, None).await;
    assert_eq!(model, "mock-model");
    let mut browser = Browser::start(&format!("{url}/"), &model, &ids, &[]);
    assert_eq!(browser.line().await, "shown", "{}", browser.log);
    browser.passes().await;
}

/// With an API key set, the page asks for it, and once it is typed in
/// shows the workers (the refused polls before are the only errors).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_an_api_key_the_mesh_page_asks_for_it_then_shows_the_workers() {
    let port = free_port().to_string();
    let key = "sk-mesh-e2e-0123456789";
    let args = [
        "run",
        "--num-workers",
        "2",
        "--http-host",
        "127.0.0.1",
        "--http-port",
        &port,
        "--api-key",
        key,
    ];
    let _run = WorkerProcess::start(switchyard::binary(), &args, &[], "frontend listening", START_DEADLINE);
    let url = format!("http://127.0.0.1:{port}");
    let refused = reqwest::get(format!("{url}/api/mesh")).await.unwrap().status();
    assert_eq!(refused.as_u16(), 401, "the JSON needs the key");
    let (model, ids) = instances(&url, 2, Some(key)).await;
    let mut browser = Browser::start(&format!("{url}/"), &model, &ids, &["--key", key]);
    assert_eq!(browser.line().await, "key given", "{}", browser.log);
    assert_eq!(browser.line().await, "shown", "{}", browser.log);
    browser.passes().await;
}

/// A frontend and three worker processes on file discovery: the page drops
/// the worker that is SIGKILLed within a few seconds (its lease is 1 s),
/// keeps the other two, and shows a new worker once it registers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mesh_page_drops_a_killed_worker_and_shows_a_new_one_within_seconds() {
    let dir = std::env::temp_dir().join(format!("switchyard-mesh-{:016x}", rand::random::<u64>()));
    let dir_text = dir.to_str().unwrap().to_string();
    let env = [
        ("DYN_DISCOVERY_BACKEND", "file"),
        ("DYN_FILE_KV", dir_text.as_str()),
        ("DYN_LEASE_TTL", "1s"),
    ];
    // A worker process and its instance id (from its status server).
    let worker = || async {
        let status_port = free_port().to_string();
        let mut env = env.to_vec();
        env.push(("DYN_SYSTEM_PORT", status_port.as_str()));
        let process = start_mocker(&["--speedup-ratio", "0"], &env);
        let metadata: Value = reqwest::get(format!("http://127.0.0.1:{status_port}/metadata"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        (process, metadata["instance_id"].as_str().unwrap().to_string())
    };
    let mut workers = Vec::new();
    for _ in 0..3 {
        workers.push(worker().await);
    }
    let (_frontend, url) = start_frontend(&[], &env);
    let (model, ids) = instances(&url, 3, None).await;
    let mut expected: Vec<String> = workers.iter().map(|(_, id)| id.clone()).collect();
    expected.sort_unstable();
    assert_eq!(ids, expected, "/api/mesh lists the three worker processes");

    let mut browser = Browser::start(&format!("{url}/"), &model, &ids, &["--follow"]);
    assert_eq!(browser.line().await, "shown", "{}", browser.log);
    let (killed, gone) = workers.remove(1);
    killed.signal("-KILL");
    let mut left: Vec<String> = workers.iter().map(|(_, id)| id.clone()).collect();
    browser.expect(&left).await;
    assert!(!left.contains(&gone));

    let joined = worker().await;
    left.push(joined.1.clone());
    browser.expect(&left).await;
    browser.send("done").await;
    browser.passes().await;
    drop(killed);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `switchyard instances --frontend URL` prints the workers that frontend
/// routes to, from its `/api/mesh`, with their load and state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchyard_instances_lists_a_frontends_workers_from_its_mesh_json() {
    let port = free_port().to_string();
    let args = [
        "run",
        "--num-workers",
        "2",
        "--http-host",
        "127.0.0.1",
        "--http-port",
        &port,
    ];
    let _run = WorkerProcess::start(switchyard::binary(), &args, &[], "frontend listening", START_DEADLINE);
    let url = format!("http://127.0.0.1:{port}");
    let (_, ids) = instances(&url, 2, None).await;
    let output = Command::new(switchyard::binary())
        .args(["instances", "--frontend", &url])
        .output()
        .await
        .unwrap();
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{table}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("MODEL") && lines[0].contains("INFLIGHT"),
        "{table}"
    );
    assert_eq!(lines.len(), 3, "a header and one row per worker: {table}");
    for id in &ids {
        let row = lines.iter().find(|line| line.contains(id.as_str())).expect(id);
        assert!(
            row.starts_with("mock-model") && row.contains("tcp://127.0.0.1:") && row.contains(" ok"),
            "{row}"
        );
    }
}
