//! Caller side of the TCP request plane: one persistent connection per worker
//! address, shared by every request to that worker, each request a stream.

use super::frame::{self, CancelMode, Decoded, Frame, FrameDecoder, FrameType, RequestHead};
use super::handshake::{self, Reader};
use super::sink::{FrameSink, SinkLimits, Timing};
use super::{ReadError, buffered_frame, read_frame, tune_socket};
use crate::config::TcpConfig;
use crate::engine::{Context, Controller};
use crate::error::{ErrorKind, RequestError, WireError};
use crate::metrics::TransportMetrics;
use crate::request_plane::{ByteStream, RequestClient, Target, Transport};
use bytes::{Bytes, BytesMut};
use futures::Stream;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::{OnceCell, mpsc};
use tokio_rustls::rustls::ClientConfig;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tokio_util::task::TaskTracker;

/// Calls workers over TCP, keeping one multiplexed connection per address.
#[derive(Debug)]
pub struct TcpClient {
    max_message_size: usize,
    connect_timeout: Duration,
    window: u32,
    /// Mutual TLS; `None` is plaintext.
    tls: Option<Arc<ClientConfig>>,
    sink_limits: SinkLimits,
    /// Connections by worker address, shared with the reader tasks so a dead
    /// connection removes itself.
    pool: Arc<Pool>,
    /// Cancelled when the runtime stops: connections close.
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

impl TcpClient {
    pub fn new(config: &TcpConfig, shutdown: CancellationToken, tracker: TaskTracker) -> Self {
        Self {
            max_message_size: *config.max_message_size(),
            connect_timeout: *config.connect_timeout(),
            window: *config.stream_window(),
            tls: config.tls().as_ref().map(|tls| tls.client_config()),
            sink_limits: SinkLimits {
                max_queue: *config.max_send_queue(),
                write_timeout: *config.write_timeout(),
                metrics: TransportMetrics::unregistered(),
            },
            pool: Arc::default(),
            shutdown,
            tracker,
        }
    }

    /// The open connection to `address`, connecting if there is none.
    async fn connection(&self, address: &str) -> Result<Arc<Connection>, RequestError> {
        for _ in 0..2 {
            let slot = self.pool.slot(address);
            let conn = slot.get_or_try_init(|| self.connect(address)).await?;
            if !conn.closed.is_cancelled() {
                return Ok(conn.clone());
            }
            // The reader forgets a dead connection itself; this covers the
            // moment between its death and that cleanup.
            self.pool.forget(address, conn);
        }
        Err(RequestError::new(
            ErrorKind::Unreachable,
            format!("connection to {address} closed as soon as it opened"),
        ))
    }

    async fn connect(&self, address: &str) -> Result<Arc<Connection>, RequestError> {
        let unreachable = |reason: String| {
            RequestError::new(ErrorKind::Unreachable, format!("cannot connect to {address}: {reason}"))
        };
        if self.shutdown.is_cancelled() {
            return Err(RequestError::new(
                ErrorKind::ShuttingDown,
                "the runtime is shutting down",
            ));
        }
        let socket = tokio::time::timeout(self.connect_timeout, TcpStream::connect(address))
            .await
            .map_err(|_| unreachable(format!("no answer within {:?}", self.connect_timeout)))?
            .map_err(|e| unreachable(e.to_string()).with_source(e))?;
        tune_socket(&socket);
        let host = address.rsplit_once(':').map_or(address, |(host, _)| host);
        let opened = handshake::connect(socket, host, self.tls.as_ref(), self.connect_timeout)
            .await
            .map_err(|e| {
                RequestError::new(
                    e.kind(),
                    format!("cannot open a request-plane connection to {address}: {}", e.chain()),
                )
            })?;
        if let Some(identity) = &opened.peer {
            tracing::debug!(%address, %identity, "request-plane worker authenticated");
        }
        let (reader, buf) = (opened.reader, opened.buf);
        let closed = self.shutdown.child_token();
        let conn = Arc::new(Connection {
            address: address.to_string(),
            sink: FrameSink::new(opened.writer, self.sink_limits.clone(), &self.tracker, closed.clone()),
            streams: Mutex::new(HashMap::new()),
            next_stream_id: AtomicU64::new(1),
            closed,
        });
        let decoder = FrameDecoder::new(self.max_message_size);
        let pool = self.pool.clone();
        let reader_conn = conn.clone();
        self.tracker.spawn(async move {
            read_responses(reader, buf, &reader_conn, decoder).await;
            pool.forget(&reader_conn.address, &reader_conn);
        });
        Ok(conn)
    }
}

/// One slot per worker address. The `OnceCell` makes concurrent first calls
/// share one connect; a dead connection's slot is removed so the next call dials again.
#[derive(Debug, Default)]
struct Pool {
    slots: Mutex<HashMap<String, Arc<OnceCell<Arc<Connection>>>>>,
}

impl Pool {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<OnceCell<Arc<Connection>>>>> {
        // Updates are single insert/remove calls: a poisoned map is still consistent.
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The slot of `address`, made on the first call to it (the address is
    /// copied only then, not on every call).
    fn slot(&self, address: &str) -> Arc<OnceCell<Arc<Connection>>> {
        let mut slots = self.lock();
        if let Some(slot) = slots.get(address) {
            return slot.clone();
        }
        slots.entry(address.to_string()).or_default().clone()
    }

    /// Removes `conn`'s slot, unless the address already has a newer connection.
    fn forget(&self, address: &str, conn: &Arc<Connection>) {
        let mut slots = self.lock();
        let holds_conn = slots
            .get(address)
            .is_some_and(|slot| slot.get().is_some_and(|current| Arc::ptr_eq(current, conn)));
        if holds_conn {
            slots.remove(address);
        }
    }
}

#[async_trait::async_trait]
impl RequestClient for TcpClient {
    async fn call(&self, target: &Target, request: Context<Bytes>) -> Result<ByteStream, RequestError> {
        let Transport::Tcp(address) = &target.transport else {
            return Err(RequestError::new(
                ErrorKind::Invalid,
                format!("{target} is not a TCP target"),
            ));
        };
        let (body, controller) = request.into_parts();
        if !RequestHead::fits(&target.endpoint, controller.id()) {
            return Err(RequestError::new(
                ErrorKind::Invalid,
                "endpoint name (max 65535 bytes) or request id (max 255 bytes) too long",
            ));
        }
        let head = RequestHead {
            instance_id: target.instance_id,
            window: self.window,
            endpoint: target.endpoint.clone(),
            request_id: controller.id().to_string(),
            body,
        }
        .encode();
        if head.len() > self.max_message_size {
            return Err(crate::request_plane::too_large(
                "request",
                head.len(),
                self.max_message_size,
            ));
        }
        let conn = self.connection(address).await?;
        let stream = conn.open_stream(head, controller, self.window)?;
        Ok(Box::pin(stream))
    }
}

/// What the reader task tells one stream.
#[derive(Debug)]
enum StreamEvent {
    Item(Bytes),
    End,
    Failed(RequestError),
}

/// The reader's side of one open stream.
#[derive(Debug)]
struct OpenStream {
    events: mpsc::UnboundedSender<StreamEvent>,
    /// Items the worker may still send: the window, plus the credit returned,
    /// minus the items received. A worker that goes below zero ignores flow
    /// control, and would fill this process's memory: the connection is cut.
    allowance: Arc<AtomicI64>,
}

/// One connection to a worker, shared by all requests to it.
#[derive(Debug)]
struct Connection {
    address: String,
    /// Frames to the worker. What it queues is bounded by the callers
    /// (requests) and the streams (cancel and credit frames).
    sink: FrameSink,
    /// Open streams and where their events go.
    streams: Mutex<HashMap<u64, OpenStream>>,
    next_stream_id: AtomicU64,
    /// Cancelled once the connection is unusable (either side closed it, a
    /// frame was corrupt, or the runtime stops). Checked under the `streams`
    /// lock so no stream is added after the reader failed the others.
    closed: CancellationToken,
}

impl Connection {
    fn streams(&self) -> std::sync::MutexGuard<'_, HashMap<u64, OpenStream>> {
        // Updates are single insert/remove calls: a poisoned map is still consistent.
        self.streams.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends a stream's control frame: with several requests in flight,
    /// their frames leave together.
    fn send(&self, frame: Frame) {
        let timing = Timing::with_others(self.streams().len().saturating_sub(1));
        self.send_with(frame, timing);
    }

    fn send_with(&self, frame: Frame, timing: Timing) {
        if !self.sink.send(&frame, timing) {
            // The connection can no longer carry requests: the reader fails every stream.
            self.closed.cancel();
        }
    }

    fn open_stream(
        self: &Arc<Self>,
        head: Bytes,
        controller: Controller,
        window: u32,
    ) -> Result<ClientStream, RequestError> {
        let stream_id = self.next_stream_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        let allowance = Arc::new(AtomicI64::new(i64::from(window)));
        let timing = {
            let mut streams = self.streams();
            if self.closed.is_cancelled() {
                return Err(RequestError::new(
                    ErrorKind::Unreachable,
                    format!("connection to {} closed", self.address),
                ));
            }
            streams.insert(
                stream_id,
                OpenStream {
                    events: tx,
                    allowance: allowance.clone(),
                },
            );
            Timing::with_others(streams.len() - 1)
        };
        self.send_with(Frame::new(FrameType::Request, stream_id, head), timing);
        let watch = Box::pin(controller.stop_token().clone().cancelled_owned());
        Ok(ClientStream {
            conn: self.clone(),
            stream_id,
            events: rx,
            controller,
            cancel_watch: Some(watch),
            consumed: 0,
            credit_batch: (window / 2).max(1),
            allowance,
            finished: false,
        })
    }
}

/// Routes the worker's frames to their streams until the connection ends,
/// then fails every stream still open with `Disconnected`.
async fn read_responses(mut reader: Reader, mut buf: BytesMut, conn: &Connection, mut decoder: FrameDecoder) {
    let reason = loop {
        let decoded = match buffered_frame(&mut buf, &mut decoder).transpose() {
            Some(decoded) => decoded,
            None => tokio::select! {
                _ = conn.closed.cancelled() => break "the connection was closed".to_string(),
                _ = conn.sink.dead().cancelled() => break "the worker stopped reading (DYN_TCP_WRITE_TIMEOUT)".to_string(),
                decoded = read_frame(&mut reader, &mut buf, &mut decoder) => decoded,
            },
        };
        match decoded {
            Ok(Decoded::Frame(frame)) => {
                if let Err(reason) = on_frame(conn, frame) {
                    tracing::warn!(address = %conn.address, %reason, "closing request-plane connection");
                    break reason;
                }
            }
            Ok(Decoded::Oversized {
                frame_type: FrameType::Data,
                stream_id,
                length,
            }) => {
                if let Some(OpenStream { events, .. }) = conn.streams().remove(&stream_id) {
                    let error = crate::request_plane::too_large("response item", length, decoder.max_payload());
                    let _ = events.send(StreamEvent::Failed(error));
                }
                conn.send(Frame::new(FrameType::Cancel, stream_id, CancelMode::Kill.encode()));
            }
            Ok(Decoded::Oversized { frame_type, .. }) => break format!("oversized {frame_type:?} frame"),
            Err(ReadError::Closed) => break "the worker closed the connection".to_string(),
            Err(error) => break error.to_string(),
        }
    };
    conn.closed.cancel();
    let open = std::mem::take(&mut *conn.streams());
    for (_, OpenStream { events, .. }) in open {
        let error = RequestError::new(
            ErrorKind::Disconnected,
            format!(
                "connection to {} lost before the stream completed: {reason}",
                conn.address
            ),
        );
        let _ = events.send(StreamEvent::Failed(error));
    }
}

/// Delivers one frame from the worker; `Err` closes the connection.
fn on_frame(conn: &Connection, frame: Frame) -> Result<(), String> {
    // Frames for unknown ids belong to streams the caller already dropped.
    match frame.frame_type {
        FrameType::Data => {
            if let Some(stream) = conn.streams().get(&frame.stream_id) {
                if stream.allowance.fetch_sub(1, Ordering::AcqRel) <= 0 {
                    return Err(format!(
                        "worker sent more items on stream {} than its window and the credit returned",
                        frame.stream_id
                    ));
                }
                let _ = stream.events.send(StreamEvent::Item(frame.payload));
            }
        }
        FrameType::End => {
            if let Some(OpenStream { events, .. }) = conn.streams().remove(&frame.stream_id) {
                let _ = events.send(StreamEvent::End);
            }
        }
        FrameType::Error => {
            let error = match rmp_serde::from_slice::<WireError>(&frame.payload) {
                Ok(wire) => RequestError::from(wire),
                Err(e) => RequestError::new(ErrorKind::Protocol, format!("undecodable error frame: {e}")),
            };
            if let Some(OpenStream { events, .. }) = conn.streams().remove(&frame.stream_id) {
                let _ = events.send(StreamEvent::Failed(error));
            }
        }
        FrameType::Hello | FrameType::Request | FrameType::Cancel | FrameType::Credit => {
            return Err(format!(
                "worker sent a {:?} frame, which only callers send",
                frame.frame_type
            ));
        }
    }
    Ok(())
}

/// The caller's view of one request: response items as they arrive.
///
/// Forwards the controller's `stop`/`kill` to the worker, returns credit as
/// items are consumed, and kills the request on the worker when dropped early.
struct ClientStream {
    conn: Arc<Connection>,
    stream_id: u64,
    events: mpsc::UnboundedReceiver<StreamEvent>,
    controller: Controller,
    /// Resolves on the next cancellation to forward: first `stop`, then `kill`.
    cancel_watch: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
    /// Items consumed since credit was last returned.
    consumed: u32,
    /// Return credit in batches of this many items (half the window).
    credit_batch: u32,
    /// Shared with the reader: credit returned raises what the worker may send.
    allowance: Arc<AtomicI64>,
    finished: bool,
}

impl ClientStream {
    fn cancel(&self, mode: CancelMode) {
        self.conn
            .send(Frame::new(FrameType::Cancel, self.stream_id, mode.encode()));
    }

    /// Ends the stream on this side; the reader forgets it.
    fn finish(&mut self) {
        self.finished = true;
        self.conn.streams().remove(&self.stream_id);
    }
}

impl Stream for ClientStream {
    type Item = Result<Bytes, RequestError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.finished {
            return Poll::Ready(None);
        }
        while let Some(watch) = this.cancel_watch.as_mut() {
            if watch.as_mut().poll(cx).is_pending() {
                break;
            }
            if this.controller.is_killed() {
                this.cancel_watch = None;
                this.cancel(CancelMode::Kill);
                this.finish();
                let error = RequestError::new(ErrorKind::Cancelled, "the request was killed by the caller");
                return Poll::Ready(Some(Err(error)));
            }
            this.cancel(CancelMode::Stop);
            this.cancel_watch = Some(Box::pin(this.controller.kill_token().clone().cancelled_owned()));
        }
        match this.events.poll_recv(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(StreamEvent::Item(bytes))) => {
                this.consumed += 1;
                if this.consumed >= this.credit_batch {
                    // Raised before the Credit leaves, so the items it allows
                    // can never arrive before the reader knows they are allowed.
                    this.allowance.fetch_add(i64::from(this.consumed), Ordering::AcqRel);
                    this.conn.send(Frame::new(
                        FrameType::Credit,
                        this.stream_id,
                        frame::encode_credit(this.consumed),
                    ));
                    this.consumed = 0;
                }
                Poll::Ready(Some(Ok(bytes)))
            }
            Poll::Ready(Some(StreamEvent::End)) => {
                this.finished = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(StreamEvent::Failed(error))) => {
                this.finished = true;
                Poll::Ready(Some(Err(error)))
            }
            Poll::Ready(None) => {
                this.finished = true;
                let error = RequestError::new(ErrorKind::Disconnected, "the response stream was closed without an end");
                Poll::Ready(Some(Err(error)))
            }
        }
    }
}

impl Drop for ClientStream {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        // A caller that stops at the last item it wanted often has the
        // worker's End (or Error) here unread: that stream is over on both
        // sides, and a Kill would only cost a write and a wake-up on each.
        while let Ok(event) = self.events.try_recv() {
            if matches!(event, StreamEvent::End | StreamEvent::Failed(_)) {
                return;
            }
        }
        self.finish();
        self.cancel(CancelMode::Kill);
    }
}
