//! The one error type of this crate: what was wrong, with what, and what is
//! allowed; libzmq's and the OS's causes stay as `source`.

/// Why a [`Publisher`](crate::Publisher) or a subscription could not start.
///
/// Only set-up fails with an error: once the thread runs, network trouble is
/// logged, counted in the stats or delivered as
/// [`Delivery::Lost`](crate::Delivery::Lost), never returned.
#[derive(Debug, thiserror::Error)]
pub enum KvEventsError {
    #[error(
        "invalid {what} {endpoint:?}: {problem}; expected tcp://HOST:PORT (port 0 lets the OS choose when binding), ipc://PATH or inproc://NAME"
    )]
    InvalidEndpoint {
        /// Which setting held it ("endpoint", "replay endpoint").
        what: &'static str,
        endpoint: String,
        problem: &'static str,
    },
    #[error("invalid {field} {value}: expected {expected}")]
    InvalidConfig {
        field: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("could not bind the {what} socket to {endpoint}")]
    Bind {
        what: &'static str,
        endpoint: String,
        #[source]
        source: zmq::Error,
    },
    #[error("could not connect the {what} socket to {endpoint}")]
    Connect {
        what: &'static str,
        endpoint: String,
        #[source]
        source: zmq::Error,
    },
    /// Creating or configuring a socket failed (libzmq out of resources,
    /// e.g. too many open files).
    #[error("could not set up the {what} socket")]
    Socket {
        what: &'static str,
        #[source]
        source: zmq::Error,
    },
    #[error("the host {host:?} to publish on does not resolve to an address")]
    Host {
        host: String,
        #[source]
        source: std::io::Error,
    },
    #[error("could not start the {name} thread")]
    Thread {
        name: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl KvEventsError {
    pub(crate) fn socket(what: &'static str) -> impl FnOnce(zmq::Error) -> KvEventsError {
        move |source| KvEventsError::Socket { what, source }
    }
}
