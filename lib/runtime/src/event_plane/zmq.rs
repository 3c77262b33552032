//! The ZMQ event transport, on libzmq (the `zmq` crate; ADR 0011): a
//! publisher binds a PUB socket on an ephemeral port and registers it under
//! `v1/event_channels/{ns}/{comp}/{topic}/{instance_id:x}`; a subscriber
//! follows those registrations and keeps one SUB socket per publisher,
//! opened when the publisher appears and closed when it goes.
//!
//! Messages are two frames: the topic, then the msgpack envelope.
//!
//! libzmq sockets are synchronous, so each publisher and each subscription
//! owns one named std thread that alone touches its sockets and talks to
//! tokio through bounded queues. Must not trust a peer: every socket caps
//! frames at [`MAX_MESSAGE_SIZE`], so a peer declaring a huge frame is cut
//! off before anything is allocated (logged, and counted on
//! `dynamo_event_plane_disconnects_total`).

use super::{Channel, EventChannel, EventError, EventPlane, EventSink, EventTransport, Subscription};
use crate::discovery::{Bucket, Discovery, Key, Query, Registration, WatchEvent};
use crate::runtime::Runtime;
use bytes::Bytes;
use futures::StreamExt;
use futures::future::{Either, select};
use std::collections::HashMap;
use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::time::Duration;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Logs a warning when a publisher's port is reachable from other machines:
/// the ZMQ event plane is neither encrypted nor authenticated (ADR 0013),
/// so anyone there can read its events, and anyone who can also register in
/// discovery can publish forged ones.
fn warn_if_exposed(endpoint: &str) {
    if is_exposed(endpoint) {
        tracing::warn!(
            %endpoint,
            "the ZMQ event plane publishes on a non-loopback address without encryption or authentication: \
             any host that reaches it reads the load reports; use DYN_EVENT_PLANE=nats with NATS_AUTH_* and \
             NATS_AUTH_CA, or keep DYN_TCP_RPC_HOST on a private network (docs/security.md, ADR 0013)"
        );
    }
}

/// Whether a bound endpoint (`tcp://IP:port`) listens beyond loopback.
fn is_exposed(endpoint: &str) -> bool {
    endpoint
        .strip_prefix("tcp://")
        .and_then(|rest| rest.rsplit_once(':'))
        .map(|(host, _)| host.trim_start_matches('[').trim_end_matches(']'))
        .and_then(|host| host.parse::<std::net::IpAddr>().ok())
        .is_some_and(|ip| !ip.is_loopback())
}

/// Envelopes queued for the socket thread before `publish` waits.
const PUBLISH_QUEUE: usize = 65_536;

/// libzmq's `ZMQ_MAXMSGSIZE` on every socket. Envelopes are load reports
/// and KV events, a few KiB at most; 16 MiB (the KV event subscriber's cap
/// too) only stops what is not an envelope, before libzmq allocates it.
pub(crate) const MAX_MESSAGE_SIZE: i64 = 16 * 1024 * 1024;

/// Messages queued per subscriber in the PUB socket, and per publisher in
/// the SUB socket, before libzmq drops (which shows as gaps). libzmq's
/// default of 1,000 loses events in a burst that the subscriber's own
/// 65,536-event buffer would absorb; 100,000 is what the `zeromq` crate
/// used before (ADR 0003).
const HIGH_WATER_MARK: i32 = 100_000;

/// How long a thread waits on its sockets or queue before it looks at its
/// stop signal again: stopping takes at most this long, and an idle thread
/// wakes ten times a second, which costs nothing measurable.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Messages read in a row before a thread looks at its stop signal and its
/// other sockets again, so one flooding peer cannot starve the rest.
const BURST: usize = 1_024;

/// The least time between two SUB sockets for one publisher. libzmq does
/// not reconnect after a protocol error (a frame over the cap is one), so a
/// subscriber opens a fresh socket after any disconnection; this bounds how
/// often a peer that keeps breaking the protocol is reconnected to.
const REOPEN_INTERVAL: Duration = Duration::from_millis(500);

/// Numbers the monitors' `inproc://` addresses, unique per context.
static MONITORS: AtomicU64 = AtomicU64::new(0);

/// The ZMQ event plane of one process.
pub(crate) struct ZmqEventPlane {
    /// Where publishers are registered and found.
    discovery: Arc<dyn Discovery>,
    /// The address publishers bind their PUB sockets on (port 0: any free one).
    bind_host: String,
    /// Owns the watch tasks, and a task per thread that ends with it, so
    /// shutdown waits for the threads too.
    runtime: Runtime,
    /// libzmq's I/O threads, shared by every socket of the process.
    context: zmq::Context,
    /// Connections cut or lost, on either side.
    disconnects: prometheus::IntCounter,
}

impl std::fmt::Debug for ZmqEventPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZmqEventPlane")
            .field("bind_host", &self.bind_host)
            .finish_non_exhaustive()
    }
}

impl ZmqEventPlane {
    pub(crate) fn new(
        discovery: Arc<dyn Discovery>,
        bind_host: String,
        runtime: Runtime,
        disconnects: prometheus::IntCounter,
    ) -> Self {
        Self {
            discovery,
            bind_host,
            runtime,
            context: zmq::Context::new(),
            disconnects,
        }
    }

    /// Starts `body` on a thread named `name`, tracked by the runtime: its
    /// shutdown waits for the thread (which stops on the root token) to end.
    fn thread(&self, name: &'static str, body: impl FnOnce() + Send + 'static) -> Result<(), EventError> {
        let (ended, finished) = oneshot::channel::<()>();
        std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                body();
                drop(ended);
            })
            .map_err(|source| EventError::Thread { name, source })?;
        self.runtime.spawn(async move {
            let _ = finished.await;
        });
        Ok(())
    }
}

#[async_trait::async_trait]
impl EventPlane for ZmqEventPlane {
    /// Binds a PUB socket and registers it under `v1/event_channels/…`.
    async fn publisher(&self, channel: &Channel) -> Result<Box<dyn EventSink>, EventError> {
        let zmq_error = |action| move |source| EventError::Zmq { action, source };
        let socket = self.context.socket(zmq::PUB).map_err(zmq_error("socket"))?;
        configure(&socket).map_err(zmq_error("configure"))?;
        socket.set_sndhwm(HIGH_WATER_MARK).map_err(zmq_error("configure"))?;
        socket
            .bind(&format!("tcp://{}:0", self.bind_host))
            .map_err(zmq_error("bind"))?;
        let endpoint = match socket.get_last_endpoint().map_err(zmq_error("bind"))? {
            Ok(endpoint) => endpoint,
            Err(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        };
        let monitor = Monitor::open(&self.context, &socket).map_err(zmq_error("monitor"))?;
        let record = EventChannel {
            namespace: channel.namespace.clone(),
            component: channel.key_component().to_string(),
            topic: channel.topic.clone(),
            instance_id: self.discovery.instance_id(),
            transport: EventTransport::Zmq(endpoint.clone()),
        };
        let key = Key {
            bucket: Bucket::EventChannels,
            namespace: record.namespace.clone(),
            component: record.component.clone(),
            name: record.topic.clone(),
            instance_id: record.instance_id,
        };
        let value = Bytes::from(serde_json::to_vec(&record).expect("an event channel always serializes"));
        self.discovery
            .register(Registration {
                key: key.clone(),
                value,
            })
            .await?;
        let (frames, queue) = std_mpsc::sync_channel::<Bytes>(PUBLISH_QUEUE);
        let room = Arc::new(Semaphore::new(PUBLISH_QUEUE));
        let sender = PublisherThread {
            socket,
            monitor,
            topic: channel.topic.clone().into_bytes(),
            queue,
            room: room.clone(),
            stop: self.runtime.root_token().clone(),
            endpoint: endpoint.clone(),
            disconnects: self.disconnects.clone(),
        };
        self.thread("event-pub", move || sender.run())?;
        tracing::debug!(%endpoint, topic = %channel.topic, "zmq event publisher bound");
        warn_if_exposed(&endpoint);
        Ok(Box::new(ZmqPublisher {
            frames,
            room,
            registration: key,
            discovery: self.discovery.clone(),
            runtime: self.runtime.clone(),
        }))
    }

    /// Follows the channel's publishers in discovery and forwards their
    /// envelopes to `events` until `stop`.
    async fn subscribe(
        &self,
        channel: &Channel,
        events: mpsc::Sender<Bytes>,
        stop: CancellationToken,
    ) -> Result<Subscription, EventError> {
        let query = Query::bucket(Bucket::EventChannels)
            .namespace(&channel.namespace)
            .component(channel.key_component())
            .name(&channel.topic);
        let mut watch = self.discovery.watch(&query).await?;
        let connected = Arc::new(AtomicU64::new(0));
        // A few discovery changes at a time: the thread takes them every
        // poll interval, and the watch waits meanwhile.
        let (commands, received) = mpsc::channel::<Command>(64);
        let receiver = SubscriberThread {
            context: self.context.clone(),
            links: HashMap::new(),
            commands: received,
            events,
            stop: stop.clone(),
            connected: connected.clone(),
            disconnects: self.disconnects.clone(),
        };
        self.thread("event-sub", move || receiver.run())?;
        self.runtime.spawn(async move {
            // The endpoint followed per publisher, as told to the thread.
            let mut publishers: HashMap<Key, String> = HashMap::new();
            loop {
                let event = tokio::select! {
                    _ = stop.cancelled() => break,
                    event = watch.next() => event,
                };
                let Some(Ok(event)) = event else {
                    tracing::warn!("event channel watch ended; no new publishers will be found");
                    stop.cancelled().await;
                    break;
                };
                let mut wanted: Vec<(Key, String)> = vec![];
                let mut gone: Vec<Key> = vec![];
                match event {
                    WatchEvent::Snapshot(all) => {
                        let endpoints: Vec<(Key, String)> = all.iter().filter_map(endpoint_of).collect();
                        gone.extend(
                            publishers
                                .keys()
                                .filter(|key| !endpoints.iter().any(|(k, _)| k == *key))
                                .cloned(),
                        );
                        wanted = endpoints;
                    }
                    WatchEvent::Put(registration) => wanted.extend(endpoint_of(&registration)),
                    WatchEvent::Delete(key) => gone.push(key),
                }
                let mut changes = vec![];
                for key in gone {
                    if publishers.remove(&key).is_some() {
                        changes.push(Command::Leave(key));
                    }
                }
                for (key, endpoint) in wanted {
                    if publishers.get(&key) != Some(&endpoint) {
                        publishers.insert(key.clone(), endpoint.clone());
                        changes.push(Command::Follow(key, endpoint));
                    }
                }
                for change in changes {
                    let sent = tokio::select! {
                        _ = stop.cancelled() => return,
                        sent = commands.send(change) => sent,
                    };
                    if sent.is_err() {
                        return; // the thread stopped: the subscriber is gone
                    }
                }
            }
        });
        Ok(Subscription {
            connected_publishers: Some(connected),
        })
    }
}

/// What every socket gets: no lingering on close (what a peer did not get,
/// it sees as a gap) and the frame size cap.
fn configure(socket: &zmq::Socket) -> Result<(), zmq::Error> {
    socket.set_linger(0)?;
    socket.set_maxmsgsize(MAX_MESSAGE_SIZE)
}

/// The sending half of a ZMQ publisher; dropping it stops the thread (which
/// closes the socket) and removes the registration.
#[derive(Debug)]
struct ZmqPublisher {
    /// To the publisher thread; never full, thanks to `room`.
    frames: std_mpsc::SyncSender<Bytes>,
    /// One permit per free place in `frames`, so `send` can wait for room
    /// without blocking tokio; closed when the thread stops.
    room: Arc<Semaphore>,
    registration: Key,
    discovery: Arc<dyn Discovery>,
    runtime: Runtime,
}

#[async_trait::async_trait]
impl EventSink for ZmqPublisher {
    async fn send(&self, envelope: Bytes) -> Result<(), EventError> {
        let permit = self.room.acquire().await.map_err(|_| EventError::Closed)?;
        // The thread gives the permit back when it takes the envelope.
        permit.forget();
        self.frames.try_send(envelope).map_err(|_| EventError::Closed)
    }
}

impl Drop for ZmqPublisher {
    fn drop(&mut self) {
        let (discovery, key) = (self.discovery.clone(), self.registration.clone());
        self.runtime.spawn(async move {
            if let Err(error) = discovery.unregister(&key).await {
                tracing::debug!(%key, %error, "could not unregister event channel");
            }
        });
    }
}

fn endpoint_of(registration: &Registration) -> Option<(Key, String)> {
    match serde_json::from_slice::<EventChannel>(&registration.value) {
        Ok(EventChannel {
            transport: EventTransport::Zmq(endpoint),
            ..
        }) => Some((registration.key.clone(), endpoint)),
        Err(error) => {
            tracing::warn!(key = %registration.key, %error, "ignoring an unreadable event channel");
            None
        }
    }
}

/// A PAIR socket receiving a socket's connection events from libzmq.
struct Monitor {
    socket: zmq::Socket,
}

/// What a monitor reported.
enum Seen {
    Connected,
    Disconnected { peer: String },
}

impl Monitor {
    /// Watches `socket`'s handshakes and disconnections.
    fn open(context: &zmq::Context, socket: &zmq::Socket) -> Result<Self, zmq::Error> {
        let address = format!(
            "inproc://event-plane-monitor-{}",
            MONITORS.fetch_add(1, Ordering::Relaxed)
        );
        let events = zmq::SocketEvent::HANDSHAKE_SUCCEEDED as i32 | zmq::SocketEvent::DISCONNECTED as i32;
        socket.monitor(&address, events)?;
        let monitor = context.socket(zmq::PAIR)?;
        monitor.set_linger(0)?;
        monitor.connect(&address)?;
        Ok(Self { socket: monitor })
    }

    /// The next event already reported, without waiting.
    fn next(&self) -> Option<Seen> {
        // Two frames: event id (u16) and value (u32), native-endian; then the peer.
        let frames = self.socket.recv_multipart(zmq::DONTWAIT).ok()?;
        let id = frames
            .first()
            .filter(|f| f.len() >= 2)
            .map(|f| u16::from_ne_bytes([f[0], f[1]]))?;
        let peer = frames
            .get(1)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .unwrap_or_default();
        match zmq::SocketEvent::from_raw(id) {
            zmq::SocketEvent::HANDSHAKE_SUCCEEDED => Some(Seen::Connected),
            zmq::SocketEvent::DISCONNECTED => Some(Seen::Disconnected { peer }),
            // Not asked for; read past it.
            _ => self.next(),
        }
    }
}

/// One publisher's thread: it alone touches the PUB socket.
struct PublisherThread {
    socket: zmq::Socket,
    monitor: Monitor,
    topic: Vec<u8>,
    queue: std_mpsc::Receiver<Bytes>,
    room: Arc<Semaphore>,
    stop: CancellationToken,
    /// For the logs.
    endpoint: String,
    disconnects: prometheus::IntCounter,
}

impl PublisherThread {
    fn run(self) {
        // Ends when the sink is dropped (the queue disconnects) or the process stops.
        while !self.stop.is_cancelled() {
            match self.queue.recv_timeout(POLL_INTERVAL) {
                Ok(envelope) => {
                    self.send(envelope);
                    for _ in 1..BURST {
                        let Ok(envelope) = self.queue.try_recv() else { break };
                        self.send(envelope);
                    }
                }
                Err(std_mpsc::RecvTimeoutError::Timeout) => {}
                Err(std_mpsc::RecvTimeoutError::Disconnected) => break,
            }
            while let Some(seen) = self.monitor.next() {
                if let Seen::Disconnected { peer } = seen {
                    self.disconnects.inc();
                    tracing::warn!(endpoint = %self.endpoint, %peer, "event subscriber disconnected (it left, or broke the protocol, e.g. declared a frame over the size cap)");
                }
            }
        }
        // Senders waiting for room learn that the publisher is gone.
        self.room.close();
        tracing::debug!(endpoint = %self.endpoint, "zmq event publisher stopped");
    }

    fn send(&self, envelope: Bytes) {
        self.room.add_permits(1);
        // PUB never blocks on a slow subscriber: it drops for that
        // subscriber, which shows there as a gap.
        if let Err(error) = self
            .socket
            .send_multipart([&self.topic[..], &envelope[..]], zmq::DONTWAIT)
        {
            tracing::warn!(endpoint = %self.endpoint, %error, "zmq publish failed");
        }
    }
}

/// A change of the publishers a subscription follows.
enum Command {
    Follow(Key, String),
    Leave(Key),
}

/// One publisher a subscription follows.
struct Link {
    endpoint: String,
    /// `None` between a disconnection and the reopening (or after a failed open).
    live: Option<Live>,
    /// When a fresh SUB socket may be opened.
    reopen_at: Option<Instant>,
}

/// A SUB socket connected to one publisher, and its monitor.
struct Live {
    sub: zmq::Socket,
    monitor: Monitor,
    opened: Instant,
    /// The handshake succeeded and no disconnection followed.
    connected: bool,
}

impl Live {
    fn open(context: &zmq::Context, endpoint: &str) -> Result<Self, zmq::Error> {
        let sub = context.socket(zmq::SUB)?;
        configure(&sub)?;
        sub.set_rcvhwm(HIGH_WATER_MARK)?;
        sub.set_subscribe(b"")?;
        let monitor = Monitor::open(context, &sub)?;
        sub.connect(endpoint)?;
        Ok(Self {
            sub,
            monitor,
            opened: Instant::now(),
            connected: false,
        })
    }
}

/// One subscription's thread: it alone touches the SUB sockets.
struct SubscriberThread {
    context: zmq::Context,
    links: HashMap<Key, Link>,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<Bytes>,
    stop: CancellationToken,
    connected: Arc<AtomicU64>,
    disconnects: prometheus::IntCounter,
}

/// The thread stops: cancelled, or the subscriber dropped its receiver.
struct Stopped;

impl SubscriberThread {
    fn run(mut self) {
        let _ = self.serve();
        for (_, link) in self.links.drain() {
            if link.live.is_some_and(|live| live.connected) {
                self.connected.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }

    fn serve(&mut self) -> Result<(), Stopped> {
        loop {
            if self.stop.is_cancelled() || self.events.is_closed() {
                return Err(Stopped);
            }
            loop {
                match self.commands.try_recv() {
                    Ok(command) => self.apply(command),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => return Err(Stopped),
                }
            }
            self.reopen_due();
            let keys: Vec<Key> = self
                .links
                .iter()
                .filter(|(_, link)| link.live.is_some())
                .map(|(key, _)| key.clone())
                .collect();
            let ready: Vec<(bool, bool)> = {
                let mut items = Vec::with_capacity(keys.len() * 2);
                for key in &keys {
                    let live = self.links[key].live.as_ref().expect("only live links");
                    items.push(live.sub.as_poll_item(zmq::POLLIN));
                    items.push(live.monitor.socket.as_poll_item(zmq::POLLIN));
                }
                // With no socket, this only sleeps the interval.
                match zmq::poll(&mut items, POLL_INTERVAL.as_millis() as i64) {
                    Ok(_) | Err(zmq::Error::EINTR) => {}
                    Err(error) => {
                        tracing::error!(%error, "zmq event subscriber stops: polling its sockets failed");
                        return Err(Stopped);
                    }
                }
                items
                    .chunks(2)
                    .map(|pair| (pair[0].is_readable(), pair[1].is_readable()))
                    .collect()
            };
            for (key, (live, monitor)) in keys.iter().zip(ready) {
                if live {
                    self.read(key)?;
                }
                if monitor {
                    self.watch(key)?;
                }
            }
        }
    }

    fn apply(&mut self, command: Command) {
        match command {
            Command::Follow(key, endpoint) => {
                self.leave(&key);
                let mut link = Link {
                    endpoint,
                    live: None,
                    reopen_at: None,
                };
                self.open(&mut link);
                self.links.insert(key, link);
            }
            Command::Leave(key) => self.leave(&key),
        }
    }

    fn leave(&mut self, key: &Key) {
        if let Some(link) = self.links.remove(key)
            && link.live.is_some_and(|live| live.connected)
        {
            self.connected.fetch_sub(1, Ordering::AcqRel);
        }
    }

    fn open(&self, link: &mut Link) {
        link.reopen_at = None;
        match Live::open(&self.context, &link.endpoint) {
            Ok(live) => link.live = Some(live),
            // A malformed endpoint in discovery: wait for the registration to change.
            Err(error) => tracing::warn!(endpoint = %link.endpoint, %error, "cannot connect to event publisher"),
        }
    }

    fn reopen_due(&mut self) {
        let now = Instant::now();
        let due: Vec<Key> = self
            .links
            .iter()
            .filter(|(_, link)| link.reopen_at.is_some_and(|at| at <= now))
            .map(|(key, _)| key.clone())
            .collect();
        for key in due {
            let mut link = self.links.remove(&key).expect("listed above");
            self.open(&mut link);
            self.links.insert(key, link);
        }
    }

    /// Forwards what the publisher's socket holds (a burst at most).
    fn read(&mut self, key: &Key) -> Result<(), Stopped> {
        for _ in 0..BURST {
            let Some(live) = self.links.get(key).and_then(|link| link.live.as_ref()) else {
                return Ok(());
            };
            let Ok(mut frames) = live.sub.recv_multipart(zmq::DONTWAIT) else {
                return Ok(());
            };
            if frames.len() != 2 {
                tracing::debug!(
                    frames = frames.len(),
                    "ignoring a zmq message that is not topic + envelope"
                );
                continue;
            }
            let envelope = Bytes::from(frames.pop().expect("two frames"));
            deliver(&self.stop, self.events.send(envelope))?;
        }
        Ok(())
    }

    /// Follows a publisher's handshakes and disconnections. After a
    /// disconnection the socket is replaced (not before
    /// [`REOPEN_INTERVAL`] after it was opened): libzmq reconnects by
    /// itself after the peer went away, but not after a protocol error.
    fn watch(&mut self, key: &Key) -> Result<(), Stopped> {
        let Some(link) = self.links.get_mut(key) else {
            return Ok(());
        };
        let Some(live) = link.live.as_mut() else {
            return Ok(());
        };
        let mut disconnected = false;
        while let Some(seen) = live.monitor.next() {
            match seen {
                Seen::Connected if !live.connected => {
                    live.connected = true;
                    self.connected.fetch_add(1, Ordering::AcqRel);
                }
                Seen::Connected => {}
                Seen::Disconnected { peer } => {
                    disconnected = true;
                    self.disconnects.inc();
                    tracing::warn!(endpoint = %link.endpoint, %peer, "event publisher disconnected (it went away, or broke the protocol, e.g. declared a frame over the size cap); reconnecting");
                }
            }
        }
        if !disconnected {
            return Ok(());
        }
        // What arrived before the cut is still good.
        self.read(key)?;
        let link = self.links.get_mut(key).expect("still followed");
        let live = link.live.take().expect("still live");
        if live.connected {
            self.connected.fetch_sub(1, Ordering::AcqRel);
        }
        link.reopen_at = Some(live.opened + REOPEN_INTERVAL);
        Ok(())
    }
}

/// Runs `send` on this (non-tokio) thread until there is room for the
/// envelope; fails when `stop` is cancelled or the subscriber is gone.
fn deliver<F, E>(stop: &CancellationToken, send: F) -> Result<(), Stopped>
where
    F: Future<Output = Result<(), E>>,
{
    let stopped = pin!(stop.cancelled());
    let send = pin!(send);
    match futures::executor::block_on(select(stopped, send)) {
        Either::Right((Ok(()), _)) => Ok(()),
        Either::Left(_) | Either::Right((Err(_), _)) => Err(Stopped),
    }
}

#[cfg(test)]
mod tests {
    /// ADR 0013 rests on this: `zmq-sys` builds its vendored libzmq without
    /// libsodium, so CURVE is not there to turn on. A build that gains it
    /// fails here, and the ADR's choice should be made again.
    #[test]
    fn the_vendored_libzmq_has_no_curve_so_the_zmq_event_plane_cannot_authenticate() {
        assert_eq!(zmq::has("curve"), Some(false), "libzmq has CURVE now: revisit ADR 0013");
    }

    #[test]
    fn only_a_publisher_on_a_non_loopback_address_is_exposed() {
        // The parsing behind the warning: loopback in both families is quiet.
        for endpoint in ["tcp://127.0.0.1:5555", "tcp://[::1]:5555", "ipc:///tmp/x"] {
            assert!(!super::is_exposed(endpoint), "{endpoint}");
        }
        for endpoint in ["tcp://10.0.0.7:5555", "tcp://[fd00::7]:5555"] {
            assert!(super::is_exposed(endpoint), "{endpoint}");
        }
    }
}
