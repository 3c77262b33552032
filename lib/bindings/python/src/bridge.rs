//! The one way work crosses between tokio and Python's event loop, built so
//! that **no tokio worker thread ever takes the GIL**.
//!
//! Tokio's side never calls into Python. It queues a job (a closure that
//! needs the GIL) and writes one byte to a socket pair whose read end the
//! event loop watches (`loop.add_reader`); the loop's thread then runs every
//! queued job with the GIL it already holds. Python's side calls into Rust
//! only on its own threads, and never blocks there on tokio.
//!
//! Why not `pyo3_async_runtimes::tokio::future_into_py`: it completes each
//! Python future from the tokio thread that finished the Rust future, which
//! takes the GIL there; a Python handler that holds the GIL then stalls that
//! tokio worker and everything queued behind it (Dynamo's bridge learnt this
//! the hard way). pyo3-async-runtimes still owns the tokio runtime.

use crate::errors::Error;
use pyo3::prelude::*;
use pyo3::types::PyTuple;
use pyo3::{IntoPyObjectExt, PyTraverseError, PyVisit};
use std::future::Future;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tokio::task::AbortHandle;

/// Work for the event loop's thread, run there with the GIL.
pub(crate) type Job = Box<dyn for<'py> FnOnce(Python<'py>) + Send>;

/// The tokio runtime every binding spawns on (pyo3-async-runtimes owns it).
pub(crate) fn tokio() -> &'static tokio::runtime::Runtime {
    pyo3_async_runtimes::tokio::get_runtime()
}

/// A job queue drained on one Python event loop's thread. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Bridge {
    inner: Arc<Inner>,
}

struct Inner {
    /// The loop jobs run on: Python futures are created on it.
    event_loop: Py<PyAny>,
    /// Jobs waiting for the loop. Held only to push or to take the whole
    /// batch, never while a job runs.
    jobs: Mutex<Vec<Job>>,
    /// True while a wake-up byte is in flight, so a burst of jobs costs
    /// one write and one loop wake-up, not one each.
    armed: AtomicBool,
    /// Tokio's end: one byte per wake-up (non-blocking; a full buffer
    /// already means "wake up").
    wake: UnixStream,
    /// The loop's end, watched with `loop.add_reader`.
    woken: UnixStream,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bridge")
            .field("armed", &self.armed)
            .finish_non_exhaustive()
    }
}

impl Bridge {
    /// A bridge to `event_loop`, registered as a reader on it. Call on the
    /// loop's thread.
    pub(crate) fn attach(event_loop: &Bound<'_, PyAny>) -> PyResult<Self> {
        let (wake, woken) = UnixStream::pair()?;
        wake.set_nonblocking(true)?;
        woken.set_nonblocking(true)?;
        let bridge = Self {
            inner: Arc::new(Inner {
                event_loop: event_loop.clone().unbind(),
                jobs: Mutex::new(Vec::new()),
                armed: AtomicBool::new(false),
                wake,
                woken,
            }),
        };
        let runner = Bound::new(event_loop.py(), Runner(bridge.clone()))?;
        event_loop.call_method1("add_reader", (bridge.inner.woken.as_raw_fd(), runner.getattr("run")?))?;
        Ok(bridge)
    }

    /// Stops watching the socket (at shutdown); queued jobs are dropped.
    pub(crate) fn detach(&self, py: Python<'_>) -> PyResult<()> {
        let event_loop = self.inner.event_loop.bind(py);
        if !event_loop.call_method0("is_closed")?.is_truthy()? {
            event_loop.call_method1("remove_reader", (self.inner.woken.as_raw_fd(),))?;
        }
        Ok(())
    }

    pub(crate) fn event_loop<'py>(&self, py: Python<'py>) -> &Bound<'py, PyAny> {
        self.inner.event_loop.bind(py)
    }

    /// Queues `job` for the loop's thread. Safe on any thread; takes no GIL.
    pub(crate) fn post(&self, job: Job) {
        self.inner.jobs.lock().unwrap_or_else(|p| p.into_inner()).push(job);
        if !self.inner.armed.swap(true, Ordering::AcqRel) {
            // WouldBlock means the buffer is full of wake-ups already; any
            // other failure means the loop end is gone (shut down).
            let _ = (&self.inner.wake).write(&[1]);
        }
    }

    /// Runs every queued job (on the loop's thread, with the GIL).
    fn run_pending(&self, py: Python<'_>) {
        let mut sink = [0u8; 256];
        while matches!((&self.inner.woken).read(&mut sink), Ok(n) if n > 0) {}
        // Disarm before taking the batch: a job posted after this point
        // writes a new byte, so it is never left waiting for the next one.
        self.inner.armed.store(false, Ordering::Release);
        let jobs = std::mem::take(&mut *self.inner.jobs.lock().unwrap_or_else(|p| p.into_inner()));
        for job in jobs {
            job(py);
        }
    }

    /// A Python awaitable for `future`, which runs on tokio. Its result (or
    /// error) is handed to Python by a job on the loop; cancelling the
    /// awaitable aborts the tokio task.
    pub(crate) fn awaitable<'py, F, T>(&self, py: Python<'py>, future: F) -> PyResult<Bound<'py, PyAny>>
    where
        F: Future<Output = Result<T, Error>> + Send + 'static,
        T: for<'a> IntoPyObject<'a> + Send + 'static,
    {
        let result = self.event_loop(py).call_method0("create_future")?;
        let target = result.clone().unbind();
        let bridge = self.clone();
        let task = tokio().spawn(async move {
            let outcome = future.await;
            bridge.post(Box::new(move |py| complete(py, target.bind(py), outcome)));
        });
        result.call_method1("add_done_callback", (AbortOnDone(task.abort_handle()),))?;
        Ok(result)
    }
}

/// Sets `future`'s result or exception, unless it was cancelled meanwhile.
fn complete<T>(py: Python<'_>, future: &Bound<'_, PyAny>, outcome: Result<T, Error>)
where
    T: for<'a> IntoPyObject<'a>,
{
    let done = || -> PyResult<()> {
        if future.call_method0("done")?.is_truthy()? {
            return Ok(());
        }
        match outcome {
            Ok(value) => future.call_method1("set_result", (value.into_py_any(py)?,))?,
            Err(error) => future.call_method1("set_exception", (error.into_pyerr(py).into_value(py),))?,
        };
        Ok(())
    };
    if let Err(error) = done() {
        error.write_unraisable(py, Some(future));
    }
}

/// The loop's reader callback.
#[pyclass(module = "switchyard._core", frozen)]
struct Runner(Bridge);

#[pymethods]
impl Runner {
    fn run(&self, py: Python<'_>) {
        self.0.run_pending(py);
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(&self.0.inner.event_loop)
    }
}

/// A future's done callback: aborts the tokio task behind it (a no-op when
/// the task already finished, which is the usual case).
#[pyclass(module = "switchyard._core", frozen)]
struct AbortOnDone(AbortHandle);

#[pymethods]
impl AbortOnDone {
    fn __call__(&self, _future: &Bound<'_, PyAny>) {
        self.0.abort();
    }
}

/// An awaitable that is already complete: what an `__anext__` returns when
/// the next item is already here, without a loop round trip.
#[pyclass(module = "switchyard._core")]
pub(crate) struct Ready(Option<PyResult<Py<PyAny>>>);

impl Ready {
    pub(crate) fn new(value: PyResult<Py<PyAny>>) -> Self {
        Self(Some(value))
    }
}

#[pymethods]
impl Ready {
    fn __await__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&mut self, py: Python<'_>) -> PyResult<()> {
        match self.0.take() {
            Some(Ok(value)) => Err(pyo3::exceptions::PyStopIteration::new_err(
                PyTuple::new(py, [value])?.unbind(),
            )),
            Some(Err(error)) => Err(error),
            None => Err(pyo3::exceptions::PyStopIteration::new_err(())),
        }
    }
}
