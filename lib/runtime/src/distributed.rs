//! [`DistributedRuntime`]: a thin façade over one process's planes — its
//! discovery backend, its request-plane server (bound on first use) and
//! client, and the endpoints it serves. It reads no settings of its own: the
//! backends are chosen from the [`Runtime`]'s validated configuration.

use crate::component::{NameError, Namespace};
use crate::config::{DiscoveryBackend, RequestPlaneKind, RuntimeConfig};
use crate::discovery::etcd::EtcdDiscovery;
use crate::discovery::file::FileDiscovery;
use crate::discovery::mem::{MemDiscovery, MemRegistry};
use crate::discovery::{Discovery, DiscoveryError};
use crate::request_plane::tcp::{TcpClient, TcpServer};
use crate::request_plane::{Handlers, RequestClient, RequestServer};
use crate::runtime::Runtime;
use std::sync::Arc;
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
}

impl DistributedRuntime {
    /// Connects the backends named by the runtime's settings
    /// (`DYN_DISCOVERY_BACKEND`, `DYN_REQUEST_PLANE`).
    pub async fn from_settings(runtime: Runtime) -> Result<Self, DistributedError> {
        let config = runtime.config();
        let (tracker, stop) = (runtime.tracker().clone(), runtime.root_token().clone());
        let discovery: Arc<dyn Discovery> = match config.discovery_backend() {
            DiscoveryBackend::Mem => Arc::new(MemDiscovery::new(MemRegistry::global())),
            DiscoveryBackend::File => {
                Arc::new(FileDiscovery::open(config.file_kv().clone(), *config.lease_ttl(), tracker, stop).await?)
            }
            DiscoveryBackend::Etcd => {
                Arc::new(EtcdDiscovery::connect(config.etcd(), *config.lease_ttl(), tracker, stop).await?)
            }
            other => {
                return Err(DistributedError::NotBuiltYet {
                    variable: "DYN_DISCOVERY_BACKEND",
                    value: other.as_str(),
                    available: "mem, file, etcd",
                });
            }
        };
        Self::with_discovery(runtime, discovery)
    }

    /// Uses the given discovery backend (tests pass their own [`MemRegistry`]
    /// to stay isolated); everything else follows the runtime's settings.
    pub fn with_discovery(runtime: Runtime, discovery: Arc<dyn Discovery>) -> Result<Self, DistributedError> {
        let config: &RuntimeConfig = runtime.config();
        let client: Arc<dyn RequestClient> = match config.request_plane() {
            RequestPlaneKind::Tcp => Arc::new(TcpClient::new(
                config.tcp(),
                runtime.root_token().clone(),
                runtime.tracker().clone(),
            )),
            other => {
                return Err(DistributedError::NotBuiltYet {
                    variable: "DYN_REQUEST_PLANE",
                    value: other.as_str(),
                    available: "tcp",
                });
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
        Ok(Self {
            inner: Arc::new(Inner {
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

    /// The namespace `name` (lowercase letters, digits, `-` and `_`).
    pub fn namespace(&self, name: impl Into<String>) -> Result<Namespace, NameError> {
        Namespace::new(self.clone(), name.into())
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
                let tcp = runtime.config().tcp();
                let server = TcpServer::bind(
                    tcp,
                    self.inner.handlers.clone(),
                    runtime.root_token().clone(),
                    runtime.tracker().clone(),
                )
                .await
                .map_err(|source| DistributedError::Bind {
                    address: format!("{}:{}", tcp.host(), tcp.port()),
                    source,
                })?;
                Ok(Arc::new(server) as Arc<dyn RequestServer>)
            })
            .await
    }
}

/// Why the distributed runtime (or one of its planes) could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DistributedError {
    #[error("{variable}={value} is not built yet; available now: {available}")]
    NotBuiltYet {
        variable: &'static str,
        value: &'static str,
        available: &'static str,
    },
    #[error("cannot bind the request-plane listener on {address} (DYN_TCP_RPC_HOST/DYN_TCP_RPC_PORT)")]
    Bind {
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Discovery(#[from] DiscoveryError),
}
