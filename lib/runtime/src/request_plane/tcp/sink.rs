//! The write side of a connection. A frame goes straight to the socket when
//! the connection is idle — no hop to another task on the latency path — and
//! queues for the connection's writer task when the socket is busy, so that a
//! busy connection sends everything queued in one write.
//!
//! Order is kept: a direct write happens only when nothing is queued and the
//! writer task is not mid-write. Over TLS every frame goes through the writer
//! task (a TLS session cannot be written from two places).
//!
//! Bounded: a peer that stops reading makes the queue grow; past
//! `DYN_TCP_MAX_SEND_QUEUE` bytes, or when a write makes no progress for
//! `DYN_TCP_WRITE_TIMEOUT`, the connection is declared dead.

use super::frame::Frame;
use crate::metrics::TransportMetrics;
use bytes::BytesMut;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The write side of a connection.
pub(crate) enum Writer {
    /// Plain TCP: written directly when idle.
    Plain(OwnedWriteHalf),
    /// A TLS session: written only by the writer task.
    Stream(Box<dyn AsyncWrite + Send + Unpin>),
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Plain(_) => "Writer::Plain",
            Self::Stream(_) => "Writer::Stream",
        })
    }
}

/// How much a connection may queue and how long a write may stall.
#[derive(Debug, Clone)]
pub(crate) struct SinkLimits {
    pub(crate) max_queue: usize,
    pub(crate) write_timeout: Duration,
    pub(crate) metrics: TransportMetrics,
}

/// A write buffer that grew past this (a large item) is not kept around.
const KEEP_BUFFER_BYTES: usize = 1024 * 1024;

/// Sends frames on one connection. Dropping it lets the writer finish what is
/// queued and close the write side.
#[derive(Debug)]
pub(crate) struct FrameSink {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    /// The socket for direct writes; `None` over TLS, where only the writer task writes.
    socket: Option<Arc<OwnedWriteHalf>>,
    state: Mutex<State>,
    /// Wakes the writer task: bytes were queued, or the sink was dropped.
    wake: Notify,
    limits: SinkLimits,
    /// Cancelled when the connection can no longer send (a write failed,
    /// stalled, or the queue overflowed), so its reader closes it too.
    dead: CancellationToken,
}

#[derive(Debug, Default)]
struct State {
    /// Bytes waiting for the writer task, in order.
    pending: BytesMut,
    /// The writer task owns the socket until it empties `pending`.
    writer_busy: bool,
    /// The sink was dropped: write what is pending, then stop.
    closed: bool,
    /// A write failed; the connection is dead.
    failed: bool,
}

impl FrameSink {
    /// Starts the writer task for `socket` on `tracker`. The writer stops
    /// early (dropping what is queued) when `stop` is cancelled.
    pub(crate) fn new(writer: Writer, limits: SinkLimits, tracker: &TaskTracker, stop: CancellationToken) -> Self {
        let (socket, task_writer) = match writer {
            Writer::Plain(socket) => {
                let socket = Arc::new(socket);
                (Some(socket.clone()), TaskWriter::Plain(socket))
            }
            Writer::Stream(stream) => (None, TaskWriter::Stream(stream)),
        };
        let shared = Arc::new(Shared {
            socket,
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            limits,
            dead: CancellationToken::new(),
        });
        tracker.spawn(write_queued(shared.clone(), task_writer, stop));
        Self { shared }
    }

    /// Cancelled once the connection can no longer send.
    pub(crate) fn dead(&self) -> &CancellationToken {
        &self.shared.dead
    }

    /// Sends one frame; false when the connection can no longer send.
    pub(crate) fn send(&self, frame: &Frame) -> bool {
        let mut buf = BytesMut::new();
        frame.encode(&mut buf);
        self.send_encoded(&buf)
    }

    /// Sends already-encoded frames; false when the connection can no longer send.
    pub(crate) fn send_encoded(&self, bytes: &[u8]) -> bool {
        let mut state = self.shared.lock();
        if state.closed || state.failed {
            return false;
        }
        let direct = self.shared.socket.as_ref().filter(|_| !state.writer_busy);
        let written = match direct.map(|socket| socket.try_write(bytes)) {
            None => 0,
            Some(Ok(n)) => n,
            Some(Err(error)) if error.kind() == io::ErrorKind::WouldBlock => 0,
            Some(Err(error)) => {
                tracing::debug!(%error, "request plane write failed");
                self.shared.fail(&mut state);
                return false;
            }
        };
        if written < bytes.len() {
            let rest = bytes.len() - written;
            if state.pending.len() + rest > self.shared.limits.max_queue {
                tracing::warn!(
                    queued = state.pending.len() + rest,
                    limit = self.shared.limits.max_queue,
                    "closing a request-plane connection whose peer does not read (DYN_TCP_MAX_SEND_QUEUE)"
                );
                self.shared.limits.metrics.refused("send_queue");
                self.shared.fail(&mut state);
                return false;
            }
            state.pending.extend_from_slice(&bytes[written..]);
            state.writer_busy = true;
            self.shared.wake.notify_one();
        }
        true
    }
}

impl Drop for FrameSink {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.wake.notify_one();
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is a few flags and a buffer, each updated in one step.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks the connection dead: nothing more is sent, the reader closes it.
    fn fail(&self, state: &mut State) {
        state.failed = true;
        state.pending = BytesMut::new();
        self.dead.cancel();
        self.wake.notify_one();
    }
}

/// What the writer task writes to.
enum TaskWriter {
    Plain(Arc<OwnedWriteHalf>),
    Stream(Box<dyn AsyncWrite + Send + Unpin>),
}

impl TaskWriter {
    /// Writes all of `bytes`; each write must make progress within `deadline`.
    async fn write_all(&mut self, mut bytes: &[u8], deadline: Duration) -> io::Result<()> {
        let stalled = || {
            io::Error::new(
                io::ErrorKind::TimedOut,
                "write made no progress (DYN_TCP_WRITE_TIMEOUT)",
            )
        };
        while !bytes.is_empty() {
            let n = match self {
                Self::Plain(socket) => {
                    tokio::time::timeout(deadline, socket.writable())
                        .await
                        .map_err(|_| stalled())??;
                    match socket.try_write(bytes) {
                        Ok(n) => n,
                        Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
                        Err(error) => return Err(error),
                    }
                }
                Self::Stream(stream) => tokio::time::timeout(deadline, stream.write(bytes))
                    .await
                    .map_err(|_| stalled())??,
            };
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            bytes = &bytes[n..];
        }
        if let Self::Stream(stream) = self {
            tokio::time::timeout(deadline, stream.flush())
                .await
                .map_err(|_| stalled())??;
        }
        Ok(())
    }

    /// Closes the write side (a TLS close_notify), best effort.
    async fn shutdown(&mut self, deadline: Duration) {
        if let Self::Stream(stream) = self {
            let _ = tokio::time::timeout(deadline, stream.shutdown()).await;
        }
    }
}

/// The writer task: writes whatever senders queued while the socket was busy.
async fn write_queued(shared: Arc<Shared>, mut writer: TaskWriter, stop: CancellationToken) {
    let deadline = shared.limits.write_timeout;
    let mut buf = BytesMut::new();
    loop {
        let closed = {
            let mut state = shared.lock();
            if state.pending.is_empty() || state.failed {
                state.writer_busy = false;
                if state.failed {
                    return;
                }
            } else {
                std::mem::swap(&mut buf, &mut state.pending);
            }
            state.closed && buf.is_empty()
        };
        if closed {
            writer.shutdown(deadline).await;
            return;
        }
        if buf.is_empty() {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = shared.wake.notified() => continue,
            }
        }
        let result = tokio::select! {
            _ = stop.cancelled() => return,
            result = writer.write_all(&buf, deadline) => result,
        };
        if let Err(error) = result {
            if error.kind() == io::ErrorKind::TimedOut {
                tracing::warn!(timeout = ?deadline, "closing a request-plane connection whose peer stopped reading");
                shared.limits.metrics.refused("write_timeout");
            } else {
                tracing::debug!(%error, "request plane write failed");
            }
            shared.fail(&mut shared.lock());
            return;
        }
        buf.clear();
        if buf.capacity() > KEEP_BUFFER_BYTES {
            buf = BytesMut::new();
        }
    }
}
