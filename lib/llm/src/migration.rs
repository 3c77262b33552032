//! Request migration: when a worker dies or leaves in the middle of an
//! answer, the frontend sends the request again to another worker, asking
//! it to continue from what was already generated. This module builds that
//! continued request; it does no I/O.
//!
//! The rule is **never a spliced answer**: the next engine must carry on
//! the very answer the client has been reading, or the client gets a clear
//! error. How depends on what every worker of the model can do
//! ([`Continuation`], from the engine facts in the model cards):
//!
//! - [`Continuation::TokenIds`]: the prompt's and the generated tokens' ids
//!   become a `/v1/completions` prompt of ids (a chat goes as a completion
//!   over its templated prompt's ids), so the engine resumes the same token
//!   sequence. Text would be re-tokenized, and a different token boundary
//!   sends even greedy decoding elsewhere.
//! - [`Continuation::AssistantMessage`] (chat): the generated text becomes a
//!   final, partial assistant message, with vLLM's
//!   `continue_final_message: true` and `add_generation_prompt: false`.
//! - [`Continuation::Text`]: Switchyard's own engines (the mocker) take
//!   prompt + generated text.
//!
//! Before the first token nothing was sent, so any request restarts from
//! scratch. After it, requests with structured output or tools (whose
//! grammar or parser state cannot be carried over) and requests whose
//! engines have no way to continue end with [`CannotContinue`].
//!
//! Limits shrink by the tokens already generated: `max_tokens` (or
//! `max_completion_tokens`) and `min_tokens`, so the client gets what it
//! asked for in total; `echo` is turned off, as the prompt was echoed once.

use crate::model_card::{ModelCard, ModelKind};
use crate::openai::{ChatCompletionRequest, ChatMessage, CompletionRequest, Extra, MessageContent, Prompt, Role};
use crate::protocol::{LlmOutput, LlmRequest};
use serde_json::Value;

/// How a worker's engine can pick up an answer another worker began, best
/// first (the order is the preference).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Continuation {
    /// The prompt's and the generated tokens' ids as a completion prompt.
    TokenIds,
    /// Chat: the generated text as a final assistant message to continue.
    AssistantMessage,
    /// Prompt + generated text, for Switchyard's own engines.
    Text,
}

impl Continuation {
    /// The ways every one of `cards` offers for a request of `kind`, best
    /// first. Empty when they share none: mid-answer migration is off.
    pub fn common<'a>(cards: impl IntoIterator<Item = &'a ModelCard>, kind: ModelKind) -> Vec<Continuation> {
        let mut common: Option<Vec<Continuation>> = None;
        for card in cards {
            let offered = Self::offered(card, kind);
            common = Some(match common {
                None => offered,
                Some(so_far) => so_far.into_iter().filter(|way| offered.contains(way)).collect(),
            });
        }
        let mut common = common.unwrap_or_default();
        common.sort();
        common
    }

    /// The ways one worker offers.
    fn offered(card: &ModelCard, kind: ModelKind) -> Vec<Continuation> {
        let Some(engine) = &card.engine else {
            return vec![Continuation::Text];
        };
        let mut ways = Vec::new();
        if engine.token_ids {
            ways.push(Continuation::TokenIds);
        }
        if engine.continues_message && kind == ModelKind::Chat {
            ways.push(Continuation::AssistantMessage);
        }
        ways
    }
}

/// What a request has produced so far, over all the workers it went to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Progress {
    pub text: String,
    /// Tokens generated (counted by the engines, not by chunks).
    pub tokens: u32,
    /// Their ids, when every piece carried them.
    pub token_ids: Vec<u32>,
    /// The original prompt's ids as the first engine saw them.
    pub prompt_token_ids: Vec<u32>,
}

impl Progress {
    /// Adds one piece of the answer. `first_engine` says whether it comes
    /// from an engine given the original prompt (whose prompt ids are kept).
    pub fn record(&mut self, piece: &LlmOutput, first_engine: bool) {
        self.text.push_str(&piece.text);
        self.tokens += piece.tokens;
        self.token_ids.extend_from_slice(&piece.token_ids);
        if first_engine && self.prompt_token_ids.is_empty() && !piece.prompt_token_ids.is_empty() {
            self.prompt_token_ids = piece.prompt_token_ids.clone();
        }
    }

    /// Nothing reached the client yet: the request can simply start over.
    pub fn is_empty(&self) -> bool {
        self.tokens == 0 && self.text.is_empty()
    }

    /// The ids of every generated token are known (not just some of them).
    fn ids_complete(&self) -> bool {
        !self.prompt_token_ids.is_empty() && self.token_ids.len() == self.tokens as usize
    }
}

/// Why an answer cannot continue on another worker; the client gets this
/// (after the part it already has) instead of a spliced answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CannotContinue {
    #[error("the request uses {field:?}, whose grammar or parser state cannot be carried to another engine mid-answer")]
    Structured { field: String },
    #[error(
        "the engine behind this model can neither take token ids nor continue an assistant message, so another engine would start a new answer instead of continuing this one"
    )]
    NoWay,
    #[error(
        "the engine did not report the ids of the tokens it generated, and this model's engines continue a {kind} only from token ids"
    )]
    NoTokenIds { kind: &'static str },
}

/// Fields of OpenAI, vLLM, SGLang and llama.cpp that constrain the output
/// with a grammar or a tool-call parser.
const STRUCTURED_FIELDS: &[&str] = &[
    "response_format",
    "tools",
    "functions",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "structured_outputs",
    "grammar",
    "json_schema",
    "regex",
    "ebnf",
];

/// Sampling fields (vLLM's extras) a chat keeps when it continues as a
/// completion; chat-only fields (templates, tools, logprobs shapes) go.
const SAMPLING_FIELDS: &[&str] = &[
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "min_tokens",
    "ignore_eos",
    "stop_token_ids",
    "include_stop_str_in_output",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "logit_bias",
    "user",
];

/// The first field of `request` that asks for structured output or tools.
pub fn structured_field(request: &LlmRequest) -> Option<&'static str> {
    let extra = match request {
        LlmRequest::Chat(chat) => &chat.extra,
        LlmRequest::Completion(completion) => &completion.extra,
    };
    STRUCTURED_FIELDS.iter().copied().find(|field| match extra.get(*field) {
        None | Some(Value::Null) => false,
        // Plain text is no constraint.
        Some(format) if *field == "response_format" => format["type"] != "text",
        Some(Value::Array(items)) => !items.is_empty(),
        Some(_) => true,
    })
}

/// `original`, to be continued after `done`, in the first of `ways` that
/// fits. `Ok(None)` when nothing is left to generate.
pub fn continue_request(
    original: &LlmRequest,
    done: &Progress,
    ways: &[Continuation],
) -> Result<Option<LlmRequest>, CannotContinue> {
    if done.is_empty() {
        return Ok(Some(original.clone()));
    }
    let left = match original.max_tokens() {
        Some(limit) if done.tokens >= limit => return Ok(None),
        Some(limit) => Some(limit - done.tokens),
        None => None,
    };
    if let Some(field) = structured_field(original) {
        return Err(CannotContinue::Structured { field: field.into() });
    }
    for way in ways {
        let next = match (way, original) {
            (Continuation::TokenIds, _) if done.ids_complete() => by_token_ids(original, done, left),
            (Continuation::AssistantMessage | Continuation::Text, LlmRequest::Chat(chat)) => {
                by_assistant_message(chat, done, left)
            }
            (Continuation::Text, LlmRequest::Completion(completion)) => {
                let mut next = completion.clone();
                next.prompt = Prompt::Text(format!("{}{}", completion.prompt_text(), done.text));
                next.max_tokens = left;
                after(&mut next.extra, done);
                LlmRequest::Completion(next)
            }
            _ => continue,
        };
        return Ok(Some(next));
    }
    Err(match (ways.first(), original) {
        (Some(Continuation::TokenIds), LlmRequest::Completion(_)) => CannotContinue::NoTokenIds { kind: "completion" },
        (Some(Continuation::TokenIds), LlmRequest::Chat(_)) => CannotContinue::NoTokenIds { kind: "chat" },
        _ => CannotContinue::NoWay,
    })
}

/// Chat fields the frontend's template rendering has already applied, so a
/// chat sent as its token ids loses nothing by dropping them.
const TEMPLATE_FIELDS: &[&str] = &[
    "add_generation_prompt",
    "continue_final_message",
    "chat_template_kwargs",
];

/// `request` with its prompt given as `ids`, the prompt's tokens as the
/// engine would make them ("tokens in"): a completion keeps every field; a
/// chat becomes a completion over its rendered ids. `None` for a chat that
/// carries something a completion cannot (tools, a structured output, log
/// probabilities, any field not known to be plain sampling), which must go
/// as a chat.
pub fn with_prompt_tokens(request: &LlmRequest, ids: Vec<u32>) -> Option<LlmRequest> {
    if let LlmRequest::Chat(chat) = request {
        let carries_more = chat
            .extra
            .keys()
            .any(|key| !SAMPLING_FIELDS.contains(&key.as_str()) && !TEMPLATE_FIELDS.contains(&key.as_str()));
        if carries_more || structured_field(request).is_some() {
            return None;
        }
    }
    let mut next = as_completion(request);
    next.prompt = Prompt::Tokens(ids);
    Some(LlmRequest::Completion(next))
}

/// A completion whose prompt is the original prompt's ids and the generated ids.
fn by_token_ids(original: &LlmRequest, done: &Progress, left: Option<u32>) -> LlmRequest {
    let ids: Vec<u32> = done.prompt_token_ids.iter().chain(&done.token_ids).copied().collect();
    let mut next = as_completion(original);
    next.prompt = Prompt::Tokens(ids);
    next.max_tokens = left;
    after(&mut next.extra, done);
    LlmRequest::Completion(next)
}

/// `request` as a completion (a chat keeps its output limit and sampling
/// fields); the caller sets the prompt.
fn as_completion(request: &LlmRequest) -> CompletionRequest {
    match request {
        LlmRequest::Completion(completion) => completion.clone(),
        LlmRequest::Chat(chat) => CompletionRequest {
            model: chat.model.clone(),
            prompt: Prompt::Tokens(Vec::new()),
            max_tokens: request.max_tokens(),
            stream: chat.stream,
            stream_options: chat.stream_options,
            stop: chat.stop.clone(),
            temperature: chat.temperature,
            top_p: chat.top_p,
            n: chat.n,
            seed: chat.seed,
            extra: SAMPLING_FIELDS
                .iter()
                .filter_map(|field| Some((field.to_string(), chat.extra.get(*field)?.clone())))
                .collect(),
        },
    }
}

/// The chat with the generated text as a final assistant message to continue.
fn by_assistant_message(chat: &ChatCompletionRequest, done: &Progress, left: Option<u32>) -> LlmRequest {
    let mut next = chat.clone();
    next.max_completion_tokens = None;
    next.max_tokens = left;
    next.messages.push(ChatMessage {
        role: Role::Assistant,
        content: Some(MessageContent::Text(done.text.clone())),
        extra: Default::default(),
    });
    next.extra.insert("continue_final_message".into(), Value::Bool(true));
    next.extra.insert("add_generation_prompt".into(), Value::Bool(false));
    after(&mut next.extra, done);
    LlmRequest::Chat(next)
}

/// What changes in pass-through fields once `done` was sent: `min_tokens`
/// shrinks like `max_tokens`, and the prompt is not echoed a second time.
fn after(extra: &mut Extra, done: &Progress) {
    if let Some(min) = extra.get("min_tokens").and_then(Value::as_u64) {
        extra.insert("min_tokens".into(), min.saturating_sub(u64::from(done.tokens)).into());
    }
    if extra.contains_key("echo") {
        extra.insert("echo".into(), Value::Bool(false));
    }
}

#[cfg(test)]
mod tests;
