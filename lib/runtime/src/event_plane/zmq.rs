//! The ZMQ event transport (pure-Rust `zeromq`, no C library): a publisher
//! binds a PUB socket on an ephemeral port and registers it under
//! `v1/event_channels/{ns}/{comp}/{topic}/{instance_id:x}`; a subscriber
//! follows those registrations and keeps one SUB connection per publisher,
//! opened when the publisher appears and closed when it goes.
//!
//! Messages are two frames: the topic, then the msgpack envelope.

use super::{Channel, EventChannel, EventError, EventPlane, EventSink, EventTransport, Subscription};
use crate::discovery::{Bucket, Discovery, Key, Query, Registration, WatchEvent};
use crate::runtime::Runtime;
use bytes::Bytes;
use futures::StreamExt;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use zeromq::{Socket, SocketRecv, SocketSend, ZmqMessage};

/// Envelopes queued for the socket task before `publish` waits.
const PUBLISH_QUEUE: usize = 65_536;

/// The ZMQ event plane of one process.
#[derive(Debug)]
pub(crate) struct ZmqEventPlane {
    /// Where publishers are registered and found.
    discovery: Arc<dyn Discovery>,
    /// The address publishers bind their PUB sockets on (port 0: any free one).
    bind_host: String,
    /// Owns the socket tasks, so they stop with the process.
    runtime: Runtime,
}

impl ZmqEventPlane {
    pub(crate) fn new(discovery: Arc<dyn Discovery>, bind_host: String, runtime: Runtime) -> Self {
        Self {
            discovery,
            bind_host,
            runtime,
        }
    }
}

#[async_trait::async_trait]
impl EventPlane for ZmqEventPlane {
    /// Binds a PUB socket and registers it under `v1/event_channels/…`.
    async fn publisher(&self, channel: &Channel) -> Result<Box<dyn EventSink>, EventError> {
        let mut socket = zeromq::PubSocket::new();
        let endpoint = socket
            .bind(&format!("tcp://{}:0", self.bind_host))
            .await
            .map_err(|source| EventError::Zmq { action: "bind", source })?;
        let record = EventChannel {
            namespace: channel.namespace.clone(),
            component: channel.key_component().to_string(),
            topic: channel.topic.clone(),
            instance_id: self.discovery.instance_id(),
            transport: EventTransport::Zmq(endpoint.to_string()),
        };
        let key = Key {
            bucket: Bucket::EventChannels,
            namespace: record.namespace.clone(),
            component: record.component.clone(),
            name: record.topic.clone(),
            instance_id: record.instance_id,
        };
        let value = Bytes::from(serde_json::to_vec(&record).expect("an event channel always serializes"));
        self.discovery
            .register(Registration {
                key: key.clone(),
                value,
            })
            .await?;
        let (frames, mut queue) = mpsc::channel::<Bytes>(PUBLISH_QUEUE);
        let topic = Bytes::from(channel.topic.clone());
        let stopped = self.runtime.root_token().clone();
        self.runtime.spawn(async move {
            loop {
                let envelope = tokio::select! {
                    _ = stopped.cancelled() => return,
                    envelope = queue.recv() => match envelope {
                        Some(envelope) => envelope,
                        None => return,
                    },
                };
                let mut message = ZmqMessage::from(topic.clone());
                message.push_back(envelope);
                // PUB never blocks on a slow subscriber: it drops for that
                // subscriber, which shows there as a gap.
                if let Err(error) = socket.send(message).await {
                    tracing::warn!(%error, "zmq publish failed");
                }
            }
        });
        tracing::debug!(%endpoint, topic = %channel.topic, "zmq event publisher bound");
        Ok(Box::new(ZmqPublisher {
            frames,
            registration: key,
            discovery: self.discovery.clone(),
            runtime: self.runtime.clone(),
        }))
    }

    /// Follows the channel's publishers in discovery and forwards their
    /// envelopes to `events` until `stop`.
    async fn subscribe(
        &self,
        channel: &Channel,
        events: mpsc::Sender<Bytes>,
        stop: CancellationToken,
    ) -> Result<Subscription, EventError> {
        let query = Query::bucket(Bucket::EventChannels)
            .namespace(&channel.namespace)
            .component(channel.key_component())
            .name(&channel.topic);
        let mut watch = self.discovery.watch(&query).await?;
        let connected = Arc::new(AtomicU64::new(0));
        let count = connected.clone();
        let runtime = self.runtime.clone();
        self.runtime.spawn(async move {
            // One connection task per publisher, stopped when it leaves discovery.
            let mut publishers: HashMap<Key, (String, CancellationToken)> = HashMap::new();
            loop {
                let event = tokio::select! {
                    _ = stop.cancelled() => break,
                    event = watch.next() => event,
                };
                let Some(Ok(event)) = event else {
                    tracing::warn!("event channel watch ended; no new publishers will be found");
                    stop.cancelled().await;
                    break;
                };
                let mut wanted: Vec<(Key, String)> = vec![];
                match event {
                    WatchEvent::Snapshot(all) => {
                        let endpoints: Vec<(Key, String)> = all.iter().filter_map(endpoint_of).collect();
                        publishers.retain(|key, (_, token)| {
                            let keep = endpoints.iter().any(|(k, _)| k == key);
                            if !keep {
                                token.cancel();
                            }
                            keep
                        });
                        wanted = endpoints;
                    }
                    WatchEvent::Put(registration) => wanted.extend(endpoint_of(&registration)),
                    WatchEvent::Delete(key) => {
                        if let Some((_, token)) = publishers.remove(&key) {
                            token.cancel();
                        }
                    }
                }
                for (key, endpoint) in wanted {
                    if publishers.get(&key).is_some_and(|(current, _)| *current == endpoint) {
                        continue;
                    }
                    if let Some((_, old)) = publishers.remove(&key) {
                        old.cancel();
                    }
                    let token = stop.child_token();
                    publishers.insert(key, (endpoint.clone(), token.clone()));
                    runtime.spawn(follow_publisher(endpoint, events.clone(), token, count.clone()));
                }
            }
            for (_, (_, token)) in publishers {
                token.cancel();
            }
        });
        Ok(Subscription {
            connected_publishers: Some(connected),
        })
    }
}

/// The sending half of a ZMQ publisher; dropping it unbinds the socket and
/// removes the registration.
#[derive(Debug)]
struct ZmqPublisher {
    frames: mpsc::Sender<Bytes>,
    registration: Key,
    discovery: Arc<dyn Discovery>,
    runtime: Runtime,
}

#[async_trait::async_trait]
impl EventSink for ZmqPublisher {
    async fn send(&self, envelope: Bytes) -> Result<(), EventError> {
        self.frames.send(envelope).await.map_err(|_| EventError::Closed)
    }
}

impl Drop for ZmqPublisher {
    fn drop(&mut self) {
        let (discovery, key) = (self.discovery.clone(), self.registration.clone());
        self.runtime.spawn(async move {
            if let Err(error) = discovery.unregister(&key).await {
                tracing::debug!(%key, %error, "could not unregister event channel");
            }
        });
    }
}

fn endpoint_of(registration: &Registration) -> Option<(Key, String)> {
    match serde_json::from_slice::<EventChannel>(&registration.value) {
        Ok(EventChannel {
            transport: EventTransport::Zmq(endpoint),
            ..
        }) => Some((registration.key.clone(), endpoint)),
        Err(error) => {
            tracing::warn!(key = %registration.key, %error, "ignoring an unreadable event channel");
            None
        }
    }
}

/// One SUB connection to one publisher.
async fn follow_publisher(
    endpoint: String,
    events: mpsc::Sender<Bytes>,
    stop: CancellationToken,
    connected: Arc<AtomicU64>,
) {
    let mut socket = zeromq::SubSocket::new();
    if let Err(error) = socket.subscribe("").await {
        tracing::warn!(%endpoint, %error, "zmq subscribe failed");
        return;
    }
    let connect = tokio::select! {
        _ = stop.cancelled() => return,
        connect = socket.connect(&endpoint) => connect,
    };
    if let Err(error) = connect {
        tracing::warn!(%endpoint, %error, "cannot connect to event publisher");
        return;
    }
    connected.fetch_add(1, Ordering::AcqRel);
    loop {
        let message = tokio::select! {
            _ = stop.cancelled() => break,
            message = socket.recv() => message,
        };
        match message {
            Ok(message) => {
                let Some(envelope) = message.get(1).cloned() else {
                    tracing::debug!(%endpoint, "ignoring a zmq message without an envelope frame");
                    continue;
                };
                if events.send(envelope).await.is_err() {
                    break;
                }
            }
            Err(error) => {
                tracing::debug!(%endpoint, %error, "event publisher connection ended");
                break;
            }
        }
    }
    connected.fetch_sub(1, Ordering::AcqRel);
}
