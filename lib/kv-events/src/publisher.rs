//! The engine side: publishes [`EventBatch`]es the way vLLM does, on a PUB
//! socket with a replay ROUTER beside it, from one named thread. Callers
//! never block: [`Publisher::publish`] encodes and hands the batch over;
//! a full hand-off drops it (counted). Must not decide what to publish.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use switchyard_kv_router::events::EventBatch;
use switchyard_kv_router::events::encode::encode_batch;

use crate::wire::{END_SEQ, check_endpoint, parse_replay_request};
use crate::{KvEventsError, POLL_INTERVAL_MS};

/// Batches kept for replay by default: vLLM's `buffer_steps` default.
pub const DEFAULT_BUFFER_STEPS: usize = 10_000;

/// Batches that may wait between [`Publisher::publish`] and the thread on
/// each side of the in-process pipe (so about twice this in all): a few
/// seconds of an engine's steps if the thread is starved, without letting a
/// stuck thread hold an unbounded backlog.
const HANDOFF_HWM: i32 = 1_000;

/// Where the caller's side of the hand-off pipe meets the thread's (the
/// name is per context, and each publisher has its own context).
const HANDOFF_ENDPOINT: &str = "inproc://kv-events-handoff";

/// What a [`Publisher`] binds and how much history it keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublisherConfig {
    /// Where the PUB socket binds; `tcp://127.0.0.1:0` lets the OS choose
    /// the port ([`Publisher::endpoint`] tells which).
    pub endpoint: String,
    /// Where the replay ROUTER binds; `None` for no replay.
    pub replay_endpoint: Option<String>,
    /// The first frame of every message; subscribers filter on its prefix.
    pub topic: String,
    /// Batches kept for replay (vLLM's default is 10 000).
    pub buffer_steps: usize,
}

impl PublisherConfig {
    /// A PUB socket and a replay socket on `host`, ports chosen by the OS,
    /// publishing on `topic`. libzmq binds only to an address or an
    /// interface name, never to a host name, so a name (a compose service
    /// name, say) is resolved first, IPv4 preferred as a listener resolves
    /// it; subscribers reach the address as they would the name.
    pub async fn on_host(host: &str, topic: &str) -> Result<Self, KvEventsError> {
        let unresolved = |source| KvEventsError::Host {
            host: host.to_string(),
            source,
        };
        let address = match host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
        {
            Ok(address) => address,
            Err(_) => {
                let resolved: Vec<std::net::IpAddr> = tokio::net::lookup_host((host, 0))
                    .await
                    .map_err(unresolved)?
                    .map(|a| a.ip())
                    .collect();
                resolved
                    .iter()
                    .find(|a| a.is_ipv4())
                    .or(resolved.first())
                    .copied()
                    .ok_or_else(|| unresolved(std::io::Error::new(std::io::ErrorKind::NotFound, "no address")))?
            }
        };
        let host = match address {
            std::net::IpAddr::V6(v6) => format!("[{v6}]"),
            std::net::IpAddr::V4(v4) => v4.to_string(),
        };
        Ok(PublisherConfig {
            endpoint: format!("tcp://{host}:0"),
            replay_endpoint: Some(format!("tcp://{host}:0")),
            topic: topic.to_string(),
            buffer_steps: DEFAULT_BUFFER_STEPS,
        })
    }

    /// `endpoint` with no replay, an empty topic and vLLM's buffer size.
    pub fn new(endpoint: impl Into<String>) -> Self {
        PublisherConfig {
            endpoint: endpoint.into(),
            replay_endpoint: None,
            topic: String::new(),
            buffer_steps: DEFAULT_BUFFER_STEPS,
        }
    }
}

/// A running publisher; dropping it stops its thread (within
/// a poll interval, ~100 ms) and closes its sockets.
pub struct Publisher {
    endpoint: String,
    replay_endpoint: Option<String>,
    /// The caller's end of the hand-off pipe and the next sequence number:
    /// one lock so that sequence numbers reach the thread in order whichever
    /// thread calls `publish` (a zmq socket is not shareable without one).
    handoff: Mutex<Handoff>,
    counters: Arc<Counters>,
    /// Tells the thread to stop; checked at least every poll interval.
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

struct Handoff {
    socket: zmq::Socket,
    next_seq: u64,
}

#[derive(Debug, Default)]
struct Counters {
    published: AtomicU64,
    dropped: AtomicU64,
}

impl Publisher {
    /// Binds the PUB socket (and the replay ROUTER) and starts the thread.
    pub fn bind(config: PublisherConfig) -> Result<Publisher, KvEventsError> {
        check_endpoint("endpoint", &config.endpoint)?;
        if let Some(replay) = &config.replay_endpoint {
            check_endpoint("replay endpoint", replay)?;
            if config.buffer_steps == 0 {
                return Err(KvEventsError::InvalidConfig {
                    field: "buffer_steps",
                    value: "0".to_owned(),
                    expected: "at least 1 when a replay endpoint is set",
                });
            }
        }
        let context = zmq::Context::new();
        let publish = bound(&context, zmq::PUB, "PUB", &config.endpoint)?;
        let endpoint = last_endpoint(&publish, "PUB")?;
        let replay = match &config.replay_endpoint {
            Some(replay_endpoint) => {
                let router = bound(&context, zmq::ROUTER, "replay ROUTER", replay_endpoint)?;
                // A whole buffer (and the terminator) must fit in one peer's
                // queue, or a full replay would be cut silently: a ROUTER
                // drops what exceeds the high-water mark.
                let hwm = i32::try_from(config.buffer_steps.saturating_add(1)).unwrap_or(i32::MAX);
                router.set_sndhwm(hwm).map_err(KvEventsError::socket("replay ROUTER"))?;
                let resolved = last_endpoint(&router, "replay ROUTER")?;
                Some((router, resolved))
            }
            None => None,
        };
        let thread_side = context.socket(zmq::PAIR).map_err(KvEventsError::socket("hand-off"))?;
        thread_side
            .set_rcvhwm(HANDOFF_HWM)
            .map_err(KvEventsError::socket("hand-off"))?;
        thread_side.set_linger(0).map_err(KvEventsError::socket("hand-off"))?;
        thread_side
            .bind(HANDOFF_ENDPOINT)
            .map_err(|source| KvEventsError::Bind {
                what: "hand-off",
                endpoint: HANDOFF_ENDPOINT.to_owned(),
                source,
            })?;
        let caller_side = context.socket(zmq::PAIR).map_err(KvEventsError::socket("hand-off"))?;
        caller_side
            .set_sndhwm(HANDOFF_HWM)
            .map_err(KvEventsError::socket("hand-off"))?;
        caller_side.set_linger(0).map_err(KvEventsError::socket("hand-off"))?;
        caller_side
            .connect(HANDOFF_ENDPOINT)
            .map_err(|source| KvEventsError::Connect {
                what: "hand-off",
                endpoint: HANDOFF_ENDPOINT.to_owned(),
                source,
            })?;

        let (router, replay_endpoint) = match replay {
            Some((router, resolved)) => (Some(router), Some(resolved)),
            None => (None, None),
        };
        let counters = Arc::new(Counters::default());
        let stop = Arc::new(AtomicBool::new(false));
        let worker = Worker {
            handoff: thread_side,
            publish,
            router,
            topic: config.topic.into_bytes(),
            buffer: VecDeque::new(),
            buffer_steps: if replay_endpoint.is_some() {
                config.buffer_steps
            } else {
                0
            },
            counters: counters.clone(),
            stop: stop.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("kv-events-pub".to_owned())
            .spawn(move || worker.run())
            .map_err(|source| KvEventsError::Thread {
                name: "kv-events-pub",
                source,
            })?;
        Ok(Publisher {
            endpoint,
            replay_endpoint,
            handoff: Mutex::new(Handoff {
                socket: caller_side,
                next_seq: 0,
            }),
            counters,
            stop,
            thread: Some(thread),
        })
    }

    /// The address the PUB socket is bound to, with the OS's port when the
    /// config said port 0 (libzmq's `ZMQ_LAST_ENDPOINT`).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The replay ROUTER's bound address, when there is one.
    pub fn replay_endpoint(&self) -> Option<&str> {
        self.replay_endpoint.as_deref()
    }

    /// Publishes `batch` with the next sequence number (0, 1, 2, …). Never
    /// blocks on the network. When the hand-off is full the batch is
    /// dropped and counted, but its sequence number is still used, so
    /// subscribers see a gap and learn it is lost instead of silently
    /// missing its events.
    pub fn publish(&self, batch: &EventBatch) {
        self.hand_off(batch, false);
    }

    /// Fault injection: numbers `batch` and keeps it for replay like
    /// [`Publisher::publish`], but does not send it on the PUB socket, as if
    /// the network had lost it. Subscribers see a gap at the next batch and
    /// must recover this one by replay (`--kv-events-withhold-every`).
    pub fn publish_withheld(&self, batch: &EventBatch) {
        self.hand_off(batch, true);
    }

    fn hand_off(&self, batch: &EventBatch, withheld: bool) {
        let payload = encode_batch(batch);
        // A panic elsewhere while holding the lock leaves the socket and the
        // counter consistent (both are updated by single calls), so keep going.
        let mut handoff = self.handoff.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let seq = handoff.next_seq;
        handoff.next_seq += 1;
        let sent = handoff.socket.send_multipart(
            [&seq.to_be_bytes()[..], &payload[..], &[u8::from(withheld)][..]],
            zmq::DONTWAIT,
        );
        drop(handoff);
        if let Err(error) = sent {
            let dropped = self.counters.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            // Once per power of two: an overloaded publisher must not also
            // flood the log.
            if dropped.is_power_of_two() {
                tracing::warn!(seq, dropped, %error, "KV event batch dropped: the publisher thread is behind");
            }
        }
    }

    /// Batches sent on the PUB socket so far.
    pub fn published(&self) -> u64 {
        self.counters.published.load(Ordering::Relaxed)
    }

    /// Batches dropped because the hand-off to the thread was full.
    pub fn dropped(&self) -> u64 {
        self.counters.dropped.load(Ordering::Relaxed)
    }
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("endpoint", &self.endpoint)
            .field("replay_endpoint", &self.replay_endpoint)
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            // The thread only panics on a bug; the panic has been printed.
            let _ = thread.join();
        }
    }
}

fn bound(
    context: &zmq::Context,
    kind: zmq::SocketType,
    what: &'static str,
    endpoint: &str,
) -> Result<zmq::Socket, KvEventsError> {
    let socket = context.socket(kind).map_err(KvEventsError::socket(what))?;
    // Closing must not wait for slow peers: what they did not get, they
    // recover through replay or learn about as a gap.
    socket.set_linger(0).map_err(KvEventsError::socket(what))?;
    socket.bind(endpoint).map_err(|source| KvEventsError::Bind {
        what,
        endpoint: endpoint.to_owned(),
        source,
    })?;
    Ok(socket)
}

fn last_endpoint(socket: &zmq::Socket, what: &'static str) -> Result<String, KvEventsError> {
    match socket.get_last_endpoint().map_err(KvEventsError::socket(what))? {
        Ok(endpoint) => Ok(endpoint),
        Err(bytes) => Ok(String::from_utf8_lossy(&bytes).into_owned()),
    }
}

/// The thread's state: it alone touches these sockets and the buffer.
struct Worker {
    handoff: zmq::Socket,
    publish: zmq::Socket,
    router: Option<zmq::Socket>,
    topic: Vec<u8>,
    /// The last `buffer_steps` batches, oldest first, for replay.
    buffer: VecDeque<(u64, Vec<u8>)>,
    buffer_steps: usize,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
}

impl Worker {
    fn run(mut self) {
        while !self.stop.load(Ordering::Relaxed) {
            let (handoff_ready, replay_ready) = {
                let mut items = vec![self.handoff.as_poll_item(zmq::POLLIN)];
                if let Some(router) = &self.router {
                    items.push(router.as_poll_item(zmq::POLLIN));
                }
                match zmq::poll(&mut items, POLL_INTERVAL_MS) {
                    Ok(_) => {}
                    Err(zmq::Error::EINTR) => continue,
                    Err(error) => {
                        tracing::error!(%error, "KV event publisher stops: polling its sockets failed");
                        return;
                    }
                }
                (items[0].is_readable(), items.get(1).is_some_and(|i| i.is_readable()))
            };
            if handoff_ready {
                self.forward();
            }
            if replay_ready {
                self.serve_replay();
            }
        }
    }

    /// Sends what `publish` handed over, until the pipe is empty.
    fn forward(&mut self) {
        while let Ok(frames) = self.handoff.recv_multipart(zmq::DONTWAIT) {
            let [seq, payload, withheld] = <[Vec<u8>; 3]>::try_from(frames).expect("hand_off sends three frames");
            // PUB never blocks: a subscriber whose queue is full misses the
            // batch and sees a gap.
            let sent = match withheld[..] {
                [0] => self
                    .publish
                    .send_multipart([&self.topic[..], &seq[..], &payload[..]], zmq::DONTWAIT),
                _ => Ok(()),
            };
            if let Err(error) = sent {
                tracing::warn!(%error, "KV event batch not sent on the PUB socket");
            }
            self.counters.published.fetch_add(1, Ordering::Relaxed);
            if self.buffer_steps > 0 {
                if self.buffer.len() == self.buffer_steps {
                    self.buffer.pop_front();
                }
                let seq = u64::from_be_bytes(seq.try_into().expect("publish sends 8 bytes"));
                self.buffer.push_back((seq, payload));
            }
        }
    }

    /// Answers replay requests: every kept batch from the asked sequence
    /// number on, then the terminator, as vLLM does.
    fn serve_replay(&mut self) {
        let Some(router) = &self.router else { return };
        while let Ok(frames) = router.recv_multipart(zmq::DONTWAIT) {
            let (identity, start) = match parse_replay_request(&frames) {
                Ok(request) => request,
                Err(reason) => {
                    tracing::warn!(%reason, "invalid KV event replay request ignored");
                    continue;
                }
            };
            let from = self.buffer.partition_point(|(seq, _)| *seq < start);
            for (seq, payload) in self.buffer.range(from..) {
                let reply = [identity, b"", &seq.to_be_bytes()[..], &payload[..]];
                if router.send_multipart(reply, zmq::DONTWAIT).is_err() {
                    break; // the peer left or cannot take more; it will time out
                }
            }
            let _ = router.send_multipart([identity, b"", &END_SEQ[..], b""], zmq::DONTWAIT);
        }
    }
}
