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
//!
//! Nothing here does I/O beyond registering a card.
#![forbid(unsafe_code)]

pub mod migration;
pub mod model_card;
pub mod openai;
pub mod protocol;
