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
pub mod kv;
pub mod metrics;
pub mod migrate;
pub mod models;
pub mod respond;

#[cfg(test)]
mod tests;

use crate::http::FrontendState;
use crate::models::ModelManager;
use std::net::SocketAddr;
use std::time::Duration;
use switchyard_runtime::config::args;
use switchyard_runtime::discovery::DiscoveryError;
use switchyard_runtime::distributed::{DistributedError, DistributedRuntime};
use switchyard_runtime::metrics::MetricsError;
use switchyard_runtime::routing::RouterMode;
use switchyard_runtime::runtime::Runtime;

/// Flags of `switchyard frontend` (Dynamo's names; each also reads its
/// `DYN_*` variable). Each default is written once, in its attribute.
#[derive(Debug, Clone, clap::Args)]
pub struct FrontendArgs {
    /// Address the OpenAI API listens on.
    #[arg(long, env = "DYN_HTTP_HOST", default_value = "0.0.0.0")]
    pub http_host: String,
    /// Port of the OpenAI API (0 picks a free one).
    #[arg(long, env = "DYN_HTTP_PORT", default_value_t = 8000)]
    pub http_port: u16,
    /// How each model's router picks a worker: round_robin, random,
    /// power_of_two, least_loaded, or kv (by cached prompt prefix and load).
    #[arg(long, env = "DYN_ROUTER_MODE", default_value = "least_loaded")]
    pub router_mode: RouterMode,
    /// Requests in flight per worker at which it counts as busy; when every
    /// worker is, requests get 503 with Retry-After. Unset: never busy.
    #[arg(long, env = "DYN_BUSY_THRESHOLD")]
    pub busy_threshold: Option<u64>,
    /// With a busy threshold: how long a request may wait for a worker to
    /// free up before it gets 503 (`500ms`, `2s`; a plain number is
    /// milliseconds). 0 refuses at once.
    #[arg(long = "router-max-wait-ms", env = "DYN_ROUTER_MAX_WAIT_MS", default_value = "0", value_parser = args::milliseconds(), value_name = "DURATION")]
    pub router_max_wait: Duration,
    /// Requests that may wait at once per model (more get 503 at once).
    #[arg(long, env = "DYN_ROUTER_MAX_QUEUED", default_value_t = 128)]
    pub router_max_queued: usize,
    /// Times one request may move to another worker when its worker dies or
    /// leaves mid-answer (0 turns migration off).
    #[arg(long, env = "DYN_MIGRATION_LIMIT", default_value_t = 3)]
    pub migration_limit: u32,
    /// How long a worker may send nothing on a stream before the stream
    /// counts as broken (and migrates): `30s`, `1m`; a plain number is
    /// seconds. 0 waits for ever. Dynamo's name.
    #[arg(long = "stream-stall-timeout-secs", env = "DYN_HTTP_BACKEND_STREAM_TIMEOUT_SECS", default_value = "0", value_parser = args::seconds(), value_name = "DURATION")]
    pub stream_stall_timeout: Duration,
    /// KV mode: weight of a worker's prefill work (the prompt blocks it does
    /// not hold yet) against its decode work in the cost. 0 routes on load
    /// alone. Dynamo's name.
    #[arg(
        long = "kv-overlap-score-weight",
        visible_alias = "router-kv-overlap-score-weight",
        env = "DYN_ROUTER_KV_OVERLAP_SCORE_WEIGHT",
        default_value_t = 1.0
    )]
    pub kv_overlap_score_weight: f64,
    /// KV mode: 0 picks the cheapest worker; above 0 draws one with
    /// probability falling with its normalised cost (softmax), spreading load.
    #[arg(long, env = "DYN_ROUTER_TEMPERATURE", default_value_t = 0.0)]
    pub router_temperature: f64,
    /// KV mode: tokens per KV block, for workers whose model card does not
    /// say (cards that do win).
    #[arg(long, env = "DYN_KV_CACHE_BLOCK_SIZE", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub kv_cache_block_size: u32,
    /// KV mode: subscribe to the engines' KV events (`--no-router-kv-events`
    /// scores every worker from what this router sent it, for two minutes).
    #[arg(long = "router-kv-events", env = "DYN_ROUTER_USE_KV_EVENTS", default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub router_kv_events: bool,
    #[arg(long = "no-router-kv-events", hide = true, action = clap::ArgAction::SetTrue)]
    pub no_router_kv_events: bool,
    /// Largest request body accepted, in MiB (413 beyond).
    #[arg(long, env = "DYN_HTTP_BODY_LIMIT_MB", default_value_t = 45)]
    pub body_limit_mb: usize,
    /// How long a client connection may take to send a request's headers, or
    /// its body, or stay idle between requests, before it is closed (or
    /// answered 408): `30s`, `500ms`; a plain number is seconds. Answers
    /// being streamed are not limited.
    #[arg(long = "http-idle-timeout-secs", env = "DYN_HTTP_IDLE_TIMEOUT_SECS", default_value = "30", value_parser = args::seconds().positive(), value_name = "DURATION")]
    pub http_idle_timeout: Duration,
}

impl FrontendArgs {
    /// The KV router's settings, checked; `None` outside KV mode.
    pub fn kv_settings(&self) -> Result<Option<kv::KvSettings>, FrontendError> {
        if self.router_mode != RouterMode::Kv {
            return Ok(None);
        }
        let cost = switchyard_kv_router::select::CostConfig {
            overlap_credit: 1.0,
            prefill_scale: self.kv_overlap_score_weight,
            temperature: self.router_temperature,
        };
        cost.validate().map_err(FrontendError::KvSettings)?;
        Ok(Some(kv::KvSettings {
            cost,
            block_size: self.kv_cache_block_size,
            use_events: self.router_kv_events && !self.no_router_kv_events,
        }))
    }
}

impl Default for FrontendArgs {
    /// The flags' defaults, ignoring the environment.
    fn default() -> Self {
        args::defaults()
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
        "--router-mode direct needs an instance per request, which the OpenAI API cannot carry; use round_robin, random, power_of_two, least_loaded or kv"
    )]
    DirectMode,
    #[error("invalid KV router setting (--kv-overlap-score-weight, --router-temperature)")]
    KvSettings(#[source] switchyard_kv_router::select::InvalidCostConfig),
    #[error("--http-idle-timeout-secs must be above 0")]
    IdleTimeout,
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
