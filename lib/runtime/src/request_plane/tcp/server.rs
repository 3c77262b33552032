//! Worker side of the TCP request plane: accept connections, open a stream
//! per request frame, run it on the endpoint's handler, send its items back
//! within the stream's flow-control credit.

use super::frame::{self, CancelMode, Decoded, Frame, FrameDecoder, FrameType, RequestHead};
use super::handshake::{self, Opened};
use super::sink::{FrameSink, SinkLimits, Timing};
use super::{ReadError, buffered_frame, read_frame, tune_socket};
use crate::config::TcpConfig;
use crate::engine::{Context, Controller};
use crate::error::RequestError;
use crate::metrics::TransportMetrics;
use crate::request_plane::handlers::Handlers;
use crate::request_plane::pump::{CallerGone, Next, Pump, ResponseSink};
use crate::request_plane::{ByteStream, RequestServer, Transport, encode_error};
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::rustls::ServerConfig;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The process's TCP listener, serving every endpoint in its [`Handlers`].
#[derive(Debug)]
pub struct TcpServer {
    advertised: String,
    shared: Arc<Shared>,
}

impl TcpServer {
    /// Binds `DYN_TCP_RPC_HOST:DYN_TCP_RPC_PORT` and starts accepting. In-flight
    /// requests are killed (callers get `ShuttingDown`) when `shutdown` is
    /// cancelled; the server's tasks are spawned on `tracker`.
    pub async fn bind(
        config: &TcpConfig,
        handlers: Arc<Handlers>,
        metrics: TransportMetrics,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) -> std::io::Result<Self> {
        let listener = super::listen(config.host(), *config.port()).await?;
        let local = listener.local_addr()?;
        let advertised = config
            .advertise()
            .clone()
            .unwrap_or_else(|| advertised_address(config.host(), local));
        let tls = config.tls().as_ref().map(|tls| tls.server_config());
        if tls.is_some() {
            tracing::info!(address = %advertised, "request plane listening (tcp, mutual TLS)");
        } else {
            tracing::info!(address = %advertised, "request plane listening (tcp)");
            warn_if_exposed(local, "DYN_TCP_RPC_HOST");
        }
        let shared = Arc::new(Shared {
            pump: Pump::new(handlers, shutdown.clone(), *config.max_message_size()),
            shutdown,
            tracker: tracker.clone(),
            max_message_size: *config.max_message_size(),
            first_request_deadline: *config.connect_timeout(),
            connections_accepted: AtomicU64::new(0),
            tls,
            connection_slots: Arc::new(Semaphore::new(*config.max_connections())),
            pending: Mutex::default(),
            max_streams: *config.max_streams_per_connection(),
            max_window: *config.stream_window(),
            sink_limits: SinkLimits {
                max_queue: *config.max_send_queue(),
                write_timeout: *config.write_timeout(),
                metrics: metrics.clone(),
            },
            metrics,
        });
        tracker.spawn(accept_loop(listener, shared.clone()));
        Ok(Self { advertised, shared })
    }

    /// Connections accepted since the server started.
    pub fn connections_accepted(&self) -> u64 {
        self.shared.connections_accepted.load(Ordering::Relaxed)
    }
}

impl RequestServer for TcpServer {
    fn transport(&self) -> Transport {
        Transport::Tcp(self.advertised.clone())
    }
}

/// Logs a warning when a plaintext listener is reachable from other machines:
/// anyone there can send it requests and read its answers.
pub(crate) fn warn_if_exposed(local: SocketAddr, variable: &str) {
    if !local.ip().is_loopback() {
        tracing::warn!(
            address = %local,
            "the request plane listens on a non-loopback address without TLS: any host that reaches it can call \
             every endpoint and read the traffic; set DYN_REQUEST_PLANE_TLS_CA_PATH/_CERT_PATH/_KEY_PATH, or bind \
             {variable} to a private network (see docs/security.md)"
        );
    }
}

/// `host:port` as callers should dial it: the configured host (which may be a
/// name) with the port actually bound.
fn advertised_address(host: &str, bound: SocketAddr) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{}", bound.port())
    } else {
        format!("{host}:{}", bound.port())
    }
}

/// State shared by every connection of the server.
#[derive(Debug)]
struct Shared {
    /// Runs each stream's request and sends its response.
    pump: Pump,
    /// The runtime's root token: cancelled when the process must stop now.
    shutdown: CancellationToken,
    tracker: TaskTracker,
    max_message_size: usize,
    /// How long a new connection may stay silent: callers send their first
    /// request right after connecting, within their own connect timeout.
    first_request_deadline: std::time::Duration,
    connections_accepted: AtomicU64,
    metrics: TransportMetrics,
    /// Mutual TLS; `None` is plaintext.
    tls: Option<Arc<ServerConfig>>,
    /// One permit per open connection (`DYN_TCP_MAX_CONNECTIONS`).
    connection_slots: Arc<Semaphore>,
    /// Connections still in their handshake, oldest first, each holding its
    /// slot: when the cap is reached, the oldest is cut off and its slot
    /// handed to the newcomer. A caller finishes its handshake at once; a
    /// connection that sits there is not a caller, and a flood of them must
    /// not keep new callers out.
    pending: Mutex<Pending>,
    /// Streams one connection may have open (`DYN_TCP_MAX_STREAMS_PER_CONNECTION`).
    max_streams: usize,
    /// The largest credit window a caller may ask for: ours (`DYN_TCP_STREAM_WINDOW`).
    max_window: u32,
    sink_limits: SinkLimits,
}

/// Connections in their handshake. Their slots live here, not in their
/// tasks, so that evicting one hands its slot to the newcomer at once, in the
/// accept loop: a slot never waits for the evicted task to run, and a
/// connection whose handshake ends as it is evicted cannot keep a slot that
/// was given away. (An earlier version had the newcomer wait for the evicted
/// task to release the slot; meanwhile the accept loop could take that slot
/// for the next connection, so under a flood of 10,000 connections waits
/// timed out and legitimate callers were reset: `tests/flood.rs`.)
#[derive(Debug, Default)]
struct Pending {
    next_id: u64,
    /// By id, which grows with time: the first entry is the oldest.
    connections: BTreeMap<u64, PendingConnection>,
}

#[derive(Debug)]
struct PendingConnection {
    /// Cancelled when the connection is evicted.
    evicted: CancellationToken,
    slot: OwnedSemaphorePermit,
}

impl Shared {
    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        // Single insert/remove updates: a poisoned map is still consistent.
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A slot for a new connection: a free one, else the one of the
    /// connection that has been in its handshake longest, which is cut off;
    /// `None` when every connection has finished its handshake.
    fn take_slot(&self) -> Option<OwnedSemaphorePermit> {
        if let Ok(slot) = self.connection_slots.clone().try_acquire_owned() {
            return Some(slot);
        }
        let (_, oldest) = self.pending().connections.pop_first()?;
        oldest.evicted.cancel();
        Some(oldest.slot)
    }

    /// Records a connection entering its handshake with its slot; returns
    /// its id and the token that says it was evicted.
    fn enter_handshake(&self, slot: OwnedSemaphorePermit) -> (u64, CancellationToken) {
        let mut pending = self.pending();
        let id = pending.next_id;
        pending.next_id += 1;
        let evicted = CancellationToken::new();
        pending.connections.insert(
            id,
            PendingConnection {
                evicted: evicted.clone(),
                slot,
            },
        );
        (id, evicted)
    }

    /// The slot of connection `id` leaving its handshake; `None` when it was
    /// evicted (its slot is someone else's now).
    fn leave_handshake(&self, id: u64) -> Option<OwnedSemaphorePermit> {
        self.pending().connections.remove(&id).map(|entry| entry.slot)
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let accepted = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((socket, peer)) => {
                let Some(slot) = shared.take_slot() else {
                    // Every slot is a working connection: closed at once,
                    // the callers keep theirs.
                    shared.metrics.refused("connections");
                    tracing::debug!(%peer, "refusing a request-plane connection over DYN_TCP_MAX_CONNECTIONS");
                    drop(socket);
                    continue;
                };
                // Registered here, before its task runs, so that the next
                // accept can already evict it if it stays silent.
                let (id, evicted) = shared.enter_handshake(slot);
                shared.connections_accepted.fetch_add(1, Ordering::Relaxed);
                shared.metrics.connections.inc();
                shared
                    .tracker
                    .spawn(open_connection(socket, peer, id, evicted, shared.clone()));
            }
            Err(error) => {
                // Usually out of file descriptors; back off instead of spinning.
                tracing::warn!(%error, "request plane accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// One caller connection.
#[derive(Debug)]
struct Connection {
    /// Frames to the caller. What it queues is bounded by the streams: each
    /// sends at most its credit window of items.
    sink: FrameSink,
    /// Streams still running, for cancel and credit frames.
    streams: Mutex<HashMap<u64, StreamControl>>,
}

#[derive(Debug)]
struct StreamControl {
    controller: Controller,
    credit: Arc<Semaphore>,
}

impl Connection {
    fn send(&self, frame: Frame) {
        // A dead connection means the caller is gone; there is nobody to tell.
        self.sink.send(&frame, Timing::Now);
    }

    /// How a running stream's frames should leave, given the others beside it.
    fn timing(&self) -> Timing {
        Timing::with_others(self.streams().len().saturating_sub(1))
    }

    fn streams(&self) -> std::sync::MutexGuard<'_, HashMap<u64, StreamControl>> {
        // Updates are single insert/remove calls: a poisoned map is still consistent.
        self.streams.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// TLS and the Hello exchange, then the connection's requests. `id` is its
/// entry among the connections in their handshake, which holds its place
/// under `DYN_TCP_MAX_CONNECTIONS` until the handshake ends; `evicted` is
/// cancelled when a newcomer takes that place.
async fn open_connection(
    socket: TcpStream,
    peer: SocketAddr,
    id: u64,
    evicted: CancellationToken,
    shared: Arc<Shared>,
) {
    tune_socket(&socket);
    // A connection that does not finish the handshake in time is not a caller
    // (a port scan, a client stuck before its first request, a plaintext
    // caller at a TLS worker): closed at the deadline, or earlier when the
    // cap is reached and it is the oldest.
    let opened = tokio::select! {
        _ = shared.shutdown.cancelled() => None,
        _ = evicted.cancelled() => None,
        opened = handshake::accept(socket, shared.tls.as_ref(), shared.first_request_deadline) => Some(opened),
    };
    // Taking the slot back decides the race with an eviction: a connection
    // evicted as its handshake finished is closed all the same.
    let Some(slot) = shared.leave_handshake(id) else {
        shared.metrics.refused("connections");
        tracing::debug!(%peer, "cut off a request-plane connection still in its handshake to make room (DYN_TCP_MAX_CONNECTIONS)");
        return;
    };
    let Some(opened) = opened else {
        return;
    };
    match opened {
        Ok(opened) => {
            if let Some(identity) = &opened.peer {
                tracing::debug!(%peer, %identity, "request-plane caller authenticated");
            }
            serve_connection(opened, peer, shared).await;
        }
        Err(error) => {
            shared.metrics.refused("handshake");
            // A silent or vanished peer (a port scan) is routine and would
            // flood the log under attack; a peer that spoke and was refused
            // (wrong version, certificate) is what an operator must see.
            if error.is_silence() {
                tracing::debug!(%peer, error = %error.chain(), "closed a request-plane connection that did not finish its handshake");
            } else {
                tracing::info!(%peer, error = %error.chain(), "refused a request-plane connection");
            }
        }
    }
    drop(slot);
}

async fn serve_connection(opened: Opened, peer: SocketAddr, shared: Arc<Shared>) {
    let Opened {
        mut reader,
        writer,
        mut buf,
        peer: identity,
    } = opened;
    // The writer ends when every stream of the connection has sent its last
    // frame (the sink is dropped with the connection), not at shutdown, so
    // final errors get out.
    let conn = Arc::new(Connection {
        sink: FrameSink::new(
            writer,
            shared.sink_limits.clone(),
            &shared.tracker,
            CancellationToken::new(),
        ),
        streams: Mutex::new(HashMap::new()),
    });
    let identity = identity.unwrap_or_default();
    let mut decoder = FrameDecoder::new(shared.max_message_size);
    let dead = conn.sink.dead().clone();
    loop {
        let decoded = match buffered_frame(&mut buf, &mut decoder).transpose() {
            Some(decoded) => decoded,
            None => tokio::select! {
                _ = shared.shutdown.cancelled() => break,
                // The caller stopped reading (send queue or write deadline): cut it off.
                _ = dead.cancelled() => break,
                decoded = read_frame(&mut reader, &mut buf, &mut decoder) => decoded,
            },
        };
        let result = match decoded {
            Ok(Decoded::Frame(frame)) => match on_frame(&conn, &shared, frame) {
                Ok(Some(stream)) => {
                    start_stream(stream, &shared.tracker).await;
                    Ok(())
                }
                Ok(None) => Ok(()),
                Err(reason) => Err(reason),
            },
            Ok(Decoded::Oversized {
                frame_type: FrameType::Request,
                stream_id,
                length,
            }) => {
                let error = crate::request_plane::too_large("request", length, shared.max_message_size);
                conn.send(error_frame(stream_id, &error));
                Ok(())
            }
            Ok(Decoded::Oversized { frame_type, .. }) => Err(format!("oversized {frame_type:?} frame")),
            Err(ReadError::Closed) => break,
            Err(ReadError::Io(error)) => {
                tracing::debug!(%peer, %error, "request-plane connection failed");
                break;
            }
            Err(error) => Err(error.to_string()),
        };
        if let Err(reason) = result {
            shared.metrics.protocol_errors.inc();
            tracing::warn!(%peer, %identity, %reason, "closing request-plane connection");
            break;
        }
    }
    // The caller is gone (or we are shutting down): nothing it started may keep running.
    for (_, stream) in conn.streams().drain() {
        stream.controller.kill();
    }
}

/// A request's stream, about to start.
struct NewStream {
    /// Its work: the request on the pump, until its final frame.
    work: Pin<Box<dyn Future<Output = ()> + Send>>,
    /// No other stream of its connection is open.
    alone: bool,
}

/// Starts a new stream. Alone on its connection, its first steps run here,
/// in the reader's turn: an answer ready at once leaves without a task
/// spawned and scheduled first, and the reader's next read waits until
/// after it. Only a stream still running then gets a task of its own. With
/// other streams open it gets one at once, so that their handlers' work can
/// spread over the runtime's threads instead of queueing behind this
/// connection's reader.
async fn start_stream(mut stream: NewStream, tracker: &TaskTracker) {
    if stream.alone && futures::poll!(stream.work.as_mut()).is_ready() {
        return;
    }
    // The task's first poll registers its own waker wherever the one
    // above registered the reader's: no wake-up is lost.
    tracker.spawn(stream.work);
}

/// Handles one frame from the caller: a request gives back its stream to
/// start; `Err` closes the connection.
fn on_frame(conn: &Arc<Connection>, shared: &Arc<Shared>, frame: Frame) -> Result<Option<NewStream>, String> {
    match frame.frame_type {
        FrameType::Request => {
            let head = RequestHead::decode(frame.payload).map_err(|e| e.to_string())?;
            if conn.streams().contains_key(&frame.stream_id) {
                return Err(format!("stream id {} reused while still open", frame.stream_id));
            }
            if conn.streams().len() >= shared.max_streams {
                // Only this request fails; the connection's other streams go on.
                shared.metrics.refused("streams");
                let error = RequestError::new(
                    crate::error::ErrorKind::Overloaded,
                    format!(
                        "this connection already has {} streams open, the most the worker allows (DYN_TCP_MAX_STREAMS_PER_CONNECTION)",
                        shared.max_streams
                    ),
                );
                conn.send(error_frame(frame.stream_id, &error));
                return Ok(None);
            }
            let controller = Controller::with_parent(head.request_id.clone(), &shared.shutdown);
            // The caller picks its window, up to ours: what one stream may
            // queue is bounded by the worker, not by the caller.
            let window = head.window.clamp(1, shared.max_window) as usize;
            let credit = Arc::new(Semaphore::new(window));
            let control = StreamControl {
                controller: controller.clone(),
                credit: credit.clone(),
            };
            let alone = {
                let mut streams = conn.streams();
                streams.insert(frame.stream_id, control);
                streams.len() == 1
            };
            let work = run_stream(conn.clone(), shared.clone(), frame.stream_id, head, controller, credit);
            Ok(Some(NewStream {
                work: Box::pin(work),
                alone,
            }))
        }
        FrameType::Cancel => {
            let mode = CancelMode::decode(&frame.payload).map_err(|e| e.to_string())?;
            // An unknown id is a stream that already ended: the cancel crossed its END.
            if let Some(stream) = conn.streams().get(&frame.stream_id) {
                match mode {
                    CancelMode::Stop => stream.controller.stop(),
                    CancelMode::Kill => stream.controller.kill(),
                }
            }
            Ok(None)
        }
        FrameType::Credit => {
            let items = frame::decode_credit(&frame.payload).map_err(|e| e.to_string())? as usize;
            if let Some(stream) = conn.streams().get(&frame.stream_id) {
                // Only this task adds permits, so this cap keeps the semaphore
                // below its maximum even against a misbehaving caller.
                // Credit beyond the window is refused the same way.
                let room = (shared.max_window as usize).saturating_sub(stream.credit.available_permits());
                stream.credit.add_permits(items.min(room));
            }
            Ok(None)
        }
        FrameType::Hello | FrameType::Data | FrameType::End | FrameType::Error => Err(format!(
            "caller sent a {:?} frame, which only workers send",
            frame.frame_type
        )),
    }
}

/// Runs one request on the pump, its items going out as this stream's frames.
async fn run_stream(
    conn: Arc<Connection>,
    shared: Arc<Shared>,
    stream_id: u64,
    head: RequestHead,
    controller: Controller,
    credit: Arc<Semaphore>,
) {
    let request = Context::with_controller(head.body, controller);
    let sink = StreamSink {
        conn,
        stream_id,
        credit,
        batch: BytesMut::new(),
    };
    shared.pump.run(&head.endpoint, head.instance_id, request, sink).await;
}

/// Largest batch of one stream's DATA frames sent in one write.
const STREAM_BATCH_BYTES: usize = 64 * 1024;

/// One stream's frames. Items that are ready together are batched (until
/// the pump's `flush`), so a fast stream costs one write per batch, not per item.
struct StreamSink {
    conn: Arc<Connection>,
    stream_id: u64,
    /// Items the caller still takes; refilled by its Credit frames.
    credit: Arc<Semaphore>,
    /// Encoded frames not yet sent.
    batch: BytesMut,
}

impl StreamSink {
    fn send_batch(&mut self) {
        if !self.batch.is_empty() {
            let timing = self.conn.timing();
            self.flush_with(timing);
        }
    }

    fn flush_with(&mut self, timing: Timing) {
        self.conn.sink.send_encoded(&self.batch, timing);
        self.batch.clear();
    }
}

impl ResponseSink for StreamSink {
    async fn next_item(&mut self, items: &mut ByteStream) -> Result<Next, CallerGone> {
        Ok(items.next().await)
    }

    fn try_credit(&mut self) -> bool {
        self.credit.try_acquire().map(|permit| permit.forget()).is_ok()
    }

    async fn credit(&mut self) {
        let permit = self.credit.acquire().await;
        permit.expect("the credit semaphore is never closed").forget();
    }

    async fn send(&mut self, item: Bytes) -> Result<(), CallerGone> {
        Frame::new(FrameType::Data, self.stream_id, item).encode(&mut self.batch);
        if self.batch.len() >= STREAM_BATCH_BYTES {
            self.send_batch();
        }
        // A dead connection means the caller is gone; its reader kills the stream.
        Ok(())
    }

    async fn flush(&mut self) {
        self.send_batch();
    }

    async fn finish(mut self, outcome: Result<(), RequestError>) {
        let last = match outcome {
            Ok(()) => Frame::new(FrameType::End, self.stream_id, Bytes::new()),
            Err(error) => error_frame(self.stream_id, &error),
        };
        // Closed before END goes out: the caller may reuse the id once it sees END.
        let timing = {
            let mut streams = self.conn.streams();
            streams.remove(&self.stream_id);
            Timing::with_others(streams.len())
        };
        // The last items and the final frame usually leave in one write.
        last.encode(&mut self.batch);
        self.flush_with(timing);
    }
}

fn error_frame(stream_id: u64, error: &RequestError) -> Frame {
    Frame::new(FrameType::Error, stream_id, Bytes::from(encode_error(error)))
}
