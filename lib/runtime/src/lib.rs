//! Switchyard's runtime: everything a worker author needs to serve and call
//! endpoints on the mesh.
//!
//! - [`worker::Worker`] and [`runtime::Runtime`]: process start-up, signals, shutdown.
//! - [`distributed::DistributedRuntime`]: the façade over the planes below.
//! - [`component`]: Namespace → Component → Endpoint → Instance; serving and calling.
//! - [`engine`]: what a handler implements and the request [`engine::Context`].
//! - [`discovery`]: who exists (trait + backends).
//! - [`request_plane`]: how requests travel (trait + the TCP transport).
//! - [`routing`]: where to send (pure policies + `PushRouter`).
//! - [`config`]: the only reader of settings.
//! - [`http_server`]: serving an HTTP router with deadlines for idle clients.
#![forbid(unsafe_code)]

pub mod component;
pub mod config;
pub mod discovery;
pub mod distributed;
pub mod engine;
pub mod error;
pub mod event_plane;
pub mod http_server;
pub mod metrics;
pub mod request_plane;
pub mod routing;
pub mod runtime;
pub mod status;
pub mod worker;
