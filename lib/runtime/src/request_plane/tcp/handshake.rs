//! Opening a connection, before any request: the TLS session when mutual TLS
//! is on, then one Hello frame each way carrying the protocol version. A
//! peer speaking another version is refused here, with both versions named,
//! instead of failing later on a frame it misreads.
//!
//! The whole exchange is bounded by one deadline; nothing here waits forever.

use super::frame::{self, Decoded, Frame, FrameDecoder, FrameType, PROTOCOL_VERSION};
use super::sink::Writer;
use super::{ReadError, read_frame};
use crate::config::peer_identity;
use crate::error::{ErrorKind, RequestError, WireError};
use bytes::{Bytes, BytesMut};
use std::io;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::{ClientConfig, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// The read side of a connection: plain TCP or a TLS session.
pub(crate) type Reader = Box<dyn AsyncRead + Send + Unpin>;

/// Handshake frames are tiny; a peer announcing more is not a Switchyard peer.
const MAX_HANDSHAKE_PAYLOAD: usize = 64 * 1024;

/// A connection ready for requests.
pub(crate) struct Opened {
    pub(crate) reader: Reader,
    pub(crate) writer: Writer,
    /// Bytes read past the peer's Hello: the start of its next frames.
    pub(crate) buf: BytesMut,
    /// The name in the peer's certificate (see [`peer_identity`]); `None` without TLS.
    pub(crate) peer: Option<String>,
}

/// Why a connection could not be opened.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HandshakeError {
    #[error("TLS handshake failed (is the peer using a certificate from the same CA, DYN_REQUEST_PLANE_TLS_*?)")]
    Tls(#[source] io::Error),
    #[error("the handshake did not finish within {0:?}")]
    Timeout(Duration),
    #[error(
        "the peer closed the connection during the handshake (a TLS peer refusing our certificate, or a plaintext/TLS mismatch)"
    )]
    Closed,
    #[error("the connection failed during the handshake")]
    Io(#[source] io::Error),
    #[error("the peer speaks request-plane protocol version {peer}; this process speaks version {ours}")]
    Version { peer: u16, ours: u16 },
    #[error("the peer refused the connection: {0}")]
    Refused(String),
    #[error(
        "expected a Hello frame first, got {0:?} (a peer older than request-plane protocol version 1, or not a Switchyard peer)"
    )]
    NoHello(FrameType),
    #[error("corrupt handshake frame")]
    Corrupt(#[source] frame::FrameError),
    #[error("the peer announced a {0}-byte handshake frame")]
    Oversized(usize),
}

impl HandshakeError {
    /// The message with its causes, for logs and the caller's error.
    pub(crate) fn chain(&self) -> String {
        let mut text = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            text.push_str(": ");
            text.push_str(&cause.to_string());
            source = cause.source();
        }
        text
    }

    /// Whether the peer just went quiet or away, rather than being refused.
    pub(crate) fn is_silence(&self) -> bool {
        matches!(self, Self::Timeout(_) | Self::Closed | Self::Io(_))
    }

    /// The error a caller reports for a failed connect.
    pub(crate) fn kind(&self) -> ErrorKind {
        match self {
            Self::Version { .. } | Self::NoHello(_) | Self::Corrupt(_) | Self::Oversized(_) => ErrorKind::Protocol,
            _ => ErrorKind::Unreachable,
        }
    }
}

impl From<ReadError> for HandshakeError {
    fn from(error: ReadError) -> Self {
        match error {
            ReadError::Closed => Self::Closed,
            ReadError::Io(e) => Self::Io(e),
            ReadError::Corrupt(e) => Self::Corrupt(e),
        }
    }
}

async fn write_frame(writer: &mut Writer, frame: &Frame) -> io::Result<()> {
    let mut buf = BytesMut::new();
    frame.encode(&mut buf);
    match writer {
        Writer::Plain(socket) => socket.write_all(&buf).await,
        Writer::Stream(stream) => {
            stream.write_all(&buf).await?;
            stream.flush().await
        }
    }
}

fn hello() -> Frame {
    Frame::new(FrameType::Hello, 0, frame::encode_hello(PROTOCOL_VERSION))
}

/// Reads the peer's first frame.
async fn first_frame(reader: &mut Reader, buf: &mut BytesMut) -> Result<Frame, HandshakeError> {
    let mut decoder = FrameDecoder::new(MAX_HANDSHAKE_PAYLOAD);
    match read_frame(reader, buf, &mut decoder).await? {
        Decoded::Frame(frame) => Ok(frame),
        Decoded::Oversized { length, .. } => Err(HandshakeError::Oversized(length)),
    }
}

/// Splits `socket` (after TLS, if any) into its two sides.
fn split_plain(socket: TcpStream) -> (Reader, Writer) {
    let (reader, writer) = socket.into_split();
    (Box::new(reader), Writer::Plain(writer))
}

/// Worker side: TLS (requiring a client certificate from the CA), our Hello,
/// then the caller's, all within `deadline`.
pub(crate) async fn accept(
    socket: TcpStream,
    tls: Option<&Arc<ServerConfig>>,
    deadline: Duration,
) -> Result<Opened, HandshakeError> {
    let exchange = async {
        let (mut reader, mut writer, peer) = match tls {
            None => {
                let (reader, writer) = split_plain(socket);
                (reader, writer, None)
            }
            Some(config) => {
                let stream = TlsAcceptor::from(config.clone())
                    .accept(socket)
                    .await
                    .map_err(HandshakeError::Tls)?;
                let peer = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(peer_identity);
                let (reader, writer) = tokio::io::split(stream);
                (Box::new(reader) as Reader, Writer::Stream(Box::new(writer)), peer)
            }
        };
        write_frame(&mut writer, &hello()).await.map_err(HandshakeError::Io)?;
        let mut buf = BytesMut::with_capacity(64 * 1024);
        let first = first_frame(&mut reader, &mut buf).await?;
        let refusal = match first.frame_type {
            FrameType::Hello => match frame::decode_hello(&first.payload).map_err(HandshakeError::Corrupt)? {
                PROTOCOL_VERSION => None,
                peer => Some(HandshakeError::Version {
                    peer,
                    ours: PROTOCOL_VERSION,
                }),
            },
            other => Some(HandshakeError::NoHello(other)),
        };
        if let Some(refusal) = refusal {
            // Tell the caller why, on stream 0, before closing.
            let error = RequestError::new(refusal.kind(), format!("worker refused the connection: {refusal}"));
            let frame = Frame::new(
                FrameType::Error,
                0,
                Bytes::from(crate::request_plane::encode_error(&error)),
            );
            let _ = write_frame(&mut writer, &frame).await;
            return Err(refusal);
        }
        Ok(Opened {
            reader,
            writer,
            buf,
            peer,
        })
    };
    tokio::time::timeout(deadline, exchange)
        .await
        .map_err(|_| HandshakeError::Timeout(deadline))?
}

/// Caller side: TLS (presenting our certificate, verifying the worker's
/// against the CA and `host`), our Hello, then the worker's, within `deadline`.
pub(crate) async fn connect(
    socket: TcpStream,
    host: &str,
    tls: Option<&Arc<ClientConfig>>,
    deadline: Duration,
) -> Result<Opened, HandshakeError> {
    let exchange = async {
        let (mut reader, mut writer, peer) = match tls {
            None => {
                let (reader, writer) = split_plain(socket);
                (reader, writer, None)
            }
            Some(config) => {
                let name = ServerName::try_from(host.trim_start_matches('[').trim_end_matches(']').to_string())
                    .map_err(|e| HandshakeError::Tls(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
                let stream = TlsConnector::from(config.clone())
                    .connect(name, socket)
                    .await
                    .map_err(HandshakeError::Tls)?;
                let peer = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(peer_identity);
                let (reader, writer) = tokio::io::split(stream);
                (Box::new(reader) as Reader, Writer::Stream(Box::new(writer)), peer)
            }
        };
        write_frame(&mut writer, &hello()).await.map_err(HandshakeError::Io)?;
        let mut buf = BytesMut::with_capacity(64 * 1024);
        let first = first_frame(&mut reader, &mut buf).await?;
        match first.frame_type {
            FrameType::Hello => match frame::decode_hello(&first.payload).map_err(HandshakeError::Corrupt)? {
                PROTOCOL_VERSION => {}
                peer => {
                    return Err(HandshakeError::Version {
                        peer,
                        ours: PROTOCOL_VERSION,
                    });
                }
            },
            FrameType::Error if first.stream_id == 0 => {
                let message = rmp_serde::from_slice::<WireError>(&first.payload)
                    .map(|wire| RequestError::from(wire).to_string())
                    .unwrap_or_else(|_| "undecodable error frame".to_string());
                return Err(HandshakeError::Refused(message));
            }
            other => return Err(HandshakeError::NoHello(other)),
        }
        Ok(Opened {
            reader,
            writer,
            buf,
            peer,
        })
    };
    tokio::time::timeout(deadline, exchange)
        .await
        .map_err(|_| HandshakeError::Timeout(deadline))?
}
