//! What travels between the frontend and a worker on the request plane.
//!
//! The frontend sends the client's OpenAI request as it was parsed (unknown
//! fields included), so a worker in front of a real engine can forward it;
//! the worker answers with a stream of [`LlmOutput`] pieces, and the
//! frontend turns them into OpenAI responses or SSE chunks. Keeping the
//! OpenAI framing (ids, `created`, chunk shapes) on the frontend means a
//! worker never has to know whether the client streams.

use crate::openai::{ChatCompletionRequest, CompletionRequest, Role, Usage};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One generation request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LlmRequest {
    Chat(ChatCompletionRequest),
    Completion(CompletionRequest),
}

impl LlmRequest {
    pub fn model(&self) -> &str {
        match self {
            LlmRequest::Chat(chat) => &chat.model,
            LlmRequest::Completion(completion) => &completion.model,
        }
    }

    /// `max_tokens` (or `max_completion_tokens`), when the client gave one.
    pub fn max_tokens(&self) -> Option<u32> {
        match self {
            LlmRequest::Chat(chat) => chat.output_limit(),
            LlmRequest::Completion(completion) => completion.max_tokens,
        }
    }

    /// The prompt as one plain text: a completion's prompt, or a chat
    /// rendered by the mocker's template, so two chats sharing their first
    /// messages share a prefix. What the mocker reads, and what a router
    /// hashes for a worker whose tokenizer is the mocker's.
    ///
    /// The template writes each message on its own line as `role: content`
    /// and ends with the generation prompt `assistant:`, like a real chat
    /// template with `add_generation_prompt`. With vLLM's
    /// `continue_final_message: true` a final assistant message is left
    /// open instead, so an answer continued on another engine reads exactly
    /// as the prompt plus the text generated so far.
    pub fn flat_prompt(&self) -> String {
        match self {
            LlmRequest::Completion(completion) => completion.prompt_text().to_string(),
            LlmRequest::Chat(chat) => {
                let flag = |name: &str, default: bool| chat.extra.get(name).and_then(Value::as_bool).unwrap_or(default);
                let continues = flag("continue_final_message", false)
                    && chat
                        .messages
                        .last()
                        .is_some_and(|message| message.role == Role::Assistant);
                let mut text = String::new();
                for (i, message) in chat.messages.iter().enumerate() {
                    let content = message.content.as_ref().map(|c| c.text()).unwrap_or_default();
                    text.push_str(message.role.as_str());
                    text.push_str(": ");
                    text.push_str(&content);
                    if !(continues && i + 1 == chat.messages.len()) {
                        text.push('\n');
                    }
                }
                if !continues && flag("add_generation_prompt", true) {
                    text.push_str("assistant:");
                }
                text
            }
        }
    }

    /// The stop sequences the client gave.
    pub fn stop(&self) -> Vec<String> {
        let stop = match self {
            LlmRequest::Chat(chat) => chat.stop.as_ref(),
            LlmRequest::Completion(completion) => completion.stop.as_ref(),
        };
        stop.map(|s| s.sequences()).unwrap_or_default()
    }
}

/// One piece of generated output. The last piece carries `finish_reason`
/// and `usage`; a piece may carry text and the finish at once.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct LlmOutput {
    /// New text since the previous piece (may be empty).
    pub text: String,
    /// Tokens this piece's text stands for.
    pub tokens: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_reason: Option<FinishReason>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// The ids of this piece's tokens, when the engine reports them (vLLM's
    /// `return_token_ids`): what lets a migrated answer continue from the
    /// very same tokens (`crate::migration`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub token_ids: Vec<u32>,
    /// The prompt's token ids as the engine saw them (chat template
    /// applied), on the first piece, when the engine reports them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prompt_token_ids: Vec<u32>,
}

/// Why generation ended, in OpenAI's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// A stop sequence or the end of the answer.
    Stop,
    /// `max_tokens` or the context length was reached.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}
