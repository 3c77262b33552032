//! The frontend's HTTP surface: `fn router(state)` with the OpenAI routes
//! and the status routes. Handlers read and check the request, pick the
//! model's router, and hand the worker's stream to [`crate::respond`].

use crate::admission::{Admission, Admitted};
use crate::auth::{ApiKeys, MetricsAccess};
use crate::error::ApiError;
use crate::kv::{Booking, KvMetrics};
use crate::mesh::decisions::Decisions;
use crate::mesh::history::LoadHistory;
use crate::mesh::{self, MeshPage, MeshState};
use crate::metrics::FrontendMetrics;
use crate::migrate::{self, MigrationPolicy, migrating};
use crate::models::{KvRoute, ModelManager, RouterSettings};
use crate::respond::{self, Exchange, Route};
use crate::write_deadline::WriteDeadline;
use crate::{FrontendArgs, FrontendError};
use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use futures::StreamExt;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use switchyard_llm::model_card::ModelKind;
use switchyard_llm::openai::{ChatCompletionRequest, CompletionRequest, ModelList, ModelObject, parse_request};
use switchyard_llm::protocol::{LlmOutput, LlmRequest};
use switchyard_runtime::distributed::DistributedRuntime;
use switchyard_runtime::engine::{Context, Controller, ResponseStream};
use switchyard_runtime::error::ErrorKind;
use switchyard_runtime::routing::RouterMode;
use switchyard_runtime::runtime::Runtime;
use switchyard_runtime::status::StatusState;

/// The request-id header, accepted from the client and echoed back.
pub const REQUEST_ID: &str = "x-request-id";

/// The response header naming the worker instance (hex id, as in
/// `switchyard instances`) the request was first routed to.
pub const WORKER_ID: &str = "x-switchyard-worker-id";

/// The response header saying why a KV-routed request went where it went
/// (see [`crate::kv::Plan::explain`]).
pub const ROUTE: &str = "x-switchyard-route";

/// Longest client-supplied request id kept; longer ones are replaced.
const MAX_REQUEST_ID_LEN: usize = 128;

/// What the handlers share.
#[derive(Debug, Clone)]
pub struct FrontendState {
    pub models: ModelManager,
    pub metrics: FrontendMetrics,
    /// The process's status state, for `/metrics`.
    pub status: StatusState,
    pub runtime: Runtime,
    /// Largest request body accepted, in bytes.
    pub body_limit: usize,
    /// Migrations allowed per request.
    pub migration_limit: u32,
    /// Longest silence from a worker before its stream counts as broken.
    pub stall_timeout: Option<std::time::Duration>,
    /// Longest a client may take to send a request (headers, then body).
    pub idle_timeout: std::time::Duration,
    /// Longest a streaming client may leave a ready event unread.
    pub write_deadline: WriteDeadline,
    /// The API keys (none: open).
    pub keys: ApiKeys,
    /// Who may read `/metrics` here.
    pub metrics_access: MetricsAccess,
    /// The in-flight cap, its queue and the per-key rates.
    pub admission: Admission,
    /// The mesh page's own state: recent routing decisions and the like.
    pub mesh: MeshState,
    /// Whether `/` and `/api/mesh` are served (`--mesh-page`).
    pub mesh_page: MeshPage,
}

impl FrontendState {
    /// The state of a frontend on `drt`: registers its metrics and follows
    /// the model cards (the first snapshot is applied before this returns).
    pub async fn new(drt: &DistributedRuntime, args: &FrontendArgs) -> Result<Self, FrontendError> {
        if args.router_mode == RouterMode::Direct {
            return Err(FrontendError::DirectMode);
        }
        // The flag's parser refuses 0; this catches arguments built in code.
        if args.http_idle_timeout.is_zero() || args.http_write_timeout.is_zero() {
            return Err(FrontendError::IdleTimeout);
        }
        let kv = match args.kv_settings()? {
            Some(settings) => Some((settings, KvMetrics::register(drt.process_metrics())?)),
            None => None,
        };
        let runtime = drt.runtime().clone();
        let models = ModelManager::new(
            drt.clone(),
            RouterSettings {
                mode: args.router_mode,
                busy_threshold: args.busy_threshold,
                max_wait: args.router_max_wait,
                max_queued: args.router_max_queued,
                first_token_timeout: (!args.first_token_timeout.is_zero()).then_some(args.first_token_timeout),
            },
            kv,
            args.model_namespace.clone(),
        )?;
        let keys = ApiKeys::load(&args.api_keys, args.api_key_file.as_deref())?;
        let admission = Admission::new(args.admission_settings(), keys.ids(), drt.process_metrics())?;
        models.watch(runtime.root_token().child_token()).await?;
        let write_deadline =
            WriteDeadline::start(args.http_write_timeout, &runtime, runtime.root_token().child_token());
        let history = LoadHistory::default();
        if args.mesh_page == MeshPage::On {
            history.follow(models.clone(), &runtime, runtime.root_token().child_token());
        }
        Ok(Self {
            models,
            metrics: FrontendMetrics::register(drt.process_metrics())?,
            status: drt.status_state(),
            runtime,
            body_limit: args.body_limit_mb.saturating_mul(1024 * 1024),
            migration_limit: args.migration_limit,
            stall_timeout: (!args.stream_stall_timeout.is_zero()).then_some(args.stream_stall_timeout),
            idle_timeout: args.http_idle_timeout,
            write_deadline,
            keys,
            metrics_access: args.http_metrics,
            admission,
            mesh: MeshState {
                decisions: match args.mesh_page {
                    MeshPage::On => Decisions::default(),
                    MeshPage::Off => Decisions::with_capacity(0),
                },
                router_mode: args.router_mode,
                drt: drt.clone(),
                history,
            },
            mesh_page: args.mesh_page,
        })
    }
}

/// All routes of the frontend over `state`.
pub fn router(state: FrontendState) -> Router {
    Router::new()
        .merge(mesh::routes(state.mesh_page))
        .route("/v1/models", get(list_models))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/health", get(health))
        .route("/live", get(live))
        .route("/metrics", get(metrics))
        .with_state(state)
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

async fn list_models(State(state): State<FrontendState>, headers: HeaderMap) -> Response {
    if let Err(error) = state.keys.check(&headers) {
        return error.into_response();
    }
    let created = now_secs();
    let data = state
        .models
        .list()
        .into_iter()
        .map(|model| ModelObject {
            context_window: model.context_length(),
            max_model_len: model.context_length(),
            id: model.name,
            object: "model".into(),
            created,
            owned_by: "switchyard".into(),
        })
        .collect();
    axum::Json(ModelList {
        object: "list".into(),
        data,
    })
    .into_response()
}

/// Ready when at least one model has a worker in discovery.
async fn health(State(state): State<FrontendState>) -> Response {
    let models: Vec<String> = state
        .models
        .list()
        .into_iter()
        .filter(|m| m.has_live_worker())
        .map(|m| m.name)
        .collect();
    let (code, status) = if models.is_empty() {
        (StatusCode::SERVICE_UNAVAILABLE, "notready")
    } else {
        (StatusCode::OK, "ready")
    };
    let mut body = serde_json::json!({ "status": status, "models": models });
    // KV mode: workers routed by load only, and why (a wrong block size).
    let excluded: Vec<serde_json::Value> = state
        .models
        .list()
        .iter()
        .filter_map(|model| Some((model, model.kv.as_ref()?)))
        .flat_map(|(model, kv)| {
            model.cards.keys().filter_map(|id| {
                let reason = kv.excluded(*id)?;
                Some(serde_json::json!({ "model": model.name, "instance": format!("{id:x}"), "reason": reason }))
            })
        })
        .collect();
    if !excluded.is_empty() {
        body["kv_excluded"] = serde_json::Value::Array(excluded);
    }
    // Models claimed by more than one endpoint (`ModelManager::put`).
    let conflicts = state.models.conflicts();
    if !conflicts.is_empty() {
        body["model_conflicts"] = serde_json::to_value(conflicts).unwrap_or_default();
    }
    (code, axum::Json(body)).into_response()
}

async fn live(State(state): State<FrontendState>) -> Response {
    if state.runtime.is_shutting_down() {
        let body = serde_json::json!({ "status": "shutting_down" });
        (StatusCode::SERVICE_UNAVAILABLE, axum::Json(body)).into_response()
    } else {
        axum::Json(serde_json::json!({ "status": "live" })).into_response()
    }
}

async fn metrics(State(state): State<FrontendState>, headers: HeaderMap) -> Response {
    match state.metrics_access {
        MetricsAccess::Open => {}
        MetricsAccess::Key => {
            if let Err(error) = state.keys.check(&headers) {
                return error.into_response();
            }
        }
        MetricsAccess::Off => {
            return ApiError::not_found(
                "/metrics is not served on the API port (--http-metrics off); scrape the status port",
            )
            .into_response();
        }
    }
    switchyard_runtime::status::metrics(State(state.status)).await
}

async fn chat_completions(State(state): State<FrontendState>, headers: HeaderMap, body: Body) -> Response {
    handle(state, Route::Chat, headers, body).await
}

async fn completions(State(state): State<FrontendState>, headers: HeaderMap, body: Body) -> Response {
    handle(state, Route::Completions, headers, body).await
}

/// The client's request id when it is a sane header value, else a new one.
fn request_id(headers: &HeaderMap) -> String {
    headers
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|id| !id.is_empty() && id.len() <= MAX_REQUEST_ID_LEN)
        .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_string)
}

async fn handle(state: FrontendState, route: Route, headers: HeaderMap, body: Body) -> Response {
    let id = request_id(&headers);
    let mut response = match admit(&state, route, &headers, body, &id).await {
        Ok(response) => response,
        Err((model, stream, error)) => {
            let status = error.status;
            state
                .metrics
                .requests
                .with_label_values(&[&model, route.label(), respond::request_type(stream), "error"])
                .inc();
            if status == StatusCode::SERVICE_UNAVAILABLE && error.code == "overloaded" {
                state
                    .metrics
                    .rejections
                    .with_label_values(&[&model, route.label()])
                    .inc();
            }
            let mut response = error.into_response();
            if matches!(status, StatusCode::PAYLOAD_TOO_LARGE | StatusCode::REQUEST_TIMEOUT) {
                // The rest of the body was never read, so the connection
                // cannot carry another request: say so, or the client would
                // reuse it and see it closed under its next request.
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            response
        }
    };
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(REQUEST_ID, value);
    }
    response
}

/// The model label of a request that failed before its model was known to
/// exist: requested names are not used as labels, so a client cannot grow
/// the metric's cardinality without bound.
const UNKNOWN_MODEL: &str = "unknown";

type Refusal = (String, bool, ApiError);

/// Reads, checks and routes one request; the response streams from there.
async fn admit(
    state: &FrontendState,
    route: Route,
    headers: &HeaderMap,
    body: Body,
    id: &str,
) -> Result<Response, Refusal> {
    let refuse = |model: &str, stream: bool, error| (model.to_string(), stream, error);
    let key = state.keys.check(headers).map_err(|e| refuse(UNKNOWN_MODEL, false, e))?;
    // A place before the body is read, so the cap bounds the memory that
    // bodies take too.
    let admitted = state
        .admission
        .admit(key)
        .await
        .map_err(|e| refuse(UNKNOWN_MODEL, false, e))?;
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_none_or(|v| v.starts_with("application/json"));
    if !is_json {
        return Err(refuse(UNKNOWN_MODEL, false, ApiError::unsupported_media_type()));
    }
    let bytes = read_body(body, state.body_limit, state.idle_timeout)
        .await
        .map_err(|e| refuse(UNKNOWN_MODEL, false, e))?;
    let request = match route {
        Route::Chat => parse_request::<ChatCompletionRequest>(&bytes).map(LlmRequest::Chat),
        Route::Completions => parse_request::<CompletionRequest>(&bytes).map(LlmRequest::Completion),
    }
    .map_err(|e| refuse(UNKNOWN_MODEL, false, ApiError::invalid(e)))?;
    let stream = respond::is_streaming(&request);
    let Some(model) = state.models.get(request.model()) else {
        return Err(refuse(
            UNKNOWN_MODEL,
            stream,
            ApiError::model_not_found(request.model()),
        ));
    };
    let kind = match route {
        Route::Chat => ModelKind::Chat,
        Route::Completions => ModelKind::Completions,
    };
    if !model.serves(kind) {
        return Err(refuse(
            &model.name,
            stream,
            ApiError::wrong_route(&model.name, route.path()),
        ));
    }

    let exchange = Exchange::begin(state.metrics.clone(), &model.name, route, stream, &request);
    let controller = Controller::with_id(id);
    let request = Arc::new(request);
    let original = (state.migration_limit > 0 || state.stall_timeout.is_some()).then(|| Arc::clone(&request));
    let mut migration_limit = if migrate::opted_out(headers) {
        0
    } else {
        state.migration_limit
    };
    // A request no worker has answered yet (each one the router tried broke
    // or stayed silent) tries again, from the same migration budget as an
    // answer cut off mid-way.
    let (routed, kv_route) = loop {
        let context = Context::with_controller(Arc::clone(&request), controller.clone());
        match model.route(context, &[]).await {
            Ok(routed) => break routed,
            Err(error) if migrate::is_migratable(error.kind()) && migration_limit > 0 && !controller.is_stopped() => {
                migration_limit -= 1;
                state
                    .metrics
                    .migrations
                    .with_label_values(&[&model.name, "new_request"])
                    .inc();
                tracing::info!(model = %model.name, request_id = %id, %error, "request not routed; trying again");
            }
            Err(error) => {
                exchange.refused();
                let api = ApiError::from_request(&model.name, &error);
                if error.kind() != ErrorKind::Overloaded {
                    tracing::warn!(model = %model.name, request_id = %id, %error, "request not routed");
                }
                return Err(refuse(&model.name, stream, api));
            }
        }
    };
    let worker = routed.instance_id;
    mesh::record(&state.mesh.decisions, id, &model, worker, kv_route.as_ref(), 0);
    let (booking, route_header) = match kv_route {
        Some(KvRoute {
            booking, explanation, ..
        }) => {
            tracing::debug!(model = %model.name, request_id = %id, route = %explanation, "KV route");
            (Some(booking), Some(explanation))
        }
        None => (None, None),
    };
    // Migration (and the stall deadline) wrap the worker's stream first, so
    // a worker lost before its first piece is replaced too.
    let mut responses = match original {
        None => booked(routed.stream, booking),
        Some(original) => {
            let policy = MigrationPolicy {
                target: model.clone(),
                limit: migration_limit,
                request_id: id.to_string(),
                counter: state.metrics.migrations.clone(),
                stall_timeout: state.stall_timeout,
                decisions: state.mesh.decisions.clone(),
            };
            migrating(policy, original, routed, booking)
        }
    };
    // Wait for the first piece before answering, so that an early failure
    // (prompt too long, worker refused) gets its own HTTP status rather than
    // a 200 followed by an error event.
    let first = responses.next().await;
    if let Some(Err(error)) = &first {
        exchange.refused();
        return Err(refuse(&model.name, stream, ApiError::from_request(&model.name, error)));
    }
    let responses = charged(Box::pin(futures::stream::iter(first).chain(responses)), admitted);
    let mut response = if stream {
        respond::stream(exchange, responses, now_secs(), &state.write_deadline)
    } else {
        respond::unary(exchange, responses, now_secs()).await
    };
    if let Ok(value) = HeaderValue::from_str(&format!("{worker:x}")) {
        response.headers_mut().insert(WORKER_ID, value);
    }
    if let Some(value) = route_header.and_then(|text| HeaderValue::from_str(&text).ok()) {
        response.headers_mut().insert(ROUTE, value);
    }
    Ok(response)
}

/// `responses`, holding the request's KV booking (if any): its prefill
/// part goes at the first piece, the rest when the stream is dropped
/// (ended, cancelled by the client, or failed).
fn booked(responses: ResponseStream<LlmOutput>, booking: Option<Booking>) -> ResponseStream<LlmOutput> {
    let Some(mut booking) = booking else {
        return responses;
    };
    Box::pin(responses.inspect(move |_| booking.first_token()))
}

/// `responses`, holding the request's place under the in-flight cap until
/// it is dropped, and charging its tokens to the caller's key.
fn charged(responses: ResponseStream<LlmOutput>, admitted: Admitted) -> ResponseStream<LlmOutput> {
    Box::pin(responses.inspect(move |piece| {
        if let Ok(piece) = piece {
            admitted.charge(piece.tokens);
            if let Some(usage) = &piece.usage {
                admitted.charge(usage.prompt_tokens);
            }
        }
    }))
}

/// The body, up to `limit` bytes (413 beyond), within `deadline` (408 after).
async fn read_body(body: Body, limit: usize, deadline: std::time::Duration) -> Result<Bytes, ApiError> {
    let read = tokio::time::timeout(deadline, axum::body::to_bytes(body, limit))
        .await
        .map_err(|_| ApiError::request_timeout(deadline))?;
    read.map_err(|error| {
        let too_large =
            std::error::Error::source(&error).is_some_and(|source| source.is::<http_body_util::LengthLimitError>());
        if too_large {
            ApiError::too_large(limit)
        } else {
            ApiError::invalid(switchyard_llm::openai::InvalidRequest {
                field: None,
                message: format!("cannot read the request body: {error}"),
            })
        }
    })
}
