//! The mocker engine behind the LLM wire types: turns an OpenAI request into
//! prompt tokens, runs it through the simulated vLLM, and streams readable
//! text back, honouring `max_tokens` and `stop`.

use crate::stop::{StopMatcher, StopStep};
use futures::StreamExt;
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
}

impl MockerLlm {
    pub fn new(engine: MockerEngine, model: impl Into<String>, context_length: u32) -> Self {
        Self {
            engine,
            model: model.into(),
            context_length,
        }
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
