//! Serving an endpoint: adapt a typed [`AsyncEngine`] to the request plane,
//! register the instance in discovery, and on shutdown leave discovery first,
//! then wait for the requests in flight.

use super::Endpoint;
use super::load::{EngineLoad, LoadSource};
use crate::discovery::DiscoveryError;
use crate::distributed::DistributedError;
use crate::engine::{AsyncEngine, Context};
use crate::error::{ErrorKind, RequestError};
use crate::instance::Instance;
use crate::metrics::MetricsError;
use crate::names::NameError;
use crate::request_plane::ByteStream;
use crate::request_plane::handlers::PushHandler;
use crate::request_plane::handlers::{Activity, EndpointObservers};
use crate::status::canary::Canary;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::marker::PhantomData;
use std::sync::Arc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Configures and starts serving one endpoint.
pub struct EndpointBuilder {
    endpoint: Endpoint,
    handler: Option<Arc<dyn PushHandler>>,
    /// The canary request, msgpack-encoded (or why it could not be).
    health_check: Option<Result<Bytes, rmp_serde::encode::Error>>,
    /// Publish load reports on the event plane while serving, with the
    /// engine's own figures when it gives a source.
    publish_load: Option<Option<LoadSource>>,
    /// Labels added to the endpoint's standard metrics (Dynamo's `metrics_labels`).
    metrics_labels: Vec<(String, String)>,
}

impl std::fmt::Debug for EndpointBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointBuilder")
            .field("endpoint", &self.endpoint.path())
            .field("handler", &self.handler.is_some())
            .finish()
    }
}

impl EndpointBuilder {
    pub(crate) fn new(endpoint: Endpoint) -> Self {
        Self {
            endpoint,
            handler: None,
            health_check: None,
            publish_load: None,
            metrics_labels: Vec::new(),
        }
    }

    /// Adds `label=value` to the endpoint's standard metrics
    /// (`dynamo_component_requests_total` and the rest), e.g. the model
    /// name. Do not repeat a label the hierarchy sets (`dynamo_namespace`,
    /// `dynamo_component`, `dynamo_endpoint`, `worker_id`): it would replace
    /// it. Prometheus allows one set of label names per metric name, so
    /// every endpoint of a process must add the same label names (values
    /// may differ); otherwise, and for an invalid label name,
    /// [`EndpointBuilder::spawn`] fails with a metrics error.
    pub fn metrics_label(mut self, label: impl Into<String>, value: impl Into<String>) -> Self {
        self.metrics_labels.push((label.into(), value.into()));
        self
    }

    /// Publishes this endpoint's load (requests in flight) on the component's
    /// `load` topic while it serves, for routers built `.with_load_reports()`.
    pub fn publish_load(mut self) -> Self {
        self.publish_load = Some(None);
        self
    }

    /// Like [`EndpointBuilder::publish_load`], adding what only the engine
    /// knows (requests queued inside it, KV-cache usage, capacity): `source`
    /// is called at every report, so it must be cheap and must not block.
    pub fn publish_load_with(mut self, source: impl Fn() -> EngineLoad + Send + Sync + 'static) -> Self {
        self.publish_load = Some(Some(Arc::new(source)));
        self
    }

    /// A request the canary sends when canary checks are on
    /// (`DYN_HEALTH_CHECK_ENABLED`): it must be of the handler's request
    /// type, and the handler's whole response to it must finish within
    /// `DYN_HEALTH_CHECK_REQUEST_TIMEOUT`.
    pub fn health_check_payload<T: Serialize>(mut self, payload: T) -> Self {
        self.health_check = Some(rmp_serde::to_vec_named(&payload).map(Bytes::from));
        self
    }

    /// The engine that answers requests. Requests and responses travel as
    /// msgpack, so `Req` and `Resp` need only serde.
    pub fn handler<E, Req, Resp>(mut self, engine: E) -> Self
    where
        E: AsyncEngine<Req, Resp>,
        Req: DeserializeOwned + Send + 'static,
        Resp: Serialize + Send + 'static,
    {
        self.handler = Some(Arc::new(Ingress {
            engine: Arc::new(engine),
            types: PhantomData,
        }));
        self
    }

    /// Serves the endpoint until the runtime shuts down, then drains it.
    /// Returns once the endpoint has left discovery and its in-flight
    /// requests have finished.
    pub async fn start(self) -> Result<(), EndpointError> {
        self.spawn().await?.wait().await;
        Ok(())
    }

    /// Serves the endpoint in the background. Returns once the instance is
    /// registered in discovery and can take requests.
    pub async fn spawn(self) -> Result<ServingEndpoint, EndpointError> {
        let endpoint = self.endpoint;
        endpoint.validate()?;
        let handler = self.handler.ok_or_else(|| EndpointError::NoHandler {
            endpoint: endpoint.path(),
        })?;
        let drt = endpoint.drt().clone();
        let runtime = drt.runtime().clone();
        if runtime.is_shutting_down() {
            return Err(EndpointError::ShuttingDown);
        }
        let health_check = self
            .health_check
            .transpose()
            .map_err(|source| EndpointError::HealthCheckPayload { source })?;
        let server = drt.request_server().await?;
        let path = endpoint.path();
        let scope = self
            .metrics_labels
            .iter()
            .fold(endpoint.metrics(), |scope, (label, value)| scope.child(label, value));
        let observers = EndpointObservers {
            metrics: drt.metrics().endpoint(&scope, &path)?,
            activity: Arc::new(Activity::new()),
        };
        drt.handlers()
            .insert(&path, handler, observers.clone())
            .map_err(|_| EndpointError::AlreadyServed { endpoint: path.clone() })?;

        let instance = Instance {
            namespace: endpoint.namespace().to_string(),
            component: endpoint.component().to_string(),
            endpoint: endpoint.name().to_string(),
            instance_id: drt.instance_id(),
            transport: server.transport(),
        };
        // Load reports start before the instance registers, so that when they
        // cannot start there is nothing to take back out of discovery.
        let stop = runtime.endpoint_token().child_token();
        if let Some(source) = self.publish_load
            && let Err(error) = super::load::publish(endpoint.clone(), source, stop.clone()).await
        {
            drt.handlers().drain(&path).await;
            return Err(error.into());
        }
        if let Err(error) = drt.discovery().register(instance.to_registration()).await {
            stop.cancel();
            drt.handlers().drain(&path).await;
            return Err(error.into());
        }
        tracing::info!(instance = %instance, "endpoint serving");

        let system = runtime.config().system();
        let canary = health_check.filter(|_| *system.canary_enabled());
        // Without a canary an endpoint is ready as soon as it serves; with one,
        // it starts as configured and its checks decide.
        let ready = canary.is_none() || *system.starting_ready();
        drt.health().serve(&instance, ready);
        if let Some(payload) = canary {
            let canary = Canary {
                instance: instance.clone(),
                payload,
                activity: observers.activity.clone(),
                health: drt.health().clone(),
                client: drt.request_client().clone(),
                wait: *system.canary_wait(),
                timeout: *system.canary_timeout(),
            };
            runtime.spawn(canary.run(stop.clone()));
        }
        let drained = runtime.spawn_drain({
            let stop = stop.clone();
            let key = instance.key();
            async move {
                stop.cancelled().await;
                // Not ready, and out of discovery, so callers stop choosing
                // us; then finish what we have.
                drt.health().begin_drain(&path);
                if let Err(error) = drt.discovery().unregister(&key).await {
                    tracing::warn!(%key, %error, "could not unregister endpoint");
                }
                drt.handlers().drain(&path).await;
                drt.health().forget(&path);
                tracing::info!(endpoint = %path, "endpoint drained");
            }
        });
        Ok(ServingEndpoint {
            instance,
            stop,
            drained,
        })
    }
}

/// An endpoint being served in the background.
#[derive(Debug)]
pub struct ServingEndpoint {
    instance: Instance,
    /// Cancelled to drain this endpoint (a child of the runtime's endpoint token).
    stop: CancellationToken,
    drained: JoinHandle<()>,
}

impl ServingEndpoint {
    /// What this endpoint registered in discovery.
    pub fn instance(&self) -> &Instance {
        &self.instance
    }

    /// Starts draining this endpoint only; [`ServingEndpoint::wait`] returns when done.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// Resolves once the endpoint has been drained (after [`ServingEndpoint::stop`]
    /// or the runtime's shutdown).
    pub async fn wait(self) {
        if let Err(error) = self.drained.await {
            tracing::error!(%error, "endpoint drain task failed");
        }
    }
}

/// Adapts a typed engine to the request plane's bytes.
struct Ingress<E, Req, Resp> {
    engine: Arc<E>,
    types: PhantomData<fn(Req) -> Resp>,
}

impl<E, Req, Resp> PushHandler for Ingress<E, Req, Resp>
where
    E: AsyncEngine<Req, Resp>,
    Req: DeserializeOwned + Send + 'static,
    Resp: Serialize + Send + 'static,
{
    fn handle(&self, request: Context<Bytes>) -> BoxFuture<'static, Result<ByteStream, RequestError>> {
        let engine = self.engine.clone();
        async move {
            let (body, controller) = request.into_parts();
            let request: Req = rmp_serde::from_slice(&body).map_err(|e| {
                let what = format!("cannot decode the request as {}", std::any::type_name::<Req>());
                RequestError::new(ErrorKind::Invalid, what).with_source(e)
            })?;
            let responses = engine.generate(Context::with_controller(request, controller)).await?;
            let encoded = responses.map(|item| {
                item.and_then(|response| {
                    rmp_serde::to_vec_named(&response).map(Bytes::from).map_err(|e| {
                        let what = format!("cannot encode a response of type {}", std::any::type_name::<Resp>());
                        RequestError::new(ErrorKind::Engine, what).with_source(e)
                    })
                })
            });
            Ok(Box::pin(encoded) as ByteStream)
        }
        .boxed()
    }
}

/// Why an endpoint could not be served.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EndpointError {
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("endpoint {endpoint} has no handler: call .handler(engine) before .start()")]
    NoHandler { endpoint: String },
    #[error("endpoint {endpoint} is already served by this process")]
    AlreadyServed { endpoint: String },
    #[error("the health-check payload cannot be encoded as msgpack")]
    HealthCheckPayload {
        #[source]
        source: rmp_serde::encode::Error,
    },
    #[error("cannot publish load reports")]
    LoadReports(#[from] crate::event_plane::EventError),
    #[error("cannot create the endpoint's metrics")]
    Metrics(#[from] MetricsError),
    #[error("the runtime is shutting down; no new endpoints can start")]
    ShuttingDown,
    #[error(transparent)]
    Runtime(#[from] DistributedError),
    #[error("cannot register the endpoint in discovery")]
    Discovery(#[from] DiscoveryError),
}
