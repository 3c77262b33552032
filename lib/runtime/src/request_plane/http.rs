//! The HTTP/2 request plane (`DYN_REQUEST_PLANE=http`): cleartext HTTP/2
//! (h2c, prior knowledge), one POST per request to
//! `/v1/rpc/{namespace}/{component}/{endpoint}`, the response body a stream
//! of frames `kind:u8 len:u32be payload` (Data `0x11`, End `0x12`, Error
//! `0x13`, as on TCP). HTTP/2 gives each request its own stream with its own
//! flow control; dropping the response resets the stream, which kills the
//! request on the worker; a graceful stop is a POST to
//! `/v1/rpc-cancel/{stream}`, where `stream` is the token the worker sent
//! in the `x-switchyard-stream` header (never the caller-chosen request id).

mod connector;

use super::handlers::Handlers;
use super::pump::{CallerGone, Next, Pump, ResponseSink};
use super::tcp::frame::FrameType;
use super::{ByteStream, RequestClient, RequestServer, Target, Transport};
use crate::config::{HttpConfig, RequestPlaneTls, RuntimeConfig, TcpConfig};
use crate::engine::{Context, Controller};
use crate::error::{ErrorKind, RequestError, WireError};
use crate::http_server::SendBudget;
use crate::metrics::TransportMetrics;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Extension, Router};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::{FutureExt, StreamExt};
use http_body_util::{BodyExt, Full};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const INSTANCE_HEADER: &str = "x-switchyard-instance";
const REQUEST_ID_HEADER: &str = "x-request-id";
/// The response header naming the stream for `/v1/rpc-cancel/{stream}`: a
/// token the worker makes per call, so a request id two callers share (it
/// is theirs to choose) cannot reach the other's request.
const STREAM_HEADER: &str = "x-switchyard-stream";
/// Frames a request's task may queue before the response body is read.
const BODY_QUEUE: usize = 64;
/// Per-stream HTTP/2 window: how much one unread response may buffer.
const STREAM_WINDOW: u32 = 1024 * 1024;
/// Connection-wide HTTP/2 window, large so one unread stream cannot stall others.
const CONNECTION_WINDOW: u32 = 64 * 1024 * 1024;

/// How long a new connection may stay silent, and the interval (and answer
/// deadline) of the pings on an idle HTTP/2 connection.
const IDLE_DEADLINE: Duration = Duration::from_secs(30);

/// What the HTTP/2 listener bounds. The values are the TCP plane's settings
/// (`DYN_TCP_MAX_CONNECTIONS`, `_MAX_STREAMS_PER_CONNECTION`,
/// `_MAX_SEND_QUEUE`, `_WRITE_TIMEOUT`); `None` leaves a bound off.
#[derive(Debug, Clone)]
pub struct HttpLimits {
    /// Connections open at once; one over the cap is closed at accept.
    pub max_connections: Option<usize>,
    /// Streams one connection may have open (SETTINGS_MAX_CONCURRENT_STREAMS).
    pub max_streams_per_connection: Option<u32>,
    /// Answer bytes one connection may have queued and not yet taken by
    /// HTTP/2 (which takes them as the caller's window opens); a stream that
    /// finds no room waits.
    pub max_send_queue: Option<usize>,
    /// How long a stream may wait to queue its next frame (for room in the
    /// connection's budget, or in its own queue) before it is cut off.
    pub write_timeout: Option<Duration>,
    /// Where refusals are counted (`limit` = `connections`, `write_timeout`).
    pub metrics: TransportMetrics,
}

impl HttpLimits {
    /// The limits of `tcp`'s settings, counted on `metrics`.
    pub fn from_config(tcp: &TcpConfig, metrics: TransportMetrics) -> Self {
        Self {
            max_connections: Some(*tcp.max_connections()),
            max_streams_per_connection: Some(u32::try_from(*tcp.max_streams_per_connection()).unwrap_or(u32::MAX)),
            max_send_queue: Some(*tcp.max_send_queue()),
            write_timeout: Some(*tcp.write_timeout()),
            metrics,
        }
    }

    /// No bounds (hyper's defaults), counted nowhere: for tests.
    pub fn unlimited() -> Self {
        Self {
            max_connections: None,
            max_streams_per_connection: None,
            max_send_queue: None,
            write_timeout: None,
            metrics: TransportMetrics::unregistered(),
        }
    }
}

/// The worker's HTTP/2 listener.
#[derive(Debug)]
pub struct HttpServer {
    base: String,
}

impl HttpServer {
    /// Binds `DYN_HTTP_RPC_HOST:DYN_HTTP_RPC_PORT`; with `tls`, every caller
    /// must present a certificate from the mesh CA (and the address
    /// advertised is `https://`).
    pub async fn bind(
        config: &HttpConfig,
        max_message_size: usize,
        tls: Option<&RequestPlaneTls>,
        limits: HttpLimits,
        handlers: Arc<Handlers>,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) -> std::io::Result<Self> {
        let listener = super::tcp::listen(config.host(), *config.port()).await?;
        let local = listener.local_addr()?;
        let port = local.port();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let base = match config.advertise() {
            Some(address) => format!("{scheme}://{address}"),
            None => format!("{scheme}://{}:{port}", config.host()),
        };
        let state = ServerState {
            pump: Pump::new(handlers, shutdown.clone(), max_message_size),
            shutdown: shutdown.clone(),
            running: Arc::default(),
            tracker: tracker.clone(),
            write_timeout: limits.write_timeout,
            metrics: limits.metrics.clone(),
        };
        let limits = crate::http_server::Limits {
            max_connections: limits.max_connections,
            max_streams_per_connection: limits.max_streams_per_connection,
            on_refused: Some(limits.metrics.limit_refusals.with_label_values(&["connections"])),
            send_queue_bytes: limits.max_send_queue,
        };
        let router = Router::new()
            .route("/v1/rpc/{*endpoint}", post(rpc))
            .route("/v1/rpc-cancel/{request_id}", post(cancel))
            .layer(DefaultBodyLimit::max(max_message_size))
            .with_state(state);
        // The serve loop sets TCP_NODELAY (without it a small response waits
        // out Nagle and delayed ACKs, ~40 ms), drops connections that send
        // nothing, and pings idle HTTP/2 connections.
        match tls {
            Some(tls) => {
                let mut server = (*tls.server_config()).clone();
                server.alpn_protocols = vec![b"h2".to_vec()];
                let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
                tracker.spawn(crate::http_server::serve_with(
                    listener,
                    router,
                    IDLE_DEADLINE,
                    shutdown,
                    Some(acceptor),
                    limits,
                ));
                tracing::info!(address = %base, "request plane listening (http/2, mutual TLS)");
            }
            None => {
                tracker.spawn(crate::http_server::serve_with(
                    listener,
                    router,
                    IDLE_DEADLINE,
                    shutdown,
                    None,
                    limits,
                ));
                tracing::info!(address = %base, "request plane listening (http/2)");
                super::tcp::warn_if_exposed(local, "DYN_HTTP_RPC_HOST");
            }
        }
        Ok(Self { base })
    }
}

impl RequestServer for HttpServer {
    fn transport(&self) -> Transport {
        Transport::Http(self.base.clone())
    }
}

#[derive(Clone)]
struct ServerState {
    /// Runs each request and sends its response.
    pump: Pump,
    shutdown: CancellationToken,
    /// Requests in flight by id, for graceful stops.
    running: Arc<Mutex<HashMap<String, Controller>>>,
    tracker: TaskTracker,
    /// How long a stream may wait to queue a frame (`HttpLimits::write_timeout`).
    write_timeout: Option<Duration>,
    metrics: TransportMetrics,
}

impl ServerState {
    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<String, Controller>> {
        // Single insert/remove updates: a poisoned map is still consistent.
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }
}

async fn rpc(
    State(state): State<ServerState>,
    Path(endpoint): Path<String>,
    budget: Option<Extension<SendBudget>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(instance_id) = headers
        .get(INSTANCE_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| u64::from_str_radix(v, 16).ok())
    else {
        return (
            StatusCode::BAD_REQUEST,
            format!("missing or invalid {INSTANCE_HEADER} header"),
        )
            .into_response();
    };
    let request_id = headers
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .map_or_else(|| Controller::new().id().to_string(), str::to_string);
    let controller = Controller::with_parent(request_id, &state.shutdown);
    let stream_token = format!("{:032x}", rand::random::<u128>());
    let token_for_header = stream_token.clone();
    state.running().insert(stream_token.clone(), controller.clone());
    let (frames, body_frames) = mpsc::channel::<Queued>(BODY_QUEUE);
    let task_state = state.clone();
    let mut answer = Box::pin(async move {
        let request = Context::with_controller(body, controller);
        let sink = BodySink {
            frames,
            budget: budget.map(|Extension(budget)| budget),
            write_timeout: task_state.write_timeout,
            metrics: task_state.metrics.clone(),
        };
        task_state.pump.run(&endpoint, instance_id, request, sink).await;
        task_state.running().remove(&stream_token);
    });
    let response = Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/x-switchyard-stream")
        .header(STREAM_HEADER, token_for_header);
    // An answer that is ready at once (a quick unary handler) is sent
    // without a task or a queue between the handler and HTTP/2.
    let body = if futures::poll!(answer.as_mut()).is_ready() {
        finished_body(body_frames)
    } else {
        state.tracker.spawn(answer);
        Body::from_stream(chunked(BodyChunks {
            queue: body_frames,
            carry: None,
        }))
    };
    response.body(body).expect("a valid response")
}

/// The body of an answer whose frames are all queued: its first chunk
/// ([`BodyChunks`]) alone when that is all of it, so that its headers,
/// frames and end of stream leave in one write; otherwise streamed like any
/// other answer, the first chunk going first.
fn finished_body(queue: mpsc::Receiver<Queued>) -> Body {
    let mut chunks = BodyChunks { queue, carry: None };
    // The sender is gone and every frame queued: the first chunk is ready.
    let first = chunks.next().now_or_never().flatten().unwrap_or_default();
    if chunks.carry.is_none() && chunks.queue.is_empty() {
        return Body::from(first);
    }
    Body::from_stream(futures::stream::iter([Ok(first)]).chain(chunked(chunks)))
}

/// Body chunks as a stream. A frame's share of the budget goes back as
/// HTTP/2 takes the frame.
fn chunked(chunks: BodyChunks) -> impl futures::Stream<Item = Result<Bytes, std::convert::Infallible>> + Send {
    futures::stream::unfold(chunks, |mut chunks| async move {
        let chunk = chunks.next().await?;
        Some((Ok(chunk), chunks))
    })
}

/// The most bytes of queued frames that go out together as one body chunk
/// (one HTTP/2 DATA frame at the default maximum frame size).
const CHUNK: usize = 16 * 1024;

/// A response body's chunks: the frames that are queued together, up to
/// [`CHUNK`] bytes, leave as one chunk (one DATA frame) rather than one
/// each. A frame that would not fit waits for the next chunk; a frame
/// larger than a chunk leaves alone, uncopied.
struct BodyChunks {
    queue: mpsc::Receiver<Queued>,
    /// A frame taken from the queue that did not fit in the last chunk.
    carry: Option<Bytes>,
}

impl BodyChunks {
    /// `None` once the queue is closed and empty.
    async fn next(&mut self) -> Option<Bytes> {
        let first = match self.carry.take() {
            Some(frame) => frame,
            None => self.queue.recv().await?.frame,
        };
        let mut chunk: Option<BytesMut> = None;
        let mut length = first.len();
        while let Ok(queued) = self.queue.try_recv() {
            if length + queued.frame.len() > CHUNK {
                self.carry = Some(queued.frame);
                break;
            }
            length += queued.frame.len();
            chunk
                .get_or_insert_with(|| {
                    let mut chunk = BytesMut::with_capacity(CHUNK);
                    chunk.put_slice(&first);
                    chunk
                })
                .put_slice(&queued.frame);
        }
        Some(chunk.map_or(first, BytesMut::freeze))
    }
}

/// A frame waiting for HTTP/2, with its share of the connection's budget.
struct Queued {
    frame: Bytes,
    _budget: Option<OwnedSemaphorePermit>,
}

/// One request's response body. HTTP/2 flow control holds back a caller
/// that reads slowly: sending waits for room in the body's queue and in the
/// connection's budget, at most the write timeout.
struct BodySink {
    frames: mpsc::Sender<Queued>,
    /// The connection's budget of queued bytes (`HttpLimits::max_send_queue`).
    budget: Option<SendBudget>,
    write_timeout: Option<Duration>,
    metrics: TransportMetrics,
}

impl BodySink {
    /// Queues `frame` for the caller; `CallerGone` when it reset the stream
    /// or has not made room within the write timeout.
    async fn queue(&mut self, frame: Bytes) -> Result<(), CallerGone> {
        // Room in the budget and in the queue, the usual case, needs no timer.
        let share = match &self.budget {
            None => None,
            Some(budget) => match budget.try_reserve(frame.len()) {
                Some(share) => Some(share),
                None => return self.queue_waiting(frame).await,
            },
        };
        match self.frames.try_send(Queued { frame, _budget: share }) {
            Ok(()) => Ok(()),
            Err(TrySendError::Closed(_)) => Err(CallerGone),
            Err(TrySendError::Full(queued)) => self.queue_waiting(queued.frame).await,
        }
    }

    /// [`BodySink::queue`] when it must wait for room, at most the write timeout.
    async fn queue_waiting(&mut self, frame: Bytes) -> Result<(), CallerGone> {
        let (frames, budget) = (&self.frames, &self.budget);
        let queue = async move {
            let share = match budget {
                Some(budget) => Some(budget.reserve(frame.len()).await),
                None => None,
            };
            let queued = Queued { frame, _budget: share };
            frames.send(queued).await.map_err(|_| CallerGone)
        };
        let deadline = async {
            match self.write_timeout {
                Some(timeout) => tokio::time::sleep(timeout).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            queued = queue => queued,
            // Waiting for the budget must not outlive the caller.
            _ = self.frames.closed() => Err(CallerGone),
            _ = deadline => {
                self.metrics.refused("write_timeout");
                tracing::debug!(
                    timeout = ?self.write_timeout,
                    "cutting off an HTTP/2 request-plane stream whose caller takes no more (DYN_TCP_WRITE_TIMEOUT)"
                );
                Err(CallerGone)
            }
        }
    }
}

impl ResponseSink for BodySink {
    async fn next_item(&mut self, items: &mut ByteStream) -> Result<Next, CallerGone> {
        tokio::select! {
            biased;
            // The caller reset the stream: nobody reads the answer any more.
            _ = self.frames.closed() => Err(CallerGone),
            item = items.next() => Ok(item),
        }
    }

    async fn credit(&mut self) {}

    async fn send(&mut self, item: Bytes) -> Result<(), CallerGone> {
        self.queue(frame(FrameType::Data, &item)).await
    }

    async fn finish(mut self, outcome: Result<(), RequestError>) {
        let last = match outcome {
            Ok(()) => frame(FrameType::End, &[]),
            Err(error) => error_frame(&error),
        };
        // A caller that takes no more gets no final frame: nobody would read it.
        let _ = self.queue(last).await;
    }
}

async fn cancel(State(state): State<ServerState>, Path(stream): Path<String>, body: Bytes) -> StatusCode {
    let Some(controller) = state.running().get(&stream).cloned() else {
        return StatusCode::NOT_FOUND;
    };
    match &body[..] {
        b"stop" => controller.stop(),
        b"kill" => controller.kill(),
        _ => return StatusCode::BAD_REQUEST,
    }
    StatusCode::NO_CONTENT
}

fn frame(kind: FrameType, payload: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(5 + payload.len());
    buf.put_u8(kind as u8);
    buf.put_u32(payload.len() as u32);
    buf.put_slice(payload);
    buf.freeze()
}

fn error_frame(error: &RequestError) -> Bytes {
    frame(FrameType::Error, &super::encode_error(error))
}

type HyperClient = hyper_util::client::legacy::Client<connector::MeshConnector, Full<Bytes>>;

/// Calls workers over HTTP/2, one pooled connection per worker.
#[derive(Debug, Clone)]
pub struct HttpClient {
    client: HyperClient,
    max_message_size: usize,
    connect_timeout: Duration,
}

impl HttpClient {
    pub fn new(config: &RuntimeConfig) -> Self {
        let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(*config.tcp().connect_timeout()));
        let tls = config.tcp().tls().as_ref().map(|tls| {
            let mut client = (*tls.client_config()).clone();
            client.alpn_protocols = vec![b"h2".to_vec()];
            tokio_rustls::TlsConnector::from(Arc::new(client))
        });
        let connector = connector::MeshConnector::new(connector, tls);
        let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .http2_initial_stream_window_size(STREAM_WINDOW)
            .http2_initial_connection_window_size(CONNECTION_WINDOW)
            .build(connector);
        Self {
            client,
            max_message_size: *config.tcp().max_message_size(),
            connect_timeout: *config.tcp().connect_timeout(),
        }
    }
}

#[async_trait::async_trait]
impl RequestClient for HttpClient {
    async fn call(&self, target: &Target, request: Context<Bytes>) -> Result<ByteStream, RequestError> {
        let Transport::Http(base) = &target.transport else {
            return Err(RequestError::new(
                ErrorKind::Invalid,
                format!("{target} is not an HTTP target"),
            ));
        };
        let (body, controller) = request.into_parts();
        if body.len() > self.max_message_size {
            return Err(crate::request_plane::too_large(
                "request",
                body.len(),
                self.max_message_size,
            ));
        }
        let request = hyper::Request::post(format!("{base}/v1/rpc/{}", target.endpoint))
            .header(INSTANCE_HEADER, format!("{:x}", target.instance_id))
            .header(REQUEST_ID_HEADER, controller.id())
            .body(Full::new(body))
            .map_err(|e| RequestError::new(ErrorKind::Invalid, format!("cannot build the request: {e}")))?;
        let response = match tokio::time::timeout(self.connect_timeout, self.client.request(request)).await {
            Err(_) => {
                return Err(RequestError::new(
                    ErrorKind::Unreachable,
                    format!("no answer from {base} within {:?}", self.connect_timeout),
                ));
            }
            Ok(Err(error)) if error.is_connect() => {
                return Err(RequestError::new(
                    ErrorKind::Unreachable,
                    format!("cannot connect to {base}: {error}"),
                ));
            }
            Ok(Err(error)) => {
                return Err(RequestError::new(
                    ErrorKind::Disconnected,
                    format!("request to {base} failed: {error}"),
                ));
            }
            Ok(Ok(response)) => response,
        };
        match response.status() {
            StatusCode::OK => {}
            StatusCode::PAYLOAD_TOO_LARGE => {
                return Err(RequestError::new(
                    ErrorKind::TooLarge,
                    format!("{base} refused the request as too large"),
                ));
            }
            status => {
                return Err(RequestError::new(
                    ErrorKind::Protocol,
                    format!("{base} answered {status}"),
                ));
            }
        }
        let Some(stream) = response
            .headers()
            .get(STREAM_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
        else {
            return Err(RequestError::new(
                ErrorKind::Protocol,
                format!("{base} answered without the {STREAM_HEADER} header"),
            ));
        };
        let cancel_url = format!("{base}/v1/rpc-cancel/{stream}");
        let state = ResponseState {
            body: response.into_body(),
            buf: BytesMut::new(),
            controller,
            stop_sent: false,
            client: self.client.clone(),
            cancel_url,
            max_message_size: self.max_message_size,
            done: false,
        };
        Ok(Box::pin(futures::stream::unfold(state, |mut state| async move {
            let item = state.next_item().await?;
            Some((item, state))
        })))
    }
}

/// Reading one response body into items.
struct ResponseState {
    body: hyper::body::Incoming,
    buf: BytesMut,
    controller: Controller,
    stop_sent: bool,
    client: HyperClient,
    cancel_url: String,
    max_message_size: usize,
    done: bool,
}

impl ResponseState {
    async fn next_item(&mut self) -> Option<Result<Bytes, RequestError>> {
        if self.done {
            return None;
        }
        loop {
            match self.decode() {
                Err(error) => {
                    self.done = true;
                    return Some(Err(error));
                }
                Ok(Some((FrameType::Data, payload))) => return Some(Ok(payload)),
                Ok(Some((FrameType::End, _))) => {
                    self.done = true;
                    // Read the body to its end-of-stream flag (it follows at
                    // once): dropping it earlier resets the HTTP/2 stream, and
                    // servers answer floods of resets with GOAWAY.
                    let _ = tokio::time::timeout(Duration::from_millis(100), async {
                        while let Some(Ok(_)) = self.body.frame().await {}
                    })
                    .await;
                    return None;
                }
                Ok(Some((_, payload))) => {
                    self.done = true;
                    let error = rmp_serde::from_slice::<WireError>(&payload).map_or_else(
                        |e| RequestError::new(ErrorKind::Protocol, format!("undecodable error frame: {e}")),
                        RequestError::from,
                    );
                    return Some(Err(error));
                }
                Ok(None) => {}
            }
            tokio::select! {
                biased;
                _ = self.controller.killed() => {
                    // Returning drops the body: HTTP/2 resets the stream and the worker kills the request.
                    self.done = true;
                    return Some(Err(RequestError::new(ErrorKind::Cancelled, "the request was killed by the caller")));
                }
                _ = self.controller.stopped(), if !self.stop_sent => {
                    self.stop_sent = true;
                    let request = hyper::Request::post(&self.cancel_url)
                        .body(Full::new(Bytes::from_static(b"stop")))
                        .expect("a valid request");
                    let client = self.client.clone();
                    tokio::spawn(async move {
                        let _ = client.request(request).await;
                    });
                }
                frame = self.body.frame() => match frame {
                    Some(Ok(frame)) => {
                        if let Ok(data) = frame.into_data() {
                            self.buf.extend_from_slice(&data);
                        }
                    }
                    Some(Err(error)) => {
                        self.done = true;
                        return Some(Err(RequestError::new(ErrorKind::Disconnected, format!("response stream broke: {error}"))));
                    }
                    None => {
                        self.done = true;
                        return Some(Err(RequestError::new(
                            ErrorKind::Disconnected,
                            "the response ended before the stream completed",
                        )));
                    }
                },
            }
        }
    }

    /// Takes one frame out of the buffer, if complete.
    fn decode(&mut self) -> Result<Option<(FrameType, Bytes)>, RequestError> {
        if self.buf.len() < 5 {
            return Ok(None);
        }
        let length = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        let kind = match self.buf[0] {
            0x11 => FrameType::Data,
            0x12 => FrameType::End,
            0x13 => FrameType::Error,
            other => {
                return Err(RequestError::new(
                    ErrorKind::Protocol,
                    format!("unknown response frame kind 0x{other:02x}"),
                ));
            }
        };
        if length > self.max_message_size {
            return Err(crate::request_plane::too_large(
                "response item",
                length,
                self.max_message_size,
            ));
        }
        if self.buf.len() < 5 + length {
            return Ok(None);
        }
        self.buf.advance(5);
        Ok(Some((kind, self.buf.split_to(length).freeze())))
    }
}

#[cfg(test)]
mod tests;
