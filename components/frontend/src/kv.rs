//! KV-cache-aware routing in the frontend (`--router-mode kv`): for each
//! request, which workers already hold its prompt's leading blocks, and the
//! cheapest worker once that cached prefix and each worker's load are
//! weighed (the formulas are in `switchyard_kv_router::select`).
//!
//! Per model, one [`KvRouting`] keeps:
//! - the *event index*: what each worker's engine says it caches (its KV
//!   events, [`crate::kv_events`]);
//! - the *approximate index*: what this router sent where, for workers whose
//!   engine publishes no events (entries live two minutes);
//! - the *predicted index*: what this router sent where in the last few
//!   seconds, so sibling requests that arrive before the engine's first
//!   event still find each other;
//! - the *booked load*: blocks of prefill and of decode this router sent to
//!   each worker and that are not done yet ([`Booking`]).
//!
//! All four sit behind one mutex, held for microseconds per request (the
//! index lookup is the costly part; `docs/kv-routing-core.md` has figures).

use prometheus::{Histogram, HistogramOpts, IntCounter, IntGaugeVec, Opts};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use switchyard_kv_events::{Delivery, SubscriberConfig, Subscription, subscribe};
use switchyard_kv_router::approx::TtlIndex;
use switchyard_kv_router::events::EventBatch;
use switchyard_kv_router::hash::{BlockHasher, LocalBlockHash, SequenceHash, sequence_hashes};
use switchyard_kv_router::index::{IndexConfig, KvIndex};
use switchyard_kv_router::overlap::Overlaps;
use switchyard_kv_router::select::{Candidate, Choice, CostConfig, select};
use switchyard_kv_router::worker::WorkerId;
use switchyard_llm::model_card::KvEventsSource;
use switchyard_runtime::error::Report;
use switchyard_runtime::instance::Instance;
use switchyard_runtime::metrics::{Metrics, MetricsError};
use switchyard_runtime::routing::{LoadView, Policy};
use switchyard_runtime::runtime::Runtime;
use tokio::time::Instant;

/// Output tokens a request is expected to generate when it sets no limit.
pub const EXPECTED_OUTPUT_TOKENS: u32 = 256;

/// Output counted per request at most, whatever its limit (limits are
/// often set far above what answers use).
pub const EXPECTED_OUTPUT_TOKENS_CAP: u32 = 1024;

/// Event deliveries waiting to be applied, per engine; when full, the
/// subscriber waits (and the engine's PUB socket buffers, then drops, which
/// shows up as a gap).
const DELIVERY_QUEUE: usize = 1024;

/// The KV router's settings (flags of `switchyard frontend`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KvSettings {
    /// Weights, temperature.
    pub cost: CostConfig,
    /// Tokens per block when the model's cards do not say.
    pub block_size: u32,
    /// Subscribe to the engines' KV events (else approximate only).
    pub use_events: bool,
}

/// What the index says about one request, computed before routing.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Blocks of the prompt, counting a trailing partial one.
    pub request_blocks: u64,
    /// Blocks the answer may grow (from `max_tokens`).
    pub output_blocks: u64,
    /// The full blocks' sequence hashes (for the TTL indexes).
    sequence: Vec<SequenceHash>,
    /// Per worker, leading blocks of the prompt it holds.
    overlaps: Overlaps,
    /// True when the workers are scored from what this router sent rather
    /// than from their engines' events (no events flow, or the prompt's
    /// tokens are not exactly the engine's).
    pub approximate: bool,
}

/// The KV state of one model's workers, shared by its requests.
#[derive(Debug)]
pub struct KvRouting {
    /// The model, for metric labels.
    model: String,
    settings: KvSettings,
    hasher: BlockHasher,
    state: Mutex<State>,
    metrics: KvMetrics,
    /// Per instance, the subscription to its engine's KV events (dropping
    /// one stops it).
    subscriptions: Mutex<HashMap<u64, Subscription>>,
}

#[derive(Debug)]
struct State {
    index: KvIndex,
    approximate: TtlIndex,
    predicted: TtlIndex,
    booked: HashMap<u64, Booked>,
    /// Per worker, the full blocks of the requests booked on it, each with
    /// the number of those requests that hold it: requests sharing a prefix
    /// on one worker share its blocks, so they count once (Dynamo's
    /// active-block accounting).
    active: HashMap<u64, HashMap<SequenceHash, u32>>,
    /// Instances whose engine events are followed (and not lost since), so
    /// the approximate index does not stand in for them.
    with_events: HashSet<u64>,
}

/// Predicted work a worker has from this router.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Booked {
    prefill_blocks: u64,
    /// Private blocks: a request's partial trailing prompt block and the
    /// blocks its answer may grow (its full prompt blocks, which requests
    /// can share, are in `State::active`).
    decode_blocks: u64,
    /// Requests behind those blocks.
    requests: u64,
}

impl Plan {
    /// The `x-switchyard-route` value, e.g.
    /// `mode=kv;index=events;blocks=40;worker=1f;overlap=32;cost=48;runner_up=2a;runner_up_overlap=0;runner_up_cost=80`.
    pub fn explain(&self, choice: Option<Choice>) -> String {
        let index = if self.approximate { "approximate" } else { "events" };
        let mut text = format!("mode=kv;index={index};blocks={}", self.request_blocks);
        if let Some(choice) = choice {
            text.push(';');
            text.push_str(&choice.to_string());
        }
        text
    }
}

impl KvRouting {
    /// Routing for a model whose engines use `block_size` tokens per block.
    pub fn new(model: &str, settings: KvSettings, block_size: u32, metrics: KvMetrics) -> Option<Self> {
        let hasher = BlockHasher::new(block_size, None)?;
        Some(Self {
            model: model.to_string(),
            settings,
            hasher,
            state: Mutex::new(State {
                index: KvIndex::new(IndexConfig::new(block_size)),
                approximate: TtlIndex::approximate(),
                predicted: TtlIndex::predicted(),
                booked: HashMap::new(),
                active: HashMap::new(),
                with_events: HashSet::new(),
            }),
            metrics,
            subscriptions: Mutex::default(),
        })
    }

    pub fn block_size(&self) -> u32 {
        self.hasher.block_size()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Every update leaves the indexes consistent, so a poisoned lock is usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Looks the prompt `tokens` up in the indexes. When the tokens are not
    /// `exact` (the engine's tokenizer is not known here), the engines' own
    /// events cannot match them, so only what this router sent counts.
    ///
    /// `max_tokens` is the client's output limit: the blocks the answer
    /// may grow count as the request's own load on its worker (Dynamo's
    /// output-block tracking), which is what spreads one hot prefix over
    /// several workers. Without a limit, [`EXPECTED_OUTPUT_TOKENS`].
    pub fn plan(&self, tokens: &[u32], exact: bool, max_tokens: Option<u32>) -> Plan {
        let started = Instant::now();
        let locals: Vec<LocalBlockHash> = self.hasher.local_hashes(tokens);
        let sequence = sequence_hashes(&locals);
        // Hashing takes microseconds; the TTL indexes count in seconds.
        let now = started;
        let mut state = self.lock();
        let from_events = if exact {
            state.index.find_matches(&locals)
        } else {
            Overlaps::default()
        };
        let approximate = state.approximate.find_matches(&sequence, now);
        let predicted = state.predicted.find_matches(&sequence, now);
        let approximate_used = !exact || state.with_events.is_empty();
        drop(state);
        let overlaps = from_events.max(&approximate).max(&predicted);
        self.metrics.indexer_seconds.observe(started.elapsed().as_secs_f64());
        Plan {
            request_blocks: tokens.len().div_ceil(self.block_size() as usize) as u64,
            output_blocks: u64::from(
                max_tokens
                    .unwrap_or(EXPECTED_OUTPUT_TOKENS)
                    .min(EXPECTED_OUTPUT_TOKENS_CAP),
            )
            .div_ceil(u64::from(self.block_size())),
            sequence,
            overlaps,
            approximate: approximate_used,
        }
    }

    /// The policy that routes `plan`'s request; it remembers its choice and
    /// books the request on the chosen worker at once (see [`KvPolicy`]).
    pub fn policy<'a>(self: &'a Arc<Self>, plan: &'a Plan) -> KvPolicy<'a> {
        KvPolicy {
            routing: self,
            plan,
            choice: Mutex::new(None),
            booking: Mutex::new(None),
        }
    }

    /// Books the request on `instance` (it was sent there): its blocks count
    /// as cached there from now on in the predicted index (and in the
    /// approximate one when the engine sends no events), and its work as
    /// that worker's load until the [`Booking`] says otherwise.
    pub fn book(self: &Arc<Self>, plan: &Plan, instance: u64) -> Booking {
        let worker = WorkerId::from(instance);
        let overlap = u64::from(plan.overlaps.get(worker));
        let booked = Booked {
            prefill_blocks: plan.request_blocks.saturating_sub(overlap),
            decode_blocks: plan.request_blocks - plan.sequence.len() as u64 + plan.output_blocks,
            requests: 1,
        };
        let now = Instant::now();
        {
            let mut state = self.lock();
            state.predicted.record(worker, &plan.sequence, now);
            if plan.approximate || !state.with_events.contains(&instance) {
                state.approximate.record(worker, &plan.sequence, now);
            }
            let entry = state.booked.entry(instance).or_default();
            entry.prefill_blocks += booked.prefill_blocks;
            entry.decode_blocks += booked.decode_blocks;
            entry.requests += booked.requests;
            let active = state.active.entry(instance).or_default();
            for block in &plan.sequence {
                *active.entry(*block).or_default() += 1;
            }
        }
        if plan.request_blocks > 0 {
            let rate = overlap as f64 / plan.request_blocks as f64;
            self.metrics.hit_rate.observe(rate.min(1.0));
        }
        self.metrics.overlap_blocks.observe(overlap as f64);
        Booking {
            routing: self.clone(),
            instance,
            prefill_pending: booked.prefill_blocks,
            decode_pending: booked.decode_blocks,
            blocks: plan.sequence.clone(),
        }
    }

    fn release(&self, instance: u64, prefill: u64, decode: u64, requests: u64, blocks: &[SequenceHash]) {
        let mut state = self.lock();
        if let Some(active) = state.active.get_mut(&instance) {
            for block in blocks {
                if let Some(refs) = active.get_mut(block) {
                    *refs -= 1;
                    if *refs == 0 {
                        active.remove(block);
                    }
                }
            }
            if active.is_empty() {
                state.active.remove(&instance);
            }
        }
        if let Some(entry) = state.booked.get_mut(&instance) {
            entry.prefill_blocks = entry.prefill_blocks.saturating_sub(prefill);
            entry.decode_blocks = entry.decode_blocks.saturating_sub(decode);
            entry.requests = entry.requests.saturating_sub(requests);
            if *entry == Booked::default() {
                state.booked.remove(&instance);
                state.active.remove(&instance);
            }
        }
    }

    /// Applies one batch of `instance`'s engine events.
    pub fn apply(&self, instance: u64, batch: &EventBatch) {
        let followed = self
            .subscriptions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&instance);
        if !followed {
            return; // a late batch of an instance that left
        }
        let worker = WorkerId::from(instance);
        let mut state = self.lock();
        state.with_events.insert(instance);
        for event in &batch.events {
            match state.index.apply(worker, event) {
                Ok(_) => self.metrics.events.inc(),
                Err(error) => {
                    self.metrics.refused_events.inc();
                    tracing::warn!(instance = format!("{instance:x}"), %error, "KV event refused");
                }
            }
        }
        self.count_blocks(&state, instance);
    }

    /// Forgets what `instance`'s engine said it caches (a gap that replay
    /// could not fill, an engine restart): it is scored from the
    /// approximate index until its events flow again.
    pub fn reset(&self, instance: u64) {
        let mut state = self.lock();
        state.index.remove_worker(WorkerId::from(instance));
        state.with_events.remove(&instance);
        self.count_blocks(&state, instance);
    }

    /// Subscribes to `instance`'s engine events at `source` (once per
    /// instance) and applies them until the instance is removed or `stop`.
    pub fn follow(self: &Arc<Self>, instance: u64, source: &KvEventsSource, runtime: &Runtime) {
        let mut subscriptions = self.subscriptions.lock().unwrap_or_else(|p| p.into_inner());
        if !self.settings.use_events || subscriptions.contains_key(&instance) {
            return;
        }
        let config = SubscriberConfig {
            replay_endpoint: source.replay_endpoint.clone(),
            topic: source.topic.clone(),
            ..SubscriberConfig::new(source.endpoint.clone())
        };
        let (sink, mut deliveries) = tokio::sync::mpsc::channel(DELIVERY_QUEUE);
        let subscription = match subscribe(config, sink, runtime.root_token().child_token()) {
            Ok(subscription) => subscription,
            Err(error) => {
                tracing::warn!(
                    instance = format!("{instance:x}"),
                    error = %Report(&error),
                    "cannot follow the engine's KV events; routing it from the approximate index"
                );
                return;
            }
        };
        tracing::info!(instance = format!("{instance:x}"), endpoint = %source.endpoint, "following KV events");
        let stats = subscription.stats().clone();
        subscriptions.insert(instance, subscription);
        // An engine with an empty cache has nothing to say yet; its
        // silence is exact, not a reason to guess.
        self.lock().with_events.insert(instance);
        let routing = self.clone();
        runtime.spawn(async move {
            let mut seen = (0, 0);
            while let Some(delivery) = deliveries.recv().await {
                match delivery {
                    Delivery::Batch { batch, .. } => {
                        routing.record_lag(batch.ts);
                        routing.apply(instance, &batch);
                    }
                    Delivery::Lost { from, to } => {
                        routing.metrics.lost_batches.inc_by(to.saturating_sub(from));
                        tracing::warn!(
                            instance = format!("{instance:x}"),
                            from,
                            to,
                            "KV events lost for good; forgetting what the engine had cached"
                        );
                        routing.reset(instance);
                    }
                    Delivery::Restarted { seq } => {
                        tracing::info!(
                            instance = format!("{instance:x}"),
                            seq,
                            "engine restarted; its KV index starts over"
                        );
                        routing.reset(instance);
                    }
                }
                let now = (stats.gaps(), stats.replays());
                routing.metrics.gaps.inc_by(now.0.saturating_sub(seen.0));
                routing.metrics.replays.inc_by(now.1.saturating_sub(seen.1));
                seen = now;
            }
        });
    }

    fn record_lag(&self, published: f64) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        if published.is_finite() && published > 0.0 {
            self.metrics.event_lag_seconds.observe((now - published).max(0.0));
        }
    }

    /// Forgets `instance` entirely: it left discovery.
    pub fn remove(&self, instance: u64) {
        self.subscriptions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&instance);
        let worker = WorkerId::from(instance);
        let mut state = self.lock();
        state.index.remove_worker(worker);
        state.approximate.remove_worker(worker);
        state.predicted.remove_worker(worker);
        state.with_events.remove(&instance);
        state.booked.remove(&instance);
        state.active.remove(&instance);
        self.count_blocks(&state, instance);
        let worker = format!("{instance:x}");
        let _ = self.metrics.worker_blocks.remove_label_values(&[&self.model, &worker]);
    }

    /// Brings the block gauges up to date for the model and `instance`.
    fn count_blocks(&self, state: &State, instance: u64) {
        self.metrics
            .indexed_blocks
            .with_label_values(&[&self.model])
            .set(state.index.stats().blocks as i64);
        let worker = format!("{instance:x}");
        let blocks = state.index.worker_blocks(WorkerId::from(instance));
        self.metrics
            .worker_blocks
            .with_label_values(&[&self.model, &worker])
            .set(blocks as i64);
    }

    /// Why `instance` is not scored by its cache, when it is not.
    pub fn excluded(&self, instance: u64) -> Option<String> {
        let state = self.lock();
        state.index.is_excluded(WorkerId::from(instance)).then(|| {
            format!(
                "its engine's KV block size differs from the router's {} tokens; routed by load only",
                self.block_size()
            )
        })
    }

    /// Blocks the event index holds for `instance`.
    pub fn worker_blocks(&self, instance: u64) -> usize {
        self.lock().index.worker_blocks(WorkerId::from(instance))
    }
}

/// Chooses for one request by cost; see [`KvRouting`].
///
/// The request is booked on its worker the moment it is chosen, not when
/// the worker's first piece comes back: the router waits for that piece
/// (to retry elsewhere on a failure before any output), and a request that
/// sits unbooked through its queueing and prefill is invisible to the
/// requests routed meanwhile, which then pile onto the busiest worker and
/// miss the sibling it is about to cache. A retry moves the booking.
#[derive(Debug)]
pub struct KvPolicy<'a> {
    routing: &'a Arc<KvRouting>,
    plan: &'a Plan,
    choice: Mutex<Option<Choice>>,
    booking: Mutex<Option<Booking>>,
}

impl KvPolicy<'_> {
    /// The last choice made (the one that was sent, after a retry).
    pub fn choice(&self) -> Option<Choice> {
        *self.choice.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The booking of the request on `instance`, where it was sent: the one
    /// made when this policy chose it, or a new one when the router sent it
    /// elsewhere (every instance ejected, so it tried one in turn).
    pub fn into_booking(self, instance: u64) -> Booking {
        let booking = self.booking.into_inner().unwrap_or_else(|p| p.into_inner());
        match booking {
            Some(booking) if booking.instance == instance => booking,
            other => {
                drop(other);
                self.routing.book(self.plan, instance)
            }
        }
    }
}

impl Policy for KvPolicy<'_> {
    fn select(&self, instances: &[Instance], loads: &dyn LoadView) -> Option<usize> {
        let state = self.routing.lock();
        let candidates: Vec<Candidate> = instances
            .iter()
            .filter(|i| loads.available(i.instance_id))
            .map(|i| {
                let worker = WorkerId::from(i.instance_id);
                let booked = state.booked.get(&i.instance_id).copied().unwrap_or_default();
                let excluded = state.index.is_excluded(worker);
                // Requests the worker reports beyond this router's (other
                // frontends' traffic, or a report not yet caught up), each
                // counted as one more answer growing: its prompt may well be
                // shared, and a stale report must not outweigh a cached prefix.
                let others = loads.load(i.instance_id).saturating_sub(booked.requests);
                // Its active blocks, and how many leading blocks of this
                // request are among them (those add no decode work).
                let (active, already) = match state.active.get(&i.instance_id) {
                    None => (0, 0),
                    Some(active) => (
                        active.len() as u64,
                        self.plan.sequence.iter().take_while(|b| active.contains_key(b)).count() as u64,
                    ),
                };
                Candidate {
                    worker,
                    overlap_blocks: if excluded { 0 } else { self.plan.overlaps.get(worker) },
                    active_prefill_blocks: booked.prefill_blocks,
                    active_decode_blocks: (active + booked.decode_blocks + others * self.plan.output_blocks)
                        .saturating_sub(already),
                    cached_blocks: state.index.worker_blocks(worker) as u64,
                }
            })
            .collect();
        drop(state);
        let choice = select(
            &self.routing.settings.cost,
            self.plan.request_blocks,
            &candidates,
            rand::random::<f64>(),
        )?;
        *self.choice.lock().unwrap_or_else(|p| p.into_inner()) = Some(choice);
        let booking = self.routing.book(self.plan, choice.chosen.worker.instance);
        // An earlier attempt's booking (a retry) is released outside the lock.
        let earlier = self.booking.lock().unwrap_or_else(|p| p.into_inner()).replace(booking);
        drop(earlier);
        instances
            .iter()
            .position(|i| i.instance_id == choice.chosen.worker.instance)
    }
}

/// One request's predicted load on its worker: prefill until its first
/// token ([`Booking::first_token`]), decode until it is dropped (the stream
/// ended, was cancelled, or moved to another worker).
#[derive(Debug)]
pub struct Booking {
    routing: Arc<KvRouting>,
    instance: u64,
    prefill_pending: u64,
    decode_pending: u64,
    /// The request's full blocks, counted in the worker's active blocks.
    blocks: Vec<SequenceHash>,
}

impl Booking {
    /// The worker produced its first token: its prefill is done.
    pub fn first_token(&mut self) {
        let prefill = std::mem::take(&mut self.prefill_pending);
        if prefill > 0 {
            self.routing.release(self.instance, prefill, 0, 0, &[]);
        }
    }
}

impl Drop for Booking {
    fn drop(&mut self) {
        self.routing.release(
            self.instance,
            self.prefill_pending,
            self.decode_pending,
            1,
            &self.blocks,
        );
    }
}

/// The KV router's metrics (labelled by nothing: one frontend's view).
#[derive(Debug, Clone)]
pub struct KvMetrics {
    /// Share of the prompt's blocks cached on the chosen worker (Dynamo's name).
    pub hit_rate: Histogram,
    pub overlap_blocks: Histogram,
    /// Time to hash the prompt and look it up.
    pub indexer_seconds: Histogram,
    /// Engine events applied to the index, and refused (wrong block size, inconsistent).
    pub events: IntCounter,
    pub refused_events: IntCounter,
    /// Blocks in the event index per model, all its workers together.
    pub indexed_blocks: IntGaugeVec,
    /// Blocks in the event index per model and worker (a worker's label
    /// goes when it leaves discovery).
    pub worker_blocks: IntGaugeVec,
    /// Event-stream sequence gaps seen, replays asked, batches lost for good.
    pub gaps: IntCounter,
    pub replays: IntCounter,
    pub lost_batches: IntCounter,
    /// Seconds between an engine publishing a batch and the router applying it.
    pub event_lag_seconds: Histogram,
}

impl KvMetrics {
    /// The metrics, registered in `scope`.
    pub fn register(scope: &Metrics) -> Result<Self, MetricsError> {
        let metrics = Self::create()?;
        for collector in metrics.collectors() {
            scope.register(collector)?;
        }
        Ok(metrics)
    }

    fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        vec![
            Box::new(self.hit_rate.clone()),
            Box::new(self.overlap_blocks.clone()),
            Box::new(self.indexer_seconds.clone()),
            Box::new(self.events.clone()),
            Box::new(self.refused_events.clone()),
            Box::new(self.indexed_blocks.clone()),
            Box::new(self.worker_blocks.clone()),
            Box::new(self.gaps.clone()),
            Box::new(self.replays.clone()),
            Box::new(self.lost_batches.clone()),
            Box::new(self.event_lag_seconds.clone()),
        ]
    }

    /// The metrics, not registered anywhere yet.
    fn create() -> Result<Self, MetricsError> {
        let fractions = vec![0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0];
        let blocks = vec![0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0];
        let micros = vec![1e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 5e-3, 1e-2];
        let lag = vec![1e-4, 1e-3, 5e-3, 1e-2, 5e-2, 0.1, 0.5, 1.0, 5.0];
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
        };
        let counter = |name: &str, help: &str| IntCounter::with_opts(Opts::new(name, help));
        let metrics = Self {
            hit_rate: histogram(
                "dynamo_component_router_kv_hit_rate",
                "Share of the prompt's blocks cached on the worker chosen by the KV router",
                fractions,
            )?,
            overlap_blocks: histogram(
                "dynamo_frontend_router_overlap_blocks",
                "Prompt blocks cached on the worker chosen by the KV router",
                blocks,
            )?,
            indexer_seconds: histogram(
                "dynamo_frontend_router_indexer_seconds",
                "Time to hash a prompt and find its cached prefix on every worker",
                micros,
            )?,
            events: counter(
                "dynamo_frontend_kv_events_total",
                "Engine KV events applied to the index",
            )?,
            refused_events: counter(
                "dynamo_frontend_kv_events_refused_total",
                "Engine KV events refused (block size mismatch, inconsistent event)",
            )?,
            indexed_blocks: IntGaugeVec::new(
                Opts::new(
                    "dynamo_frontend_kv_indexed_blocks",
                    "Blocks held in the KV router's event index, over all workers of a model",
                ),
                &["model"],
            )?,
            worker_blocks: IntGaugeVec::new(
                Opts::new(
                    "dynamo_frontend_kv_worker_blocks",
                    "Blocks held in the KV router's event index for one worker (hex instance id)",
                ),
                &["model", "worker_id"],
            )?,
            gaps: counter(
                "dynamo_frontend_kv_event_gaps_total",
                "Sequence gaps in engines' KV event streams",
            )?,
            replays: counter(
                "dynamo_frontend_kv_event_replays_total",
                "Replays asked of engines to fill KV event gaps",
            )?,
            lost_batches: counter(
                "dynamo_frontend_kv_event_lost_batches_total",
                "KV event batches no replay could recover (the worker's index was reset)",
            )?,
            event_lag_seconds: histogram(
                "dynamo_frontend_kv_event_lag_seconds",
                "Time from an engine publishing a KV event batch to the router applying it",
                lag,
            )?,
        };
        Ok(metrics)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_runtime::request_plane::Transport;

    fn instance(id: u64) -> Instance {
        Instance {
            namespace: "ns".into(),
            component: "c".into(),
            endpoint: "e".into(),
            instance_id: id,
            transport: Transport::Tcp(format!("127.0.0.1:{}", 1000 + id)),
        }
    }

    /// Requests in flight per instance, as the router's occupancy sees them
    /// (the larger of its own count and the worker's report).
    struct Reported(Vec<u64>);

    impl LoadView for Reported {
        fn load(&self, id: u64) -> u64 {
            self.0[id as usize]
        }
        fn available(&self, _: u64) -> bool {
            true
        }
        fn least_loaded(&self, _: &dyn Fn(u64) -> bool) -> Option<u64> {
            None
        }
    }

    fn routing() -> Arc<KvRouting> {
        let metrics = KvMetrics::create().unwrap();
        let settings = KvSettings {
            cost: CostConfig::default(),
            block_size: 4,
            use_events: false,
        };
        Arc::new(KvRouting::new("m", settings, 4, metrics).unwrap())
    }

    #[test]
    fn load_other_routers_put_on_a_worker_counts_against_it() {
        let routing = routing();
        let instances = [instance(0), instance(1)];
        let plan = routing.plan(&[1, 2, 3, 4, 5, 6, 7, 8], true, Some(4));
        // Worker 0 reports three requests this router did not send.
        let policy = routing.policy(&plan);
        assert_eq!(policy.select(&instances, &Reported(vec![3, 0])), Some(1));
        let choice = policy.choice().unwrap();
        // Each of the three counts as one more answer growing (1 output block).
        assert_eq!(choice.runner_up.unwrap().cost, 2.0 + 2.0 + 3.0 * 1.0, "{choice}");

        // Once this router has booked them itself, they are not counted twice.
        let bookings: Vec<Booking> = (0..3).map(|_| routing.book(&plan, 0)).collect();
        let plan = routing.plan(&[9, 9, 9, 9], true, Some(4));
        let policy = routing.policy(&plan);
        policy.select(&instances, &Reported(vec![3, 0]));
        let choice = policy.choice().unwrap();
        let zero = [Some(choice.chosen), choice.runner_up]
            .into_iter()
            .flatten()
            .find(|s| s.worker.instance == 0)
            .unwrap();
        assert_eq!(
            zero.cost,
            7.0 + (2.0 + 3.0 + 1.0),
            "prefill: 3 × 2 booked + 1; decode: the 2 shared blocks, 3 output blocks, this request's 1: {choice}"
        );
        drop(bookings);
    }

    #[test]
    fn a_request_counts_on_its_worker_from_the_moment_it_is_chosen() {
        let routing = routing();
        let instances = [instance(0), instance(1)];
        let idle = Reported(vec![0, 0]);
        let first = routing.plan(&[1, 2, 3, 4, 5, 6, 7, 8], true, Some(4));
        let first_policy = routing.policy(&first);
        let chosen = first_policy.select(&instances, &idle).unwrap();

        // The first request's worker has not answered yet (its stream is not
        // back), and already an unrelated request sees its load there...
        let other = routing.plan(&[9, 10, 11, 12], true, Some(4));
        let policy = routing.policy(&other);
        assert_eq!(policy.select(&instances, &idle), Some(1 - chosen));
        let choice = policy.choice().unwrap();
        assert!(choice.runner_up.unwrap().cost > choice.chosen.cost, "{choice}");
        drop(policy);

        // ... and a sibling sees the prefix it is about to cache there.
        let sibling = routing.plan(&[1, 2, 3, 4, 5, 6, 7, 8, 13], true, Some(4));
        let policy = routing.policy(&sibling);
        policy.select(&instances, &idle);
        let choice = policy.choice().unwrap();
        let on_chosen = [Some(choice.chosen), choice.runner_up]
            .into_iter()
            .flatten()
            .find(|s| s.worker.instance == chosen as u64)
            .unwrap();
        assert_eq!(on_chosen.overlap_blocks, 2, "{choice}");
        drop(policy);

        // Sent where it was chosen, the booking is handed over as it is;
        // sent elsewhere, it moves there.
        let kept = first_policy.into_booking(chosen as u64);
        assert_eq!(kept.instance, chosen as u64);
        let plan = routing.plan(&[20, 21, 22, 23], true, Some(4));
        let policy = routing.policy(&plan);
        let picked = policy.select(&instances, &idle).unwrap();
        assert_eq!(policy.into_booking(1 - picked as u64).instance, 1 - picked as u64);
    }
}
