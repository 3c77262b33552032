//! Turning a worker's stream of [`LlmOutput`] pieces into an OpenAI answer:
//! SSE chunks ending in `data: [DONE]`, or one folded response. An
//! [`Exchange`] follows each admitted request for the metrics, and notices
//! a client that leaves early: its drop (the response body dropped by the
//! server) cancels the request on the worker.

use crate::error::ApiError;
use crate::metrics::FrontendMetrics;
use crate::write_deadline::WriteDeadline;
use axum::body::Body;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use bytes::{BufMut, Bytes, BytesMut};
use futures::StreamExt;
use prometheus::{Histogram, IntGauge};
use std::convert::Infallible;
use switchyard_llm::openai::{
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionResponse, ChatDelta,
    CompletionChoice, CompletionResponse, Role, Usage,
};
use switchyard_llm::protocol::{LlmOutput, LlmRequest};
use switchyard_runtime::engine::ResponseStream;
use switchyard_runtime::error::RequestError;
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
    /// The start every chunk of this answer shares.
    chunks: ChunkHead,
    sent_role: bool,
    /// What is left to send after the worker's stream ended.
    tail: Vec<Bytes>,
    done: bool,
}

/// The part every chunk of one answer starts with, serialised once:
/// `{"id":…,"object":…,"created":…,"model":…,"choices":[`. A token's
/// chunk is then this, its one choice and `]}`, written straight into the
/// bytes hyper sends — the same JSON as serialising the whole chunk, without
/// copying and escaping the id and model again for every token.
struct ChunkHead(Vec<u8>);

impl ChunkHead {
    /// From the JSON of a chunk with no choices and no usage, which ends in `[]}`.
    fn of(mut head: Vec<u8>) -> Self {
        debug_assert!(head.ends_with(b"[]}"), "choices must be the last field of a chunk");
        head.truncate(head.len() - 2);
        Self(head)
    }

    /// The SSE event of the chunk holding only `choice`.
    fn event<T: serde::Serialize>(&self, choice: &T) -> Bytes {
        let mut event = BytesMut::with_capacity(self.0.len() + 128);
        event.put_slice(b"data: ");
        event.put_slice(&self.0);
        serde_json::to_writer((&mut event).writer(), choice).expect("response types always serialize");
        event.put_slice(b"]}\n\n");
        event.freeze()
    }
}

/// An SSE response over the worker's stream. An event the client leaves
/// unread past the write deadline ends the request (see [`WriteDeadline`]).
pub fn stream(
    exchange: Exchange,
    responses: ResponseStream<LlmOutput>,
    created: u64,
    deadline: &WriteDeadline,
) -> Response {
    let chunks = ChunkHead::of(choiceless_chunk(&exchange, created, None));
    let state = Streaming {
        exchange,
        responses,
        created,
        chunks,
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
                Bytes::from_static(DONE)
            }
        };
        Some((Ok(event), state))
    });
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(deadline.watch(Box::pin(events))),
    )
        .into_response()
}

/// The event that ends every SSE answer.
const DONE: &[u8] = b"data: [DONE]\n\n";

impl Streaming {
    /// The SSE event for one piece; after the last piece, queues the usage
    /// chunk (when asked for) and `[DONE]`.
    fn piece(&mut self, piece: LlmOutput) -> Bytes {
        self.exchange.observe(&piece);
        let finish = piece.finish_reason.map(|f| f.as_str().to_string());
        let event = match self.exchange.route {
            Route::Chat => {
                let role = (!self.sent_role).then_some(Role::Assistant);
                self.sent_role = true;
                let content = (!piece.text.is_empty() || role.is_some()).then_some(piece.text);
                self.chunks.event(&ChatChunkChoice {
                    index: 0,
                    delta: ChatDelta { role, content },
                    finish_reason: finish.clone(),
                    logprobs: None,
                })
            }
            Route::Completions => self.chunks.event(&CompletionChoice {
                index: 0,
                text: piece.text,
                finish_reason: finish.clone(),
                logprobs: None,
            }),
        };
        if finish.is_some() {
            self.done = true;
            let usage = piece.usage.unwrap_or(Usage::new(0, self.exchange.output_tokens));
            self.exchange.end(true, Some(usage));
            // Popped from the back: [DONE] goes last.
            self.tail.push(Bytes::from_static(DONE));
            if self.exchange.include_usage {
                self.tail.push(self.usage_event(usage));
            }
        }
        event
    }

    /// OpenAI's usage chunk: no choices, only `usage`.
    fn usage_event(&self, usage: Usage) -> Bytes {
        sse_event(None, &choiceless_chunk(&self.exchange, self.created, Some(usage)))
    }
}

/// The JSON of one of the answer's chunks with no choices: the start of
/// every chunk (`usage` `None`), or OpenAI's usage chunk.
fn choiceless_chunk(exchange: &Exchange, created: u64, usage: Option<Usage>) -> Vec<u8> {
    let (id, model) = (exchange.id.clone(), exchange.model.clone());
    let json = match exchange.route {
        Route::Chat => serde_json::to_vec(&ChatCompletionChunk {
            id,
            object: "chat.completion.chunk".into(),
            created,
            model,
            choices: vec![],
            usage,
        }),
        Route::Completions => serde_json::to_vec(&CompletionResponse {
            id,
            object: "text_completion".into(),
            created,
            model,
            choices: vec![],
            usage,
        }),
    };
    json.expect("response types always serialize")
}

/// One SSE event, `event: <name>` (if any) and `data: <json>`; serde_json
/// writes no raw newlines, so the JSON is one data line.
fn sse_event(name: Option<&str>, json: &[u8]) -> Bytes {
    let mut event = BytesMut::with_capacity(json.len() + 32);
    if let Some(name) = name {
        event.put_slice(b"event: ");
        event.put_slice(name.as_bytes());
        event.put_u8(b'\n');
    }
    event.put_slice(b"data: ");
    event.put_slice(json);
    event.put_slice(b"\n\n");
    event.freeze()
}

/// A mid-stream failure: an `event: error` carrying OpenAI's error body; the stream ends after it.
fn error_event(model: &str, error: &RequestError) -> Bytes {
    let api = ApiError::from_request(model, error);
    let body = serde_json::to_vec(&api.body()).expect("error body serializes");
    sse_event(Some("error"), &body)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn json_event<T: serde::Serialize>(value: &T) -> Bytes {
        sse_event(None, &serde_json::to_vec(value).unwrap())
    }

    fn chat_chunk(choices: Vec<ChatChunkChoice>) -> ChatCompletionChunk {
        ChatCompletionChunk {
            id: "chatcmpl-\"quoted\"\\".into(),
            object: "chat.completion.chunk".into(),
            created: 1_700_000_000,
            model: "org/model \u{e9}".into(),
            choices,
            usage: None,
        }
    }

    #[test]
    fn a_chunk_from_its_head_is_the_json_of_the_whole_chunk() {
        let head = ChunkHead::of(serde_json::to_vec(&chat_chunk(vec![])).unwrap());
        for (role, content, finish) in [
            (Some(Role::Assistant), Some(String::new()), None),
            (None, Some("a \"token\"\n".to_string()), None),
            (None, None, Some("stop".to_string())),
        ] {
            let choice = ChatChunkChoice {
                index: 0,
                delta: ChatDelta { role, content },
                finish_reason: finish,
                logprobs: None,
            };
            let whole = json_event(&chat_chunk(vec![choice.clone()]));
            assert_eq!(head.event(&choice), whole);
        }

        let completion = |choices| CompletionResponse {
            id: "cmpl-1".into(),
            object: "text_completion".into(),
            created: 7,
            model: "m".into(),
            choices,
            usage: None,
        };
        let head = ChunkHead::of(serde_json::to_vec(&completion(vec![])).unwrap());
        let choice = CompletionChoice {
            index: 0,
            text: " once".into(),
            finish_reason: None,
            logprobs: None,
        };
        assert_eq!(head.event(&choice), json_event(&completion(vec![choice.clone()])));
    }

    #[test]
    fn events_are_sse_data_lines_ending_in_a_blank_line() {
        let event = json_event(&serde_json::json!({"a": "b\nc"}));
        assert_eq!(&event[..], b"data: {\"a\":\"b\\nc\"}\n\n");
        let error = sse_event(Some("error"), b"{}");
        assert_eq!(&error[..], b"event: error\ndata: {}\n\n");
    }
}
