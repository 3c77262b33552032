//! Switchyard's runtime: everything a worker author needs to serve and call
//! endpoints on the mesh.
//!
//! - [`worker::Worker`] and [`runtime::Runtime`]: process start-up, signals, shutdown.
//! - [`distributed::DistributedRuntime`]: the façade over the planes below.
//! - [`component`]: Namespace → Component → Endpoint handles; serving, calling,
//!   publishing load.
//! - [`instance`] and [`names`]: what an instance registers, and the rules for names.
//! - [`engine`]: what a handler implements and the request [`engine::Context`].
//! - [`discovery`]: who exists (trait + the mem, file, etcd and kubernetes backends).
//! - [`request_plane`]: how requests travel (traits + the TCP, HTTP/2 and NATS transports).
//! - [`event_plane`]: how events travel (trait + the ZMQ and NATS transports).
//! - [`routing`]: where to send (pure policies + `PushRouter`, load reports in).
//! - [`status`]: `/health`, `/live`, `/metrics`, and canary checks.
//! - [`config`]: the only reader of settings; [`nats`]: the one NATS connector.
//! - [`http_server`]: serving an HTTP router with deadlines for idle clients.
//!
//! Modules form layers with no import cycle between them (a unit test in
//! `layers.rs` keeps it so): `component` sits on `distributed`, which
//! sits on the planes, which know nothing of components or routing.
#![forbid(unsafe_code)]

#[cfg(test)]
mod layers;

pub mod component;
pub mod config;
pub mod discovery;
pub mod distributed;
pub mod engine;
pub mod error;
pub mod event_plane;
pub mod http_server;
pub mod instance;
pub mod metrics;
pub mod names;
pub mod nats;
pub mod request_plane;
pub mod routing;
pub mod runtime;
pub mod status;
pub mod worker;
