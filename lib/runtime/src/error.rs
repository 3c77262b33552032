//! The error that travels with a request: from a handler, across the request
//! plane, to the caller. It is classified by [`ErrorKind`] so a router can
//! decide what to do (retry elsewhere, give up) without reading message text.
//!
//! Only the kind and the message cross the wire; the local `source()` chain is
//! kept on the side that created the error.

use serde::{Deserialize, Serialize};
use std::fmt;

/// What went wrong with a request, as far as a caller needs to know to react.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ErrorKind {
    /// No such endpoint (or instance) at the address that was called.
    NotFound,
    /// The worker refused the request because it is at capacity; try another.
    Overloaded,
    /// The request itself is bad (could not be decoded, wrong mode, bad input).
    Invalid,
    /// The request was cancelled (`stop`/`kill` from the caller or the worker).
    Cancelled,
    /// The worker is shutting down; the request may be retried or migrated.
    ShuttingDown,
    /// The engine (the handler's own logic) failed.
    Engine,
    /// The connection to the worker broke before the stream completed.
    Disconnected,
    /// A message exceeded the configured maximum size (`DYN_TCP_MAX_MESSAGE_SIZE`).
    TooLarge,
    /// The worker could not be reached at all (connect failed or timed out).
    Unreachable,
    /// The peer broke the wire protocol (corrupt frame, unknown message).
    Protocol,
}

impl ErrorKind {
    /// True when this instance could not take the request. When such an error
    /// is the first thing a stream yields (no item was delivered), the request
    /// can go to another instance without doing work twice; after items were
    /// delivered it needs migration (re-issue with the partial output) instead.
    pub fn is_retryable_elsewhere(self) -> bool {
        matches!(
            self,
            ErrorKind::NotFound | ErrorKind::Overloaded | ErrorKind::Unreachable | ErrorKind::ShuttingDown
        )
    }
}

impl ErrorKind {
    /// The `error_type` label value in metrics.
    pub fn label(self) -> &'static str {
        match self {
            ErrorKind::NotFound => "not_found",
            ErrorKind::Overloaded => "overloaded",
            ErrorKind::Invalid => "invalid",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::ShuttingDown => "shutting_down",
            ErrorKind::Engine => "engine",
            ErrorKind::Disconnected => "disconnected",
            ErrorKind::TooLarge => "too_large",
            ErrorKind::Unreachable => "unreachable",
            ErrorKind::Protocol => "protocol",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            ErrorKind::NotFound => "not found",
            ErrorKind::Overloaded => "overloaded",
            ErrorKind::Invalid => "invalid request",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::ShuttingDown => "shutting down",
            ErrorKind::Engine => "engine error",
            ErrorKind::Disconnected => "disconnected",
            ErrorKind::TooLarge => "message too large",
            ErrorKind::Unreachable => "unreachable",
            ErrorKind::Protocol => "protocol error",
        };
        f.write_str(name)
    }
}

/// An error for one request, typed by [`ErrorKind`].
#[derive(Debug, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct RequestError {
    kind: ErrorKind,
    message: String,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl RequestError {
    /// An error of `kind` with a human-readable `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// Attaches the underlying cause (kept locally, not sent over the wire).
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// Shorthand for an [`ErrorKind::Engine`] error, the usual one for handlers.
    pub fn engine(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Engine, message)
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    /// A copy with the same kind and message (the source is not cloned).
    pub fn clone_kind(&self) -> Self {
        Self::new(self.kind, self.message.clone())
    }

    /// The message followed by its local causes, `message: cause: root`:
    /// the text for whoever cannot follow `source()` — the far side of the
    /// wire, or a client reading an API answer.
    pub fn detail(&self) -> String {
        let mut text = self.message.clone();
        let mut cause = std::error::Error::source(self);
        while let Some(error) = cause {
            text.push_str(": ");
            text.push_str(&error.to_string());
            cause = error.source();
        }
        text
    }

    /// The form that crosses the wire: the kind and the [`RequestError::detail`]
    /// (the causes cannot travel as values).
    pub(crate) fn to_wire(&self) -> WireError {
        WireError {
            kind: self.kind,
            message: self.detail(),
        }
    }
}

impl From<WireError> for RequestError {
    fn from(wire: WireError) -> Self {
        Self::new(wire.kind, wire.message)
    }
}

/// Shows an error with its whole cause chain on one line, `error: cause:
/// root cause` — the form for logs and the command line. Every error in this
/// workspace names only its own step in its message and keeps what caused it
/// as `source()`, so each cause is printed exactly once.
///
/// ```ignore
/// tracing::warn!(error = %Report(&error), "cannot reach the engine");
/// ```
#[derive(Debug, Clone, Copy)]
pub struct Report<'a>(pub &'a (dyn std::error::Error + 'a));

impl fmt::Display for Report<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(error) = cause {
            write!(f, ": {error}")?;
            cause = error.source();
        }
        Ok(())
    }
}

/// The serialized form of a [`RequestError`] (msgpack on the request plane).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct WireError {
    pub(crate) kind: ErrorKind,
    pub(crate) message: String,
}
