//! The names of the mesh — Namespace → Component → Endpoint → Instance — and
//! what an instance publishes in discovery. Serving lives in
//! [`endpoint`](crate::component::endpoint), calling in
//! [`client`](crate::component::client).

pub mod client;
pub mod endpoint;

use crate::discovery::{Bucket, Key, Registration};
use crate::distributed::DistributedRuntime;
use crate::metrics::Metrics;
use crate::request_plane::{Target, Transport};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Longest allowed name segment; keeps keys, subjects and metric labels sane.
const MAX_NAME_LEN: usize = 64;

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

    pub(crate) fn drt(&self) -> &DistributedRuntime {
        &self.drt
    }

    /// This namespace's level of the metrics hierarchy.
    pub fn metrics(&self) -> Metrics {
        self.drt.metrics().namespace(&self.name)
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

    fn validate(&self) -> Result<(), NameError> {
        validate_name("endpoint", &self.name)
    }
}

/// One process serving one endpoint, as registered under
/// `v1/instances/{namespace}/{component}/{endpoint}/{instance_id:x}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    pub namespace: String,
    pub component: String,
    pub endpoint: String,
    pub instance_id: u64,
    pub transport: Transport,
}

impl Instance {
    pub fn key(&self) -> Key {
        Key {
            bucket: Bucket::Instances,
            namespace: self.namespace.clone(),
            component: self.component.clone(),
            name: self.endpoint.clone(),
            instance_id: self.instance_id,
        }
    }

    /// Where a request for this instance goes.
    pub fn target(&self) -> Target {
        Target {
            transport: self.transport.clone(),
            endpoint: format!("{}/{}/{}", self.namespace, self.component, self.endpoint),
            instance_id: self.instance_id,
        }
    }

    pub fn to_registration(&self) -> Registration {
        Registration {
            key: self.key(),
            value: Bytes::from(serde_json::to_vec(self).expect("an instance always serializes")),
        }
    }

    /// Reads a registration back; the key must agree with the value.
    pub fn from_registration(registration: &Registration) -> Result<Self, InstanceDecodeError> {
        let instance: Instance =
            serde_json::from_slice(&registration.value).map_err(|source| InstanceDecodeError::Json {
                key: registration.key.to_string(),
                source,
            })?;
        if instance.key() != registration.key {
            return Err(InstanceDecodeError::KeyMismatch {
                key: registration.key.to_string(),
                value_key: instance.key().to_string(),
            });
        }
        Ok(instance)
    }
}

impl fmt::Display for Instance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}/{}/{:x}",
            self.namespace, self.component, self.endpoint, self.instance_id
        )
    }
}

/// A registration under `v1/instances/` that is not a valid [`Instance`].
#[derive(Debug, thiserror::Error)]
pub enum InstanceDecodeError {
    #[error("{key} does not hold instance JSON: {source}")]
    Json {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{key} holds the instance of {value_key}")]
    KeyMismatch { key: String, value_key: String },
}

/// A namespace, component or endpoint name that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} name {name:?}: use 1-64 lowercase letters, digits, '-' or '_'")]
pub struct NameError {
    pub kind: &'static str,
    pub name: String,
}

/// Names become key segments, NATS subjects and metric labels, so they are
/// limited to characters that are safe in all three.
pub(crate) fn validate_name(kind: &'static str, name: &str) -> Result<(), NameError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(NameError {
            kind,
            name: name.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_limited_to_safe_characters() {
        for good in ["dynamo", "backend-2", "gen_v1", "a"] {
            assert!(validate_name("endpoint", good).is_ok(), "{good}");
        }
        for bad in ["", "Generate", "a/b", "a.b", "a b", &"x".repeat(65)] {
            let err = validate_name("endpoint", bad).unwrap_err();
            assert!(err.to_string().contains("lowercase letters"), "{err}");
        }
    }

    #[test]
    fn instance_json_keeps_dynamo_field_names() {
        let instance = Instance {
            namespace: "dynamo".into(),
            component: "backend".into(),
            endpoint: "generate".into(),
            instance_id: 0x1f,
            transport: Transport::Tcp("127.0.0.1:4000".into()),
        };
        let json: serde_json::Value = serde_json::from_slice(&instance.to_registration().value).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"namespace":"dynamo","component":"backend","endpoint":"generate","instance_id":31,"transport":{"tcp":"127.0.0.1:4000"}})
        );
        assert_eq!(instance.key().to_string(), "v1/instances/dynamo/backend/generate/1f");
        assert_eq!(
            Instance::from_registration(&instance.to_registration()).unwrap(),
            instance
        );
    }

    #[test]
    fn a_value_filed_under_the_wrong_key_is_rejected() {
        let instance = Instance {
            namespace: "ns".into(),
            component: "c".into(),
            endpoint: "e".into(),
            instance_id: 1,
            transport: Transport::Tcp("127.0.0.1:1".into()),
        };
        let mut registration = instance.to_registration();
        registration.key.instance_id = 2;
        assert!(matches!(
            Instance::from_registration(&registration),
            Err(InstanceDecodeError::KeyMismatch { .. })
        ));
    }
}
