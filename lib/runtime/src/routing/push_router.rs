//! [`PushRouter`]: sends typed requests to the instances a [`Client`] knows,
//! chosen by a [`RouterMode`], and decodes the typed response stream.
//!
//! Occupancy: every request holds an in-flight guard on its instance until
//! its response stream is dropped. Faults: a transport failure (unreachable,
//! or disconnected before the first item) ejects the instance for a growing
//! backoff, and the request — which has produced nothing yet — is sent once
//! more to another instance. Busy: with a threshold set, instances at or
//! over it are skipped, and when all are, the router answers `Overloaded`.

use super::occupancy::{InflightGuard, Occupancy};
use super::{LeastLoaded, LoadView, Policy, PowerOfTwo, Random, RoundRobin, RouterMode};
use crate::component::client::Client;
use crate::engine::{AsyncEngine, Context, Controller, ResponseStream};
use crate::error::{ErrorKind, RequestError};
use crate::instance::Instance;
use bytes::Bytes;
use futures::{Stream, StreamExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::Poll;
use std::time::Duration;
use tokio::time::Instant;

/// Routes requests of type `Req` to an endpoint's instances and yields `Resp`s.
#[derive(Debug)]
pub struct PushRouter<Req, Resp> {
    client: Client,
    mode: RouterMode,
    policy: Box<dyn Policy>,
    /// Turns for [`PushRouter::round_robin`] and for the last-resort pick
    /// among ejected instances: kept here, since a fresh one would always
    /// start at the first instance.
    turns: RoundRobin,
    occupancy: Occupancy,
    /// Requests in flight at which an instance counts as busy.
    busy_threshold: Option<u64>,
    /// Where requests wait while every instance is busy, when configured.
    wait_queue: Option<WaitQueue>,
    /// Longest wait for an instance's first item, and the setting that says
    /// so (named in the error).
    first_item_timeout: Option<(Duration, &'static str)>,
    /// The instance snapshot the occupancy table was last synced with
    /// (compared by address: a new snapshot means discovery changed).
    synced: std::sync::Mutex<usize>,
    /// Stops the load-report subscription when the router is dropped.
    _load_reports: Option<tokio_util::sync::DropGuard>,
    types: PhantomData<fn(Req) -> Resp>,
}

/// The load view a policy sees for one selection.
struct View<'a> {
    occupancy: &'a Occupancy,
    busy_threshold: Option<u64>,
    now: Instant,
    /// Instances already tried for this request, or to keep it away from.
    exclude: &'a [u64],
    /// Ignore ejections (when every instance is ejected, trying one beats failing).
    ignore_ejection: bool,
}

impl LoadView for View<'_> {
    fn load(&self, id: u64) -> u64 {
        self.occupancy.load(id)
    }

    fn available(&self, id: u64) -> bool {
        !self.exclude.contains(&id)
            && (self.ignore_ejection || self.occupancy.is_available(id, self.now))
            && self.busy_threshold.is_none_or(|limit| self.occupancy.load(id) < limit)
    }

    fn least_loaded(&self, allowed: &dyn Fn(u64) -> bool) -> Option<u64> {
        // Checks only what the index already holds: the table is locked meanwhile.
        let not_busy = |load: u64| self.busy_threshold.is_none_or(|limit| load < limit);
        self.occupancy.least_loaded(
            |id, load| !self.exclude.contains(&id) && not_busy(load) && allowed(id),
            self.now,
        )
    }
}

impl<Req, Resp> PushRouter<Req, Resp>
where
    Req: Serialize + Send + 'static,
    Resp: DeserializeOwned + Send + 'static,
{
    /// A router over `client`'s instances. Async so that routers which
    /// subscribe to load reports can do so before the first request.
    pub async fn from_client(client: Client, mode: RouterMode) -> Result<Self, RequestError> {
        let policy: Box<dyn Policy> = match mode {
            RouterMode::RoundRobin | RouterMode::Direct => Box::new(RoundRobin::default()),
            RouterMode::Random => Box::new(Random),
            RouterMode::PowerOfTwo => Box::new(PowerOfTwo),
            RouterMode::LeastLoaded | RouterMode::Kv => Box::new(LeastLoaded),
        };
        Ok(Self {
            client,
            mode,
            policy,
            turns: RoundRobin::default(),
            occupancy: Occupancy::new(),
            busy_threshold: None,
            wait_queue: None,
            first_item_timeout: None,
            synced: std::sync::Mutex::new(0),
            _load_reports: None,
            types: PhantomData,
        })
    }

    /// Folds the load the workers report on the event plane (`load` topic,
    /// published by endpoints built with `.publish_load()`) into this
    /// router's occupancy, so routers that share workers see each other's load.
    pub async fn with_load_reports(self) -> Result<Self, RequestError> {
        let endpoint = self.client.endpoint();
        let stop = endpoint.drt().runtime().root_token().child_token();
        super::load::follow(
            &endpoint.parent(),
            endpoint.name().to_string(),
            self.occupancy.clone(),
            stop.clone(),
        )
        .await
        .map_err(|e| RequestError::new(ErrorKind::Unreachable, "cannot subscribe to load reports").with_source(e))?;
        self.sync(&self.client.instances());
        Ok(Self {
            _load_reports: Some(stop.drop_guard()),
            ..self
        })
    }

    /// Treats an instance with `limit` or more requests in flight (from this
    /// router) as busy; when every instance is busy, requests are refused
    /// with `Overloaded`.
    pub fn with_busy_threshold(mut self, limit: u64) -> Self {
        self.busy_threshold = Some(limit.max(1));
        self
    }

    /// Instead of refusing at once when every instance is busy, lets up to
    /// `max_queued` requests wait up to `max_wait` each for one to free up
    /// (woken when a request ends or a lower load report arrives). A request
    /// beyond `max_queued`, or still waiting at `max_wait`, gets `Overloaded`.
    /// Waiters are not served in arrival order: whichever retries first after
    /// a release wins.
    pub fn with_wait_queue(mut self, max_wait: Duration, max_queued: usize) -> Self {
        self.wait_queue = Some(WaitQueue {
            max_wait,
            max_queued,
            waiting: Arc::new(AtomicUsize::new(0)),
        });
        self
    }

    /// An instance that sends no first item within `limit` counts as failed:
    /// it is ejected for a backoff, its request is dropped there (which
    /// cancels it) and tried once on another instance; the caller gets
    /// `TimedOut` naming `setting` when that one is silent too.
    pub fn with_first_item_timeout(mut self, limit: Duration, setting: &'static str) -> Self {
        self.first_item_timeout = Some((limit, setting));
        self
    }

    /// Requests waiting for a busy fleet right now.
    pub fn waiting(&self) -> usize {
        self.wait_queue
            .as_ref()
            .map_or(0, |q| q.waiting.load(Ordering::Relaxed))
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn mode(&self) -> RouterMode {
        self.mode
    }

    /// This router's view of the instances' load.
    pub fn occupancy(&self) -> &Occupancy {
        &self.occupancy
    }

    /// Sends `request` to the instance the router's mode picks.
    pub async fn generate(&self, request: Context<Req>) -> Result<ResponseStream<Resp>, RequestError> {
        self.generate_routed(request).await.map(|routed| routed.stream)
    }

    /// Like [`PushRouter::generate`], also saying which instance answers, so
    /// a caller that finds that instance failing later (a stream that stalls
    /// or breaks mid-answer) can [`PushRouter::eject`] it.
    pub async fn generate_routed(&self, request: Context<Req>) -> Result<Routed<Resp>, RequestError> {
        self.generate_routed_avoiding(None, request, &[]).await
    }

    /// Like [`PushRouter::generate_routed`], choosing with `policy` instead of
    /// the mode's own: for policies that depend on the request (KV-aware
    /// routing). Busy refusal, waiting, ejection and the retry elsewhere
    /// work as in every mode.
    pub async fn generate_routed_with(
        &self,
        policy: &dyn Policy,
        request: Context<Req>,
    ) -> Result<Routed<Resp>, RequestError> {
        self.generate_routed_avoiding(Some(policy), request, &[]).await
    }

    /// Like [`PushRouter::generate_routed_with`] (`None`: the mode's own
    /// policy), keeping the request away from the instances in `avoid` —
    /// those it already broke on, when it moves mid-answer — whether or not
    /// their ejection has run out. When every instance is in `avoid`, one
    /// of them is tried anyway: an instance that failed once beats none.
    pub async fn generate_routed_avoiding(
        &self,
        policy: Option<&dyn Policy>,
        request: Context<Req>,
        avoid: &[u64],
    ) -> Result<Routed<Resp>, RequestError> {
        let policy = match policy {
            Some(policy) => policy,
            None if self.mode == RouterMode::Direct => {
                return Err(RequestError::new(
                    ErrorKind::Invalid,
                    "this router is in direct mode: call direct(request, instance_id)",
                ));
            }
            None => self.policy.as_ref(),
        };
        self.route(policy, request, avoid).await
    }

    /// Takes `instance_id` out of selection for a backoff, as after a
    /// transport failure: for failures the caller saw on a stream.
    pub fn eject(&self, instance_id: u64, why: &str) {
        self.client.endpoint().drt().metrics().router_ejections.inc();
        let backoff = self.occupancy.record_failure(instance_id, Instant::now());
        self.occupancy.record_error(instance_id, why);
        tracing::warn!(instance = format!("{instance_id:x}"), why, ?backoff, "instance ejected");
    }

    /// Sends `request` to the next instance in turn.
    pub async fn round_robin(&self, request: Context<Req>) -> Result<ResponseStream<Resp>, RequestError> {
        Ok(self.route(&self.turns, request, &[]).await?.stream)
    }

    /// Sends `request` to a random instance.
    pub async fn random(&self, request: Context<Req>) -> Result<ResponseStream<Resp>, RequestError> {
        Ok(self.route(&Random, request, &[]).await?.stream)
    }

    /// Sends `request` to the instance `instance_id`, which must be registered.
    /// No retry elsewhere: the caller chose this instance.
    pub async fn direct(&self, request: Context<Req>, instance_id: u64) -> Result<ResponseStream<Resp>, RequestError> {
        let instances = self.client.instances();
        let found = instances
            .binary_search_by_key(&instance_id, |i| i.instance_id)
            .map_err(|_| {
                RequestError::new(
                    ErrorKind::NotFound,
                    format!(
                        "instance {instance_id:x} of {} is not registered",
                        self.client.endpoint().path()
                    ),
                )
            })?;
        let (body, controller) = encode(request)?;
        match self.attempt(&instances[found], body, controller).await {
            Attempt::Streaming(stream) | Attempt::Failed(_, Some(stream)) => Ok(stream),
            Attempt::Failed(error, None) => Err(error),
        }
    }

    /// Chooses with `policy`, sends, and retries once elsewhere when the
    /// first try failed before any item arrived: a transport failure, or an
    /// instance that could not take the request (gone from its address,
    /// shutting down, at capacity).
    async fn route(
        &self,
        policy: &dyn Policy,
        request: Context<Req>,
        avoid: &[u64],
    ) -> Result<Routed<Resp>, RequestError> {
        let (body, controller) = encode(request)?;
        // The caller's few (at most a migration limit's worth) plus the one retry.
        let mut exclude = avoid.to_vec();
        let mut failed = None;
        for attempt in 0..2 {
            let (mut instances, mut chosen) = self.choose_or_wait(policy, &exclude, &controller).await?;
            if chosen.is_none() && failed.is_none() && !exclude.is_empty() {
                // Every instance is one to avoid: try one of them after all.
                exclude.clear();
                (instances, chosen) = self.choose_or_wait(policy, &exclude, &controller).await?;
            }
            let Some(chosen) = chosen else {
                // No other instance to retry on: the first one's failure stands.
                if let Some(error) = failed {
                    return Err(error);
                }
                break;
            };
            let instance = &instances[chosen];
            match self.attempt(instance, body.clone(), controller.clone()).await {
                Attempt::Streaming(stream) => {
                    return Ok(Routed {
                        instance_id: instance.instance_id,
                        stream,
                    });
                }
                Attempt::Failed(error, first_item_stream) => {
                    let transport = matches!(
                        error.kind(),
                        ErrorKind::Unreachable | ErrorKind::Disconnected | ErrorKind::TimedOut
                    );
                    // Another process answers at the instance's address (it
                    // was restarted there): the instance is gone. Or it is
                    // full: leave it alone for a backoff rather than ask again.
                    let gone = error.kind() == ErrorKind::NotFound;
                    let full = error.kind() == ErrorKind::Overloaded;
                    let metrics = self.client.endpoint().drt().metrics();
                    if transport || gone || full {
                        metrics.router_ejections.inc();
                        let backoff = self.occupancy.record_failure(instance.instance_id, Instant::now());
                        self.occupancy
                            .record_error(instance.instance_id, &crate::error::Report(&error).to_string());
                        tracing::warn!(instance = %instance, %error, ?backoff, "instance ejected after a transport failure or a lookup miss");
                    }
                    let retryable = transport || error.kind().is_retryable_elsewhere();
                    if attempt == 1 || !retryable || controller.is_stopped() {
                        return match first_item_stream {
                            Some(stream) => Ok(Routed {
                                instance_id: instance.instance_id,
                                stream,
                            }),
                            None => Err(error),
                        };
                    }
                    metrics.router_retries.inc();
                    exclude.push(instance.instance_id);
                    failed = Some(error);
                }
            }
        }
        Err(RequestError::new(
            ErrorKind::NotFound,
            format!("no instances of {} are registered", self.client.endpoint().path()),
        ))
    }

    /// Brings the occupancy table in line with a new discovery snapshot:
    /// O(n) once per discovery change, not per request.
    fn sync(&self, instances: &std::sync::Arc<Vec<Instance>>) {
        let address = std::sync::Arc::as_ptr(instances) as usize;
        let mut synced = self.synced.lock().unwrap_or_else(|p| p.into_inner());
        if *synced != address {
            let ids: Vec<u64> = instances.iter().map(|i| i.instance_id).collect();
            self.occupancy.sync(&ids);
            *synced = address;
        }
    }

    /// Like [`PushRouter::choose`] on the current instances, but when all
    /// are busy and a wait queue is set, waits (bounded) for one to free up.
    async fn choose_or_wait(
        &self,
        policy: &dyn Policy,
        exclude: &[u64],
        controller: &Controller,
    ) -> Result<(Arc<Vec<Instance>>, Option<usize>), RequestError> {
        let mut waiting: Option<(Instant, WaitSlot)> = None;
        loop {
            let lighter = self.occupancy.lighter();
            let instances = self.client.instances();
            self.sync(&instances);
            let busy = match self.choose(policy, &instances, exclude) {
                Err(busy) if busy.kind() == ErrorKind::Overloaded => busy,
                chosen => return chosen.map(|chosen| (instances, chosen)),
            };
            let Some(queue) = &self.wait_queue else {
                return Err(busy);
            };
            let deadline = match &waiting {
                Some((deadline, _)) => *deadline,
                None => {
                    let slot = queue.enter().ok_or_else(|| {
                        RequestError::new(
                            ErrorKind::Overloaded,
                            format!(
                                "{}, and {} requests already wait for them",
                                busy.message(),
                                queue.max_queued
                            ),
                        )
                    })?;
                    let deadline = Instant::now() + queue.max_wait;
                    waiting = Some((deadline, slot));
                    deadline
                }
            };
            tokio::select! {
                _ = lighter => {}
                // Discovery changes (a new instance) do not wake waiters; look again now and then.
                _ = tokio::time::sleep(WAIT_RECHECK) => {}
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(RequestError::new(
                        ErrorKind::Overloaded,
                        format!("{} and stayed busy for {:?}", busy.message(), queue.max_wait),
                    ));
                }
                _ = controller.stopped() => {
                    return Err(RequestError::new(ErrorKind::Cancelled, "cancelled while waiting for a free instance"));
                }
            }
        }
    }

    /// The index of the instance to try, `Ok(None)` when there is none.
    fn choose(
        &self,
        policy: &dyn Policy,
        instances: &[Instance],
        exclude: &[u64],
    ) -> Result<Option<usize>, RequestError> {
        if instances.iter().all(|i| exclude.contains(&i.instance_id)) {
            return Ok(None);
        }
        let now = Instant::now();
        let view = |ignore_ejection| View {
            occupancy: &self.occupancy,
            busy_threshold: self.busy_threshold,
            now,
            exclude,
            ignore_ejection,
        };
        if let Some(chosen) = policy.select(instances, &view(false)) {
            return Ok(Some(chosen));
        }
        let busy = |i: &Instance| {
            self.busy_threshold
                .is_some_and(|limit| self.occupancy.load(i.instance_id) >= limit)
        };
        if instances.iter().all(busy) {
            return Err(RequestError::new(
                ErrorKind::Overloaded,
                format!(
                    "all {} instances of {} are busy",
                    instances.len(),
                    self.client.endpoint().path()
                ),
            ));
        }
        // Everything not busy is ejected: try one anyway rather than fail.
        Ok(self.turns.select(instances, &view(true)))
    }

    /// One try on `instance`: the stream once its first item is known.
    async fn attempt(&self, instance: &Instance, body: Bytes, controller: Controller) -> Attempt<Resp> {
        let guard = self.occupancy.acquire(instance.instance_id);
        let client = self.client.endpoint().drt().request_client();
        let mut responses = match client
            .call(&instance.target(), Context::with_controller(body, controller))
            .await
        {
            Ok(responses) => responses,
            Err(error) => return Attempt::Failed(error, None),
        };
        let first = match self.first_item_timeout {
            None => responses.next().await,
            Some((limit, setting)) => match tokio::time::timeout(limit, responses.next()).await {
                Ok(first) => first,
                Err(_) => {
                    let message = format!("the worker sent nothing for {limit:?} ({setting})");
                    return Attempt::Failed(RequestError::new(ErrorKind::TimedOut, message), None);
                }
            },
        };
        match first {
            Some(Err(error)) => {
                let stream = decoded(futures::stream::iter([Err(error.clone_kind())]), guard);
                Attempt::Failed(error, Some(stream))
            }
            first => {
                self.occupancy.record_success(instance.instance_id);
                let rest = futures::stream::iter(first).chain(responses);
                Attempt::Streaming(decoded(rest, guard))
            }
        }
    }
}

/// A response stream and the instance it comes from.
pub struct Routed<Resp> {
    pub instance_id: u64,
    pub stream: ResponseStream<Resp>,
}

impl<Resp> std::fmt::Debug for Routed<Resp> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Routed")
            .field("instance_id", &self.instance_id)
            .finish_non_exhaustive()
    }
}

/// How often a waiting request looks at the instances again without a wake-up.
const WAIT_RECHECK: Duration = Duration::from_millis(100);

/// The bounded wait for a busy fleet.
#[derive(Debug)]
struct WaitQueue {
    max_wait: Duration,
    max_queued: usize,
    waiting: Arc<AtomicUsize>,
}

impl WaitQueue {
    /// A place in the queue, or `None` when it is full.
    fn enter(&self) -> Option<WaitSlot> {
        self.waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_queued).then_some(n + 1)
            })
            .ok()
            .map(|_| WaitSlot(self.waiting.clone()))
    }
}

/// Holds one place in the wait queue until dropped.
struct WaitSlot(Arc<AtomicUsize>);

impl Drop for WaitSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

enum Attempt<Resp> {
    Streaming(ResponseStream<Resp>),
    /// Failed before any item; the stream (if any) yields that error, for a
    /// caller that will not retry.
    Failed(RequestError, Option<ResponseStream<Resp>>),
}

fn encode<Req: Serialize>(request: Context<Req>) -> Result<(Bytes, Controller), RequestError> {
    let (data, controller) = request.into_parts();
    let body = rmp_serde::to_vec_named(&data)
        .map_err(|e| RequestError::new(ErrorKind::Invalid, "cannot encode the request as msgpack").with_source(e))?;
    Ok((Bytes::from(body), controller))
}

/// Decodes each item, ends after the first error, and holds `guard` until dropped.
fn decoded<Resp, S>(responses: S, guard: InflightGuard) -> ResponseStream<Resp>
where
    Resp: DeserializeOwned + Send + 'static,
    S: Stream<Item = Result<Bytes, RequestError>> + Send + 'static,
{
    let items = responses.map(|item| {
        item.and_then(|bytes| {
            rmp_serde::from_slice::<Resp>(&bytes).map_err(|e| {
                let what = format!("cannot decode a response as {}", std::any::type_name::<Resp>());
                RequestError::new(ErrorKind::Protocol, what).with_source(e)
            })
        })
    });
    // An error is always the last item: a decode failure ends the stream
    // (dropping the wire stream kills the request on the worker).
    let ending = items.scan(false, |failed, item| {
        let next = (!*failed).then(|| {
            *failed = item.is_err();
            item
        });
        futures::future::ready(next)
    });
    Box::pin(Guarded {
        stream: Box::pin(ending),
        _guard: guard,
    })
}

/// A response stream that keeps its request counted as in flight.
struct Guarded<Resp> {
    stream: ResponseStream<Resp>,
    _guard: InflightGuard,
}

impl<Resp> Stream for Guarded<Resp> {
    type Item = Result<Resp, RequestError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Option<Self::Item>> {
        self.stream.poll_next_unpin(cx)
    }
}

/// A router is itself an engine: it can be the handler of another endpoint.
#[async_trait::async_trait]
impl<Req, Resp> AsyncEngine<Req, Resp> for PushRouter<Req, Resp>
where
    Req: Serialize + Send + 'static,
    Resp: DeserializeOwned + Send + 'static,
{
    async fn generate(&self, request: Context<Req>) -> Result<ResponseStream<Resp>, RequestError> {
        PushRouter::generate(self, request).await
    }
}
