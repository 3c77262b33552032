//! The mesh page: what this frontend sees of the mesh, for people (`GET /`,
//! a small page compiled into the binary) and for scripts (`GET /api/mesh`,
//! the same facts as JSON), and why each recent request went where it went
//! (`GET /api/mesh/decisions/{request_id}`).
//!
//! Read-only: nothing here changes routing, and building a view takes copies
//! under each lock, never holds one across an await. The page's files carry
//! no data, so they are served without a key; the JSON needs the API key
//! when keys are configured (the page asks for it and keeps it in the tab's
//! `sessionStorage`). `--mesh-page off` leaves all of it out.

pub mod decisions;
pub mod history;

use crate::http::FrontendState;
use crate::kv::KvMetrics;
use crate::models::Model;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use decisions::{Decision, Decisions};
use history::LoadHistory;
use serde::Serialize;
use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};
use switchyard_runtime::request_plane::Transport;
use tokio::time::Instant;

/// Whether the frontend serves the mesh page and its JSON (`--mesh-page`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum MeshPage {
    /// `/`, `/api/mesh` and the decision lookup are served.
    #[default]
    On,
    /// None of them: they answer 404.
    Off,
}

/// What the mesh routes read beyond the rest of the frontend's state.
#[derive(Debug, Clone)]
pub struct MeshState {
    /// Recent routing decisions, recorded by every routed request.
    pub decisions: Decisions,
    /// This frontend's router mode, for the header.
    pub router_mode: switchyard_runtime::routing::RouterMode,
    /// This frontend's runtime: its id, planes, uptime and their counters.
    pub drt: switchyard_runtime::distributed::DistributedRuntime,
    /// Load per worker over the last minutes (sampled only while the page is on).
    pub history: LoadHistory,
}

/// Decisions shown on the page and in `/api/mesh` (the ring keeps more, for
/// lookups by request id).
const RECENT_DECISIONS: usize = 25;

// The page, compiled in: no CDN, no build step, works offline.
const INDEX_HTML: &str = include_str!("mesh/index.html");
const MESH_JS: &str = include_str!("mesh/mesh.js");
const MESH_CSS: &str = include_str!("mesh/mesh.css");

/// The mesh routes over the frontend's state (empty when the page is off).
pub fn routes(page: MeshPage) -> Router<FrontendState> {
    match page {
        MeshPage::Off => Router::new(),
        MeshPage::On => Router::new()
            .route("/", get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }))
            .route(
                "/mesh.js",
                get(|| async { asset("text/javascript; charset=utf-8", MESH_JS) }),
            )
            .route(
                "/mesh.css",
                get(|| async { asset("text/css; charset=utf-8", MESH_CSS) }),
            )
            .route("/api/mesh", get(mesh))
            .route("/api/mesh/history", get(load_history))
            .route("/api/mesh/decisions/{request_id}", get(decision)),
    }
}

/// One of the page's files. `no-cache` so that a new binary's page is
/// picked up at once; a restrictive CSP so the page can load nothing from
/// elsewhere even if a bug tried.
fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static("default-src 'self'; img-src 'self' data:; frame-ancestors 'none'"),
            ),
        ],
        body,
    )
        .into_response()
}

async fn mesh(State(state): State<FrontendState>, headers: HeaderMap) -> Response {
    if let Err(error) = state.keys.check(&headers) {
        return error.into_response();
    }
    axum::Json(view(&state)).into_response()
}

/// `GET /api/mesh/history[?since=<at_ms>]`: the load samples, or only
/// those after the last one the caller has (what the page asks each second).
async fn load_history(State(state): State<FrontendState>, headers: HeaderMap, uri: axum::http::Uri) -> Response {
    if let Err(error) = state.keys.check(&headers) {
        return error.into_response();
    }
    // One optional number: parsed by hand rather than with a query
    // extractor (axum's `query` feature) for one parameter.
    let since = uri
        .query()
        .unwrap_or("")
        .split('&')
        .find_map(|pair| pair.strip_prefix("since="));
    let since = match since.map(str::parse::<u64>) {
        None => None,
        Some(Ok(since)) => Some(since),
        Some(Err(_)) => {
            return crate::error::ApiError::invalid(switchyard_llm::openai::InvalidRequest {
                field: Some("since".into()),
                message: "`since` must be a time in milliseconds since the Unix epoch".into(),
            })
            .into_response();
        }
    };
    let step_ms = u64::try_from(history::STEP.as_millis()).unwrap_or(u64::MAX);
    let samples = state.mesh.history.since(since);
    axum::Json(serde_json::json!({ "step_ms": step_ms, "samples": samples })).into_response()
}

async fn decision(State(state): State<FrontendState>, headers: HeaderMap, Path(request_id): Path<String>) -> Response {
    if let Err(error) = state.keys.check(&headers) {
        return error.into_response();
    }
    match state.mesh.decisions.find(&request_id) {
        Some(decision) => axum::Json(decision).into_response(),
        None => crate::error::ApiError::not_found(&format!(
            "no routing decision for request id {request_id:?} among the last {} (it may be older, or was never routed)",
            decisions::CAPACITY
        ))
        .into_response(),
    }
}

/// Everything `/api/mesh` shows.
#[derive(Debug, Serialize)]
pub struct MeshView {
    /// When this view was taken, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    pub frontend: FrontendView,
    /// Health of the KV events this frontend follows (KV mode only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kv_events: Option<KvEventsView>,
    pub models: Vec<ModelView>,
    /// The latest routing decisions, newest first.
    pub decisions: Vec<Decision>,
}

/// This frontend and the planes it uses.
#[derive(Debug, Serialize)]
pub struct FrontendView {
    pub instance_id: String,
    pub router_mode: &'static str,
    pub discovery: &'static str,
    pub request_plane: &'static str,
    pub event_plane: &'static str,
    pub uptime_seconds: f64,
    /// Since start, over all of this process's subscriptions (load reports,
    /// KV events): events known lost, and event-plane connections that ended.
    pub event_gaps: u64,
    pub event_disconnects: u64,
    /// Since start: instances this frontend's routers ejected, and requests
    /// they re-sent to another instance before any answer.
    pub router_ejections: u64,
    pub router_retries: u64,
}

/// The event plane as the KV router sees it, counted since start.
#[derive(Debug, Serialize)]
pub struct KvEventsView {
    /// Engine KV event batches applied, and refused (malformed or from a
    /// worker whose block size differs).
    pub events: u64,
    pub refused: u64,
    /// Sequence gaps seen, replays that filled them, and batches lost.
    pub gaps: u64,
    pub replays: u64,
    pub lost_batches: u64,
    /// Mean seconds from an engine's publishing to this router's applying.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mean_lag_seconds: Option<f64>,
}

/// One model and the workers that serve it.
#[derive(Debug, Serialize)]
pub struct ModelView {
    pub name: String,
    /// `namespace/component/endpoint`.
    pub endpoint: String,
    pub router_mode: &'static str,
    /// Requests waiting for a worker to stop being busy.
    pub waiting: usize,
    pub instances: Vec<InstanceView>,
}

/// One worker instance of a model.
#[derive(Debug, Serialize)]
pub struct InstanceView {
    /// Hex, as in discovery keys and the `x-switchyard-worker` header.
    pub id: String,
    pub namespace: String,
    pub component: String,
    pub endpoint: String,
    /// `tcp`, `http` or `nats`, and where on it.
    pub request_plane: &'static str,
    pub address: String,
    /// Requests this frontend has in flight there.
    pub inflight: u64,
    /// The load the worker itself last reported (all routers'), while fresh.
    pub reported_load: Option<u64>,
    /// KV mode: blocks the index holds for it, and its cache's size (card).
    pub kv_blocks: Option<usize>,
    pub kv_total_blocks: Option<u64>,
    /// `kv_blocks / kv_total_blocks`, when both are known.
    pub kv_usage: Option<f64>,
    /// KV mode: prompt blocks it already held, over prompt blocks sent to
    /// it, across the decisions still in the ring.
    pub prefix_hit_rate: Option<f64>,
    /// Why its cache is not used for routing, when it is not.
    pub kv_excluded: Option<String>,
    /// Out of selection after failures, and for how much longer.
    pub ejected: bool,
    pub ejected_for_ms: Option<u64>,
    pub consecutive_failures: u32,
    pub last_error: Option<ErrorView>,
}

#[derive(Debug, Serialize)]
pub struct ErrorView {
    pub message: String,
    pub at_ms: u64,
}

fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The view of the mesh from `state`, now.
pub fn view(state: &FrontendState) -> MeshView {
    let drt = &state.mesh.drt;
    let config = drt.runtime().config();
    let counts = drt.plane_counts();
    let recent = state.mesh.decisions.all();
    let hits = prefix_hits(&recent);
    let decisions: Vec<Decision> = recent.into_iter().rev().take(RECENT_DECISIONS).collect();
    MeshView {
        at_ms: unix_ms(SystemTime::now()),
        frontend: FrontendView {
            instance_id: format!("{:x}", drt.instance_id()),
            router_mode: state.mesh.router_mode.as_str(),
            discovery: config.discovery_backend().as_str(),
            request_plane: config.request_plane().as_str(),
            event_plane: config.event_plane().as_str(),
            uptime_seconds: drt.health().uptime_seconds(),
            event_gaps: counts.event_gaps,
            event_disconnects: counts.event_disconnects,
            router_ejections: counts.router_ejections,
            router_retries: counts.router_retries,
        },
        kv_events: state.models.kv_metrics().map(kv_events),
        models: state.models.list().iter().map(|m| model_view(m, &hits)).collect(),
        decisions,
    }
}

fn kv_events(metrics: &KvMetrics) -> KvEventsView {
    let lag = &metrics.event_lag_seconds;
    let count = lag.get_sample_count();
    KvEventsView {
        events: metrics.events.get(),
        refused: metrics.refused_events.get(),
        gaps: metrics.gaps.get(),
        replays: metrics.replays.get(),
        lost_batches: metrics.lost_batches.get(),
        mean_lag_seconds: (count > 0).then(|| lag.get_sample_sum() / count as f64),
    }
}

/// Per `(model, worker)`: prompt blocks it held and prompt blocks sent to
/// it, over the KV decisions given.
fn prefix_hits(decisions: &[Decision]) -> HashMap<(String, String), (u64, u64)> {
    let mut hits: HashMap<(String, String), (u64, u64)> = HashMap::new();
    for d in decisions {
        if let (Some(blocks), Some(overlap)) = (d.blocks, d.overlap) {
            let entry = hits.entry((d.model.clone(), d.worker.clone())).or_default();
            entry.0 += u64::from(overlap).min(blocks);
            entry.1 += blocks;
        }
    }
    hits
}

fn model_view(model: &Model, hits: &HashMap<(String, String), (u64, u64)>) -> ModelView {
    let router = &model.router;
    let now = Instant::now();
    let instances = router
        .client()
        .instances()
        .iter()
        .map(|instance| {
            let id = format!("{:x}", instance.instance_id);
            let load = router.occupancy().state(instance.instance_id, now).unwrap_or_default();
            let (request_plane, address) = match &instance.transport {
                Transport::Tcp(address) => ("tcp", address.clone()),
                Transport::Http(base) => ("http", base.clone()),
                Transport::Nats(subject) => ("nats", subject.clone()),
            };
            let kv_blocks = model.kv.as_ref().map(|kv| kv.worker_blocks(instance.instance_id));
            let kv_total_blocks = model
                .cards
                .get(&instance.instance_id)
                .and_then(|card| card.capacity.total_kv_blocks);
            let kv_usage = match (kv_blocks, kv_total_blocks) {
                (Some(used), Some(total)) if total > 0 => Some(used as f64 / total as f64),
                _ => None,
            };
            let prefix_hit_rate = hits
                .get(&(model.name.clone(), id.clone()))
                .filter(|(_, sent)| *sent > 0)
                .map(|(held, sent)| *held as f64 / *sent as f64);
            InstanceView {
                namespace: instance.namespace.clone(),
                component: instance.component.clone(),
                endpoint: instance.endpoint.clone(),
                request_plane,
                address,
                inflight: load.inflight,
                reported_load: load.reported,
                kv_blocks,
                kv_total_blocks,
                kv_usage,
                prefix_hit_rate,
                kv_excluded: model.kv.as_ref().and_then(|kv| kv.excluded(instance.instance_id)),
                ejected: load.ejected_for.is_some(),
                ejected_for_ms: load
                    .ejected_for
                    .map(|left| u64::try_from(left.as_millis()).unwrap_or(u64::MAX)),
                consecutive_failures: load.consecutive_failures,
                last_error: load.last_error.map(|e| ErrorView {
                    message: e.message,
                    at_ms: unix_ms(e.at),
                }),
                id,
            }
        })
        .collect();
    ModelView {
        name: model.name.clone(),
        endpoint: model.endpoint_path.clone(),
        router_mode: router.mode().as_str(),
        waiting: router.waiting(),
        instances,
    }
}

/// Records why the request `request_id` went to `worker`: the KV route's
/// facts in KV mode, else the loads of the chosen worker and the least
/// loaded other one just after the choice. `migration` is 0 for the first
/// choice, then how many times the request has moved.
pub fn record(
    decisions: &Decisions,
    request_id: &str,
    model: &Model,
    worker: u64,
    kv: Option<&crate::models::KvRoute>,
    migration: u32,
) {
    if !decisions.is_kept() {
        return;
    }
    let mut decision = Decision {
        request_id: request_id.to_string(),
        model: model.name.clone(),
        at_ms: unix_ms(SystemTime::now()),
        mode: model.router.mode().as_str(),
        worker: format!("{worker:x}"),
        migration,
        explanation: String::new(),
        blocks: None,
        index: None,
        overlap: None,
        cost: None,
        load: None,
        runner_up: None,
    };
    match kv {
        Some(route) => {
            decision.explanation = route.explanation.clone();
            decision.blocks = Some(route.request_blocks);
            decision.index = Some(if route.approximate { "approximate" } else { "events" });
            if let Some(choice) = &route.choice {
                decision.overlap = Some(choice.chosen.overlap_blocks);
                decision.cost = Some(choice.chosen.cost);
                decision.runner_up = choice.runner_up.map(|r| decisions::RunnerUp {
                    worker: r.worker.to_string(),
                    overlap: Some(r.overlap_blocks),
                    cost: Some(r.cost),
                    load: None,
                });
            }
        }
        None => {
            let occupancy = model.router.occupancy();
            let load = occupancy.load(worker);
            let runner_up = model
                .router
                .client()
                .instance_ids()
                .into_iter()
                .filter(|id| *id != worker)
                .map(|id| (occupancy.load(id), id))
                .min();
            decision.load = Some(load);
            decision.explanation = format!("mode={};worker={worker:x};load={load}", decision.mode);
            if let Some((other_load, other)) = runner_up {
                decision
                    .explanation
                    .push_str(&format!(";runner_up={other:x};runner_up_load={other_load}"));
                decision.runner_up = Some(decisions::RunnerUp {
                    worker: format!("{other:x}"),
                    overlap: None,
                    cost: None,
                    load: Some(other_load),
                });
            }
        }
    }
    decisions.record(decision);
}
