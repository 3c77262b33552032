//! The NATS event transport: core publish on the channel's subject,
//! `namespace.{ns}[.component.{comp}].{topic}`; subscribers take a core
//! subscription. The client reconnects (and resubscribes) by itself.

use super::{Channel, EventError};
use crate::distributed::DistributedRuntime;
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

#[derive(Debug)]
pub(super) struct NatsPublisher {
    client: async_nats::Client,
    subject: String,
}

impl NatsPublisher {
    pub(super) fn new(client: async_nats::Client, channel: &Channel) -> Self {
        Self {
            client,
            subject: channel.subject(),
        }
    }

    pub(super) async fn send(&self, envelope: Bytes) -> Result<(), EventError> {
        self.client
            .publish(self.subject.clone(), envelope)
            .await
            .map_err(|e| EventError::Nats { reason: e.to_string() })
    }
}

/// Forwards the subject's messages to `events` until `stop`.
pub(super) async fn subscribe(
    drt: &DistributedRuntime,
    client: async_nats::Client,
    channel: &Channel,
    events: mpsc::Sender<Bytes>,
    stop: CancellationToken,
) -> Result<(), EventError> {
    let mut subscription = client
        .subscribe(channel.subject())
        .await
        .map_err(|e| EventError::Nats { reason: e.to_string() })?;
    drt.runtime().spawn(async move {
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
    Ok(())
}
