//! Starting mocker workers: flags, one worker on a runtime, or several in
//! one process (each with its own discovery identity, as separate processes
//! would have).

use crate::engine::MockerLlm;
use crate::metrics::EngineMetrics;
use std::net::SocketAddr;
use switchyard_kv_events::{KvEventsError, Publisher, PublisherConfig};
use switchyard_llm::model_card::{Capacity, KvEventsSource, ModelCard, ModelKind, TokenizerSpec};
use switchyard_mocker::config::{ConfigError, MockerConfig};
use switchyard_mocker::engine::MockerEngine;
use switchyard_runtime::component::Endpoint;
use switchyard_runtime::component::endpoint::{EndpointError, ServingEndpoint};
use switchyard_runtime::component::load::EngineLoad;
use switchyard_runtime::config::DiscoveryBackend;
use switchyard_runtime::config::args::{self, EndpointArgs};
use switchyard_runtime::discovery::DiscoveryError;
use switchyard_runtime::distributed::{DistributedError, DistributedRuntime};
use switchyard_runtime::metrics::MetricsError;
use switchyard_runtime::names::NameError;
use switchyard_runtime::runtime::Runtime;

/// Flags of `switchyard worker mocker`. Engine defaults are vLLM's (and
/// Dynamo's mocker's), written once, in [`MockerConfig::default`].
#[derive(Debug, Clone, clap::Args)]
pub struct MockerArgs {
    /// The model name clients put in requests.
    #[arg(long, env = "DYN_MODEL_NAME", default_value = "mock-model")]
    pub model_name: String,
    /// The endpoint this worker serves (`--namespace`, `--component`, `--endpoint`).
    #[command(flatten)]
    pub identity: EndpointArgs,
    /// Longest prompt plus output, in tokens.
    #[arg(long, env = "DYN_CONTEXT_LENGTH", default_value_t = 8192)]
    pub context_length: u32,
    /// KV-cache blocks the simulated GPU holds.
    #[arg(long, env = "DYN_MOCKER_NUM_GPU_BLOCKS", default_value_t = MockerConfig::default().num_gpu_blocks)]
    pub num_gpu_blocks: usize,
    /// Tokens per KV-cache block.
    #[arg(long, env = "DYN_MOCKER_BLOCK_SIZE", default_value_t = MockerConfig::default().block_size)]
    pub block_size: usize,
    /// Sequences running at once; more wait in the engine's queue.
    #[arg(long, env = "DYN_MOCKER_MAX_NUM_SEQS", default_value_t = MockerConfig::default().max_num_seqs)]
    pub max_num_seqs: usize,
    /// Tokens prefilled per engine step (longer prompts are chunked).
    #[arg(long, env = "DYN_MOCKER_MAX_NUM_BATCHED_TOKENS", default_value_t = MockerConfig::default().max_num_batched_tokens)]
    pub max_num_batched_tokens: usize,
    /// Reuse KV blocks of prompts that share a prefix.
    #[arg(long, env = "DYN_MOCKER_ENABLE_PREFIX_CACHING", default_value_t = MockerConfig::default().enable_prefix_caching, action = clap::ArgAction::Set)]
    pub enable_prefix_caching: bool,
    /// Divides every simulated delay; 0 runs without sleeping.
    #[arg(long, env = "DYN_MOCKER_SPEEDUP_RATIO", default_value_t = MockerConfig::default().speedup_ratio)]
    pub speedup_ratio: f64,
    /// Further divides decode delays.
    #[arg(long, env = "DYN_MOCKER_DECODE_SPEEDUP_RATIO", default_value_t = MockerConfig::default().decode_speedup_ratio)]
    pub decode_speedup_ratio: f64,
    /// Publish the engine's KV cache changes as vLLM does (ZMQ PUB plus a
    /// replay socket, on the request plane's host, ports chosen by the OS,
    /// named in the model card), for KV-aware routers.
    #[arg(long, env = "DYN_MOCKER_KV_EVENTS", default_value_t = true, action = clap::ArgAction::Set)]
    pub kv_events: bool,
    /// Fault injection: every Nth KV event batch is numbered and kept for
    /// replay but not sent, as if lost on the network, so routers must see
    /// the gap and recover it by replay. 0 (the default) sends every batch.
    #[arg(long, env = "DYN_MOCKER_KV_EVENTS_WITHHOLD_EVERY", default_value_t = 0)]
    pub kv_events_withhold_every: u64,
    /// Fault injection: every Nth request is accepted but the engine never
    /// produces its first token (it hangs until the caller gives up), as an
    /// engine that stopped would; the frontend's first-token deadline must
    /// send it elsewhere. 0 (the default) answers every request.
    #[arg(long, env = "DYN_MOCKER_STALL_FIRST_TOKEN_EVERY", default_value_t = 0)]
    pub stall_first_token_every: u64,
    /// Workers in this process, each its own instance in discovery.
    #[arg(long, env = "DYN_MOCKER_NUM_WORKERS", default_value_t = 1)]
    pub num_workers: usize,
}

impl Default for MockerArgs {
    /// The flags' defaults, ignoring the environment.
    fn default() -> Self {
        args::defaults()
    }
}

impl MockerArgs {
    pub fn engine_config(&self) -> MockerConfig {
        MockerConfig {
            num_gpu_blocks: self.num_gpu_blocks,
            block_size: self.block_size,
            max_num_seqs: self.max_num_seqs,
            max_num_batched_tokens: self.max_num_batched_tokens,
            enable_prefix_caching: self.enable_prefix_caching,
            speedup_ratio: self.speedup_ratio,
            decode_speedup_ratio: self.decode_speedup_ratio,
        }
    }
}

/// Batches of KV events waiting for the publisher; beyond this the engine
/// drops (and counts) them, and routers see a gap.
const KV_EVENT_QUEUE: usize = 1024;

/// Where a worker's engine publishes its KV events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvEventsBind {
    /// On the request plane's host, ports chosen by the OS (`--kv-events`).
    Ephemeral,
    /// At the given addresses, as `vllm serve --kv-events-config` asks (the
    /// vLLM stand-in, whose caller chose the ports).
    At(PublisherConfig),
}

/// Where `--kv-events` publishes: the request plane's host (resolved when
/// it is a name), ports chosen by the OS.
async fn ephemeral_publisher(host: &str) -> Result<PublisherConfig, MockerError> {
    PublisherConfig::on_host(host, KV_EVENTS_TOPIC)
        .await
        .map_err(|error| match error {
            KvEventsError::Host { host, source } => MockerError::KvEventsHost { host, source },
            other => MockerError::KvEvents(other),
        })
}

/// Binds a vLLM-style KV event publisher and forwards the engine's batches
/// to it until the engine stops.
fn publish_kv_events(
    runtime: &Runtime,
    config: PublisherConfig,
    mut batches: tokio::sync::mpsc::Receiver<switchyard_kv_router::events::EventBatch>,
    withhold_every: u64,
) -> Result<KvEventsSource, KvEventsError> {
    let topic = config.topic.clone();
    let publisher = Publisher::bind(config)?;
    let source = KvEventsSource {
        endpoint: publisher.endpoint().to_string(),
        replay_endpoint: publisher.replay_endpoint().map(str::to_string),
        topic,
    };
    tracing::info!(endpoint = %source.endpoint, replay_endpoint = ?source.replay_endpoint, "publishing KV events");
    runtime.spawn(async move {
        let mut count = 0u64;
        while let Some(batch) = batches.recv().await {
            count += 1;
            if withhold_every > 0 && count.is_multiple_of(withhold_every) {
                tracing::warn!(batch = count, "KV event batch withheld (--kv-events-withhold-every)");
                publisher.publish_withheld(&batch);
            } else {
                publisher.publish(&batch);
            }
        }
    });
    Ok(source)
}

/// vLLM's default topic.
const KV_EVENTS_TOPIC: &str = "kv-events";

/// Why a mocker worker could not start.
#[derive(Debug, thiserror::Error)]
pub enum MockerError {
    #[error("invalid engine setting")]
    Config(#[from] ConfigError),
    #[error("--num-workers must be at least 1 (got 0)")]
    NoWorkers,
    #[error(
        "--num-workers {asked} with DYN_DISCOVERY_BACKEND=kubernetes: a Pod is one worker there \
         (its name is the instance id); run {asked} replicas instead"
    )]
    OneWorkerPerPod { asked: usize },
    #[error("--context-length must be at least 1 (got 0)")]
    NoContext,
    #[error(transparent)]
    Name(#[from] NameError),
    #[error(transparent)]
    Runtime(#[from] DistributedError),
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    #[error("cannot register the model card")]
    Card(#[from] DiscoveryError),
    #[error("cannot create the engine metrics")]
    Metrics(#[from] MetricsError),
    #[error("cannot publish KV events (--kv-events)")]
    KvEvents(#[from] KvEventsError),
    #[error(
        "cannot publish KV events (--kv-events): the request plane's host {host:?} (DYN_TCP_RPC_HOST) does not resolve"
    )]
    KvEventsHost {
        host: String,
        #[source]
        source: std::io::Error,
    },
}

/// One running mocker worker.
#[derive(Debug)]
pub struct MockerWorker {
    pub engine: MockerEngine,
    pub card: ModelCard,
    pub serving: ServingEndpoint,
    /// This worker's `/health`, `/live`, `/metrics`, when it has its own status server.
    pub status_address: Option<SocketAddr>,
}

/// Starts one worker on `drt`: engine, endpoint (with load reports), model
/// card and metrics. The card leaves discovery as soon as the runtime starts
/// draining, before the endpoint finishes its requests.
pub async fn serve(drt: &DistributedRuntime, args: &MockerArgs) -> Result<MockerWorker, MockerError> {
    serve_with(drt, args, args.kv_events.then_some(KvEventsBind::Ephemeral)).await
}

/// [`serve`], with the KV events published where `kv_events` says (none
/// when `None`) instead of where `args.kv_events` would.
pub async fn serve_with(
    drt: &DistributedRuntime,
    args: &MockerArgs,
    kv_events: Option<KvEventsBind>,
) -> Result<MockerWorker, MockerError> {
    if args.context_length == 0 {
        return Err(MockerError::NoContext);
    }
    let runtime = drt.runtime();
    let config = args.engine_config();
    let (engine, kv_events) = if let Some(bind) = &kv_events {
        let (batches, received) = tokio::sync::mpsc::channel(KV_EVENT_QUEUE);
        let engine = MockerEngine::start_with_kv_events(config.clone(), runtime.root_token().child_token(), batches)?;
        let config = match bind {
            KvEventsBind::Ephemeral => ephemeral_publisher(runtime.config().tcp().host()).await?,
            KvEventsBind::At(config) => config.clone(),
        };
        let source = publish_kv_events(runtime, config, received, args.kv_events_withhold_every)?;
        (engine, Some(source))
    } else {
        (
            MockerEngine::start(config.clone(), runtime.root_token().child_token())?,
            None,
        )
    };
    let endpoint: Endpoint = drt
        .namespace(&args.identity.namespace)?
        .component(&args.identity.component)?
        .endpoint(&args.identity.endpoint);
    let metrics = EngineMetrics::register(drt.process_metrics())?;
    runtime.spawn(metrics.follow(
        engine.clone(),
        args.model_name.clone(),
        runtime.root_token().child_token(),
    ));
    let llm = MockerLlm::new(engine.clone(), &args.model_name, args.context_length)
        .stalling_first_token_every(args.stall_first_token_every);
    let load = engine.clone();
    let serving = endpoint
        .endpoint_builder()
        .handler(llm)
        .publish_load_with(move || {
            let now = load.load();
            EngineLoad {
                queued: now.waiting,
                kv_usage: Some(now.kv_usage),
                capacity: Some(now.capacity),
            }
        })
        .spawn()
        .await?;

    let mut card = ModelCard::new(
        &args.model_name,
        &endpoint,
        vec![ModelKind::Chat, ModelKind::Completions],
        args.context_length,
    );
    card.capacity = Capacity {
        max_num_seqs: Some(config.max_num_seqs as u64),
        max_num_batched_tokens: Some(config.max_num_batched_tokens as u64),
        total_kv_blocks: Some(config.num_gpu_blocks as u64),
        kv_cache_block_size: Some(config.block_size as u64),
    };
    // The engine reads `flat_prompt` with the mocker's tokenizer: a router
    // doing the same sees the tokens the engine caches.
    card.tokenizer = Some(TokenizerSpec::Mocker);
    card.kv_events = kv_events;
    card.register(&endpoint).await?;
    runtime.spawn({
        let (card, endpoint) = (card.clone(), endpoint.clone());
        let draining = runtime.endpoint_token().clone();
        async move {
            draining.cancelled().await;
            if let Err(error) = card.unregister(&endpoint).await {
                tracing::warn!(%error, "could not unregister the model card");
            }
        }
    });
    tracing::info!(model = %args.model_name, instance = %serving.instance(), "mocker worker serving");
    Ok(MockerWorker {
        engine,
        card,
        serving,
        status_address: drt.status_server_address(),
    })
}

/// Serves `args.num_workers` workers until the runtime shuts down, then
/// waits for them to drain. With more than one, each gets its own instance
/// id and — when `DYN_SYSTEM_PORT` is set — its own status server on the
/// next ports up (`port`, `port + 1`, …; port 0 picks free ones).
pub async fn run(runtime: Runtime, args: MockerArgs) -> Result<(), MockerError> {
    if args.num_workers == 0 {
        return Err(MockerError::NoWorkers);
    }
    if args.num_workers > 1 && *runtime.config().discovery_backend() == DiscoveryBackend::Kubernetes {
        // The Kubernetes backend's identity is the Pod: workers sharing one
        // would share one instance id and overwrite each other's registrations.
        return Err(MockerError::OneWorkerPerPod {
            asked: args.num_workers,
        });
    }
    args.engine_config().validate()?;
    let mut workers = Vec::with_capacity(args.num_workers);
    for index in 0..args.num_workers {
        match start(&runtime, &args, index).await {
            Ok(worker) => workers.push(worker),
            // A SIGTERM during start-up is a request to stop, not a failure:
            // what was being registered fails because discovery is closing.
            Err(error) if runtime.is_shutting_down() => {
                tracing::info!(%error, "shutting down before every mocker worker was registered");
                break;
            }
            Err(error) => return Err(error),
        }
    }
    for worker in workers {
        worker.serving.wait().await;
    }
    Ok(())
}

/// Worker `index` of [`run`]: its own instance, and its own status server
/// on the port `index` above `DYN_SYSTEM_PORT` when that is set.
async fn start(runtime: &Runtime, args: &MockerArgs, index: usize) -> Result<MockerWorker, MockerError> {
    let drt = DistributedRuntime::connect(runtime.clone()).await?;
    if let Some(port) = *runtime.config().system().port() {
        let port = if port == 0 {
            0
        } else {
            port.saturating_add(index as u16)
        };
        drt.start_status_server_on(port).await?;
    }
    serve(&drt, args).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_runtime::config::RuntimeConfig;

    /// A SIGTERM that lands while the worker registers (found by sending
    /// one 30 ms after start: the process exited 1 with "discovery has shut
    /// down") is a request to stop: `run` returns cleanly.
    #[tokio::test]
    async fn a_shutdown_during_start_up_is_a_clean_stop_not_a_failure() {
        let runtime = Runtime::new(RuntimeConfig::local());
        runtime.shutdown().await;
        let ended = tokio::time::timeout(std::time::Duration::from_secs(10), run(runtime, MockerArgs::default())).await;
        assert!(matches!(ended, Ok(Ok(()))), "{ended:?}");
    }

    /// Found by running the compose stack, where DYN_TCP_RPC_HOST is a
    /// service name: libzmq refused `tcp://worker-1:0` ("No such device")
    /// and every mocker worker exited at start-up.
    #[tokio::test]
    async fn kv_events_bind_where_a_host_name_resolves() {
        let config = ephemeral_publisher("localhost").await.unwrap();
        assert_eq!(config.endpoint, "tcp://127.0.0.1:0");
        let publisher = Publisher::bind(config).unwrap();
        assert!(
            publisher.endpoint().starts_with("tcp://127.0.0.1:"),
            "{}",
            publisher.endpoint()
        );
    }

    #[tokio::test]
    async fn kv_events_bind_to_an_address_as_given() {
        assert_eq!(
            ephemeral_publisher("127.0.0.1").await.unwrap().endpoint,
            "tcp://127.0.0.1:0"
        );
        assert_eq!(ephemeral_publisher("::1").await.unwrap().endpoint, "tcp://[::1]:0");
        let error = ephemeral_publisher("no-such-host.invalid").await.unwrap_err();
        assert!(error.to_string().contains("DYN_TCP_RPC_HOST"), "{error}");
    }
}
