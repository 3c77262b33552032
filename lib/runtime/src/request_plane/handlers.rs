//! The endpoints a process serves, shared by every transport's server: lookup
//! by name, and the in-flight count that a graceful shutdown waits on.
//!
//! Counting here rather than in each transport means a drain behaves the same
//! on every request plane.

use super::ByteStream;
use crate::engine::{Context, Controller};
use crate::error::{ErrorKind, RequestError};
use crate::metrics::EndpointMetrics;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{Stream, StreamExt};
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::task::Poll;
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

/// Request ids starting with this are canary health checks: they are served
/// like any request but do not count as traffic for the canary's idle timer.
pub const CANARY_REQUEST_PREFIX: &str = "canary-";

/// What the request plane reports about one endpoint's requests.
#[derive(Debug, Clone)]
pub struct EndpointObservers {
    pub metrics: EndpointMetrics,
    pub activity: Arc<Activity>,
}

impl EndpointObservers {
    #[cfg(test)]
    pub(crate) fn unregistered() -> Self {
        Self {
            metrics: EndpointMetrics::unregistered(),
            activity: Arc::new(Activity::new()),
        }
    }
}

/// When a real request last completed on an endpoint (the canary checks an
/// endpoint only after it has been idle for a while).
#[derive(Debug)]
pub struct Activity {
    epoch: Instant,
    /// Milliseconds after `epoch` of the last completed real request.
    last: AtomicU64,
}

impl Activity {
    pub fn new() -> Self {
        Self {
            epoch: Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    /// Records a completed request now.
    pub fn touch(&self) {
        self.last
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Release);
    }

    /// Time since the last completed request (or since creation).
    pub fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last.load(Ordering::Acquire));
        self.epoch.elapsed().saturating_sub(last)
    }
}

impl Default for Activity {
    fn default() -> Self {
        Self::new()
    }
}

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
    observers: EndpointObservers,
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
    pub fn insert(
        &self,
        endpoint: &str,
        handler: Arc<dyn PushHandler>,
        observers: EndpointObservers,
    ) -> Result<(), RequestError> {
        let mut endpoints = self.write();
        if endpoints.contains_key(endpoint) {
            return Err(RequestError::new(
                ErrorKind::Invalid,
                format!("endpoint {endpoint} is already served by this process"),
            ));
        }
        let entry = Entry {
            handler,
            observers,
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
        let metrics = &entry.observers.metrics;
        metrics.requests.inc();
        metrics.request_bytes.inc_by(request.data().len() as u64);
        // Count first, then check: `drain` clears `accepting` first, then
        // reads the count, so (all SeqCst) either it sees this request or this
        // request sees that it must not start.
        let mut guard = InflightGuard::new(entry.clone(), request.controller().clone());
        if !entry.accepting.load(Ordering::SeqCst) {
            guard.finished = true;
            metrics.error(ErrorKind::ShuttingDown);
            return Err(RequestError::new(
                ErrorKind::ShuttingDown,
                format!("endpoint {endpoint} is draining"),
            ));
        }
        match entry.handler.handle(request).await {
            Ok(stream) => Ok(Box::pin(Guarded { stream, guard })),
            Err(error) => {
                guard.finished = true;
                metrics.error(error.kind());
                Err(error)
            }
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Arc<Entry>>> {
        // Every update is a single insert/remove, so a poisoned lock holds a consistent map.
        self.endpoints.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Arc<Entry>>> {
        self.endpoints.write().unwrap_or_else(|p| p.into_inner())
    }
}

/// Counts one request as in flight for as long as it lives, and records its
/// duration, cancellation and completion when it ends.
struct InflightGuard {
    entry: Arc<Entry>,
    controller: Controller,
    started: Instant,
    /// The stream ended (completed or failed) rather than being dropped early.
    finished: bool,
    completed: bool,
}

impl InflightGuard {
    fn new(entry: Arc<Entry>, controller: Controller) -> Self {
        entry.inflight.fetch_add(1, Ordering::SeqCst);
        entry.observers.metrics.inflight.inc();
        Self {
            entry,
            controller,
            started: Instant::now(),
            finished: false,
            completed: false,
        }
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        let observers = &self.entry.observers;
        observers.metrics.inflight.dec();
        observers.metrics.duration.observe(self.started.elapsed().as_secs_f64());
        if !self.finished && self.controller.is_stopped() {
            observers.metrics.cancellations.inc();
        }
        if self.completed && !self.controller.id().starts_with(CANARY_REQUEST_PREFIX) {
            observers.activity.touch();
        }
        if self.entry.inflight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.entry.idle.notify_waiters();
        }
    }
}

/// A response stream that holds its request's [`InflightGuard`] and counts
/// what passes through it.
struct Guarded {
    stream: ByteStream,
    guard: InflightGuard,
}

impl Stream for Guarded {
    type Item = Result<Bytes, RequestError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Option<Self::Item>> {
        let polled = self.stream.poll_next_unpin(cx);
        let metrics = &self.guard.entry.observers.metrics;
        match &polled {
            Poll::Ready(Some(Ok(bytes))) => metrics.response_bytes.inc_by(bytes.len() as u64),
            Poll::Ready(Some(Err(error))) => {
                metrics.error(error.kind());
                self.guard.finished = true;
            }
            Poll::Ready(None) => {
                self.guard.finished = true;
                self.guard.completed = true;
            }
            Poll::Pending => {}
        }
        polled
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
        handlers
            .insert("ns/c/e", Arc::new(Echo), EndpointObservers::unregistered())
            .unwrap();
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
        handlers
            .insert("ns/c/e", Arc::new(Echo), EndpointObservers::unregistered())
            .unwrap();
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
        handlers
            .insert("ns/c/e", Arc::new(Echo), EndpointObservers::unregistered())
            .unwrap();
        assert_eq!(
            handlers
                .insert("ns/c/e", Arc::new(Echo), EndpointObservers::unregistered())
                .unwrap_err()
                .kind(),
            ErrorKind::Invalid
        );
    }
}
