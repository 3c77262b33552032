//! Turning a worker's stream of [`LlmOutput`] pieces into an OpenAI answer:
//! SSE chunks ending in `data: [DONE]`, or one folded response. An
//! [`Exchange`] follows each admitted request for the metrics, and notices
//! a client that leaves early: its drop (the response body dropped by the
//! server) cancels the request on the worker.

use crate::error::ApiError;
use crate::metrics::FrontendMetrics;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};
use prometheus::{Histogram, IntGauge};
use std::convert::Infallible;
use std::time::Duration;
use switchyard_llm::openai::{
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionResponse, ChatDelta,
    CompletionChoice, CompletionResponse, Role, Usage,
};
use switchyard_llm::protocol::{LlmOutput, LlmRequest};
use switchyard_runtime::engine::ResponseStream;
use switchyard_runtime::error::RequestError;
use tokio::sync::mpsc::error::SendTimeoutError;
use tokio::time::Instant;

/// Which OpenAI route a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Chat,
    Completions,
}

impl Route {
    /// The `endpoint` label value (Dynamo's).
    pub fn label(self) -> &'static str {
        match self {
            Route::Chat => "chat_completions",
            Route::Completions => "completions",
        }
    }

    pub fn path(self) -> &'static str {
        match self {
            Route::Chat => "/v1/chat/completions",
            Route::Completions => "/v1/completions",
        }
    }
}

pub fn request_type(stream: bool) -> &'static str {
    if stream { "stream" } else { "unary" }
}

pub fn is_streaming(request: &LlmRequest) -> bool {
    match request {
        LlmRequest::Chat(chat) => chat.stream,
        LlmRequest::Completion(completion) => completion.stream,
    }
}

fn include_usage(request: &LlmRequest) -> bool {
    match request {
        LlmRequest::Chat(chat) => chat.include_usage(),
        LlmRequest::Completion(completion) => completion.include_usage(),
    }
}

/// One admitted request from arrival to the end of its response.
#[derive(Debug)]
pub struct Exchange {
    metrics: FrontendMetrics,
    model: String,
    route: Route,
    stream: bool,
    include_usage: bool,
    /// Response id (`chatcmpl-…` / `cmpl-…`).
    id: String,
    started: Instant,
    /// When the last token arrived (None before the first).
    last_token: Option<Instant>,
    output_tokens: u32,
    /// Set once the response is complete (or failed); a drop before that is a disconnect.
    ended: bool,
    /// This model's series of the per-token metrics, looked up once rather
    /// than by label on every token.
    inflight: IntGauge,
    queued: IntGauge,
    ttft: Histogram,
    itl: Histogram,
}

impl Exchange {
    pub fn begin(metrics: FrontendMetrics, model: &str, route: Route, stream: bool, request: &LlmRequest) -> Self {
        let inflight = metrics.inflight.with_label_values(&[model]);
        let queued = metrics.queued.with_label_values(&[model]);
        let ttft = metrics.ttft.with_label_values(&[model]);
        let itl = metrics.itl.with_label_values(&[model]);
        inflight.inc();
        queued.inc();
        let prefix = match route {
            Route::Chat => "chatcmpl",
            Route::Completions => "cmpl",
        };
        Self {
            metrics,
            model: model.to_string(),
            route,
            stream,
            include_usage: include_usage(request),
            id: format!("{prefix}-{}", uuid::Uuid::new_v4().simple()),
            started: Instant::now(),
            last_token: None,
            output_tokens: 0,
            ended: false,
            inflight,
            queued,
            ttft,
            itl,
        }
    }

    /// The router refused the request; the caller counts the error.
    pub fn refused(mut self) {
        self.ended = true;
    }

    /// Records the timing of one piece.
    fn observe(&mut self, piece: &LlmOutput) {
        if piece.tokens == 0 {
            return;
        }
        let now = Instant::now();
        match self.last_token {
            None => {
                self.ttft.observe((now - self.started).as_secs_f64());
                self.queued.dec();
            }
            Some(last) => {
                let per_token = (now - last).as_secs_f64() / f64::from(piece.tokens);
                self.itl.observe(per_token);
            }
        }
        self.last_token = Some(now);
        self.output_tokens += piece.tokens;
    }

    /// The response is complete (`ok`) or ended with an error.
    fn end(&mut self, ok: bool, usage: Option<Usage>) {
        self.ended = true;
        let labels = [self.model.as_str()];
        let status = if ok { "success" } else { "error" };
        self.metrics
            .requests
            .with_label_values(&[&self.model, self.route.label(), request_type(self.stream), status])
            .inc();
        self.metrics
            .duration
            .with_label_values(&labels)
            .observe(self.started.elapsed().as_secs_f64());
        if let Some(usage) = usage {
            self.metrics
                .input_tokens
                .with_label_values(&labels)
                .observe(f64::from(usage.prompt_tokens));
        }
        self.metrics
            .output_tokens
            .with_label_values(&labels)
            .observe(f64::from(self.output_tokens));
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        self.inflight.dec();
        if self.last_token.is_none() {
            self.queued.dec();
        }
        if !self.ended {
            // The client went away: dropping the worker's stream (next to
            // this exchange) tells the worker to stop.
            self.metrics.disconnected.inc();
            self.metrics
                .cancellations
                .with_label_values(&[&self.model, self.route.label(), request_type(self.stream)])
                .inc();
            self.metrics
                .requests
                .with_label_values(&[&self.model, self.route.label(), request_type(self.stream), "error"])
                .inc();
            tracing::debug!(model = %self.model, id = %self.id, "client disconnected; request cancelled");
        }
    }
}

/// The state of one SSE response.
struct Streaming {
    exchange: Exchange,
    responses: ResponseStream<LlmOutput>,
    created: u64,
    sent_role: bool,
    /// What is left to send after the worker's stream ended.
    tail: Vec<Event>,
    done: bool,
}

/// An SSE response over the worker's stream. An event the client leaves
/// unread for `write_timeout` ends the request (see [`write_deadline`]).
pub fn stream(
    exchange: Exchange,
    responses: ResponseStream<LlmOutput>,
    created: u64,
    write_timeout: Duration,
) -> Response {
    let state = Streaming {
        exchange,
        responses,
        created,
        sent_role: false,
        tail: Vec::new(),
        done: false,
    };
    let events = futures::stream::unfold(state, |mut state| async move {
        if let Some(event) = state.tail.pop() {
            return Some((Ok::<_, Infallible>(event), state));
        }
        if state.done {
            return None;
        }
        let event = match state.responses.next().await {
            Some(Ok(piece)) => state.piece(piece),
            Some(Err(error)) => {
                state.done = true;
                state.exchange.end(false, None);
                error_event(&state.exchange.model, &error)
            }
            None => {
                // The worker's stream ended without a finish: treat as complete.
                state.done = true;
                state.exchange.end(true, None);
                Event::default().data("[DONE]")
            }
        };
        Some((Ok(event), state))
    });
    Sse::new(write_deadline(events, write_timeout)).into_response()
}

/// Events the producing task may run ahead of the client: a burst of
/// tokens from the worker is handed over together and written in one go
/// (hyper gathers the events that are ready into one `writev`) instead of
/// one task switch and one write per token. Bounded, so a client that
/// stops reading holds at most this many events.
const EVENTS_AHEAD: usize = 32;

/// Events as the client reads them: a task moves events on as the client
/// takes them, at most [`EVENTS_AHEAD`] ahead. A client that leaves them
/// unread for `limit` (it stopped reading, and the socket's buffers are
/// full) has its request dropped — which cancels it on the worker, freeing the
/// engine's KV cache — rather than held open for as long as it keeps the
/// connection. A client that goes away drops it at once.
fn write_deadline<S>(events: S, limit: Duration) -> impl Stream<Item = Result<Event, Infallible>> + Send
where
    S: Stream<Item = Result<Event, Infallible>> + Send + 'static,
{
    let (sender, receiver) = tokio::sync::mpsc::channel(EVENTS_AHEAD);
    tokio::spawn(async move {
        let mut events = std::pin::pin!(events);
        loop {
            let event = tokio::select! {
                event = events.next() => event,
                _ = sender.closed() => return,
            };
            let Some(event) = event else { return };
            match sender.send_timeout(event, limit).await {
                Ok(()) => {}
                Err(SendTimeoutError::Timeout(_)) => {
                    tracing::info!(
                        ?limit,
                        "client left the answer unread past --http-write-timeout-secs; request cancelled"
                    );
                    return;
                }
                Err(SendTimeoutError::Closed(_)) => return,
            }
        }
    });
    let mut receiver = receiver;
    futures::stream::poll_fn(move |cx| receiver.poll_recv(cx))
}

impl Streaming {
    /// The SSE event for one piece; after the last piece, queues the usage
    /// chunk (when asked for) and `[DONE]`.
    fn piece(&mut self, piece: LlmOutput) -> Event {
        self.exchange.observe(&piece);
        let finish = piece.finish_reason.map(|f| f.as_str().to_string());
        let event = match self.exchange.route {
            Route::Chat => {
                let role = (!self.sent_role).then_some(Role::Assistant);
                self.sent_role = true;
                let content = (!piece.text.is_empty() || role.is_some()).then(|| piece.text.clone());
                json_event(&ChatCompletionChunk {
                    id: self.exchange.id.clone(),
                    object: "chat.completion.chunk".into(),
                    created: self.created,
                    model: self.exchange.model.clone(),
                    choices: vec![ChatChunkChoice {
                        index: 0,
                        delta: ChatDelta { role, content },
                        finish_reason: finish.clone(),
                        logprobs: None,
                    }],
                    usage: None,
                })
            }
            Route::Completions => json_event(&self.completion(piece.text.clone(), finish.clone(), None)),
        };
        if finish.is_some() {
            self.done = true;
            let usage = piece.usage.unwrap_or(Usage::new(0, self.exchange.output_tokens));
            self.exchange.end(true, Some(usage));
            // Popped from the back: [DONE] goes last.
            self.tail.push(Event::default().data("[DONE]"));
            if self.exchange.include_usage {
                self.tail.push(self.usage_event(usage));
            }
        }
        event
    }

    fn completion(&self, text: String, finish: Option<String>, usage: Option<Usage>) -> CompletionResponse {
        CompletionResponse {
            id: self.exchange.id.clone(),
            object: "text_completion".into(),
            created: self.created,
            model: self.exchange.model.clone(),
            choices: vec![CompletionChoice {
                index: 0,
                text,
                finish_reason: finish,
                logprobs: None,
            }],
            usage,
        }
    }

    /// OpenAI's usage chunk: no choices, only `usage`.
    fn usage_event(&self, usage: Usage) -> Event {
        match self.exchange.route {
            Route::Chat => json_event(&ChatCompletionChunk {
                id: self.exchange.id.clone(),
                object: "chat.completion.chunk".into(),
                created: self.created,
                model: self.exchange.model.clone(),
                choices: vec![],
                usage: Some(usage),
            }),
            Route::Completions => {
                let mut chunk = self.completion(String::new(), None, Some(usage));
                chunk.choices.clear();
                json_event(&chunk)
            }
        }
    }
}

fn json_event<T: serde::Serialize>(value: &T) -> Event {
    Event::default().data(serde_json::to_string(value).expect("response types always serialize"))
}

/// A mid-stream failure: an `event: error` carrying OpenAI's error body; the stream ends after it.
fn error_event(model: &str, error: &RequestError) -> Event {
    let api = ApiError::from_request(model, error);
    Event::default()
        .event("error")
        .data(serde_json::to_string(&api.body()).expect("error body serializes"))
}

/// Folds the worker's stream into one response. An error before the first
/// piece gets its own status; a later one is reported the same way, as the
/// client has received nothing yet.
pub async fn unary(mut exchange: Exchange, mut responses: ResponseStream<LlmOutput>, created: u64) -> Response {
    let mut text = String::new();
    let mut finish = None;
    let mut usage = None;
    while let Some(item) = responses.next().await {
        match item {
            Ok(piece) => {
                exchange.observe(&piece);
                text.push_str(&piece.text);
                if piece.finish_reason.is_some() {
                    finish = piece.finish_reason;
                    usage = piece.usage;
                    break;
                }
            }
            Err(error) => {
                exchange.end(false, None);
                return ApiError::from_request(&exchange.model, &error).into_response();
            }
        }
    }
    let usage = usage.unwrap_or(Usage::new(0, exchange.output_tokens));
    exchange.end(true, Some(usage));
    let finish_reason = Some(finish.map_or("stop", |f| f.as_str()).to_string());
    match exchange.route {
        Route::Chat => axum::Json(ChatCompletionResponse {
            id: exchange.id.clone(),
            object: "chat.completion".into(),
            created,
            model: exchange.model.clone(),
            choices: vec![ChatChoice {
                index: 0,
                message: AssistantMessage {
                    role: Role::Assistant,
                    content: text,
                },
                finish_reason,
                logprobs: None,
            }],
            usage,
        })
        .into_response(),
        Route::Completions => axum::Json(CompletionResponse {
            id: exchange.id.clone(),
            object: "text_completion".into(),
            created,
            model: exchange.model.clone(),
            choices: vec![CompletionChoice {
                index: 0,
                text,
                finish_reason,
                logprobs: None,
            }],
            usage: Some(usage),
        })
        .into_response(),
    }
}
