//! Forwarding one LLM request to a vLLM OpenAI server and turning its SSE
//! answer into [`LlmOutput`] pieces.
//!
//! The request goes as the client sent it (unknown fields included), always
//! streamed with usage, so one parser serves both streaming and whole
//! answers; the frontend folds. Dropping the response stream drops the HTTP
//! connection, which makes vLLM abort the request.

use crate::check::snippet;
use futures::StreamExt;
use serde_json::Value;
use std::sync::Arc;
use switchyard_llm::model_card::EngineFeatures;
use switchyard_llm::openai::Usage;
use switchyard_llm::protocol::{FinishReason, LlmOutput, LlmRequest};
use switchyard_runtime::engine::{AsyncEngine, Context, Controller, ResponseStream};
use switchyard_runtime::error::{ErrorKind, RequestError};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Serves requests by forwarding them to one vLLM server.
#[derive(Debug, Clone)]
pub struct VllmForwarder {
    http: reqwest::Client,
    base_url: String,
    /// The server reports token ids when asked (`return_token_ids`), which
    /// migration continues from.
    token_ids: bool,
    /// For a server that cuts its running answer short when another request
    /// arrives (llama-cpp-python): one turn, held until the answer ends.
    turn: Option<Arc<Semaphore>>,
}

impl VllmForwarder {
    pub fn new(http: reqwest::Client, base_url: impl Into<String>, features: &EngineFeatures) -> Self {
        Self {
            http,
            base_url: base_url.into(),
            token_ids: features.token_ids,
            turn: features.one_at_a_time.then(|| Arc::new(Semaphore::new(1))),
        }
    }
}

/// The body sent upstream: the client's request, streamed with usage (and
/// asking for token ids when the server reports them).
fn upstream_body(request: &LlmRequest, token_ids: bool) -> Result<(String, Value), RequestError> {
    let (path, mut body) = match request {
        LlmRequest::Chat(chat) => ("/v1/chat/completions", serde_json::to_value(chat)),
        LlmRequest::Completion(completion) => ("/v1/completions", serde_json::to_value(completion)),
    };
    let body = body
        .as_mut()
        .map_err(|e| RequestError::new(ErrorKind::Invalid, format!("cannot encode the request: {e}")))?;
    body["stream"] = Value::Bool(true);
    body["stream_options"] = serde_json::json!({ "include_usage": true });
    if token_ids {
        body["return_token_ids"] = Value::Bool(true);
    }
    Ok((path.to_string(), body.take()))
}

/// The error kind for an HTTP status from vLLM.
fn kind_for_status(status: u16) -> ErrorKind {
    match status {
        400 | 413 | 422 => ErrorKind::Invalid,
        // vLLM's 404 is "no such model there": a misconfigured server, not a
        // missing instance, so not something to retry elsewhere.
        429 | 503 => ErrorKind::Overloaded,
        _ => ErrorKind::Engine,
    }
}

#[async_trait::async_trait]
impl AsyncEngine<LlmRequest, LlmOutput> for VllmForwarder {
    async fn generate(&self, request: Context<LlmRequest>) -> Result<ResponseStream<LlmOutput>, RequestError> {
        let (request, controller) = request.into_parts();
        let (path, body) = upstream_body(&request, self.token_ids)?;
        let url = format!("{}{path}", self.base_url);
        let turn = match &self.turn {
            None => None,
            Some(turn) => tokio::select! {
                permit = turn.clone().acquire_owned() => permit.ok(),
                _ = controller.stopped() => return Err(RequestError::new(ErrorKind::Cancelled, "cancelled while waiting for the engine")),
            },
        };
        let sent = tokio::select! {
            sent = self.http.post(&url).json(&body).send() => sent,
            _ = controller.stopped() => return Err(RequestError::new(ErrorKind::Cancelled, "cancelled before vLLM answered")),
        };
        let response = sent.map_err(|e| {
            let (kind, what) = if e.is_timeout() && !e.is_connect() {
                (ErrorKind::TimedOut, "sent no answer within --engine-read-timeout-secs")
            } else {
                (ErrorKind::Unreachable, "is unreachable")
            };
            RequestError::new(kind, format!("vLLM at {} {what}", self.base_url)).with_source(e)
        })?;
        let status = response.status().as_u16();
        if !(200..300).contains(&status) {
            let text = response.text().await.unwrap_or_default();
            let message = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| {
                    v["error"]["message"]
                        .as_str()
                        .or_else(|| v["message"].as_str())
                        .map(str::to_string)
                })
                .unwrap_or_else(|| snippet(&text));
            return Err(RequestError::new(
                kind_for_status(status),
                format!("vLLM answered {status}: {message}"),
            ));
        }
        let state = Upstream {
            bytes: Box::pin(response.bytes_stream()),
            buffer: Vec::new(),
            finish: None,
            tokens: 0,
            done: false,
            controller,
            _turn: turn,
        };
        Ok(Box::pin(futures::stream::unfold(state, Upstream::next)))
    }
}

type ByteStream = std::pin::Pin<Box<dyn futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>;

/// One upstream SSE answer being read.
struct Upstream {
    bytes: ByteStream,
    /// Bytes of an incomplete line.
    buffer: Vec<u8>,
    /// The finish reason, held until the usage chunk (or the end) arrives.
    finish: Option<FinishReason>,
    tokens: u32,
    done: bool,
    controller: Controller,
    /// This answer's turn at a one-at-a-time server, released with the stream.
    _turn: Option<OwnedSemaphorePermit>,
}

/// What one SSE `data:` line means.
enum Event {
    Piece(LlmOutput),
    Usage(Usage),
    Done,
    Error(String),
    /// The engine gave up on the request (vLLM's `finish_reason: abort`,
    /// on preemption or shutdown): not an answer that ended.
    Aborted,
    Nothing,
}

impl Upstream {
    async fn next(mut self) -> Option<(Result<LlmOutput, RequestError>, Self)> {
        if self.done {
            return None;
        }
        loop {
            if let Some(line) = self.take_line() {
                tracing::trace!(%line, "from the engine");
                match parse_line(&line) {
                    Event::Piece(piece) if piece.finish_reason.is_some() => {
                        self.finish = piece.finish_reason;
                        self.tokens += piece.tokens;
                        if !piece.text.is_empty() || !piece.token_ids.is_empty() {
                            let mut text_only = piece;
                            text_only.finish_reason = None;
                            return Some((Ok(text_only), self));
                        }
                    }
                    Event::Piece(piece) => {
                        self.tokens += piece.tokens;
                        return Some((Ok(piece), self));
                    }
                    Event::Usage(usage) => return Some((Ok(self.last(Some(usage))), self)),
                    Event::Done if self.finish.is_none() => {
                        // llama-cpp-python ends an answer it interrupts this
                        // way: that is no `stop`.
                        self.done = true;
                        let error = RequestError::new(
                            ErrorKind::Disconnected,
                            "the engine ended the answer without a finish reason",
                        );
                        return Some((Err(error), self));
                    }
                    Event::Done => return Some((Ok(self.last(None)), self)),
                    Event::Error(message) => {
                        self.done = true;
                        return Some((Err(RequestError::new(ErrorKind::Engine, message)), self));
                    }
                    Event::Aborted => {
                        // Another engine can take the request over (migration).
                        self.done = true;
                        let error = RequestError::new(ErrorKind::Disconnected, "the engine aborted the request");
                        return Some((Err(error), self));
                    }
                    Event::Nothing => {}
                }
                continue;
            }
            let chunk = tokio::select! {
                chunk = self.bytes.next() => chunk,
                _ = self.controller.stopped() => {
                    self.done = true;
                    return Some((Err(RequestError::new(ErrorKind::Cancelled, "the request was stopped")), self));
                }
            };
            match chunk {
                Some(Ok(bytes)) => self.buffer.extend_from_slice(&bytes),
                Some(Err(error)) => {
                    self.done = true;
                    let (kind, message) = if error.is_timeout() {
                        (
                            ErrorKind::TimedOut,
                            "vLLM sent nothing more within --engine-read-timeout-secs",
                        )
                    } else {
                        (ErrorKind::Disconnected, "vLLM broke off the answer")
                    };
                    return Some((Err(RequestError::new(kind, message).with_source(error)), self));
                }
                None => {
                    // Ended without [DONE]: complete if a finish was seen.
                    self.done = true;
                    if self.finish.is_some() {
                        return Some((Ok(self.last(None)), self));
                    }
                    let error = RequestError::new(ErrorKind::Disconnected, "vLLM closed the answer before it finished");
                    return Some((Err(error), self));
                }
            }
        }
    }

    /// The closing piece: the held finish reason and the usage.
    fn last(&mut self, usage: Option<Usage>) -> LlmOutput {
        self.done = true;
        LlmOutput {
            finish_reason: Some(self.finish.unwrap_or(FinishReason::Stop)),
            usage: Some(usage.unwrap_or(Usage::new(0, self.tokens))),
            ..LlmOutput::default()
        }
    }

    fn take_line(&mut self) -> Option<String> {
        let end = self.buffer.iter().position(|&b| b == b'\n')?;
        let line: Vec<u8> = self.buffer.drain(..=end).collect();
        Some(String::from_utf8_lossy(&line).trim_end().to_string())
    }
}

/// Reads one SSE line of a chat or completions stream.
fn parse_line(line: &str) -> Event {
    let Some(data) = line.strip_prefix("data:").map(str::trim) else {
        return Event::Nothing;
    };
    if data == "[DONE]" {
        return Event::Done;
    }
    let Ok(chunk) = serde_json::from_str::<Value>(data) else {
        return Event::Error(format!("vLLM sent an unreadable chunk: {}", snippet(data)));
    };
    if let Some(message) = chunk["error"]["message"].as_str() {
        return Event::Error(format!("vLLM: {message}"));
    }
    let choice = &chunk["choices"][0];
    if choice.is_null() {
        return match serde_json::from_value::<Usage>(chunk["usage"].clone()) {
            Ok(usage) => Event::Usage(usage),
            Err(_) => Event::Nothing,
        };
    }
    let text = choice["delta"]["content"]
        .as_str()
        .or_else(|| choice["text"].as_str())
        .unwrap_or_default()
        .to_string();
    let finish_reason = match choice["finish_reason"].as_str() {
        Some("length") => Some(FinishReason::Length),
        Some("abort") => return Event::Aborted,
        Some(_) => Some(FinishReason::Stop),
        None => None,
    };
    let token_ids = ids(&choice["token_ids"]);
    // Tokens are counted from their ids when the engine reports them (a
    // chunk may hold several, or none while a stop string is held back);
    // without ids, one per chunk with text is an estimate.
    let tokens = match &token_ids {
        Some(ids) => ids.len() as u32,
        None => u32::from(!text.is_empty()),
    };
    Event::Piece(LlmOutput {
        tokens,
        text,
        finish_reason,
        usage: None,
        token_ids: token_ids.unwrap_or_default(),
        // vLLM puts them in the first chunk's choice; be lenient about the level.
        prompt_token_ids: ids(&choice["prompt_token_ids"])
            .or_else(|| ids(&chunk["prompt_token_ids"]))
            .unwrap_or_default(),
    })
}

/// A JSON array of token ids; `None` when absent or not all ids.
fn ids(value: &Value) -> Option<Vec<u32>> {
    value
        .as_array()?
        .iter()
        .map(|id| id.as_u64().and_then(|id| u32::try_from(id).ok()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn chat_and_completion_chunks_become_pieces() {
        let Event::Piece(piece) =
            parse_line(r#"data: {"choices":[{"index":0,"delta":{"content":" hi"},"finish_reason":null}]}"#)
        else {
            panic!("a piece")
        };
        assert_eq!(
            (piece.text.as_str(), piece.tokens, piece.finish_reason),
            (" hi", 1, None)
        );
        let Event::Piece(piece) = parse_line(r#"data: {"choices":[{"index":0,"text":"","finish_reason":"length"}]}"#)
        else {
            panic!("a piece")
        };
        assert_eq!(piece.finish_reason, Some(FinishReason::Length));
    }

    #[test]
    fn usage_done_errors_and_other_lines_are_told_apart() {
        let usage = r#"data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}"#;
        assert!(matches!(parse_line(usage), Event::Usage(u) if u.completion_tokens == 2));
        assert!(matches!(parse_line("data: [DONE]"), Event::Done));
        assert!(matches!(parse_line(r#"data: {"error":{"message":"boom"}}"#), Event::Error(m) if m.contains("boom")));
        assert!(matches!(parse_line(": keep-alive"), Event::Nothing));
        assert!(matches!(parse_line("data: {not json"), Event::Error(_)));
    }

    #[test]
    fn the_upstream_body_keeps_unknown_fields_and_forces_streaming_with_usage() {
        let chat: switchyard_llm::openai::ChatCompletionRequest = switchyard_llm::openai::parse_request(
            br#"{"model":"m","messages":[{"role":"user","content":"x"}],"top_k":3,"stream":false}"#,
        )
        .unwrap();
        let request = LlmRequest::Chat(chat);
        let (path, body) = upstream_body(&request, false).unwrap();
        assert_eq!(path, "/v1/chat/completions");
        assert_eq!(body["top_k"], 3);
        assert_eq!(body["stream"], true);
        assert_eq!(body["stream_options"]["include_usage"], true);
        assert!(
            body.get("return_token_ids").is_none(),
            "only asked of servers that know it"
        );
        assert_eq!(upstream_body(&request, true).unwrap().1["return_token_ids"], true);
    }

    #[test]
    fn tokens_are_counted_from_their_ids_not_from_chunks() {
        let first = r#"data: {"choices":[{"index":0,"text":" upon a","token_ids":[11,12],"prompt_token_ids":[1,2]}]}"#;
        let Event::Piece(piece) = parse_line(first) else {
            panic!("a piece")
        };
        assert_eq!(piece.tokens, 2, "one chunk, two tokens");
        assert_eq!(piece.token_ids, vec![11, 12]);
        assert_eq!(piece.prompt_token_ids, vec![1, 2]);
        // A held-back stop string: ids, no text yet.
        let Event::Piece(piece) = parse_line(r#"data: {"choices":[{"index":0,"text":"","token_ids":[13]}]}"#) else {
            panic!("a piece")
        };
        assert_eq!((piece.text.as_str(), piece.tokens), ("", 1));
    }

    /// What an upstream answer made of `chunks` yields.
    async fn read(chunks: &[&str]) -> Vec<Result<LlmOutput, RequestError>> {
        let bytes: Vec<reqwest::Result<bytes::Bytes>> =
            chunks.iter().map(|c| Ok(bytes::Bytes::from(c.to_string()))).collect();
        let state = Upstream {
            bytes: Box::pin(futures::stream::iter(bytes)),
            buffer: Vec::new(),
            finish: None,
            tokens: 0,
            done: false,
            controller: Controller::with_id("test"),
            _turn: None,
        };
        futures::stream::unfold(state, Upstream::next).collect().await
    }

    /// A server on loopback that reads each request, writes `answer`
    /// (nothing when empty), then holds the connection open without a word.
    async fn wedged_server(answer: &'static str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut request = [0u8; 4096];
                    let _ = socket.read(&mut request).await;
                    let _ = socket.write_all(answer.as_bytes()).await;
                    tokio::time::sleep(Duration::from_secs(60)).await;
                });
            }
        });
        format!("http://{address}")
    }

    fn plain_server() -> EngineFeatures {
        EngineFeatures {
            server: "openai-compatible".into(),
            liveness: switchyard_llm::model_card::Liveness::Health,
            one_at_a_time: false,
            load: switchyard_llm::model_card::LoadGauges::InFlight,
            token_ids: false,
            continues_message: false,
        }
    }

    fn completion() -> Context<LlmRequest> {
        let request: switchyard_llm::openai::CompletionRequest =
            switchyard_llm::openai::parse_request(br#"{"model":"m","prompt":"hi"}"#).unwrap();
        Context::new(LlmRequest::Completion(request))
    }

    #[tokio::test]
    async fn a_server_that_never_answers_or_stalls_mid_answer_times_out() {
        let client = crate::engine_client(Duration::from_secs(1), Duration::from_millis(300)).unwrap();
        // No headers at all.
        let silent = VllmForwarder::new(client.clone(), wedged_server("").await, &plain_server());
        let started = tokio::time::Instant::now();
        let error = silent.generate(completion()).await.err().expect("a timeout");
        assert_eq!(error.kind(), ErrorKind::TimedOut, "{error}");
        assert!(started.elapsed() < Duration::from_secs(5));
        // Headers and one piece, then silence.
        let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n\
                    2d\r\ndata: {\"choices\":[{\"index\":0,\"text\":\" a\"}]}\n\n\r\n";
        let stalled = VllmForwarder::new(client, wedged_server(head).await, &plain_server());
        let mut stream = stalled.generate(completion()).await.unwrap();
        assert_eq!(stream.next().await.unwrap().unwrap().text, " a");
        let error = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("the stall ends within the read timeout")
            .unwrap()
            .unwrap_err();
        assert_eq!(error.kind(), ErrorKind::TimedOut, "{error}");
    }

    #[tokio::test]
    async fn an_answer_ended_without_a_finish_reason_is_an_error_not_a_stop() {
        // What llama-cpp-python sends when another request interrupts it.
        let role = "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\"},\"finish_reason\":null}]}\n\n";
        let items = read(&[role, "data: [DONE]\n\n"]).await;
        assert_eq!(items.len(), 2);
        let error = items[1].as_ref().unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Disconnected);
        assert!(error.message().contains("without a finish reason"), "{error}");

        // With a finish reason, [DONE] ends it normally.
        let finish = "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n";
        let items = read(&[role, finish, "data: [DONE]\n\n"]).await;
        let last = items.last().unwrap().as_ref().unwrap();
        assert_eq!(last.finish_reason, Some(FinishReason::Stop));
    }

    #[test]
    fn an_engine_abort_is_an_error_not_a_stop() {
        let line = r#"data: {"choices":[{"index":0,"text":"","finish_reason":"abort"}]}"#;
        assert!(matches!(parse_line(line), Event::Aborted));
    }

    #[test]
    fn vllm_statuses_map_to_error_kinds() {
        assert_eq!(kind_for_status(400), ErrorKind::Invalid);
        assert_eq!(kind_for_status(404), ErrorKind::Engine);
        assert_eq!(kind_for_status(503), ErrorKind::Overloaded);
        assert_eq!(kind_for_status(500), ErrorKind::Engine);
    }
}
