//! A Switchyard worker serving the simulated vLLM engine: it registers an
//! endpoint and a model card, answers LLM requests with fake but readable
//! text, publishes its load for routers, and exports vLLM's `vllm:*` gauges.
//!
//! [`MockerArgs`] are the command-line flags (`switchyard worker mocker`);
//! [`run`] serves `--num-workers` workers until the runtime shuts down, and
//! [`serve`] starts one on a given runtime (for the all-in-one `switchyard run`).
#![forbid(unsafe_code)]

pub mod engine;
pub mod metrics;
pub mod stop;
mod worker;

pub use worker::{KvEventsBind, MockerArgs, MockerError, MockerWorker, run, serve, serve_with};
