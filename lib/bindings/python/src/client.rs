//! Calling an endpoint from Python: a [`PushRouter`] over JSON-like values,
//! and the response stream as a Python async iterator.
//!
//! `__anext__` first looks at the stream on the calling (Python) thread
//! without waiting: an item the transport already holds is returned in an
//! already-complete awaitable, with no hop to tokio and back. Only when
//! nothing is there does it wait on tokio through the [`Bridge`].

use crate::bridge::{Bridge, Ready, tokio};
use crate::errors::{Error, IntoPyResult};
use crate::runtime::PyEndpoint;
use futures::{FutureExt, StreamExt};
use pyo3::prelude::*;
use serde_json::Value;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;
use switchyard_runtime::component::client::Client;
use switchyard_runtime::engine::{Context, Controller, ResponseStream};
use switchyard_runtime::error::{ErrorKind, RequestError};
use switchyard_runtime::routing::RouterMode;
use switchyard_runtime::routing::push_router::PushRouter;

pub(crate) fn client<'py>(endpoint: &PyEndpoint, py: Python<'py>, router_mode: &str) -> PyResult<Bound<'py, PyAny>> {
    let mode = RouterMode::from_str(router_mode)
        .map_err(|e| Error::invalid(format!("router_mode: {e}")))
        .py_err(py)?;
    let (endpoint_handle, bridge) = (endpoint.endpoint.clone(), endpoint.bridge.clone());
    endpoint.bridge.awaitable(py, async move {
        let client = endpoint_handle.client().await.map_err(|e| Error::setup(&e))?;
        let router = PushRouter::from_client(client.clone(), mode).await?;
        Ok(PyClient {
            client,
            router: Arc::new(router),
            bridge,
        })
    })
}

/// Follows an endpoint's instances and sends requests to them (Dynamo's `Client`).
#[pyclass(name = "Client", module = "switchyard._core", frozen)]
#[derive(Debug)]
pub(crate) struct PyClient {
    client: Client,
    router: Arc<PushRouter<Value, Value>>,
    bridge: Bridge,
}

impl PyClient {
    /// Sends `request` with `how` and wraps the stream for Python.
    fn call<'py, F, Fut>(&self, py: Python<'py>, request: &Bound<'py, PyAny>, how: F) -> PyResult<Bound<'py, PyAny>>
    where
        F: FnOnce(Arc<PushRouter<Value, Value>>, Context<Value>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<ResponseStream<Value>, RequestError>> + Send + 'static,
    {
        let value: Value = pythonize::depythonize(request)
            .map_err(|e| Error::invalid(format!("the request is not JSON-like: {e}")))
            .py_err(py)?;
        let controller = Controller::new();
        let context = Context::with_controller(value, controller.clone());
        let (router, bridge) = (self.router.clone(), self.bridge.clone());
        self.bridge.awaitable(py, async move {
            let stream = how(router, context).await?;
            Ok(PyResponseStream {
                stream: Arc::new(tokio::sync::Mutex::new(Some(stream))),
                controller,
                bridge,
            })
        })
    }
}

#[pymethods]
impl PyClient {
    /// The ids of the instances known right now.
    fn instance_ids(&self) -> Vec<u64> {
        self.client.instance_ids()
    }

    /// Waits until at least one instance exists, and returns their ids.
    /// With a timeout (seconds), raises `TimedOut` when none appears in time;
    /// without one, waits until the runtime shuts down.
    #[pyo3(signature = (timeout = None))]
    fn wait_for_instances<'py>(&self, py: Python<'py>, timeout: Option<f64>) -> PyResult<Bound<'py, PyAny>> {
        let limit = match timeout {
            Some(seconds) => Some(
                Duration::try_from_secs_f64(seconds)
                    .map_err(|_| {
                        Error::invalid(format!(
                            "timeout must be a non-negative number of seconds (got {seconds})"
                        ))
                    })
                    .py_err(py)?,
            ),
            None => None,
        };
        let client = self.client.clone();
        self.bridge.awaitable(py, async move {
            let wait = client.wait_for_instances();
            let found = match limit {
                Some(limit) => tokio::time::timeout(limit, wait).await.map_err(|_| {
                    Error::from(RequestError::new(
                        ErrorKind::TimedOut,
                        format!("no instance of {} appeared within {limit:?}", client.endpoint().path()),
                    ))
                })?,
                None => wait.await,
            }
            .map_err(|e| Error::setup(&e))?;
            Ok(found.iter().map(|i| i.instance_id).collect::<Vec<u64>>())
        })
    }

    /// Sends to the instance the client's router mode picks.
    fn generate<'py>(&self, py: Python<'py>, request: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        self.call(
            py,
            request,
            |router, context| async move { router.generate(context).await },
        )
    }

    /// Sends to the next instance in turn.
    fn round_robin<'py>(&self, py: Python<'py>, request: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        self.call(py, request, |router, context| async move {
            router.round_robin(context).await
        })
    }

    /// Sends to a random instance.
    fn random<'py>(&self, py: Python<'py>, request: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        self.call(
            py,
            request,
            |router, context| async move { router.random(context).await },
        )
    }

    /// Sends to the instance `instance_id` (no retry elsewhere).
    fn direct<'py>(
        &self,
        py: Python<'py>,
        request: &Bound<'py, PyAny>,
        instance_id: u64,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.call(py, request, move |router, context| async move {
            router.direct(context, instance_id).await
        })
    }
}

/// One response stream, as an async iterator of JSON-like values. An
/// error item raises the `switchyard.errors` exception of its kind.
#[pyclass(name = "ResponseStream", module = "switchyard._core", frozen)]
pub(crate) struct PyResponseStream {
    /// `None` once the stream ended (or was closed). Locked by one
    /// `__anext__` at a time: on the Python thread with `try_lock`, on tokio
    /// when waiting.
    stream: Arc<tokio::sync::Mutex<Option<ResponseStream<Value>>>>,
    controller: Controller,
    bridge: Bridge,
}

impl std::fmt::Debug for PyResponseStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseStream")
            .field("id", &self.controller.id())
            .finish_non_exhaustive()
    }
}

/// A value for Python, converted on the loop's thread.
struct Json(Value);

impl<'py> IntoPyObject<'py> for Json {
    type Target = PyAny;
    type Output = Bound<'py, PyAny>;
    type Error = PyErr;

    fn into_pyobject(self, py: Python<'py>) -> Result<Self::Output, Self::Error> {
        Ok(pythonize::pythonize(py, &self.0)?)
    }
}

#[pymethods]
impl PyResponseStream {
    fn __aiter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __anext__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        if let Ok(mut guard) = self.stream.try_lock() {
            let Some(stream) = guard.as_mut() else {
                return Err(Error::end_of_stream().into_pyerr(py));
            };
            // Polling may arm a tokio timer or channel: give it the runtime.
            let _runtime = tokio().enter();
            match stream.next().now_or_never() {
                Some(Some(Ok(value))) => {
                    let item = pythonize::pythonize(py, &value)
                        .map(|v| v.unbind())
                        .map_err(PyErr::from);
                    return Bound::new(py, Ready::new(item)).map(Bound::into_any);
                }
                Some(Some(Err(error))) => {
                    *guard = None;
                    return Bound::new(py, Ready::new(Err(Error::from(error).into_pyerr(py)))).map(Bound::into_any);
                }
                Some(None) => {
                    *guard = None;
                    return Err(Error::end_of_stream().into_pyerr(py));
                }
                None => {}
            }
        }
        let stream = self.stream.clone();
        self.bridge.awaitable(py, async move {
            let mut guard = stream.lock().await;
            let Some(current) = guard.as_mut() else {
                return Err(Error::end_of_stream());
            };
            match current.next().await {
                Some(Ok(value)) => Ok(Json(value)),
                Some(Err(error)) => {
                    *guard = None;
                    Err(Error::from(error))
                }
                None => {
                    *guard = None;
                    Err(Error::end_of_stream())
                }
            }
        })
    }

    /// The request id (the worker's context has the same).
    fn id(&self) -> &str {
        self.controller.id()
    }

    /// Asks the worker to end the answer gracefully.
    fn stop(&self) {
        self.controller.stop();
    }

    /// Ends the request now; the worker's handler is cancelled.
    fn kill(&self) {
        self.controller.kill();
    }

    /// Kills the request and lets go of the stream.
    fn aclose<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.controller.kill();
        let stream = self.stream.clone();
        self.bridge.awaitable(py, async move {
            stream.lock().await.take();
            Ok::<_, Error>(())
        })
    }
}

impl Drop for PyResponseStream {
    fn drop(&mut self) {
        // Dropping a request-plane stream may talk to tokio (a kill frame):
        // do it on tokio, not on the Python thread that let go of it.
        let stream = self.stream.clone();
        tokio().spawn(async move {
            stream.lock().await.take();
        });
    }
}
