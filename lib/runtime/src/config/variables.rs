//! Every setting's name, built-in default and meaning: the table behind
//! [`RuntimeConfig`](super::RuntimeConfig) and `docs/configuration.md`.

/// One configuration variable: its environment name, built-in default and meaning.
#[derive(Debug, Clone, Copy)]
pub struct Variable {
    /// Environment variable name; the TOML key is this name without `DYN_`, lowercased.
    pub name: &'static str,
    /// Built-in default, in the same text form a user would write. Empty means unset.
    pub default: &'static str,
    pub help: &'static str,
}

impl Variable {
    /// The key under which figment stores this variable (and the TOML key).
    pub(super) fn key(&self) -> String {
        self.name.strip_prefix("DYN_").unwrap_or(self.name).to_ascii_lowercase()
    }
}

pub(super) const CONFIG_FILE: &str = "DYN_CONFIG_FILE";
pub(super) const DISCOVERY_BACKEND: &str = "DYN_DISCOVERY_BACKEND";
pub(super) const FILE_KV: &str = "DYN_FILE_KV";
pub(super) const LEASE_TTL: &str = "DYN_LEASE_TTL";
pub(super) const ETCD_ENDPOINTS: &str = "ETCD_ENDPOINTS";
pub(super) const ETCD_AUTH_USERNAME: &str = "ETCD_AUTH_USERNAME";
pub(super) const ETCD_AUTH_PASSWORD: &str = "ETCD_AUTH_PASSWORD";
pub(super) const ETCD_AUTH_CA: &str = "ETCD_AUTH_CA";
pub(super) const ETCD_AUTH_CLIENT_CERT: &str = "ETCD_AUTH_CLIENT_CERT";
pub(super) const ETCD_AUTH_CLIENT_KEY: &str = "ETCD_AUTH_CLIENT_KEY";
pub(super) const REQUEST_PLANE: &str = "DYN_REQUEST_PLANE";
pub(super) const TCP_RPC_HOST: &str = "DYN_TCP_RPC_HOST";
pub(super) const TCP_RPC_PORT: &str = "DYN_TCP_RPC_PORT";
pub(super) const TCP_RPC_ADVERTISE: &str = "DYN_TCP_RPC_ADVERTISE";
pub(super) const TCP_MAX_MESSAGE_SIZE: &str = "DYN_TCP_MAX_MESSAGE_SIZE";
pub(super) const TCP_CONNECT_TIMEOUT: &str = "DYN_TCP_CONNECT_TIMEOUT";
pub(super) const TCP_STREAM_WINDOW: &str = "DYN_TCP_STREAM_WINDOW";
pub(super) const REQUEST_PLANE_TLS_CA_PATH: &str = "DYN_REQUEST_PLANE_TLS_CA_PATH";
pub(super) const REQUEST_PLANE_TLS_CERT_PATH: &str = "DYN_REQUEST_PLANE_TLS_CERT_PATH";
pub(super) const REQUEST_PLANE_TLS_KEY_PATH: &str = "DYN_REQUEST_PLANE_TLS_KEY_PATH";
pub(super) const TCP_MAX_CONNECTIONS: &str = "DYN_TCP_MAX_CONNECTIONS";
pub(super) const TCP_MAX_STREAMS_PER_CONNECTION: &str = "DYN_TCP_MAX_STREAMS_PER_CONNECTION";
pub(super) const TCP_MAX_SEND_QUEUE: &str = "DYN_TCP_MAX_SEND_QUEUE";
pub(super) const TCP_WRITE_TIMEOUT: &str = "DYN_TCP_WRITE_TIMEOUT";
pub(super) const HTTP_RPC_HOST: &str = "DYN_HTTP_RPC_HOST";
pub(super) const HTTP_RPC_PORT: &str = "DYN_HTTP_RPC_PORT";
pub(super) const HTTP_RPC_ADVERTISE: &str = "DYN_HTTP_RPC_ADVERTISE";
pub(super) const SYSTEM_PORT: &str = "DYN_SYSTEM_PORT";
pub(super) const SYSTEM_HOST: &str = "DYN_SYSTEM_HOST";
pub(super) const SYSTEM_STARTING_HEALTH_STATUS: &str = "DYN_SYSTEM_STARTING_HEALTH_STATUS";
pub(super) const SYSTEM_HEALTH_PATH: &str = "DYN_SYSTEM_HEALTH_PATH";
pub(super) const SYSTEM_LIVE_PATH: &str = "DYN_SYSTEM_LIVE_PATH";
pub(super) const HEALTH_CHECK_ENABLED: &str = "DYN_HEALTH_CHECK_ENABLED";
pub(super) const CANARY_WAIT_TIME: &str = "DYN_CANARY_WAIT_TIME";
pub(super) const HEALTH_CHECK_REQUEST_TIMEOUT: &str = "DYN_HEALTH_CHECK_REQUEST_TIMEOUT";
pub(super) const EVENT_PLANE: &str = "DYN_EVENT_PLANE";
pub(super) const NATS_SERVER: &str = "NATS_SERVER";
pub(super) const NATS_AUTH_USERNAME: &str = "NATS_AUTH_USERNAME";
pub(super) const NATS_AUTH_PASSWORD: &str = "NATS_AUTH_PASSWORD";
pub(super) const NATS_AUTH_TOKEN: &str = "NATS_AUTH_TOKEN";
pub(super) const NATS_AUTH_CREDENTIALS_FILE: &str = "NATS_AUTH_CREDENTIALS_FILE";
pub(super) const NATS_AUTH_CA: &str = "NATS_AUTH_CA";
pub(super) const NATS_AUTH_CLIENT_CERT: &str = "NATS_AUTH_CLIENT_CERT";
pub(super) const NATS_AUTH_CLIENT_KEY: &str = "NATS_AUTH_CLIENT_KEY";
pub(super) const GRACEFUL_SHUTDOWN_TIMEOUT: &str = "DYN_WORKER_GRACEFUL_SHUTDOWN_TIMEOUT";
pub(super) const LOG: &str = "DYN_LOG";
pub(super) const WORKER_THREADS: &str = "DYN_RUNTIME_NUM_WORKER_THREADS";
pub(super) const SEARCH_PATH: &str = "PATH";
pub(super) const POD_NAME: &str = "POD_NAME";
pub(super) const POD_NAMESPACE: &str = "POD_NAMESPACE";
pub(super) const POD_UID: &str = "POD_UID";

/// Every variable the runtime reads. The order is the order of `docs/configuration.md`.
pub const VARIABLES: &[Variable] = &[
    Variable {
        name: CONFIG_FILE,
        default: "",
        help: "TOML file with any of these settings (keys without `DYN_`, lowercased); environment variables override it",
    },
    Variable {
        name: DISCOVERY_BACKEND,
        default: "etcd",
        help: "where instances are registered: mem | file | etcd | kubernetes",
    },
    Variable {
        name: FILE_KV,
        default: "",
        help: "directory shared by the processes of one machine (file backend); unset means $TMPDIR/switchyard_kv",
    },
    Variable {
        name: LEASE_TTL,
        default: "10s",
        help: "how long a process's registrations outlive it: the etcd lease TTL, or the file backend's staleness limit",
    },
    Variable {
        name: ETCD_ENDPOINTS,
        default: "http://localhost:2379",
        help: "comma-separated etcd client URLs (http:// or https://)",
    },
    Variable {
        name: ETCD_AUTH_USERNAME,
        default: "",
        help: "etcd user name; needs ETCD_AUTH_PASSWORD",
    },
    Variable {
        name: ETCD_AUTH_PASSWORD,
        default: "",
        help: "etcd password; needs ETCD_AUTH_USERNAME",
    },
    Variable {
        name: ETCD_AUTH_CA,
        default: "",
        help: "path of the PEM CA certificate that signed the etcd server's certificate (enables TLS)",
    },
    Variable {
        name: ETCD_AUTH_CLIENT_CERT,
        default: "",
        help: "path of the PEM client certificate for etcd mutual TLS; needs ETCD_AUTH_CLIENT_KEY",
    },
    Variable {
        name: ETCD_AUTH_CLIENT_KEY,
        default: "",
        help: "path of the PEM private key of ETCD_AUTH_CLIENT_CERT",
    },
    Variable {
        name: REQUEST_PLANE,
        default: "tcp",
        help: "how requests reach workers: tcp | http | nats",
    },
    Variable {
        name: TCP_RPC_HOST,
        default: "127.0.0.1",
        help: "address the request-plane listener binds and advertises; must be reachable by callers (not 0.0.0.0)",
    },
    Variable {
        name: TCP_RPC_PORT,
        default: "0",
        help: "port of the request-plane listener; 0 picks a free port",
    },
    Variable {
        name: TCP_RPC_ADVERTISE,
        default: "",
        help: "host:port callers dial instead of the bound address, when a port forward, NAT or proxy sits in front of the listener; unset advertises DYN_TCP_RPC_HOST and the bound port",
    },
    Variable {
        name: TCP_MAX_MESSAGE_SIZE,
        default: "33554432",
        help: "largest frame payload in bytes (a request with its routing header, or one response item); larger ones fail with TooLarge",
    },
    Variable {
        name: TCP_CONNECT_TIMEOUT,
        default: "5s",
        help: "how long a caller waits to connect to a worker before the call fails as Unreachable; a worker closes a new connection that sends nothing for this long",
    },
    Variable {
        name: TCP_STREAM_WINDOW,
        default: "4096",
        help: "response items a worker may send on one stream before the caller has consumed them (per-stream flow control)",
    },
    Variable {
        name: TCP_MAX_CONNECTIONS,
        default: "4096",
        help: "connections one TCP request-plane listener holds at once; a connection over the cap is closed as it is accepted",
    },
    Variable {
        name: TCP_MAX_STREAMS_PER_CONNECTION,
        default: "4096",
        help: "streams one caller connection may have open at once on a worker; a request over the cap fails with Overloaded",
    },
    Variable {
        name: TCP_MAX_SEND_QUEUE,
        default: "67108864",
        help: "bytes a connection may have waiting to be written (a peer that does not read); over it the connection is closed",
    },
    Variable {
        name: TCP_WRITE_TIMEOUT,
        default: "30s",
        help: "how long a write to a request-plane peer may make no progress before the connection is closed",
    },
    Variable {
        name: REQUEST_PLANE_TLS_CA_PATH,
        default: "",
        help: "PEM CA certificate(s) that sign every request-plane peer; with the cert and key, turns on mutual TLS (tcp and http planes)",
    },
    Variable {
        name: REQUEST_PLANE_TLS_CERT_PATH,
        default: "",
        help: "PEM certificate chain this process presents on the request plane, as worker and as caller; needs the CA and key",
    },
    Variable {
        name: REQUEST_PLANE_TLS_KEY_PATH,
        default: "",
        help: "PEM private key of DYN_REQUEST_PLANE_TLS_CERT_PATH",
    },
    Variable {
        name: EVENT_PLANE,
        default: "",
        help: "how events travel: zmq | nats; unset means zmq for mem/file discovery and nats for etcd/kubernetes",
    },
    Variable {
        name: NATS_SERVER,
        default: "nats://localhost:4222",
        help: "comma-separated NATS server URLs (nats:// or tls://), used when the event plane is nats",
    },
    Variable {
        name: NATS_AUTH_USERNAME,
        default: "",
        help: "NATS user; needs NATS_AUTH_PASSWORD",
    },
    Variable {
        name: NATS_AUTH_PASSWORD,
        default: "",
        help: "NATS password; needs NATS_AUTH_USERNAME",
    },
    Variable {
        name: NATS_AUTH_TOKEN,
        default: "",
        help: "NATS token (instead of user and password)",
    },
    Variable {
        name: NATS_AUTH_CREDENTIALS_FILE,
        default: "",
        help: "path of a NATS .creds file (JWT and NKey seed)",
    },
    Variable {
        name: NATS_AUTH_CA,
        default: "",
        help: "path of the PEM CA certificate of the NATS servers; requires TLS on every NATS connection",
    },
    Variable {
        name: NATS_AUTH_CLIENT_CERT,
        default: "",
        help: "path of the PEM client certificate for NATS servers that verify clients; needs NATS_AUTH_CLIENT_KEY and NATS_AUTH_CA",
    },
    Variable {
        name: NATS_AUTH_CLIENT_KEY,
        default: "",
        help: "path of the PEM private key of NATS_AUTH_CLIENT_CERT",
    },
    Variable {
        name: SYSTEM_PORT,
        default: "",
        help: "port of the status server (/health, /live, /metrics, /metadata); unset or -1 = off, 0 = any free port",
    },
    Variable {
        name: SYSTEM_HOST,
        default: "0.0.0.0",
        help: "address the status server binds",
    },
    Variable {
        name: SYSTEM_STARTING_HEALTH_STATUS,
        default: "notready",
        help: "readiness before the first endpoint serves, and of an endpoint with a canary before its first check: ready | notready",
    },
    Variable {
        name: SYSTEM_HEALTH_PATH,
        default: "/health",
        help: "path of the readiness route",
    },
    Variable {
        name: SYSTEM_LIVE_PATH,
        default: "/live",
        help: "path of the liveness route",
    },
    Variable {
        name: HEALTH_CHECK_ENABLED,
        default: "false",
        help: "send canary requests to endpoints that registered a health-check payload: true | false",
    },
    Variable {
        name: CANARY_WAIT_TIME,
        default: "10s",
        help: "idle time (no completed request) after which an endpoint gets a canary",
    },
    Variable {
        name: HEALTH_CHECK_REQUEST_TIMEOUT,
        default: "3s",
        help: "deadline for a canary's whole response stream; missing it turns the endpoint notready",
    },
    Variable {
        name: HTTP_RPC_HOST,
        default: "127.0.0.1",
        help: "address the HTTP/2 request-plane listener binds and advertises (DYN_REQUEST_PLANE=http)",
    },
    Variable {
        name: HTTP_RPC_PORT,
        default: "0",
        help: "port of the HTTP/2 request-plane listener; 0 picks a free port",
    },
    Variable {
        name: HTTP_RPC_ADVERTISE,
        default: "",
        help: "host:port callers dial instead of the bound address (a port forward, NAT or proxy in front); unset advertises DYN_HTTP_RPC_HOST and the bound port",
    },
    Variable {
        name: GRACEFUL_SHUTDOWN_TIMEOUT,
        default: "30s",
        help: "on SIGTERM/SIGINT, how long in-flight requests may run before they are cancelled",
    },
    Variable {
        name: LOG,
        default: "info",
        help: "tracing filter, e.g. `info` or `switchyard_runtime=debug,info`",
    },
    Variable {
        name: WORKER_THREADS,
        default: "",
        help: "tokio worker threads; unset means one per CPU core",
    },
    Variable {
        name: SEARCH_PATH,
        default: "",
        help: "the operating system's command search path, for commands Switchyard starts (the vLLM worker's `vllm`)",
    },
    Variable {
        name: POD_NAME,
        default: "",
        help: "this process's Pod (from the downward API, `metadata.name`); required by the kubernetes backend",
    },
    Variable {
        name: POD_NAMESPACE,
        default: "",
        help: "the Pod's namespace (`metadata.namespace`); the kubernetes backend registers and discovers there",
    },
    Variable {
        name: POD_UID,
        default: "",
        help: "the Pod's UID (`metadata.uid`); the kubernetes backend's owner reference, so the Pod's registrations are deleted with it",
    },
];

pub(super) fn variable(name: &'static str) -> &'static Variable {
    VARIABLES
        .iter()
        .find(|v| v.name == name)
        .expect("every variable the code reads is listed in VARIABLES")
}
