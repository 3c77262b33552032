//! The endpoints a process serves, shared by every transport's server: lookup
//! by name, and the in-flight count that a graceful shutdown waits on.
//!
//! Counting here rather than in each transport means a drain behaves the same
//! on every request plane.

use super::ByteStream;
use crate::engine::Context;
use crate::error::{ErrorKind, RequestError};
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{Stream, StreamExt};
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::task::Poll;
use tokio::sync::Notify;

/// A type-erased handler: encoded request in, encoded response items out.
/// The endpoint builder adapts a typed [`crate::engine::AsyncEngine`] to this.
pub trait PushHandler: Send + Sync {
    fn handle(&self, request: Context<Bytes>) -> BoxFuture<'static, Result<ByteStream, RequestError>>;
}

/// The endpoints served by one process (one instance id).
#[derive(Debug)]
pub struct Handlers {
    instance_id: u64,
    endpoints: RwLock<HashMap<String, Arc<Entry>>>,
}

struct Entry {
    handler: Arc<dyn PushHandler>,
    /// False once the endpoint started draining: new requests are refused
    /// with `ShuttingDown` so the caller can go elsewhere.
    accepting: AtomicBool,
    /// Requests whose response stream is still alive.
    inflight: AtomicUsize,
    /// Woken whenever `inflight` drops to zero.
    idle: Notify,
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("accepting", &self.accepting)
            .field("inflight", &self.inflight)
            .finish_non_exhaustive()
    }
}

impl Handlers {
    pub fn new(instance_id: u64) -> Self {
        Self {
            instance_id,
            endpoints: RwLock::new(HashMap::new()),
        }
    }

    pub fn instance_id(&self) -> u64 {
        self.instance_id
    }

    /// Starts serving `endpoint` (`namespace/component/endpoint`).
    pub fn insert(&self, endpoint: &str, handler: Arc<dyn PushHandler>) -> Result<(), RequestError> {
        let mut endpoints = self.write();
        if endpoints.contains_key(endpoint) {
            return Err(RequestError::new(
                ErrorKind::Invalid,
                format!("endpoint {endpoint} is already served by this process"),
            ));
        }
        let entry = Entry {
            handler,
            accepting: AtomicBool::new(true),
            inflight: AtomicUsize::new(0),
            idle: Notify::new(),
        };
        endpoints.insert(endpoint.to_string(), Arc::new(entry));
        Ok(())
    }

    /// Stops taking new requests for `endpoint` and resolves once every
    /// request already running on it has finished.
    pub async fn drain(&self, endpoint: &str) {
        let Some(entry) = self.read().get(endpoint).cloned() else {
            return;
        };
        // Keep the entry while draining so late callers hear `ShuttingDown`
        // (go elsewhere) rather than `NotFound`.
        entry.accepting.store(false, Ordering::SeqCst);
        loop {
            let idle = entry.idle.notified();
            if entry.inflight.load(Ordering::SeqCst) == 0 {
                break;
            }
            idle.await;
        }
        self.write().remove(endpoint);
    }

    /// Number of requests in flight on `endpoint` (0 when not served).
    pub fn inflight(&self, endpoint: &str) -> usize {
        self.read()
            .get(endpoint)
            .map_or(0, |e| e.inflight.load(Ordering::Acquire))
    }

    /// Runs `request` on the handler of `endpoint` of `instance_id`. The
    /// returned stream counts as in flight until it is dropped.
    pub async fn dispatch(
        &self,
        endpoint: &str,
        instance_id: u64,
        request: Context<Bytes>,
    ) -> Result<ByteStream, RequestError> {
        if instance_id != self.instance_id {
            return Err(RequestError::new(
                ErrorKind::NotFound,
                format!(
                    "instance {instance_id:x} is not served here (this process is instance {:x})",
                    self.instance_id
                ),
            ));
        }
        let entry = self.read().get(endpoint).cloned().ok_or_else(|| {
            RequestError::new(
                ErrorKind::NotFound,
                format!("no endpoint {endpoint} on instance {instance_id:x}"),
            )
        })?;
        // Count first, then check: `drain` clears `accepting` first, then
        // reads the count, so (all SeqCst) either it sees this request or this
        // request sees that it must not start.
        let guard = InflightGuard::new(entry.clone());
        if !entry.accepting.load(Ordering::SeqCst) {
            return Err(RequestError::new(
                ErrorKind::ShuttingDown,
                format!("endpoint {endpoint} is draining"),
            ));
        }
        let stream = entry.handler.handle(request).await?;
        Ok(Box::pin(Guarded { stream, _guard: guard }))
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Arc<Entry>>> {
        // Every update is a single insert/remove, so a poisoned lock holds a consistent map.
        self.endpoints.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Arc<Entry>>> {
        self.endpoints.write().unwrap_or_else(|p| p.into_inner())
    }
}

/// Counts one request as in flight for as long as it lives.
struct InflightGuard(Arc<Entry>);

impl InflightGuard {
    fn new(entry: Arc<Entry>) -> Self {
        entry.inflight.fetch_add(1, Ordering::SeqCst);
        Self(entry)
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        if self.0.inflight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// A response stream that holds its request's [`InflightGuard`].
struct Guarded {
    stream: ByteStream,
    _guard: InflightGuard,
}

impl Stream for Guarded {
    type Item = Result<Bytes, RequestError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Option<Self::Item>> {
        self.stream.poll_next_unpin(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    struct Echo;

    impl PushHandler for Echo {
        fn handle(&self, request: Context<Bytes>) -> BoxFuture<'static, Result<ByteStream, RequestError>> {
            let (body, _) = request.into_parts();
            async move { Ok(Box::pin(futures::stream::iter([Ok(body)])) as ByteStream) }.boxed()
        }
    }

    #[tokio::test]
    async fn unknown_endpoint_and_wrong_instance_are_not_found() {
        let handlers = Handlers::new(7);
        handlers.insert("ns/c/e", Arc::new(Echo)).unwrap();
        let err = handlers
            .dispatch("ns/c/other", 7, Context::new(Bytes::new()))
            .await
            .err()
            .unwrap();
        assert_eq!(err.kind(), ErrorKind::NotFound);
        let err = handlers
            .dispatch("ns/c/e", 8, Context::new(Bytes::new()))
            .await
            .err()
            .unwrap();
        assert_eq!(err.kind(), ErrorKind::NotFound);
    }

    #[tokio::test]
    async fn drain_waits_for_streams_in_flight_and_refuses_new_ones() {
        let handlers = Arc::new(Handlers::new(1));
        handlers.insert("ns/c/e", Arc::new(Echo)).unwrap();
        let stream = handlers
            .dispatch("ns/c/e", 1, Context::new(Bytes::from_static(b"x")))
            .await
            .unwrap();
        assert_eq!(handlers.inflight("ns/c/e"), 1);

        let draining = tokio::spawn({
            let handlers = handlers.clone();
            async move { handlers.drain("ns/c/e").await }
        });
        tokio::task::yield_now().await;
        assert!(!draining.is_finished(), "drain returned while a stream was in flight");
        let err = handlers
            .dispatch("ns/c/e", 1, Context::new(Bytes::new()))
            .await
            .err()
            .unwrap();
        assert_eq!(err.kind(), ErrorKind::ShuttingDown);
        drop(stream);
        tokio::time::timeout(std::time::Duration::from_secs(5), draining)
            .await
            .unwrap()
            .unwrap();

        let err = handlers
            .dispatch("ns/c/e", 1, Context::new(Bytes::new()))
            .await
            .err()
            .unwrap();
        assert_eq!(err.kind(), ErrorKind::NotFound);
    }

    #[test]
    fn serving_an_endpoint_twice_is_an_error() {
        let handlers = Handlers::new(1);
        handlers.insert("ns/c/e", Arc::new(Echo)).unwrap();
        assert_eq!(
            handlers.insert("ns/c/e", Arc::new(Echo)).unwrap_err().kind(),
            ErrorKind::Invalid
        );
    }
}
