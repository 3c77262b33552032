//! [`DistributedRuntime`]: a thin façade over one process's planes — its
//! discovery backend, its request-plane server (bound on first use) and
//! client, its event plane (built on first use), and the endpoints it serves.
//! It reads no settings of its own: the backends are chosen from the
//! [`Runtime`]'s validated configuration. The handles built on it
//! (`namespace()` and below) live in [`crate::component`], which depends on
//! this module and never the other way round.

use crate::config::{DiscoveryBackend, EventPlaneKind, RequestPlaneKind, RuntimeConfig};
use crate::discovery::etcd::{EtcdDiscovery, LeaseHealth};
use crate::discovery::file::FileDiscovery;
use crate::discovery::mem::{MemDiscovery, MemRegistry};
use crate::discovery::{Discovery, DiscoveryError};
use crate::error::{ErrorKind, RequestError};
use crate::event_plane::EventPlane;
use crate::event_plane::nats::NatsEventPlane;
use crate::event_plane::zmq::ZmqEventPlane;
use crate::metrics::{Metrics, ProcessMetrics};
use crate::nats::NatsConnectError;
use crate::request_plane::handlers::Handlers;
use crate::request_plane::http::{HttpClient, HttpLimits, HttpServer};
use crate::request_plane::nats::{NatsRequestClient, NatsServer, instance_subject};
use crate::request_plane::tcp::{TcpClient, TcpServer};
use crate::request_plane::{AnyClient, NatsConnect, RequestClient, RequestServer};
use crate::runtime::Runtime;
use crate::status::{StatusState, SystemHealth};
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use tokio::sync::OnceCell;

/// One process's handle on the mesh. Cheap to clone.
#[derive(Debug, Clone)]
pub struct DistributedRuntime {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    runtime: Runtime,
    discovery: Arc<dyn Discovery>,
    /// Endpoints this process serves, shared with the request-plane server.
    handlers: Arc<Handlers>,
    /// Bound when the first endpoint starts, so pure callers open no port.
    server: OnceCell<Arc<dyn RequestServer>>,
    client: Arc<dyn RequestClient>,
    metrics: ProcessMetrics,
    health: Arc<SystemHealth>,
    /// The etcd lease's state and its metrics, when discovery is on etcd.
    lease_metrics: Option<LeaseMetrics>,
    /// Where the status server listens, once started.
    status_address: OnceLock<SocketAddr>,
    /// Connected on first use, so processes that do not need NATS never dial it.
    nats: OnceCell<async_nats::Client>,
    /// Built on first use, for the same reason (the NATS one dials NATS).
    event_plane: OnceCell<Arc<dyn EventPlane>>,
}

impl DistributedRuntime {
    /// Connects the backends named by the runtime's settings
    /// (`DYN_DISCOVERY_BACKEND`, `DYN_REQUEST_PLANE`), and starts the status
    /// server when `DYN_SYSTEM_PORT` is set.
    pub async fn from_settings(runtime: Runtime) -> Result<Self, DistributedError> {
        let drt = Self::connect(runtime).await?;
        if let Some(port) = *drt.runtime().config().system().port() {
            drt.start_status_server_on(port).await?;
        }
        Ok(drt)
    }

    /// Like [`DistributedRuntime::from_settings`] without the status server:
    /// for several runtimes in one process (each its own instance), which
    /// cannot all bind `DYN_SYSTEM_PORT`.
    pub async fn connect(runtime: Runtime) -> Result<Self, DistributedError> {
        let config = runtime.config();
        let (tracker, stop) = (runtime.tracker().clone(), runtime.root_token().clone());
        let mut lease_health = None;
        let discovery: Arc<dyn Discovery> = match config.discovery_backend() {
            DiscoveryBackend::Mem => Arc::new(MemDiscovery::new(MemRegistry::global())),
            DiscoveryBackend::File => {
                Arc::new(FileDiscovery::open(config.file_kv().clone(), *config.lease_ttl(), tracker, stop).await?)
            }
            DiscoveryBackend::Etcd => {
                let etcd = EtcdDiscovery::connect(config.etcd(), *config.lease_ttl(), tracker, stop).await?;
                lease_health = Some(etcd.lease_health());
                Arc::new(etcd)
            }
            #[cfg(feature = "kubernetes")]
            DiscoveryBackend::Kubernetes => Arc::new(
                crate::discovery::kube::client::KubeDiscovery::connect_from_environment(
                    config.pod_identity()?,
                    Default::default(),
                    tracker,
                    stop,
                )
                .await?,
            ),
            #[cfg(not(feature = "kubernetes"))]
            DiscoveryBackend::Kubernetes => {
                return Err(DistributedError::NotInThisBuild {
                    variable: "DYN_DISCOVERY_BACKEND",
                    value: "kubernetes",
                    feature: "kubernetes",
                    available: "mem, file, etcd",
                });
            }
        };
        tracing::info!(
            backend = config.discovery_backend().as_str(),
            instance_id = format!("{:x}", discovery.instance_id()),
            "discovery connected"
        );
        Self::build(runtime, discovery, lease_health)
    }

    /// Uses the given discovery backend (tests pass their own [`MemRegistry`]
    /// to stay isolated); everything else follows the runtime's settings.
    /// The status server is not started here; call
    /// [`DistributedRuntime::start_status_server`] when wanted.
    pub fn with_discovery(runtime: Runtime, discovery: Arc<dyn Discovery>) -> Result<Self, DistributedError> {
        Self::build(runtime, discovery, None)
    }

    fn build(
        runtime: Runtime,
        discovery: Arc<dyn Discovery>,
        lease_health: Option<Arc<LeaseHealth>>,
    ) -> Result<Self, DistributedError> {
        let config: &RuntimeConfig = runtime.config();
        let client: Arc<dyn RequestClient> = match config.request_plane() {
            RequestPlaneKind::Tcp | RequestPlaneKind::Http | RequestPlaneKind::Nats => {
                let nats_config = config.nats().clone();
                let request_config = config.clone();
                let nats_connect: NatsConnect = Box::new(move || {
                    let (nats_config, request_config) = (nats_config.clone(), request_config.clone());
                    Box::pin(async move {
                        let client = crate::nats::connect(&nats_config).await.map_err(|e| {
                            RequestError::new(ErrorKind::Unreachable, "the NATS request plane cannot connect")
                                .with_source(e)
                        })?;
                        Ok(NatsRequestClient::new(client, &request_config))
                    })
                });
                Arc::new(AnyClient::new(
                    TcpClient::new(config.tcp(), runtime.root_token().clone(), runtime.tracker().clone()),
                    HttpClient::new(config),
                    nats_connect,
                ))
            }
        };
        // At stop, remove whatever this process still has registered (revoke
        // the etcd lease; delete the files; forget the in-memory entries).
        runtime.spawn({
            let discovery = discovery.clone();
            let stopped = runtime.root_token().clone();
            async move {
                stopped.cancelled().await;
                if let Err(error) = discovery.shutdown().await {
                    tracing::warn!(%error, "discovery shutdown failed");
                }
            }
        });
        let metrics = ProcessMetrics::new(discovery.instance_id());
        let lease_metrics = lease_health.map(|health| LeaseMetrics {
            health,
            lost: metrics
                .root()
                .create_gauge(
                    "dynamo_discovery_lease_lost",
                    "1 while this process's etcd lease is lost and being recovered",
                )
                .expect("fresh registry"),
            recoveries: metrics
                .root()
                .create_counter(
                    "dynamo_discovery_lease_recoveries_total",
                    "Times a lost etcd lease was replaced and the registrations put again",
                )
                .expect("fresh registry"),
        });
        let health = Arc::new(SystemHealth::new(
            *config.system().starting_ready(),
            runtime.root_token().clone(),
            runtime.endpoint_token().clone(),
        ));
        Ok(Self {
            inner: Arc::new(Inner {
                metrics,
                health,
                lease_metrics,
                status_address: OnceLock::new(),
                nats: OnceCell::new(),
                event_plane: OnceCell::new(),
                handlers: Arc::new(Handlers::new(discovery.instance_id())),
                runtime,
                discovery,
                server: OnceCell::new(),
                client,
            }),
        })
    }

    pub fn runtime(&self) -> &Runtime {
        &self.inner.runtime
    }

    pub fn discovery(&self) -> &Arc<dyn Discovery> {
        &self.inner.discovery
    }

    /// This process's id in discovery, shared by all its endpoints.
    pub fn instance_id(&self) -> u64 {
        self.inner.discovery.instance_id()
    }

    pub(crate) fn metrics(&self) -> &ProcessMetrics {
        &self.inner.metrics
    }

    /// What this process's event plane and routers have counted since it
    /// started (the same numbers as their `/metrics` counters), for display.
    pub fn plane_counts(&self) -> PlaneCounts {
        let metrics = &self.inner.metrics;
        PlaneCounts {
            event_gaps: metrics.event_gaps.get(),
            event_disconnects: metrics.event_disconnects.get(),
            router_ejections: metrics.router_ejections.get(),
            router_retries: metrics.router_retries.get(),
        }
    }

    /// The process level of the metrics hierarchy (no labels), served on
    /// this process's `/metrics`; register process-wide metrics here.
    pub fn process_metrics(&self) -> &Metrics {
        self.inner.metrics.root()
    }

    /// Readiness of the endpoints this process serves.
    pub fn health(&self) -> &Arc<SystemHealth> {
        &self.inner.health
    }

    /// Where the status server listens, when it was started.
    pub fn status_server_address(&self) -> Option<SocketAddr> {
        self.inner.status_address.get().copied()
    }

    /// The state the status routes read (for `status::router`).
    pub fn status_state(&self) -> StatusState {
        let lease_metrics = self.inner.lease_metrics.clone();
        StatusState {
            health: self.inner.health.clone(),
            metrics: self.inner.metrics.clone(),
            instance_id: self.instance_id(),
            before_scrape: Arc::new(move || {
                if let Some(lease) = &lease_metrics {
                    lease.lost.set(i64::from(lease.health.is_lost()));
                    lease
                        .recoveries
                        .inc_by(lease.health.recoveries().saturating_sub(lease.recoveries.get()));
                }
            }),
        }
    }

    /// Binds `DYN_SYSTEM_HOST:DYN_SYSTEM_PORT` and serves the status routes
    /// until the runtime stops. Returns the bound address (port 0 picks one).
    pub async fn start_status_server(&self) -> Result<SocketAddr, DistributedError> {
        self.start_status_server_on(self.runtime().config().system().port().unwrap_or(0))
            .await
    }

    /// [`DistributedRuntime::start_status_server`] on `port` instead of the configured one.
    pub async fn start_status_server_on(&self, port: u16) -> Result<SocketAddr, DistributedError> {
        let system = self.runtime().config().system();
        let address = format!("{}:{port}", system.host());
        let listener =
            tokio::net::TcpListener::bind(&address)
                .await
                .map_err(|source| DistributedError::StatusBind {
                    address: address.clone(),
                    source,
                })?;
        let bound = listener
            .local_addr()
            .map_err(|source| DistributedError::StatusBind { address, source })?;
        let _ = self.inner.status_address.set(bound);
        let router = crate::status::router(self.status_state(), system);
        let stopped = self.runtime().root_token().clone();
        self.runtime().spawn(crate::http_server::serve(
            listener,
            router,
            STATUS_IDLE_TIMEOUT,
            stopped,
        ));
        tracing::info!(address = %bound, "status server listening");
        Ok(bound)
    }

    /// The event plane in use (`DYN_EVENT_PLANE`, or the discovery backend's default).
    pub fn event_plane_kind(&self) -> EventPlaneKind {
        *self.runtime().config().event_plane()
    }

    /// The process's event plane, built on first use.
    pub(crate) async fn event_plane(&self) -> Result<&Arc<dyn EventPlane>, NatsConnectError> {
        self.inner
            .event_plane
            .get_or_try_init(|| async {
                let runtime = self.runtime().clone();
                let plane: Arc<dyn EventPlane> = match self.event_plane_kind() {
                    EventPlaneKind::Zmq => {
                        let host = runtime.config().tcp().host().clone();
                        let disconnects = self.metrics().event_disconnects.clone();
                        Arc::new(ZmqEventPlane::new(self.discovery().clone(), host, runtime, disconnects))
                    }
                    EventPlaneKind::Nats => Arc::new(NatsEventPlane::new(self.nats_for_events().await?, runtime)),
                };
                Ok(plane)
            })
            .await
    }

    /// The NATS connection the event plane uses: the process's own when NATS
    /// answers; when it does not, one that keeps trying in the background,
    /// so the process serves meanwhile (without load reports and events),
    /// says so in its log and in `/health` (`event_plane: connecting`), and
    /// starts publishing once NATS is up. Settings errors still fail.
    async fn nats_for_events(&self) -> Result<async_nats::Client, NatsConnectError> {
        let client = match self.nats().await {
            Ok(client) => client,
            Err(error) if error.is_unreachable() => {
                tracing::warn!(
                    error = %crate::error::Report(&error),
                    "the NATS event plane is unreachable; serving without load reports and events, \
                     connecting in the background"
                );
                crate::nats::connect_in_background(self.runtime().config().nats()).await?
            }
            Err(error) => return Err(error),
        };
        let state = client.clone();
        self.inner
            .health
            .set_event_plane(Box::new(move || match state.connection_state() {
                async_nats::connection::State::Connected => "connected",
                _ => "connecting",
            }));
        Ok(client)
    }

    /// The NATS connection, opened on first use (bounded by
    /// [`crate::nats::NATS_CONNECT_TIMEOUT`]).
    pub async fn nats(&self) -> Result<async_nats::Client, NatsConnectError> {
        let config = self.runtime().config().nats();
        self.inner
            .nats
            .get_or_try_init(|| crate::nats::connect(config))
            .await
            .cloned()
    }

    pub(crate) fn handlers(&self) -> &Arc<Handlers> {
        &self.inner.handlers
    }

    pub(crate) fn request_client(&self) -> &Arc<dyn RequestClient> {
        &self.inner.client
    }

    /// The request-plane server, bound on first use.
    pub(crate) async fn request_server(&self) -> Result<&Arc<dyn RequestServer>, DistributedError> {
        self.inner
            .server
            .get_or_try_init(|| async {
                let runtime = &self.inner.runtime;
                let config = runtime.config();
                let (tcp, http) = (config.tcp(), config.http());
                let (stop, tracker) = (runtime.root_token().clone(), runtime.tracker().clone());
                let server: Arc<dyn RequestServer> = if *config.request_plane() == RequestPlaneKind::Nats {
                    let client = self.nats().await?;
                    let handlers = self.inner.handlers.clone();
                    let subject = instance_subject(handlers.instance_id());
                    let server = NatsServer::start(client, subject, handlers, *tcp.max_message_size(), stop, tracker)
                        .await
                        .map_err(|source| DistributedError::NatsSubscribe {
                            servers: config.nats().servers().join(","),
                            source,
                        })?;
                    Arc::new(server)
                } else if *config.request_plane() == RequestPlaneKind::Http {
                    let limits = HttpLimits::from_config(tcp, self.inner.metrics.transport.clone());
                    let server = HttpServer::bind(
                        http,
                        *tcp.max_message_size(),
                        tcp.tls().as_ref(),
                        limits,
                        self.inner.handlers.clone(),
                        stop,
                        tracker,
                    )
                    .await
                    .map_err(|source| DistributedError::Bind {
                        address: format!("{}:{} (DYN_HTTP_RPC_HOST/DYN_HTTP_RPC_PORT)", http.host(), http.port()),
                        source,
                    })?;
                    Arc::new(server)
                } else {
                    let transport = self.inner.metrics.transport.clone();
                    let server = TcpServer::bind(tcp, self.inner.handlers.clone(), transport, stop, tracker)
                        .await
                        .map_err(|source| DistributedError::Bind {
                            address: format!("{}:{} (DYN_TCP_RPC_HOST/DYN_TCP_RPC_PORT)", tcp.host(), tcp.port()),
                            source,
                        })?;
                    Arc::new(server)
                };
                Ok(server)
            })
            .await
    }
}

/// How long a scraper or probe may take to send its request (or idle
/// between requests) on the status server before it is disconnected.
const STATUS_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The etcd lease's state, exported at scrape time.
#[derive(Debug, Clone)]
struct LeaseMetrics {
    health: Arc<LeaseHealth>,
    lost: prometheus::IntGauge,
    recoveries: prometheus::IntCounter,
}

/// Why the distributed runtime (or one of its planes) could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DistributedError {
    #[error(
        "{variable}={value} is not in this build (built without the cargo feature `{feature}`); \
         available: {available}"
    )]
    NotInThisBuild {
        variable: &'static str,
        value: &'static str,
        feature: &'static str,
        available: &'static str,
    },
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("cannot bind the request-plane listener on {address}")]
    Bind {
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot bind the status server on {address} (DYN_SYSTEM_HOST/DYN_SYSTEM_PORT)")]
    StatusBind {
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Nats(#[from] NatsConnectError),
    #[error("cannot subscribe to the request subject on NATS at {servers}")]
    NatsSubscribe {
        servers: String,
        #[source]
        source: RequestError,
    },
    #[error(transparent)]
    Discovery(#[from] DiscoveryError),
}

/// Counts of one process's event plane and routers, since it started: a
/// copy of `dynamo_event_plane_gaps_total`, `dynamo_event_plane_disconnects_total`,
/// `dynamo_router_ejections_total` and `dynamo_router_retries_total`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PlaneCounts {
    /// Events known lost (missing sequence numbers), over all subscriptions.
    pub event_gaps: u64,
    /// ZMQ event-plane peer connections that ended.
    pub event_disconnects: u64,
    /// Instances ejected after transport failures.
    pub router_ejections: u64,
    /// Requests re-sent to another instance before any response item.
    pub router_retries: u64,
}
