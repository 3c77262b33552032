//! The write side of a connection. A frame sent [`Timing::Now`] goes straight
//! to the socket when the connection is idle — no hop to another task on the
//! latency path. Otherwise it queues for the connection's writer task, which
//! sends everything queued in one write: frames that arrive while the socket
//! is busy (being written by another thread, or full), and frames sent
//! [`Timing::Together`], for which the writer first lets the other tasks that
//! are ready run, so that the frames of many streams leave in one write
//! instead of one system call each.
//!
//! Order is kept: one writer at a time owns the socket, and a direct write
//! happens only when nothing is queued and nobody owns it. Over TLS every
//! frame goes through the writer task (a TLS session cannot be written from
//! two places).
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

/// When a frame should leave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Timing {
    /// At once: written directly when the socket is idle. For a connection
    /// with one request in flight, where nothing could share the write.
    Now,
    /// With the frames other streams send in the same turn of the scheduler:
    /// one write for all of them, a turn later. For a busy connection.
    Together,
}

impl Timing {
    /// At once for a stream alone on its connection, together when `others`
    /// streams are open beside it.
    pub(crate) fn with_others(others: usize) -> Self {
        if others == 0 { Self::Now } else { Self::Together }
    }
}

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
    /// Something in `pending` was sent [`Timing::Now`]: the writer does not
    /// wait a turn for more.
    urgent: bool,
    /// Who may write to the socket now.
    owner: Owner,
    /// The sink was dropped: write what is pending, then stop.
    closed: bool,
    /// A write failed; the connection is dead.
    failed: bool,
}

/// Who writes to the socket. Whoever does writes everything queued before
/// giving it up, which is what keeps frames in order.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Owner {
    /// Nobody: the next frame sent [`Timing::Now`] is written directly.
    #[default]
    Nobody,
    /// A sender is writing its frame directly (outside the lock); frames
    /// sent meanwhile queue, and it hands them to the writer task.
    Direct,
    /// The writer task, until `pending` is empty.
    Task,
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
    pub(crate) fn send(&self, frame: &Frame, timing: Timing) -> bool {
        let mut buf = BytesMut::new();
        frame.encode(&mut buf);
        self.send_encoded(&buf, timing)
    }

    /// Sends already-encoded frames; false when the connection can no longer send.
    pub(crate) fn send_encoded(&self, bytes: &[u8], timing: Timing) -> bool {
        let mut state = self.shared.lock();
        if state.closed || state.failed {
            return false;
        }
        let direct = self
            .shared
            .socket
            .as_ref()
            .filter(|_| timing == Timing::Now && state.owner == Owner::Nobody);
        let Some(socket) = direct else {
            return self.shared.queue(&mut state, bytes, timing);
        };
        // Written outside the lock: a sender on another thread queues its
        // frame meanwhile instead of waiting for this system call.
        state.owner = Owner::Direct;
        drop(state);
        let written = socket.try_write(bytes);
        let mut state = self.shared.lock();
        state.owner = Owner::Nobody;
        let written = match written {
            Ok(n) => n,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => 0,
            Err(error) => {
                tracing::debug!(%error, "request plane write failed");
                self.shared.fail(&mut state);
                return false;
            }
        };
        if written < bytes.len() {
            // The unwritten rest goes before whatever was queued meanwhile.
            let queued_meanwhile = std::mem::take(&mut state.pending);
            state.pending.extend_from_slice(&bytes[written..]);
            if !self.shared.queue(&mut state, &queued_meanwhile, Timing::Now) {
                return false;
            }
        } else if !state.pending.is_empty() {
            state.owner = Owner::Task;
            state.urgent = true;
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

    /// Queues `bytes` for the writer task, waking it unless a direct writer
    /// owns the socket (which hands the queue over when it is done).
    fn queue(&self, state: &mut State, bytes: &[u8], timing: Timing) -> bool {
        if state.pending.len() + bytes.len() > self.limits.max_queue {
            tracing::warn!(
                queued = state.pending.len() + bytes.len(),
                limit = self.limits.max_queue,
                "closing a request-plane connection whose peer does not read (DYN_TCP_MAX_SEND_QUEUE)"
            );
            self.limits.metrics.refused("send_queue");
            self.fail(state);
            return false;
        }
        state.pending.extend_from_slice(bytes);
        state.urgent |= timing == Timing::Now;
        if state.owner == Owner::Nobody {
            state.owner = Owner::Task;
            self.wake.notify_one();
        }
        true
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

/// The writer task: writes whatever senders queued while the socket was busy
/// or sent [`Timing::Together`].
async fn write_queued(shared: Arc<Shared>, mut writer: TaskWriter, stop: CancellationToken) {
    let deadline = shared.limits.write_timeout;
    let mut buf = BytesMut::new();
    // Whether the frames taken next were queued while the task was idle.
    let mut woken = false;
    loop {
        let (closed, wait_a_turn) = {
            let mut state = shared.lock();
            if state.failed {
                return;
            }
            let ours = state.owner == Owner::Task;
            let wait_a_turn = ours && woken && !state.urgent && !state.pending.is_empty();
            if ours && !wait_a_turn {
                if state.pending.is_empty() {
                    state.owner = Owner::Nobody;
                } else {
                    std::mem::swap(&mut buf, &mut state.pending);
                    state.urgent = false;
                }
            }
            // Dropped senders cannot be writing directly, so a closed sink
            // owned by nobody has nothing more coming.
            (
                state.closed && buf.is_empty() && state.owner == Owner::Nobody,
                wait_a_turn,
            )
        };
        if closed {
            writer.shutdown(deadline).await;
            return;
        }
        if wait_a_turn {
            // Let the tasks that are ready run first: what they send joins this write.
            woken = false;
            tokio::task::yield_now().await;
            continue;
        }
        if buf.is_empty() {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = shared.wake.notified() => {
                    woken = true;
                    continue;
                }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request_plane::tcp::frame::FrameType;
    use bytes::Bytes;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    /// Keeps each write it is given, as one entry.
    #[derive(Clone, Default)]
    struct Writes(Arc<Mutex<Vec<Vec<u8>>>>);

    impl AsyncWrite for Writes {
        fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            self.0.lock().unwrap().push(buf.to_vec());
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn sink(writes: &Writes) -> FrameSink {
        let limits = SinkLimits {
            max_queue: 1 << 20,
            write_timeout: Duration::from_secs(5),
            metrics: TransportMetrics::unregistered(),
        };
        let writer = Writer::Stream(Box::new(writes.clone()));
        FrameSink::new(writer, limits, &TaskTracker::new(), CancellationToken::new())
    }

    fn frame(stream_id: u64) -> Frame {
        Frame::new(FrameType::Data, stream_id, Bytes::from_static(b"item"))
    }

    /// On one worker thread, a task woken by a send runs next (tokio's LIFO
    /// slot), ahead of the tasks already waiting. Without its turn of
    /// waiting, the writer would send the first stream's frame alone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn frames_sent_together_by_tasks_ready_in_one_turn_leave_in_one_write() {
        let writes = Writes::default();
        let sink = Arc::new(sink(&writes));
        let senders = tokio::spawn({
            let sink = sink.clone();
            async move {
                let tasks: Vec<_> = (1..=10)
                    .map(|id| {
                        let sink = sink.clone();
                        tokio::spawn(async move { assert!(sink.send(&frame(id), Timing::Together)) })
                    })
                    .collect();
                for task in tasks {
                    task.await.unwrap();
                }
            }
        });
        senders.await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let mut expected = BytesMut::new();
        (1..=10).for_each(|id| frame(id).encode(&mut expected));
        while writes.0.lock().unwrap().concat().len() < expected.len() {
            assert!(tokio::time::Instant::now() < deadline, "the frames were never written");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let writes = writes.0.lock().unwrap().clone();
        assert_eq!(
            writes.len(),
            1,
            "ten frames sent in one turn took {} writes",
            writes.len()
        );
        // Every frame, each whole; the order is the order the tasks ran in.
        let mut ids: Vec<u64> = writes[0]
            .chunks(expected.len() / 10)
            .map(|chunk| u64::from_be_bytes(chunk[5..13].try_into().unwrap()))
            .collect();
        ids.sort_unstable();
        assert_eq!(ids, (1..=10).collect::<Vec<_>>());
    }
}
