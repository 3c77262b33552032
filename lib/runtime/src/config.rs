//! The only place that reads configuration. Built-in defaults, then an
//! optional TOML file (`DYN_CONFIG_FILE`), then `DYN_*` environment variables
//! are merged with figment (later wins) and parsed once into a validated
//! [`RuntimeConfig`]; everything else receives `&RuntimeConfig`.
//!
//! Every variable is listed in [`VARIABLES`]; `docs/configuration.md` is kept
//! in sync with that table by a test. A bad value is a [`ConfigError`] naming
//! the variable, the value, where it came from and what is allowed.

use derive_getters::Getters;
use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use figment::value::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[cfg(feature = "cli")]
pub mod args;
mod tls;
mod variables;
pub use tls::{RequestPlaneTls, peer_identity};
use variables::*;
pub use variables::{VARIABLES, Variable};

/// Where instances are registered and discovered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiscoveryBackend {
    /// In this process only: for single-process runs and tests.
    Mem,
    /// A directory shared by the processes of one machine.
    File,
    /// An etcd cluster.
    Etcd,
    /// The Kubernetes API server.
    Kubernetes,
}

impl DiscoveryBackend {
    const CHOICES: &'static str = "mem, file, etcd, kubernetes";

    fn parse(text: &str) -> Option<Self> {
        match text.to_ascii_lowercase().as_str() {
            "mem" => Some(Self::Mem),
            "file" => Some(Self::File),
            "etcd" => Some(Self::Etcd),
            "kubernetes" => Some(Self::Kubernetes),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Mem => "mem",
            Self::File => "file",
            Self::Etcd => "etcd",
            Self::Kubernetes => "kubernetes",
        }
    }
}

/// How requests travel from callers to workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestPlaneKind {
    Tcp,
    Http,
    Nats,
}

impl RequestPlaneKind {
    const CHOICES: &'static str = "tcp, http, nats";

    fn parse(text: &str) -> Option<Self> {
        match text.to_ascii_lowercase().as_str() {
            "tcp" => Some(Self::Tcp),
            "http" => Some(Self::Http),
            "nats" => Some(Self::Nats),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Http => "http",
            Self::Nats => "nats",
        }
    }
}

/// Settings of the TCP request plane (both the listener and the callers).
#[derive(Debug, Clone, Getters)]
pub struct TcpConfig {
    /// Host the listener binds and advertises in discovery.
    host: String,
    /// Port of the listener; 0 = any free port.
    port: u16,
    /// `host:port` to advertise instead of `host` and the bound port.
    advertise: Option<String>,
    /// Largest encoded request or response item, in bytes.
    max_message_size: usize,
    /// Deadline for opening a connection to a worker.
    connect_timeout: Duration,
    /// Per-stream flow-control window, in response items.
    stream_window: u32,
    /// Connections one listener holds at once.
    max_connections: usize,
    /// Streams one caller connection may have open at once.
    max_streams_per_connection: usize,
    /// Bytes a connection may have queued for writing before it is closed.
    max_send_queue: usize,
    /// How long a write may make no progress before the connection is closed.
    write_timeout: Duration,
    /// Mutual TLS on the TCP and HTTP/2 planes; `None` is plaintext.
    tls: Option<RequestPlaneTls>,
}

impl TcpConfig {
    /// The same settings with mutual TLS on (or off), for tests and embedders
    /// that build their TLS identity themselves.
    pub fn with_tls(mut self, tls: Option<RequestPlaneTls>) -> Self {
        self.tls = tls;
        self
    }
}

/// How events travel between processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventPlaneKind {
    /// Brokerless: each publisher binds a ZMQ PUB socket found through discovery.
    Zmq,
    /// Core NATS subjects.
    Nats,
}

impl EventPlaneKind {
    /// The plane used when `DYN_EVENT_PLANE` is not set: brokerless ZMQ for
    /// the infrastructure-free backends, NATS next to etcd or Kubernetes.
    pub fn default_for(backend: DiscoveryBackend) -> Self {
        match backend {
            DiscoveryBackend::Mem | DiscoveryBackend::File => Self::Zmq,
            DiscoveryBackend::Etcd | DiscoveryBackend::Kubernetes => Self::Nats,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Zmq => "zmq",
            Self::Nats => "nats",
        }
    }
}

/// How to authenticate to NATS.
#[derive(Clone)]
pub enum NatsAuth {
    None,
    UserPassword(String, String),
    Token(String),
    CredentialsFile(PathBuf),
}

impl std::fmt::Debug for NatsAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print secrets.
        match self {
            Self::None => f.write_str("None"),
            Self::UserPassword(user, _) => write!(f, "UserPassword({user:?}, ***)"),
            Self::Token(_) => f.write_str("Token(***)"),
            Self::CredentialsFile(path) => write!(f, "CredentialsFile({path:?})"),
        }
    }
}

/// How to reach NATS.
#[derive(Clone, Getters)]
pub struct NatsConfig {
    servers: Vec<String>,
    auth: NatsAuth,
}

impl std::fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsConfig")
            .field("servers", &redact_urls(&self.servers))
            .field("auth", &self.auth)
            .finish()
    }
}

/// `url` with any `user:password@` replaced by `***@`, for logs and errors:
/// `nats://alice:secret@host:4222` → `nats://***@host:4222`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://***{}", &rest[at..]),
        None => url.to_string(),
    }
}

/// [`redact_url`] over a list, joined with commas.
pub fn redact_urls(urls: &[String]) -> String {
    urls.iter().map(|url| redact_url(url)).collect::<Vec<_>>().join(",")
}

/// Whether `url`'s host is a loopback address or `localhost`.
fn is_loopback_url(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = &rest[..rest.find('/').unwrap_or(rest.len())];
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, host)| host);
    let host = match host_port.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => host_port.rsplit_once(':').map_or(host_port, |(host, _)| host),
    };
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The status server and the canary health checks.
#[derive(Debug, Clone, Getters)]
pub struct SystemConfig {
    /// `None` = no status server; `Some(0)` = any free port.
    port: Option<u16>,
    host: String,
    /// Readiness before any endpoint serves (and of a canaried endpoint before its first check).
    starting_ready: bool,
    health_path: String,
    live_path: String,
    canary_enabled: bool,
    canary_wait: Duration,
    canary_timeout: Duration,
}

/// How to reach etcd (discovery backend `etcd`).
#[derive(Clone, Getters)]
pub struct EtcdConfig {
    /// Client URLs, tried in turn.
    endpoints: Vec<String>,
    /// User name and password, when etcd has authentication on.
    credentials: Option<(String, String)>,
    /// CA certificate (PEM file) that signs the server's certificate; enables TLS.
    ca: Option<PathBuf>,
    /// Client certificate and key (PEM files) for mutual TLS.
    identity: Option<(PathBuf, PathBuf)>,
}

impl std::fmt::Debug for EtcdConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the password.
        f.debug_struct("EtcdConfig")
            .field("endpoints", &redact_urls(&self.endpoints))
            .field("user", &self.credentials.as_ref().map(|(user, _)| user))
            .field("ca", &self.ca)
            .field("identity", &self.identity)
            .finish()
    }
}

/// Who this process is in Kubernetes, from the downward API (`POD_NAME`,
/// `POD_NAMESPACE`, `POD_UID`). Only the `kubernetes` discovery backend needs it.
#[derive(Debug, Clone, PartialEq, Eq, Getters)]
pub struct PodIdentity {
    name: String,
    namespace: String,
    uid: String,
}

impl PodIdentity {
    /// An identity given in code (tests, embedders).
    pub fn new(name: impl Into<String>, namespace: impl Into<String>, uid: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            namespace: namespace.into(),
            uid: uid.into(),
        }
    }
}

/// Settings of the HTTP/2 request plane's listener.
#[derive(Debug, Clone, Getters)]
pub struct HttpConfig {
    host: String,
    port: u16,
    /// `host:port` to advertise instead of `host` and the bound port.
    advertise: Option<String>,
}

/// The validated settings of one process.
#[derive(Debug, Clone, Getters)]
pub struct RuntimeConfig {
    http: HttpConfig,
    discovery_backend: DiscoveryBackend,
    /// Lifetime of registrations after their process stops refreshing them.
    lease_ttl: Duration,
    /// Root directory of the file backend.
    file_kv: PathBuf,
    etcd: EtcdConfig,
    request_plane: RequestPlaneKind,
    tcp: TcpConfig,
    system: SystemConfig,
    /// The event plane, resolved from `DYN_EVENT_PLANE` and the discovery backend.
    event_plane: EventPlaneKind,
    /// Whether `DYN_EVENT_PLANE` was given (else it follows the discovery backend).
    #[getter(skip)]
    event_plane_chosen: bool,
    nats: NatsConfig,
    /// Drain deadline after SIGTERM/SIGINT.
    graceful_shutdown_timeout: Duration,
    /// `tracing` filter directive.
    log_filter: String,
    /// Tokio worker threads.
    worker_threads: usize,
    /// Directories where commands are looked up (`PATH`), empty when unset.
    command_search_path: String,
    /// The Pod identity, when all three downward-API variables are set.
    #[getter(skip)]
    pod: Result<PodIdentity, Vec<&'static str>>,
}

impl RuntimeConfig {
    /// Defaults → the TOML file named by `DYN_CONFIG_FILE` (if any) → environment.
    pub fn from_settings() -> Result<Self, ConfigError> {
        let env = Env::prefixed("DYN_");
        let unprefixed: Vec<&str> = VARIABLES
            .iter()
            .map(|v| v.name)
            .filter(|name| !name.starts_with("DYN_"))
            .collect();
        let config_file = env
            .iter()
            .find(|(key, _)| key.as_str() == "config_file")
            .map(|(_, value)| value)
            .filter(|value| !value.is_empty());
        let mut figment = defaults();
        if let Some(path) = config_file {
            let path = PathBuf::from(path);
            if !path.is_file() {
                return Err(ConfigError::MissingFile { path });
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        Self::from_figment(figment.merge(env).merge(Env::raw().only(&unprefixed)))
    }

    /// Defaults overridden by the given `(variable, value)` pairs, ignoring the
    /// process environment. Tests and embedders use this instead of mutating
    /// the environment.
    pub fn from_vars<'a>(vars: impl IntoIterator<Item = (&'a str, &'a str)>) -> Result<Self, ConfigError> {
        let mut overrides = BTreeMap::new();
        for (name, value) in vars {
            let variable = VARIABLES
                .iter()
                .find(|v| v.name == name)
                .ok_or_else(|| ConfigError::UnknownVariable { name: name.to_string() })?;
            overrides.insert(variable.key(), value.to_string());
        }
        Self::from_figment(defaults().merge(Serialized::defaults(overrides)))
    }

    /// Settings for one process with no infrastructure: in-memory discovery,
    /// TCP on 127.0.0.1, any free port.
    pub fn local() -> Self {
        Self::from_vars([(DISCOVERY_BACKEND, "mem")]).expect("built-in local settings are valid")
    }

    /// Parses and validates every variable from a merged figment.
    pub fn from_figment(figment: Figment) -> Result<Self, ConfigError> {
        let settings = Settings { figment };
        let discovery_backend =
            settings.choice(DISCOVERY_BACKEND, DiscoveryBackend::CHOICES, DiscoveryBackend::parse)?;
        let request_plane = settings.choice(REQUEST_PLANE, RequestPlaneKind::CHOICES, RequestPlaneKind::parse)?;
        let host = settings.text(TCP_RPC_HOST)?.trim().to_string();
        let unspecified = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_unspecified());
        if host.is_empty() || unspecified {
            return Err(settings.invalid(
                TCP_RPC_HOST,
                &host,
                "a host or IP address callers can reach (the listener advertises it; 0.0.0.0 is not reachable)",
            ));
        }
        let tcp = TcpConfig {
            host,
            port: settings.number(
                TCP_RPC_PORT,
                0,
                u16::MAX as u64,
                "a port number 0-65535 (0 picks a free port)",
            )? as u16,
            advertise: settings.advertised_address(TCP_RPC_ADVERTISE)?,
            max_message_size: settings.number(
                TCP_MAX_MESSAGE_SIZE,
                1024,
                u32::MAX as u64,
                "a size in bytes between 1024 and 4294967295",
            )? as usize,
            connect_timeout: settings.duration(TCP_CONNECT_TIMEOUT)?,
            stream_window: settings.number(TCP_STREAM_WINDOW, 1, 1 << 20, "a number of items between 1 and 1048576")?
                as u32,
            max_connections: settings.number(TCP_MAX_CONNECTIONS, 1, 1 << 20, "a number between 1 and 1048576")?
                as usize,
            max_streams_per_connection: settings.number(
                TCP_MAX_STREAMS_PER_CONNECTION,
                1,
                1 << 20,
                "a number between 1 and 1048576",
            )? as usize,
            max_send_queue: settings.number(
                TCP_MAX_SEND_QUEUE,
                64 * 1024,
                1 << 40,
                "a size in bytes between 65536 and 1099511627776",
            )? as usize,
            write_timeout: settings.duration(TCP_WRITE_TIMEOUT)?,
            tls: settings.request_plane_tls()?,
        };
        if tcp.write_timeout.is_zero() {
            return Err(settings.invalid(
                TCP_WRITE_TIMEOUT,
                &settings.text(TCP_WRITE_TIMEOUT)?,
                "a duration above 0",
            ));
        }
        let worker_threads = match settings.optional_text(WORKER_THREADS)? {
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
            Some(_) => settings.number(WORKER_THREADS, 1, 1024, "a thread count between 1 and 1024")? as usize,
        };
        let lease_ttl = settings.duration(LEASE_TTL)?;
        if lease_ttl < Duration::from_secs(1) {
            return Err(settings.invalid(LEASE_TTL, &settings.text(LEASE_TTL)?, "a duration of at least 1s"));
        }
        let file_kv = settings
            .optional_text(FILE_KV)?
            .map_or_else(|| std::env::temp_dir().join("switchyard_kv"), PathBuf::from);
        let system = settings.system()?;
        let http_host = settings.text(HTTP_RPC_HOST)?.trim().to_string();
        let http = HttpConfig {
            port: settings.number(
                HTTP_RPC_PORT,
                0,
                u16::MAX as u64,
                "a port number 0-65535 (0 picks a free port)",
            )? as u16,
            host: http_host,
            advertise: settings.advertised_address(HTTP_RPC_ADVERTISE)?,
        };
        let event_plane_chosen = settings.optional_text(EVENT_PLANE)?.is_some();
        let event_plane = match settings.optional_text(EVENT_PLANE)? {
            Some(_) => settings.choice(EVENT_PLANE, "zmq, nats", |text| {
                match text.to_ascii_lowercase().as_str() {
                    "zmq" => Some(EventPlaneKind::Zmq),
                    "nats" => Some(EventPlaneKind::Nats),
                    _ => None,
                }
            })?,
            None => EventPlaneKind::default_for(discovery_backend),
        };
        Ok(Self {
            http,
            system,
            event_plane,
            event_plane_chosen,
            nats: settings.nats()?,
            discovery_backend,
            lease_ttl,
            file_kv,
            etcd: settings.etcd()?,
            request_plane,
            tcp,
            graceful_shutdown_timeout: settings.duration(GRACEFUL_SHUTDOWN_TIMEOUT)?,
            log_filter: settings.log_filter()?,
            worker_threads,
            command_search_path: settings.optional_text(SEARCH_PATH)?.unwrap_or_default(),
            pod: settings.pod()?,
        })
        .and_then(Self::checked_for_backend)
    }

    /// This process's Pod, which the `kubernetes` backend needs; the error
    /// names the downward-API variables that are missing.
    pub fn pod_identity(&self) -> Result<PodIdentity, ConfigError> {
        self.pod
            .clone()
            .map_err(|missing| ConfigError::MissingPodIdentity { missing })
    }

    /// Refuses settings that the chosen discovery backend cannot start with.
    fn checked_for_backend(self) -> Result<Self, ConfigError> {
        if self.discovery_backend == DiscoveryBackend::Kubernetes {
            self.pod_identity()?;
        }
        Ok(self)
    }

    /// The same settings with mutual TLS on the request planes on (or off),
    /// for tests and embedders that load their TLS identity themselves.
    pub fn with_request_plane_tls(mut self, tls: Option<RequestPlaneTls>) -> Self {
        self.tcp = self.tcp.with_tls(tls);
        self
    }

    /// The same settings with another discovery backend (used by the
    /// one-process example, which always runs on `mem`).
    pub fn with_discovery_backend(mut self, backend: DiscoveryBackend) -> Self {
        self.discovery_backend = backend;
        if !self.event_plane_chosen {
            self.event_plane = EventPlaneKind::default_for(backend);
        }
        self
    }
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self::from_figment(defaults()).expect("built-in defaults are valid")
    }
}

/// Built-in defaults as a figment provider (unset defaults are left out).
fn defaults() -> Figment {
    let map: BTreeMap<String, &str> = VARIABLES
        .iter()
        .filter(|v| !v.default.is_empty())
        .map(|v| (v.key(), v.default))
        .collect();
    Figment::from(Serialized::defaults(map))
}

/// Typed access to the merged values, producing errors that name the variable.
struct Settings {
    figment: Figment,
}

impl Settings {
    /// The value as text, or `None` when unset or empty (an empty environment
    /// variable means "use the default", as in Dynamo).
    /// A `host:port` callers can dial, or `None` when unset or empty.
    fn advertised_address(&self, name: &'static str) -> Result<Option<String>, ConfigError> {
        let Some(text) = self.optional_text(name)?.map(|t| t.trim().to_string()) else {
            return Ok(None);
        };
        if text.is_empty() {
            return Ok(None);
        }
        let valid = text.rsplit_once(':').is_some_and(|(host, port)| {
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let unspecified = host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_unspecified());
            !host.is_empty() && !unspecified && port.parse::<u16>().is_ok_and(|port| port > 0)
        });
        if !valid {
            return Err(self.invalid(
                name,
                &text,
                "host:port with a reachable host (not 0.0.0.0) and a port 1-65535, e.g. 10.0.0.5:7000 or [fd00::5]:7000",
            ));
        }
        Ok(Some(text))
    }

    fn optional_text(&self, name: &'static str) -> Result<Option<String>, ConfigError> {
        let variable = variable(name);
        let text = match self.figment.find_value(&variable.key()) {
            Err(_) => None,
            Ok(Value::String(_, s)) => Some(s),
            Ok(Value::Char(_, c)) => Some(c.to_string()),
            Ok(Value::Bool(_, b)) => Some(b.to_string()),
            Ok(Value::Num(_, n)) => Some(if let Some(u) = n.to_u128() {
                u.to_string()
            } else if let Some(i) = n.to_i128() {
                i.to_string()
            } else {
                n.to_f64().map_or_else(|| format!("{n:?}"), |f| f.to_string())
            }),
            Ok(other) => {
                return Err(self.invalid(name, &format!("{other:?}"), "a single value, not a list or table"));
            }
        };
        Ok(text.filter(|t| !t.is_empty()))
    }

    /// The value as text, falling back to the built-in default when empty.
    fn text(&self, name: &'static str) -> Result<String, ConfigError> {
        Ok(self
            .optional_text(name)?
            .unwrap_or_else(|| variable(name).default.to_string()))
    }

    fn choice<T>(
        &self,
        name: &'static str,
        choices: &'static str,
        parse: fn(&str) -> Option<T>,
    ) -> Result<T, ConfigError> {
        let text = self.text(name)?;
        parse(text.trim()).ok_or_else(|| self.invalid(name, &text, &format!("one of {choices}")))
    }

    fn number(&self, name: &'static str, min: u64, max: u64, expected: &str) -> Result<u64, ConfigError> {
        let text = self.text(name)?;
        match text.trim().parse::<u64>() {
            Ok(n) if (min..=max).contains(&n) => Ok(n),
            _ => Err(self.invalid(name, &text, expected)),
        }
    }

    fn duration(&self, name: &'static str) -> Result<Duration, ConfigError> {
        let text = self.text(name)?;
        parse_duration(&text).ok_or_else(|| self.invalid(name, &text, BareNumber::Seconds.expected()))
    }

    fn system(&self) -> Result<SystemConfig, ConfigError> {
        let port = match self.optional_text(SYSTEM_PORT)? {
            None => None,
            Some(text) if text.trim() == "-1" => None,
            Some(_) => {
                Some(self.number(SYSTEM_PORT, 0, u16::MAX as u64, "a port number 0-65535, or -1 for off")? as u16)
            }
        };
        let starting_ready = self.choice(SYSTEM_STARTING_HEALTH_STATUS, "ready, notready", |text| match text {
            "ready" => Some(true),
            "notready" => Some(false),
            _ => None,
        })?;
        let health_path = self.path(SYSTEM_HEALTH_PATH)?;
        let live_path = self.path(SYSTEM_LIVE_PATH)?;
        if health_path == live_path {
            return Err(self.invalid(
                SYSTEM_LIVE_PATH,
                &live_path,
                "a path different from DYN_SYSTEM_HEALTH_PATH",
            ));
        }
        let canary_enabled = self.choice(HEALTH_CHECK_ENABLED, "true, false", |text| {
            match text.to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "on" => Some(true),
                "false" | "0" | "no" | "off" => Some(false),
                _ => None,
            }
        })?;
        Ok(SystemConfig {
            port,
            host: self.text(SYSTEM_HOST)?,
            starting_ready,
            health_path,
            live_path,
            canary_enabled,
            canary_wait: self.duration(CANARY_WAIT_TIME)?,
            canary_timeout: self.duration(HEALTH_CHECK_REQUEST_TIMEOUT)?,
        })
    }

    /// A route path: starts with `/`, and is not one of the fixed routes.
    fn path(&self, name: &'static str) -> Result<String, ConfigError> {
        let text = self.text(name)?;
        let fixed = ["/metrics", "/metadata"];
        if !text.starts_with('/') || text.contains(char::is_whitespace) || fixed.contains(&text.as_str()) {
            return Err(self.invalid(
                name,
                &text,
                "a path starting with `/`, other than /metrics and /metadata",
            ));
        }
        Ok(text)
    }

    fn nats(&self) -> Result<NatsConfig, ConfigError> {
        let text = self.text(NATS_SERVER)?;
        let servers: Vec<String> = text
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        let valid = |s: &String| {
            s.strip_prefix("nats://")
                .or_else(|| s.strip_prefix("tls://"))
                .is_some_and(|rest| !rest.is_empty())
        };
        if servers.is_empty() || !servers.iter().all(valid) {
            return Err(self.invalid(
                NATS_SERVER,
                &redact_urls(&servers),
                "a comma-separated list of nats://host:port or tls://host:port URLs",
            ));
        }
        let user = self.optional_text(NATS_AUTH_USERNAME)?;
        let password = self.optional_text(NATS_AUTH_PASSWORD)?;
        let token = self.optional_text(NATS_AUTH_TOKEN)?;
        let credentials = self.optional_text(NATS_AUTH_CREDENTIALS_FILE)?;
        let auth = match (user, password, token, credentials) {
            (None, None, None, None) => NatsAuth::None,
            (Some(user), Some(password), None, None) => NatsAuth::UserPassword(user, password),
            (None, None, Some(token), None) => NatsAuth::Token(token),
            (None, None, None, Some(path)) => NatsAuth::CredentialsFile(PathBuf::from(path)),
            (Some(_), None, _, _) | (None, Some(_), _, _) => {
                return Err(ConfigError::Incomplete {
                    set: "only one of NATS_AUTH_USERNAME and NATS_AUTH_PASSWORD",
                    needed: "both, or neither",
                });
            }
            _ => {
                return Err(ConfigError::Incomplete {
                    set: "more than one NATS authentication method",
                    needed: "exactly one of user+password, NATS_AUTH_TOKEN or NATS_AUTH_CREDENTIALS_FILE",
                });
            }
        };
        Ok(NatsConfig { servers, auth })
    }

    fn etcd(&self) -> Result<EtcdConfig, ConfigError> {
        let text = self.text(ETCD_ENDPOINTS)?;
        let endpoints: Vec<String> = text
            .split(',')
            .map(|e| e.trim().to_string())
            .filter(|e| !e.is_empty())
            .collect();
        let valid = |e: &String| {
            e.strip_prefix("http://")
                .or_else(|| e.strip_prefix("https://"))
                .is_some_and(|rest| !rest.is_empty())
        };
        if endpoints.is_empty() || !endpoints.iter().all(valid) {
            return Err(self.invalid(
                ETCD_ENDPOINTS,
                &redact_urls(&endpoints),
                "a comma-separated list of http://host:port or https://host:port URLs",
            ));
        }
        let credentials = match (
            self.optional_text(ETCD_AUTH_USERNAME)?,
            self.optional_text(ETCD_AUTH_PASSWORD)?,
        ) {
            (Some(user), Some(password)) => Some((user, password)),
            (None, None) => None,
            _ => {
                return Err(ConfigError::Incomplete {
                    set: "only one of ETCD_AUTH_USERNAME and ETCD_AUTH_PASSWORD",
                    needed: "both, or neither",
                });
            }
        };
        let identity = match (
            self.optional_text(ETCD_AUTH_CLIENT_CERT)?,
            self.optional_text(ETCD_AUTH_CLIENT_KEY)?,
        ) {
            (Some(cert), Some(key)) => Some((PathBuf::from(cert), PathBuf::from(key))),
            (None, None) => None,
            _ => {
                return Err(ConfigError::Incomplete {
                    set: "only one of ETCD_AUTH_CLIENT_CERT and ETCD_AUTH_CLIENT_KEY",
                    needed: "both, or neither",
                });
            }
        };
        // A password sent in the clear to another machine is as good as
        // published; loopback (development) is allowed.
        if credentials.is_some()
            && let Some(plain) = endpoints
                .iter()
                .find(|e| e.starts_with("http://") && !is_loopback_url(e))
        {
            return Err(ConfigError::PlainTextPassword {
                endpoint: redact_url(plain),
            });
        }
        Ok(EtcdConfig {
            endpoints,
            credentials,
            ca: self.optional_text(ETCD_AUTH_CA)?.map(PathBuf::from),
            identity,
        })
    }

    /// Mutual TLS for the request planes: all three paths, or none.
    fn request_plane_tls(&self) -> Result<Option<RequestPlaneTls>, ConfigError> {
        let names = [
            REQUEST_PLANE_TLS_CA_PATH,
            REQUEST_PLANE_TLS_CERT_PATH,
            REQUEST_PLANE_TLS_KEY_PATH,
        ];
        let [ca, cert, key] = [
            self.optional_text(names[0])?,
            self.optional_text(names[1])?,
            self.optional_text(names[2])?,
        ];
        match (ca, cert, key) {
            (None, None, None) => Ok(None),
            (Some(ca), Some(cert), Some(key)) => {
                RequestPlaneTls::load(names, Path::new(&ca), Path::new(&cert), Path::new(&key)).map(Some)
            }
            _ => Err(ConfigError::Incomplete {
                set: "only some of DYN_REQUEST_PLANE_TLS_CA_PATH, _CERT_PATH and _KEY_PATH",
                needed: "all three, or none",
            }),
        }
    }

    /// The downward-API identity, or the names of the variables that are unset.
    fn pod(&self) -> Result<Result<PodIdentity, Vec<&'static str>>, ConfigError> {
        let mut missing = vec![];
        let mut value = |name: &'static str| -> Result<String, ConfigError> {
            let text = self
                .optional_text(name)?
                .map(|t| t.trim().to_string())
                .unwrap_or_default();
            if text.is_empty() {
                missing.push(name);
            }
            Ok(text)
        };
        let (name, namespace, uid) = (value(POD_NAME)?, value(POD_NAMESPACE)?, value(POD_UID)?);
        Ok(if missing.is_empty() {
            Ok(PodIdentity { name, namespace, uid })
        } else {
            Err(missing)
        })
    }

    fn log_filter(&self) -> Result<String, ConfigError> {
        let text = self.text(LOG)?;
        match tracing_subscriber::EnvFilter::try_new(&text) {
            Ok(_) => Ok(text),
            Err(_) => Err(self.invalid(
                LOG,
                &text,
                "a tracing filter such as `info` or `switchyard_runtime=debug,info`",
            )),
        }
    }

    fn invalid(&self, name: &'static str, value: &str, expected: &str) -> ConfigError {
        let origin = self
            .figment
            .find_metadata(&variable(name).key())
            .map_or_else(|| "built-in default".to_string(), |m| m.name.to_string());
        ConfigError::Invalid {
            variable: name,
            value: value.to_string(),
            origin,
            expected: expected.to_string(),
        }
    }
}

/// Parses `10s`, `500ms`, `1m 30s` (humantime) or plain seconds (`10`, `0.5`).
pub fn parse_duration(text: &str) -> Option<Duration> {
    parse_duration_in(text, BareNumber::Seconds)
}

/// Parses `10s`, `500ms`, `1m 30s` (humantime), or a plain number in `bare`
/// units. Negative, infinite and out-of-range values are `None`.
pub fn parse_duration_in(text: &str, bare: BareNumber) -> Option<Duration> {
    let text = text.trim();
    if let Ok(number) = text.parse::<f64>() {
        let seconds = match bare {
            BareNumber::Seconds => number,
            BareNumber::Milliseconds => number / 1000.0,
        };
        return Duration::try_from_secs_f64(seconds).ok();
    }
    humantime::parse_duration(text).ok()
}

/// What a duration written as a plain number counts. Runtime variables and
/// most flags count seconds; flags whose name ends in `-ms` (and their
/// `*_MS` variables) took whole milliseconds before they took durations, so a
/// bare number there still counts milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BareNumber {
    Seconds,
    Milliseconds,
}

impl BareNumber {
    /// What a duration setting accepts, in the words of the error messages.
    pub fn expected(self) -> &'static str {
        match self {
            Self::Seconds => "a duration such as `10s`, `500ms` or a number of seconds",
            Self::Milliseconds => "a duration such as `10s`, `500ms` or a number of milliseconds",
        }
    }
}

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid {variable}={value:?} (from {origin}): expected {expected}")]
    Invalid {
        variable: &'static str,
        value: String,
        origin: String,
        expected: String,
    },
    /// A component's flag (or the variable it falls back to) has a value it
    /// cannot take. clap reads these, through `config::args`.
    #[error("invalid {flag}{}={value:?}: expected {expected}", variable.as_ref().map(|v| format!(" / {v}")).unwrap_or_default())]
    InvalidFlag {
        /// The flag, e.g. `--stop-grace-secs`.
        flag: String,
        /// The variable the flag falls back to, e.g. `DYN_VLLM_STOP_GRACE_SECS`.
        variable: Option<String>,
        value: String,
        expected: String,
    },
    #[error("DYN_CONFIG_FILE names {path:?}, which is not a readable file")]
    MissingFile { path: PathBuf },
    #[error("{set} is set; {needed} must be")]
    Incomplete { set: &'static str, needed: &'static str },
    #[error(
        "ETCD_AUTH_PASSWORD would travel in the clear to {endpoint} (plain http:// to another host); \
         use https:// endpoints in ETCD_ENDPOINTS (with ETCD_AUTH_CA when the CA is private)"
    )]
    PlainTextPassword { endpoint: String },
    #[error("{variable}={path:?} cannot be used: {reason}")]
    TlsFile {
        variable: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("unknown configuration variable {name:?}; see docs/configuration.md for the list")]
    UnknownVariable { name: String },
    #[error(
        "DYN_DISCOVERY_BACKEND=kubernetes needs this Pod's identity from the downward API, but {} {} not set; \
         give the container env entries with valueFrom.fieldRef metadata.name / metadata.namespace / metadata.uid \
         (see deploy/k8s/worker-mocker.yaml)",
        missing.join(", "),
        if missing.len() == 1 { "is" } else { "are" }
    )]
    MissingPodIdentity { missing: Vec<&'static str> },
}

#[cfg(test)]
mod tests;
