//! The TCP request plane (the default): one listener per worker process,
//! persistent connections from callers, and many concurrent request streams
//! multiplexed on each connection, responses coming back on the same
//! connection. Per-stream credit-based flow control keeps one slow consumer
//! from stalling the other streams of its connection. See `docs/protocol.md`.
//!
//! Each connection has one reader task and one writer task; the writer drains
//! its queue into a single `write_all` so a busy connection costs one syscall
//! per batch, not per frame.

mod client;
pub(crate) mod frame;
mod server;
#[cfg(test)]
mod tests;

pub use client::TcpClient;
pub use server::TcpServer;

use bytes::BytesMut;
use frame::{Decoded, Frame, FrameDecoder, FrameError};
use std::io;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Stop adding frames to a write batch beyond this size; large enough to
/// amortise the syscall, small enough to keep latency of the first frame low.
const WRITE_BATCH_BYTES: usize = 256 * 1024;

/// A write buffer that grew past this (a large item) is not kept around.
const KEEP_BUFFER_BYTES: usize = 1024 * 1024;

/// TCP keep-alive probes: a peer that vanished without closing the
/// connection (host lost, network partition) is noticed within about
/// `IDLE + INTERVAL * RETRIES` = 25 s, and its streams fail with
/// `Disconnected` instead of waiting forever.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const KEEPALIVE_RETRIES: u32 = 3;

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

/// Writes every queued frame to `socket`, batching what is already queued,
/// until all senders are gone or `closed` is cancelled; then closes the write side.
async fn write_frames(
    mut socket: OwnedWriteHalf,
    mut frames: mpsc::UnboundedReceiver<Frame>,
    closed: CancellationToken,
) -> io::Result<()> {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    loop {
        let frame = tokio::select! {
            _ = closed.cancelled() => break,
            frame = frames.recv() => match frame {
                Some(frame) => frame,
                None => break,
            },
        };
        frame.encode(&mut buf);
        while buf.len() < WRITE_BATCH_BYTES {
            match frames.try_recv() {
                Ok(frame) => frame.encode(&mut buf),
                Err(_) => break,
            }
        }
        socket.write_all(&buf).await?;
        buf.clear();
        if buf.capacity() > KEEP_BUFFER_BYTES {
            buf = BytesMut::with_capacity(64 * 1024);
        }
    }
    socket.shutdown().await
}

/// Why a connection's read loop stopped.
#[derive(Debug, thiserror::Error)]
enum ReadError {
    #[error("connection closed by the peer")]
    Closed,
    #[error("read failed: {0}")]
    Io(#[from] io::Error),
    #[error("corrupt frame: {0}")]
    Corrupt(#[from] FrameError),
}

/// Reads the next frame (or oversized-frame notice) from `socket`.
async fn read_frame(
    socket: &mut OwnedReadHalf,
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
