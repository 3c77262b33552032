//! Fixtures shared by Switchyard's tests and benches, in every crate of the
//! workspace: real etcd and NATS servers on free loopback ports
//! ([`etcd_server`], [`nats_server`]), processes under test with their logs
//! ([`worker_process`], [`switchyard`] for the `switchyard` binary), and an
//! in-memory Kubernetes API server ([`fake_api`]). Used only as a
//! dev-dependency; nothing here ships.
//!
//! It must not depend on `switchyard-runtime` (nor on any crate that does).
//! The runtime's unit tests (`#[cfg(test)]` in `lib/runtime/src`) use these
//! fixtures, and a dev-dependency that depends back on the runtime would
//! compile a second copy of it beside the one under test, whose types do not
//! match. Nothing here needs the runtime's types: the servers are external
//! processes, and the fake API server speaks JSON over HTTP — a kube client
//! for it is built by the test from [`fake_api::FakeApiServer::url`], so this
//! crate needs neither kube-rs nor the `kubernetes` feature.

pub mod etcd_server;
pub mod fake_api;
pub mod nats_server;
pub mod switchyard;
pub mod worker_process;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::Once;

/// A fresh directory for one fixture's files, under this test process's
/// own directory in the system's temp directory
/// (`switchyard-test-{pid}/{kind}-{random}`). The fixture removes it when
/// dropped; fixtures held in `static`s never are, so the first call in each
/// process also removes the directories of test processes that are gone.
pub fn scratch_dir(kind: &str) -> PathBuf {
    static SWEPT: Once = Once::new();
    SWEPT.call_once(|| remove_scratch_of_gone_processes(&std::env::temp_dir()));
    let dir = std::env::temp_dir()
        .join(format!("{SCRATCH_PREFIX}{}", std::process::id()))
        .join(format!("{kind}-{:016x}", rand::random::<u64>()));
    std::fs::create_dir_all(&dir).expect("the temp directory is writable");
    dir
}

/// A directory removed when this is dropped.
#[derive(Debug)]
pub struct RemovedOnDrop(pub PathBuf);

impl Drop for RemovedOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What a scratch directory's name starts with, before its process id.
pub const SCRATCH_PREFIX: &str = "switchyard-test-";

/// Removes the scratch directories in `temp` of processes that are gone
/// (public for its test, in `tests/e2e`).
pub fn remove_scratch_of_gone_processes(temp: &Path) {
    let Ok(entries) = std::fs::read_dir(temp) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|name| name.strip_prefix(SCRATCH_PREFIX))
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// A loopback port nothing listens on right now (bound, then released), for
/// a server a test is about to start. Another process may take it in
/// between.
pub fn free_port() -> u16 {
    free_ports(1)[0]
}

/// Where [`free_ports`] looks: below the kernel's ephemeral range (Linux
/// hands out 32768–60999 by default for `bind(0)` and outgoing
/// connections), and below the 20000+ base the local-cluster script test
/// draws its own ports from. A port handed out from the ephemeral range
/// could be taken by any process's next `bind(0)` or connection before the
/// test's server binds it — the chaos run lost a worker that way, its
/// status port taken by another worker's KV event socket.
const PORTS: std::ops::Range<u16> = 10_000..20_000;

/// `n` distinct loopback ports nothing listens on right now: all bound at
/// once before any is released, so no two are the same (successive calls
/// to [`free_port`] may hand out one port twice). Drawn at random from
/// [`PORTS`] when the kernel's ephemeral range lies above it, else from the
/// kernel.
pub fn free_ports(n: usize) -> Vec<u16> {
    let mut listeners = Vec::with_capacity(n);
    if ephemeral_ports_start().is_some_and(|start| start >= PORTS.end) {
        let mut tries = 0;
        while listeners.len() < n && tries < 100 * n {
            tries += 1;
            if let Ok(listener) = TcpListener::bind(("127.0.0.1", rand::random_range(PORTS))) {
                listeners.push(listener);
            }
        }
    }
    while listeners.len() < n {
        listeners.push(TcpListener::bind("127.0.0.1:0").expect("a loopback port can be bound"));
    }
    listeners
        .iter()
        .map(|l| l.local_addr().expect("a bound socket has an address").port())
        .collect()
}

/// The first port of the kernel's ephemeral range, where it can be read.
fn ephemeral_ports_start() -> Option<u16> {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    range.split_whitespace().next()?.parse().ok()
}
