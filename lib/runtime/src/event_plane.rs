//! The event plane: fire-and-forget messages from workers to whoever listens
//! (load reports, KV events). [`EventPublisher`] sends typed events on a
//! topic of a component or a namespace; [`EventSubscriber`] receives them with
//! their [`EventEnvelope`] and counts gaps in each publisher's sequence.
//!
//! Two transports ([`crate::config::EventPlaneKind`]): `zmq` (each publisher
//! binds a PUB socket and registers it under `v1/event_channels/…`;
//! subscribers follow discovery) and `nats` (core subjects
//! `namespace.{ns}[.component.{comp}].{topic}`). Delivery is at most once:
//! a slow subscriber loses events rather than slowing the publisher, and the
//! loss shows as gaps.

mod nats;
mod zmq;

use crate::component::{Component, NameError, Namespace, validate_name};
use crate::config::EventPlaneKind;
use crate::discovery::DiscoveryError;
use crate::distributed::{DistributedError, DistributedRuntime};
use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Stand-in for the component segment of a namespace-wide channel's key
/// (`v1/event_channels/{ns}/*/{topic}/{id:x}`); `*` is not a valid component name.
const NAMESPACE_WIDE: &str = "*";

/// Events a subscriber buffers before its transport stops reading (and
/// the publisher's side starts dropping, which shows as gaps).
const SUBSCRIBER_BUFFER: usize = 65_536;

/// Everything that travels with an event (msgpack, named fields).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventEnvelope {
    /// Random per publisher object: a restarted publisher has a new id, so its
    /// sequence starting over is not a gap.
    pub publisher_id: u64,
    /// 0, 1, 2, … per publisher.
    pub sequence: u64,
    /// Unix time in milliseconds.
    pub published_at: u64,
    pub topic: String,
    /// The event, msgpack-encoded.
    #[serde(with = "serde_bytes_compat")]
    pub payload: Bytes,
}

impl EventEnvelope {
    /// Decodes the payload as `T`.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, EventError> {
        rmp_serde::from_slice(&self.payload).map_err(|e| EventError::Decode { reason: e.to_string() })
    }
}

/// msgpack `bin` for the payload (not an array of numbers).
mod serde_bytes_compat {
    use bytes::Bytes;
    use serde::{Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(bytes: &Bytes, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(bytes)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Bytes, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Bytes;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E>(self, v: &[u8]) -> Result<Bytes, E> {
                Ok(Bytes::copy_from_slice(v))
            }
            fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Bytes, E> {
                Ok(Bytes::from(v))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Bytes, A::Error> {
                let mut out = Vec::new();
                while let Some(b) = seq.next_element::<u8>()? {
                    out.push(b);
                }
                Ok(Bytes::from(out))
            }
        }
        deserializer.deserialize_bytes(Visitor)
    }
}

/// Where events of one topic belong.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Channel {
    pub(crate) namespace: String,
    /// `None` for a namespace-wide topic.
    pub(crate) component: Option<String>,
    pub(crate) topic: String,
}

impl Channel {
    fn of_component(component: &Component, topic: &str) -> Self {
        Self {
            namespace: component.namespace().to_string(),
            component: Some(component.name().to_string()),
            topic: topic.to_string(),
        }
    }

    fn of_namespace(namespace: &Namespace, topic: &str) -> Self {
        Self {
            namespace: namespace.name().to_string(),
            component: None,
            topic: topic.to_string(),
        }
    }

    /// `namespace.{ns}[.component.{comp}].{topic}` (the NATS subject).
    pub(crate) fn subject(&self) -> String {
        match &self.component {
            Some(component) => format!("namespace.{}.component.{component}.{}", self.namespace, self.topic),
            None => format!("namespace.{}.{}", self.namespace, self.topic),
        }
    }

    /// The component segment of the discovery key.
    pub(crate) fn key_component(&self) -> &str {
        self.component.as_deref().unwrap_or(NAMESPACE_WIDE)
    }
}

/// What a ZMQ publisher registers under `v1/event_channels/…`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventChannel {
    pub namespace: String,
    pub component: String,
    pub topic: String,
    pub instance_id: u64,
    pub transport: EventTransport,
}

/// How to reach a publisher.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventTransport {
    /// `tcp://host:port` of its PUB socket.
    Zmq(String),
}

/// Publishes typed events on one topic.
#[derive(Debug)]
pub struct EventPublisher {
    publisher_id: u64,
    sequence: AtomicU64,
    topic: String,
    sink: PublisherSink,
}

#[derive(Debug)]
enum PublisherSink {
    Zmq(zmq::ZmqPublisher),
    Nats(nats::NatsPublisher),
}

impl EventPublisher {
    /// A publisher of `topic` for `component` (e.g. `load`).
    pub async fn for_component(component: &Component, topic: &str) -> Result<Self, EventError> {
        Self::new(component.drt(), Channel::of_component(component, topic)).await
    }

    /// A publisher of `topic` for the whole namespace.
    pub async fn for_namespace(namespace: &Namespace, topic: &str) -> Result<Self, EventError> {
        Self::new(namespace.drt(), Channel::of_namespace(namespace, topic)).await
    }

    async fn new(drt: &DistributedRuntime, channel: Channel) -> Result<Self, EventError> {
        validate_name("topic", &channel.topic)?;
        let sink = match drt.event_plane() {
            EventPlaneKind::Zmq => PublisherSink::Zmq(zmq::ZmqPublisher::start(drt, &channel).await?),
            EventPlaneKind::Nats => PublisherSink::Nats(nats::NatsPublisher::new(drt.nats().await?, &channel)),
        };
        Ok(Self {
            publisher_id: rand::random::<u64>(),
            sequence: AtomicU64::new(0),
            topic: channel.topic,
            sink,
        })
    }

    pub fn publisher_id(&self) -> u64 {
        self.publisher_id
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Sends `event` (msgpack) to every current subscriber of the topic.
    pub async fn publish<T: Serialize>(&self, event: &T) -> Result<(), EventError> {
        let payload = rmp_serde::to_vec_named(event).map_err(|e| EventError::Encode { reason: e.to_string() })?;
        let envelope = EventEnvelope {
            publisher_id: self.publisher_id,
            sequence: self.sequence.fetch_add(1, Ordering::Relaxed),
            published_at: unix_millis(),
            topic: self.topic.clone(),
            payload: Bytes::from(payload),
        };
        let bytes = Bytes::from(rmp_serde::to_vec_named(&envelope).expect("an envelope always encodes"));
        match &self.sink {
            PublisherSink::Zmq(publisher) => publisher.send(bytes).await,
            PublisherSink::Nats(publisher) => publisher.send(bytes).await,
        }
    }
}

/// Receives the events of one topic, from every publisher.
#[derive(Debug)]
pub struct EventSubscriber {
    events: mpsc::Receiver<Bytes>,
    /// Last sequence seen per publisher, for gap detection.
    last: HashMap<u64, u64>,
    gaps: u64,
    gap_metric: prometheus::IntCounter,
    /// Stops the transport's tasks when the subscriber is dropped.
    stop: CancellationToken,
    zmq_publishers: Option<std::sync::Arc<AtomicU64>>,
}

impl EventSubscriber {
    /// Subscribes to `topic` of `component`.
    pub async fn for_component(component: &Component, topic: &str) -> Result<Self, EventError> {
        Self::new(component.drt(), Channel::of_component(component, topic)).await
    }

    /// Subscribes to the namespace-wide `topic`.
    pub async fn for_namespace(namespace: &Namespace, topic: &str) -> Result<Self, EventError> {
        Self::new(namespace.drt(), Channel::of_namespace(namespace, topic)).await
    }

    async fn new(drt: &DistributedRuntime, channel: Channel) -> Result<Self, EventError> {
        validate_name("topic", &channel.topic)?;
        let (tx, events) = mpsc::channel(SUBSCRIBER_BUFFER);
        let stop = drt.runtime().root_token().child_token();
        let zmq_publishers = match drt.event_plane() {
            EventPlaneKind::Zmq => Some(zmq::subscribe(drt, &channel, tx, stop.clone()).await?),
            EventPlaneKind::Nats => {
                nats::subscribe(drt, drt.nats().await?, &channel, tx, stop.clone()).await?;
                None
            }
        };
        Ok(Self {
            events,
            last: HashMap::new(),
            gaps: 0,
            gap_metric: drt.metrics().event_gaps.clone(),
            stop,
            zmq_publishers,
        })
    }

    /// The next event; `None` once the runtime stops. Events that cannot be
    /// decoded are logged and skipped.
    pub async fn next(&mut self) -> Option<EventEnvelope> {
        loop {
            let bytes = self.events.recv().await?;
            match rmp_serde::from_slice::<EventEnvelope>(&bytes) {
                Ok(envelope) => {
                    self.track(&envelope);
                    return Some(envelope);
                }
                Err(error) => tracing::warn!(%error, "skipping an event that is not an envelope"),
            }
        }
    }

    /// The next event decoded as `T`, with its envelope.
    pub async fn next_typed<T: DeserializeOwned>(&mut self) -> Option<Result<(EventEnvelope, T), EventError>> {
        let envelope = self.next().await?;
        Some(envelope.decode().map(|event| (envelope, event)))
    }

    /// Events known lost: missing sequence numbers, per publisher, so far.
    pub fn gaps(&self) -> u64 {
        self.gaps
    }

    /// ZMQ only: how many publishers this subscriber is connected to now.
    pub fn connected_publishers(&self) -> Option<u64> {
        self.zmq_publishers.as_ref().map(|n| n.load(Ordering::Acquire))
    }

    fn track(&mut self, envelope: &EventEnvelope) {
        let previous = self.last.insert(envelope.publisher_id, envelope.sequence);
        if let Some(previous) = previous
            && envelope.sequence > previous + 1
        {
            let missing = envelope.sequence - previous - 1;
            self.gaps += missing;
            self.gap_metric.inc_by(missing);
        }
    }
}

impl Drop for EventSubscriber {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Why an event could not be published or received.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EventError {
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("cannot encode the event as msgpack: {reason}")]
    Encode { reason: String },
    #[error("cannot decode the event: {reason}")]
    Decode { reason: String },
    #[error("zmq {action} failed")]
    Zmq {
        action: &'static str,
        #[source]
        source: ::zeromq::ZmqError,
    },
    #[error("nats publish failed: {reason}")]
    Nats { reason: String },
    #[error("the publisher was stopped")]
    Closed,
    #[error(transparent)]
    Runtime(#[from] DistributedError),
    #[error("cannot register the event channel in discovery")]
    Discovery(#[from] DiscoveryError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_follow_dynamo() {
        let component = Channel {
            namespace: "dynamo".into(),
            component: Some("backend".into()),
            topic: "load".into(),
        };
        assert_eq!(component.subject(), "namespace.dynamo.component.backend.load");
        let namespace = Channel {
            component: None,
            ..component
        };
        assert_eq!(namespace.subject(), "namespace.dynamo.load");
        assert_eq!(namespace.key_component(), "*");
    }

    #[test]
    fn envelopes_round_trip_with_a_binary_payload() {
        let envelope = EventEnvelope {
            publisher_id: 7,
            sequence: 3,
            published_at: 1,
            topic: "load".into(),
            payload: Bytes::from(rmp_serde::to_vec_named(&42u32).unwrap()),
        };
        let bytes = rmp_serde::to_vec_named(&envelope).unwrap();
        let back: EventEnvelope = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(back, envelope);
        assert_eq!(back.decode::<u32>().unwrap(), 42);
    }
}
