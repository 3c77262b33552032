//! Helpers every test binary of the `switchyard` command shares.

#[allow(dead_code, unreachable_pub)]
#[path = "../../../../lib/runtime/tests/support/worker_process.rs"]
pub(crate) mod worker_process;

use std::path::PathBuf;
use std::time::Duration;

/// How long a process may take to log that it is ready.
pub(crate) const START_DEADLINE: Duration = Duration::from_secs(20);

/// A port that was free a moment ago.
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The `switchyard` binary cargo built for these tests.
pub(crate) fn switchyard() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_switchyard"))
}

/// `switchyard worker mocker` with `flags`, started and ready.
pub(crate) fn start_mocker(flags: &[&str], env: &[(&str, &str)]) -> worker_process::WorkerProcess {
    let mut args = vec!["worker", "mocker"];
    args.extend_from_slice(flags);
    worker_process::WorkerProcess::start(switchyard(), &args, env, "mocker worker serving", START_DEADLINE)
}

/// `switchyard frontend` with `flags` on a free loopback port, started and
/// listening; returns it and its base URL.
pub(crate) fn start_frontend(flags: &[&str], env: &[(&str, &str)]) -> (worker_process::WorkerProcess, String) {
    let port = free_port().to_string();
    let mut args = vec!["frontend", "--http-host", "127.0.0.1", "--http-port", &port];
    args.extend_from_slice(flags);
    let frontend = worker_process::WorkerProcess::start(switchyard(), &args, env, "frontend listening", START_DEADLINE);
    (frontend, format!("http://127.0.0.1:{port}"))
}
