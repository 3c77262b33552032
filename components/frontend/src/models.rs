//! Which models exist and how to reach them: follows the `v1/models` cards in
//! discovery and keeps one router per model over the endpoint that serves it.
//!
//! A model is listed while at least one card for it exists; the card leaves
//! with its worker (lease expiry, drain, or shutdown), so a model whose last
//! worker is gone disappears. One model is served from one endpoint: a card
//! naming the same model on a different endpoint is refused with a warning,
//! because the router of an endpoint cannot tell which of its instances
//! serve which model.

use crate::kv::{Booking, KvMetrics, KvRouting, KvSettings};
use futures::StreamExt;
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use switchyard_kv_router::select::Choice;
use switchyard_llm::migration::with_prompt_tokens;
use switchyard_llm::model_card::{ModelCard, ModelKind, TokenizerSpec};
use switchyard_llm::openai::Prompt;
use switchyard_llm::protocol::{LlmOutput, LlmRequest};
use switchyard_llm::tokenizer::HfTokenizer;
use switchyard_runtime::component::client::ClientError;
use switchyard_runtime::discovery::DiscoveryError;
use switchyard_runtime::discovery::{Bucket, Key, Query, WatchEvent};
use switchyard_runtime::distributed::DistributedRuntime;
use switchyard_runtime::engine::Context;
use switchyard_runtime::error::{ErrorKind, Report, RequestError};
use switchyard_runtime::names::NameError;
use switchyard_runtime::routing::RouterMode;
use switchyard_runtime::routing::push_router::PushRouter;
use switchyard_runtime::routing::push_router::Routed;
use tokio_util::sync::CancellationToken;

/// The router type every model uses.
/// Requests go to the router behind an `Arc`: it serializes them for the
/// wire, and migration keeps the same one, so a large prompt is held once.
pub type LlmRouter = PushRouter<Arc<LlmRequest>, LlmOutput>;

/// Pause before re-opening a failed watch of `v1/models`.
const REWATCH_PAUSE: Duration = Duration::from_millis(500);

/// How the frontend builds each model's router.
#[derive(Debug, Clone, Copy)]
pub struct RouterSettings {
    pub mode: RouterMode,
    /// Requests in flight per instance at which it counts as busy (503 when all are).
    pub busy_threshold: Option<u64>,
    /// How long, and how many, requests may wait while all are busy (none when zero).
    pub max_wait: Duration,
    pub max_queued: usize,
    /// Longest wait for a worker's first piece before the request tries
    /// another (`--first-token-timeout-secs`).
    pub first_token_timeout: Option<Duration>,
}

/// One model: its cards (one per worker) and the router over its endpoint.
#[derive(Debug, Clone)]
pub struct Model {
    pub name: String,
    pub endpoint_path: String,
    pub cards: BTreeMap<u64, ModelCard>,
    pub router: Arc<LlmRouter>,
    /// The KV state of its workers, in KV mode.
    pub kv: Option<Arc<KvRouting>>,
    /// Its tokenizer, in KV mode (from the first card).
    pub tokenizer: ModelTokenizer,
}

/// How a KV-routed request was routed: its booking on the worker, the
/// `x-switchyard-route` explanation, and the facts behind it (for the mesh
/// page's decision log).
#[derive(Debug)]
pub struct KvRoute {
    pub booking: Booking,
    pub explanation: String,
    /// The chosen worker and the runner-up, with their overlaps and costs.
    pub choice: Option<Choice>,
    /// Blocks of the prompt.
    pub request_blocks: u64,
    /// Scored from what this router sent rather than the engines' events.
    pub approximate: bool,
}

/// The tokenizer a model's first card named, loaded when it is a Hugging
/// Face directory.
#[derive(Debug, Clone, Default)]
pub struct ModelTokenizer {
    pub spec: Option<TokenizerSpec>,
    pub hf: Option<Arc<HfTokenizer>>,
}

impl ModelTokenizer {
    /// See [`Model::prompt_tokens`]; `cards` are the model's.
    pub fn tokens(&self, cards: &BTreeMap<u64, ModelCard>, request: &LlmRequest) -> (Vec<u32>, bool) {
        let agreed = self
            .spec
            .as_ref()
            .is_some_and(|spec| cards.values().all(|card| card.tokenizer.as_ref() == Some(spec)));
        if agreed {
            match (&self.spec, &self.hf) {
                (Some(TokenizerSpec::Mocker), _) => {
                    return (switchyard_mocker::text::tokenize(&request.flat_prompt()), true);
                }
                (Some(TokenizerSpec::HfDir { .. }), Some(hf)) => match hf.prompt_tokens(request) {
                    Ok(tokens) => return (tokens, true),
                    Err(error) => {
                        tracing::debug!(model = %request.model(), error = %Report(&error), "cannot tokenize; approximating")
                    }
                },
                _ => {}
            }
        }
        (switchyard_mocker::text::tokenize(&request.flat_prompt()), false)
    }

    /// Loads what `card` names (off the async threads: a real
    /// `tokenizer.json` is megabytes). A directory that cannot be loaded is
    /// logged and left out, so the model is routed on approximate tokens.
    pub async fn load(card: &ModelCard) -> Self {
        let spec = card.tokenizer.clone();
        let hf = match &spec {
            Some(TokenizerSpec::HfDir { path }) => {
                let dir = std::path::PathBuf::from(path);
                let loaded = tokio::task::spawn_blocking(move || HfTokenizer::from_dir(&dir)).await;
                match loaded {
                    Ok(Ok(tokenizer)) => Some(Arc::new(tokenizer)),
                    Ok(Err(error)) => {
                        tracing::warn!(model = %card.name, error = %Report(&error), "cannot load the tokenizer the card names; KV routing approximates");
                        None
                    }
                    Err(error) => {
                        tracing::warn!(model = %card.name, %error, "tokenizer loading failed");
                        None
                    }
                }
            }
            _ => None,
        };
        Self { spec, hf }
    }
}

impl Model {
    pub fn serves(&self, kind: ModelKind) -> bool {
        self.cards.values().any(|card| card.serves(kind))
    }

    /// The shortest context length any of its workers declares.
    pub fn context_length(&self) -> Option<u32> {
        self.cards.values().map(|card| card.context_length).min()
    }

    /// The prompt's token ids as its engines will see them, and whether they
    /// are exact. They are when every card of the model names the same
    /// tokenizer and this frontend has it: the mocker's, or a Hugging Face
    /// directory it could load. Otherwise (or when the template refuses the
    /// request) the mocker's word tokenizer stands in, which only
    /// approximates.
    pub fn prompt_tokens(&self, request: &LlmRequest) -> (Vec<u32>, bool) {
        self.tokenizer.tokens(&self.cards, request)
    }

    /// Routes `request` with the model's router: in KV mode by cached prefix
    /// and load (booking the request on the chosen worker and saying why),
    /// else by the router's mode. `avoid` lists the instances the request
    /// already broke on (a migration), tried again only if no other is left.
    pub async fn route(
        &self,
        request: Context<Arc<LlmRequest>>,
        avoid: &[u64],
    ) -> Result<(Routed<LlmOutput>, Option<KvRoute>), RequestError> {
        let Some(kv) = &self.kv else {
            return Ok((self.router.generate_routed_avoiding(None, request, avoid).await?, None));
        };
        let (tokens, exact) = self.prompt_tokens(request.data());
        let request = if exact {
            self.check_context(tokens.len(), request.data().max_tokens())?;
            self.tokens_in(request, &tokens)
        } else {
            request
        };
        let plan = kv.plan(&tokens, exact, request.data().max_tokens());
        let policy = kv.policy(&plan);
        let routed = self
            .router
            .generate_routed_avoiding(Some(&policy), request, avoid)
            .await?;
        let choice = policy.choice();
        let booking = policy.into_booking(routed.instance_id);
        let explanation = plan.explain(choice);
        Ok((
            routed,
            Some(KvRoute {
                booking,
                explanation,
                choice,
                request_blocks: plan.request_blocks,
                approximate: plan.approximate,
            }),
        ))
    }

    /// With the prompt's exact token count, a prompt that cannot fit is
    /// refused here, naming the numbers, before any worker is asked.
    fn check_context(&self, prompt_tokens: usize, max_tokens: Option<u32>) -> Result<(), RequestError> {
        let Some(limit) = self.context_length() else {
            return Ok(());
        };
        let output = max_tokens.unwrap_or(0);
        let needed = prompt_tokens as u64 + u64::from(output);
        if needed <= u64::from(limit) {
            return Ok(());
        }
        let message = match max_tokens {
            Some(max) => format!(
                "the prompt is {prompt_tokens} tokens and max_tokens is {max}: together more than \
                 model {:?}'s context length of {limit} tokens",
                self.name
            ),
            None => format!(
                "the prompt is {prompt_tokens} tokens: more than model {:?}'s context length of {limit} tokens",
                self.name
            ),
        };
        Err(crate::error::for_client(ErrorKind::Invalid, message))
    }

    /// "Tokens in": when every worker of the model takes prompts as token
    /// ids (its card says so) and the frontend's tokens are exact, the
    /// request goes as those ids, so engine and router see the very same
    /// tokens and the engine does not tokenize again. A chat carrying
    /// fields a completion cannot (tools, structured output, …) goes as it
    /// came.
    fn tokens_in(&self, request: Context<Arc<LlmRequest>>, tokens: &[u32]) -> Context<Arc<LlmRequest>> {
        let all_take_ids = !self.cards.is_empty()
            && self
                .cards
                .values()
                .all(|card| card.engine.as_ref().is_some_and(|engine| engine.token_ids));
        let already_ids =
            matches!(request.data().as_ref(), LlmRequest::Completion(c) if matches!(c.prompt, Prompt::Tokens(_)));
        if !all_take_ids || already_ids {
            return request;
        }
        match with_prompt_tokens(request.data(), tokens.to_vec()) {
            Some(as_ids) => {
                let (_, controller) = request.into_parts();
                Context::with_controller(Arc::new(as_ids), controller)
            }
            None => request,
        }
    }

    /// True when at least one of its workers is in discovery right now.
    pub fn has_live_worker(&self) -> bool {
        let live = self.router.client().instances();
        self.cards.keys().any(|id| live.iter().any(|i| i.instance_id == *id))
    }
}

/// The models known to this frontend, shared by its handlers.
#[derive(Debug, Clone)]
pub struct ModelManager {
    drt: DistributedRuntime,
    settings: RouterSettings,
    /// KV mode's settings and metrics.
    kv: Option<(KvSettings, KvMetrics)>,
    models: Arc<RwLock<BTreeMap<String, Model>>>,
    /// Which model each card key belongs to, to apply deletes.
    cards: Arc<RwLock<BTreeMap<Key, String>>>,
    /// Serve only cards registered in this namespace (`--model-namespace`).
    namespace: Option<String>,
    /// Cards that claim a model served on another endpoint: kept, so the
    /// choice between endpoints depends only on what discovery holds (see
    /// [`ModelManager::put`]), and counted in `conflicts`.
    waiting: Arc<RwLock<BTreeMap<Key, ModelCard>>>,
    /// `dynamo_frontend_model_conflicts`: cards waiting that way.
    conflicts: prometheus::IntGauge,
}

/// A model claimed by more than one endpoint: the one serving it and the others.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Conflict {
    pub model: String,
    pub serving: String,
    pub claimed_by: Vec<String>,
}

impl ModelManager {
    /// The manager of `drt`'s models; `namespace` limits them to cards
    /// registered there.
    pub fn new(
        drt: DistributedRuntime,
        settings: RouterSettings,
        kv: Option<(KvSettings, KvMetrics)>,
        namespace: Option<String>,
    ) -> Result<Self, switchyard_runtime::metrics::MetricsError> {
        let conflicts = prometheus::IntGauge::new(
            "dynamo_frontend_model_conflicts",
            "Model cards ignored because another endpoint serves their model (see /health)",
        )?;
        drt.process_metrics().register(Box::new(conflicts.clone()))?;
        Ok(Self {
            drt,
            settings,
            kv,
            models: Arc::default(),
            cards: Arc::default(),
            namespace,
            waiting: Arc::default(),
            conflicts,
        })
    }

    /// Models claimed by more than one endpoint, for `/health`.
    pub fn conflicts(&self) -> Vec<Conflict> {
        let models = self.models.read().expect("models lock");
        let mut by_model: BTreeMap<String, std::collections::BTreeSet<String>> = BTreeMap::new();
        for card in self.waiting.read().expect("waiting lock").values() {
            by_model
                .entry(card.name.clone())
                .or_default()
                .insert(card.endpoint_path());
        }
        by_model
            .into_iter()
            .map(|(model, claimed)| Conflict {
                serving: models.get(&model).map(|m| m.endpoint_path.clone()).unwrap_or_default(),
                model,
                claimed_by: claimed.into_iter().collect(),
            })
            .collect()
    }

    /// The KV router's metrics, in KV mode (the mesh page reads them).
    pub fn kv_metrics(&self) -> Option<&KvMetrics> {
        self.kv.as_ref().map(|(_, metrics)| metrics)
    }

    pub fn get(&self, name: &str) -> Option<Model> {
        self.models.read().expect("models lock").get(name).cloned()
    }

    /// All models, sorted by name.
    pub fn list(&self) -> Vec<Model> {
        self.models.read().expect("models lock").values().cloned().collect()
    }

    /// Follows `v1/models` until `stop`. Returns once the first snapshot has
    /// been applied, so a frontend that starts after its workers knows them.
    pub async fn watch(&self, stop: CancellationToken) -> Result<(), DiscoveryError> {
        let query = Query::bucket(Bucket::Models);
        let mut events = self.open(&query).await?;
        if let Some(Ok(first)) = events.next().await {
            self.apply(first).await;
        }
        let manager = self.clone();
        self.drt.runtime().spawn(async move {
            loop {
                let event = tokio::select! {
                    _ = stop.cancelled() => return,
                    event = events.next() => event,
                };
                match event {
                    Some(Ok(event)) => manager.apply(event).await,
                    failed => {
                        if let Some(Err(error)) = failed {
                            tracing::warn!(%error, "model watch failed; re-opening");
                        }
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            _ = tokio::time::sleep(REWATCH_PAUSE) => {}
                        }
                        match manager.open(&query).await {
                            Ok(reopened) => events = reopened,
                            Err(error) => {
                                tracing::warn!(error = %Report(&error), "cannot re-open the model watch")
                            }
                        }
                    }
                }
            }
        });
        Ok(())
    }

    async fn open(&self, query: &Query) -> Result<switchyard_runtime::discovery::WatchStream, DiscoveryError> {
        self.drt.discovery().watch(query).await
    }

    async fn apply(&self, event: WatchEvent) {
        match event {
            WatchEvent::Snapshot(registrations) => {
                let known: Vec<Key> = self.cards.read().expect("cards lock").keys().cloned().collect();
                let incoming: Vec<Key> = registrations.iter().map(|r| r.key.clone()).collect();
                let waiting: Vec<Key> = self.waiting.read().expect("waiting lock").keys().cloned().collect();
                for key in known.iter().chain(&waiting).filter(|k| !incoming.contains(k)) {
                    self.remove(key).await;
                }
                for registration in registrations {
                    self.put(&registration).await;
                }
            }
            WatchEvent::Put(registration) => self.put(&registration).await,
            WatchEvent::Delete(key) => self.remove(&key).await,
        }
    }

    /// Adds a worker's card. A model is served from one endpoint. When
    /// cards of one model name come from several endpoints (a namespace set
    /// up twice — or someone with write access to discovery trying to take
    /// a model's traffic), the endpoint whose path sorts first serves it,
    /// whatever the order the cards arrived in, so a restart makes the same
    /// choice; the others' cards wait, are logged as a conflict and counted
    /// in `dynamo_frontend_model_conflicts`, and `/health` lists them.
    /// `--model-namespace` keeps other namespaces out altogether.
    async fn put(&self, registration: &switchyard_runtime::discovery::Registration) {
        let card = match ModelCard::from_registration(registration) {
            Ok(card) => card,
            Err(error) => {
                tracing::warn!(error = %Report(&error), "ignoring a model card");
                return;
            }
        };
        if let Some(namespace) = &self.namespace
            && registration.key.namespace != *namespace
        {
            tracing::debug!(model = %card.name, endpoint = %card.endpoint_path(), "ignoring a card outside --model-namespace");
            return;
        }
        if let Some(model) = self.get(&card.name)
            && model.endpoint_path != card.endpoint_path()
        {
            let claimant = card.endpoint_path();
            if claimant > model.endpoint_path {
                tracing::error!(
                    model = %card.name,
                    serving = %model.endpoint_path,
                    ignored = %claimant,
                    "two endpoints claim one model: serving the one whose path sorts first; set --model-namespace, and find who registered the other"
                );
                self.wait(registration.key.clone(), card);
                return;
            }
            tracing::error!(
                model = %card.name,
                was_serving = %model.endpoint_path,
                now_serving = %claimant,
                "two endpoints claim one model: the new one's path sorts first, so it serves the model now; set --model-namespace, and find who registered the other"
            );
            self.demote(&card.name);
        }
        self.serve(registration.key.clone(), card).await;
    }

    /// Sets `card` aside: its model is served on another endpoint.
    fn wait(&self, key: Key, card: ModelCard) {
        let mut waiting = self.waiting.write().expect("waiting lock");
        waiting.insert(key, card);
        self.conflicts.set(waiting.len() as i64);
    }

    /// Moves every card of `name` to the waiting set and drops the model.
    fn demote(&self, name: &str) {
        let Some(model) = self.models.write().expect("models lock").remove(name) else {
            return;
        };
        let keys: Vec<Key> = {
            let mut cards = self.cards.write().expect("cards lock");
            let keys: Vec<Key> = cards
                .iter()
                .filter(|(_, m)| *m == name)
                .map(|(k, _)| k.clone())
                .collect();
            for key in &keys {
                cards.remove(key);
            }
            keys
        };
        for key in keys {
            if let Some(card) = model.cards.get(&key.instance_id) {
                self.wait(key, card.clone());
            }
        }
    }

    /// Serves `card` on its model (created with its router when new).
    async fn serve(&self, key: Key, card: ModelCard) {
        let existing = self.get(&card.name);
        let (router, kv, tokenizer) = match existing {
            Some(model) => (model.router, model.kv, model.tokenizer),
            None => match self.build_router(&card).await {
                Ok(router) => {
                    let kv = self.build_kv(&card);
                    let tokenizer = match kv {
                        Some(_) => ModelTokenizer::load(&card).await,
                        None => ModelTokenizer::default(),
                    };
                    (Arc::new(router), kv, tokenizer)
                }
                Err(error) => {
                    tracing::warn!(model = %card.name, error = %Report(&error), "cannot route to this model");
                    return;
                }
            },
        };
        if let (Some(kv), Some(source)) = (&kv, &card.kv_events) {
            kv.follow(card.instance_id, source, self.drt.runtime());
        }
        let name = card.name.clone();
        {
            let mut models = self.models.write().expect("models lock");
            let model = models.entry(name.clone()).or_insert_with(|| Model {
                name: name.clone(),
                endpoint_path: card.endpoint_path(),
                cards: BTreeMap::new(),
                router,
                kv,
                tokenizer,
            });
            model.cards.insert(card.instance_id, card);
        }
        if self
            .cards
            .write()
            .expect("cards lock")
            .insert(key, name.clone())
            .is_none()
        {
            tracing::info!(model = %name, "model worker added");
        }
    }

    async fn remove(&self, key: &Key) {
        {
            let mut waiting = self.waiting.write().expect("waiting lock");
            if waiting.remove(key).is_some() {
                self.conflicts.set(waiting.len() as i64);
                return;
            }
        }
        let Some(name) = self.cards.write().expect("cards lock").remove(key) else {
            return;
        };
        let gone = {
            let mut models = self.models.write().expect("models lock");
            let Some(model) = models.get_mut(&name) else {
                return;
            };
            model.cards.remove(&key.instance_id);
            if let Some(kv) = &model.kv {
                kv.remove(key.instance_id);
            }
            let gone = model.cards.is_empty();
            if gone {
                models.remove(&name);
                tracing::info!(model = %name, "model removed: its last worker left");
            }
            gone
        };
        if gone {
            self.promote(&name).await;
        }
    }

    /// After `name`'s serving endpoint left: the waiting endpoint whose path
    /// sorts first serves it now.
    async fn promote(&self, name: &str) {
        let next: Vec<(Key, ModelCard)> = {
            let mut waiting = self.waiting.write().expect("waiting lock");
            let Some(endpoint) = waiting
                .values()
                .filter(|card| card.name == name)
                .map(ModelCard::endpoint_path)
                .min()
            else {
                return;
            };
            let keys: Vec<Key> = waiting
                .iter()
                .filter(|(_, card)| card.name == name && card.endpoint_path() == endpoint)
                .map(|(key, _)| key.clone())
                .collect();
            let next = keys
                .into_iter()
                .filter_map(|key| waiting.remove(&key).map(|card| (key, card)))
                .collect();
            self.conflicts.set(waiting.len() as i64);
            next
        };
        if let Some((_, card)) = next.first() {
            tracing::warn!(model = %name, now_serving = %card.endpoint_path(), "the model's endpoint left; another that claims it serves it now");
        }
        for (key, card) in next {
            self.serve(key, card).await;
        }
    }

    async fn build_router(&self, card: &ModelCard) -> Result<LlmRouter, RouteError> {
        let endpoint = self
            .drt
            .namespace(&card.namespace)
            .and_then(|ns| ns.component(&card.component))
            .map(|component| component.endpoint(&card.endpoint))?;
        let client = endpoint.client().await?;
        let mut router = LlmRouter::from_client(client.clone(), self.settings.mode).await?;
        if matches!(
            self.settings.mode,
            RouterMode::LeastLoaded | RouterMode::PowerOfTwo | RouterMode::Kv
        ) {
            router = match router.with_load_reports().await {
                Ok(router) => router,
                Err(error) => {
                    // The event plane is down (NATS unreachable): serve the model
                    // anyway, routing by this frontend's own in-flight counts.
                    tracing::warn!(model = %card.name, error = %Report(&error), "routing without load reports");
                    LlmRouter::from_client(client, self.settings.mode).await?
                }
            };
        }
        if let Some(limit) = self.settings.first_token_timeout {
            router = router.with_first_item_timeout(limit, "--first-token-timeout-secs");
        }
        if let Some(limit) = self.settings.busy_threshold {
            router = router.with_busy_threshold(limit);
            if !self.settings.max_wait.is_zero() {
                router = router.with_wait_queue(self.settings.max_wait, self.settings.max_queued);
            }
        }
        Ok(router)
    }
}
impl ModelManager {
    /// The KV state for the model of `card`, in KV mode: block size from the
    /// card, else from `--kv-cache-block-size`.
    fn build_kv(&self, card: &ModelCard) -> Option<Arc<KvRouting>> {
        let (settings, metrics) = self.kv.as_ref()?;
        let block_size = card
            .capacity
            .kv_cache_block_size
            .and_then(|size| u32::try_from(size).ok())
            .filter(|size| (1..=65536).contains(size))
            .unwrap_or(settings.block_size);
        let routing = KvRouting::new(&card.name, *settings, block_size, metrics.clone())?;
        tracing::info!(model = %card.name, block_size, events = settings.use_events, "KV-aware routing");
        Some(Arc::new(routing))
    }
}

/// Why a model card's endpoint cannot be routed to.
#[derive(Debug, thiserror::Error)]
enum RouteError {
    #[error("the card names an endpoint that cannot exist")]
    Name(#[from] NameError),
    #[error("cannot follow the endpoint's instances")]
    Client(#[from] ClientError),
    #[error("cannot build the router")]
    Router(#[from] RequestError),
}
