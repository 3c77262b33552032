//! The frontend's one error type and its OpenAI-shaped response:
//! `{"error":{"message","type","param","code"}}` with the matching status.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use switchyard_llm::openai::{ErrorBody, ErrorResponse, InvalidRequest};
use switchyard_runtime::error::{ErrorKind, Report, RequestError};

/// Seconds a client told "all workers busy" should wait before retrying.
const RETRY_AFTER_SECS: u64 = 1;

/// Marks a [`RequestError`] whose message the frontend itself wrote for the
/// client (it names no worker or address): [`ApiError::from_request`]
/// passes such a message on as it is, whatever the error's kind.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("written for the client")]
pub struct ForClient;

/// An error of `kind` whose `message` is meant for the client as it is.
pub fn for_client(kind: ErrorKind, message: String) -> RequestError {
    RequestError::new(kind, message).with_source(ForClient)
}

/// A request the frontend answers with an error status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status}: {message}")]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// OpenAI's `type` (`invalid_request_error`, …).
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: &'static str,
    /// Seconds for the `Retry-After` header of a 429 or 503 (1 when unset).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn invalid(error: InvalidRequest) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: error.message,
            kind: "invalid_request_error",
            param: error.field,
            code: "invalid_request",
            retry_after: None,
        }
    }

    /// Names the model asked for, not the ones served: a caller sees those
    /// with `GET /v1/models`, which the API key (if any) guards.
    pub fn model_not_found(model: &str) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: format!("the model {model:?} does not exist; GET /v1/models lists the models served"),
            kind: "invalid_request_error",
            param: Some("model".into()),
            code: "model_not_found",
            retry_after: None,
        }
    }

    pub fn wrong_route(model: &str, route: &str) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: format!("the model {model:?} is not served on {route}"),
            kind: "invalid_request_error",
            param: Some("model".into()),
            code: "model_not_found",
            retry_after: None,
        }
    }

    pub fn too_large(limit: usize) -> Self {
        Self {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            message: format!("the request body is larger than the limit of {limit} bytes"),
            kind: "invalid_request_error",
            param: None,
            code: "request_too_large",
            retry_after: None,
        }
    }

    pub fn request_timeout(deadline: std::time::Duration) -> Self {
        Self {
            status: StatusCode::REQUEST_TIMEOUT,
            message: format!("the request body did not arrive within {deadline:?} (--http-idle-timeout-secs)"),
            kind: "invalid_request_error",
            param: None,
            code: "request_timeout",
            retry_after: None,
        }
    }

    pub fn unsupported_media_type() -> Self {
        Self {
            status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
            message: "the request body must be JSON (Content-Type: application/json)".into(),
            kind: "invalid_request_error",
            param: None,
            code: "unsupported_media_type",
            retry_after: None,
        }
    }

    /// OpenAI's answer to a missing or wrong API key.
    pub fn unauthorized(message: &str) -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            message: message.to_string(),
            kind: "invalid_request_error",
            param: None,
            code: "invalid_api_key",
            retry_after: None,
        }
    }

    /// `/metrics` on the OpenAI port is turned off (`--http-metrics off`).
    pub fn not_found(message: &str) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: message.to_string(),
            kind: "invalid_request_error",
            param: None,
            code: "not_found",
            retry_after: None,
        }
    }

    /// The frontend is full: `why` says which limit, `retry_after` when to
    /// come back.
    pub fn overloaded(why: String, retry_after: u64) -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: why,
            kind: "server_error",
            param: None,
            code: "overloaded",
            retry_after: Some(retry_after),
        }
    }

    /// The caller's key used up its share (`--rate-limit-*`).
    pub fn rate_limited(why: String, retry_after: u64) -> Self {
        Self {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: why,
            kind: "rate_limit_error",
            param: None,
            code: "rate_limit_exceeded",
            retry_after: Some(retry_after),
        }
    }

    /// The status a routing or worker error maps to.
    pub fn from_request(model: &str, error: &RequestError) -> Self {
        let (status, kind, code) = match error.kind() {
            ErrorKind::Overloaded => (StatusCode::SERVICE_UNAVAILABLE, "server_error", "overloaded"),
            ErrorKind::NotFound | ErrorKind::Unreachable | ErrorKind::ShuttingDown => {
                (StatusCode::SERVICE_UNAVAILABLE, "server_error", "no_worker_available")
            }
            ErrorKind::Invalid | ErrorKind::TooLarge => {
                (StatusCode::BAD_REQUEST, "invalid_request_error", "invalid_request")
            }
            ErrorKind::TimedOut => (StatusCode::GATEWAY_TIMEOUT, "server_error", "timeout"),
            ErrorKind::Cancelled => (
                StatusCode::from_u16(499).expect("valid status"),
                "cancelled",
                "cancelled",
            ),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "server_error", "internal_error"),
        };
        // Only what the client's own request did wrong is passed on word for
        // word; the rest can carry worker addresses or engine internals, so
        // it goes to the log and the client gets the kind of failure.
        let written_for_client = std::error::Error::source(error).is_some_and(|source| source.is::<ForClient>());
        let message = match error.kind() {
            _ if written_for_client => error.message().to_string(),
            // A deadline's message names the deadline and its flag.
            ErrorKind::Invalid | ErrorKind::TooLarge | ErrorKind::Cancelled | ErrorKind::TimedOut => error.detail(),
            ErrorKind::Overloaded => format!("all workers of model {model:?} are busy; retry later"),
            ErrorKind::NotFound | ErrorKind::Unreachable | ErrorKind::ShuttingDown => {
                format!("no worker of model {model:?} could take the request; retry later")
            }
            ErrorKind::Disconnected => format!("the worker serving model {model:?} was lost mid-answer"),
            _ => {
                format!("the worker serving model {model:?} failed; the frontend's log has the details")
            }
        };
        if !written_for_client
            && !matches!(
                error.kind(),
                ErrorKind::Invalid | ErrorKind::TooLarge | ErrorKind::Cancelled | ErrorKind::Overloaded
            )
        {
            tracing::warn!(model, error = %Report(error), "request failed");
        }
        Self {
            status,
            message,
            kind,
            param: None,
            code,
            retry_after: None,
        }
    }

    pub fn body(&self) -> ErrorResponse {
        ErrorResponse {
            error: ErrorBody {
                message: self.message.clone(),
                kind: self.kind.to_string(),
                param: self.param.clone(),
                code: Some(self.code.to_string()),
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        let headers = response.headers_mut();
        if matches!(
            self.status,
            StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS
        ) {
            let seconds = self.retry_after.unwrap_or(RETRY_AFTER_SECS);
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}
