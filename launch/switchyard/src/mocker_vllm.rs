//! `switchyard mocker-vllm serve`'s reading of vLLM's `--kv-events-config`:
//! the JSON that `vllm serve` takes, turned into where the stand-in's
//! mocker engine publishes its KV events. Only parsing; no sockets here.

use serde::Deserialize;
use switchyard_kv_events::{DEFAULT_BUFFER_STEPS, PublisherConfig};
use switchyard_mocker_worker::KvEventsBind;

/// The fields of vLLM's `KVEventsConfig` the stand-in uses, with vLLM's
/// defaults. Other keys (`hwm`, `max_queue_size`, …) are ignored, as the
/// mocker's publisher has no such knobs.
#[derive(Debug, Deserialize)]
#[serde(default)]
struct KvEventsConfig {
    enable_kv_cache_events: bool,
    /// `"zmq"` or `"null"`; vLLM picks `"zmq"` when unset and events are on.
    publisher: Option<String>,
    endpoint: String,
    replay_endpoint: Option<String>,
    topic: String,
    buffer_steps: usize,
}

impl Default for KvEventsConfig {
    fn default() -> Self {
        KvEventsConfig {
            enable_kv_cache_events: false,
            publisher: None,
            endpoint: "tcp://*:5557".to_string(),
            replay_endpoint: None,
            topic: String::new(),
            buffer_steps: DEFAULT_BUFFER_STEPS,
        }
    }
}

/// Why `--kv-events-config` was refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum KvEventsConfigError {
    #[error("--kv-events-config {given} is not a JSON object of vLLM's KVEventsConfig")]
    Json {
        given: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("--kv-events-config: publisher {publisher:?} is not one the stand-in has; expected \"zmq\" or \"null\"")]
    Publisher { publisher: String },
}

/// Where to publish, from `--kv-events-config` as vLLM reads it: `None`
/// when the flag is absent, events are not enabled, or the publisher is
/// `"null"` — vLLM publishes nothing then either.
pub(crate) fn kv_events_bind(config: Option<&str>) -> Result<Option<KvEventsBind>, KvEventsConfigError> {
    let Some(given) = config else {
        return Ok(None);
    };
    let config: KvEventsConfig = serde_json::from_str(given).map_err(|source| KvEventsConfigError::Json {
        given: given.to_string(),
        source,
    })?;
    let publisher = config
        .publisher
        .as_deref()
        .unwrap_or(if config.enable_kv_cache_events { "zmq" } else { "null" });
    match publisher {
        "null" => Ok(None),
        "zmq" if config.enable_kv_cache_events => Ok(Some(KvEventsBind::At(PublisherConfig {
            endpoint: config.endpoint,
            replay_endpoint: config.replay_endpoint,
            topic: config.topic,
            buffer_steps: config.buffer_steps,
        }))),
        "zmq" => Ok(None),
        other => Err(KvEventsConfigError::Publisher {
            publisher: other.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_worker_s_config_binds_both_endpoints_and_ignores_unknown_keys() {
        let given = r#"{"enable_kv_cache_events":true,"publisher":"zmq","endpoint":"tcp://*:5557",
                        "replay_endpoint":"tcp://*:5558","topic":"kv-events","hwm":5}"#;
        let Some(KvEventsBind::At(config)) = kv_events_bind(Some(given)).unwrap() else {
            panic!("events are on");
        };
        assert_eq!(config.endpoint, "tcp://*:5557");
        assert_eq!(config.replay_endpoint.as_deref(), Some("tcp://*:5558"));
        assert_eq!(config.topic, "kv-events");
        assert_eq!(config.buffer_steps, DEFAULT_BUFFER_STEPS);
    }

    #[test]
    fn events_are_off_unless_enabled_as_in_vllm() {
        assert_eq!(kv_events_bind(None).unwrap(), None);
        assert_eq!(kv_events_bind(Some("{}")).unwrap(), None);
        assert_eq!(
            kv_events_bind(Some(r#"{"enable_kv_cache_events":true,"publisher":"null"}"#)).unwrap(),
            None
        );
        let Some(KvEventsBind::At(config)) = kv_events_bind(Some(r#"{"enable_kv_cache_events":true}"#)).unwrap() else {
            panic!("vLLM's defaults: zmq on tcp://*:5557");
        };
        assert_eq!((config.endpoint.as_str(), config.topic.as_str()), ("tcp://*:5557", ""));
        assert_eq!(config.replay_endpoint, None);
    }

    #[test]
    fn malformed_json_and_unknown_publishers_are_named() {
        let error = kv_events_bind(Some("{enable")).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("--kv-events-config {enable is not a JSON object"),
            "{error}"
        );
        let error = kv_events_bind(Some(r#"{"enable_kv_cache_events":"yes"}"#)).unwrap_err();
        let cause = std::error::Error::source(&error)
            .expect("serde's reason is kept")
            .to_string();
        assert!(cause.contains("invalid type"), "{cause}");
        let error = kv_events_bind(Some(r#"{"enable_kv_cache_events":true,"publisher":"nats"}"#))
            .unwrap_err()
            .to_string();
        assert!(error.contains("\"nats\""), "{error}");
    }
}
