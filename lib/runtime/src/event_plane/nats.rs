//! The NATS event transport: core publish on the channel's subject,
//! `namespace.{ns}[.component.{comp}].{topic}`; subscribers take a core
//! subscription. The client reconnects (and resubscribes) by itself.

use super::{Channel, EventError, EventPlane, EventSink, Subscription};
use crate::runtime::Runtime;
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The NATS event plane of one process.
#[derive(Debug)]
pub(crate) struct NatsEventPlane {
    client: async_nats::Client,
    /// Owns the subscription tasks, so they stop with the process.
    runtime: Runtime,
}

impl NatsEventPlane {
    pub(crate) fn new(client: async_nats::Client, runtime: Runtime) -> Self {
        Self { client, runtime }
    }
}

#[async_trait::async_trait]
impl EventPlane for NatsEventPlane {
    async fn publisher(&self, channel: &Channel) -> Result<Box<dyn EventSink>, EventError> {
        Ok(Box::new(NatsPublisher {
            client: self.client.clone(),
            subject: channel.subject(),
        }))
    }

    /// Forwards the subject's messages to `events` until `stop`.
    async fn subscribe(
        &self,
        channel: &Channel,
        events: mpsc::Sender<Bytes>,
        stop: CancellationToken,
    ) -> Result<Subscription, EventError> {
        let mut subscription = self
            .client
            .subscribe(channel.subject())
            .await
            .map_err(|source| EventError::NatsSubscribe { source })?;
        self.runtime.spawn(async move {
            loop {
                let message = tokio::select! {
                    _ = stop.cancelled() => break,
                    message = subscription.next() => message,
                };
                let Some(message) = message else { break };
                if events.send(message.payload).await.is_err() {
                    break;
                }
            }
            let _ = subscription.unsubscribe().await;
        });
        Ok(Subscription::default())
    }
}

/// Publishes on one channel's subject.
#[derive(Debug)]
struct NatsPublisher {
    client: async_nats::Client,
    subject: String,
}

#[async_trait::async_trait]
impl EventSink for NatsPublisher {
    async fn send(&self, envelope: Bytes) -> Result<(), EventError> {
        self.client
            .publish(self.subject.clone(), envelope)
            .await
            .map_err(|source| EventError::NatsPublish { source })
    }
}
