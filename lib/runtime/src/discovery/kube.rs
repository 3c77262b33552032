//! The Kubernetes discovery backend. This module is its pure part: what the
//! registry holds, computed from the objects the API server returns, with no
//! I/O. The client that writes, lists and watches those objects
//! ([`client::KubeDiscovery`], kube-rs) is behind the cargo feature
//! `kubernetes`; its tests run it against a small in-memory API server
//! (`switchyard_test_support::fake_api`, a dev-dependency).
//!
//! The model (Dynamo's): every worker Pod owns one custom resource
//! (`WorkerMetadata`, group `switchyard.dev`) whose `spec.registrations`
//! hold its keys and values. A registration is visible only while the Pod
//! that owns the resource is ready, as its EndpointSlice says; the view is
//! the join of the two, and watchers get the difference between
//! successive views.

use super::{Key, WatchEvent};
use bytes::Bytes;
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};

/// A worker's registrations as its custom resource carries them.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct WorkerMetadata {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: WorkerSpec,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
pub struct ObjectMeta {
    pub name: String,
    #[serde(default, rename = "ownerReferences")]
    pub owner_references: Vec<OwnerReference>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct OwnerReference {
    pub kind: String,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
pub struct WorkerSpec {
    /// `null` in a resource reads as empty.
    #[serde(default, deserialize_with = "null_as_empty")]
    pub registrations: Vec<SpecRegistration>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct SpecRegistration {
    pub key: String,
    /// The registration's JSON value, as text.
    pub value: String,
}

fn null_as_empty<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<SpecRegistration>, D::Error> {
    Ok(Option::<Vec<SpecRegistration>>::deserialize(d)?.unwrap_or_default())
}

impl WorkerMetadata {
    /// The Pod that owns this resource (its owner reference of kind Pod).
    pub fn pod(&self) -> Option<&str> {
        self.metadata
            .owner_references
            .iter()
            .find(|owner| owner.kind == "Pod")
            .map(|owner| owner.name.as_str())
    }
}

/// The part of an EndpointSlice the join needs: which Pods are ready.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct EndpointSlice {
    #[serde(default, deserialize_with = "null_as_empty_endpoints")]
    pub endpoints: Vec<SliceEndpoint>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct SliceEndpoint {
    #[serde(default)]
    pub conditions: Conditions,
    #[serde(default, rename = "targetRef")]
    pub target_ref: Option<TargetRef>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
pub struct Conditions {
    /// Kubernetes: a missing `ready` means unknown, which counts as not ready here.
    #[serde(default)]
    pub ready: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct TargetRef {
    pub kind: String,
    pub name: String,
}

fn null_as_empty_endpoints<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<SliceEndpoint>, D::Error> {
    Ok(Option::<Vec<SliceEndpoint>>::deserialize(d)?.unwrap_or_default())
}

/// The Pods that some slice lists as ready.
pub fn ready_pods(slices: &[EndpointSlice]) -> BTreeSet<String> {
    slices
        .iter()
        .flat_map(|slice| slice.endpoints.iter())
        .filter(|endpoint| endpoint.conditions.ready == Some(true))
        .filter_map(|endpoint| endpoint.target_ref.as_ref())
        .filter(|target| target.kind == "Pod")
        .map(|target| target.name.clone())
        .collect()
}

/// What a watcher sees: the registrations of every resource whose Pod is
/// ready. A resource without a Pod owner, or whose Pod is not ready (or
/// gone), contributes nothing; an unparsable key is skipped with a warning
/// (one bad entry must not hide a worker's other registrations).
pub fn join(resources: &[WorkerMetadata], ready: &BTreeSet<String>) -> BTreeMap<Key, Bytes> {
    let mut view = BTreeMap::new();
    for resource in resources {
        let Some(pod) = resource.pod() else {
            tracing::debug!(resource = %resource.metadata.name, "worker metadata without a Pod owner; ignored");
            continue;
        };
        if !ready.contains(pod) {
            continue;
        }
        for registration in &resource.spec.registrations {
            match Key::parse(&registration.key) {
                Ok(key) => {
                    view.insert(key, Bytes::from(registration.value.clone()));
                }
                Err(error) => tracing::warn!(resource = %resource.metadata.name, %error, "skipping a registration"),
            }
        }
    }
    view
}

/// The events that take a watcher from `old` to the join of the new objects,
/// and that new view. A resync is the same call with the full lists.
pub fn advance(
    old: &BTreeMap<Key, Bytes>,
    resources: &[WorkerMetadata],
    slices: &[EndpointSlice],
) -> (Vec<WatchEvent>, BTreeMap<Key, Bytes>) {
    let new = join(resources, &ready_pods(slices));
    (super::diff(old, &new), new)
}

/// A Pod's instance id: a stable hash of its name, so a restarted process in
/// the same Pod keeps its id (FNV-1a, masked to 53 bits like every id, so it
/// survives a trip through JSON numbers).
pub fn instance_id_for_pod(pod_name: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in pod_name.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash & 0x001F_FFFF_FFFF_FFFF
}

#[cfg(feature = "kubernetes")]
pub mod client;

#[cfg(test)]
mod tests;
