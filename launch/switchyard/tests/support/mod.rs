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
