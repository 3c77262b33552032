//! A Switchyard worker in front of vLLM's OpenAI servers.
//!
//! - **attach** (`--attach URL[,URL…]`): servers that are already running.
//!   Each is checked (`GET /v1/models` must list `--model`) and becomes one
//!   instance in discovery, with its own id.
//! - **managed** (`--managed`): `--replicas` children of `vllm serve` are
//!   started on free ports ([`managed`]), awaited until healthy, then
//!   attached; they are stopped when the worker stops.
//!
//! Either way what each server offers is found out before it registers
//! ([`probe`]: liveness route, load gauges, token ids, message
//! continuation) and goes into its model card. Each instance forwards
//! requests ([`forward`]), publishes the server's gauges as its load (or
//! its in-flight count), and follows the server's health ([`monitor`]). Its model card tells KV-aware routers where the engine
//! publishes its KV events, its block size and its tokenizer ([`kv`]).
#![forbid(unsafe_code)]

pub mod check;
pub mod forward;
pub mod kv;
pub mod managed;
pub mod monitor;
pub mod probe;

use crate::check::{CheckError, check_model};
use crate::kv::{EventPorts, KvError};
use crate::managed::{ManagedError, ManagedVllm, free_ports, resolve_command};
use crate::monitor::{Backend, EngineFacts};
use std::path::PathBuf;
use std::time::Duration;
use switchyard_llm::model_card::KvEventsSource;
use switchyard_runtime::component::endpoint::EndpointError;
use switchyard_runtime::config::args::{self, EndpointArgs};
use switchyard_runtime::distributed::{DistributedError, DistributedRuntime};
use switchyard_runtime::names::NameError;
use switchyard_runtime::runtime::Runtime;

/// Context length registered when the server does not report `max_model_len`.
const DEFAULT_CONTEXT_LENGTH: u32 = 8192;

/// The shortest `--health-interval-ms`; shorter ones are raised to it, so
/// that `0` does not poll the server in a busy loop.
const MIN_HEALTH_INTERVAL: Duration = Duration::from_millis(10);

/// Flags of `switchyard worker vllm`.
#[derive(Debug, Clone, clap::Args)]
pub struct VllmArgs {
    /// Running vLLM servers to attach to (comma-separated base URLs).
    #[arg(long, env = "DYN_VLLM_ATTACH", value_delimiter = ',', conflicts_with = "managed")]
    pub attach: Vec<String>,
    /// Start and supervise `vllm serve` children instead.
    #[arg(long, env = "DYN_VLLM_MANAGED")]
    pub managed: bool,
    /// The model to serve (as vLLM names it; clients use this name).
    #[arg(long, env = "DYN_MODEL_NAME")]
    pub model: String,
    /// One argument for `vllm serve` (managed; repeat for more, e.g. `--vllm-arg=--dtype --vllm-arg=half`).
    #[arg(long = "vllm-arg", allow_hyphen_values = true)]
    pub vllm_args: Vec<String>,
    /// Children to start (managed).
    #[arg(long, env = "DYN_VLLM_REPLICAS", default_value_t = 1)]
    pub replicas: usize,
    /// The vLLM executable (managed).
    #[arg(long, env = "DYN_VLLM_COMMAND", default_value = "vllm")]
    pub vllm_command: String,
    /// How long a child may take to answer /health (managed; loading weights
    /// is slow): `10m`, `90s`; a plain number is seconds.
    #[arg(long = "startup-timeout-secs", env = "DYN_VLLM_STARTUP_TIMEOUT_SECS", default_value = "600", value_parser = args::seconds(), value_name = "DURATION")]
    pub startup_timeout: Duration,
    /// Between SIGTERM and SIGKILL when stopping a child (managed); a plain
    /// number is seconds. Kept under the worker's 5 s exit grace after
    /// draining, so the children are always stopped by the worker and never
    /// by its own abort.
    #[arg(long = "stop-grace-secs", env = "DYN_VLLM_STOP_GRACE_SECS", default_value = "4", value_parser = args::seconds(), value_name = "DURATION")]
    pub stop_grace: Duration,
    /// Bound on each check of a server (model list, health); a plain number is seconds.
    #[arg(long = "check-timeout-secs", env = "DYN_VLLM_CHECK_TIMEOUT_SECS", default_value = "5", value_parser = args::seconds(), value_name = "DURATION")]
    pub check_timeout: Duration,
    /// Longest wait to open a connection to a server; a plain number is
    /// seconds.
    #[arg(long = "engine-connect-timeout-secs", env = "DYN_VLLM_CONNECT_TIMEOUT_SECS", default_value = "5", value_parser = args::seconds().positive(), value_name = "DURATION")]
    pub engine_connect_timeout: Duration,
    /// Longest a server may send nothing while it owes an answer (its
    /// headers, or the next piece of a stream, the first token included);
    /// past it the request fails as timed out and the frontend may move it.
    #[arg(long = "engine-read-timeout-secs", env = "DYN_VLLM_READ_TIMEOUT_SECS", default_value = "120", value_parser = args::seconds().positive(), value_name = "DURATION")]
    pub engine_read_timeout: Duration,
    /// How often each server's /health is polled (10 ms at the shortest); a
    /// plain number is milliseconds.
    #[arg(long = "health-interval-ms", env = "DYN_VLLM_HEALTH_INTERVAL_MS", default_value = "1000", value_parser = args::milliseconds(), value_name = "DURATION")]
    pub health_interval: Duration,
    /// Name the engines' KV event streams in the model cards, for KV-aware
    /// routers. Managed: each child is started with prefix caching and a
    /// `--kv-events-config` on ports of its own. Attach: the cards name
    /// `--kv-events-endpoint`.
    #[arg(long, env = "DYN_VLLM_KV_EVENTS", default_value_t = true, action = clap::ArgAction::Set)]
    pub kv_events: bool,
    /// Where each attached server's engine publishes its KV events (attach;
    /// comma-separated `tcp://HOST:PORT`, one per `--attach` URL, same order).
    #[arg(long, env = "DYN_VLLM_KV_EVENTS_ENDPOINT", value_delimiter = ',')]
    pub kv_events_endpoint: Vec<String>,
    /// Each attached engine's KV event replay address (attach; one per
    /// `--kv-events-endpoint`, or none).
    #[arg(long, env = "DYN_VLLM_KV_EVENTS_REPLAY_ENDPOINT", value_delimiter = ',')]
    pub kv_events_replay_endpoint: Vec<String>,
    /// The topic the attached engines publish on (attach; vLLM's default is empty).
    #[arg(long, env = "DYN_VLLM_KV_EVENTS_TOPIC", default_value = "")]
    pub kv_events_topic: String,
    /// Tokens per KV-cache block of the engines (vLLM's default: 16). Managed:
    /// passed to the children as `--block-size` unless a `--vllm-arg` sets it.
    #[arg(long, env = "DYN_VLLM_KV_CACHE_BLOCK_SIZE", value_parser = clap::value_parser!(u64).range(1..))]
    pub kv_cache_block_size: Option<u64>,
    /// A local Hugging Face model directory with the engines' `tokenizer.json`,
    /// named in the cards so routers tokenize as the engines do.
    #[arg(long, env = "DYN_VLLM_TOKENIZER_DIR", value_name = "DIR")]
    pub tokenizer_dir: Option<PathBuf>,
    /// The endpoint this worker serves (`--namespace`, `--component`, `--endpoint`).
    #[command(flatten)]
    pub identity: EndpointArgs,
}

/// Why the vLLM worker could not start.
#[derive(Debug, thiserror::Error)]
pub enum VllmError {
    #[error("give --attach URL[,URL…] to use running vLLM servers, or --managed to start them")]
    NoMode,
    #[error("--replicas must be at least 1 (got 0)")]
    NoReplicas,
    #[error("{url:?} is not an http:// base URL (--attach; https is not supported yet)")]
    BadUrl { url: String },
    #[error("cannot build the HTTP client for the servers")]
    HttpClient(#[source] reqwest::Error),
    #[error(transparent)]
    Check(#[from] CheckError),
    #[error(transparent)]
    Managed(#[from] ManagedError),
    #[error(transparent)]
    Kv(#[from] KvError),
    #[error(transparent)]
    Name(#[from] NameError),
    #[error(transparent)]
    Runtime(#[from] DistributedError),
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
}

/// The HTTP client for the servers: no wait on them is unbounded.
pub fn engine_client(connect: Duration, read: Duration) -> Result<reqwest::Client, VllmError> {
    reqwest::Client::builder()
        .connect_timeout(connect)
        .read_timeout(read)
        .build()
        .map_err(VllmError::HttpClient)
}

/// Runs the worker until the runtime shuts down: checks (or starts) the
/// servers, serves one instance per server, and on shutdown drains them,
/// then stops any children.
pub async fn run(runtime: Runtime, args: VllmArgs) -> Result<(), VllmError> {
    let http = engine_client(args.engine_connect_timeout, args.engine_read_timeout)?;
    let check_timeout = args.check_timeout;
    let tokenizer = kv::tokenizer(args.tokenizer_dir.as_deref())?;
    if !args.kv_events && !args.kv_events_endpoint.is_empty() {
        tracing::info!("--kv-events false: the cards name no KV event endpoints, --kv-events-endpoint is not used");
    }
    let mut children = Vec::new();
    let (servers, block_size): (Vec<Server>, u64) = if args.managed {
        if args.replicas == 0 {
            return Err(VllmError::NoReplicas);
        }
        for (flag, given) in [
            ("--kv-events-endpoint", &args.kv_events_endpoint),
            ("--kv-events-replay-endpoint", &args.kv_events_replay_endpoint),
        ] {
            if !given.is_empty() {
                return Err(KvError::AttachOnly { flag }.into());
            }
        }
        let plan = kv::managed_plan(&args.vllm_args, args.kv_events, args.kv_cache_block_size)?;
        // The command search path, from the settings (`PATH`), as a shell would use it.
        let path = Some(runtime.config().command_search_path().as_str()).filter(|p| !p.is_empty());
        let command = resolve_command(&args.vllm_command, path).ok_or_else(|| ManagedError::MissingCommand {
            command: args.vllm_command.clone(),
        })?;
        let setpriv = resolve_command("setpriv", path);
        if setpriv.is_none() {
            tracing::warn!(
                "setpriv (util-linux) is not installed: a SIGKILLed worker would leave its vLLM children running"
            );
        }
        // Routers reach the children's event ports where they reach this
        // worker's request plane.
        let host = runtime.config().tcp().host().clone();
        let mut servers = Vec::new();
        for _ in 0..args.replicas {
            let ports = free_ports(3).map_err(|e| ManagedError::Spawn {
                command: command.display().to_string(),
                reason: format!("no free port: {e}"),
            })?;
            let events = args.kv_events.then_some(EventPorts {
                publish: ports[1],
                replay: ports[2],
            });
            let mut child_args = plan.leading_args.clone();
            if let Some(events) = &events {
                child_args.extend(["--kv-events-config".to_string(), events.vllm_config()]);
            }
            child_args.extend(args.vllm_args.iter().cloned());
            match ManagedVllm::start(
                &command,
                setpriv.as_deref(),
                ports[0],
                &args.model,
                &child_args,
                &http,
                args.startup_timeout,
            )
            .await
            {
                Ok(child) => {
                    servers.push(Server {
                        url: child.base_url.clone(),
                        events: events.map(|e| e.source(&host)),
                    });
                    children.push(child);
                }
                Err(error) => {
                    stop_children(children, args.stop_grace).await;
                    return Err(error.into());
                }
            }
        }
        (servers, plan.block_size)
    } else {
        if args.attach.is_empty() {
            return Err(VllmError::NoMode);
        }
        for url in &args.attach {
            if !url.starts_with("http://") {
                return Err(VllmError::BadUrl { url: url.clone() });
            }
        }
        let sources = if args.kv_events {
            kv::attach_sources(
                &args.kv_events_endpoint,
                &args.kv_events_replay_endpoint,
                &args.kv_events_topic,
                args.attach.len(),
            )?
        } else {
            vec![None; args.attach.len()]
        };
        let servers = args
            .attach
            .iter()
            .zip(sources)
            .map(|(url, events)| Server {
                url: url.trim_end_matches('/').to_string(),
                events,
            })
            .collect();
        (servers, args.kv_cache_block_size.unwrap_or(kv::VLLM_BLOCK_SIZE))
    };

    let facts = EngineFacts {
        events: None,
        block_size,
        tokenizer,
    };
    let served = serve_all(&runtime, &args, &http, &servers, &facts, check_timeout).await;
    stop_children(children, args.stop_grace).await;
    served
}

/// One vLLM server to stand for, and where its engine publishes KV events.
#[derive(Debug)]
struct Server {
    url: String,
    events: Option<KvEventsSource>,
}

/// Checks every server first (nothing registers if one is wrong), then
/// supervises one instance per server until the runtime drains.
async fn serve_all(
    runtime: &Runtime,
    args: &VllmArgs,
    http: &reqwest::Client,
    servers: &[Server],
    facts: &EngineFacts,
    check_timeout: Duration,
) -> Result<(), VllmError> {
    let mut checked = Vec::new();
    for server in servers {
        let served = check_model(http, &server.url, &args.model, check_timeout).await?;
        let features = probe::discover(http, &server.url, &args.model, check_timeout).await;
        tracing::info!(
            url = %server.url,
            server = %features.server,
            liveness = %features.liveness.as_str(),
            one_at_a_time = features.one_at_a_time,
            load = %features.load.as_str(),
            token_ids = features.token_ids,
            continues_message = features.continues_message,
            "engine features: {}",
            probe::migration_summary(&features)
        );
        checked.push((served, features));
    }
    let base_port = *runtime.config().system().port();
    let mut supervisors = Vec::new();
    for (index, (server, (served, features))) in servers.iter().zip(checked).enumerate() {
        let drt = DistributedRuntime::connect(runtime.clone()).await?;
        if let Some(port) = base_port {
            let port = if port == 0 {
                0
            } else {
                port.saturating_add(index as u16)
            };
            drt.start_status_server_on(port).await?;
        }
        let endpoint = drt
            .namespace(&args.identity.namespace)?
            .component(&args.identity.component)?
            .endpoint(&args.identity.endpoint);
        let backend = Backend {
            base_url: server.url.clone(),
            drt,
            endpoint,
            model: args.model.clone(),
            context_length: served.context_length.unwrap_or(DEFAULT_CONTEXT_LENGTH),
            kv: EngineFacts {
                events: server.events.clone(),
                ..facts.clone()
            },
            http: http.clone(),
            health_interval: args.health_interval.max(MIN_HEALTH_INTERVAL),
            check_timeout,
            features,
        };
        supervisors.push(runtime.spawn(backend.supervise()));
    }
    for supervisor in supervisors {
        match supervisor.await {
            Ok(result) => result?,
            Err(join) => tracing::error!(error = %join, "a vLLM supervisor failed"),
        }
    }
    Ok(())
}

async fn stop_children(children: Vec<ManagedVllm>, grace: Duration) {
    futures::future::join_all(children.into_iter().map(|child| child.stop(grace))).await;
}
