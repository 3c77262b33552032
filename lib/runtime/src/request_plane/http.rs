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
use futures::StreamExt;
use http_body_util::{BodyExt, Full};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
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
    state.tracker.spawn(async move {
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
    // The frame's share of the budget goes back as HTTP/2 takes the frame.
    let stream = futures::stream::unfold(body_frames, |mut rx| async move {
        rx.recv()
            .await
            .map(|queued| (Ok::<_, std::convert::Infallible>(queued.frame), rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/x-switchyard-stream")
        .header(STREAM_HEADER, token_for_header)
        .body(Body::from_stream(stream))
        .expect("a valid response")
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
mod tests {
    use super::*;
    use crate::request_plane::conformance::{PlaneKit, conformance_tests};
    use futures::FutureExt;
    use futures::future::BoxFuture;

    struct Http;

    impl PlaneKit for Http {
        fn server(
            &self,
            config: RuntimeConfig,
            handlers: Arc<Handlers>,
            stop: CancellationToken,
        ) -> BoxFuture<'static, Arc<dyn RequestServer>> {
            async move {
                let server = HttpServer::bind(
                    config.http(),
                    *config.tcp().max_message_size(),
                    config.tcp().tls().as_ref(),
                    HttpLimits::unlimited(),
                    handlers,
                    stop,
                    TaskTracker::new(),
                )
                .await
                .unwrap();
                Arc::new(server) as Arc<dyn RequestServer>
            }
            .boxed()
        }

        fn client(&self, config: RuntimeConfig) -> BoxFuture<'static, Arc<dyn RequestClient>> {
            async move { Arc::new(HttpClient::new(&config)) as Arc<dyn RequestClient> }.boxed()
        }
    }

    conformance_tests!(Http);

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_over_the_cap_are_closed_while_open_ones_keep_working() {
        let limits = HttpLimits {
            max_connections: Some(5),
            max_streams_per_connection: Some(64),
            ..HttpLimits::unlimited()
        };
        let refused = limits.metrics.limit_refusals.with_label_values(&["connections"]);
        let config = RuntimeConfig::default();
        let server = HttpServer::bind(
            config.http(),
            *config.tcp().max_message_size(),
            None,
            limits,
            Fixtures::default().handlers(),
            CancellationToken::new(),
            TaskTracker::new(),
        )
        .await
        .unwrap();
        let client = HttpClient::new(&config);
        let target = Target {
            transport: server.transport(),
            endpoint: "ns/c/count".into(),
            instance_id: INSTANCE,
        };
        let first = client.call(&target, Context::new(Bytes::from_static(b"1"))).await;
        assert_eq!(collect(first.unwrap()).await.0, numbers(1));
        let Transport::Http(base) = server.transport() else {
            unreachable!("an HTTP server")
        };
        let address = base.trim_start_matches("http://").to_string();
        let mut rogue = vec![];
        for _ in 0..100 {
            rogue.push(tokio::net::TcpStream::connect(&address).await.unwrap());
        }
        eventually("the cap refuses the rogue connections", || refused.get() >= 96).await;
        let answer = client.call(&target, Context::new(Bytes::from_static(b"5"))).await;
        assert_eq!(collect(answer.unwrap()).await.0, numbers(5));
        drop(rogue);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flood_of_silent_connections_keeps_no_new_caller_out() {
        let (server, _, metrics) = plane_with(HttpLimits {
            max_connections: Some(20),
            ..HttpLimits::unlimited()
        })
        .await;
        let Transport::Http(base) = server.transport() else {
            unreachable!("an HTTP server")
        };
        // A rogue opens 300 connections and holds them, saying nothing.
        let mut rogue = vec![];
        for _ in 0..300 {
            rogue.push(
                tokio::net::TcpStream::connect(base.trim_start_matches("http://"))
                    .await
                    .unwrap(),
            );
        }
        let refused = metrics.limit_refusals.with_label_values(&["connections"]);
        eventually("the cap cuts off the rogue connections", || refused.get() >= 280).await;
        // A new caller's connection takes the place of the oldest silent one.
        a_caller_is_served(&server).await;
        drop(rogue);
    }

    /// A rogue HTTP/2 caller speaking raw frames, so that it can ignore the
    /// server's settings and flow control as an attacker would.
    struct RawH2 {
        socket: tokio::net::TcpStream,
        next_stream: u32,
    }

    impl RawH2 {
        /// Connects, exchanges SETTINGS (ours empty: the default 64 KiB
        /// window, never raised) and acknowledges the server's.
        async fn connect(server: &HttpServer) -> Self {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let Transport::Http(base) = server.transport() else {
                unreachable!("an HTTP server")
            };
            let mut socket = tokio::net::TcpStream::connect(base.trim_start_matches("http://"))
                .await
                .unwrap();
            socket.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
            socket.write_all(&Self::frame(0x4, 0, 0, &[])).await.unwrap();
            let mut header = [0u8; 9];
            socket.read_exact(&mut header).await.unwrap();
            assert_eq!(header[3], 0x4, "the server opens with SETTINGS");
            let length = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
            socket.read_exact(&mut vec![0; length]).await.unwrap();
            socket.write_all(&Self::frame(0x4, 0x1, 0, &[])).await.unwrap();
            Self { socket, next_stream: 1 }
        }

        fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
            let mut frame = (payload.len() as u32).to_be_bytes()[1..].to_vec();
            frame.extend([kind, flags]);
            frame.extend(stream.to_be_bytes());
            frame.extend(payload);
            frame
        }

        /// The frames of one POST to `endpoint` with `body` (HPACK literals
        /// without indexing, so every request stands alone).
        fn post(&mut self, endpoint: &str, body: &[u8]) -> Vec<u8> {
            let literal = |out: &mut Vec<u8>, text: &str| {
                out.push(text.len() as u8);
                out.extend(text.as_bytes());
            };
            let mut headers = vec![0x83, 0x86]; // :method POST, :scheme http
            headers.push(0x04); // :path, by its static index
            literal(&mut headers, &format!("/v1/rpc/{endpoint}"));
            headers.push(0x01); // :authority
            literal(&mut headers, "127.0.0.1");
            headers.push(0x00);
            literal(&mut headers, INSTANCE_HEADER);
            literal(&mut headers, &format!("{INSTANCE:x}"));
            let stream = self.next_stream;
            self.next_stream += 2;
            if body.is_empty() {
                // END_HEADERS | END_STREAM
                Self::frame(0x1, 0x5, stream, &headers)
            } else {
                let mut frames = Self::frame(0x1, 0x4, stream, &headers);
                frames.extend(Self::frame(0x0, 0x1, stream, body));
                frames
            }
        }
    }

    use crate::request_plane::conformance::{Fixtures, INSTANCE, collect, eventually, numbers};

    async fn plane_with(limits: HttpLimits) -> (HttpServer, Arc<Handlers>, TransportMetrics) {
        let config = RuntimeConfig::default();
        let handlers = Fixtures::default().handlers();
        let metrics = limits.metrics.clone();
        let server = HttpServer::bind(
            config.http(),
            *config.tcp().max_message_size(),
            None,
            limits,
            handlers.clone(),
            CancellationToken::new(),
            TaskTracker::new(),
        )
        .await
        .unwrap();
        (server, handlers, metrics)
    }

    /// A legitimate caller, on a connection of its own, gets `count n`.
    async fn a_caller_is_served(server: &HttpServer) {
        let client = HttpClient::new(&RuntimeConfig::default());
        let target = Target {
            transport: server.transport(),
            endpoint: "ns/c/count".into(),
            instance_id: INSTANCE,
        };
        let answer = client.call(&target, Context::new(Bytes::from_static(b"5"))).await;
        assert_eq!(collect(answer.unwrap()).await.0, numbers(5));
    }

    /// Reads what the server sends until it closes the connection; returns
    /// how many frames of each type (HEADERS = 1, RST_STREAM = 3, GOAWAY = 7)
    /// came, and the RST_STREAM error codes.
    async fn frames_until_closed(reader: &mut tokio::net::tcp::OwnedReadHalf) -> (HashMap<u8, usize>, Vec<u32>) {
        use tokio::io::AsyncReadExt;
        let mut all = vec![];
        tokio::time::timeout(Duration::from_secs(30), reader.read_to_end(&mut all))
            .await
            .expect("the server closes the rogue's connection")
            .unwrap();
        let (mut kinds, mut resets) = (HashMap::new(), vec![]);
        let mut at = 0;
        while at + 9 <= all.len() {
            let length = u32::from_be_bytes([0, all[at], all[at + 1], all[at + 2]]) as usize;
            let kind = all[at + 3];
            *kinds.entry(kind).or_default() += 1;
            if kind == 0x3 && at + 13 <= all.len() {
                resets.push(u32::from_be_bytes(all[at + 9..at + 13].try_into().unwrap()));
            }
            at += 9 + length;
        }
        (kinds, resets)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ten_thousand_streams_on_one_connection_are_held_to_the_stream_cap_and_a_caller_is_served() {
        use tokio::io::AsyncWriteExt;
        const CAP: usize = 100;
        let (server, handlers, _) = plane_with(HttpLimits {
            max_streams_per_connection: Some(CAP as u32),
            ..HttpLimits::unlimited()
        })
        .await;
        let mut rogue = RawH2::connect(&server).await;
        // First as many requests as the cap allows, each holding its stream...
        let mut first = vec![];
        for _ in 0..CAP {
            first.extend(rogue.post("ns/c/hang", b""));
        }
        let mut later = vec![];
        for _ in CAP..10_000 {
            later.extend(rogue.post("ns/c/hang", b""));
        }
        let (mut reader, mut writer) = rogue.socket.into_split();
        writer.write_all(&first).await.unwrap();
        eventually("the first streams run", || handlers.inflight("ns/c/hang") == CAP).await;
        // ...then 9,900 more at once, whatever SETTINGS_MAX_CONCURRENT_STREAMS says.
        let flood = tokio::spawn(async move {
            // The server may close the connection before taking them all.
            let _ = writer.write_all(&later).await;
            writer
        });
        let reading = tokio::spawn(async move { frames_until_closed(&mut reader).await });
        let mut most = 0;
        while !reading.is_finished() {
            most = most.max(handlers.inflight("ns/c/hang"));
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let (kinds, resets) = reading.await.unwrap();
        println!("frames from the server: {kinds:?}; at most {most} streams ran at once");
        assert!(
            most <= CAP,
            "{most} streams ran on one connection, over the cap of {CAP}"
        );
        let answered = kinds.get(&0x1).copied().unwrap_or_default();
        assert!(
            answered <= CAP,
            "{answered} of the streams were answered, over the cap of {CAP}"
        );
        // Streams over the cap are refused (REFUSED_STREAM), and a peer that
        // keeps opening them loses its connection (GOAWAY, ENHANCE_YOUR_CALM).
        assert!(resets.contains(&0x7), "no stream was refused: {resets:?}");
        assert_eq!(kinds.get(&0x7), Some(&1), "no GOAWAY");
        eventually("the rogue's streams are gone with its connection", || {
            handlers.inflight("ns/c/hang") == 0
        })
        .await;
        a_caller_is_served(&server).await;
        drop(flood.await.unwrap());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_caller_that_never_reads_is_cut_off_at_the_write_timeout_and_others_are_served() {
        use tokio::io::AsyncWriteExt;
        let (server, handlers, metrics) = plane_with(HttpLimits {
            write_timeout: Some(Duration::from_millis(300)),
            ..HttpLimits::unlimited()
        })
        .await;
        // A million items on each of ten streams, and never a WINDOW_UPDATE
        // nor a read: the server can send 64 KiB, then must wait.
        let mut rogue = RawH2::connect(&server).await;
        for _ in 0..10 {
            let frames = rogue.post("ns/c/count", b"1000000");
            rogue.socket.write_all(&frames).await.unwrap();
        }
        eventually("the rogue's streams run", || handlers.inflight("ns/c/count") > 0).await;
        eventually("the stalled streams are cut off at the write timeout", || {
            metrics.limit_refusals.with_label_values(&["write_timeout"]).get() >= 10
                && handlers.inflight("ns/c/count") == 0
        })
        .await;
        a_caller_is_served(&server).await;
        drop(rogue);
    }

    /// The same suite, and the attacks on TLS, with mutual TLS on both sides.
    mod over_mutual_tls {
        use super::Http;
        use crate::request_plane::conformance::{MutualTls, conformance_tests};
        use crate::request_plane::tls_suite::mutual_tls_tests;

        conformance_tests!(MutualTls(Http));
        mutual_tls_tests!(Http);
    }
}
