//! `switchyard._core`: the native half of the `switchyard` Python package.
//! It wraps the public API of `switchyard-runtime` (and the model card of
//! `switchyard-llm`) and adds no behaviour of its own; the pure-Python
//! package around it (`python/switchyard`) adds the decorator, the error
//! classes and the handler driver.
//!
//! The rule everything here follows: tokio's threads never take the GIL.
//! See [`bridge`] for how work crosses between the two.

mod bridge;
mod client;
mod errors;
mod llm;
mod metrics;
mod runtime;
mod serve;

use pyo3::prelude::*;

#[pymodule]
fn _core(module: &Bound<'_, PyModule>) -> PyResult<()> {
    module.add_class::<runtime::PyDistributedRuntime>()?;
    module.add_class::<runtime::PyNamespace>()?;
    module.add_class::<runtime::PyComponent>()?;
    module.add_class::<runtime::PyEndpoint>()?;
    module.add_class::<client::PyClient>()?;
    module.add_class::<client::PyResponseStream>()?;
    module.add_class::<serve::PyContext>()?;
    module.add_class::<serve::ResponseSink>()?;
    module.add_class::<metrics::PyMetrics>()?;
    module.add_class::<metrics::Counter>()?;
    module.add_class::<metrics::Gauge>()?;
    module.add_class::<metrics::Histogram>()?;
    module.add_class::<llm::PyKvEventPublisher>()?;
    module.add_function(wrap_pyfunction!(llm::register_model, module)?)?;
    module.add_function(wrap_pyfunction!(llm::kv_event_publisher, module)?)?;
    module.add_function(wrap_pyfunction!(llm::mocker_tokens, module)?)?;
    Ok(())
}
