//! The NATS request plane (`DYN_REQUEST_PLANE=nats`). A worker subscribes to
//! its instance subject `switchyard.rpc.{instance_id:x}` and to
//! `….control`; a request is one message on the instance subject (payload:
//! the TCP plane's request head) with a reply inbox. The worker answers on
//! the inbox with frames `kind:u8 payload` — Data `0x11 seq:u32 item`, End
//! `0x12 count:u32`, Error `0x13 count:u32 error`, Heartbeat `0x14`, Batch
//! `0x15 seq:u32 (len:u32 item)…` (items `seq`, `seq + 1`, … that were ready
//! together, in one message), Last batch `0x16 seq:u32 (len:u32 item)…` (a
//! Batch that also ends the stream) — and sends a heartbeat every [`HEARTBEAT`] while
//! the stream is open, so a caller notices a dead worker within
//! [`SILENCE_LIMIT`], and one that never answered within [`ACCEPT_TIMEOUT`].
//! Cancel and credit travel on the control subject.
//!
//! Core NATS delivers at most once: a message in flight when the server
//! restarts, or while a client reconnects, is gone. So every Data frame
//! carries its number and the last frame the count sent; a caller that sees
//! a number skipped, or an end whose count is not what arrived, ends the
//! stream with `Disconnected` (the frontend then migrates the answer from
//! what did arrive) instead of yielding an answer with a hole in it. The
//! chaos run found such holes: two words missing from an answer after a
//! NATS restart.
//!
//! Cost per request is counted in messages: each one is a write, a pass
//! through the NATS server and a wake-up of the reader on the far side. So a
//! unary answer is one message (a Last batch: its item and the end) and
//! nothing else: no heartbeat
//! before the first answer unless the handler takes a heartbeat period, and
//! one reply-inbox deadline per stream rather than a timer per item.

use super::handlers::Handlers;
use super::pump::{CallerGone, Next, Pump, ResponseSink};
use super::tcp::frame::{CancelMode, FrameType, RequestHead};
use super::{ByteStream, RequestClient, RequestServer, Target, Transport};
use crate::engine::{Context, Controller};
use crate::error::{ErrorKind, RequestError, WireError};
use async_nats::Subject;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::StreamExt;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How often a worker tells the caller that a stream is still alive; the
/// first heartbeat comes one period after the request arrived, and only if
/// the stream is still open then.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// Silence after which a caller gives the worker up (`Disconnected`):
/// five missed heartbeats, so a worker merely slowed down (a busy machine)
/// is not given up on.
pub const SILENCE_LIMIT: Duration = Duration::from_secs(5);
/// How long a caller waits for the worker's first heartbeat before it
/// reports `Unreachable` (nobody serves the subject).
pub const ACCEPT_TIMEOUT: Duration = Duration::from_secs(10);
const HEARTBEAT_KIND: u8 = 0x14;
const BATCH_KIND: u8 = 0x15;
const LAST_BATCH_KIND: u8 = 0x16;
/// A stream's items that are ready together go out in one Batch message of
/// at most this many bytes (plus its 5-byte head).
const BATCH_BYTES: usize = 16 * 1024;
const CREDIT_KIND: u8 = 0x03;
const CANCEL_KIND: u8 = 0x02;

/// The subject a worker serves: `switchyard.rpc.{instance_id:x}`.
pub fn instance_subject(instance_id: u64) -> String {
    format!("switchyard.rpc.{instance_id:x}")
}

fn control_subject(instance_subject: &str) -> String {
    format!("{instance_subject}.control")
}

/// A Data frame: `0x11 seq:u32 item`, `seq` counting from 0.
fn data_frame(seq: u32, item: &[u8]) -> Bytes {
    counted_frame(FrameType::Data as u8, seq, item)
}

/// A Batch frame (`kind` [`BATCH_KIND`]) or a Last batch
/// ([`LAST_BATCH_KIND`]): `kind seq:u32`, then `len:u32 item` for each of
/// `items`, numbered from `seq`.
fn batch_frame(kind: u8, seq: u32, items: &[Bytes]) -> Bytes {
    let length: usize = items.iter().map(|item| 4 + item.len()).sum();
    let mut buf = BytesMut::with_capacity(5 + length);
    buf.put_u8(kind);
    buf.put_u32(seq);
    for item in items {
        buf.put_u32(item.len() as u32);
        buf.put_slice(item);
    }
    buf.freeze()
}

/// `kind number:u32 payload`: a Data frame's number, or the count of Data
/// frames sent before an End or Error frame.
fn counted_frame(kind: u8, number: u32, payload: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(5 + payload.len());
    buf.put_u8(kind);
    buf.put_u32(number);
    buf.put_slice(payload);
    buf.freeze()
}

/// A control message: `id_len:u8 id kind:u8 data`. The id is the stream's
/// reply inbox — unique per call and known only to the caller and the
/// worker — not the caller-chosen request id, which two requests may share.
fn control(stream: &str, kind: u8, data: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(2 + stream.len() + data.len());
    buf.put_u8(stream.len() as u8);
    buf.put_slice(stream.as_bytes());
    buf.put_u8(kind);
    buf.put_slice(data);
    buf.freeze()
}

/// The worker's subscription to its instance subject.
#[derive(Debug)]
pub struct NatsServer {
    subject: String,
}

impl NatsServer {
    /// Serves `handlers` on `subject` (normally [`instance_subject`]).
    pub async fn start(
        client: async_nats::Client,
        subject: String,
        handlers: Arc<Handlers>,
        max_message_size: usize,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) -> Result<Self, RequestError> {
        let subscribe = |subject: String| {
            let client = client.clone();
            async move {
                client.subscribe(subject.clone()).await.map_err(|e| {
                    RequestError::new(ErrorKind::Unreachable, format!("cannot subscribe to {subject}: {e}"))
                })
            }
        };
        let mut requests = subscribe(subject.clone()).await?;
        let mut controls = subscribe(control_subject(&subject)).await?;
        let shared = Arc::new(Shared {
            client,
            pump: Pump::new(handlers, shutdown.clone(), max_message_size),
            shutdown: shutdown.clone(),
            running: Mutex::default(),
        });
        let (requests_shared, requests_tracker) = (shared.clone(), tracker.clone());
        tracker.spawn(async move {
            loop {
                let message = tokio::select! {
                    _ = requests_shared.shutdown.cancelled() => break,
                    message = requests.next() => message,
                };
                let Some(message) = message else { break };
                let Some(reply) = message.reply else { continue };
                match RequestHead::decode(message.payload) {
                    Ok(head) => {
                        requests_tracker.spawn(run_stream(requests_shared.clone(), reply, head));
                    }
                    Err(error) => tracing::warn!(%error, "ignoring a malformed NATS request"),
                }
            }
        });
        let control_shared = shared.clone();
        tracker.spawn(async move {
            loop {
                let message = tokio::select! {
                    _ = control_shared.shutdown.cancelled() => break,
                    message = controls.next() => message,
                };
                let Some(message) = message else { break };
                control_shared.on_control(message.payload);
            }
        });
        tracing::info!(%subject, "request plane listening (nats)");
        Ok(Self { subject })
    }
}

impl RequestServer for NatsServer {
    fn transport(&self) -> Transport {
        Transport::Nats(self.subject.clone())
    }
}

struct Shared {
    client: async_nats::Client,
    /// Runs each request and sends its response.
    pump: Pump,
    shutdown: CancellationToken,
    /// Requests in flight, for cancel and credit messages.
    running: Mutex<HashMap<String, (Controller, Arc<Semaphore>)>>,
}

const HEARTBEAT_FRAME: Bytes = Bytes::from_static(&[HEARTBEAT_KIND]);

impl Shared {
    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Controller, Arc<Semaphore>)>> {
        // Single insert/remove updates: a poisoned map is still consistent.
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn on_control(&self, mut payload: Bytes) {
        if payload.is_empty() {
            return;
        }
        let id_len = payload.get_u8() as usize;
        if payload.len() < id_len + 1 {
            return;
        }
        let id = String::from_utf8_lossy(&payload.split_to(id_len)).into_owned();
        let kind = payload.get_u8();
        let running = self.running();
        let Some((controller, credit)) = running.get(&id) else {
            return;
        };
        match kind {
            CANCEL_KIND => match CancelMode::decode(&payload) {
                Ok(CancelMode::Stop) => controller.stop(),
                Ok(CancelMode::Kill) => controller.kill(),
                Err(_) => {}
            },
            CREDIT_KIND if payload.len() == 4 => {
                let items = payload.get_u32() as usize;
                let room = Semaphore::MAX_PERMITS - credit.available_permits();
                credit.add_permits(items.min(room));
            }
            _ => {}
        }
    }

    async fn send(&self, reply: &Subject, frame: Bytes) {
        // A failed publish means NATS is unreachable; the caller's silence limit covers it.
        let _ = self.client.publish(reply.clone(), frame).await;
    }
}

async fn run_stream(shared: Arc<Shared>, reply: Subject, head: RequestHead) {
    let controller = Controller::with_parent(head.request_id.clone(), &shared.shutdown);
    let credit = Arc::new(Semaphore::new((head.window as usize).clamp(1, Semaphore::MAX_PERMITS)));
    shared
        .running()
        .insert(reply.to_string(), (controller.clone(), credit.clone()));
    let request = Context::with_controller(head.body, controller);
    let sink = ReplySink {
        shared: shared.clone(),
        reply: reply.clone(),
        credit,
        sent: 0,
        held: Vec::new(),
        held_bytes: 0,
    };
    // The heartbeats run beside the whole request — while the handler is
    // called, while it works and while the worker waits for credit — and
    // stop with it. None before the first period: a request answered sooner
    // costs the caller no extra message (see the module doc).
    let heartbeats = async {
        let mut every = tokio::time::interval_at(tokio::time::Instant::now() + HEARTBEAT, HEARTBEAT);
        loop {
            every.tick().await;
            shared.send(&reply, HEARTBEAT_FRAME).await;
        }
    };
    tokio::select! {
        biased;
        () = shared.pump.run(&head.endpoint, head.instance_id, request, sink) => {}
        _ = heartbeats => {}
    }
}

/// One request's replies on its inbox.
struct ReplySink {
    shared: Arc<Shared>,
    /// The caller's inbox; as a string, also the key of this stream's controls.
    reply: Subject,
    /// Items the caller still takes; refilled by its credit messages.
    credit: Arc<Semaphore>,
    /// Items sent: the next one's number.
    sent: u32,
    /// Items held back to leave together, numbered from `sent`.
    held: Vec<Bytes>,
    held_bytes: usize,
}

impl ResponseSink for ReplySink {
    async fn next_item(&mut self, items: &mut ByteStream) -> Result<Next, CallerGone> {
        Ok(items.next().await)
    }

    fn try_credit(&mut self) -> bool {
        self.credit.try_acquire().map(|permit| permit.forget()).is_ok()
    }

    async fn credit(&mut self) {
        let permit = self.credit.acquire().await;
        permit.expect("the credit semaphore is never closed").forget();
    }

    async fn send(&mut self, item: Bytes) -> Result<(), CallerGone> {
        // A batch stays within BATCH_BYTES (far below NATS's max_payload);
        // an item larger than that leaves alone, as a Data frame.
        if self.held_bytes + 4 + item.len() > BATCH_BYTES {
            self.flush().await;
        }
        self.held_bytes += 4 + item.len();
        self.held.push(item);
        Ok(())
    }

    /// Sends the items held back: one alone as a Data frame, several as a Batch.
    async fn flush(&mut self) {
        let frame = match self.held.as_slice() {
            [] => return,
            [item] => data_frame(self.sent, item),
            items => batch_frame(BATCH_KIND, self.sent, items),
        };
        self.sent = self.sent.wrapping_add(self.held.len() as u32);
        self.held.clear();
        self.held_bytes = 0;
        self.shared.send(&self.reply, frame).await;
    }

    async fn finish(mut self, outcome: Result<(), RequestError>) {
        let last = match outcome {
            // The items held back and the end leave as one message.
            Ok(()) if !self.held.is_empty() => batch_frame(LAST_BATCH_KIND, self.sent, &self.held),
            Ok(()) => counted_frame(FrameType::End as u8, self.sent, &[]),
            Err(error) => {
                self.flush().await;
                counted_frame(FrameType::Error as u8, self.sent, &super::encode_error(&error))
            }
        };
        self.shared.running().remove(self.reply.as_str());
        self.shared.send(&self.reply, last).await;
    }
}

/// Calls workers over NATS.
#[derive(Debug, Clone)]
pub struct NatsRequestClient {
    client: async_nats::Client,
    max_message_size: usize,
    window: u32,
    /// The reply subscription every call of this client shares.
    inboxes: Arc<Inboxes>,
}

impl NatsRequestClient {
    pub fn new(client: async_nats::Client, config: &crate::config::RuntimeConfig) -> Self {
        Self {
            client,
            max_message_size: *config.tcp().max_message_size(),
            window: *config.tcp().stream_window(),
            inboxes: Arc::default(),
        }
    }
}

/// One reply subscription per client, `{prefix}.*`, shared by every call:
/// a call's inbox is `{prefix}.{n:x}`, and a task hands each message to its
/// call. A subscription per call would cost two more messages to the
/// server per request (SUB and UNSUB) and a change to its subscription
/// table each time; NATS request-reply shares one the same way.
#[derive(Debug, Default)]
struct Inboxes {
    replies: tokio::sync::OnceCell<Arc<Replies>>,
    /// Ends the routing task (and so the subscription) with the client.
    stop: CancellationToken,
}

impl Drop for Inboxes {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[derive(Debug)]
struct Replies {
    prefix: String,
    next: AtomicU64,
    /// Open calls by number. A call's queue holds what its window allows
    /// and then some; a worker that sends past it loses the call, not the
    /// other calls their messages.
    calls: Mutex<HashMap<u64, mpsc::Sender<Bytes>>>,
    /// The subscription ended (the connection was closed): no call can be answered.
    ended: AtomicBool,
}

/// A call's share of the reply subscription; leaving it drops the call's route.
struct Inbox {
    replies: Arc<Replies>,
    number: u64,
    subject: String,
    messages: mpsc::Receiver<Bytes>,
}

impl Drop for Inbox {
    fn drop(&mut self) {
        self.replies.calls().remove(&self.number);
    }
}

impl Replies {
    fn calls(&self) -> std::sync::MutexGuard<'_, HashMap<u64, mpsc::Sender<Bytes>>> {
        // Single insert/remove updates: a poisoned map is still consistent.
        self.calls.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands each message on the subscription to its call, until the
    /// subscription ends (the connection closed) or the client is dropped.
    async fn route(self: Arc<Self>, mut subscription: async_nats::Subscriber, stop: CancellationToken) {
        loop {
            let message = tokio::select! {
                _ = stop.cancelled() => break,
                message = subscription.next() => message,
            };
            let Some(message) = message else { break };
            let number = message
                .subject
                .rsplit_once('.')
                .and_then(|(_, number)| u64::from_str_radix(number, 16).ok());
            let Some(number) = number else { continue };
            let mut calls = self.calls();
            let overflowed = calls
                .get(&number)
                .is_some_and(|call| call.try_send(message.payload).is_err());
            if overflowed {
                // Full: the worker sent past its window. Closed: the call just ended.
                calls.remove(&number);
            }
        }
        // Every open call hears the end of its queue, and no new one opens.
        let mut calls = self.calls();
        self.ended.store(true, Ordering::Relaxed);
        calls.clear();
    }
}

impl Inboxes {
    /// A fresh inbox for one call, whose queue holds `capacity` messages.
    async fn open(&self, client: &async_nats::Client, capacity: usize) -> Result<Inbox, RequestError> {
        let replies = self
            .replies
            .get_or_try_init(|| async {
                let prefix = client.new_inbox();
                let subscription = client.subscribe(format!("{prefix}.*")).await.map_err(|e| {
                    RequestError::new(
                        ErrorKind::Unreachable,
                        format!("cannot subscribe to the reply inboxes: {e}"),
                    )
                })?;
                let replies = Arc::new(Replies {
                    prefix,
                    next: AtomicU64::new(0),
                    calls: Mutex::default(),
                    ended: Default::default(),
                });
                tokio::spawn(replies.clone().route(subscription, self.stop.clone()));
                Ok::<_, RequestError>(replies)
            })
            .await?
            .clone();
        let number = replies.next.fetch_add(1, Ordering::Relaxed);
        let (sender, messages) = mpsc::channel(capacity);
        {
            // Checked under the lock the routing task clears the calls under.
            let mut calls = replies.calls();
            if replies.ended.load(Ordering::Relaxed) {
                return Err(RequestError::new(
                    ErrorKind::Unreachable,
                    "the NATS connection is closed: no reply can reach this caller",
                ));
            }
            calls.insert(number, sender);
        }
        Ok(Inbox {
            subject: format!("{}.{number:x}", replies.prefix),
            replies,
            number,
            messages,
        })
    }
}

#[async_trait::async_trait]
impl RequestClient for NatsRequestClient {
    async fn call(&self, target: &Target, request: Context<Bytes>) -> Result<ByteStream, RequestError> {
        let Transport::Nats(subject) = &target.transport else {
            return Err(RequestError::new(
                ErrorKind::Invalid,
                format!("{target} is not a NATS target"),
            ));
        };
        let (body, controller) = request.into_parts();
        let server_limit = self.client.server_info().max_payload.saturating_sub(1024);
        let limit = self.max_message_size.min(server_limit.max(1024));
        if body.len() > limit {
            return Err(RequestError::new(
                ErrorKind::TooLarge,
                format!(
                    "request of {} bytes exceeds the limit of {limit} (DYN_TCP_MAX_MESSAGE_SIZE, or the NATS server's max_payload)",
                    body.len()
                ),
            ));
        }
        if !RequestHead::fits(&target.endpoint, controller.id()) {
            return Err(RequestError::new(
                ErrorKind::Invalid,
                "endpoint name or request id too long",
            ));
        }
        // Room for the window's items and a minute of heartbeats besides.
        let capacity = self.window as usize + 64;
        let mut responses = self.inboxes.open(&self.client, capacity).await?;
        let inbox = responses.subject.clone();
        let head = RequestHead {
            instance_id: target.instance_id,
            window: self.window,
            endpoint: target.endpoint.clone(),
            request_id: controller.id().to_string(),
            body,
        };
        self.client
            .publish_with_reply(subject.clone(), inbox.clone(), head.encode())
            .await
            .map_err(|e| RequestError::new(ErrorKind::Unreachable, format!("cannot publish to {subject}: {e}")))?;
        // A worker answers, or sends a heartbeat, within a heartbeat period;
        // silence means nobody serves the subject.
        let first = tokio::time::timeout(ACCEPT_TIMEOUT, responses.messages.recv()).await;
        let Ok(Some(first)) = first else {
            return Err(RequestError::new(
                ErrorKind::Unreachable,
                format!("no worker answered on {subject} within {ACCEPT_TIMEOUT:?}"),
            ));
        };
        let state = NatsResponse {
            inbox,
            responses,
            silence: Box::pin(tokio::time::sleep(SILENCE_LIMIT)),
            heard: tokio::time::Instant::now(),
            pending: Some(first),
            batch: Bytes::new(),
            controller,
            client: self.client.clone(),
            control: control_subject(subject),
            consumed: 0,
            received: 0,
            credit_batch: (self.window / 2).max(1),
            max_message_size: self.max_message_size,
            stop_sent: false,
            last_batch: false,
            done: false,
        };
        Ok(Box::pin(futures::stream::unfold(state, |mut state| async move {
            let item = state.next_item().await?;
            Some((item, state))
        })))
    }
}

struct NatsResponse {
    /// This call's reply inbox, which names the stream in control messages.
    inbox: String,
    responses: Inbox,
    /// Fires [`SILENCE_LIMIT`] after the last message heard, or later: one
    /// timer per stream, moved on only when it fires early (resetting a
    /// timer for every item of a fast stream costs more than the item).
    silence: std::pin::Pin<Box<tokio::time::Sleep>>,
    /// When the last message arrived.
    heard: tokio::time::Instant,
    /// A message read ahead (the worker's first answer).
    pending: Option<Bytes>,
    /// The rest of a Batch message: `len:u32 item` pairs not yet yielded.
    batch: Bytes,
    controller: Controller,
    client: async_nats::Client,
    control: String,
    consumed: u32,
    /// Data frames received: the number the next one must carry.
    received: u32,
    credit_batch: u32,
    max_message_size: usize,
    stop_sent: bool,
    /// The batch being read is the stream's last: it ends when the batch does.
    last_batch: bool,
    done: bool,
}

impl NatsResponse {
    async fn send_control(&self, kind: u8, data: &[u8]) {
        let _ = self
            .client
            .publish(self.control.clone(), control(&self.inbox, kind, data))
            .await;
    }

    async fn next_item(&mut self) -> Option<Result<Bytes, RequestError>> {
        if self.done {
            return None;
        }
        loop {
            if !self.batch.is_empty() {
                let item = self.next_of_batch().await;
                // The Last batch's last item: nothing follows.
                self.done |= self.last_batch && self.batch.is_empty();
                return Some(item);
            }
            if self.last_batch {
                self.done = true;
                return None;
            }
            let payload = match self.pending.take() {
                Some(payload) => payload,
                None => tokio::select! {
                    biased;
                    _ = self.controller.killed() => {
                        self.done = true;
                        self.send_control(CANCEL_KIND, &CancelMode::Kill.encode()).await;
                        return Some(Err(RequestError::new(ErrorKind::Cancelled, "the request was killed by the caller")));
                    }
                    _ = self.controller.stopped(), if !self.stop_sent => {
                        self.stop_sent = true;
                        self.send_control(CANCEL_KIND, &CancelMode::Stop.encode()).await;
                        continue;
                    }
                    message = self.responses.messages.recv() => match message {
                        Some(message) => {
                            self.heard = tokio::time::Instant::now();
                            message
                        }
                        None => {
                            self.done = true;
                            // The subscription ended with the connection, or the
                            // worker sent past its window: tell it to stop,
                            // should the message get through.
                            self.send_control(CANCEL_KIND, &CancelMode::Kill.encode()).await;
                            return Some(Err(RequestError::new(
                                ErrorKind::Disconnected,
                                "the reply inbox closed: the NATS connection ended, or the worker sent more than the stream's window",
                            )));
                        }
                    },
                    // After the messages: a message already waiting is not silence.
                    () = self.silence.as_mut() => {
                        let quiet_until = self.heard + SILENCE_LIMIT;
                        if quiet_until > tokio::time::Instant::now() {
                            self.silence.as_mut().reset(quiet_until);
                            continue;
                        }
                        self.done = true;
                        // The worker may only be slow (or waiting for credit): tell
                        // it to stop, so it does not keep the request until shutdown.
                        self.send_control(CANCEL_KIND, &CancelMode::Kill.encode()).await;
                        return Some(Err(silent_worker()));
                    }
                },
            };
            let Some((&kind, body)) = payload.split_first() else {
                continue;
            };
            if kind == HEARTBEAT_KIND {
                continue;
            }
            // Every other frame starts with a number: a Data frame's own, or
            // the count of Data frames before the end.
            let Some(number) = body.get(..4).map(|n| u32::from_be_bytes([n[0], n[1], n[2], n[3]])) else {
                self.done = true;
                return Some(Err(RequestError::new(
                    ErrorKind::Protocol,
                    format!("response frame kind 0x{kind:02x} without its number"),
                )));
            };
            let body = &body[4..];
            if number != self.received && matches!(kind, 0x11..=0x13 | BATCH_KIND | LAST_BATCH_KIND) {
                self.done = true;
                self.send_control(CANCEL_KIND, &CancelMode::Kill.encode()).await;
                return Some(Err(lost_items(kind, number, self.received)));
            }
            match kind {
                0x11 if body.len() > self.max_message_size => {
                    self.done = true;
                    self.send_control(CANCEL_KIND, &CancelMode::Kill.encode()).await;
                    return Some(Err(crate::request_plane::too_large(
                        "response item",
                        body.len(),
                        self.max_message_size,
                    )));
                }
                0x11 => {
                    self.received_one().await;
                    return Some(Ok(payload.slice(5..)));
                }
                BATCH_KIND => self.batch = payload.slice(5..),
                LAST_BATCH_KIND => {
                    self.batch = payload.slice(5..);
                    self.last_batch = true;
                }
                0x12 => {
                    self.done = true;
                    return None;
                }
                0x13 => {
                    self.done = true;
                    let error = rmp_serde::from_slice::<WireError>(body).map_or_else(
                        |e| RequestError::new(ErrorKind::Protocol, format!("undecodable error frame: {e}")),
                        RequestError::from,
                    );
                    return Some(Err(error));
                }
                other => {
                    self.done = true;
                    return Some(Err(RequestError::new(
                        ErrorKind::Protocol,
                        format!("unknown response frame kind 0x{other:02x}"),
                    )));
                }
            }
        }
    }
}

/// A frame numbered `number` where `received` was due: messages were lost
/// on the way (core NATS drops what is in flight across a restart or a
/// reconnect), or duplicated, which NATS never does.
impl NatsResponse {
    /// Counts an item received, returning credit every half window.
    async fn received_one(&mut self) {
        self.received = self.received.wrapping_add(1);
        self.consumed += 1;
        if self.consumed >= self.credit_batch {
            let credit = self.consumed;
            self.consumed = 0;
            self.send_control(CREDIT_KIND, &credit.to_be_bytes()).await;
        }
    }

    /// The next item of the Batch message being read.
    async fn next_of_batch(&mut self) -> Result<Bytes, RequestError> {
        let length = self
            .batch
            .get(..4)
            .map(|n| u32::from_be_bytes([n[0], n[1], n[2], n[3]]) as usize);
        let error = match length {
            Some(length) if length > self.max_message_size => {
                crate::request_plane::too_large("response item", length, self.max_message_size)
            }
            Some(length) if self.batch.len() >= 4 + length => {
                self.batch.advance(4);
                let item = self.batch.split_to(length);
                self.received_one().await;
                return Ok(item);
            }
            _ => RequestError::new(ErrorKind::Protocol, "a batch message ends inside an item"),
        };
        self.done = true;
        self.batch = Bytes::new();
        self.send_control(CANCEL_KIND, &CancelMode::Kill.encode()).await;
        Err(error)
    }
}

fn lost_items(kind: u8, number: u32, received: u32) -> RequestError {
    if number < received {
        return RequestError::new(
            ErrorKind::Protocol,
            format!("response frame kind 0x{kind:02x} numbered {number} after {received} items had arrived"),
        );
    }
    let lost = number.wrapping_sub(received);
    RequestError::new(
        ErrorKind::Disconnected,
        format!(
            "{lost} response item(s) from item {received} on were lost on the NATS request plane \
             (a NATS restart or reconnect drops messages in flight); the stream ends here rather than with a gap"
        ),
    )
}

fn silent_worker() -> RequestError {
    RequestError::new(
        ErrorKind::Disconnected,
        format!("the worker fell silent for {SILENCE_LIMIT:?} before the stream completed"),
    )
}

impl Drop for NatsResponse {
    fn drop(&mut self) {
        if !self.done {
            // Dropped early: kill the request on the worker.
            let (client, subject) = (self.client.clone(), self.control.clone());
            let message = control(&self.inbox, CANCEL_KIND, &CancelMode::Kill.encode());
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(async move {
                    let _ = client.publish(subject, message).await;
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RuntimeConfig;
    use crate::request_plane::conformance::{PlaneKit, conformance_tests};
    use futures::FutureExt;
    use futures::future::BoxFuture;
    use std::sync::OnceLock;
    use switchyard_test_support::nats_server::NatsServer as NatsProcess;

    /// One NATS server (8 MiB max_payload) for this test binary.
    fn server_url() -> String {
        static SERVER: OnceLock<NatsProcess> = OnceLock::new();
        SERVER
            .get_or_init(|| NatsProcess::start_with_max_payload(8 * 1024 * 1024))
            .url()
    }

    struct Nats;

    impl PlaneKit for Nats {
        fn server(
            &self,
            config: RuntimeConfig,
            handlers: Arc<Handlers>,
            stop: CancellationToken,
        ) -> BoxFuture<'static, Arc<dyn RequestServer>> {
            async move {
                let client = async_nats::connect(server_url()).await.unwrap();
                // Every test's worker has the same instance id: give each its own subject.
                let subject = format!("test.{:016x}.{:x}", rand::random::<u64>(), handlers.instance_id());
                let limit = *config.tcp().max_message_size();
                let server = NatsServer::start(client, subject, handlers, limit, stop, TaskTracker::new())
                    .await
                    .unwrap();
                Arc::new(server) as Arc<dyn RequestServer>
            }
            .boxed()
        }

        fn client(&self, config: RuntimeConfig) -> BoxFuture<'static, Arc<dyn RequestClient>> {
            async move {
                let client = async_nats::connect(server_url()).await.unwrap();
                Arc::new(NatsRequestClient::new(client, &config)) as Arc<dyn RequestClient>
            }
            .boxed()
        }
    }

    conformance_tests!(Nats);

    /// A hand-written worker on a bare NATS subject answers `request` with
    /// `frames`; returns what the caller's stream yields.
    async fn answered_with(frames: Vec<Bytes>) -> Vec<Result<Bytes, RequestError>> {
        let url = server_url();
        let worker = async_nats::connect(&url).await.unwrap();
        let subject = format!("test.frames.{:016x}", rand::random::<u64>());
        let mut requests = worker.subscribe(subject.clone()).await.unwrap();
        worker.flush().await.unwrap();
        let caller = NatsRequestClient::new(async_nats::connect(&url).await.unwrap(), &RuntimeConfig::local());
        let target = Target {
            transport: Transport::Nats(subject),
            endpoint: "test/frames/generate".into(),
            instance_id: 1,
        };
        let answering = tokio::spawn(async move {
            let request = requests.next().await.unwrap();
            let reply = request.reply.unwrap();
            for frame in frames {
                worker.publish(reply.clone(), frame).await.unwrap();
            }
            worker.flush().await.unwrap();
        });
        let stream = caller
            .call(&target, Context::new(Bytes::from_static(b"hi")))
            .await
            .unwrap();
        let items = tokio::time::timeout(Duration::from_secs(10), stream.collect::<Vec<_>>())
            .await
            .expect("the stream ends");
        answering.await.unwrap();
        items
    }

    /// Core NATS loses what is in flight across a restart: an answer with a
    /// hole in it must end as a broken stream (which the frontend migrates
    /// from what arrived), never pass for a whole one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_response_item_lost_on_the_way_ends_the_stream_as_broken_not_shorter() {
        let end = |count| counted_frame(FrameType::End as u8, count, &[]);
        let whole = answered_with(vec![data_frame(0, b"a"), data_frame(1, b"b"), end(2)]).await;
        let whole: Vec<Bytes> = whole.into_iter().map(Result::unwrap).collect();
        assert_eq!(whole, vec![Bytes::from_static(b"a"), Bytes::from_static(b"b")]);

        // Item 1 lost in the middle.
        let holed = answered_with(vec![data_frame(0, b"a"), data_frame(2, b"c"), end(3)]).await;
        assert_eq!(holed.len(), 2, "{holed:?}");
        assert_eq!(holed[0].as_ref().unwrap(), &Bytes::from_static(b"a"));
        let error = holed[1].as_ref().unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Disconnected, "{error}");
        assert!(
            error.message().contains("1 response item(s) from item 1 on were lost"),
            "{error}"
        );

        // The last item lost just before the end.
        let cut = answered_with(vec![data_frame(0, b"a"), end(2)]).await;
        assert_eq!(cut[1].as_ref().unwrap_err().kind(), ErrorKind::Disconnected, "{cut:?}");

        // Items lost before an error: the error does not hide the hole.
        let error = super::super::encode_error(&RequestError::new(ErrorKind::ShuttingDown, "draining"));
        let failed = answered_with(vec![
            data_frame(0, b"a"),
            counted_frame(FrameType::Error as u8, 3, &error),
        ])
        .await;
        let last = failed[1].as_ref().unwrap_err();
        assert_eq!(last.kind(), ErrorKind::Disconnected, "{last}");
        assert!(last.message().contains("2 response item(s)"), "{last}");
    }

    /// Items that were ready together arrive in one Batch message, numbered
    /// like Data frames; a batch cut short, an oversized item in one, or a
    /// batch after a lost message ends the stream.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_yields_its_items_in_order_and_is_checked_like_data_frames() {
        let end = |count| counted_frame(FrameType::End as u8, count, &[]);
        let items = |names: &[&'static [u8]]| names.iter().map(|n| Bytes::from_static(n)).collect::<Vec<_>>();
        let answer = answered_with(vec![
            data_frame(0, b"a"),
            batch_frame(BATCH_KIND, 1, &items(&[b"b", b"", b"cd"])),
            data_frame(4, b"e"),
            end(5),
        ])
        .await;
        let answer: Vec<Bytes> = answer.into_iter().map(Result::unwrap).collect();
        assert_eq!(answer, items(&[b"a", b"b", b"", b"cd", b"e"]));

        let holed = answered_with(vec![
            data_frame(0, b"a"),
            batch_frame(BATCH_KIND, 2, &items(&[b"c"])),
            end(3),
        ])
        .await;
        assert_eq!(
            holed[1].as_ref().unwrap_err().kind(),
            ErrorKind::Disconnected,
            "{holed:?}"
        );

        // A Last batch ends the stream after its items (none, too, is an
        // end), and is checked for lost messages like the others.
        let last = answered_with(vec![
            data_frame(0, b"a"),
            batch_frame(LAST_BATCH_KIND, 1, &items(&[b"b", b"c"])),
        ])
        .await;
        let last: Vec<Bytes> = last.into_iter().map(Result::unwrap).collect();
        assert_eq!(last, items(&[b"a", b"b", b"c"]));
        let empty = answered_with(vec![data_frame(0, b"a"), batch_frame(LAST_BATCH_KIND, 1, &[])]).await;
        let empty: Vec<Bytes> = empty.into_iter().map(Result::unwrap).collect();
        assert_eq!(empty, items(&[b"a"]));
        let holed = answered_with(vec![
            data_frame(0, b"a"),
            batch_frame(LAST_BATCH_KIND, 2, &items(&[b"c"])),
        ])
        .await;
        assert_eq!(holed.len(), 2, "{holed:?}");
        assert_eq!(
            holed[1].as_ref().unwrap_err().kind(),
            ErrorKind::Disconnected,
            "{holed:?}"
        );

        let mut cut = batch_frame(BATCH_KIND, 0, &items(&[b"ab", b"cd"])).to_vec();
        cut.pop();
        let cut = answered_with(vec![Bytes::from(cut), end(2)]).await;
        assert_eq!(cut[0].as_ref().unwrap(), &Bytes::from_static(b"ab"));
        let error = cut[1].as_ref().unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Protocol, "{error}");
        assert_eq!(cut.len(), 2, "the stream ends after the error: {cut:?}");

        let mut oversized = BytesMut::new();
        oversized.put_u8(BATCH_KIND);
        oversized.put_u32(0);
        oversized.put_u32(u32::MAX);
        let oversized = answered_with(vec![oversized.freeze(), end(1)]).await;
        assert_eq!(
            oversized[0].as_ref().unwrap_err().kind(),
            ErrorKind::TooLarge,
            "{oversized:?}"
        );
    }

    /// Every call of a client shares one reply subscription, each call with
    /// an inbox of its own under it; a call's route goes with the call, and
    /// a worker that floods one call past its queue ends that call alone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn calls_share_one_reply_subscription_and_a_flooded_call_ends_alone() {
        let client = async_nats::connect(server_url()).await.unwrap();
        let inboxes = Inboxes::default();
        let mut flooded = inboxes.open(&client, 4).await.unwrap();
        let mut other = inboxes.open(&client, 4).await.unwrap();
        let (prefix, number) = flooded.subject.rsplit_once('.').unwrap();
        let (other_prefix, other_number) = other.subject.rsplit_once('.').unwrap();
        assert_eq!(prefix, other_prefix, "one subscription");
        assert_ne!(number, other_number, "an inbox per call");

        for _ in 0..10 {
            client
                .publish(flooded.subject.clone(), Bytes::from_static(b"x"))
                .await
                .unwrap();
        }
        client
            .publish(other.subject.clone(), Bytes::from_static(b"y"))
            .await
            .unwrap();
        client.flush().await.unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(10), other.messages.recv()).await;
        assert_eq!(answer.unwrap().unwrap(), Bytes::from_static(b"y"));
        // The flooded call keeps what its queue held, then its queue ends.
        let kept = tokio::time::timeout(Duration::from_secs(10), async {
            let mut kept = 0;
            while let Some(message) = flooded.messages.recv().await {
                assert_eq!(message, Bytes::from_static(b"x"));
                kept += 1;
            }
            kept
        })
        .await
        .expect("the flooded call's queue ends");
        assert_eq!(kept, 4);

        drop(other);
        let replies = inboxes.replies.get().unwrap();
        assert!(
            replies.calls().is_empty(),
            "routes left behind: {:?}",
            replies.calls().keys()
        );
    }

    /// A stream that goes quiet for longer than the silence limit stays open
    /// while the worker lives: its heartbeats keep it, and the caller's one
    /// silence deadline is moved on rather than firing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_quiet_stream_outlives_the_silence_limit_on_heartbeats() {
        let pair = crate::request_plane::conformance::Pair::start(&Nats).await;
        let mut stream = pair.call("hang", "").await.unwrap();
        assert_eq!(&stream.next().await.unwrap().unwrap()[..], b"started");
        let quiet = SILENCE_LIMIT + HEARTBEAT + HEARTBEAT / 2;
        let next = tokio::time::timeout(quiet, stream.next()).await;
        assert!(next.is_err(), "the stream ended while the worker lived: {next:?}");
    }

    /// The same suite through a NATS server that speaks only TLS and
    /// requires a client certificate from the test CA: every connection is
    /// opened as the runtime opens it, from `NATS_AUTH_CA`,
    /// `NATS_AUTH_CLIENT_CERT` and `NATS_AUTH_CLIENT_KEY`.
    mod over_tls {
        use super::*;
        use crate::request_plane::conformance::test_mesh;

        fn tls_server() -> &'static NatsProcess {
            static SERVER: OnceLock<NatsProcess> = OnceLock::new();
            SERVER.get_or_init(|| NatsProcess::start_with_mutual_tls(test_mesh(), 8 * 1024 * 1024))
        }

        /// A connection with the test mesh's client certificate.
        async fn connect() -> async_nats::Client {
            let mesh = test_mesh();
            let url = tls_server().url();
            let config = RuntimeConfig::from_vars([
                ("NATS_SERVER", url.as_str()),
                ("NATS_AUTH_CA", mesh.ca.to_str().unwrap()),
                ("NATS_AUTH_CLIENT_CERT", mesh.client_cert.to_str().unwrap()),
                ("NATS_AUTH_CLIENT_KEY", mesh.client_key.to_str().unwrap()),
            ])
            .unwrap();
            crate::nats::connect(config.nats()).await.unwrap()
        }

        struct NatsOverTls;

        impl PlaneKit for NatsOverTls {
            fn server(
                &self,
                config: RuntimeConfig,
                handlers: Arc<Handlers>,
                stop: CancellationToken,
            ) -> BoxFuture<'static, Arc<dyn RequestServer>> {
                async move {
                    let subject = format!("test.{:016x}.{:x}", rand::random::<u64>(), handlers.instance_id());
                    let limit = *config.tcp().max_message_size();
                    let server = NatsServer::start(connect().await, subject, handlers, limit, stop, TaskTracker::new())
                        .await
                        .unwrap();
                    Arc::new(server) as Arc<dyn RequestServer>
                }
                .boxed()
            }

            fn client(&self, config: RuntimeConfig) -> BoxFuture<'static, Arc<dyn RequestClient>> {
                async move { Arc::new(NatsRequestClient::new(connect().await, &config)) as Arc<dyn RequestClient> }
                    .boxed()
            }
        }

        conformance_tests!(NatsOverTls);
    }
}
