//! The caller's reply inboxes: one NATS subscription per client, shared by
//! every call it makes.

use crate::error::{ErrorKind, RequestError};
use bytes::Bytes;
use futures::StreamExt;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// One reply subscription per client, `{prefix}.*`, shared by every call:
/// a call's inbox is `{prefix}.{n:x}`, and a task hands each message to its
/// call. A subscription per call would cost two more messages to the
/// server per request (SUB and UNSUB) and a change to its subscription
/// table each time; NATS request-reply shares one the same way.
#[derive(Debug, Default)]
pub(super) struct Inboxes {
    pub(super) replies: tokio::sync::OnceCell<Arc<Replies>>,
    /// Ends the routing task (and so the subscription) with the client.
    stop: CancellationToken,
}

impl Drop for Inboxes {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[derive(Debug)]
pub(super) struct Replies {
    prefix: String,
    next: AtomicU64,
    /// Open calls by number. A call's queue holds what its window allows
    /// and then some; a worker that sends past it loses the call, not the
    /// other calls their messages.
    calls: Mutex<HashMap<u64, mpsc::Sender<Bytes>>>,
    /// The subscription ended (the connection was closed): no call can be answered.
    ended: AtomicBool,
}

/// A call's share of the reply subscription; leaving it drops the call's route.
pub(super) struct Inbox {
    replies: Arc<Replies>,
    number: u64,
    /// The subject the worker answers on; also names the stream in control messages.
    pub(super) subject: String,
    pub(super) messages: mpsc::Receiver<Bytes>,
}

impl Drop for Inbox {
    fn drop(&mut self) {
        self.replies.calls().remove(&self.number);
    }
}

impl Replies {
    pub(super) fn calls(&self) -> std::sync::MutexGuard<'_, HashMap<u64, mpsc::Sender<Bytes>>> {
        // Single insert/remove updates: a poisoned map is still consistent.
        self.calls.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands each message on the subscription to its call, until the
    /// subscription ends (the connection closed) or the client is dropped.
    async fn route(self: Arc<Self>, mut subscription: async_nats::Subscriber, stop: CancellationToken) {
        loop {
            let message = tokio::select! {
                _ = stop.cancelled() => break,
                message = subscription.next() => message,
            };
            let Some(message) = message else { break };
            let number = message
                .subject
                .rsplit_once('.')
                .and_then(|(_, number)| u64::from_str_radix(number, 16).ok());
            let Some(number) = number else { continue };
            let mut calls = self.calls();
            let overflowed = calls
                .get(&number)
                .is_some_and(|call| call.try_send(message.payload).is_err());
            if overflowed {
                // Full: the worker sent past its window. Closed: the call just ended.
                calls.remove(&number);
            }
        }
        // Every open call hears the end of its queue, and no new one opens.
        let mut calls = self.calls();
        self.ended.store(true, Ordering::Relaxed);
        calls.clear();
    }
}

impl Inboxes {
    /// A fresh inbox for one call, whose queue holds `capacity` messages.
    pub(super) async fn open(&self, client: &async_nats::Client, capacity: usize) -> Result<Inbox, RequestError> {
        let replies = self
            .replies
            .get_or_try_init(|| async {
                let prefix = client.new_inbox();
                let subscription = client.subscribe(format!("{prefix}.*")).await.map_err(|e| {
                    RequestError::new(
                        ErrorKind::Unreachable,
                        format!("cannot subscribe to the reply inboxes: {e}"),
                    )
                })?;
                let replies = Arc::new(Replies {
                    prefix,
                    next: AtomicU64::new(0),
                    calls: Mutex::default(),
                    ended: Default::default(),
                });
                tokio::spawn(replies.clone().route(subscription, self.stop.clone()));
                Ok::<_, RequestError>(replies)
            })
            .await?
            .clone();
        let number = replies.next.fetch_add(1, Ordering::Relaxed);
        let (sender, messages) = mpsc::channel(capacity);
        {
            // Checked under the lock the routing task clears the calls under.
            let mut calls = replies.calls();
            if replies.ended.load(Ordering::Relaxed) {
                return Err(RequestError::new(
                    ErrorKind::Unreachable,
                    "the NATS connection is closed: no reply can reach this caller",
                ));
            }
            calls.insert(number, sender);
        }
        Ok(Inbox {
            subject: format!("{}.{number:x}", replies.prefix),
            replies,
            number,
            messages,
        })
    }
}
