//! `register_model`: puts a Python engine behind the OpenAI frontend, the
//! way the mocker worker does — a model card in discovery for the served
//! endpoint, taken out as soon as the runtime starts draining. The card can
//! name the engine's tokenizer, its KV block size and where it publishes KV
//! events, so the frontend routes to it by cached prefix (`--router-mode
//! kv`); `kv_event_publisher` gives an engine without a publisher of its own
//! a vLLM-compatible one.
//!
//! The engine then receives what the frontend sends (`{"chat": {...}}` or
//! `{"completion": {...}}`, the OpenAI request as parsed) and yields pieces
//! shaped like `{"text": "...", "tokens": 1}`, the last with
//! `"finish_reason": "stop"` or `"length"` (docs/python.md).

use crate::errors::{Error, IntoPyResult};
use crate::runtime::PyEndpoint;
use pyo3::prelude::*;
use std::sync::Arc;
use switchyard_kv_events::{Publisher, PublisherConfig};
use switchyard_kv_router::events::{BlockRemoved, BlockStored, EngineBlockHash, EventBatch, KvEvent};
use switchyard_llm::model_card::{KvEventsSource, ModelCard, ModelKind, TokenizerSpec};

/// The topic a Python engine's KV events go out on.
const KV_EVENTS_TOPIC: &str = "kv-events";

/// Registers `model_name`, served by `endpoint`, for the frontend.
#[pyfunction]
#[pyo3(signature = (endpoint, model_name, *, kinds = vec!["chat".to_string(), "completions".to_string()], context_length = 8192, tokenizer = None, kv_cache_block_size = None, kv_events = None))]
#[allow(clippy::too_many_arguments)] // Python keyword arguments, each optional
pub(crate) fn register_model<'py>(
    py: Python<'py>,
    endpoint: &PyEndpoint,
    model_name: String,
    kinds: Vec<String>,
    context_length: u32,
    tokenizer: Option<String>,
    kv_cache_block_size: Option<u32>,
    kv_events: Option<PyRef<'py, PyKvEventPublisher>>,
) -> PyResult<Bound<'py, PyAny>> {
    let kinds = parse_kinds(&kinds).py_err(py)?;
    if model_name.trim().is_empty() {
        return Err(Error::invalid("register_model: the model name is empty").into_pyerr(py));
    }
    if context_length == 0 {
        return Err(Error::invalid("register_model: context_length must be at least 1").into_pyerr(py));
    }
    let tokenizer = tokenizer.map(|t| parse_tokenizer(&t)).transpose().py_err(py)?;
    if kv_cache_block_size == Some(0) {
        return Err(Error::invalid("register_model: kv_cache_block_size must be at least 1").into_pyerr(py));
    }
    let kv_events = match (&kv_events, kv_cache_block_size) {
        (Some(publisher), Some(size)) if size != publisher.block_size => {
            return Err(Error::invalid(format!(
                "register_model: kv_cache_block_size is {size} but the KV event publisher's block_size is {}",
                publisher.block_size
            ))
            .into_pyerr(py));
        }
        (Some(publisher), _) => Some((publisher.source(), publisher.block_size)),
        (None, _) => None,
    };
    let handle = endpoint.endpoint.clone();
    endpoint.bridge.awaitable(py, async move {
        let mut card = ModelCard::new(&model_name, &handle, kinds, context_length);
        card.tokenizer = tokenizer;
        card.capacity.kv_cache_block_size = kv_cache_block_size.map(u64::from);
        if let Some((source, block_size)) = kv_events {
            card.kv_events = Some(source);
            card.capacity.kv_cache_block_size = Some(u64::from(block_size));
        }
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

/// `"mocker"`, or the path of a Hugging Face model directory (its
/// `tokenizer.json` and `tokenizer_config.json`, on the frontend's machine).
fn parse_tokenizer(tokenizer: &str) -> Result<TokenizerSpec, Error> {
    match tokenizer.trim() {
        "" => Err(Error::invalid(
            "register_model: tokenizer is empty; give \"mocker\" or the path of a Hugging Face model directory",
        )),
        "mocker" => Ok(TokenizerSpec::Mocker),
        path => Ok(TokenizerSpec::HfDir { path: path.to_string() }),
    }
}

/// Publishes a Python engine's KV cache changes the way vLLM does (ZMQ PUB
/// with a replay socket), for routers that follow the engine's cache.
#[pyfunction]
#[pyo3(signature = (endpoint, *, block_size))]
pub(crate) fn kv_event_publisher<'py>(
    py: Python<'py>,
    endpoint: &PyEndpoint,
    block_size: u32,
) -> PyResult<Bound<'py, PyAny>> {
    if block_size == 0 {
        return Err(Error::invalid("kv_event_publisher: block_size must be at least 1").into_pyerr(py));
    }
    let host = endpoint.endpoint.drt().runtime().config().tcp().host().clone();
    endpoint.bridge.awaitable(py, async move {
        let config = PublisherConfig::on_host(&host, KV_EVENTS_TOPIC)
            .await
            .map_err(|e| Error::setup(&e))?;
        let publisher = Publisher::bind(config).map_err(|e| Error::setup(&e))?;
        tracing::info!(endpoint = %publisher.endpoint(), "publishing KV events");
        Ok(PyKvEventPublisher {
            publisher: Arc::new(publisher),
            block_size,
        })
    })
}

/// A running KV event publisher; each call publishes one batch.
#[pyclass(name = "KvEventPublisher", module = "switchyard._core", frozen)]
pub(crate) struct PyKvEventPublisher {
    publisher: Arc<Publisher>,
    block_size: u32,
}

impl std::fmt::Debug for PyKvEventPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvEventPublisher")
            .field("endpoint", &self.publisher.endpoint())
            .field("block_size", &self.block_size)
            .finish()
    }
}

impl PyKvEventPublisher {
    fn source(&self) -> KvEventsSource {
        KvEventsSource {
            endpoint: self.publisher.endpoint().to_string(),
            replay_endpoint: self.publisher.replay_endpoint().map(str::to_string),
            topic: KV_EVENTS_TOPIC.to_string(),
        }
    }

    fn publish(&self, event: KvEvent) {
        let ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.publisher.publish(&EventBatch {
            ts,
            events: vec![event],
            data_parallel_rank: None,
        });
    }
}

#[pymethods]
impl PyKvEventPublisher {
    /// The engine now holds these full blocks, each the child of the one
    /// before (the first of `parent_hash`, or a root): `token_ids` are their
    /// tokens, `block_size` per block.
    #[pyo3(signature = (block_hashes, token_ids, *, parent_hash = None))]
    fn stored(
        &self,
        py: Python<'_>,
        block_hashes: Vec<u64>,
        token_ids: Vec<u32>,
        parent_hash: Option<u64>,
    ) -> PyResult<()> {
        if block_hashes.is_empty() {
            return Err(Error::invalid("stored: block_hashes is empty").into_pyerr(py));
        }
        let expected = block_hashes.len() * self.block_size as usize;
        if token_ids.len() != expected {
            return Err(Error::invalid(format!(
                "stored: {} blocks of {} tokens need {expected} token ids, got {}",
                block_hashes.len(),
                self.block_size,
                token_ids.len()
            ))
            .into_pyerr(py));
        }
        self.publish(KvEvent::BlockStored(BlockStored {
            block_hashes: block_hashes.into_iter().map(EngineBlockHash).collect(),
            parent_block_hash: parent_hash.map(EngineBlockHash),
            token_ids,
            block_size: self.block_size,
            lora_id: None,
            medium: None,
            lora_name: None,
        }));
        Ok(())
    }

    /// The engine evicted these blocks.
    fn removed(&self, py: Python<'_>, block_hashes: Vec<u64>) -> PyResult<()> {
        if block_hashes.is_empty() {
            return Err(Error::invalid("removed: block_hashes is empty").into_pyerr(py));
        }
        self.publish(KvEvent::BlockRemoved(BlockRemoved {
            block_hashes: block_hashes.into_iter().map(EngineBlockHash).collect(),
            medium: None,
        }));
        Ok(())
    }

    /// The engine dropped every block (a restart, a reset).
    fn cleared(&self) {
        self.publish(KvEvent::AllBlocksCleared);
    }

    /// The PUB socket's address (`tcp://HOST:PORT`).
    #[getter]
    fn endpoint(&self) -> String {
        self.publisher.endpoint().to_string()
    }

    #[getter]
    fn block_size(&self) -> u32 {
        self.block_size
    }

    /// Batches published so far (and dropped because the publisher fell behind).
    fn published(&self) -> (u64, u64) {
        (self.publisher.published(), self.publisher.dropped())
    }
}

/// The token ids the mocker's tokenizer gives `request` (`{"chat": {...}}`
/// or `{"completion": {...}}`, as the handler receives it): what a router
/// hashes for a model registered with `tokenizer="mocker"`.
#[pyfunction]
pub(crate) fn mocker_tokens(py: Python<'_>, request: Bound<'_, PyAny>) -> PyResult<Vec<u32>> {
    let request: switchyard_llm::protocol::LlmRequest = pythonize::depythonize(&request)
        .map_err(|e| Error::invalid(format!("mocker_tokens: not an LLM request: {e}")).into_pyerr(py))?;
    Ok(switchyard_mocker::text::tokenize(&request.flat_prompt()))
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
