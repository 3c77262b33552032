//! The async face of the mocker: a cheap-to-clone handle that queues requests, one scheduler task that
//! steps the pure [`Scheduler`] and sleeps the simulated time, and per-request token streams.
//!
//! This is the only module that touches tokio. It must not hold the state lock across an `.await`:
//! the lock is also taken from [`EngineStream`]'s `Drop`, which is what makes cancellation free the
//! KV blocks at once.
//!
//! An engine started with [`MockerEngine::start_with_kv_events`] also sends, after every step that
//! changed its prefix cache, one vLLM [`EventBatch`] into a bounded channel; it never waits for room.
//! Putting the batches on a wire (ZMQ, replay) is the caller's job.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::SystemTime;

use switchyard_kv_router::events::{EventBatch, KvEvent};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{Notify, mpsc, watch};
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::config::{ConfigError, MockerConfig};
use crate::scheduler::{Scheduler, SeqId, StepOutcome};

/// Stands in for an empty prompt: a real engine always has at least a beginning-of-sequence token,
/// and a sequence with nothing to prefill would never be scheduled.
pub const EMPTY_PROMPT_TOKEN: u32 = 0;

/// One generation request, already tokenized.
#[derive(Debug, Clone)]
pub struct EngineRequest {
    /// The prompt's token ids; an empty prompt is treated as `[EMPTY_PROMPT_TOKEN]`.
    pub prompt_tokens: Vec<u32>,
    /// Exactly this many tokens are generated.
    pub max_tokens: u32,
}

/// One item of an [`EngineStream`].
#[derive(Debug, Clone, PartialEq)]
pub enum EngineOutput {
    /// One generated token id per decode step.
    Token(u32),
    /// Always the last item of a request that ran to the end.
    Finished(FinishReason),
}

/// Why a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// `max_tokens` tokens were generated (the mocker never stops early).
    Length,
}

/// A snapshot of how busy the engine is, for load reporting and routing.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct EngineLoad {
    /// Sequences admitted and holding KV blocks.
    pub running: u64,
    /// Sequences queued, including preempted ones.
    pub waiting: u64,
    /// `active_blocks / total_blocks`, 0..=1.
    pub kv_usage: f32,
    /// `max_num_seqs`: how many sequences may run at once.
    pub capacity: u64,
    /// `num_gpu_blocks`.
    pub total_blocks: u64,
    /// Blocks referenced by a running sequence (cached prefixes nobody uses are not counted).
    pub active_blocks: u64,
}

/// Counters since the engine started. `submitted = completed + cancelled + in flight`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EngineStats {
    /// Requests accepted by `submit`.
    pub submitted: u64,
    /// Requests that generated all their tokens.
    pub completed: u64,
    /// Requests whose stream was dropped early, or that were cut off by shutdown.
    pub cancelled: u64,
    /// Times a sequence was pushed back to the queue for lack of KV blocks.
    pub preempted: u64,
    /// Prompt tokens served from the prefix cache instead of being prefilled.
    pub prefix_hit_tokens: u64,
    /// Tokens looked up in the prefix cache at admission (again after a preemption): the
    /// denominator of the hit rate, as vLLM's `prefix_cache_queries` counts.
    pub prefix_query_tokens: u64,
    /// Prompt tokens of accepted requests.
    pub prompt_tokens: u64,
    /// Tokens generated (including those of requests later cancelled).
    pub generated_tokens: u64,
    /// KV event batches handed to the events channel (0 when events are off).
    pub kv_event_batches_sent: u64,
    /// KV event batches lost because the events channel was full or closed: a listener's view of
    /// the cache has drifted since the first one.
    pub kv_event_batches_dropped: u64,
}

/// Why `submit` refused a request.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The request could never run: prompt plus output exceed the whole KV cache.
    #[error(
        "prompt of {prompt} tokens is too long: prompt + max_tokens must fit in the KV cache \
         (num_gpu_blocks x block_size tokens), which leaves room for at most {max} prompt tokens"
    )]
    PromptTooLong {
        /// Tokens in the prompt.
        prompt: usize,
        /// Largest prompt that fits with this request's `max_tokens`: `num_gpu_blocks * block_size - max_tokens`.
        max: usize,
    },
    /// `max_tokens` was 0; the mocker always generates exactly `max_tokens` tokens.
    #[error("max_tokens must be at least 1 (got 0)")]
    ZeroMaxTokens,
    /// The stop token was cancelled or every engine handle was dropped.
    #[error("the engine has stopped")]
    Stopped,
}

/// Handle to a running mocker engine. Cheap to clone (an `Arc` inside); the scheduler task stops when
/// the stop token is cancelled or the last handle is dropped.
#[derive(Debug, Clone)]
pub struct MockerEngine {
    shared: Arc<Shared>,
    /// Cancels the scheduler task when the last handle goes. Streams hold `shared` but not this, so
    /// forgotten streams cannot keep an engine nobody can submit to running forever.
    _alive: Arc<DropGuard>,
}

#[derive(Debug)]
struct Shared {
    config: MockerConfig,
    /// The scheduler task's stop signal (a child of the caller's token).
    stop: CancellationToken,
    /// Everything the scheduler task and the handles both change. A std mutex because it is only held
    /// for short, non-async critical sections, and must be lockable from `Drop`.
    state: Mutex<State>,
    /// Wakes the idle scheduler task when a request is queued.
    work: Notify,
    /// The latest load; a watch so readers get a consistent copy without locking `state`.
    load: watch::Sender<EngineLoad>,
    /// Where each step's KV events go, when the caller asked for them. Bounded and only ever
    /// `try_send`-ed, so a slow listener costs it batches, never the engine its pace.
    kv_events: Option<mpsc::Sender<EventBatch>>,
}

#[derive(Debug)]
struct State {
    scheduler: Scheduler,
    /// Where each live sequence's output goes; removed when it finishes or is cancelled.
    streams: HashMap<SeqId, mpsc::UnboundedSender<EngineOutput>>,
    stats: EngineStats,
    stopped: bool,
}

impl MockerEngine {
    /// Validates `config` and spawns the scheduler task on the current tokio runtime (so this must be
    /// called inside one). The task ends when `stop` is cancelled or every handle is dropped; streams
    /// still open then end without a `Finished` item.
    pub fn start(config: MockerConfig, stop: CancellationToken) -> Result<Self, ConfigError> {
        Self::spawn(config, stop, None)
    }

    /// Like [`Self::start`], and after every step that changed the prefix cache, sends the step's KV
    /// events as one [`EventBatch`] (`ts` the wall clock in seconds since the epoch, `events` in the
    /// order they happened, `data_parallel_rank` `None`) into `events`, exactly as vLLM with
    /// `--enable-prefix-caching` and KV events on would publish them: `BlockStored` when full prompt
    /// blocks become reusable, `BlockRemoved` when one is evicted. Replaying every batch in order into
    /// a KV index reproduces the engine's prefix cache.
    ///
    /// The engine never waits: when the channel is full (or closed), the batch is dropped and counted
    /// in [`EngineStats::kv_event_batches_dropped`], so size it for bursts (a step makes at most one
    /// batch; a few hundred batches is plenty for a publisher that keeps up).
    pub fn start_with_kv_events(
        config: MockerConfig,
        stop: CancellationToken,
        events: mpsc::Sender<EventBatch>,
    ) -> Result<Self, ConfigError> {
        Self::spawn(config, stop, Some(events))
    }

    fn spawn(
        config: MockerConfig,
        stop: CancellationToken,
        kv_events: Option<mpsc::Sender<EventBatch>>,
    ) -> Result<Self, ConfigError> {
        config.validate()?;
        let stop = stop.child_token();
        let mut scheduler = Scheduler::new(&config);
        if kv_events.is_some() {
            scheduler = scheduler.with_kv_events();
        }
        let initial_load = load_of(&scheduler, &config);
        let shared = Arc::new(Shared {
            config,
            stop: stop.clone(),
            state: Mutex::new(State {
                scheduler,
                streams: HashMap::new(),
                stats: EngineStats::default(),
                stopped: false,
            }),
            work: Notify::new(),
            load: watch::Sender::new(initial_load),
            kv_events,
        });
        tokio::spawn(run(Arc::clone(&shared)));
        tracing::debug!(config = ?shared.config, "mocker engine started");
        Ok(Self {
            shared,
            _alive: Arc::new(stop.drop_guard()),
        })
    }

    /// Queues a request. The stream yields exactly `max_tokens` `Token` items, then `Finished(Length)`.
    /// Dropping the stream before that cancels the request and frees its KV blocks at once.
    pub fn submit(&self, request: EngineRequest) -> Result<EngineStream, SubmitError> {
        let EngineRequest {
            mut prompt_tokens,
            max_tokens,
        } = request;
        if max_tokens == 0 {
            return Err(SubmitError::ZeroMaxTokens);
        }
        if prompt_tokens.is_empty() {
            prompt_tokens.push(EMPTY_PROMPT_TOKEN);
        }
        // Checked here because a request that cannot fit even in an empty cache would stall the queue.
        let max_prompt = self
            .shared
            .config
            .kv_capacity_tokens()
            .saturating_sub(max_tokens as usize);
        if prompt_tokens.len() > max_prompt {
            return Err(SubmitError::PromptTooLong {
                prompt: prompt_tokens.len(),
                max: max_prompt,
            });
        }
        let (sender, receiver) = mpsc::unbounded_channel();
        let id = {
            let mut state = self.shared.lock();
            if state.stopped || self.shared.stop.is_cancelled() {
                return Err(SubmitError::Stopped);
            }
            state.stats.submitted += 1;
            state.stats.prompt_tokens += prompt_tokens.len() as u64;
            let id = state.scheduler.add(prompt_tokens, max_tokens as usize);
            state.streams.insert(id, sender);
            self.shared.publish_load(&state);
            id
        };
        self.shared.work.notify_one();
        Ok(EngineStream {
            id,
            receiver,
            shared: Arc::clone(&self.shared),
            ended: false,
        })
    }

    /// The current load (no locking, no waiting).
    pub fn load(&self) -> EngineLoad {
        *self.shared.load.borrow()
    }

    /// Counters since start.
    pub fn stats(&self) -> EngineStats {
        self.shared.lock().stats
    }

    /// The validated configuration the engine runs with.
    pub fn config(&self) -> &MockerConfig {
        &self.shared.config
    }

    /// The changes of [`Self::load`]: `changed()` on the receiver resolves once the load changed
    /// since it last looked, so a change while its holder was busy is not missed (one receiver
    /// per call of a wait would miss it). Changes are coalesced: read `load()` after each wake-up
    /// rather than count wake-ups.
    pub fn load_changes(&self) -> watch::Receiver<EngineLoad> {
        self.shared.load.subscribe()
    }
}

/// The scheduler task: step, sleep the simulated time, deliver; wait for work when idle.
async fn run(shared: Arc<Shared>) {
    let stop = shared.stop.clone();
    loop {
        let Some((outcome, kv_events)) = shared.step() else {
            tokio::select! {
                () = stop.cancelled() => break,
                () = shared.work.notified() => continue,
            }
        };
        if outcome.duration.is_zero() {
            // speedup_ratio 0: no sleep, but let the consumers and other tasks run between steps.
            tokio::task::yield_now().await;
            if stop.is_cancelled() {
                break;
            }
        } else {
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(outcome.duration) => {}
            }
        }
        // Tokens appear when the step's simulated time is over, as on a real GPU; vLLM publishes the
        // step's KV events at the same point, with its outputs.
        shared.deliver(&outcome);
        shared.publish_kv_events(kv_events);
    }
    shared.shut_down();
    tracing::debug!("mocker engine stopped");
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves counters at worst slightly off; keep serving.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// One scheduler step, with the KV events it recorded (always empty when events are off).
    fn step(&self) -> Option<(StepOutcome, Vec<KvEvent>)> {
        let mut state = self.lock();
        let outcome = state.scheduler.step()?;
        // Every prefix cache change happens inside a step (cancelling only releases blocks), so
        // taking the events here and nowhere else loses none.
        let kv_events = state.scheduler.take_kv_events();
        let stats = &mut state.stats;
        stats.generated_tokens += outcome.tokens.len() as u64;
        stats.completed += outcome.finished.len() as u64;
        stats.preempted += outcome.preempted.len() as u64;
        stats.prefix_hit_tokens += outcome.prefix_hit_tokens as u64;
        stats.prefix_query_tokens += outcome.prefix_query_tokens as u64;
        self.publish_load(&state);
        Some((outcome, kv_events))
    }

    /// Sends one step's events as a batch, without waiting; see [`MockerEngine::start_with_kv_events`].
    fn publish_kv_events(&self, events: Vec<KvEvent>) {
        let Some(sender) = &self.kv_events else { return };
        if events.is_empty() {
            return;
        }
        let ts = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0.0, |since| since.as_secs_f64());
        let batch = EventBatch {
            ts,
            events,
            data_parallel_rank: None,
        };
        let sent = sender.try_send(batch);
        let mut state = self.lock();
        match sent {
            Ok(()) => state.stats.kv_event_batches_sent += 1,
            Err(error) => {
                state.stats.kv_event_batches_dropped += 1;
                if state.stats.kv_event_batches_dropped == 1 {
                    // Once is enough to say the listener's index is now stale; the counter says how much.
                    let reason = match error {
                        TrySendError::Full(_) => "the channel is full",
                        TrySendError::Closed(_) => "the receiver is gone",
                    };
                    tracing::warn!(
                        reason,
                        "mocker dropped a KV event batch; further drops are only counted"
                    );
                }
            }
        }
    }

    fn deliver(&self, outcome: &StepOutcome) {
        let mut state = self.lock();
        let mut gone = Vec::new();
        for &(id, token) in &outcome.tokens {
            if let Some(sender) = state.streams.get(&id)
                && sender.send(EngineOutput::Token(token)).is_err()
            {
                gone.push(id);
            }
        }
        for id in &outcome.finished {
            if let Some(sender) = state.streams.remove(id) {
                // The receiver may be gone already; the request is complete either way.
                let _ = sender.send(EngineOutput::Finished(FinishReason::Length));
            }
        }
        for id in gone {
            self.cancel_locked(&mut state, id);
        }
    }

    fn cancel(&self, id: SeqId) {
        let mut state = self.lock();
        self.cancel_locked(&mut state, id);
    }

    fn cancel_locked(&self, state: &mut State, id: SeqId) {
        state.streams.remove(&id);
        if state.scheduler.cancel(id) {
            state.stats.cancelled += 1;
            self.publish_load(state);
        }
    }

    fn shut_down(&self) {
        let mut state = self.lock();
        state.stopped = true;
        let ids: Vec<SeqId> = state.streams.keys().copied().collect();
        for id in ids {
            // Dropping the sender ends the stream.
            self.cancel_locked(&mut state, id);
        }
    }

    fn publish_load(&self, state: &State) {
        let load = load_of(&state.scheduler, &self.config);
        self.load.send_if_modified(|current| {
            let changed = *current != load;
            *current = load;
            changed
        });
    }
}

fn load_of(scheduler: &Scheduler, config: &MockerConfig) -> EngineLoad {
    let kv = scheduler.kv();
    EngineLoad {
        running: scheduler.num_running() as u64,
        waiting: scheduler.num_waiting() as u64,
        kv_usage: kv.usage() as f32,
        capacity: config.max_num_seqs as u64,
        total_blocks: kv.num_blocks() as u64,
        active_blocks: kv.active_blocks() as u64,
    }
}

/// The output of one request: `Token`s then `Finished`. Dropping it early cancels the request.
pub struct EngineStream {
    id: SeqId,
    receiver: mpsc::UnboundedReceiver<EngineOutput>,
    shared: Arc<Shared>,
    /// Set once the stream has ended, when there is nothing left to cancel.
    ended: bool,
}

impl std::fmt::Debug for EngineStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineStream")
            .field("id", &self.id)
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

impl futures::Stream for EngineStream {
    type Item = EngineOutput;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<EngineOutput>> {
        let this = self.get_mut();
        let item = this.receiver.poll_recv(cx);
        if let Poll::Ready(None | Some(EngineOutput::Finished(_))) = item {
            this.ended = true;
        }
        item
    }
}

impl Drop for EngineStream {
    fn drop(&mut self) {
        if !self.ended {
            self.shared.cancel(self.id);
        }
    }
}

#[cfg(test)]
mod tests;
