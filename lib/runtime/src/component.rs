//! The handles of the mesh — Namespace → Component → Endpoint — each a name
//! plus the process's [`DistributedRuntime`]. Serving lives in
//! [`endpoint`](crate::component::endpoint), calling in
//! [`client`](crate::component::client), load reports in
//! [`load`](crate::component::load); what an instance registers is
//! [`crate::instance::Instance`].

pub mod client;
pub mod endpoint;
pub mod load;

use crate::distributed::DistributedRuntime;
use crate::event_plane::{Channel, EventError, EventPublisher, EventSubscriber};
use crate::metrics::Metrics;
use crate::names::{NameError, validate_name};

impl DistributedRuntime {
    /// The namespace `name` (lowercase letters, digits, `-` and `_`).
    pub fn namespace(&self, name: impl Into<String>) -> Result<Namespace, NameError> {
        Namespace::new(self.clone(), name.into())
    }
}

/// Opens a publisher of `channel` on the process's event plane.
async fn open_publisher(drt: &DistributedRuntime, channel: Channel) -> Result<EventPublisher, EventError> {
    EventPublisher::open(drt.event_plane().await?.as_ref(), channel).await
}

/// Subscribes to `channel` on the process's event plane, until the runtime
/// stops or the subscriber is dropped.
async fn open_subscriber(drt: &DistributedRuntime, channel: Channel) -> Result<EventSubscriber, EventError> {
    let stop = drt.runtime().root_token().child_token();
    let gaps = drt.metrics().event_gaps.clone();
    EventSubscriber::open(drt.event_plane().await?.as_ref(), channel, stop, gaps).await
}

/// A group of components, usually one deployment.
#[derive(Debug, Clone)]
pub struct Namespace {
    drt: DistributedRuntime,
    name: String,
}

impl Namespace {
    pub(crate) fn new(drt: DistributedRuntime, name: String) -> Result<Self, NameError> {
        validate_name("namespace", &name)?;
        Ok(Self { drt, name })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// This namespace's level of the metrics hierarchy.
    pub fn metrics(&self) -> Metrics {
        self.drt.metrics().namespace(&self.name)
    }

    /// A publisher of the namespace-wide `topic` on the event plane.
    pub async fn event_publisher(&self, topic: &str) -> Result<EventPublisher, EventError> {
        open_publisher(&self.drt, Channel::of_namespace(&self.name, topic)?).await
    }

    /// A subscriber to the namespace-wide `topic` (every publisher's events).
    pub async fn event_subscriber(&self, topic: &str) -> Result<EventSubscriber, EventError> {
        open_subscriber(&self.drt, Channel::of_namespace(&self.name, topic)?).await
    }

    /// The component `name` of this namespace.
    pub fn component(&self, name: impl Into<String>) -> Result<Component, NameError> {
        let name = name.into();
        validate_name("component", &name)?;
        Ok(Component {
            drt: self.drt.clone(),
            namespace: self.name.clone(),
            name,
        })
    }
}

/// A kind of process in a namespace (e.g. `backend`), serving endpoints.
#[derive(Debug, Clone)]
pub struct Component {
    drt: DistributedRuntime,
    namespace: String,
    name: String,
}

impl Component {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub(crate) fn drt(&self) -> &DistributedRuntime {
        &self.drt
    }

    /// This component's level of the metrics hierarchy.
    pub fn metrics(&self) -> Metrics {
        self.drt
            .metrics()
            .namespace(&self.namespace)
            .child("dynamo_component", &self.name)
    }

    /// A publisher of this component's `topic` on the event plane (e.g. `load`).
    pub async fn event_publisher(&self, topic: &str) -> Result<EventPublisher, EventError> {
        open_publisher(&self.drt, Channel::of_component(&self.namespace, &self.name, topic)?).await
    }

    /// A subscriber to this component's `topic` (every instance's events).
    pub async fn event_subscriber(&self, topic: &str) -> Result<EventSubscriber, EventError> {
        open_subscriber(&self.drt, Channel::of_component(&self.namespace, &self.name, topic)?).await
    }

    /// The endpoint `name` of this component. The name is checked when the
    /// endpoint is served or called.
    pub fn endpoint(&self, name: impl Into<String>) -> Endpoint {
        Endpoint {
            drt: self.drt.clone(),
            namespace: self.namespace.clone(),
            component: self.name.clone(),
            name: name.into(),
        }
    }
}

/// One operation of a component (e.g. `generate`), served by instances.
#[derive(Debug, Clone)]
pub struct Endpoint {
    drt: DistributedRuntime,
    namespace: String,
    component: String,
    name: String,
}

impl Endpoint {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn component(&self) -> &str {
        &self.component
    }

    /// `namespace/component/endpoint`, the name requests carry.
    pub fn path(&self) -> String {
        format!("{}/{}/{}", self.namespace, self.component, self.name)
    }

    pub fn drt(&self) -> &DistributedRuntime {
        &self.drt
    }

    /// Serves this endpoint from this process.
    pub fn endpoint_builder(&self) -> endpoint::EndpointBuilder {
        endpoint::EndpointBuilder::new(self.clone())
    }

    /// Follows this endpoint's instances in discovery, to call them.
    pub async fn client(&self) -> Result<client::Client, client::ClientError> {
        client::Client::new(self.clone()).await
    }

    /// This endpoint's level of the metrics hierarchy: metrics created here
    /// carry `dynamo_namespace`, `dynamo_component`, `dynamo_endpoint` and
    /// `worker_id`, e.g. `endpoint.metrics().create_counter("tokens_total", "…")`.
    pub fn metrics(&self) -> Metrics {
        self.drt
            .metrics()
            .namespace(&self.namespace)
            .child("dynamo_component", &self.component)
            .child("dynamo_endpoint", &self.name)
    }

    /// The component this endpoint belongs to.
    pub(crate) fn parent(&self) -> Component {
        Component {
            drt: self.drt.clone(),
            namespace: self.namespace.clone(),
            name: self.component.clone(),
        }
    }

    fn validate(&self) -> Result<(), NameError> {
        validate_name("endpoint", &self.name)
    }
}
