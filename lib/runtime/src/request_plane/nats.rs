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
use inboxes::{Inbox, Inboxes};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

mod inboxes;

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
        // The limit is never below the smaller of our own and 1 KiB: a
        // request within that skips reading the server's, which copies all
        // of the server's information (its strings and URLs) on every call.
        if body.len() > self.max_message_size.min(1024) {
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
        let head = RequestHead {
            instance_id: target.instance_id,
            window: self.window,
            endpoint: target.endpoint.clone(),
            request_id: controller.id().to_string(),
            body,
        };
        self.client
            .publish_with_reply(subject.clone(), responses.subject.clone(), head.encode())
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
    /// This call's reply inbox, whose subject names the stream in control messages.
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
            .publish(self.control.clone(), control(&self.responses.subject, kind, data))
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
        // A caller that stops at the last item it wanted often has the
        // worker's end here unread: that stream is over, nothing to kill.
        let ends = |payload: &Bytes| {
            payload.first().is_some_and(|&kind| {
                kind == FrameType::End as u8 || kind == FrameType::Error as u8 || kind == LAST_BATCH_KIND
            })
        };
        if self.done || self.last_batch || self.pending.as_ref().is_some_and(ends) {
            return;
        }
        while let Ok(payload) = self.responses.messages.try_recv() {
            if ends(&payload) {
                return;
            }
        }
        // Dropped early: kill the request on the worker.
        let (client, subject) = (self.client.clone(), self.control.clone());
        let message = control(&self.responses.subject, CANCEL_KIND, &CancelMode::Kill.encode());
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                let _ = client.publish(subject, message).await;
            });
        }
    }
}

#[cfg(test)]
mod tests;
