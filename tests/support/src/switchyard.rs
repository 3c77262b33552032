//! The `switchyard` binary under test, and its frontend and mocker worker
//! processes, started and ready.

use crate::free_port;
use crate::worker_process::WorkerProcess;
use std::path::PathBuf;
use std::time::Duration;

/// How long a process may take to log that it is ready.
pub const START_DEADLINE: Duration = Duration::from_secs(20);

/// The `switchyard` binary of this build, `target/<profile>/switchyard`
/// beside the test executable's `deps/` directory: where cargo puts it (and
/// what it names `CARGO_BIN_EXE_switchyard`) before it runs the `switchyard`
/// package's integration tests, `tests/e2e` and `tests/idle.rs`. Looked up
/// here rather than through that variable because this crate is compiled
/// once for every package's tests, not as part of that one.
pub fn binary() -> PathBuf {
    let binary = std::env::current_exe()
        .expect("the test executable has a path")
        .parent()
        .and_then(|deps| deps.parent())
        .map(|profile| profile.join("switchyard"))
        .expect("a test executable lives in target/<profile>/deps");
    assert!(
        binary.exists(),
        "{} is missing: run these tests with `cargo test -p switchyard` or `cargo test --workspace` \
         (`make test`), which build the binary first",
        binary.display()
    );
    binary
}

/// `switchyard worker mocker` with `flags`, started and ready.
pub fn start_mocker(flags: &[&str], env: &[(&str, &str)]) -> WorkerProcess {
    let mut args = vec!["worker", "mocker"];
    args.extend_from_slice(flags);
    WorkerProcess::start(binary(), &args, env, "mocker worker serving", START_DEADLINE)
}

/// `switchyard frontend` with `flags` on a free loopback port, started and
/// listening; returns it and its base URL.
pub fn start_frontend(flags: &[&str], env: &[(&str, &str)]) -> (WorkerProcess, String) {
    let port = free_port().to_string();
    let mut args = vec!["frontend", "--http-host", "127.0.0.1", "--http-port", &port];
    args.extend_from_slice(flags);
    let frontend = WorkerProcess::start(binary(), &args, env, "frontend listening", START_DEADLINE);
    (frontend, format!("http://127.0.0.1:{port}"))
}
