//! The frontend's one error type and its OpenAI-shaped response:
//! `{"error":{"message","type","param","code"}}` with the matching status.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use switchyard_llm::openai::{ErrorBody, ErrorResponse, InvalidRequest};
use switchyard_runtime::error::{ErrorKind, RequestError};

/// Seconds a client told "all workers busy" should wait before retrying.
const RETRY_AFTER_SECS: u64 = 1;

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
}

impl ApiError {
    pub fn invalid(error: InvalidRequest) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: error.message,
            kind: "invalid_request_error",
            param: error.field,
            code: "invalid_request",
        }
    }

    pub fn model_not_found(model: &str, known: &[String]) -> Self {
        let known = if known.is_empty() {
            "no model is being served right now".to_string()
        } else {
            format!("models served: {}", known.join(", "))
        };
        Self {
            status: StatusCode::NOT_FOUND,
            message: format!("the model {model:?} does not exist; {known}"),
            kind: "invalid_request_error",
            param: Some("model".into()),
            code: "model_not_found",
        }
    }

    pub fn wrong_route(model: &str, route: &str) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: format!("the model {model:?} is not served on {route}"),
            kind: "invalid_request_error",
            param: Some("model".into()),
            code: "model_not_found",
        }
    }

    pub fn too_large(limit: usize) -> Self {
        Self {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            message: format!("the request body is larger than the limit of {limit} bytes"),
            kind: "invalid_request_error",
            param: None,
            code: "request_too_large",
        }
    }

    pub fn request_timeout(deadline: std::time::Duration) -> Self {
        Self {
            status: StatusCode::REQUEST_TIMEOUT,
            message: format!("the request body did not arrive within {deadline:?} (--http-idle-timeout-secs)"),
            kind: "invalid_request_error",
            param: None,
            code: "request_timeout",
        }
    }

    pub fn unsupported_media_type() -> Self {
        Self {
            status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
            message: "the request body must be JSON (Content-Type: application/json)".into(),
            kind: "invalid_request_error",
            param: None,
            code: "unsupported_media_type",
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
            ErrorKind::Cancelled => (
                StatusCode::from_u16(499).expect("valid status"),
                "cancelled",
                "cancelled",
            ),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "server_error", "internal_error"),
        };
        let message = match error.kind() {
            ErrorKind::Overloaded => format!("all workers of model {model:?} are busy; retry later"),
            ErrorKind::NotFound | ErrorKind::Unreachable | ErrorKind::ShuttingDown => {
                format!(
                    "no worker of model {model:?} could take the request: {}",
                    error.detail()
                )
            }
            _ => error.detail(),
        };
        Self {
            status,
            message,
            kind,
            param: None,
            code,
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
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
        }
        response
    }
}
