//! A model's tokenizer and chat template, loaded from a local Hugging Face
//! model directory, giving a request's prompt token ids as the engine (vLLM)
//! will see them, for the KV-aware router.
//!
//! It reads only the directory it is given: nothing is downloaded, and a
//! template is compiled once, at load, so a broken one fails the load and
//! not every request. It must not guess: a chat request for a model without
//! a chat template is an error, not a plain concatenation of messages.
//!
//! What is read and which template features work: `docs/tokenizer.md`.

mod template;

use crate::openai::{ChatCompletionRequest, ChatMessage, MessageContent, Prompt};
use crate::protocol::LlmRequest;
use serde::Deserialize;
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};
use template::ChatTemplate;

/// The tokenizer itself: vocabulary, normalizer, pre-tokenizer, post-processor.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// `chat_template`, `bos_token`, `eos_token`.
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";
/// Where newer `transformers` save the chat template; wins over the config's.
pub const CHAT_TEMPLATE_FILE: &str = "chat_template.jinja";

/// Why a model directory could not be loaded, or a prompt not tokenized.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not a valid tokenizer", path.display())]
    InvalidTokenizer {
        path: PathBuf,
        #[source]
        source: tokenizers::Error,
    },
    #[error("{} is not a valid tokenizer config", path.display())]
    InvalidConfig {
        path: PathBuf,
        #[source]
        source: serde_path_to_error::Error<serde_json::Error>,
    },
    #[error("{} lists named chat templates but none is named \"default\"", path.display())]
    NoDefaultTemplate { path: PathBuf },
    #[error("the chat template {name:?} in {} does not compile", path.display())]
    TemplateSyntax {
        path: PathBuf,
        name: String,
        #[source]
        source: minijinja::Error,
    },
    #[error("{} has no chat_template (and there is no {CHAT_TEMPLATE_FILE}), so chat requests cannot be rendered", path.display())]
    NoChatTemplate { path: PathBuf },
    /// The template called `raise_exception`: it refuses this conversation
    /// (roles that do not alternate, an unsupported role, …). A client error.
    #[error("the chat template refused the request: {message}")]
    TemplateRaised { message: String },
    #[error("rendering the chat template failed")]
    Render {
        #[source]
        source: minijinja::Error,
    },
    /// The request asks for something the template cannot give it.
    #[error("{0}")]
    InvalidRequest(InvalidChatRequest),
    #[error("cannot encode the prompt")]
    Encode {
        #[source]
        source: tokenizers::Error,
    },
}

/// A chat request that cannot be rendered whatever the template.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidChatRequest {
    #[error("continue_final_message and add_generation_prompt cannot both be true")]
    ContinueAndGenerationPrompt,
    #[error("continue_final_message is set but the final message has no text to continue")]
    NothingToContinue,
    #[error("continue_final_message is set but the final message does not appear in the rendered chat")]
    FinalMessageNotRendered,
}

/// A model's tokenizer, with its chat template when it has one.
#[derive(Debug)]
pub struct HfTokenizer {
    tokenizer: tokenizers::Tokenizer,
    /// `None` for a base model: it serves completions only.
    template: Option<ChatTemplate>,
    /// Named in the error a chat request gets when there is no template.
    config_path: PathBuf,
}

/// The parts of `tokenizer_config.json` we use; the rest is ignored.
#[derive(Debug, Deserialize)]
struct TokenizerConfig {
    #[serde(default)]
    chat_template: Option<TemplateSource>,
    #[serde(default)]
    bos_token: Option<SpecialToken>,
    #[serde(default)]
    eos_token: Option<SpecialToken>,
}

/// `"chat_template": "..."` or a list of `{"name", "template"}`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum TemplateSource {
    One(String),
    Named(Vec<NamedTemplate>),
}

#[derive(Debug, Deserialize)]
struct NamedTemplate {
    name: String,
    template: String,
}

/// `"bos_token": "<s>"` or the serialized `AddedToken` `{"content": "<s>", …}`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum SpecialToken {
    Text(String),
    Added { content: String },
}

impl SpecialToken {
    fn into_content(self) -> String {
        match self {
            SpecialToken::Text(content) | SpecialToken::Added { content } => content,
        }
    }
}

impl HfTokenizer {
    /// Loads `tokenizer.json`, `tokenizer_config.json` and, when present,
    /// `chat_template.jinja` from `dir`, compiling the chat template.
    pub fn from_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let tokenizer_path = dir.join(TOKENIZER_FILE);
        let bytes = read(&tokenizer_path)?;
        let tokenizer =
            tokenizers::Tokenizer::from_bytes(&bytes).map_err(|source| TokenizerError::InvalidTokenizer {
                path: tokenizer_path,
                source,
            })?;

        let config_path = dir.join(TOKENIZER_CONFIG_FILE);
        let bytes = read(&config_path)?;
        let config: TokenizerConfig =
            serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_slice(&bytes)).map_err(|source| {
                TokenizerError::InvalidConfig {
                    path: config_path.clone(),
                    source,
                }
            })?;

        let jinja_path = dir.join(CHAT_TEMPLATE_FILE);
        let (source, template_path) = if jinja_path.is_file() {
            let text = String::from_utf8(read(&jinja_path)?).map_err(|e| TokenizerError::Read {
                path: jinja_path.clone(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
            })?;
            (Some(TemplateSource::One(text)), jinja_path)
        } else {
            (config.chat_template, config_path.clone())
        };
        let special = template::SpecialTokens {
            bos: config.bos_token.map(SpecialToken::into_content),
            eos: config.eos_token.map(SpecialToken::into_content),
        };
        let template = source
            .map(|source| {
                let named = match source {
                    TemplateSource::One(text) => vec![(template::DEFAULT.to_string(), text)],
                    TemplateSource::Named(list) => list.into_iter().map(|t| (t.name, t.template)).collect(),
                };
                ChatTemplate::compile(named, special, &template_path)
            })
            .transpose()?;
        Ok(Self {
            tokenizer,
            template,
            config_path,
        })
    }

    /// The token ids of `text`; `add_special_tokens` applies the tokenizer's
    /// post-processor (BOS and the like).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizerError> {
        // encode_fast: the same ids without computing character offsets.
        let encoding = self
            .tokenizer
            .encode_fast(text, add_special_tokens)
            .map_err(|source| TokenizerError::Encode { source })?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The chat as the engine's template renders it. `add_generation_prompt`
    /// (from the request's extra fields) defaults to true, or to false when
    /// `continue_final_message` is true; with `continue_final_message` the
    /// text is cut right after the final message's content, leaving it open
    /// for the model to continue, as `transformers` does.
    pub fn render_chat(&self, request: &ChatCompletionRequest) -> Result<String, TokenizerError> {
        let template = self.template.as_ref().ok_or_else(|| TokenizerError::NoChatTemplate {
            path: self.config_path.clone(),
        })?;
        let flag = |name: &str| request.extra.get(name).and_then(Value::as_bool);
        let continue_final = flag("continue_final_message").unwrap_or(false);
        let add_generation_prompt = flag("add_generation_prompt").unwrap_or(!continue_final);
        if continue_final && add_generation_prompt {
            return Err(TokenizerError::InvalidRequest(
                InvalidChatRequest::ContinueAndGenerationPrompt,
            ));
        }
        let messages: Vec<Value> = request.messages.iter().map(template_message).collect();
        let kwargs = match request.extra.get("chat_template_kwargs") {
            Some(Value::Object(kwargs)) => kwargs.clone(),
            _ => Map::new(),
        };
        let rendered = template.render(template::Inputs {
            messages: &messages,
            add_generation_prompt,
            tools: request.extra.get("tools"),
            kwargs,
        })?;
        if !continue_final {
            return Ok(rendered);
        }
        let last = messages.last().and_then(|m| m.get("content")).and_then(Value::as_str);
        let last = last.ok_or(TokenizerError::InvalidRequest(InvalidChatRequest::NothingToContinue))?;
        cut_after_final_message(rendered, last)
    }

    /// The prompt's token ids: a chat is rendered, then encoded without
    /// special tokens (the template writes BOS itself); a completion's
    /// prompt is encoded with them, as vLLM does; a prompt of ids (a
    /// migrated request) is its ids.
    pub fn prompt_tokens(&self, request: &LlmRequest) -> Result<Vec<u32>, TokenizerError> {
        match request {
            LlmRequest::Chat(chat) => self.encode(&self.render_chat(chat)?, false),
            LlmRequest::Completion(completion) if let Prompt::Tokens(ids) = &completion.prompt => Ok(ids.clone()),
            LlmRequest::Completion(completion) => self.encode(completion.prompt_text(), true),
        }
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TokenizerError> {
    std::fs::read(path).map_err(|source| TokenizerError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// A message as templates see it: every field the client sent, with the
/// content as one string. Text parts are joined with newlines, as vLLM does
/// for templates that expect string content; other parts are dropped.
fn template_message(message: &ChatMessage) -> Value {
    let mut fields = message.extra.clone();
    // Role serializes to its lowercase name; it cannot fail.
    fields.insert("role".into(), serde_json::to_value(message.role).unwrap_or_default());
    if let Some(content) = &message.content {
        let text = match content {
            MessageContent::Text(text) => text.clone(),
            MessageContent::Parts(parts) => parts
                .iter()
                .filter_map(|part| part.text.as_deref())
                .collect::<Vec<_>>()
                .join("\n"),
        };
        fields.insert("content".into(), Value::String(text));
    }
    Value::Object(fields)
}

/// `transformers`' `continue_final_message`: find the final message's
/// (stripped) text in the rendered chat, and cut after it, keeping its
/// trailing whitespace only when the template kept it too.
fn cut_after_final_message(mut rendered: String, last: &str) -> Result<String, TokenizerError> {
    let stripped = last.trim();
    let at = rendered.rfind(stripped).ok_or(TokenizerError::InvalidRequest(
        InvalidChatRequest::FinalMessageNotRendered,
    ))?;
    let kept_verbatim = rendered.get(at..at + last.trim_start().len()) == Some(last);
    let end = if kept_verbatim {
        at + last.len()
    } else {
        at + stripped.len()
    };
    rendered.truncate(end);
    Ok(rendered)
}

#[cfg(test)]
mod tests;
