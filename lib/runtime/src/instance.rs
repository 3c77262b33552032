//! What an instance publishes in discovery: one process serving one
//! endpoint, under `v1/instances/{namespace}/{component}/{endpoint}/{instance_id:x}`.
//! Plain data shared by the server, the callers and the status server; it
//! holds no handle on the runtime.

use crate::discovery::{Bucket, Key, Registration};
use crate::request_plane::{Target, Transport};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::fmt;

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
    #[error("{key} does not hold instance JSON")]
    Json {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{key} holds the instance of {value_key}")]
    KeyMismatch { key: String, value_key: String },
}

#[cfg(test)]
mod tests {
    use super::*;

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
