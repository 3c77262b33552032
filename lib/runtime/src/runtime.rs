//! [`Runtime`]: the process's tokio handle, its settings, and the two-level
//! shutdown every task hangs off.
//!
//! Shutdown has two steps, so that a worker can leave without dropping work:
//! 1. *drain*: the endpoint token is cancelled; endpoints leave discovery,
//!    refuse new requests and wait for their in-flight streams;
//! 2. *stop*: the root token is cancelled; whatever is still running is
//!    killed (callers get `ShuttingDown`), connections close, discovery
//!    removes this process's registrations.
//!
//! [`Runtime::shutdown`] runs both with the drain deadline
//! (`DYN_WORKER_GRACEFUL_SHUTDOWN_TIMEOUT`) between them.

use crate::config::RuntimeConfig;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// After the root token is cancelled, tasks get this long to notice and end
/// before shutdown stops waiting for them (they are killed streams and
/// closing sockets: each needs a few polls, not seconds).
const STOP_GRACE: Duration = Duration::from_secs(5);

/// The process-wide runtime: cheap to clone, shared by everything.
#[derive(Debug, Clone)]
pub struct Runtime {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: RuntimeConfig,
    /// Cancelled at *stop*: every task of the process ends.
    root: CancellationToken,
    /// Cancelled at *drain* (child of `root`): endpoints stop taking work.
    endpoints: CancellationToken,
    /// Every background task of the runtime, so shutdown can wait for them.
    tasks: TaskTracker,
    /// The endpoints' drain tasks; *drain* is done when these are.
    drains: TaskTracker,
}

impl Runtime {
    /// A runtime on the current tokio runtime (call from inside one).
    pub fn new(config: RuntimeConfig) -> Self {
        let root = CancellationToken::new();
        let endpoints = root.child_token();
        Self {
            inner: Arc::new(Inner {
                config,
                root,
                endpoints,
                tasks: TaskTracker::new(),
                drains: TaskTracker::new(),
            }),
        }
    }

    pub fn config(&self) -> &RuntimeConfig {
        &self.inner.config
    }

    /// Cancelled when the process must stop now.
    pub fn root_token(&self) -> &CancellationToken {
        &self.inner.root
    }

    /// Cancelled when endpoints must stop taking work (drain begins).
    pub fn endpoint_token(&self) -> &CancellationToken {
        &self.inner.endpoints
    }

    pub fn is_shutting_down(&self) -> bool {
        self.inner.endpoints.is_cancelled()
    }

    /// Spawns a background task owned by the runtime. It must end when
    /// [`Runtime::root_token`] is cancelled.
    pub fn spawn<F>(&self, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.inner.tasks.spawn(task)
    }

    pub(crate) fn tracker(&self) -> &TaskTracker {
        &self.inner.tasks
    }

    /// Spawns a drain task (an endpoint's, or a server finishing its
    /// responses); shutdown's drain step waits for all of them, up to
    /// `DYN_WORKER_GRACEFUL_SHUTDOWN_TIMEOUT`.
    pub fn spawn_drain<F>(&self, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.inner.drains.spawn(task)
    }

    /// Graceful shutdown: drain (bounded by the configured deadline), then
    /// stop. Returns whether every in-flight request finished on its own.
    /// Calling it again while it runs, or after, is harmless.
    pub async fn shutdown(&self) -> ShutdownOutcome {
        let deadline = *self.inner.config.graceful_shutdown_timeout();
        self.inner.endpoints.cancel();
        self.inner.drains.close();
        let drained = tokio::time::timeout(deadline, self.inner.drains.wait()).await.is_ok();
        if !drained {
            tracing::warn!(
                ?deadline,
                "drain deadline passed; cancelling the requests still in flight"
            );
        }
        self.stop().await;
        if drained {
            ShutdownOutcome::Drained
        } else {
            ShutdownOutcome::DeadlinePassed
        }
    }

    /// Immediate stop: kill everything still running and wait (briefly) for
    /// the runtime's tasks to end.
    pub async fn stop(&self) {
        self.inner.endpoints.cancel();
        self.inner.root.cancel();
        self.inner.drains.close();
        self.inner.tasks.close();
        let all = async {
            self.inner.drains.wait().await;
            self.inner.tasks.wait().await;
        };
        if tokio::time::timeout(STOP_GRACE, all).await.is_err() {
            tracing::warn!(
                tasks = self.inner.tasks.len(),
                "runtime tasks still running {STOP_GRACE:?} after stop"
            );
        }
    }
}

/// How a graceful shutdown ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownOutcome {
    /// Every in-flight request finished before the deadline.
    Drained,
    /// The deadline passed; the remaining requests were cancelled.
    DeadlinePassed,
}
