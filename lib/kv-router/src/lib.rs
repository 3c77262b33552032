//! KV-cache-aware routing, the pure core: router-side block hashing
//! ([`hash`]), vLLM's KV event format ([`events`]), the prefix index fed by
//! those events ([`index`]), the approximate index for engines without
//! events ([`approx`]) and the cost-based choice of a worker ([`select`]).
//!
//! Nothing here does I/O, spawns a task or reads a clock: the caller feeds
//! events and passes the time and the randomness in, so every behaviour is
//! tested deterministically. Wiring (ZMQ subscription, metrics, the
//! frontend's router) lives in the crates that use this one.

pub mod approx;
pub mod events;
pub mod hash;
pub mod index;
pub mod overlap;
pub mod select;
pub mod worker;
