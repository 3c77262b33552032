//! A simulated vLLM engine that needs no GPU: a paged KV cache with prefix reuse, vLLM-style continuous
//! batching and Dynamo's polynomial timing model, so routers and frontends can be exercised at scale.
//!
//! The simulation parts (`kv_cache`, `timing`, `scheduler`, `text`) are pure and deterministic; only
//! `engine` touches tokio (spawning, sleeping, channels). Nothing here reads the environment: callers
//! pass a validated [`config::MockerConfig`].
#![forbid(unsafe_code)]

pub mod config;
pub mod engine;
mod hash;
pub mod kv_cache;
pub mod scheduler;
pub mod text;
pub mod timing;
