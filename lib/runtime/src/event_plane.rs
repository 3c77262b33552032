//! The event plane: fire-and-forget messages from workers to whoever listens
//! (load reports, KV events). [`EventPublisher`] sends typed events on a
//! [`Channel`] (a topic of a component or of a namespace); [`EventSubscriber`]
//! receives them with their [`EventEnvelope`] and counts gaps in each
//! publisher's sequence. Both are opened through
//! [`crate::component::Component`] or [`crate::component::Namespace`].
//!
//! How the bytes travel is one small trait, [`EventPlane`], with a backend
//! per transport ([`crate::config::EventPlaneKind`]): `zmq` (libzmq, frames
//! capped at 16 MiB; each publisher binds a PUB socket and registers it
//! under `v1/event_channels/…`; subscribers follow discovery) and `nats` (core subjects
//! `namespace.{ns}[.component.{comp}].{topic}`). The process builds its
//! backend once (`distributed.rs`). Delivery is at most once: a slow
//! subscriber loses events rather than slowing the publisher, and the loss
//! shows as gaps.
//!
//! This module knows nothing of components, endpoints or routing.

pub(crate) mod nats;
pub(crate) mod zmq;

use crate::discovery::DiscoveryError;
use crate::names::{NameError, validate_name};
use crate::nats::NatsConnectError;
use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Stand-in for the component segment of a namespace-wide channel's key
/// (`v1/event_channels/{ns}/*/{topic}/{id:x}`); `*` is not a valid component name.
const NAMESPACE_WIDE: &str = "*";

/// Events a subscriber buffers before its transport stops reading (and
/// the publisher's side starts dropping, which shows as gaps).
const SUBSCRIBER_BUFFER: usize = 65_536;

/// How events travel between processes: one backend per transport.
///
/// The contract every backend keeps:
/// - [`EventPlane::publisher`] opens a sink for one channel. Each envelope
///   given to [`EventSink::send`] reaches every subscriber connected at the
///   time, at most once; a slow subscriber loses envelopes instead of slowing
///   the sender. Dropping the sink stops publishing and withdraws whatever the
///   backend registered for it.
/// - [`EventPlane::subscribe`] forwards every envelope published on the
///   channel, by any process, to `events` until `stop` is cancelled or
///   `events` is closed; it finds publishers that appear later by itself.
/// - Neither call waits without bound: setting up fails with an
///   [`EventError`] instead.
///
/// ```ignore
/// let sink = plane.publisher(&channel).await?;
/// sink.send(envelope_bytes).await?;
/// ```
#[async_trait::async_trait]
pub trait EventPlane: Send + Sync + std::fmt::Debug {
    /// Opens a sender of envelopes on `channel`.
    async fn publisher(&self, channel: &Channel) -> Result<Box<dyn EventSink>, EventError>;

    /// Forwards the envelopes published on `channel` to `events` until `stop`.
    async fn subscribe(
        &self,
        channel: &Channel,
        events: mpsc::Sender<Bytes>,
        stop: CancellationToken,
    ) -> Result<Subscription, EventError>;
}

/// The sending half of one channel on one [`EventPlane`].
#[async_trait::async_trait]
pub trait EventSink: Send + Sync + std::fmt::Debug {
    /// Hands one encoded envelope to the transport. Fails only when the
    /// transport is gone ([`EventError::Closed`]) or refuses the message.
    async fn send(&self, envelope: Bytes) -> Result<(), EventError>;
}

/// What a backend reports about a subscription it set up.
#[derive(Debug, Default)]
pub struct Subscription {
    /// ZMQ only: how many publishers the subscription is connected to now.
    pub connected_publishers: Option<Arc<AtomicU64>>,
}

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
        rmp_serde::from_slice(&self.payload).map_err(|source| EventError::Decode { source })
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

/// Where events of one topic belong: a topic of one component, or of a
/// whole namespace.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Channel {
    namespace: String,
    /// `None` for a namespace-wide topic.
    component: Option<String>,
    topic: String,
}

impl Channel {
    /// `topic` of `component` in `namespace` (names already checked by the caller).
    pub(crate) fn of_component(namespace: &str, component: &str, topic: &str) -> Result<Self, NameError> {
        validate_name("topic", topic)?;
        Ok(Self {
            namespace: namespace.to_string(),
            component: Some(component.to_string()),
            topic: topic.to_string(),
        })
    }

    /// The namespace-wide `topic`.
    pub(crate) fn of_namespace(namespace: &str, topic: &str) -> Result<Self, NameError> {
        validate_name("topic", topic)?;
        Ok(Self {
            namespace: namespace.to_string(),
            component: None,
            topic: topic.to_string(),
        })
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// `None` for a namespace-wide topic.
    pub fn component(&self) -> Option<&str> {
        self.component.as_deref()
    }

    pub fn topic(&self) -> &str {
        &self.topic
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
    sink: Box<dyn EventSink>,
}

impl EventPublisher {
    /// A publisher of `channel` on `plane`; see
    /// [`crate::component::Component::event_publisher`].
    pub(crate) async fn open(plane: &dyn EventPlane, channel: Channel) -> Result<Self, EventError> {
        let sink = plane.publisher(&channel).await?;
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

    /// Fault injection: uses up the next `events` sequence numbers without
    /// sending anything, as if those events had been lost on the way, so
    /// subscribers count them as a gap (chaos and gap-detection tests).
    pub fn withhold(&self, events: u64) {
        self.sequence.fetch_add(events, Ordering::Relaxed);
    }

    /// Sends `event` (msgpack) to every current subscriber of the topic.
    pub async fn publish<T: Serialize>(&self, event: &T) -> Result<(), EventError> {
        let payload = rmp_serde::to_vec_named(event).map_err(|source| EventError::Encode { source })?;
        let envelope = EventEnvelope {
            publisher_id: self.publisher_id,
            sequence: self.sequence.fetch_add(1, Ordering::Relaxed),
            published_at: unix_millis(),
            topic: self.topic.clone(),
            payload: Bytes::from(payload),
        };
        let bytes = Bytes::from(rmp_serde::to_vec_named(&envelope).expect("an envelope always encodes"));
        self.sink.send(bytes).await
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
    subscription: Subscription,
}

impl EventSubscriber {
    /// Subscribes to `channel` on `plane` until `stop` or until dropped,
    /// counting lost events on `gap_metric`; see
    /// [`crate::component::Component::event_subscriber`].
    pub(crate) async fn open(
        plane: &dyn EventPlane,
        channel: Channel,
        stop: CancellationToken,
        gap_metric: prometheus::IntCounter,
    ) -> Result<Self, EventError> {
        let (tx, events) = mpsc::channel(SUBSCRIBER_BUFFER);
        let subscription = plane.subscribe(&channel, tx, stop.clone()).await?;
        Ok(Self {
            events,
            last: HashMap::new(),
            gaps: 0,
            gap_metric,
            stop,
            subscription,
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
        self.subscription
            .connected_publishers
            .as_ref()
            .map(|n| n.load(Ordering::Acquire))
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
    #[error("cannot encode the event as msgpack")]
    Encode {
        #[source]
        source: rmp_serde::encode::Error,
    },
    #[error("cannot decode the event")]
    Decode {
        #[source]
        source: rmp_serde::decode::Error,
    },
    #[error("zmq {action} failed")]
    Zmq {
        action: &'static str,
        #[source]
        source: ::zmq::Error,
    },
    #[error("cannot start the {name} thread")]
    Thread {
        name: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("nats publish failed")]
    NatsPublish {
        #[source]
        source: async_nats::PublishError,
    },
    #[error("nats subscribe failed")]
    NatsSubscribe {
        #[source]
        source: async_nats::SubscribeError,
    },
    #[error("the event plane cannot reach NATS")]
    NatsConnect(#[from] NatsConnectError),
    #[error("the publisher was stopped")]
    Closed,
    #[error("cannot register the event channel in discovery")]
    Discovery(#[from] DiscoveryError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_follow_dynamo() {
        let component = Channel::of_component("dynamo", "backend", "load").unwrap();
        assert_eq!(component.subject(), "namespace.dynamo.component.backend.load");
        let namespace = Channel::of_namespace("dynamo", "load").unwrap();
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
