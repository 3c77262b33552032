//! The request planes' settings (`DYN_TCP_*`, `DYN_HTTP_RPC_*`,
//! `DYN_REQUEST_PLANE_TLS_*`): where a worker listens, the limits every
//! connection is held to, and mutual TLS. Parsed and checked once with the
//! other settings; nothing here opens a socket.

use super::variables::*;
use super::{ConfigError, RequestPlaneTls, Settings};
use derive_getters::Getters;
use std::path::Path;
use std::time::Duration;

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

/// Settings of the HTTP/2 request plane's listener.
#[derive(Debug, Clone, Getters)]
pub struct HttpConfig {
    host: String,
    port: u16,
    /// `host:port` to advertise instead of `host` and the bound port.
    advertise: Option<String>,
}

impl Settings {
    /// The TCP plane's listener, limits and TLS (the limits and TLS serve
    /// the HTTP/2 plane too).
    pub(super) fn tcp(&self) -> Result<TcpConfig, ConfigError> {
        Ok(TcpConfig {
            host: self.reachable_host(TCP_RPC_HOST)?,
            port: self.number(
                TCP_RPC_PORT,
                0,
                u16::MAX as u64,
                "a port number 0-65535 (0 picks a free port)",
            )? as u16,
            advertise: self.advertised_address(TCP_RPC_ADVERTISE)?,
            max_message_size: self.number(
                TCP_MAX_MESSAGE_SIZE,
                1024,
                u32::MAX as u64,
                "a size in bytes between 1024 and 4294967295",
            )? as usize,
            connect_timeout: self.positive_duration(TCP_CONNECT_TIMEOUT)?,
            stream_window: self.number(TCP_STREAM_WINDOW, 1, 1 << 20, "a number of items between 1 and 1048576")?
                as u32,
            max_connections: self.number(TCP_MAX_CONNECTIONS, 1, 1 << 20, "a number between 1 and 1048576")? as usize,
            max_streams_per_connection: self.number(
                TCP_MAX_STREAMS_PER_CONNECTION,
                1,
                1 << 20,
                "a number between 1 and 1048576",
            )? as usize,
            max_send_queue: self.number(
                TCP_MAX_SEND_QUEUE,
                64 * 1024,
                1 << 40,
                "a size in bytes between 65536 and 1099511627776",
            )? as usize,
            write_timeout: self.positive_duration(TCP_WRITE_TIMEOUT)?,
            tls: self.request_plane_tls()?,
        })
    }

    /// The HTTP/2 plane's listener.
    pub(super) fn http(&self) -> Result<HttpConfig, ConfigError> {
        Ok(HttpConfig {
            port: self.number(
                HTTP_RPC_PORT,
                0,
                u16::MAX as u64,
                "a port number 0-65535 (0 picks a free port)",
            )? as u16,
            host: self.reachable_host(HTTP_RPC_HOST)?,
            advertise: self.advertised_address(HTTP_RPC_ADVERTISE)?,
        })
    }

    /// A host a listener binds and advertises: callers must be able to dial
    /// it, so not empty and not an unspecified address (`0.0.0.0`, `::`).
    fn reachable_host(&self, name: &'static str) -> Result<String, ConfigError> {
        let host = self.text(name)?.trim().to_string();
        let unspecified = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_unspecified());
        if host.is_empty() || unspecified {
            return Err(self.invalid(
                name,
                &host,
                "a host or IP address callers can reach (the listener advertises it; 0.0.0.0 is not reachable)",
            ));
        }
        Ok(host)
    }

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
}
