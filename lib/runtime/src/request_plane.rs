//! How a request reaches a worker and its responses come back.
//!
//! Two halves, one per side of the wire:
//! - the worker's [`RequestServer`]: one listener per process, serving every
//!   endpoint registered in its [`Handlers`];
//! - the caller's [`RequestClient`]: sends a request to an instance and
//!   returns the response stream.
//!
//! Bodies and response items are msgpack bytes here; typed encoding happens in
//! the endpoint builder (worker side) and the router (caller side).
//! Transports: [`tcp`] (the default), [`http`] (HTTP/2) and [`nats`]; each
//! instance registers the one it listens on, and [`AnyClient`] calls each over
//! its own. What every transport shares on the worker side lives beside them:
//! [`handlers`] (the endpoints served, in-flight counting, drain) and `pump`
//! (one response stream sent to its caller, behind a `ResponseSink` per
//! transport). This module does no routing and no discovery.

#[cfg(test)]
pub(crate) mod conformance;
pub mod handlers;
pub mod http;
pub mod nats;
pub(crate) mod pump;
pub mod tcp;
#[cfg(test)]
pub(crate) mod tls_suite;

use crate::engine::{Context, ResponseStream};
use crate::error::RequestError;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::fmt;

/// A stream of encoded response items.
pub type ByteStream = ResponseStream<Bytes>;

/// Where an instance listens, as published in discovery. The JSON form follows
/// Dynamo's externally tagged `transport` field: `{"tcp":"10.0.0.5:40123"}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    /// `host:port` of the instance's TCP request-plane listener.
    Tcp(String),
    /// `http://host:port` of the instance's HTTP/2 (h2c) request-plane listener.
    Http(String),
    /// The NATS subject the instance serves (`switchyard.rpc.{instance_id:x}`).
    Nats(String),
}

/// The address of one endpoint of one instance, as a request names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    pub transport: Transport,
    /// `namespace/component/endpoint`.
    pub endpoint: String,
    pub instance_id: u64,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.transport {
            Transport::Tcp(address) => write!(f, "tcp://{address}/{}/{:x}", self.endpoint, self.instance_id),
            Transport::Http(base) => write!(f, "{base}/v1/rpc/{} (instance {:x})", self.endpoint, self.instance_id),
            Transport::Nats(subject) => write!(f, "nats:{subject}/{}", self.endpoint),
        }
    }
}

/// Calls every instance over the transport it registered, so one caller can
/// reach tcp and http workers alike.
pub struct AnyClient {
    tcp: tcp::TcpClient,
    http: http::HttpClient,
    /// Connected on the first call to a NATS instance.
    nats: tokio::sync::OnceCell<nats::NatsRequestClient>,
    nats_connect: NatsConnect,
}

/// Opens the NATS connection the first time a NATS instance is called.
pub type NatsConnect =
    Box<dyn Fn() -> futures::future::BoxFuture<'static, Result<nats::NatsRequestClient, RequestError>> + Send + Sync>;

impl std::fmt::Debug for AnyClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AnyClient")
            .field("tcp", &self.tcp)
            .finish_non_exhaustive()
    }
}

impl AnyClient {
    pub fn new(tcp: tcp::TcpClient, http: http::HttpClient, nats_connect: NatsConnect) -> Self {
        Self {
            tcp,
            http,
            nats: tokio::sync::OnceCell::new(),
            nats_connect,
        }
    }
}

#[async_trait::async_trait]
impl RequestClient for AnyClient {
    async fn call(&self, target: &Target, request: Context<Bytes>) -> Result<ByteStream, RequestError> {
        match &target.transport {
            Transport::Tcp(_) => self.tcp.call(target, request).await,
            Transport::Http(_) => self.http.call(target, request).await,
            Transport::Nats(_) => {
                let nats = self.nats.get_or_try_init(|| (self.nats_connect)()).await?;
                nats.call(target, request).await
            }
        }
    }
}

/// The error a killed request ends with, on every transport: `ShuttingDown`
/// when the worker is stopping (the caller may migrate it), `Cancelled` when
/// the caller asked.
pub(crate) fn killed_error(shutdown: &tokio_util::sync::CancellationToken) -> RequestError {
    if shutdown.is_cancelled() {
        RequestError::new(
            crate::error::ErrorKind::ShuttingDown,
            "the worker shut down before the request finished",
        )
    } else {
        RequestError::new(crate::error::ErrorKind::Cancelled, "the request was killed")
    }
}

/// `what` (a request, a response item) of `size` bytes is over `limit`.
pub(crate) fn too_large(what: &str, size: usize, limit: usize) -> RequestError {
    RequestError::new(
        crate::error::ErrorKind::TooLarge,
        format!("{what} of {size} bytes exceeds DYN_TCP_MAX_MESSAGE_SIZE={limit}"),
    )
}

/// Longest error message sent on the wire. Every peer accepts payloads of at
/// least 1024 bytes (the smallest `DYN_TCP_MAX_MESSAGE_SIZE`), so an error
/// never trips the receiver's limit.
const MAX_ERROR_MESSAGE: usize = 768;

/// An error's wire form (msgpack `{kind, message}`), message cut to fit.
pub(crate) fn encode_error(error: &RequestError) -> Vec<u8> {
    let mut wire = error.to_wire();
    if wire.message.len() > MAX_ERROR_MESSAGE {
        wire.message
            .truncate(wire.message.floor_char_boundary(MAX_ERROR_MESSAGE));
        wire.message.push('…');
    }
    rmp_serde::to_vec_named(&wire).expect("an error always encodes")
}

/// The worker side of a transport: a listener serving the process's [`Handlers`].
pub trait RequestServer: Send + Sync + fmt::Debug {
    /// The address callers use to reach this server, published in discovery.
    fn transport(&self) -> Transport;
}

/// The caller side of a transport.
///
/// `call` promises: when it returns `Ok` the request is queued on a live
/// connection to the worker; the stream then yields the worker's items and ends with `None` after the
/// last one, or with one `Err` (its kind says why: `Disconnected` when the
/// connection broke mid-stream). Dropping the stream cancels the request on
/// the worker (`kill`); `stop`/`kill` on the request's controller are sent to
/// the worker as they happen. Errors before dispatch (`Unreachable`,
/// `TooLarge`, …) are returned from `call` itself.
#[async_trait::async_trait]
pub trait RequestClient: Send + Sync + fmt::Debug {
    async fn call(&self, target: &Target, request: Context<Bytes>) -> Result<ByteStream, RequestError>;
}
