//! Errors across the boundary, both ways, by kind — never by message text.
//!
//! Rust → Python: a runtime error becomes the exception class of
//! `switchyard.errors` for its kind (`Overloaded`, `EngineShutdown`, …),
//! built on the loop's thread. Python → Rust: the handler driver
//! (`switchyard/_serve.py`) classifies an exception into a kind label and a
//! message, and [`request_error`] turns them into a [`RequestError`].

use pyo3::prelude::*;
use switchyard_runtime::error::{ErrorKind, Report, RequestError};

/// An error on its way to Python: the `switchyard.errors` class to raise and
/// the message (with its causes, which cannot cross as values).
#[derive(Debug)]
pub(crate) struct Error {
    class: &'static str,
    message: String,
}

impl Error {
    /// A refusal of a bad argument (a name, a payload): `InvalidRequest`,
    /// which is also a `ValueError`.
    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Self {
            class: "InvalidRequest",
            message: message.into(),
        }
    }

    /// The runtime could not do a set-up step (connect, serve, register).
    pub(crate) fn setup(error: &(dyn std::error::Error + 'static)) -> Self {
        Self {
            class: "SetupError",
            message: Report(error).to_string(),
        }
    }

    /// The request ended because it was cancelled.
    pub(crate) fn cancelled(message: impl Into<String>) -> Self {
        Self {
            class: "Cancelled",
            message: message.into(),
        }
    }

    /// The end of a response stream (`StopAsyncIteration`), for `__anext__`.
    pub(crate) fn end_of_stream() -> Self {
        Self {
            class: END_OF_STREAM,
            message: String::new(),
        }
    }

    pub(crate) fn into_pyerr(self, py: Python<'_>) -> PyErr {
        if self.class == END_OF_STREAM {
            return pyo3::exceptions::PyStopAsyncIteration::new_err(());
        }
        let raise = || -> PyResult<PyErr> {
            let class = py.import("switchyard.errors")?.getattr(self.class)?;
            Ok(PyErr::from_value(class.call1((self.message.clone(),))?))
        };
        raise().unwrap_or_else(|error| error)
    }
}

/// Not a `switchyard.errors` class: Python's own end of async iteration.
const END_OF_STREAM: &str = "StopAsyncIteration";

impl From<RequestError> for Error {
    fn from(error: RequestError) -> Self {
        Self {
            class: class_of(error.kind()),
            message: error.detail(),
        }
    }
}

/// The `switchyard.errors` class for each kind (kept in step with
/// `KINDS` there; `tests/test_errors.py` checks every kind both ways).
fn class_of(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::NotFound => "NotFound",
        ErrorKind::Overloaded => "Overloaded",
        ErrorKind::Invalid => "InvalidRequest",
        ErrorKind::Cancelled => "Cancelled",
        ErrorKind::ShuttingDown => "EngineShutdown",
        ErrorKind::Engine => "EngineError",
        ErrorKind::Disconnected => "Disconnected",
        ErrorKind::TooLarge => "TooLarge",
        ErrorKind::Unreachable => "Unreachable",
        ErrorKind::Protocol => "ProtocolError",
        ErrorKind::TimedOut => "TimedOut",
        // A kind newer than these bindings: still an error the caller sees.
        _ => "SwitchyardError",
    }
}

/// The kind a Python handler's exception was classified as (its
/// `ErrorKind::label`), with its message. An unknown label is an engine
/// error that names it, not a panic.
pub(crate) fn request_error(label: &str, message: String) -> RequestError {
    let kind = match label {
        "not_found" => ErrorKind::NotFound,
        "overloaded" => ErrorKind::Overloaded,
        "invalid" => ErrorKind::Invalid,
        "cancelled" => ErrorKind::Cancelled,
        "shutting_down" => ErrorKind::ShuttingDown,
        "engine" => ErrorKind::Engine,
        "disconnected" => ErrorKind::Disconnected,
        "too_large" => ErrorKind::TooLarge,
        "unreachable" => ErrorKind::Unreachable,
        "protocol" => ErrorKind::Protocol,
        "timed_out" => ErrorKind::TimedOut,
        other => {
            return RequestError::engine(format!("{message} (raised with the unknown error kind {other:?})"));
        }
    };
    RequestError::new(kind, message)
}

/// `Err(Error)` into a raised exception, on a Python thread.
pub(crate) trait IntoPyResult<T> {
    fn py_err(self, py: Python<'_>) -> PyResult<T>;
}

impl<T> IntoPyResult<T> for Result<T, Error> {
    fn py_err(self, py: Python<'_>) -> PyResult<T> {
        self.map_err(|error| error.into_pyerr(py))
    }
}
