//! The model card: what a worker registers under
//! `v1/models/{namespace}/{component}/{endpoint}/{instance_id:x}` so that
//! frontends know which model it serves, on which endpoint, and how much it
//! can take. The card lives and dies with the worker's discovery lease.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use switchyard_runtime::component::Endpoint;
use switchyard_runtime::discovery::{Bucket, DiscoveryError, Key, Registration};

/// Which OpenAI routes a model answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    /// `POST /v1/chat/completions`.
    Chat,
    /// `POST /v1/completions`.
    Completions,
}

/// Hints a router can use to judge how full a worker is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Capacity {
    /// Sequences the engine runs at once.
    pub max_num_seqs: Option<u64>,
    /// Tokens the engine batches in one step.
    pub max_num_batched_tokens: Option<u64>,
    /// KV-cache blocks, and tokens per block.
    pub total_kv_blocks: Option<u64>,
    pub kv_cache_block_size: Option<u64>,
}

/// How a router can know a request's prompt tokens as this worker's engine
/// will see them (KV-aware routing hashes them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TokenizerSpec {
    /// The mocker's deterministic word tokenizer over
    /// [`LlmRequest::flat_prompt`](crate::protocol::LlmRequest::flat_prompt).
    Mocker,
    /// A Hugging Face model directory (`tokenizer.json`,
    /// `tokenizer_config.json`) on the router's machine.
    HfDir { path: String },
}

/// Where the worker's engine publishes its KV cache events (vLLM's ZMQ
/// format), so routers subscribe to the engine directly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvEventsSource {
    /// The engine's ZMQ PUB address, e.g. `tcp://10.0.0.5:5557`.
    pub endpoint: String,
    /// Its replay (ROUTER) address, when it keeps a replay buffer.
    #[serde(default)]
    pub replay_endpoint: Option<String>,
    /// The topic the engine publishes on (`""` for any).
    #[serde(default)]
    pub topic: String,
}

/// What the engine behind a worker offers, as the worker found out by
/// asking it (never assumed from a flag): how its liveness is probed, where
/// its load comes from, and — what frontends read — how a request it was
/// answering can continue on another worker after this one is lost.
/// Switchyard's own engines (the mocker) register no such facts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineFeatures {
    /// The server, as far as its routes and metrics tell: `vllm`, `sglang`,
    /// `llama.cpp`, `llama-cpp-python`, or `openai-compatible` when nothing
    /// tells.
    pub server: String,
    /// How the worker tells that the server is alive.
    pub liveness: Liveness,
    /// The server runs one request at a time and cuts the running one short
    /// when another arrives (llama-cpp-python's `interrupt_requests`), so
    /// the worker sends it one request at a time.
    #[serde(default)]
    pub one_at_a_time: bool,
    /// Where the instance's load comes from.
    pub load: LoadGauges,
    /// `/v1/completions` takes a prompt of token ids and reports the ids
    /// it generates (vLLM's `return_token_ids`).
    pub token_ids: bool,
    /// Chat continues a final assistant message instead of starting a new
    /// one (vLLM's and SGLang's `continue_final_message`).
    pub continues_message: bool,
}

impl EngineFeatures {
    /// One line for people (`switchyard instances`): the server, its
    /// liveness route, where load comes from, and how answers migrate.
    pub fn describe(&self) -> String {
        let migration = match (self.token_ids, self.continues_message) {
            (true, _) => "token ids",
            (false, true) => "chat message",
            (false, false) => "off",
        };
        format!(
            "{} liveness={} load={}{} mid-answer-migration={migration}",
            self.server,
            self.liveness.as_str(),
            self.load.as_str(),
            if self.one_at_a_time { " one-at-a-time" } else { "" }
        )
    }
}

/// How a worker polls an engine's liveness.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Liveness {
    /// `GET /health` answers 2xx (vLLM, SGLang, llama.cpp's server, TGI).
    Health,
    /// `GET /health` answers at all, below 500: a server without a health
    /// route (404), whose other routes may take the model's lock — on
    /// llama-cpp-python a `/v1/models` probe cuts the running answer short.
    AnyAnswer,
}

impl Liveness {
    pub fn as_str(self) -> &'static str {
        match self {
            Liveness::Health => "/health",
            Liveness::AnyAnswer => "any-answer",
        }
    }
}

/// Which load gauges an engine's `/metrics` carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoadGauges {
    /// `vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc`.
    Vllm,
    /// `sglang:num_queue_reqs`, `sglang:token_usage`.
    Sglang,
    /// `llamacpp:requests_deferred`, `llamacpp:kv_cache_usage_ratio`.
    LlamaCpp,
    /// None: the load is the worker's own count of requests in flight.
    InFlight,
}

impl LoadGauges {
    pub fn as_str(self) -> &'static str {
        match self {
            LoadGauges::Vllm => "vllm",
            LoadGauges::Sglang => "sglang",
            LoadGauges::LlamaCpp => "llama.cpp",
            LoadGauges::InFlight => "in-flight",
        }
    }
}

/// One worker's advertisement of one model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelCard {
    /// The `model` clients put in requests.
    pub name: String,
    pub kinds: Vec<ModelKind>,
    /// Longest prompt plus output, in tokens.
    pub context_length: u32,
    #[serde(default)]
    pub capacity: Capacity,
    /// The endpoint that serves the model, and the worker instance.
    pub namespace: String,
    pub component: String,
    pub endpoint: String,
    pub instance_id: u64,
    /// How to tokenize prompts as the engine does (KV-aware routing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<TokenizerSpec>,
    /// Where the engine's KV events can be subscribed to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_events: Option<KvEventsSource>,
    /// What the engine offers, for a worker in front of an external engine
    /// (`switchyard worker vllm`); `None` for Switchyard's own engines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<EngineFeatures>,
}

impl ModelCard {
    /// A card for `name` served on `endpoint` by this process.
    pub fn new(name: impl Into<String>, endpoint: &Endpoint, kinds: Vec<ModelKind>, context_length: u32) -> Self {
        Self {
            name: name.into(),
            kinds,
            context_length,
            capacity: Capacity::default(),
            namespace: endpoint.namespace().to_string(),
            component: endpoint.component().to_string(),
            endpoint: endpoint.name().to_string(),
            instance_id: endpoint.drt().instance_id(),
            tokenizer: None,
            kv_events: None,
            engine: None,
        }
    }

    pub fn key(&self) -> Key {
        Key {
            bucket: Bucket::Models,
            namespace: self.namespace.clone(),
            component: self.component.clone(),
            name: self.endpoint.clone(),
            instance_id: self.instance_id,
        }
    }

    /// `namespace/component/endpoint`, the same path as the endpoint's.
    pub fn endpoint_path(&self) -> String {
        format!("{}/{}/{}", self.namespace, self.component, self.endpoint)
    }

    pub fn serves(&self, kind: ModelKind) -> bool {
        self.kinds.contains(&kind)
    }

    pub fn to_registration(&self) -> Registration {
        Registration {
            key: self.key(),
            value: Bytes::from(serde_json::to_vec(self).expect("a model card always serializes")),
        }
    }

    /// Reads a registration back; the key must agree with the card.
    pub fn from_registration(registration: &Registration) -> Result<Self, CardError> {
        let card: ModelCard = serde_json::from_slice(&registration.value).map_err(|source| CardError::Json {
            key: registration.key.to_string(),
            source,
        })?;
        if card.key() != registration.key {
            return Err(CardError::KeyMismatch {
                key: registration.key.to_string(),
                card_key: card.key().to_string(),
            });
        }
        if card.name.is_empty() || card.kinds.is_empty() {
            return Err(CardError::Incomplete {
                key: registration.key.to_string(),
            });
        }
        Ok(card)
    }

    /// Registers the card in `endpoint`'s discovery. Register it after the
    /// endpoint serves, so a frontend that sees the card can route at once.
    pub async fn register(&self, endpoint: &Endpoint) -> Result<(), DiscoveryError> {
        endpoint.drt().discovery().register(self.to_registration()).await
    }

    /// Removes the card (a worker starting to drain does this first, so
    /// frontends stop sending it new requests).
    pub async fn unregister(&self, endpoint: &Endpoint) -> Result<(), DiscoveryError> {
        endpoint.drt().discovery().unregister(&self.key()).await
    }
}

/// A registration under `v1/models/` that is not a usable card.
#[derive(Debug, thiserror::Error)]
pub enum CardError {
    #[error("{key} does not hold a model card")]
    Json {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{key} holds the card of {card_key}")]
    KeyMismatch { key: String, card_key: String },
    #[error("{key} holds a card without a model name or without kinds")]
    Incomplete { key: String },
}
