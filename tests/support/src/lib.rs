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

/// A loopback port nothing listens on right now (bound, then released), for
/// a server a test is about to start. Another process may take it in
/// between.
pub fn free_port() -> u16 {
    free_ports(1)[0]
}

/// `n` distinct loopback ports nothing listens on right now: all bound at
/// once before any is released, so no two are the same (successive calls
/// to [`free_port`] may hand out one port twice).
pub fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("a loopback port can be bound"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("a bound socket has an address").port())
        .collect()
}
