//! The mesh's handles for Python — `DistributedRuntime` → `Namespace` →
//! `Component` → `Endpoint` — each a thin wrapper over the Rust handle of
//! the same name plus the [`Bridge`] to the event loop it was made on.
//! They add no behaviour: serving is in [`crate::serve`], calling in
//! [`crate::client`].

use crate::bridge::{Bridge, tokio};
use crate::errors::{Error, IntoPyResult};
use crate::metrics::PyMetrics;
use pyo3::prelude::*;
use std::sync::{Arc, Mutex, OnceLock};
use switchyard_runtime::component::load::EngineLoad;
use switchyard_runtime::component::{Component, Endpoint, Namespace};
use switchyard_runtime::config::RuntimeConfig;
use switchyard_runtime::distributed::DistributedRuntime;
use switchyard_runtime::runtime::{Runtime, ShutdownOutcome};

/// The worker threads of the one tokio runtime, fixed by the first
/// `DistributedRuntime` of the process (`DYN_RUNTIME_NUM_WORKER_THREADS`).
static TOKIO_CONFIGURED: OnceLock<()> = OnceLock::new();

/// The process's handle on the mesh (Dynamo's `DistributedRuntime`).
#[pyclass(name = "DistributedRuntime", module = "switchyard._core", frozen)]
#[derive(Debug)]
pub(crate) struct PyDistributedRuntime {
    drt: DistributedRuntime,
    bridge: Bridge,
}

#[pymethods]
impl PyDistributedRuntime {
    /// A runtime for this process from the `DYN_*` settings, bound to the
    /// running event loop (call it from a coroutine). `@switchyard_worker()`
    /// calls it for you and also handles SIGTERM.
    #[staticmethod]
    fn detached(py: Python<'_>) -> PyResult<Self> {
        let event_loop = py.import("asyncio")?.call_method0("get_running_loop").map_err(|_| {
            pyo3::exceptions::PyRuntimeError::new_err(
                "DistributedRuntime.detached() needs a running event loop: call it from a coroutine \
                 (for example inside asyncio.run(main()))",
            )
        })?;
        let config = RuntimeConfig::from_settings().map_err(|e| Error::setup(&e).into_pyerr(py))?;
        init_logging(config.log_filter());
        TOKIO_CONFIGURED.get_or_init(|| {
            let mut builder = ::tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(*config.worker_threads()).enable_all();
            pyo3_async_runtimes::tokio::init(builder);
        });
        let drt = py
            .detach(|| {
                tokio().block_on(async move {
                    let runtime = Runtime::new(config);
                    DistributedRuntime::from_settings(runtime).await
                })
            })
            .map_err(|e| Error::setup(&e).into_pyerr(py))?;
        let bridge = Bridge::attach(&event_loop)?;
        Ok(Self { drt, bridge })
    }

    /// The namespace `name` (lowercase letters, digits, `-` and `_`).
    fn namespace(&self, py: Python<'_>, name: String) -> PyResult<PyNamespace> {
        let namespace = self
            .drt
            .namespace(name)
            .map_err(|e| Error::invalid(e.to_string()))
            .py_err(py)?;
        Ok(PyNamespace {
            namespace,
            bridge: self.bridge.clone(),
        })
    }

    /// This process's instance id in discovery.
    fn instance_id(&self) -> u64 {
        self.drt.instance_id()
    }

    /// Where the status server (`/health`, `/live`, `/metrics`) listens,
    /// as `host:port`, when `DYN_SYSTEM_PORT` is set.
    fn status_address(&self) -> Option<String> {
        self.drt.status_server_address().map(|a| a.to_string())
    }

    /// True once shutdown has begun (endpoints drain).
    fn is_shutting_down(&self) -> bool {
        self.drt.runtime().is_shutting_down()
    }

    /// Graceful shutdown: endpoints leave discovery, in-flight requests
    /// finish (up to `DYN_WORKER_GRACEFUL_SHUTDOWN_TIMEOUT`, then they are
    /// cancelled), then the runtime stops. Resolves to True when every
    /// request finished on its own. Calling it again is harmless.
    fn shutdown<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let runtime = self.drt.runtime().clone();
        self.bridge.awaitable(py, async move {
            Ok::<_, Error>(runtime.shutdown().await == ShutdownOutcome::Drained)
        })
    }

    /// Immediate stop: cancels every request still running.
    fn stop<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let runtime = self.drt.runtime().clone();
        self.bridge.awaitable(py, async move {
            runtime.stop().await;
            Ok::<_, Error>(())
        })
    }

    /// Stops watching the event loop (after shutdown, before the loop closes).
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        self.bridge.detach(py)
    }

    fn __repr__(&self) -> String {
        format!("DistributedRuntime(instance_id={:x})", self.drt.instance_id())
    }
}

/// A group of components (Dynamo's `Namespace`).
#[pyclass(name = "Namespace", module = "switchyard._core", frozen)]
#[derive(Debug)]
pub(crate) struct PyNamespace {
    namespace: Namespace,
    bridge: Bridge,
}

#[pymethods]
impl PyNamespace {
    fn component(&self, py: Python<'_>, name: String) -> PyResult<PyComponent> {
        let component = self
            .namespace
            .component(name)
            .map_err(|e| Error::invalid(e.to_string()))
            .py_err(py)?;
        Ok(PyComponent {
            component,
            bridge: self.bridge.clone(),
        })
    }

    #[getter]
    fn name(&self) -> &str {
        self.namespace.name()
    }

    /// This namespace's level of the metrics hierarchy.
    #[getter]
    fn metrics(&self) -> PyMetrics {
        PyMetrics::new(self.namespace.metrics())
    }

    fn __repr__(&self) -> String {
        format!("Namespace({:?})", self.namespace.name())
    }
}

/// A kind of process in a namespace (Dynamo's `Component`).
#[pyclass(name = "Component", module = "switchyard._core", frozen)]
#[derive(Debug)]
pub(crate) struct PyComponent {
    component: Component,
    bridge: Bridge,
}

#[pymethods]
impl PyComponent {
    /// The endpoint `name`; the name is checked when it is served or called.
    fn endpoint(&self, name: String) -> PyEndpoint {
        PyEndpoint {
            endpoint: self.component.endpoint(name),
            bridge: self.bridge.clone(),
            load: Arc::new(Mutex::new(EngineLoad::default())),
        }
    }

    #[getter]
    fn name(&self) -> &str {
        self.component.name()
    }

    #[getter]
    fn namespace(&self) -> &str {
        self.component.namespace()
    }

    /// This component's level of the metrics hierarchy.
    #[getter]
    fn metrics(&self) -> PyMetrics {
        PyMetrics::new(self.component.metrics())
    }

    fn __repr__(&self) -> String {
        format!(
            "Component({:?})",
            format!("{}/{}", self.component.namespace(), self.component.name())
        )
    }
}

/// One operation of a component (Dynamo's `Endpoint`). Serving and
/// calling are in `serve.rs` and `client.rs`.
#[pyclass(name = "Endpoint", module = "switchyard._core", frozen)]
#[derive(Debug)]
pub(crate) struct PyEndpoint {
    pub(crate) endpoint: Endpoint,
    pub(crate) bridge: Bridge,
    /// What `report_load` last said; read by the load reporter (on tokio,
    /// without the GIL) when the endpoint is served with `load_reports=True`.
    pub(crate) load: Arc<Mutex<EngineLoad>>,
}

#[pymethods]
impl PyEndpoint {
    #[getter]
    fn name(&self) -> &str {
        self.endpoint.name()
    }

    /// `namespace/component/endpoint`.
    #[getter]
    fn path(&self) -> String {
        self.endpoint.path()
    }

    /// This endpoint's level of the metrics hierarchy: metrics created
    /// here carry the namespace, component, endpoint and worker id labels.
    #[getter]
    fn metrics(&self) -> PyMetrics {
        PyMetrics::new(self.endpoint.metrics())
    }

    /// What the engine knows about its own load, published with the
    /// requests in flight when the endpoint serves with `load_reports=True`:
    /// requests waiting inside the engine, KV-cache usage (0–1), and how
    /// many requests it can run at once.
    #[pyo3(signature = (*, queued = 0, kv_usage = None, capacity = None))]
    fn report_load(&self, py: Python<'_>, queued: u64, kv_usage: Option<f32>, capacity: Option<u64>) -> PyResult<()> {
        if let Some(usage) = kv_usage
            && !(0.0..=1.0).contains(&usage)
        {
            return Err(Error::invalid(format!("kv_usage must be between 0 and 1 (got {usage})")).into_pyerr(py));
        }
        *self.load.lock().unwrap_or_else(|p| p.into_inner()) = EngineLoad {
            queued,
            kv_usage,
            capacity,
        };
        Ok(())
    }

    /// Serves this endpoint with `handler` until the runtime shuts down and
    /// the endpoint has drained (see `switchyard/_core.pyi`).
    #[pyo3(signature = (handler, *, graceful_shutdown = true, metrics_labels = None, health_check_payload = None, load_reports = false))]
    fn serve_endpoint<'py>(
        &self,
        py: Python<'py>,
        handler: Bound<'py, PyAny>,
        graceful_shutdown: bool,
        metrics_labels: Option<Vec<(String, String)>>,
        health_check_payload: Option<Bound<'py, PyAny>>,
        load_reports: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let options = crate::serve::ServeOptions {
            graceful_shutdown,
            metrics_labels: metrics_labels.unwrap_or_default(),
            health_check_payload,
            load_reports,
        };
        crate::serve::serve_endpoint(self, py, handler, options)
    }

    /// A client that follows this endpoint's instances, to call them.
    #[pyo3(signature = (router_mode = "round_robin"))]
    fn client<'py>(&self, py: Python<'py>, router_mode: &str) -> PyResult<Bound<'py, PyAny>> {
        crate::client::client(self, py, router_mode)
    }

    fn __repr__(&self) -> String {
        format!("Endpoint({:?})", self.endpoint.path())
    }
}

/// Logs to stderr with the `DYN_LOG` filter, like a Rust worker; a
/// subscriber installed earlier wins.
fn init_logging(filter: &str) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
}
