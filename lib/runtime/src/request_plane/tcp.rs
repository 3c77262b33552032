//! The TCP request plane (the default): one listener per worker process,
//! persistent connections from callers, and many concurrent request streams
//! multiplexed on each connection, responses coming back on the same
//! connection. Per-stream credit-based flow control keeps one slow consumer
//! from stalling the other streams of its connection. See `docs/protocol.md`.
//!
//! Each connection has one reader task; writes go straight to the socket when
//! it is idle and through a writer task that batches when it is busy
//! ([`sink`]). A worker also batches the items of one stream that are ready
//! together, so a fast stream costs one syscall per batch, not per item.

mod client;
pub(crate) mod frame;
mod handshake;
mod server;
mod sink;
#[cfg(test)]
mod tests;

pub use client::TcpClient;
pub use server::TcpServer;
pub(crate) use server::warn_if_exposed;

use bytes::BytesMut;
use frame::{Decoded, FrameDecoder, FrameError};
use std::io;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// TCP keep-alive probes: a peer that vanished without closing the
/// connection (host lost, network partition) is noticed within about
/// `IDLE + INTERVAL * RETRIES` = 25 s, and its streams fail with
/// `Disconnected` instead of waiting forever.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const KEEPALIVE_RETRIES: u32 = 3;

/// Listen-queue length of the request-plane listeners: connections the
/// kernel has completed and the accept loop not yet taken. Under a flood of
/// connects tokio's default (1024) overflows, and the kernel then drops new
/// SYNs, a legitimate caller's among them, each costing its sender a 1 s
/// retransmission (`tests/flood.rs` saw it). 4096 is Linux's default
/// `net.core.somaxconn`, which caps the queue anyway.
const LISTEN_BACKLOG: u32 = 4096;

/// A listener on `host:port` (the first address `host` resolves to that can
/// be bound) with [`LISTEN_BACKLOG`], for the TCP and HTTP/2 planes.
pub(crate) async fn listen(host: &str, port: u16) -> io::Result<TcpListener> {
    let mut last_error = None;
    for address in tokio::net::lookup_host((host, port)).await? {
        let socket = if address.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        // As tokio's own `TcpListener::bind` does: a restarted worker can
        // take its port back while old connections linger in TIME_WAIT.
        socket.set_reuseaddr(true)?;
        match socket.bind(address) {
            Ok(()) => return socket.listen(LISTEN_BACKLOG),
            Err(error) => last_error = Some(error),
        }
    }
    Err(last_error
        .unwrap_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("{host} resolves to no address"))))
}

/// Sets the options every request-plane socket needs: no Nagle delay (we
/// batch writes ourselves) and keep-alive probes.
fn tune_socket(socket: &TcpStream) {
    if let Err(error) = socket.set_nodelay(true) {
        tracing::debug!(%error, "could not set TCP_NODELAY");
    }
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_RETRIES);
    if let Err(error) = socket2::SockRef::from(socket).set_tcp_keepalive(&keepalive) {
        tracing::debug!(%error, "could not enable TCP keep-alive");
    }
}

/// Why a connection's read loop stopped.
#[derive(Debug, thiserror::Error)]
enum ReadError {
    #[error("connection closed by the peer")]
    Closed,
    #[error("read failed")]
    Io(#[from] io::Error),
    #[error("corrupt frame")]
    Corrupt(#[from] FrameError),
}

/// The next frame already read into `buf`, if there is one. The read loops
/// take these first and wait on the socket (with their shutdown checks
/// beside it) only when none is left: a burst of frames read in one go is
/// then handled without arming those checks once per frame.
fn buffered_frame(buf: &mut BytesMut, decoder: &mut FrameDecoder) -> Result<Option<Decoded>, ReadError> {
    Ok(decoder.decode(buf)?)
}

/// Reads the next frame (or oversized-frame notice) from `socket`.
async fn read_frame<R: AsyncRead + Unpin + ?Sized>(
    socket: &mut R,
    buf: &mut BytesMut,
    decoder: &mut FrameDecoder,
) -> Result<Decoded, ReadError> {
    loop {
        if let Some(decoded) = decoder.decode(buf)? {
            return Ok(decoded);
        }
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(64 * 1024);
        }
        if socket.read_buf(buf).await? == 0 {
            return Err(ReadError::Closed);
        }
    }
}
