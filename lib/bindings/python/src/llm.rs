//! `register_model`: puts a Python engine behind the OpenAI frontend, the
//! way the mocker worker does — a model card in discovery for the served
//! endpoint, taken out as soon as the runtime starts draining.
//!
//! The engine then receives what the frontend sends (`{"chat": {...}}` or
//! `{"completion": {...}}`, the OpenAI request as parsed) and yields pieces
//! shaped like `{"text": "...", "tokens": 1}`, the last with
//! `"finish_reason": "stop"` or `"length"` (docs/python.md).

use crate::errors::{Error, IntoPyResult};
use crate::runtime::PyEndpoint;
use pyo3::prelude::*;
use switchyard_llm::model_card::{ModelCard, ModelKind};

/// Registers `model_name`, served by `endpoint`, for the frontend.
#[pyfunction]
#[pyo3(signature = (endpoint, model_name, *, kinds = vec!["chat".to_string(), "completions".to_string()], context_length = 8192))]
pub(crate) fn register_model<'py>(
    py: Python<'py>,
    endpoint: &PyEndpoint,
    model_name: String,
    kinds: Vec<String>,
    context_length: u32,
) -> PyResult<Bound<'py, PyAny>> {
    let kinds = parse_kinds(&kinds).py_err(py)?;
    if model_name.trim().is_empty() {
        return Err(Error::invalid("register_model: the model name is empty").into_pyerr(py));
    }
    if context_length == 0 {
        return Err(Error::invalid("register_model: context_length must be at least 1").into_pyerr(py));
    }
    let handle = endpoint.endpoint.clone();
    endpoint.bridge.awaitable(py, async move {
        let card = ModelCard::new(&model_name, &handle, kinds, context_length);
        card.register(&handle).await.map_err(|e| Error::setup(&e))?;
        let runtime = handle.drt().runtime().clone();
        let draining = runtime.endpoint_token().clone();
        runtime.spawn(async move {
            draining.cancelled().await;
            if let Err(error) = card.unregister(&handle).await {
                tracing::warn!(%error, "could not unregister the model card");
            }
        });
        Ok(())
    })
}

fn parse_kinds(kinds: &[String]) -> Result<Vec<ModelKind>, Error> {
    if kinds.is_empty() {
        return Err(Error::invalid(
            "register_model: kinds is empty; give \"chat\", \"completions\" or both",
        ));
    }
    kinds
        .iter()
        .map(|kind| match kind.as_str() {
            "chat" => Ok(ModelKind::Chat),
            "completions" => Ok(ModelKind::Completions),
            other => Err(Error::invalid(format!(
                "register_model: unknown kind {other:?}; the kinds are \"chat\" and \"completions\""
            ))),
        })
        .collect()
}
