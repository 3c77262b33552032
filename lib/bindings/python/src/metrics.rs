//! Metrics helpers for Python: counters, gauges and histograms at a level
//! of the runtime's metrics hierarchy (process, namespace, component,
//! endpoint), exported on the status server's `/metrics` with that level's
//! labels, exactly as Rust workers' are.

use crate::errors::Error;
use pyo3::prelude::*;
use switchyard_runtime::metrics::{Metrics, MetricsError};

/// One level of the metrics hierarchy (`endpoint.metrics`).
#[pyclass(name = "Metrics", module = "switchyard._core", frozen)]
#[derive(Debug)]
pub(crate) struct PyMetrics(Metrics);

impl PyMetrics {
    pub(crate) fn new(metrics: Metrics) -> Self {
        Self(metrics)
    }
}

fn refused(py: Python<'_>, name: &str, error: MetricsError) -> PyErr {
    let error = Error::invalid(format!(
        "cannot create metric {name:?}: {}",
        switchyard_runtime::error::Report(&error)
    ));
    error.into_pyerr(py)
}

#[pymethods]
impl PyMetrics {
    /// A counter named `dynamo_component_{name}` with this level's labels.
    fn create_counter(&self, py: Python<'_>, name: &str, help: &str) -> PyResult<Counter> {
        self.0
            .create_counter(name, help)
            .map(Counter)
            .map_err(|e| refused(py, name, e))
    }

    /// A gauge (integer); its name must not end in `_total`.
    fn create_gauge(&self, py: Python<'_>, name: &str, help: &str) -> PyResult<Gauge> {
        self.0
            .create_gauge(name, help)
            .map(Gauge)
            .map_err(|e| refused(py, name, e))
    }

    /// A histogram with the given bucket upper bounds (seconds, tokens, …).
    fn create_histogram(&self, py: Python<'_>, name: &str, help: &str, buckets: Vec<f64>) -> PyResult<Histogram> {
        self.0
            .create_histogram(name, help, &buckets)
            .map(Histogram)
            .map_err(|e| refused(py, name, e))
    }
}

#[pyclass(module = "switchyard._core", frozen)]
#[derive(Debug)]
pub(crate) struct Counter(prometheus::IntCounter);

#[pymethods]
impl Counter {
    #[pyo3(signature = (by = 1))]
    fn inc(&self, by: u64) {
        self.0.inc_by(by);
    }

    fn get(&self) -> u64 {
        self.0.get()
    }
}

#[pyclass(module = "switchyard._core", frozen)]
#[derive(Debug)]
pub(crate) struct Gauge(prometheus::IntGauge);

#[pymethods]
impl Gauge {
    fn set(&self, value: i64) {
        self.0.set(value);
    }

    #[pyo3(signature = (by = 1))]
    fn inc(&self, by: i64) {
        self.0.add(by);
    }

    #[pyo3(signature = (by = 1))]
    fn dec(&self, by: i64) {
        self.0.sub(by);
    }

    fn get(&self) -> i64 {
        self.0.get()
    }
}

#[pyclass(module = "switchyard._core", frozen)]
#[derive(Debug)]
pub(crate) struct Histogram(prometheus::Histogram);

#[pymethods]
impl Histogram {
    fn observe(&self, value: f64) {
        self.0.observe(value);
    }

    /// Observations so far.
    fn count(&self) -> u64 {
        self.0.get_sample_count()
    }
}
