//! The worker side of one request, the same on every transport: run it on its
//! endpoint's handler and pump the response stream into the transport's
//! [`ResponseSink`] — the size limit on each item, credit, kill, and the one
//! final End or Error.
//!
//! It knows no wire format and no connection: frames, flow control and
//! liveness belong to each transport's sink. In-flight counting and the
//! endpoint metrics stay in [`Handlers::dispatch`], which the pump calls.

use super::handlers::Handlers;
use super::{ByteStream, killed_error, too_large};
use crate::engine::{Context, Controller};
use crate::error::{ErrorKind, RequestError};
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// What the handler's stream yields next: an item, its error, or its end.
pub(crate) type Next = Option<Result<Bytes, RequestError>>;

/// Nobody reads the response any more (the caller reset its HTTP/2 stream).
/// The pump then kills the request, as if the caller had asked.
#[derive(Debug)]
pub(crate) struct CallerGone;

/// Where a worker sends one request's response: the transport's half of a
/// [`Pump`], which drives it.
///
/// The pump calls, in order: for each item within the size limit,
/// `try_credit` (and `credit` when that finds none) and then `send`; and
/// `finish` exactly once, after the handler's stream has been dropped.
/// Nothing is sent for the request after `finish`.
///
/// Items that are ready together leave together: the pump takes an item the
/// handler has ready without asking the sink, and calls `flush` only before
/// it waits — for the handler's next item (`next_item`) or for credit. A
/// sink may hold what `send` gets until then and send it in one write.
///
/// Cancellation: when the request is killed (by the caller, or by the
/// worker's shutdown) the pump drops a pending `flush`, `next_item` or `credit` future
/// and finishes with the kill's error, so both must be cancel-safe. `send`
/// is never cancelled: an item the pump has handed over goes out.
///
/// Errors: a sink reports only that the caller left ([`CallerGone`]). TCP
/// and NATS never do: a failed write is noticed elsewhere there (TCP's reader
/// kills the requests of a closed connection; a NATS caller gives up after
/// its silence limit).
///
/// ```ignore
/// struct Print;
/// impl ResponseSink for Print {
///     async fn next_item(&mut self, items: &mut ByteStream) -> Result<Next, CallerGone> {
///         Ok(items.next().await)
///     }
///     async fn credit(&mut self) {}
///     async fn send(&mut self, item: Bytes) -> Result<(), CallerGone> {
///         println!("{item:?}");
///         Ok(())
///     }
///     async fn finish(self, outcome: Result<(), RequestError>) {
///         println!("end: {outcome:?}");
///     }
/// }
/// ```
pub(crate) trait ResponseSink: Send {
    /// Waits for the handler's next item. A transport that must act while
    /// the handler works — notice that the caller left (HTTP) — does it here.
    fn next_item(&mut self, items: &mut ByteStream) -> impl Future<Output = Result<Next, CallerGone>> + Send;

    /// Takes one item of flow-control credit if the caller has it to spare
    /// now. `false` (the default) has the pump `flush` and wait in `credit`.
    fn try_credit(&mut self) -> bool {
        false
    }

    /// Waits until the caller may take one more item (its flow-control credit).
    fn credit(&mut self) -> impl Future<Output = ()> + Send;

    /// Sends one item, or holds it to send with the next ones.
    fn send(&mut self, item: Bytes) -> impl Future<Output = Result<(), CallerGone>> + Send;

    /// Sends what `send` held back, if anything: the pump is about to wait.
    fn flush(&mut self) -> impl Future<Output = ()> + Send {
        async {}
    }

    /// Sends what is held back and the final frame: End for `Ok`, Error with
    /// the error's kind and message for `Err`.
    fn finish(self, outcome: Result<(), RequestError>) -> impl Future<Output = ()> + Send;
}

/// Serves requests from the process's [`Handlers`], whatever the transport.
#[derive(Debug, Clone)]
pub(crate) struct Pump {
    handlers: Arc<Handlers>,
    /// The runtime's root token: a request killed once it is cancelled ends
    /// with `ShuttingDown` (the caller may retry elsewhere), not `Cancelled`.
    shutdown: CancellationToken,
    /// The worker's `DYN_TCP_MAX_MESSAGE_SIZE`.
    max_message_size: usize,
}

impl Pump {
    pub(crate) fn new(handlers: Arc<Handlers>, shutdown: CancellationToken, max_message_size: usize) -> Self {
        Self {
            handlers,
            shutdown,
            max_message_size,
        }
    }

    /// Runs `request` on `endpoint` of `instance_id` and sends its response
    /// to `sink`. Returns once the final frame went to the sink.
    pub(crate) async fn run(
        &self,
        endpoint: &str,
        instance_id: u64,
        request: Context<Bytes>,
        mut sink: impl ResponseSink,
    ) {
        let controller = request.controller().clone();
        // A handler that panics ends its own request with an error, not the
        // task or connection that runs it, and its caller is told instead of
        // waiting for an end that would never come.
        let outcome = AssertUnwindSafe(self.stream(endpoint, instance_id, request, &controller, &mut sink))
            .catch_unwind()
            .await
            .unwrap_or_else(|panic| Err(handler_panicked(endpoint, panic.as_ref())));
        sink.finish(outcome).await;
    }

    /// Sends the handler's items; `Ok` when its stream completed. Returning
    /// drops the stream, and with it the request's in-flight guard.
    async fn stream(
        &self,
        endpoint: &str,
        instance_id: u64,
        request: Context<Bytes>,
        controller: &Controller,
        sink: &mut impl ResponseSink,
    ) -> Result<(), RequestError> {
        let killed = || killed_error(&self.shutdown);
        // The caller left: kill the request, so that the handler stops and
        // the cancellation is counted, as if the caller had asked.
        let gone = || {
            controller.kill();
            killed()
        };
        // TCP and HTTP refuse such a request before it gets here (they read
        // its length first); a NATS message arrives whole.
        if request.data().len() > self.max_message_size {
            return Err(too_large("request", request.data().len(), self.max_message_size));
        }
        let mut items = tokio::select! {
            biased;
            _ = controller.killed() => return Err(killed()),
            items = self.handlers.dispatch(endpoint, instance_id, request) => items?,
        };
        loop {
            if controller.is_killed() {
                return Err(killed());
            }
            let item = match items.next().now_or_never() {
                Some(item) => Ok(item),
                None => tokio::select! {
                    biased;
                    _ = controller.killed() => return Err(killed()),
                    item = async {
                        sink.flush().await;
                        sink.next_item(&mut items).await
                    } => item,
                },
            };
            let bytes = match item {
                Err(CallerGone) => return Err(gone()),
                Ok(None) => return Ok(()),
                // An engine stopped by the shutdown may end its streams as
                // cancelled before the kill reaches this loop: that is still
                // the worker leaving, which the caller may retry elsewhere.
                Ok(Some(Err(error))) if error.kind() == ErrorKind::Cancelled && self.shutdown.is_cancelled() => {
                    return Err(killed());
                }
                Ok(Some(item)) => item?,
            };
            if bytes.len() > self.max_message_size {
                return Err(too_large("response item", bytes.len(), self.max_message_size));
            }
            if !sink.try_credit() {
                tokio::select! {
                    biased;
                    _ = controller.killed() => return Err(killed()),
                    () = async {
                        sink.flush().await;
                        sink.credit().await;
                    } => {}
                }
            }
            if sink.send(bytes).await.is_err() {
                return Err(gone());
            }
        }
    }
}

/// The error a caller gets for a request whose handler panicked. What the
/// panic said stays in the worker's log: it may name the worker's internals.
fn handler_panicked(endpoint: &str, panic: &(dyn Any + Send)) -> RequestError {
    let message = panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(not a string)");
    tracing::error!(%endpoint, panic = message, "a request handler panicked; its request ends with an error");
    RequestError::new(
        ErrorKind::Engine,
        format!("the handler of {endpoint} panicked (the worker's log has the message)"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request_plane::conformance::{Fixtures, FnHandler, INSTANCE};
    use crate::request_plane::handlers::EndpointObservers;
    use futures::{FutureExt, StreamExt};
    use std::sync::Mutex;

    /// Writes down what the pump sends, and each `flush`; `caller_left`
    /// makes every send fail. It has credit to spare.
    struct Transcript {
        lines: Arc<Mutex<Vec<String>>>,
        caller_left: bool,
    }

    impl ResponseSink for Transcript {
        async fn next_item(&mut self, items: &mut ByteStream) -> Result<Next, CallerGone> {
            Ok(items.next().await)
        }

        fn try_credit(&mut self) -> bool {
            true
        }

        async fn credit(&mut self) {}

        async fn flush(&mut self) {
            self.lines.lock().unwrap().push("flush".into());
        }

        async fn send(&mut self, item: Bytes) -> Result<(), CallerGone> {
            if self.caller_left {
                return Err(CallerGone);
            }
            self.lines
                .lock()
                .unwrap()
                .push(String::from_utf8_lossy(&item).into_owned());
            Ok(())
        }

        async fn finish(self, outcome: Result<(), RequestError>) {
            let last = outcome.map_or_else(|e| format!("error {:?}", e.kind()), |()| "end".to_string());
            self.lines.lock().unwrap().push(last);
        }
    }

    async fn run(endpoint: &str, body: &str, caller_left: bool) -> (Vec<String>, Controller) {
        let pump = Pump::new(Fixtures::default().handlers(), CancellationToken::new(), 4096);
        let lines = Arc::new(Mutex::new(vec![]));
        let sink = Transcript {
            lines: lines.clone(),
            caller_left,
        };
        let request = Context::new(Bytes::from(body.to_string()));
        let controller = request.controller().clone();
        pump.run(&format!("ns/c/{endpoint}"), INSTANCE, request, sink).await;
        let lines = lines.lock().unwrap().clone();
        (lines, controller)
    }

    #[tokio::test]
    async fn items_go_out_in_order_then_one_end() {
        let (lines, _) = run("count", "3", false).await;
        assert_eq!(lines, ["0", "1", "2", "end"]);
    }

    /// The sink is asked to send what it holds only before the pump waits:
    /// items the handler has ready together stay together.
    #[tokio::test]
    async fn the_sink_flushes_only_before_the_pump_waits() {
        let handlers = Arc::new(Handlers::new(INSTANCE));
        let handler = |_request: Context<Bytes>| {
            async {
                let ready = futures::stream::iter([Ok(Bytes::from_static(b"a")), Ok(Bytes::from_static(b"b"))]);
                let later = futures::stream::once(async {
                    tokio::task::yield_now().await;
                    Ok(Bytes::from_static(b"c"))
                });
                Ok(Box::pin(ready.chain(later)) as ByteStream)
            }
            .boxed()
        };
        handlers
            .insert(
                "ns/c/burst",
                Arc::new(FnHandler(handler)),
                EndpointObservers::unregistered(),
            )
            .unwrap();
        let lines = Arc::new(Mutex::new(vec![]));
        let sink = Transcript {
            lines: lines.clone(),
            caller_left: false,
        };
        Pump::new(handlers, CancellationToken::new(), 4096)
            .run("ns/c/burst", INSTANCE, Context::new(Bytes::new()), sink)
            .await;
        assert_eq!(*lines.lock().unwrap(), ["a", "b", "flush", "c", "end"]);
    }

    #[tokio::test]
    async fn an_item_over_the_limit_is_not_sent_and_ends_the_stream_with_too_large() {
        let (lines, _) = run("big", "5000", false).await;
        assert_eq!(lines, ["error TooLarge"]);
        let (lines, _) = run("echo", &"z".repeat(5000), false).await;
        assert_eq!(lines, ["error TooLarge"]);
    }

    /// A stream that ends as cancelled because its engine stopped with the
    /// worker: `ShuttingDown` once the shutdown has begun, else `Cancelled`.
    #[tokio::test]
    async fn a_stream_cancelled_by_the_shutdown_ends_shutting_down() {
        for (shutting_down, last) in [(true, "error ShuttingDown"), (false, "error Cancelled")] {
            let handlers = Arc::new(Handlers::new(INSTANCE));
            let handler = |_request: Context<Bytes>| {
                async {
                    let items = vec![
                        Ok(Bytes::from_static(b"partial")),
                        Err(RequestError::new(ErrorKind::Cancelled, "the engine stopped")),
                    ];
                    Ok(Box::pin(futures::stream::iter(items)) as ByteStream)
                }
                .boxed()
            };
            handlers
                .insert(
                    "ns/c/stops",
                    Arc::new(FnHandler(handler)),
                    EndpointObservers::unregistered(),
                )
                .unwrap();
            let shutdown = CancellationToken::new();
            if shutting_down {
                shutdown.cancel();
            }
            let lines = Arc::new(Mutex::new(vec![]));
            let sink = Transcript {
                lines: lines.clone(),
                caller_left: false,
            };
            Pump::new(handlers, shutdown, 4096)
                .run("ns/c/stops", INSTANCE, Context::new(Bytes::new()), sink)
                .await;
            assert_eq!(*lines.lock().unwrap(), ["partial", last]);
        }
    }

    #[tokio::test]
    async fn a_caller_that_left_kills_the_request() {
        let (lines, controller) = run("count", "3", true).await;
        assert_eq!(lines, ["error Cancelled"]);
        assert!(controller.is_killed());
    }
}
