//! What the model cards tell KV-aware routers about each vLLM engine: where
//! it publishes its KV cache events, its block size, and which tokenizer
//! reproduces its tokens. Deciding and checking only: the worker neither
//! subscribes to the events nor loads the tokenizer (routers do both).

use std::path::{Path, PathBuf};
use switchyard_llm::model_card::{KvEventsSource, TokenizerSpec};

/// vLLM's default KV-cache block size (tokens per block) on GPUs.
pub const VLLM_BLOCK_SIZE: u64 = 16;

/// The topic managed children publish on. Any fixed value would do (the
/// card carries it); this is the one vLLM's own examples use.
pub const MANAGED_TOPIC: &str = "kv-events";

/// Why the KV settings were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvError {
    #[error(
        "--kv-events-endpoint names {endpoints} address(es) but --attach names {servers} server(s): give one per server, in the same order"
    )]
    EndpointCount { endpoints: usize, servers: usize },
    #[error(
        "--kv-events-replay-endpoint names {replays} address(es) but --kv-events-endpoint names {endpoints}: give one replay address per event address, or none"
    )]
    ReplayCount { replays: usize, endpoints: usize },
    #[error(
        "{flag} {endpoint:?} is not an address a router can connect to: expected tcp://HOST:PORT (a host name or IP, not *; IPv6 in brackets) or ipc://PATH"
    )]
    BadEndpoint { flag: &'static str, endpoint: String },
    #[error("{flag} is for --attach: in managed mode the worker chooses the children's event ports itself")]
    AttachOnly { flag: &'static str },
    #[error(
        "--vllm-arg --kv-events-config: the worker passes its own (ports chosen per child); give --kv-events false to pass yours, and the cards will then name no event endpoints"
    )]
    OwnEventsConfig,
    #[error("--vllm-arg --block-size {value:?} is not a positive number of tokens")]
    BadBlockSize { value: String },
    #[error("--vllm-arg --block-size {in_args} and --kv-cache-block-size {flag} disagree; give one")]
    BlockSizes { in_args: u64, flag: u64 },
    #[error("--tokenizer-dir {path:?} has no readable tokenizer.json; give a local Hugging Face model directory")]
    NoTokenizer { path: PathBuf },
}

/// The two ports a managed child publishes on (both bound on every
/// interface, as vLLM does with `tcp://*:PORT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventPorts {
    pub publish: u16,
    pub replay: u16,
}

impl EventPorts {
    /// vLLM's `--kv-events-config` for these ports.
    pub fn vllm_config(&self) -> String {
        serde_json::json!({
            "enable_kv_cache_events": true,
            "publisher": "zmq",
            "endpoint": format!("tcp://*:{}", self.publish),
            "replay_endpoint": format!("tcp://*:{}", self.replay),
            "topic": MANAGED_TOPIC,
        })
        .to_string()
    }

    /// What the card names: the same ports on the host routers reach this
    /// machine by (the request plane's).
    pub fn source(&self, host: &str) -> KvEventsSource {
        let host = if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]")
        } else {
            host.to_string()
        };
        KvEventsSource {
            endpoint: format!("tcp://{host}:{}", self.publish),
            replay_endpoint: Some(format!("tcp://{host}:{}", self.replay)),
            topic: MANAGED_TOPIC.to_string(),
        }
    }
}

/// The value of `--name` in `args` (`--name V` or `--name=V`), if present.
fn flag_value<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter().enumerate().find_map(|(i, arg)| {
        if arg == name {
            Some(args.get(i + 1).map(String::as_str).unwrap_or(""))
        } else {
            arg.strip_prefix(name)?.strip_prefix('=')
        }
    })
}

fn has_flag(args: &[String], name: &str) -> bool {
    args.iter()
        .any(|arg| arg == name || arg.strip_prefix(name).is_some_and(|rest| rest.starts_with('=')))
}

/// What managed children are started with beyond the user's `--vllm-arg`s,
/// and the block size their cards name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagedPlan {
    /// Put before the user's arguments (the vLLM stand-in reads flags it
    /// knows only before the first one it does not).
    pub leading_args: Vec<String>,
    pub block_size: u64,
}

/// Decides what to add to the user's `vllm serve` arguments: prefix caching
/// (unless they set it either way) and the block size, and checks that
/// they did not pass an events config of their own while the worker passes
/// one. The per-child `--kv-events-config` is added by the caller.
pub fn managed_plan(user_args: &[String], events: bool, block_size_flag: Option<u64>) -> Result<ManagedPlan, KvError> {
    let mut leading_args = Vec::new();
    if events {
        if has_flag(user_args, "--kv-events-config") {
            return Err(KvError::OwnEventsConfig);
        }
        if !has_flag(user_args, "--enable-prefix-caching") && !has_flag(user_args, "--no-enable-prefix-caching") {
            leading_args.push("--enable-prefix-caching".to_string());
        }
    }
    let in_args = flag_value(user_args, "--block-size")
        .map(|value| {
            value
                .parse::<u64>()
                .ok()
                .filter(|size| *size > 0)
                .ok_or_else(|| KvError::BadBlockSize {
                    value: value.to_string(),
                })
        })
        .transpose()?;
    let block_size = match (in_args, block_size_flag) {
        (Some(in_args), Some(flag)) if in_args != flag => return Err(KvError::BlockSizes { in_args, flag }),
        (Some(size), _) => size,
        (None, Some(flag)) => {
            leading_args.extend(["--block-size".to_string(), flag.to_string()]);
            flag
        }
        (None, None) => VLLM_BLOCK_SIZE,
    };
    Ok(ManagedPlan {
        leading_args,
        block_size,
    })
}

/// One event source per attached server, from the attach flags; all `None`
/// when no endpoints are given (routers then use their approximate index).
pub fn attach_sources(
    endpoints: &[String],
    replays: &[String],
    topic: &str,
    servers: usize,
) -> Result<Vec<Option<KvEventsSource>>, KvError> {
    if endpoints.is_empty() {
        if !replays.is_empty() {
            return Err(KvError::ReplayCount {
                replays: replays.len(),
                endpoints: 0,
            });
        }
        return Ok(vec![None; servers]);
    }
    if endpoints.len() != servers {
        return Err(KvError::EndpointCount {
            endpoints: endpoints.len(),
            servers,
        });
    }
    if !replays.is_empty() && replays.len() != endpoints.len() {
        return Err(KvError::ReplayCount {
            replays: replays.len(),
            endpoints: endpoints.len(),
        });
    }
    endpoints
        .iter()
        .enumerate()
        .map(|(i, endpoint)| {
            check_endpoint("--kv-events-endpoint", endpoint)?;
            let replay = replays.get(i).map(|r| r.trim().to_string());
            if let Some(replay) = &replay {
                check_endpoint("--kv-events-replay-endpoint", replay)?;
            }
            Ok(Some(KvEventsSource {
                endpoint: endpoint.trim().to_string(),
                replay_endpoint: replay,
                topic: topic.to_string(),
            }))
        })
        .collect()
}

/// An address a router's SUB socket can connect to: `tcp://HOST:PORT` with
/// a real host (vLLM's `*` is for binding) or `ipc://PATH`.
fn check_endpoint(flag: &'static str, endpoint: &str) -> Result<(), KvError> {
    let bad = || KvError::BadEndpoint {
        flag,
        endpoint: endpoint.to_string(),
    };
    let endpoint = endpoint.trim();
    if let Some(path) = endpoint.strip_prefix("ipc://") {
        return if path.is_empty() { Err(bad()) } else { Ok(()) };
    }
    let address = endpoint.strip_prefix("tcp://").ok_or_else(bad)?;
    let (host, port) = address.rsplit_once(':').ok_or_else(bad)?;
    let host_ok = if let Some(v6) = host.strip_prefix('[') {
        v6.strip_suffix(']')
            .is_some_and(|v6| v6.parse::<std::net::Ipv6Addr>().is_ok())
    } else {
        !host.is_empty()
            && host != "*"
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_')
    };
    match port.parse::<u16>() {
        Ok(port) if port > 0 && host_ok => Ok(()),
        _ => Err(bad()),
    }
}

/// The card's tokenizer: the directory, made absolute (routers elsewhere
/// read the same path), once it is known to hold a `tokenizer.json`.
pub fn tokenizer(dir: Option<&Path>) -> Result<Option<TokenizerSpec>, KvError> {
    let Some(dir) = dir else { return Ok(None) };
    let no_tokenizer = || KvError::NoTokenizer {
        path: dir.to_path_buf(),
    };
    let dir = std::fs::canonicalize(dir).map_err(|_| no_tokenizer())?;
    if !dir.join("tokenizer.json").is_file() {
        return Err(no_tokenizer());
    }
    Ok(Some(TokenizerSpec::HfDir {
        path: dir.to_string_lossy().into_owned(),
    }))
}

#[cfg(test)]
mod tests;
