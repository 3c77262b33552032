//! OpenAI's chat-completions and completions wire types, as the frontend
//! reads them from clients and writes them back.
//!
//! Requests keep every field they do not know in `extra`, so a worker that
//! forwards to a real engine (vLLM) passes them through untouched. Parsing
//! goes through [`parse_request`], whose errors name the offending field
//! (`messages[0].role: unknown variant ...`) for a 400 the client can act on.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Unknown fields of a request, kept as they came.
pub type Extra = Map<String, Value>;

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatCompletionRequest {
    pub model: String,
    pub messages: Vec<ChatMessage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// The newer name of `max_tokens`; wins when both are given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_completion_tokens: Option<u32>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<Stop>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    #[serde(flatten)]
    pub extra: Extra,
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: Prompt,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<Stop>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    #[serde(flatten)]
    pub extra: Extra,
}

/// `Deserialize` for a type with typed fields plus an `extra` map of every
/// other field, visiting the object once. (serde's `flatten` would first
/// buffer the whole object in an intermediate form many times its size: a
/// 32 MiB body of numbers took over 500 MiB.) `required` fields must be
/// present; `optional` ones take their `Default` when absent.
macro_rules! deserialize_with_extra {
    ($ty:ident { required: [$($required:ident),*], optional: [$($optional:ident),*] }) => {
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                struct Fields;
                impl<'de> serde::de::Visitor<'de> for Fields {
                    type Value = $ty;

                    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                        f.write_str("a JSON object")
                    }

                    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<$ty, A::Error> {
                        use serde::de::Error;
                        $(let mut $required = None;)*
                        $(let mut $optional = None;)*
                        let mut extra = Extra::new();
                        while let Some(key) = map.next_key::<String>()? {
                            match key.as_str() {
                                $(stringify!($required) => {
                                    if $required.is_some() {
                                        return Err(A::Error::duplicate_field(stringify!($required)));
                                    }
                                    $required = Some(map.next_value()?);
                                })*
                                $(stringify!($optional) => {
                                    if $optional.is_some() {
                                        return Err(A::Error::duplicate_field(stringify!($optional)));
                                    }
                                    $optional = Some(map.next_value()?);
                                })*
                                _ => {
                                    let value = map.next_value()?;
                                    if extra.insert(key.clone(), value).is_some() {
                                        return Err(A::Error::custom(format_args!("duplicate field `{key}`")));
                                    }
                                }
                            }
                        }
                        Ok($ty {
                            $($required: $required.ok_or_else(|| A::Error::missing_field(stringify!($required)))?,)*
                            $($optional: $optional.unwrap_or_default(),)*
                            extra,
                        })
                    }
                }
                deserializer.deserialize_map(Fields)
            }
        }
    };
}

deserialize_with_extra!(ChatCompletionRequest {
    required: [model, messages],
    optional: [
        max_tokens,
        max_completion_tokens,
        stream,
        stream_options,
        stop,
        temperature,
        top_p,
        n,
        seed
    ]
});

deserialize_with_extra!(CompletionRequest {
    required: [model, prompt],
    optional: [max_tokens, stream, stream_options, stop, temperature, top_p, n, seed]
});

deserialize_with_extra!(ChatMessage {
    required: [role],
    optional: [content]
});

/// One message of a chat.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatMessage {
    pub role: Role,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<MessageContent>,
    /// `name`, `tool_calls`, `tool_call_id`, …: kept, not interpreted.
    #[serde(flatten)]
    pub extra: Extra,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    Developer,
    User,
    Assistant,
    Tool,
}

impl Role {
    /// The name OpenAI gives the role (`"user"`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::Developer => "developer",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }
}

/// A message's content: a string, or a list of typed parts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

/// One part of a multi-part message (`{"type":"text","text":"…"}`, images, …).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(flatten)]
    pub extra: Extra,
}

impl MessageContent {
    /// The text of the message; non-text parts are skipped.
    pub fn text(&self) -> String {
        match self {
            MessageContent::Text(text) => text.clone(),
            MessageContent::Parts(parts) => parts
                .iter()
                .filter_map(|part| part.text.as_deref())
                .collect::<Vec<_>>()
                .join(""),
        }
    }
}

/// A completions prompt: one string or a batch of one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Batch(Vec<String>),
    /// Token ids, as vLLM and SGLang take them. What a migrated request
    /// carries when its engine accepts ids (`crate::migration`); the
    /// mocker reads it as an empty prompt.
    Tokens(Vec<u32>),
}

/// `stop`: one sequence or up to four.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    pub fn sequences(&self) -> Vec<String> {
        match self {
            Stop::One(one) => vec![one.clone()],
            Stop::Many(many) => many.clone(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Token counts of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
}

impl Usage {
    pub fn new(prompt_tokens: u32, completion_tokens: u32) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }
    }
}

/// A non-streaming chat answer (`object: "chat.completion"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletionResponse {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatChoice {
    pub index: u32,
    pub message: AssistantMessage,
    pub finish_reason: Option<String>,
    pub logprobs: Option<Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AssistantMessage {
    pub role: Role,
    pub content: String,
}

/// One streamed chat chunk (`object: "chat.completion.chunk"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletionChunk {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChunkChoice>,
    /// Only on the last chunk, when `stream_options.include_usage` asked for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatChunkChoice {
    pub index: u32,
    pub delta: ChatDelta,
    pub finish_reason: Option<String>,
    pub logprobs: Option<Value>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ChatDelta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// A completions answer, whole or one streamed chunk (`object: "text_completion"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompletionResponse {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompletionChoice {
    pub index: u32,
    pub text: String,
    pub finish_reason: Option<String>,
    pub logprobs: Option<Value>,
}

/// `GET /v1/models`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelList {
    pub object: String,
    pub data: Vec<ModelObject>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelObject {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub owned_by: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_window: Option<u32>,
    /// vLLM's name for the same number, so tools written for vLLM read it too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_model_len: Option<u32>,
}

/// OpenAI's error body: `{"error":{"message","type","param","code"}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorResponse {
    pub error: ErrorBody,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub param: Option<String>,
    pub code: Option<String>,
}

/// A request the frontend cannot accept, with the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct InvalidRequest {
    /// The JSON path of the field at fault (`messages[0].role`), when there is one.
    pub field: Option<String>,
    pub message: String,
}

impl InvalidRequest {
    fn field(field: &str, message: impl Into<String>) -> Self {
        Self {
            field: Some(field.to_string()),
            message: format!("{field}: {}", message.into()),
        }
    }
}

/// Parses a request body: JSON syntax first, then the typed fields (an error
/// names the field by its path), then [`Validate`]'s range checks.
pub fn parse_request<T: DeserializeOwned + Validate>(body: &[u8]) -> Result<T, InvalidRequest> {
    // Straight into `T`: no `Value` of the whole body on the way, which for
    // a body of numbers would take many times the body's size.
    let mut reader = serde_json::Deserializer::from_slice(body);
    let request: T = serde_path_to_error::deserialize(&mut reader).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            InvalidRequest {
                field: None,
                message: format!("the request body is not valid JSON: {inner}"),
            }
        } else if path == "." {
            let inner = inner.to_string();
            if inner.starts_with("invalid type") {
                InvalidRequest {
                    field: None,
                    message: format!("the request body must be a JSON object: {inner}"),
                }
            } else {
                // A missing field: serde names it in the message itself.
                InvalidRequest {
                    field: inner.split('`').nth(1).map(str::to_string),
                    message: inner,
                }
            }
        } else {
            InvalidRequest::field(&path, inner.to_string())
        }
    })?;
    reader.end().map_err(|e| InvalidRequest {
        field: None,
        message: format!("the request body is not valid JSON: {e}"),
    })?;
    request.validate()?;
    Ok(request)
}

/// Range and consistency checks serde cannot express.
pub trait Validate {
    fn validate(&self) -> Result<(), InvalidRequest>;
}

/// Checks shared by both request kinds.
fn validate_common(
    max_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    n: Option<u32>,
    stop: Option<&Stop>,
) -> Result<(), InvalidRequest> {
    if max_tokens == Some(0) {
        return Err(InvalidRequest::field("max_tokens", "must be at least 1 (got 0)"));
    }
    if let Some(t) = temperature.filter(|t| !(0.0..=2.0).contains(t)) {
        return Err(InvalidRequest::field(
            "temperature",
            format!("must be between 0 and 2 (got {t})"),
        ));
    }
    if let Some(p) = top_p.filter(|p| !(0.0..=1.0).contains(p)) {
        return Err(InvalidRequest::field(
            "top_p",
            format!("must be between 0 and 1 (got {p})"),
        ));
    }
    if let Some(n) = n.filter(|&n| n != 1) {
        return Err(InvalidRequest::field(
            "n",
            format!("only 1 choice per request is supported (got {n})"),
        ));
    }
    if let Some(stop) = stop {
        let sequences = stop.sequences();
        if sequences.len() > 4 {
            return Err(InvalidRequest::field(
                "stop",
                format!("at most 4 sequences are allowed (got {})", sequences.len()),
            ));
        }
        if sequences.iter().any(String::is_empty) {
            return Err(InvalidRequest::field("stop", "sequences must not be empty"));
        }
    }
    Ok(())
}

impl Validate for ChatCompletionRequest {
    fn validate(&self) -> Result<(), InvalidRequest> {
        if self.model.is_empty() {
            return Err(InvalidRequest::field("model", "must not be empty"));
        }
        if self.messages.is_empty() {
            return Err(InvalidRequest::field("messages", "must hold at least one message"));
        }
        if self.max_completion_tokens == Some(0) {
            return Err(InvalidRequest::field(
                "max_completion_tokens",
                "must be at least 1 (got 0)",
            ));
        }
        validate_common(
            self.max_tokens,
            self.temperature,
            self.top_p,
            self.n,
            self.stop.as_ref(),
        )
    }
}

impl Validate for CompletionRequest {
    fn validate(&self) -> Result<(), InvalidRequest> {
        if self.model.is_empty() {
            return Err(InvalidRequest::field("model", "must not be empty"));
        }
        if let Prompt::Batch(batch) = &self.prompt
            && batch.len() != 1
        {
            return Err(InvalidRequest::field(
                "prompt",
                format!("a batch must hold exactly one prompt (got {})", batch.len()),
            ));
        }
        validate_common(
            self.max_tokens,
            self.temperature,
            self.top_p,
            self.n,
            self.stop.as_ref(),
        )
    }
}

impl ChatCompletionRequest {
    /// The output limit the client asked for, under either name.
    pub fn output_limit(&self) -> Option<u32> {
        self.max_completion_tokens.or(self.max_tokens)
    }

    pub fn include_usage(&self) -> bool {
        self.stream_options.is_some_and(|o| o.include_usage)
    }
}

impl CompletionRequest {
    /// The prompt text (a batch holds exactly one, checked by validation);
    /// empty for a prompt of token ids.
    pub fn prompt_text(&self) -> &str {
        match &self.prompt {
            Prompt::Text(text) => text,
            Prompt::Batch(batch) => batch.first().map_or("", String::as_str),
            Prompt::Tokens(_) => "",
        }
    }

    pub fn include_usage(&self) -> bool {
        self.stream_options.is_some_and(|o| o.include_usage)
    }
}

#[cfg(test)]
mod tests;
