//! Switchyard's OpenAI-compatible HTTP frontend: `GET /v1/models`,
//! `POST /v1/chat/completions`, `POST /v1/completions` (streaming as SSE, or
//! whole), `/health`, `/live` and `/metrics`.
//!
//! It discovers models from the cards workers register under `v1/models`
//! ([`models`]), routes each request by its `model` with the occupancy-aware
//! router, and maps failures to OpenAI's error shape ([`error`]). A client
//! that disconnects cancels its request on the worker ([`respond`]).
#![forbid(unsafe_code)]

pub mod admission;
pub mod auth;
pub mod error;
pub mod http;
pub mod kv;
pub mod mesh;
pub mod metrics;
pub mod migrate;
pub mod models;
pub mod respond;
pub mod tls;
pub mod write_deadline;

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
    /// How long a worker may send nothing on a stream after its first
    /// piece before the stream counts as broken (and migrates): `30s`,
    /// `1m`; a plain number is seconds. 0 waits for ever (Dynamo's default;
    /// ours is 60 s so that a frozen worker cannot hold a request for ever).
    /// Dynamo's name.
    #[arg(long = "stream-stall-timeout-secs", env = "DYN_HTTP_BACKEND_STREAM_TIMEOUT_SECS", default_value = "60", value_parser = args::seconds(), value_name = "DURATION")]
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
    /// Serve only models whose workers register in this namespace (unset:
    /// every namespace). Dynamo's `--namespace`; it reads the same variable.
    #[arg(long, env = "DYN_NAMESPACE", value_name = "NAMESPACE")]
    pub model_namespace: Option<String>,
    /// Largest request body accepted, in MiB (413 beyond).
    #[arg(long, env = "DYN_HTTP_BODY_LIMIT_MB", default_value_t = 45)]
    pub body_limit_mb: usize,
    /// How long a client connection may take to send a request's headers, or
    /// its body, or stay idle between requests, before it is closed (or
    /// answered 408): `30s`, `500ms`; a plain number is seconds. Answers
    /// being streamed are not limited.
    #[arg(long = "http-idle-timeout-secs", env = "DYN_HTTP_IDLE_TIMEOUT_SECS", default_value = "30", value_parser = args::seconds().positive(), value_name = "DURATION")]
    pub http_idle_timeout: Duration,
    /// An API key clients must send as `Authorization: Bearer <key>`
    /// (repeatable; the variable takes a comma-separated list). With no key
    /// and no key file, the API is open.
    #[arg(
        long = "api-key",
        env = "DYN_HTTP_API_KEY",
        value_delimiter = ',',
        hide_env_values = true,
        value_name = "KEY"
    )]
    pub api_keys: Vec<String>,
    /// A file of API keys, one per line (`#` starts a comment), read at start.
    #[arg(long, env = "DYN_HTTP_API_KEY_FILE", value_name = "PATH")]
    pub api_key_file: Option<std::path::PathBuf>,
    /// Who may read `/metrics` on the API port: open, key (callers with an
    /// API key; anyone when no keys are set) or off (scrape the status port,
    /// DYN_SYSTEM_PORT, instead).
    #[arg(long, env = "DYN_HTTP_METRICS", value_enum, default_value = "key")]
    pub http_metrics: auth::MetricsAccess,
    /// Requests in flight at once across all models (0: no cap); more wait
    /// in the queue below.
    #[arg(long, env = "DYN_HTTP_MAX_INFLIGHT_REQUESTS", default_value_t = 1024)]
    pub max_inflight_requests: usize,
    /// Requests that may wait for a place at once; more get 503 at once.
    #[arg(long, env = "DYN_HTTP_MAX_QUEUED_REQUESTS", default_value_t = 256)]
    pub max_queued_requests: usize,
    /// Longest a request waits for a place before it gets 503 (`2s`,
    /// `500ms`; a plain number is milliseconds).
    #[arg(long = "http-queue-timeout-ms", env = "DYN_HTTP_QUEUE_TIMEOUT_MS", default_value = "2000", value_parser = args::milliseconds(), value_name = "DURATION")]
    pub http_queue_timeout: Duration,
    /// Requests per second per API key (one shared budget without keys);
    /// past it, 429 with Retry-After. Unset: no limit.
    #[arg(long, env = "DYN_HTTP_RATE_LIMIT_REQUESTS_PER_SECOND", value_name = "RATE")]
    pub rate_limit_requests_per_second: Option<f64>,
    /// Prompt plus generated tokens per second per API key; past it, 429.
    #[arg(long, env = "DYN_HTTP_RATE_LIMIT_TOKENS_PER_SECOND", value_name = "RATE")]
    pub rate_limit_tokens_per_second: Option<f64>,
    /// Longest wait for a request's first token from a worker; past it the
    /// request moves to another worker (within --migration-limit) or ends
    /// with 504. `2m`, `90s`; a plain number is seconds; 0 waits for ever.
    #[arg(long = "first-token-timeout-secs", env = "DYN_HTTP_FIRST_TOKEN_TIMEOUT_SECS", default_value = "120", value_parser = args::seconds(), value_name = "DURATION")]
    pub first_token_timeout: Duration,
    /// Longest a streaming client may leave a ready event unread; past it
    /// the request is cancelled (the engine frees its KV cache).
    #[arg(long = "http-write-timeout-secs", env = "DYN_HTTP_WRITE_TIMEOUT_SECS", default_value = "30", value_parser = args::seconds().positive(), value_name = "DURATION")]
    pub http_write_timeout: Duration,
    /// TLS certificate chain (PEM) for the API port; with --tls-key-path.
    #[arg(long, env = "DYN_TLS_CERT_PATH", value_name = "PATH", requires = "tls_key_path")]
    pub tls_cert_path: Option<std::path::PathBuf>,
    /// TLS private key (PEM) for the API port; with --tls-cert-path.
    #[arg(long, env = "DYN_TLS_KEY_PATH", value_name = "PATH", requires = "tls_cert_path")]
    pub tls_key_path: Option<std::path::PathBuf>,
    /// The mesh page at `/` and its JSON at `/api/mesh` (read-only; the
    /// JSON needs the API key when keys are set): on or off.
    #[arg(long, env = "DYN_HTTP_MESH_PAGE", value_enum, default_value = "on")]
    pub mesh_page: mesh::MeshPage,
}

impl FrontendArgs {
    /// The edge limits of `--max-inflight-requests` and its neighbours.
    pub fn admission_settings(&self) -> admission::AdmissionSettings {
        admission::AdmissionSettings {
            max_inflight: (self.max_inflight_requests > 0).then_some(self.max_inflight_requests),
            max_queued: self.max_queued_requests,
            queue_timeout: self.http_queue_timeout,
            requests_per_second: self.rate_limit_requests_per_second,
            tokens_per_second: self.rate_limit_tokens_per_second,
        }
    }

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
    #[error("--http-idle-timeout-secs and --http-write-timeout-secs must be above 0")]
    IdleTimeout,
    #[error(transparent)]
    ApiKeys(#[from] auth::KeyError),
    #[error(transparent)]
    Admission(#[from] admission::AdmissionError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("--tls-cert-path and --tls-key-path go together; give both or neither")]
    TlsHalf,
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
    let tls = match (&args.tls_cert_path, &args.tls_key_path) {
        (Some(cert), Some(key)) => Some(tls::acceptor(cert, key)?),
        (None, None) => None,
        _ => return Err(FrontendError::TlsHalf),
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    match tls {
        None => runtime.spawn_drain(switchyard_runtime::http_server::serve(
            listener,
            app,
            idle_timeout,
            draining,
        )),
        Some(tls) => runtime.spawn_drain(switchyard_runtime::http_server::serve_tls(
            listener,
            app,
            idle_timeout,
            draining,
            tls,
        )),
    };
    tracing::info!(address = %bound, scheme, "frontend listening");
    Ok(Frontend { address: bound, models })
}

/// Runs a frontend on its own runtime until it shuts down.
pub async fn run(runtime: Runtime, args: FrontendArgs) -> Result<(), FrontendError> {
    let drt = DistributedRuntime::from_settings(runtime.clone()).await?;
    start(&drt, &args).await?;
    runtime.root_token().cancelled().await;
    Ok(())
}
