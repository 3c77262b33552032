//! The mocker engine behind the LLM wire types: turns an OpenAI request into
//! prompt tokens, runs it through the simulated vLLM, and streams readable
//! text back, honouring `max_tokens` and `stop`.

use crate::stop::{StopMatcher, StopStep};
use futures::StreamExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use switchyard_llm::openai::Usage;
use switchyard_llm::protocol::{FinishReason, LlmOutput, LlmRequest};
use switchyard_mocker::engine::{EngineOutput, EngineRequest, EngineStream, MockerEngine, SubmitError};
use switchyard_mocker::text;
use switchyard_runtime::engine::{AsyncEngine, Context, Controller, ResponseStream};
use switchyard_runtime::error::{ErrorKind, RequestError};

/// Output length when the client gives no `max_tokens`: OpenAI would run to
/// the context length, which makes a simulated answer pointlessly long.
pub const DEFAULT_MAX_TOKENS: u32 = 128;

/// Serves one model from one [`MockerEngine`].
#[derive(Debug, Clone)]
pub struct MockerLlm {
    engine: MockerEngine,
    model: String,
    context_length: u32,
    /// Fault injection: every Nth request hangs before its first token (0: none).
    stall_every: u64,
    requests: Arc<AtomicU64>,
}

impl MockerLlm {
    pub fn new(engine: MockerEngine, model: impl Into<String>, context_length: u32) -> Self {
        Self {
            engine,
            model: model.into(),
            context_length,
            stall_every: 0,
            requests: Arc::default(),
        }
    }

    /// Makes every `n`th request hang before its first token until the
    /// caller stops it, as if the engine had stopped (fault injection; 0
    /// answers every request).
    pub fn stalling_first_token_every(mut self, n: u64) -> Self {
        self.stall_every = n;
        self
    }

    pub fn engine(&self) -> &MockerEngine {
        &self.engine
    }
}

#[async_trait::async_trait]
impl AsyncEngine<LlmRequest, LlmOutput> for MockerLlm {
    async fn generate(&self, request: Context<LlmRequest>) -> Result<ResponseStream<LlmOutput>, RequestError> {
        let (request, controller) = request.into_parts();
        if request.model() != self.model {
            return Err(RequestError::new(
                ErrorKind::NotFound,
                format!("this worker serves model {:?}, not {:?}", self.model, request.model()),
            ));
        }
        let prompt_tokens = text::tokenize(&request.flat_prompt());
        let prompt_len = u32::try_from(prompt_tokens.len()).unwrap_or(u32::MAX);
        let room = self.context_length.saturating_sub(prompt_len);
        if room == 0 {
            return Err(RequestError::new(
                ErrorKind::Invalid,
                format!(
                    "the prompt has {prompt_len} tokens; model {:?} has a context length of {} tokens",
                    self.model, self.context_length
                ),
            ));
        }
        let max_tokens = request.max_tokens().unwrap_or(DEFAULT_MAX_TOKENS).min(room);
        let count = self.requests.fetch_add(1, Ordering::Relaxed) + 1;
        if self.stall_every > 0 && count.is_multiple_of(self.stall_every) {
            tracing::warn!(
                request = count,
                "stalling before the first token (--stall-first-token-every)"
            );
            return Ok(Box::pin(futures::stream::once(async move {
                controller.stopped().await;
                Err(RequestError::new(
                    ErrorKind::Cancelled,
                    "the request was stopped before its first token",
                ))
            })));
        }
        let outputs = self
            .engine
            .submit(EngineRequest {
                prompt_tokens,
                max_tokens,
            })
            .map_err(|e| match e {
                SubmitError::Stopped => RequestError::new(ErrorKind::ShuttingDown, e.to_string()),
                other => RequestError::new(ErrorKind::Invalid, other.to_string()),
            })?;
        let generation = Generation {
            outputs: Some(outputs),
            stop: StopMatcher::new(request.stop()),
            generated: 0,
            prompt_len,
            controller,
        };
        Ok(Box::pin(futures::stream::unfold(generation, Generation::next)))
    }
}

/// One request's progress through the engine, as the state of its response stream.
struct Generation {
    /// The engine's token stream; `None` once the answer is complete.
    /// Dropping it cancels the request in the engine.
    outputs: Option<EngineStream>,
    stop: StopMatcher,
    generated: u32,
    prompt_len: u32,
    controller: Controller,
}

impl Generation {
    async fn next(mut self) -> Option<(Result<LlmOutput, RequestError>, Self)> {
        loop {
            let outputs = self.outputs.as_mut()?;
            let next = tokio::select! {
                // A stop from the caller ends the answer where it is.
                _ = self.controller.stopped() => None,
                next = outputs.next() => next,
            };
            let Some(output) = next else {
                self.outputs = None;
                let error = RequestError::new(ErrorKind::Cancelled, "the request was stopped before it finished");
                return Some((Err(error), self));
            };
            let (text, tokens, finish) = match output {
                EngineOutput::Token(id) => {
                    let piece = text::detokenize(id);
                    self.generated += 1;
                    match self.stop.push(&piece) {
                        StopStep::Continue(text) if text.is_empty() => continue,
                        StopStep::Continue(text) => (text, 1, None),
                        StopStep::Stopped(text) => (text, 1, Some(FinishReason::Stop)),
                    }
                }
                EngineOutput::Finished(_) => (self.stop.finish(), 0, Some(FinishReason::Length)),
            };
            let mut piece = LlmOutput {
                text,
                tokens,
                finish_reason: finish,
                ..LlmOutput::default()
            };
            if finish.is_some() {
                piece.usage = Some(Usage::new(self.prompt_len, self.generated));
                self.outputs = None;
            }
            return Some((Ok(piece), self));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_mocker::config::MockerConfig;
    use tokio_util::sync::CancellationToken;

    fn chat(model: &str) -> LlmRequest {
        LlmRequest::Chat(
            serde_json::from_value(serde_json::json!({
                "model": model, "max_tokens": 3,
                "messages": [{"role": "user", "content": "hello"}],
            }))
            .unwrap(),
        )
    }

    #[tokio::test]
    async fn a_stalling_engine_holds_every_nth_request_without_a_token_until_it_is_stopped() {
        let config = MockerConfig {
            speedup_ratio: 0.0,
            ..MockerConfig::default()
        };
        let engine = MockerEngine::start(config, CancellationToken::new()).unwrap();
        let llm = MockerLlm::new(engine, "m", 4096).stalling_first_token_every(2);

        let answered: Vec<_> = llm.generate(Context::new(chat("m"))).await.unwrap().collect().await;
        assert_eq!(
            answered.len(),
            4,
            "the first request is answered (three tokens and the end): {answered:?}"
        );

        let controller = Controller::new();
        let mut stalled = llm
            .generate(Context::with_controller(chat("m"), controller.clone()))
            .await
            .unwrap();
        let nothing = tokio::time::timeout(std::time::Duration::from_millis(300), stalled.next()).await;
        assert!(nothing.is_err(), "the second request got a piece: {nothing:?}");
        controller.stop();
        let end = stalled.next().await.expect("the stream ends once stopped");
        assert_eq!(end.unwrap_err().kind(), ErrorKind::Cancelled);

        let third: Vec<_> = llm.generate(Context::new(chat("m"))).await.unwrap().collect().await;
        assert_eq!(third.len(), 4, "the third request is answered again");
    }
}
