//! Keeping one vLLM server's instance true to the server: scrape its
//! `/metrics` gauges (whichever engine's they are) into the instance's load
//! reports, poll its liveness route (`/health`, else `/v1/models`), take the
//! instance out of discovery when the server stops answering, and put it
//! back when it answers again.

use crate::check::check_model;
use crate::forward::VllmForwarder;
use crate::probe;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use switchyard_llm::model_card::{
    Capacity, EngineFeatures, KvEventsSource, LoadGauges, ModelCard, ModelKind, TokenizerSpec,
};
use switchyard_runtime::component::Endpoint;
use switchyard_runtime::component::endpoint::{EndpointError, ServingEndpoint};
use switchyard_runtime::component::load::EngineLoad;
use switchyard_runtime::discovery::DiscoveryError;
use switchyard_runtime::distributed::DistributedRuntime;

/// How often `/metrics` is read.
const SCRAPE_INTERVAL: Duration = Duration::from_secs(1);
/// Failed health checks in a row before the instance leaves discovery: one
/// slow answer under load should not take a busy server out.
const FAILURES_TO_LEAVE: u32 = 2;

/// One vLLM server and the instance that stands for it.
#[derive(Debug, Clone)]
pub struct Backend {
    pub base_url: String,
    pub drt: DistributedRuntime,
    pub endpoint: Endpoint,
    pub model: String,
    pub context_length: u32,
    /// What KV-aware routers need to know of this server's engine.
    pub kv: EngineFacts,
    pub http: reqwest::Client,
    pub health_interval: Duration,
    pub check_timeout: Duration,
    /// What the server offers, found out before the first registration.
    pub features: EngineFeatures,
}

/// What the card says about the engine for KV-aware routers (`crate::kv`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineFacts {
    /// Where the engine publishes its KV events, when known.
    pub events: Option<KvEventsSource>,
    /// Tokens per KV-cache block, as the engine was started.
    pub block_size: u64,
    pub tokenizer: Option<TokenizerSpec>,
}

impl Backend {
    /// Serves the endpoint and registers the model card; `None` when the
    /// runtime began shutting down meanwhile (a SIGTERM during start-up is
    /// a request to stop, not a failure).
    async fn serve(&self, load: Arc<Mutex<EngineLoad>>) -> Result<Option<(ServingEndpoint, ModelCard)>, EndpointError> {
        match self.serve_and_register(load).await {
            Err(_) if self.drt.runtime().is_shutting_down() => Ok(None),
            served => served.map(Some),
        }
    }

    async fn serve_and_register(
        &self,
        load: Arc<Mutex<EngineLoad>>,
    ) -> Result<(ServingEndpoint, ModelCard), EndpointError> {
        let serving = self
            .endpoint
            .endpoint_builder()
            .handler(VllmForwarder::new(self.http.clone(), &self.base_url, &self.features))
            .publish_load_with(move || *load.lock().unwrap_or_else(|p| p.into_inner()))
            .spawn()
            .await?;
        let mut card = ModelCard::new(
            &self.model,
            &self.endpoint,
            vec![ModelKind::Chat, ModelKind::Completions],
            self.context_length,
        );
        card.capacity = Capacity {
            kv_cache_block_size: Some(self.kv.block_size),
            ..Capacity::default()
        };
        card.tokenizer = self.kv.tokenizer.clone();
        card.kv_events = self.kv.events.clone();
        card.engine = Some(self.features.clone());
        if let Err(error) = card.register(&self.endpoint).await {
            serving.stop();
            serving.wait().await;
            return Err(EndpointError::from(error));
        }
        Ok((serving, card))
    }

    /// The server is alive, as its features' liveness says.
    async fn healthy(&self) -> bool {
        probe::alive(&self.http, &self.base_url, self.features.liveness, self.check_timeout).await
    }

    /// Serves this server's instance until the runtime drains, following the
    /// server's health. The server was checked before this is called.
    pub async fn supervise(self) -> Result<(), EndpointError> {
        let runtime = self.drt.runtime().clone();
        let draining = runtime.endpoint_token().clone();
        let load = Arc::new(Mutex::new(EngineLoad::default()));
        // Without gauges the load is the in-flight count the runtime adds.
        if self.features.load != LoadGauges::InFlight {
            runtime.spawn(scrape(
                self.http.clone(),
                self.base_url.clone(),
                self.features.load,
                load.clone(),
                draining.clone(),
            ));
        }

        let Some(serving) = self.serve(load.clone()).await? else {
            tracing::info!(url = %self.base_url, "shutting down before this server was registered");
            return Ok(());
        };
        let mut current = Some(serving);
        let instance = format!("{:x}", self.drt.instance_id());
        tracing::info!(url = %self.base_url, model = %self.model, %instance, "vllm worker serving");
        let mut failures = 0;
        loop {
            tokio::select! {
                _ = draining.cancelled() => break,
                _ = tokio::time::sleep(self.health_interval) => {}
            }
            if self.healthy().await {
                failures = 0;
                if current.is_none() {
                    match check_model(&self.http, &self.base_url, &self.model, self.check_timeout).await {
                        Ok(_) if !runtime.is_shutting_down() => {
                            let Some(serving) = self.serve(load.clone()).await? else {
                                break;
                            };
                            current = Some(serving);
                            tracing::info!(url = %self.base_url, "vLLM answers again; back in discovery");
                        }
                        Ok(_) => {}
                        Err(error) => tracing::warn!(%error, "vLLM answers but cannot be used"),
                    }
                }
            } else {
                failures += 1;
                if failures >= FAILURES_TO_LEAVE
                    && let Some((serving, card)) = current.take()
                {
                    tracing::warn!(url = %self.base_url, liveness = self.features.liveness.as_str(), "the server stopped answering its health checks; leaving discovery");
                    leave(&self.endpoint, serving, card).await;
                }
            }
        }
        // The runtime is draining: the endpoint drains itself; the card goes first.
        if let Some((serving, card)) = current {
            if let Err(error) = card.unregister(&self.endpoint).await {
                tracing::warn!(%error, "could not unregister the model card");
            }
            serving.wait().await;
        }
        Ok(())
    }
}

/// Takes an instance out: card first (frontends stop choosing it), then the
/// endpoint, which finishes — or fails — what it has.
async fn leave(endpoint: &Endpoint, serving: ServingEndpoint, card: ModelCard) {
    if let Err(error) = card.unregister(endpoint).await {
        let error: DiscoveryError = error;
        tracing::warn!(%error, "could not unregister the model card");
    }
    serving.stop();
    serving.wait().await;
}

/// Reads the server's `/metrics` gauges into `load` every [`SCRAPE_INTERVAL`].
async fn scrape(
    http: reqwest::Client,
    base_url: String,
    gauges: LoadGauges,
    load: Arc<Mutex<EngineLoad>>,
    stop: tokio_util::sync::CancellationToken,
) {
    loop {
        if let Some(text) = probe::read_metrics(&http, &base_url, SCRAPE_INTERVAL).await {
            *load.lock().unwrap_or_else(|p| p.into_inner()) = probe::load_from(&text, gauges);
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(SCRAPE_INTERVAL) => {}
        }
    }
}
