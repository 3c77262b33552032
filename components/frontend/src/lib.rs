//! Switchyard's OpenAI-compatible HTTP frontend: `GET /v1/models`,
//! `POST /v1/chat/completions`, `POST /v1/completions` (streaming as SSE, or
//! whole), `/health`, `/live` and `/metrics`.
//!
//! It discovers models from the cards workers register under `v1/models`
//! ([`models`]), routes each request by its `model` with the occupancy-aware
//! router, and maps failures to OpenAI's error shape ([`error`]). A client
//! that disconnects cancels its request on the worker ([`respond`]).
#![forbid(unsafe_code)]

pub mod error;
pub mod http;
pub mod metrics;
pub mod migrate;
pub mod models;
pub mod respond;

#[cfg(test)]
mod tests;

use crate::http::FrontendState;
use crate::models::ModelManager;
use std::net::SocketAddr;
use switchyard_runtime::discovery::DiscoveryError;
use switchyard_runtime::distributed::{DistributedError, DistributedRuntime};
use switchyard_runtime::metrics::MetricsError;
use switchyard_runtime::routing::RouterMode;
use switchyard_runtime::runtime::Runtime;

/// Flags of `switchyard frontend` (Dynamo's names; each also reads its `DYN_*` variable).
#[derive(Debug, Clone, clap::Args)]
pub struct FrontendArgs {
    /// Address the OpenAI API listens on.
    #[arg(long, env = "DYN_HTTP_HOST", default_value = "0.0.0.0")]
    pub http_host: String,
    /// Port of the OpenAI API (0 picks a free one).
    #[arg(long, env = "DYN_HTTP_PORT", default_value_t = 8000)]
    pub http_port: u16,
    /// How each model's router picks a worker: round_robin, random, power_of_two or least_loaded.
    #[arg(long, env = "DYN_ROUTER_MODE", default_value = "least_loaded")]
    pub router_mode: RouterMode,
    /// Requests in flight per worker at which it counts as busy; when every
    /// worker is, requests get 503 with Retry-After. Unset: never busy.
    #[arg(long, env = "DYN_BUSY_THRESHOLD")]
    pub busy_threshold: Option<u64>,
    /// With a busy threshold: how long a request may wait for a worker to
    /// free up before it gets 503. 0 refuses at once.
    #[arg(long, env = "DYN_ROUTER_MAX_WAIT_MS", default_value_t = 0)]
    pub router_max_wait_ms: u64,
    /// Requests that may wait at once per model (more get 503 at once).
    #[arg(long, env = "DYN_ROUTER_MAX_QUEUED", default_value_t = 128)]
    pub router_max_queued: usize,
    /// Times one request may move to another worker when its worker dies or
    /// leaves mid-answer (0 turns migration off).
    #[arg(long, env = "DYN_MIGRATION_LIMIT", default_value_t = 3)]
    pub migration_limit: u32,
    /// Seconds a worker may send nothing on a stream before the stream
    /// counts as broken (and migrates); 0 waits for ever. Dynamo's name.
    #[arg(long, env = "DYN_HTTP_BACKEND_STREAM_TIMEOUT_SECS", default_value_t = 0.0)]
    pub stream_stall_timeout_secs: f64,
    /// Largest request body accepted, in MiB (413 beyond).
    #[arg(long, env = "DYN_HTTP_BODY_LIMIT_MB", default_value_t = 45)]
    pub body_limit_mb: usize,
    /// Seconds a client connection may take to send a request's headers, or
    /// its body, or stay idle between requests, before it is closed (or
    /// answered 408). Answers being streamed are not limited.
    #[arg(long, env = "DYN_HTTP_IDLE_TIMEOUT_SECS", default_value_t = 30.0)]
    pub http_idle_timeout_secs: f64,
}

impl Default for FrontendArgs {
    fn default() -> Self {
        Self {
            http_host: "0.0.0.0".into(),
            http_port: 8000,
            router_mode: RouterMode::LeastLoaded,
            busy_threshold: None,
            router_max_wait_ms: 0,
            router_max_queued: 128,
            migration_limit: 3,
            stream_stall_timeout_secs: 0.0,
            body_limit_mb: 45,
            http_idle_timeout_secs: 30.0,
        }
    }
}

/// Why the frontend could not start.
#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    #[error(transparent)]
    Runtime(#[from] DistributedError),
    #[error("cannot create the frontend metrics")]
    Metrics(#[from] MetricsError),
    #[error("cannot follow model cards in discovery")]
    Discovery(#[from] DiscoveryError),
    #[error(
        "--router-mode direct needs an instance per request, which the OpenAI API cannot carry; use round_robin, random, power_of_two or least_loaded"
    )]
    DirectMode,
    #[error("--stream-stall-timeout-secs must be a number of seconds ≥ 0 (got {0}); 0 waits for ever")]
    StallTimeout(f64),
    #[error("--http-idle-timeout-secs must be a number of seconds > 0 (got {0})")]
    IdleTimeout(f64),
    #[error("cannot listen on {address} (--http-host/--http-port)")]
    Bind {
        address: String,
        #[source]
        source: std::io::Error,
    },
}

/// A frontend serving in the background.
#[derive(Debug, Clone)]
pub struct Frontend {
    pub address: SocketAddr,
    pub models: ModelManager,
}

/// Starts the frontend on `drt`: follows the model cards, binds the HTTP
/// port and serves until the runtime drains (new connections stop; the
/// responses in flight finish, within the graceful-shutdown deadline).
pub async fn start(drt: &DistributedRuntime, args: &FrontendArgs) -> Result<Frontend, FrontendError> {
    let runtime = drt.runtime().clone();
    let state = FrontendState::new(drt, args).await?;
    let models = state.models.clone();
    let address = format!("{}:{}", args.http_host, args.http_port);
    let listener = tokio::net::TcpListener::bind(&address)
        .await
        .map_err(|source| FrontendError::Bind {
            address: address.clone(),
            source,
        })?;
    let bound = listener
        .local_addr()
        .map_err(|source| FrontendError::Bind { address, source })?;
    let draining = runtime.endpoint_token().clone();
    let idle_timeout = state.idle_timeout;
    let app = http::router(state);
    runtime.spawn_drain(switchyard_runtime::http_server::serve(
        listener,
        app,
        idle_timeout,
        draining,
    ));
    tracing::info!(address = %bound, "frontend listening");
    Ok(Frontend { address: bound, models })
}

/// Runs a frontend on its own runtime until it shuts down.
pub async fn run(runtime: Runtime, args: FrontendArgs) -> Result<(), FrontendError> {
    let drt = DistributedRuntime::from_settings(runtime.clone()).await?;
    start(&drt, &args).await?;
    runtime.root_token().cancelled().await;
    Ok(())
}
