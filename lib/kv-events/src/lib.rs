//! KV events over ZMQ, the I/O side: a [`Publisher`] that speaks vLLM's
//! wire format (PUB `[topic, seq, msgpack]` plus a replay ROUTER) and a
//! subscriber ([`subscribe`]) that turns an engine's stream into an ordered
//! series of [`Delivery`]s, recovering gaps by replay and reporting what is
//! gone for good.
//!
//! Both sides use libzmq (ADR 0009), whose sockets are synchronous: each
//! runs on its own named thread and talks to tokio through channels. The
//! payload codec is `switchyard_kv_router::events`; what the events mean
//! (the index) is not this crate's business.

mod error;
mod publisher;
mod sequence;
mod subscriber;
mod wire;

pub use error::KvEventsError;
pub use publisher::{DEFAULT_BUFFER_STEPS, Publisher, PublisherConfig};
pub use subscriber::{
    DEFAULT_MAX_MESSAGE_SIZE, DEFAULT_REPLAY_TIMEOUT, Delivery, SubscriberConfig, SubscriberStats, Subscription,
    subscribe,
};

/// How long a thread waits on its sockets before it looks at its stop
/// signal again: stopping takes at most this long, and an idle thread wakes
/// ten times a second, which costs nothing measurable.
const POLL_INTERVAL_MS: i64 = 100;
