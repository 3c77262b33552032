//! Serving an endpoint with a Python handler.
//!
//! [`PyEngine`] is an ordinary [`AsyncEngine`] over JSON-like values. For
//! each request it posts one job to the event loop, which starts
//! `switchyard._serve.drive(handler, request, context, sink)` as an asyncio
//! task and returns at once with the receiving end of a small bounded
//! channel. The driver pulls the handler's generator one item at a time
//! and hands each item to the [`ResponseSink`]; when the channel is full the
//! driver awaits room, so the generator is suspended (backpressure).
//!
//! Items cross in batches: the sink collects what the handler yields while
//! it runs and hands the batch to tokio when the handler next gives the
//! loop a turn (a `call_soon` callback), when the batch is full, or when
//! the handler ends. So a burst of items costs one thread wake-up, not one
//! each, and an item the handler yields before awaiting its next piece of
//! work leaves at once.
//!
//! Cancellation: when the request plane drops the response stream (the
//! caller went away, or the request was killed) a job cancels the task,
//! and the handler sees `asyncio.CancelledError` at its next `await`.

use crate::bridge::{Bridge, tokio};
use crate::errors::{Error, IntoPyResult, request_error};
use crate::runtime::PyEndpoint;
use futures::Stream;
use pyo3::prelude::*;
use serde_json::Value;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use switchyard_runtime::engine::{AsyncEngine, Context, Controller, ResponseStream};
use switchyard_runtime::error::{ErrorKind, RequestError};
use tokio::sync::mpsc;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// Batches that may wait between the handler and the wire. The generator
/// is still asked for one item at a time; this only lets it run a little
/// ahead of the transport instead of paying a thread hand-off per item.
const RESPONSE_BUFFER: usize = 4;
/// Items per batch: at most `RESPONSE_BUFFER * BATCH` items wait (bounded
/// memory for a slow caller), and a long burst still crosses in chunks.
const BATCH: usize = 64;

/// What `serve_endpoint` was asked for besides the handler.
#[derive(Debug)]
pub(crate) struct ServeOptions<'py> {
    pub(crate) graceful_shutdown: bool,
    pub(crate) metrics_labels: Vec<(String, String)>,
    pub(crate) health_check_payload: Option<Bound<'py, PyAny>>,
    pub(crate) load_reports: bool,
}

/// Labels the metrics hierarchy sets itself; `metrics_labels` must not replace them.
const RESERVED_LABELS: [&str; 4] = ["dynamo_namespace", "dynamo_component", "dynamo_endpoint", "worker_id"];

pub(crate) fn serve_endpoint<'py>(
    endpoint: &PyEndpoint,
    py: Python<'py>,
    handler: Bound<'py, PyAny>,
    options: ServeOptions<'py>,
) -> PyResult<Bound<'py, PyAny>> {
    if !handler.is_callable() {
        return Err(Error::invalid(format!(
            "serve_endpoint needs a handler callable as handler(request, context); got {}",
            handler.get_type().name()?
        ))
        .into_pyerr(py));
    }
    let drive = py.import("switchyard._serve")?.getattr("drive")?;
    let mut builder = endpoint.endpoint.endpoint_builder();
    for (label, value) in options.metrics_labels {
        if RESERVED_LABELS.contains(&label.as_str()) {
            return Err(Error::invalid(format!(
                "metrics_labels: {label:?} is set by the runtime itself; choose another label name"
            ))
            .into_pyerr(py));
        }
        builder = builder.metrics_label(label, value);
    }
    if let Some(payload) = options.health_check_payload {
        let payload: Value = pythonize::depythonize(&payload)
            .map_err(|e| Error::invalid(format!("health_check_payload is not JSON-like: {e}")))
            .py_err(py)?;
        builder = builder.health_check_payload(payload);
    }
    if options.load_reports {
        let load = endpoint.load.clone();
        builder = builder.publish_load_with(move || *load.lock().unwrap_or_else(|p| p.into_inner()));
    }
    let draining = endpoint.endpoint.drt().runtime().endpoint_token().clone();
    let engine = PyEngine {
        bridge: endpoint.bridge.clone(),
        callables: Arc::new(Callables {
            handler: handler.unbind(),
            drive: drive.unbind(),
        }),
        // Without graceful shutdown, requests in flight end (as migratable)
        // as soon as draining starts, instead of finishing.
        abandon_on_drain: (!options.graceful_shutdown).then_some(draining),
    };
    let builder = builder.handler(engine);
    endpoint.bridge.awaitable(py, async move {
        let serving = builder.spawn().await.map_err(|e| Error::setup(&e))?;
        serving.wait().await;
        Ok(())
    })
}

/// The Python objects every request needs. Behind an `Arc` because a
/// `Py` cannot be cloned without the GIL, and tokio threads never take it.
#[derive(Debug)]
struct Callables {
    handler: Py<PyAny>,
    /// `switchyard._serve.drive`.
    drive: Py<PyAny>,
}

#[derive(Debug)]
struct PyEngine {
    bridge: Bridge,
    callables: Arc<Callables>,
    abandon_on_drain: Option<CancellationToken>,
}

/// The asyncio task running one request, and whether it has finished, so
/// a dropped stream cancels only a task that is still going.
#[derive(Debug, Default)]
struct Task {
    task: Mutex<Option<Py<PyAny>>>,
    finished: AtomicBool,
}

type Item = Result<Value, RequestError>;
/// What crosses the channel: a batch of items (an error is always last).
type Batch = Vec<Item>;

#[async_trait::async_trait]
impl AsyncEngine<Value, Value> for PyEngine {
    async fn generate(&self, request: Context<Value>) -> Result<ResponseStream<Value>, RequestError> {
        let (data, controller) = request.into_parts();
        let (sender, receiver) = mpsc::channel::<Batch>(RESPONSE_BUFFER);
        let task = Arc::new(Task::default());
        let (callables, bridge) = (self.callables.clone(), self.bridge.clone());
        let started = task.clone();
        self.bridge.post(Box::new(move |py| {
            if let Err(error) = start(py, &callables, &bridge, data, controller, sender.clone(), &started) {
                // Cannot fail for want of room: nothing was sent yet.
                let message = format!("cannot start the Python handler: {error}");
                let _ = sender.try_send(vec![Err(RequestError::engine(message))]);
            }
        }));
        Ok(Box::pin(Responses {
            receiver,
            batch: std::collections::VecDeque::new(),
            task,
            bridge: self.bridge.clone(),
            draining: self
                .abandon_on_drain
                .clone()
                .map(|token| Box::pin(token.cancelled_owned())),
        }))
    }
}

/// On the loop's thread: the request as Python values, and the driver task.
fn start(
    py: Python<'_>,
    callables: &Callables,
    bridge: &Bridge,
    data: Value,
    controller: Controller,
    sender: mpsc::Sender<Batch>,
    task: &Arc<Task>,
) -> PyResult<()> {
    let request = pythonize::pythonize(py, &data)?;
    let context = PyContext {
        controller,
        bridge: bridge.clone(),
    };
    let sink = ResponseSink {
        state: Arc::new(Mutex::new(SinkState {
            sender: Some(sender),
            pending: Vec::new(),
            flush_scheduled: false,
        })),
        task: task.clone(),
        bridge: bridge.clone(),
    };
    let coroutine = callables
        .drive
        .bind(py)
        .call1((callables.handler.bind(py), request, context, sink))?;
    let created = bridge.event_loop(py).call_method1("create_task", (coroutine,))?;
    *task.task.lock().unwrap_or_else(|p| p.into_inner()) = Some(created.unbind());
    Ok(())
}

/// The response stream the request plane polls.
struct Responses {
    receiver: mpsc::Receiver<Batch>,
    /// The rest of the batch being handed out.
    batch: std::collections::VecDeque<Item>,
    task: Arc<Task>,
    bridge: Bridge,
    /// Fires when the worker starts draining, for endpoints served with
    /// `graceful_shutdown=False`.
    draining: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
}

impl Stream for Responses {
    type Item = Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Item>> {
        if let Some(draining) = self.draining.as_mut()
            && draining.as_mut().poll(cx).is_ready()
        {
            self.draining = None;
            self.receiver.close();
            return Poll::Ready(Some(Err(RequestError::new(
                ErrorKind::ShuttingDown,
                "the worker is shutting down and its endpoint does not drain (graceful_shutdown=False)",
            ))));
        }
        loop {
            if let Some(item) = self.batch.pop_front() {
                return Poll::Ready(Some(item));
            }
            match self.receiver.poll_recv(cx) {
                Poll::Ready(Some(batch)) => self.batch = batch.into(),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl Drop for Responses {
    fn drop(&mut self) {
        if self.task.finished.load(Ordering::Acquire) {
            return;
        }
        let task = self.task.clone();
        self.bridge.post(Box::new(move |py| {
            let running = task.task.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(running) = running
                && let Err(error) = running.bind(py).call_method0("cancel")
            {
                error.write_unraisable(py, None);
            }
        }));
    }
}

/// Where the driver puts the handler's items (Python-side object).
#[pyclass(module = "switchyard._core", frozen)]
#[derive(Debug)]
pub(crate) struct ResponseSink {
    /// Shared with the tokio task that waits for room when the way is full.
    state: Arc<Mutex<SinkState>>,
    task: Arc<Task>,
    bridge: Bridge,
}

#[derive(Debug)]
struct SinkState {
    /// `None` once the handler ended (`finish` or `fail`).
    sender: Option<mpsc::Sender<Batch>>,
    /// Items yielded and not yet handed to tokio, in order.
    pending: Batch,
    /// A `flush` callback is queued on the loop.
    flush_scheduled: bool,
}

impl SinkState {
    /// Hands `pending` to tokio if there is room. False when the channel is
    /// full (the items stay pending) or closed (they are dropped: nobody reads).
    fn try_flush(&mut self) -> bool {
        let Some(sender) = &self.sender else { return true };
        if self.pending.is_empty() {
            return true;
        }
        match sender.try_send(std::mem::take(&mut self.pending)) {
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => true,
            Err(mpsc::error::TrySendError::Full(batch)) => {
                self.pending = batch;
                false
            }
        }
    }
}

impl ResponseSink {
    fn lock(&self) -> std::sync::MutexGuard<'_, SinkState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ends the stream with `last` after whatever is pending: at once when
    /// there is room, else from a tokio task that waits for room.
    fn end(&self, last: Option<RequestError>) {
        self.task.finished.store(true, Ordering::Release);
        let (sender, mut batch) = {
            let mut state = self.lock();
            let Some(sender) = state.sender.take() else { return };
            (sender, std::mem::take(&mut state.pending))
        };
        batch.extend(last.map(Err));
        if batch.is_empty() {
            return;
        }
        if let Err(mpsc::error::TrySendError::Full(batch)) = sender.try_send(batch) {
            tokio().spawn(async move {
                // Fails only when nobody reads the response any more.
                let _ = sender.send(batch).await;
            });
        }
    }
}

#[pymethods]
impl ResponseSink {
    /// Sends one item. Returns None when it was taken, or an awaitable to
    /// await before producing the next item when the way to the wire is
    /// full. Raises `Cancelled` when nobody reads the response any more,
    /// and `EngineError` when the item is not JSON-like.
    fn send<'py>(slf: &Bound<'py, Self>, item: &Bound<'py, PyAny>) -> PyResult<Option<Bound<'py, PyAny>>> {
        let py = slf.py();
        let value: Value = pythonize::depythonize(item)
            .map_err(|e| {
                Error::from(RequestError::engine(format!(
                    "the handler yielded a {} that is not JSON-like: {e}",
                    item.get_type().name().map(|n| n.to_string()).unwrap_or_default()
                )))
            })
            .py_err(py)?;
        let this = slf.get();
        let mut state = this.lock();
        let Some(sender) = state.sender.clone() else {
            return Err(Error::cancelled("the request has already ended").into_pyerr(py));
        };
        if sender.is_closed() {
            return Err(Error::cancelled("the caller stopped reading the response").into_pyerr(py));
        }
        state.pending.push(Ok(value));
        if state.pending.len() < BATCH {
            if !state.flush_scheduled {
                state.flush_scheduled = true;
                drop(state);
                this.bridge
                    .event_loop(py)
                    .call_method1("call_soon", (slf.getattr("flush")?,))?;
            }
            return Ok(None);
        }
        if state.try_flush() {
            return Ok(None);
        }
        // Full: wait for room, then hand over what is pending by then.
        drop(state);
        let state = this.state.clone();
        this.bridge
            .awaitable(py, async move {
                let permit = sender
                    .reserve()
                    .await
                    .map_err(|_| Error::cancelled("the caller stopped reading the response"))?;
                let batch = std::mem::take(&mut state.lock().unwrap_or_else(|p| p.into_inner()).pending);
                permit.send(batch);
                Ok(())
            })
            .map(Some)
    }

    /// Hands pending items to tokio (queued with `call_soon` by `send`, so
    /// it runs when the handler gives the loop a turn).
    fn flush(&self) {
        let mut state = self.lock();
        state.flush_scheduled = false;
        // When full, the items stay pending: the next `send` (or the end)
        // waits for room and takes them along.
        state.try_flush();
    }

    /// The handler ended normally.
    fn finish(&self) {
        self.end(None);
    }

    /// The handler raised: `kind` is an error kind's label (`invalid`,
    /// `shutting_down`, …; see `switchyard.errors`), sent as the last item.
    fn fail(&self, kind: &str, message: String) {
        self.end(Some(request_error(kind, message)));
    }
}

/// What a handler gets with each request (Dynamo's `Context`).
#[pyclass(name = "Context", module = "switchyard._core", frozen)]
#[derive(Debug)]
pub(crate) struct PyContext {
    controller: Controller,
    bridge: Bridge,
}

#[pymethods]
impl PyContext {
    /// The request id (the same on the caller's side).
    fn id(&self) -> &str {
        self.controller.id()
    }

    /// True once the caller asked to stop, or the request was killed.
    fn is_stopped(&self) -> bool {
        self.controller.is_stopped()
    }

    /// True once the request was killed (the caller went away, or shutdown).
    fn is_killed(&self) -> bool {
        self.controller.is_killed()
    }

    /// Asks for a graceful end of this request (as a caller's `stop` does).
    fn stop_generating(&self) {
        self.controller.stop();
    }

    /// Resolves (to None) when the request is stopped or killed.
    fn async_killed_or_stopped<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let controller = self.controller.clone();
        self.bridge.awaitable(py, async move {
            controller.stopped().await;
            Ok::<_, Error>(())
        })
    }

    fn __repr__(&self) -> String {
        format!("Context(id={:?})", self.controller.id())
    }
}
