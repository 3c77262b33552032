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
    /// The worker sent nothing within a deadline (first token, stall).
    TimedOut,
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
            ErrorKind::TimedOut => "timed_out",
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
            ErrorKind::TimedOut => "timed out",
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
        if let Some(cause) = std::error::Error::source(self) {
            write_causes(&mut text, &self.message, cause).expect("writing to a String cannot fail");
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
        let message = self.0.to_string();
        f.write_str(&message)?;
        match self.0.source() {
            Some(cause) => write_causes(f, &message, cause),
            None => Ok(()),
        }
    }
}

/// Writes `: cause` for `first` and each cause after it. Some libraries'
/// errors end their own message with their source's (async-nats: `IO error:
/// Connection refused`, then `Connection refused`); such a cause is not
/// written a second time.
fn write_causes(out: &mut impl fmt::Write, message: &str, first: &dyn std::error::Error) -> fmt::Result {
    let mut previous = message.to_string();
    let mut cause = Some(first);
    while let Some(error) = cause {
        let text = error.to_string();
        if !previous.ends_with(&text) {
            write!(out, ": {text}")?;
        }
        previous = text;
        cause = error.source();
    }
    Ok(())
}

/// The serialized form of a [`RequestError`] (msgpack on the request plane).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct WireError {
    pub(crate) kind: ErrorKind,
    pub(crate) message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("{0}")]
    struct Text(&'static str, #[source] Option<Box<Text>>);

    fn chain(messages: &[&'static str]) -> Text {
        messages
            .iter()
            .rev()
            .fold(None, |inner, message| Some(Text(message, inner.map(Box::new))))
            .expect("at least one message")
    }

    #[test]
    fn a_report_prints_each_cause_once_in_order() {
        let error = chain(&["cannot start", "cannot reach NATS", "IO error: refused", "refused"]);
        assert_eq!(
            Report(&error).to_string(),
            "cannot start: cannot reach NATS: IO error: refused"
        );
        let request = RequestError::new(ErrorKind::Unreachable, "no worker").with_source(chain(&["down", "gone"]));
        assert_eq!(request.detail(), "no worker: down: gone");
        assert_eq!(request.to_wire().message, "no worker: down: gone");
        assert_eq!(Report(&request).to_string(), "unreachable: no worker: down: gone");
    }
}
