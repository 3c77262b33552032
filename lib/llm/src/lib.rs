//! Switchyard's LLM layer, shared by the frontend and the workers:
//!
//! - [`openai`]: the OpenAI chat/completions wire types the frontend speaks
//!   to clients, with validation that names the offending field.
//! - [`protocol`]: what travels between frontend and worker on the request
//!   plane (the OpenAI request in, text pieces out).
//! - [`model_card`]: what a worker registers under `v1/models` so frontends
//!   can find it.
//! - [`migration`]: the request to send another worker when one dies
//!   mid-answer (continue from what was generated).
//! - [`tokenizer`]: a model's tokenizer and chat template, read from a
//!   local model directory: a request's prompt token ids, for KV routing.
//!
//! Nothing here does I/O beyond registering a card and reading a model
//! directory when asked to.
#![forbid(unsafe_code)]

pub mod migration;
pub mod model_card;
pub mod openai;
pub mod protocol;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod tokenizer;
