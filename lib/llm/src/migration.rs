//! Request migration: when a worker dies or leaves in the middle of an
//! answer, the frontend sends the request again to another worker, asking
//! it to continue from what was already generated. This module builds that
//! continued request; it does no I/O.
//!
//! - Completions: the prompt becomes prompt + generated text.
//! - Chat: the generated text becomes a final, partial assistant message,
//!   with vLLM's `continue_final_message: true` and
//!   `add_generation_prompt: false`, so the model continues that message
//!   instead of starting a new turn.
//!
//! Either way `max_tokens` shrinks by the tokens already generated, so the
//! client gets no more than it asked for in total.

use crate::openai::{ChatMessage, MessageContent, Prompt, Role};
use crate::protocol::LlmRequest;
use serde_json::Value;

/// `request`, to be continued after `generated` (`tokens` tokens) was sent.
/// `None` when nothing is left to generate.
pub fn continue_request(request: &LlmRequest, generated: &str, tokens: u32) -> Option<LlmRequest> {
    let remaining = |limit: Option<u32>| match limit {
        Some(limit) if tokens >= limit => None,
        Some(limit) => Some(Some(limit - tokens)),
        None => Some(None),
    };
    match request {
        LlmRequest::Completion(completion) => {
            let mut next = completion.clone();
            next.max_tokens = remaining(completion.max_tokens)?;
            next.prompt = Prompt::Text(format!("{}{generated}", completion.prompt_text()));
            Some(LlmRequest::Completion(next))
        }
        LlmRequest::Chat(chat) => {
            let mut next = chat.clone();
            let left = remaining(chat.output_limit())?;
            next.max_completion_tokens = None;
            next.max_tokens = left;
            if generated.is_empty() {
                return Some(LlmRequest::Chat(next));
            }
            // A second migration extends the partial message the first one added.
            let continuing = chat.extra.get("continue_final_message") == Some(&Value::Bool(true));
            match next.messages.last_mut() {
                Some(last) if continuing && last.role == Role::Assistant => {
                    let before = last.content.as_ref().map(MessageContent::text).unwrap_or_default();
                    last.content = Some(MessageContent::Text(format!("{before}{generated}")));
                }
                _ => next.messages.push(ChatMessage {
                    role: Role::Assistant,
                    content: Some(MessageContent::Text(generated.to_string())),
                    extra: Default::default(),
                }),
            }
            next.extra.insert("continue_final_message".into(), Value::Bool(true));
            next.extra.insert("add_generation_prompt".into(), Value::Bool(false));
            Some(LlmRequest::Chat(next))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai::{ChatCompletionRequest, CompletionRequest, parse_request};

    fn chat(body: &str) -> LlmRequest {
        LlmRequest::Chat(parse_request::<ChatCompletionRequest>(body.as_bytes()).unwrap())
    }

    #[test]
    fn a_completion_continues_from_prompt_plus_generated_text() {
        let request = LlmRequest::Completion(
            parse_request::<CompletionRequest>(br#"{"model":"m","prompt":"Once","max_tokens":10,"top_k":2}"#).unwrap(),
        );
        let Some(LlmRequest::Completion(next)) = continue_request(&request, " upon a", 2) else {
            panic!("a completion")
        };
        assert_eq!(next.prompt_text(), "Once upon a");
        assert_eq!(next.max_tokens, Some(8));
        assert_eq!(next.extra["top_k"], 2, "pass-through fields survive");
    }

    #[test]
    fn a_chat_continues_its_partial_assistant_message() {
        let request = chat(r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_completion_tokens":5}"#);
        let Some(LlmRequest::Chat(once)) = continue_request(&request, " Hello", 1) else {
            panic!("a chat")
        };
        assert_eq!(once.messages.len(), 2);
        assert_eq!(once.messages[1].role, Role::Assistant);
        assert_eq!(once.output_limit(), Some(4));
        assert_eq!(once.extra["continue_final_message"], true);
        assert_eq!(once.extra["add_generation_prompt"], false);

        let Some(LlmRequest::Chat(twice)) = continue_request(&LlmRequest::Chat(once), " there", 1) else {
            panic!("a chat")
        };
        assert_eq!(twice.messages.len(), 2, "the same partial message grows");
        assert_eq!(twice.messages[1].content.as_ref().unwrap().text(), " Hello there");
        assert_eq!(twice.output_limit(), Some(3));
    }

    #[test]
    fn nothing_is_left_when_the_limit_was_reached() {
        let request = chat(r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":3}"#);
        assert!(continue_request(&request, " a b c", 3).is_none());
        let unlimited = chat(r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#);
        let Some(LlmRequest::Chat(next)) = continue_request(&unlimited, " a", 1) else {
            panic!("a chat")
        };
        assert_eq!(next.output_limit(), None);
    }
}
