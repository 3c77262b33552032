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

/// Items a handler may produce ahead of the wire. The generator is still
/// asked for one item at a time; this only lets it run a few items ahead
/// of the transport instead of paying a thread hand-off per item (a
/// buffer of 1 halves the streamed rate, docs/performance.md).
const RESPONSE_BUFFER: usize = 16;

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

#[async_trait::async_trait]
impl AsyncEngine<Value, Value> for PyEngine {
    async fn generate(&self, request: Context<Value>) -> Result<ResponseStream<Value>, RequestError> {
        let (data, controller) = request.into_parts();
        let (sender, receiver) = mpsc::channel::<Item>(RESPONSE_BUFFER);
        let task = Arc::new(Task::default());
        let (callables, bridge) = (self.callables.clone(), self.bridge.clone());
        let started = task.clone();
        self.bridge.post(Box::new(move |py| {
            if let Err(error) = start(py, &callables, &bridge, data, controller, sender.clone(), &started) {
                // Cannot fail for want of room: nothing was sent yet.
                let message = format!("cannot start the Python handler: {error}");
                let _ = sender.try_send(Err(RequestError::engine(message)));
            }
        }));
        Ok(Box::pin(Responses {
            receiver,
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
    sender: mpsc::Sender<Item>,
    task: &Arc<Task>,
) -> PyResult<()> {
    let request = pythonize::pythonize(py, &data)?;
    let context = PyContext {
        controller,
        bridge: bridge.clone(),
    };
    let sink = ResponseSink {
        sender: Mutex::new(Some(sender)),
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
    receiver: mpsc::Receiver<Item>,
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
        self.receiver.poll_recv(cx)
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
    /// `None` once the handler ended (`finish` or `fail`).
    sender: Mutex<Option<mpsc::Sender<Item>>>,
    task: Arc<Task>,
    bridge: Bridge,
}

impl ResponseSink {
    fn take(&self) -> Option<mpsc::Sender<Item>> {
        self.task.finished.store(true, Ordering::Release);
        self.sender.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

#[pymethods]
impl ResponseSink {
    /// Sends one item. Returns None when it was queued, or an awaitable to
    /// await before producing the next item when the queue is full. Raises
    /// `Cancelled` when nobody reads the response any more, and `EngineError`
    /// when the item is not JSON-like.
    fn send<'py>(&self, py: Python<'py>, item: &Bound<'py, PyAny>) -> PyResult<Option<Bound<'py, PyAny>>> {
        let value: Value = pythonize::depythonize(item)
            .map_err(|e| {
                Error::from(RequestError::engine(format!(
                    "the handler yielded a {} that is not JSON-like: {e}",
                    item.get_type().name().map(|n| n.to_string()).unwrap_or_default()
                )))
            })
            .py_err(py)?;
        let sender = self.sender.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let Some(sender) = sender else {
            return Err(Error::cancelled("the request has already ended").into_pyerr(py));
        };
        match sender.try_send(Ok(value)) {
            Ok(()) => Ok(None),
            Err(mpsc::error::TrySendError::Full(item)) => self
                .bridge
                .awaitable(py, async move {
                    sender
                        .send(item)
                        .await
                        .map_err(|_| Error::cancelled("the caller stopped reading the response"))
                })
                .map(Some),
            Err(mpsc::error::TrySendError::Closed(_)) => {
                Err(Error::cancelled("the caller stopped reading the response").into_pyerr(py))
            }
        }
    }

    /// The handler ended normally.
    fn finish(&self) {
        self.take();
    }

    /// The handler raised: `kind` is an error kind's label (`invalid`,
    /// `shutting_down`, …; see `switchyard.errors`), sent as the last item.
    fn fail(&self, kind: &str, message: String) {
        if let Some(sender) = self.take() {
            let error = request_error(kind, message);
            tokio().spawn(async move {
                // Fails only when nobody reads the response any more.
                let _ = sender.send(Err(error)).await;
            });
        }
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
