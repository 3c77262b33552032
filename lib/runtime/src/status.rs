//! The system status server: `/live`, `/health`, `/metrics` and `/metadata`
//! for Kubernetes probes and Prometheus, built as `router(state)` so every
//! route is tested without a socket. It only reads state; nothing it serves
//! changes anything.
//!
//! Readiness is per endpoint ([`SystemHealth`]): an endpoint is ready once it
//! serves (or, when it has a canary, once its first check passes), and turns
//! notready when it starts draining or its canary fails. The process is ready
//! when every endpoint it serves is; before it serves any, it reports
//! `DYN_SYSTEM_STARTING_HEALTH_STATUS`. Liveness is separate: `/live` fails
//! only once the runtime is stopping, never because an endpoint is warming up
//! or draining.

pub(crate) mod canary;

use crate::config::SystemConfig;
use crate::instance::Instance;
use crate::metrics::ProcessMetrics;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus::Encoder;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Readiness of the endpoints this process serves.
pub struct SystemHealth {
    started: Instant,
    starting_ready: bool,
    /// Cancelled when the runtime stops: the process can no longer work.
    stopping: CancellationToken,
    /// Cancelled when the runtime starts draining: the process is not ready
    /// any more, even once it has no endpoints left.
    draining: CancellationToken,
    endpoints: RwLock<BTreeMap<String, EndpointHealth>>,
    /// The event plane's connection, when it has a server to be connected to (NATS).
    event_plane: RwLock<Option<EventPlaneState>>,
}

/// Reads the event plane's connection state: `connected` or `connecting`.
type EventPlaneState = Box<dyn Fn() -> &'static str + Send + Sync>;

#[derive(Debug, Clone)]
struct EndpointHealth {
    ready: bool,
    /// Draining endpoints stay notready whatever a canary says.
    draining: bool,
    instance: Instance,
}

impl std::fmt::Debug for SystemHealth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SystemHealth")
            .field("started", &self.started)
            .field("endpoints", &self.read())
            .finish_non_exhaustive()
    }
}

impl SystemHealth {
    pub(crate) fn new(starting_ready: bool, stopping: CancellationToken, draining: CancellationToken) -> Self {
        Self {
            started: Instant::now(),
            starting_ready,
            stopping,
            draining,
            endpoints: RwLock::new(BTreeMap::new()),
            event_plane: RwLock::new(None),
        }
    }

    /// Reports the event plane's connection in `/health` from now on. It
    /// does not make the process notready: it serves without events.
    pub(crate) fn set_event_plane(&self, state: EventPlaneState) {
        *self.event_plane.write().unwrap_or_else(|p| p.into_inner()) = Some(state);
    }

    /// Adds (or updates) a served endpoint, keyed by `namespace/component/endpoint`.
    pub(crate) fn serve(&self, instance: &Instance, ready: bool) {
        let path = instance.target().endpoint;
        self.write().insert(
            path,
            EndpointHealth {
                ready,
                draining: false,
                instance: instance.clone(),
            },
        );
    }

    /// Records a canary's result (ignored once the endpoint drains).
    pub(crate) fn canary_result(&self, path: &str, ready: bool) {
        if let Some(endpoint) = self.write().get_mut(path)
            && !endpoint.draining
        {
            endpoint.ready = ready;
        }
    }

    /// The endpoint starts draining: notready from now on.
    pub(crate) fn begin_drain(&self, path: &str) {
        if let Some(endpoint) = self.write().get_mut(path) {
            endpoint.draining = true;
            endpoint.ready = false;
        }
    }

    /// Forgets an endpoint that is no longer served.
    pub(crate) fn forget(&self, path: &str) {
        self.write().remove(path);
    }

    /// Whether `path` is currently ready.
    pub fn is_ready(&self, path: &str) -> Option<bool> {
        self.read().get(path).map(|e| e.ready)
    }

    pub fn is_live(&self) -> bool {
        !self.stopping.is_cancelled()
    }

    pub fn uptime_seconds(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    fn report(&self) -> HealthReport {
        let endpoints = self.read();
        let ready = if self.draining.is_cancelled() {
            false
        } else if endpoints.is_empty() {
            self.starting_ready
        } else {
            endpoints.values().all(|e| e.ready)
        };
        let event_plane = self
            .event_plane
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|state| state());
        HealthReport {
            status: status_word(ready),
            uptime_seconds: self.uptime_seconds(),
            event_plane,
            endpoints: endpoints
                .iter()
                .map(|(path, e)| (path.clone(), status_word(e.ready)))
                .collect(),
        }
    }

    fn instances(&self) -> Vec<Instance> {
        self.read().values().map(|e| e.instance.clone()).collect()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, EndpointHealth>> {
        // Updates are single insert/remove/flag writes: a poisoned map is still consistent.
        self.endpoints.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, EndpointHealth>> {
        self.endpoints.write().unwrap_or_else(|p| p.into_inner())
    }
}

fn status_word(ready: bool) -> &'static str {
    if ready { "ready" } else { "notready" }
}

/// The body of `/health`.
#[derive(Debug, Serialize)]
struct HealthReport {
    status: &'static str,
    uptime_seconds: f64,
    /// `connected` or `connecting`, for an event plane with a server (NATS).
    #[serde(skip_serializing_if = "Option::is_none")]
    event_plane: Option<&'static str>,
    endpoints: BTreeMap<String, &'static str>,
}

/// What the routes read.
#[derive(Clone)]
pub struct StatusState {
    pub(crate) health: Arc<SystemHealth>,
    pub(crate) metrics: ProcessMetrics,
    pub(crate) instance_id: u64,
    /// Refreshes scrape-time gauges (uptime, discovery lease) before `/metrics`.
    pub(crate) before_scrape: Arc<dyn Fn() + Send + Sync>,
}

impl std::fmt::Debug for StatusState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatusState")
            .field("health", &self.health)
            .field("instance_id", &self.instance_id)
            .finish_non_exhaustive()
    }
}

/// The status routes over `state`: the configured health and live paths,
/// `/metrics` and `/metadata`.
pub fn router(state: StatusState, config: &SystemConfig) -> Router {
    Router::new()
        .route(config.health_path(), get(health))
        .route(config.live_path(), get(live))
        .route("/metrics", get(metrics))
        .route("/metadata", get(metadata))
        .with_state(state)
}

async fn health(State(state): State<StatusState>) -> Response {
    let report = state.health.report();
    let code = if report.status == "ready" {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, axum::Json(report)).into_response()
}

async fn live(State(state): State<StatusState>) -> Response {
    let live = state.health.is_live();
    let code = if live {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::json!({ "status": if live { "live" } else { "stopping" } });
    (code, axum::Json(body)).into_response()
}

/// `GET /metrics`: the process registry in Prometheus text format (also
/// mounted by servers with their own routes, like the frontend).
pub async fn metrics(State(state): State<StatusState>) -> Response {
    (state.before_scrape)();
    state.metrics.uptime.set(state.health.uptime_seconds());
    let encoder = prometheus::TextEncoder::new();
    let mut body = Vec::new();
    if let Err(error) = encoder.encode(&state.metrics.root().registry().gather(), &mut body) {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode metrics: {error}"),
        )
            .into_response();
    }
    ([(header::CONTENT_TYPE, encoder.format_type().to_string())], body).into_response()
}

async fn metadata(State(state): State<StatusState>) -> Response {
    let body = serde_json::json!({
        "instance_id": format!("{:x}", state.instance_id),
        "endpoints": state.health.instances(),
    });
    axum::Json(body).into_response()
}
