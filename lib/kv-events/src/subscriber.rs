//! The router side: one engine's KV event stream, read on a named thread
//! from a SUB socket, made into an ordered series of [`Delivery`]s for a
//! tokio consumer. Gaps are filled from the engine's replay ROUTER over one
//! DEALER; what cannot be filled is reported as lost. Must not interpret the
//! events (the index does) or decide what a loss means for routing.

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use futures::future::{Either, select};
use switchyard_kv_router::events::EventBatch;
use switchyard_kv_router::events::decode::decode_batch;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::sequence::{Arrival, Offer, ReplayWindow, classify};
use crate::wire::{ReplayReply, check_endpoint, parse_live, parse_replay_reply};
use crate::{KvEventsError, POLL_INTERVAL_MS};

/// The largest frame a subscriber accepts by default. A vLLM batch is one
/// engine step's events: even thousands of 16-token blocks stay far below
/// 1 MiB, so 16 MiB only stops what is not a batch (a confused or hostile
/// peer) before libzmq allocates it.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 16 * 1024 * 1024;

/// How long a replay may take by default, request to terminator: a whole
/// 10 000-batch buffer over loopback takes well under a second, so two
/// seconds means the engine is not answering.
pub const DEFAULT_REPLAY_TIMEOUT: Duration = Duration::from_secs(2);

/// Live messages handled in a row before the thread looks at its stop
/// signal again, so a flooding engine cannot keep it from stopping.
const LIVE_BURST: usize = 1_024;

/// Where to read one engine's events and what to accept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriberConfig {
    /// The engine's PUB address; libzmq connects, and reconnects, by itself.
    pub endpoint: String,
    /// The engine's replay ROUTER; `None` makes every gap a loss.
    pub replay_endpoint: Option<String>,
    /// A prefix of the topic frame; `""` takes every topic.
    pub topic: String,
    /// libzmq's `ZMQ_MAXMSGSIZE` on every socket: a peer that sends a
    /// larger frame is disconnected before the frame is allocated.
    pub max_message_size: usize,
    /// How long one replay may take before its missing batches are lost.
    pub replay_timeout: Duration,
}

impl SubscriberConfig {
    /// `endpoint`, no replay, every topic, the default size cap and timeout.
    pub fn new(endpoint: impl Into<String>) -> Self {
        SubscriberConfig {
            endpoint: endpoint.into(),
            replay_endpoint: None,
            topic: String::new(),
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            replay_timeout: DEFAULT_REPLAY_TIMEOUT,
        }
    }
}

/// What the consumer gets, in sequence order.
#[derive(Debug, Clone, PartialEq)]
pub enum Delivery {
    Batch {
        seq: u64,
        batch: EventBatch,
    },
    /// Batches `[from, to)` are gone for good (no replay endpoint, replay
    /// timed out, the publisher's buffer no longer holds them, or the
    /// payload could not be decoded): the consumer must forget this
    /// engine's blocks.
    Lost {
        from: u64,
        to: u64,
    },
    /// The publisher's sequence went backwards: the engine restarted; the
    /// consumer must forget this engine's blocks. Its history follows.
    Restarted {
        seq: u64,
    },
}

/// Counters of one subscription, readable at any time from any thread.
#[derive(Debug, Default)]
pub struct SubscriberStats {
    batches: AtomicU64,
    gaps: AtomicU64,
    replays: AtomicU64,
    replayed_batches: AtomicU64,
    lost_batches: AtomicU64,
    malformed: AtomicU64,
    restarts: AtomicU64,
    disconnects: AtomicU64,
}

impl SubscriberStats {
    /// Batches delivered, live or replayed.
    pub fn batches(&self) -> u64 {
        self.batches.load(Ordering::Relaxed)
    }
    /// Jumps forward in the live sequence.
    pub fn gaps(&self) -> u64 {
        self.gaps.load(Ordering::Relaxed)
    }
    /// Replay requests sent (gaps, and the history before the first batch).
    pub fn replays(&self) -> u64 {
        self.replays.load(Ordering::Relaxed)
    }
    /// Batches delivered from a replay.
    pub fn replayed_batches(&self) -> u64 {
        self.replayed_batches.load(Ordering::Relaxed)
    }
    /// Batches delivered as [`Delivery::Lost`].
    pub fn lost_batches(&self) -> u64 {
        self.lost_batches.load(Ordering::Relaxed)
    }
    /// Messages skipped: wrong frame count or sequence frame, or a payload
    /// that did not decode (logged at warn with the reason).
    pub fn malformed(&self) -> u64 {
        self.malformed.load(Ordering::Relaxed)
    }
    /// Restarts seen ([`Delivery::Restarted`]).
    pub fn restarts(&self) -> u64 {
        self.restarts.load(Ordering::Relaxed)
    }
    /// Connections to the engine that ended: it went away, or libzmq cut it
    /// for a frame over `max_message_size` or a protocol error.
    pub fn disconnects(&self) -> u64 {
        self.disconnects.load(Ordering::Relaxed)
    }
}

fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

/// A running subscription; dropping it stops its thread (within a poll
/// interval, ~100 ms), as does cancelling the token given to [`subscribe`].
#[derive(Debug)]
pub struct Subscription {
    stats: Arc<SubscriberStats>,
    /// A child of the caller's token, so dropping this stops only this one.
    stop: CancellationToken,
    thread: Option<JoinHandle<()>>,
}

impl Subscription {
    pub fn stats(&self) -> &Arc<SubscriberStats> {
        &self.stats
    }

    /// Whether the thread has ended (stopped, the consumer went away, or
    /// libzmq failed, which is logged at error).
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(thread) = self.thread.take() {
            // The thread only panics on a bug; the panic has been printed.
            let _ = thread.join();
        }
    }
}

/// Connects to one engine and delivers its batches to `sink` from a new
/// thread, until `stop` is cancelled, the [`Subscription`] is dropped or the
/// receiver is. Only the set-up can fail; the connection itself is made
/// (and remade) by libzmq in the background.
///
/// The thread waits for room in `sink` (its capacity is the consumer's
/// choice) but notices `stop` while waiting.
pub fn subscribe(
    config: SubscriberConfig,
    sink: mpsc::Sender<Delivery>,
    stop: CancellationToken,
) -> Result<Subscription, KvEventsError> {
    check_endpoint("endpoint", &config.endpoint)?;
    if let Some(replay) = &config.replay_endpoint {
        check_endpoint("replay endpoint", replay)?;
    }
    let max_message_size = i64::try_from(config.max_message_size)
        .ok()
        .filter(|size| *size > 0)
        .ok_or_else(|| KvEventsError::InvalidConfig {
            field: "max_message_size",
            value: config.max_message_size.to_string(),
            expected: "a positive number of bytes (default 16 MiB)",
        })?;
    if config.replay_timeout.is_zero() {
        return Err(KvEventsError::InvalidConfig {
            field: "replay_timeout",
            value: "0s".to_owned(),
            expected: "a positive duration (default 2s)",
        });
    }

    let context = zmq::Context::new();
    let live = Live::open(&context, &config.endpoint, &config.topic, max_message_size, 0)?;

    let stats = Arc::new(SubscriberStats::default());
    let stop = stop.child_token();
    let worker = Worker {
        context,
        live,
        topic: config.topic,
        max_message_size,
        replay: config.replay_endpoint.map(|endpoint| Replay {
            endpoint,
            dealer: None,
            timeout: config.replay_timeout,
            max_message_size,
        }),
        endpoint: config.endpoint,
        sink,
        stop: stop.clone(),
        stats: stats.clone(),
        last: None,
    };
    let thread = std::thread::Builder::new()
        .name("kv-events-sub".to_owned())
        .spawn(move || worker.run())
        .map_err(|source| KvEventsError::Thread {
            name: "kv-events-sub",
            source,
        })?;
    Ok(Subscription {
        stats,
        stop,
        thread: Some(thread),
    })
}

/// The thread stops: cancelled, or the consumer dropped its receiver.
struct Stopped;

/// The replay side of one engine.
struct Replay {
    endpoint: String,
    /// Reused between replays; `None` after a replay went wrong, so that a
    /// late answer to an abandoned request cannot pass for the next one.
    dealer: Option<zmq::Socket>,
    timeout: Duration,
    max_message_size: i64,
}

/// The SUB socket and the monitor that reports its disconnections.
struct Live {
    sub: zmq::Socket,
    monitor: zmq::Socket,
    /// Numbers the monitor's inproc address, unique per SUB socket.
    generation: u64,
}

impl Live {
    fn open(
        context: &zmq::Context,
        endpoint: &str,
        topic: &str,
        max_message_size: i64,
        generation: u64,
    ) -> Result<Live, KvEventsError> {
        let sub = context.socket(zmq::SUB).map_err(KvEventsError::socket("SUB"))?;
        sub.set_linger(0).map_err(KvEventsError::socket("SUB"))?;
        sub.set_maxmsgsize(max_message_size)
            .map_err(KvEventsError::socket("SUB"))?;
        sub.set_subscribe(topic.as_bytes())
            .map_err(KvEventsError::socket("SUB"))?;
        // The monitor tells when a connection ends, which is the only trace
        // a frame over the size cap leaves.
        let address = format!("inproc://kv-events-monitor-{generation}");
        sub.monitor(&address, zmq::SocketEvent::DISCONNECTED as i32)
            .map_err(KvEventsError::socket("SUB monitor"))?;
        let monitor = context
            .socket(zmq::PAIR)
            .map_err(KvEventsError::socket("SUB monitor"))?;
        monitor.set_linger(0).map_err(KvEventsError::socket("SUB monitor"))?;
        monitor.connect(&address).map_err(|source| KvEventsError::Connect {
            what: "SUB monitor",
            endpoint: address,
            source,
        })?;
        sub.connect(endpoint).map_err(|source| KvEventsError::Connect {
            what: "SUB",
            endpoint: endpoint.to_owned(),
            source,
        })?;
        Ok(Live {
            sub,
            monitor,
            generation,
        })
    }
}

/// The thread's state: it alone touches these sockets.
struct Worker {
    context: zmq::Context,
    live: Live,
    topic: String,
    max_message_size: i64,
    replay: Option<Replay>,
    /// For the logs.
    endpoint: String,
    sink: mpsc::Sender<Delivery>,
    stop: CancellationToken,
    stats: Arc<SubscriberStats>,
    /// The last sequence number delivered (as a batch or as lost).
    last: Option<u64>,
}

impl Worker {
    fn run(mut self) {
        tracing::debug!(endpoint = %self.endpoint, "KV event subscriber started");
        let _ = self.serve();
        tracing::debug!(endpoint = %self.endpoint, "KV event subscriber stopped");
    }

    fn serve(&mut self) -> Result<(), Stopped> {
        loop {
            if self.stop.is_cancelled() || self.sink.is_closed() {
                return Err(Stopped);
            }
            let (live, monitor) = {
                let mut items = [
                    self.live.sub.as_poll_item(zmq::POLLIN),
                    self.live.monitor.as_poll_item(zmq::POLLIN),
                ];
                match zmq::poll(&mut items, POLL_INTERVAL_MS) {
                    Ok(_) => {}
                    Err(zmq::Error::EINTR) => continue,
                    Err(error) => {
                        tracing::error!(endpoint = %self.endpoint, %error, "KV event subscriber stops: polling its sockets failed");
                        return Err(Stopped);
                    }
                }
                (items[0].is_readable(), items[1].is_readable())
            };
            if live {
                self.read_live(LIVE_BURST)?;
            }
            if monitor {
                self.reopen_after_disconnect()?;
            }
        }
    }

    fn read_live(&mut self, at_most: usize) -> Result<(), Stopped> {
        for _ in 0..at_most {
            let Ok(frames) = self.live.sub.recv_multipart(zmq::DONTWAIT) else {
                break;
            };
            self.on_live(&frames)?;
        }
        Ok(())
    }

    /// After a disconnection, reads what the SUB socket still holds and
    /// replaces it with a fresh one. libzmq reconnects by itself after the
    /// peer went away, but not after a protocol error (a frame over
    /// `max_message_size` is one): that connection would stay dead. A fresh
    /// socket covers both without telling them apart, and cannot receive a
    /// batch twice; what passed meanwhile is a gap like any other.
    fn reopen_after_disconnect(&mut self) -> Result<(), Stopped> {
        // Each event is two frames (event id and value, then the address);
        // only disconnections were asked for.
        let mut disconnected = false;
        while let Ok(event) = self.live.monitor.recv_multipart(zmq::DONTWAIT) {
            disconnected = true;
            bump(&self.stats.disconnects, 1);
            let peer = event.get(1).map(|a| String::from_utf8_lossy(a).into_owned());
            tracing::warn!(
                endpoint = %self.endpoint,
                peer = peer.as_deref().unwrap_or("?"),
                "KV event publisher disconnected (it went away, or sent a frame over max_message_size or broke the protocol); reconnecting"
            );
        }
        if !disconnected {
            return Ok(());
        }
        self.read_live(usize::MAX)?;
        let generation = self.live.generation + 1;
        match Live::open(
            &self.context,
            &self.endpoint,
            &self.topic,
            self.max_message_size,
            generation,
        ) {
            Ok(live) => {
                self.live = live;
                Ok(())
            }
            Err(error) => {
                tracing::error!(endpoint = %self.endpoint, error = &error as &dyn std::error::Error, "KV event subscriber stops: could not open a new SUB socket");
                Err(Stopped)
            }
        }
    }

    fn on_live(&mut self, frames: &[Vec<u8>]) -> Result<(), Stopped> {
        let (seq, payload) = match parse_live(frames) {
            Ok(live) => live,
            Err(reason) => {
                bump(&self.stats.malformed, 1);
                tracing::warn!(endpoint = %self.endpoint, %reason, "malformed KV event message skipped");
                return Ok(());
            }
        };
        match classify(self.last, seq) {
            Arrival::Next => {}
            Arrival::Missing { from } => {
                if self.last.is_some() {
                    bump(&self.stats.gaps, 1);
                }
                self.fill(from, seq)?;
            }
            Arrival::Restarted => {
                bump(&self.stats.restarts, 1);
                tracing::warn!(endpoint = %self.endpoint, seq, last = ?self.last, "KV event sequence went backwards: the engine restarted");
                self.deliver(Delivery::Restarted { seq })?;
                self.last = None;
                if seq > 0 {
                    self.fill(0, seq)?;
                }
            }
        }
        self.deliver_batch(seq, payload, false)
    }

    /// Delivers batches `[from, end)` from a replay, and what it lacks as lost.
    fn fill(&mut self, from: u64, end: u64) -> Result<(), Stopped> {
        let mut window = ReplayWindow::new(from, end);
        if let Some(dealer) = self.take_dealer() {
            bump(&self.stats.replays, 1);
            let reusable = self.replay_into(dealer, from, &mut window)?;
            if let Some(replay) = &mut self.replay {
                replay.dealer = reusable;
            }
        }
        match window.uncovered() {
            Some((from, to)) => self.lost(from, to),
            None => Ok(()),
        }
    }

    /// The DEALER to ask replay on, made anew when needed; `None` without a
    /// replay endpoint or when libzmq cannot make one (logged).
    fn take_dealer(&mut self) -> Option<zmq::Socket> {
        let replay = self.replay.as_mut()?;
        if let Some(dealer) = replay.dealer.take() {
            return Some(dealer);
        }
        let made = (|| {
            let dealer = self.context.socket(zmq::DEALER)?;
            dealer.set_linger(0)?;
            dealer.set_maxmsgsize(replay.max_message_size)?;
            dealer.connect(&replay.endpoint)?;
            Ok::<_, zmq::Error>(dealer)
        })();
        match made {
            Ok(dealer) => Some(dealer),
            Err(error) => {
                tracing::warn!(replay_endpoint = %replay.endpoint, %error, "could not open a KV event replay socket");
                None
            }
        }
    }

    /// Asks a replay from `from` and delivers what falls into `window`,
    /// until the terminator (the dealer is returned, for reuse) or the
    /// timeout (it is not: its late answers must not be read later).
    fn replay_into(
        &mut self,
        dealer: zmq::Socket,
        from: u64,
        window: &mut ReplayWindow,
    ) -> Result<Option<zmq::Socket>, Stopped> {
        let Some(replay) = &self.replay else {
            return Ok(None);
        };
        let timeout = replay.timeout;
        let replay_endpoint = replay.endpoint.clone();
        if let Err(error) = dealer.send_multipart([&b""[..], &from.to_be_bytes()[..]], zmq::DONTWAIT) {
            tracing::warn!(%replay_endpoint, %error, "KV event replay request not sent");
            return Ok(None);
        }
        let deadline = Instant::now() + timeout;
        loop {
            if self.stop.is_cancelled() {
                return Err(Stopped);
            }
            let now = Instant::now();
            if now >= deadline {
                tracing::warn!(%replay_endpoint, from, ?timeout, "KV event replay timed out");
                return Ok(None);
            }
            let wait = (deadline - now).as_millis().min(POLL_INTERVAL_MS as u128) as i64;
            match dealer.poll(zmq::POLLIN, wait.max(1)) {
                Ok(0) | Err(zmq::Error::EINTR) => continue,
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(%replay_endpoint, %error, "KV event replay failed");
                    return Ok(None);
                }
            }
            while let Ok(frames) = dealer.recv_multipart(zmq::DONTWAIT) {
                match parse_replay_reply(&frames) {
                    Ok(ReplayReply::End) => return Ok(Some(dealer)),
                    Ok(ReplayReply::Batch { seq, payload }) => match window.offer(seq) {
                        Offer::Skip => {}
                        Offer::Take { lost_before } => {
                            if let Some((from, to)) = lost_before {
                                self.lost(from, to)?;
                            }
                            self.deliver_batch(seq, payload, true)?;
                        }
                    },
                    Err(reason) => {
                        bump(&self.stats.malformed, 1);
                        tracing::warn!(%replay_endpoint, %reason, "malformed KV event replay message skipped");
                    }
                }
            }
        }
    }

    fn deliver_batch(&mut self, seq: u64, payload: &[u8], replayed: bool) -> Result<(), Stopped> {
        self.last = Some(seq);
        match decode_batch(payload) {
            Ok(batch) => {
                bump(&self.stats.batches, 1);
                if replayed {
                    bump(&self.stats.replayed_batches, 1);
                }
                self.deliver(Delivery::Batch { seq, batch })
            }
            Err(reason) => {
                // Its events are gone as surely as a missed batch's: say so,
                // or the consumer's view of the engine would silently drift.
                bump(&self.stats.malformed, 1);
                tracing::warn!(endpoint = %self.endpoint, seq, %reason, "undecodable KV event batch delivered as lost");
                self.lost(seq, seq + 1)
            }
        }
    }

    fn lost(&mut self, from: u64, to: u64) -> Result<(), Stopped> {
        self.last = Some(to - 1);
        bump(&self.stats.lost_batches, to - from);
        tracing::warn!(endpoint = %self.endpoint, from, to, "KV event batches lost");
        self.deliver(Delivery::Lost { from, to })
    }

    /// Waits for room in the sink, or for the stop signal.
    fn deliver(&self, delivery: Delivery) -> Result<(), Stopped> {
        let sent = block_on_unless(&self.stop, self.sink.send(delivery));
        match sent {
            Some(Ok(())) => Ok(()),
            Some(Err(_)) | None => Err(Stopped),
        }
    }
}

/// Runs `future` on this (non-tokio) thread until it ends or `stop` is
/// cancelled (`None`).
fn block_on_unless<F: Future>(stop: &CancellationToken, future: F) -> Option<F::Output> {
    let stopped = pin!(stop.cancelled());
    let future = pin!(future);
    match futures::executor::block_on(select(stopped, future)) {
        Either::Left(_) => None,
        Either::Right((output, _)) => Some(output),
    }
}
