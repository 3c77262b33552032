//! The write side of a connection. A frame goes straight to the socket when
//! the connection is idle — no hop to another task on the latency path — and
//! queues for the connection's writer task when the socket is busy, so that a
//! busy connection sends everything queued in one write.
//!
//! Order is kept: a direct write happens only when nothing is queued and the
//! writer task is not mid-write.

use super::frame::Frame;
use bytes::BytesMut;
use std::io;
use std::sync::{Arc, Mutex};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

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
    socket: OwnedWriteHalf,
    state: Mutex<State>,
    /// Wakes the writer task: bytes were queued, or the sink was dropped.
    wake: Notify,
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
    pub(crate) fn new(socket: OwnedWriteHalf, tracker: &TaskTracker, stop: CancellationToken) -> Self {
        let shared = Arc::new(Shared {
            socket,
            state: Mutex::new(State::default()),
            wake: Notify::new(),
        });
        tracker.spawn(write_queued(shared.clone(), stop));
        Self { shared }
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
        if state.writer_busy {
            state.pending.extend_from_slice(bytes);
            return true;
        }
        let written = match self.shared.socket.try_write(bytes) {
            Ok(n) => n,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => 0,
            Err(error) => {
                tracing::debug!(%error, "request plane write failed");
                state.failed = true;
                self.shared.wake.notify_one();
                return false;
            }
        };
        if written < bytes.len() {
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
}

/// The writer task: writes whatever senders queued while the socket was busy.
async fn write_queued(shared: Arc<Shared>, stop: CancellationToken) {
    let mut buf = BytesMut::new();
    loop {
        {
            let mut state = shared.lock();
            if state.pending.is_empty() || state.failed {
                state.writer_busy = false;
                if state.closed || state.failed {
                    return;
                }
            } else {
                std::mem::swap(&mut buf, &mut state.pending);
            }
        }
        if buf.is_empty() {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = shared.wake.notified() => continue,
            }
        }
        let result = tokio::select! {
            _ = stop.cancelled() => return,
            result = write_all(&shared.socket, &buf) => result,
        };
        if let Err(error) = result {
            tracing::debug!(%error, "request plane write failed");
            shared.lock().failed = true;
            return;
        }
        buf.clear();
        if buf.capacity() > KEEP_BUFFER_BYTES {
            buf = BytesMut::new();
        }
    }
}

async fn write_all(socket: &OwnedWriteHalf, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        socket.writable().await?;
        match socket.try_write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
            Err(error) => return Err(error),
        }
    }
    Ok(())
}
