//! The NATS event transport: core publish on the channel's subject,
//! `namespace.{ns}[.component.{comp}].{topic}`; subscribers take a core
//! subscription. The client reconnects (and resubscribes) by itself.

use super::{Channel, EventError, EventPlane, EventSink, Subscription};
use crate::runtime::Runtime;
use bytes::Bytes;
use futures::StreamExt;
use futures::future::{BoxFuture, FutureExt};
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

    /// Forwards the subject's messages to `events` until `stop`.
    async fn forward(
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

impl EventPlane for NatsEventPlane {
    fn publisher<'a>(&'a self, channel: &'a Channel) -> BoxFuture<'a, Result<Box<dyn EventSink>, EventError>> {
        let publisher = NatsPublisher {
            client: self.client.clone(),
            subject: channel.subject(),
        };
        async move { Ok(Box::new(publisher) as Box<dyn EventSink>) }.boxed()
    }

    fn subscribe<'a>(
        &'a self,
        channel: &'a Channel,
        events: mpsc::Sender<Bytes>,
        stop: CancellationToken,
    ) -> BoxFuture<'a, Result<Subscription, EventError>> {
        self.forward(channel, events, stop).boxed()
    }
}

/// Publishes on one channel's subject.
#[derive(Debug)]
struct NatsPublisher {
    client: async_nats::Client,
    subject: String,
}

impl EventSink for NatsPublisher {
    fn send(&self, envelope: Bytes) -> BoxFuture<'_, Result<(), EventError>> {
        async move {
            self.client
                .publish(self.subject.clone(), envelope)
                .await
                .map_err(|source| EventError::NatsPublish { source })
        }
        .boxed()
    }
}
