//! Who exists: processes register what they serve under well-known keys and
//! watch the keys of others. One trait, [`Discovery`], with one backend per
//! infrastructure; all backends pass the same behavioural suite
//! (`discovery::suite`, run from each backend's tests).
//!
//! Keys follow Dynamo's etcd layout so `etcdctl get --prefix v1/` reads
//! familiarly: `v1/{bucket}/{namespace}/{component}/{name}/{instance_id:x}`,
//! where `name` is an endpoint (instances, models) or a topic (event channels).
//! Queries match whole path segments: a query for endpoint `gen` never matches
//! `generate`.
//!
//! This module knows nothing about requests or routing.

pub mod etcd;
pub mod file;
pub mod kube;
pub mod mem;
#[cfg(test)]
pub(crate) mod suite;

use bytes::Bytes;
use futures::Stream;
use std::fmt;
use std::pin::Pin;

/// The kind of thing a key registers; the second path segment of every key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Bucket {
    /// Endpoint instances a caller can send requests to.
    Instances,
    /// Model cards (the LLM layer).
    Models,
    /// Event-plane publishers.
    EventChannels,
}

impl Bucket {
    pub fn as_str(self) -> &'static str {
        match self {
            Bucket::Instances => "instances",
            Bucket::Models => "models",
            Bucket::EventChannels => "event_channels",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        [Bucket::Instances, Bucket::Models, Bucket::EventChannels]
            .into_iter()
            .find(|b| b.as_str() == text)
    }
}

/// The full address of one registration.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    pub bucket: Bucket,
    pub namespace: String,
    pub component: String,
    /// Endpoint name (instances, models) or topic (event channels).
    pub name: String,
    pub instance_id: u64,
}

impl Key {
    /// Prefix shared by every key (the layout version).
    pub const ROOT: &'static str = "v1";

    /// Parses `v1/{bucket}/{ns}/{comp}/{name}/{id:x}`.
    pub fn parse(text: &str) -> Result<Self, DiscoveryError> {
        let bad = || DiscoveryError::BadKey { key: text.to_string() };
        let parts: Vec<&str> = text.split('/').collect();
        let [root, bucket, namespace, component, name, id] = parts.as_slice() else {
            return Err(bad());
        };
        if *root != Self::ROOT || [namespace, component, name].iter().any(|s| s.is_empty()) {
            return Err(bad());
        }
        Ok(Key {
            bucket: Bucket::parse(bucket).ok_or_else(bad)?,
            namespace: namespace.to_string(),
            component: component.to_string(),
            name: name.to_string(),
            instance_id: u64::from_str_radix(id, 16).map_err(|_| bad())?,
        })
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}/{}/{}/{}/{:x}",
            Self::ROOT,
            self.bucket.as_str(),
            self.namespace,
            self.component,
            self.name,
            self.instance_id
        )
    }
}

/// A key and its value (JSON bytes, as stored in etcd).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub key: Key,
    pub value: Bytes,
}

/// Which registrations a caller wants: one bucket, optionally narrowed to a
/// namespace, then a component, then a name. Segments match whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    bucket: Bucket,
    namespace: Option<String>,
    component: Option<String>,
    name: Option<String>,
}

impl Query {
    /// Everything in `bucket`.
    pub fn bucket(bucket: Bucket) -> Self {
        Self {
            bucket,
            namespace: None,
            component: None,
            name: None,
        }
    }

    /// Narrows the query to one namespace.
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = Some(namespace.into());
        self
    }

    /// Narrows the query to one component (of the namespace).
    pub fn component(mut self, component: impl Into<String>) -> Self {
        self.component = Some(component.into());
        self
    }

    /// Narrows the query to one endpoint or topic name (of the component).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// The instances of one endpoint.
    pub fn endpoint(namespace: &str, component: &str, endpoint: &str) -> Self {
        Self::bucket(Bucket::Instances)
            .namespace(namespace)
            .component(component)
            .name(endpoint)
    }

    /// True when `key` is selected by this query (whole-segment comparison).
    pub fn matches(&self, key: &Key) -> bool {
        fn segment(wanted: &Option<String>, actual: &str) -> bool {
            wanted.as_deref().is_none_or(|w| w == actual)
        }
        self.bucket == key.bucket
            && segment(&self.namespace, &key.namespace)
            && segment(&self.component, &key.component)
            && segment(&self.name, &key.name)
    }

    /// The key prefix a KV store can scan for this query. It always ends at a
    /// segment boundary (`/`), so `gen` never matches `generate`; a query that
    /// skips a level (a name without a component) needs [`Query::matches`] too.
    pub fn prefix(&self) -> String {
        let mut prefix = format!("{}/{}/", Key::ROOT, self.bucket.as_str());
        for segment in [&self.namespace, &self.component, &self.name] {
            match segment {
                Some(s) => {
                    prefix.push_str(s);
                    prefix.push('/');
                }
                None => break,
            }
        }
        prefix
    }
}

/// One step of a [`Discovery::watch`] stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// The complete current set for the query. Always the first event; a
    /// backend sends it again after it had to resynchronise (a lagging
    /// watcher, an etcd compaction), and the receiver replaces its whole view.
    Snapshot(Vec<Registration>),
    /// A registration was added or its value changed.
    Put(Registration),
    /// A registration is gone (unregistered, or its owner died).
    Delete(Key),
}

/// The stream returned by [`Discovery::watch`].
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchEvent, DiscoveryError>> + Send>>;

/// A registry of who serves what.
///
/// Contract, checked for every backend by the shared suite:
/// - `register` makes a registration visible to `list` and to every `watch`
///   whose query matches; registering the same key again replaces the value.
///   A process may only register keys carrying its own `instance_id`.
/// - `unregister` removes it (a missing key is not an error).
/// - `watch` first yields a [`WatchEvent::Snapshot`] of the current set, then
///   changes in order. Dropping the stream ends the watch.
/// - `shutdown` removes everything this process registered (like revoking an
///   etcd lease) and is idempotent.
#[async_trait::async_trait]
pub trait Discovery: Send + Sync + fmt::Debug {
    /// The id of this process in discovery; every key it registers carries it.
    fn instance_id(&self) -> u64;

    async fn register(&self, registration: Registration) -> Result<(), DiscoveryError>;

    async fn unregister(&self, key: &Key) -> Result<(), DiscoveryError>;

    async fn list(&self, query: &Query) -> Result<Vec<Registration>, DiscoveryError>;

    async fn watch(&self, query: &Query) -> Result<WatchStream, DiscoveryError>;

    async fn shutdown(&self) -> Result<(), DiscoveryError>;
}

/// Why a discovery operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DiscoveryError {
    #[error(
        "key {key:?} is not of the form v1/{{instances|models|event_channels}}/{{namespace}}/{{component}}/{{name}}/{{instance_id:x}}"
    )]
    BadKey { key: String },
    #[error("process {own:x} cannot register {key}: the key belongs to instance {key_owner:x}")]
    NotOwner { key: Key, own: u64, key_owner: u64 },
    #[error("discovery has shut down")]
    ShutDown,
    #[error("file discovery: cannot {action} {path}")]
    File {
        action: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "file discovery: will not use {path}: {problem}; anyone who can write there can register \
         models and take their traffic. Use a directory of this user's own (DYN_FILE_KV), mode 0700"
    )]
    FileUntrusted { path: std::path::PathBuf, problem: String },
    #[error("etcd {operation} failed")]
    Etcd {
        operation: &'static str,
        #[source]
        source: etcd_client::Error,
    },
    #[error(
        "cannot reach etcd at {endpoints} within {timeout:?} (ETCD_ENDPOINTS); is it running? \
         Without etcd, set DYN_DISCOVERY_BACKEND=mem (one process) or file (several processes on one machine)"
    )]
    EtcdUnreachable {
        endpoints: String,
        timeout: std::time::Duration,
        #[source]
        source: Option<etcd_client::Error>,
    },
    #[error("Kubernetes API: cannot {operation}{hint}")]
    Kube {
        operation: String,
        /// How to fix the usual causes, when the answer tells; else empty.
        hint: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(
        "this process already has a discovery client for Pod {pod}: with the kubernetes backend a Pod is \
         one instance (its name is the instance id); run one worker per Pod"
    )]
    PodTaken { pod: String },
    #[error("Kubernetes API: cannot {operation}: no answer within {timeout:?}")]
    KubeTimeout {
        operation: String,
        timeout: std::time::Duration,
    },
    #[error("the value of {key} is not UTF-8 text; the kubernetes backend stores values as text (JSON)")]
    NotText { key: Key },
    #[error(
        "etcd at {endpoints} refused this process: wrong or missing credentials \
         (ETCD_AUTH_USERNAME and ETCD_AUTH_PASSWORD), or a user without read/write access to the v1/ keys"
    )]
    EtcdAccess {
        endpoints: String,
        #[source]
        source: etcd_client::Error,
    },
    #[error("cannot read the etcd TLS file {path} ({variable})")]
    TlsFile {
        variable: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The registrations of a view (key → value), in key order.
pub(crate) fn registrations(view: &std::collections::BTreeMap<Key, Bytes>) -> Vec<Registration> {
    view.iter()
        .map(|(key, value)| Registration {
            key: key.clone(),
            value: value.clone(),
        })
        .collect()
}

/// A [`WatchStream`] over the events a backend task sends into `events`.
pub(crate) fn watch_stream(
    events: tokio::sync::mpsc::UnboundedReceiver<Result<WatchEvent, DiscoveryError>>,
) -> WatchStream {
    Box::pin(futures::stream::unfold(events, |mut events| async move {
        events.recv().await.map(|event| (event, events))
    }))
}

/// Refuses a registration whose key carries another process's instance id.
pub(crate) fn ensure_owner(own: u64, registration: &Registration) -> Result<(), DiscoveryError> {
    if registration.key.instance_id == own {
        Ok(())
    } else {
        Err(DiscoveryError::NotOwner {
            own,
            key_owner: registration.key.instance_id,
            key: registration.key.clone(),
        })
    }
}

/// The events that turn view `old` into view `new` (deletes first), for
/// backends that rescan or re-list instead of receiving every change.
pub(crate) fn diff(
    old: &std::collections::BTreeMap<Key, Bytes>,
    new: &std::collections::BTreeMap<Key, Bytes>,
) -> Vec<WatchEvent> {
    let mut events: Vec<WatchEvent> = old
        .keys()
        .filter(|key| !new.contains_key(*key))
        .map(|key| WatchEvent::Delete(key.clone()))
        .collect();
    for (key, value) in new {
        if old.get(key) != Some(value) {
            events.push(WatchEvent::Put(Registration {
                key: key.clone(),
                value: value.clone(),
            }));
        }
    }
    events
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> Key {
        Key {
            bucket: Bucket::Instances,
            namespace: "ns".into(),
            component: "comp".into(),
            name: name.into(),
            instance_id: 0xabc,
        }
    }

    #[test]
    fn keys_print_in_dynamo_layout_and_parse_back() {
        let k = key("generate");
        assert_eq!(k.to_string(), "v1/instances/ns/comp/generate/abc");
        assert_eq!(Key::parse(&k.to_string()).unwrap(), k);
    }

    #[test]
    fn malformed_keys_are_rejected() {
        for bad in [
            "",
            "v1/instances/ns/comp/gen",
            "v2/instances/a/b/c/1",
            "v1/nope/a/b/c/1",
            "v1/instances/a/b/c/xyz",
            "v1/instances//b/c/1",
        ] {
            assert!(Key::parse(bad).is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn queries_match_whole_segments_only() {
        let q = Query::endpoint("ns", "comp", "gen");
        assert!(q.matches(&key("gen")));
        assert!(!q.matches(&key("generate")));
        assert_eq!(q.prefix(), "v1/instances/ns/comp/gen/");
    }

    #[test]
    fn a_query_may_skip_levels() {
        let q = Query::bucket(Bucket::Instances).name("gen");
        assert!(q.matches(&key("gen")));
        assert_eq!(q.prefix(), "v1/instances/");
    }
}
