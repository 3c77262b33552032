//! Before registering: does this vLLM server answer, and does it serve the
//! model we were asked to serve? Each check is bounded in time and its
//! failure names the URL and what the server said.

use serde::Deserialize;
use std::time::Duration;
use switchyard_runtime::error::Report;

/// What a vLLM server says about the model, from `GET /v1/models`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServedModel {
    pub name: String,
    /// `max_model_len`, when the server reports it.
    pub context_length: Option<u32>,
}

#[derive(Debug, Deserialize)]
struct ModelList {
    data: Vec<ModelEntry>,
}

#[derive(Debug, Deserialize)]
struct ModelEntry {
    id: String,
    #[serde(default)]
    max_model_len: Option<u32>,
}

/// Why a vLLM server cannot be attached.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckError {
    #[error("vLLM at {url} did not answer GET /v1/models within {timeout:?}: {reason}")]
    Unreachable {
        url: String,
        timeout: Duration,
        reason: String,
    },
    #[error("vLLM at {url} answered GET /v1/models with {status}: {body}")]
    Status { url: String, status: u16, body: String },
    #[error("vLLM at {url} answered GET /v1/models with something that is not a model list: {reason}")]
    NotAModelList { url: String, reason: String },
    #[error("vLLM at {url} does not serve model {wanted:?}; it serves: {served}")]
    WrongModel {
        url: String,
        wanted: String,
        served: String,
    },
}

/// Checks that `base_url` lists `model` in `GET /v1/models`, within `timeout`.
pub async fn check_model(
    http: &reqwest::Client,
    base_url: &str,
    model: &str,
    timeout: Duration,
) -> Result<ServedModel, CheckError> {
    let url = format!("{base_url}/v1/models");
    let unreachable = |reason: String| CheckError::Unreachable {
        url: base_url.to_string(),
        timeout,
        reason,
    };
    let response = tokio::time::timeout(timeout, http.get(&url).send())
        .await
        .map_err(|_| unreachable("timed out".into()))?
        .map_err(|e| unreachable(Report(&e).to_string()))?;
    let status = response.status();
    let body = tokio::time::timeout(timeout, response.text())
        .await
        .map_err(|_| unreachable("timed out reading the answer".into()))?
        .map_err(|e| unreachable(Report(&e).to_string()))?;
    if !status.is_success() {
        return Err(CheckError::Status {
            url: base_url.to_string(),
            status: status.as_u16(),
            body: snippet(&body),
        });
    }
    let list: ModelList = serde_json::from_str(&body).map_err(|e| CheckError::NotAModelList {
        url: base_url.to_string(),
        reason: format!("{e}; body: {}", snippet(&body)),
    })?;
    match list.data.iter().find(|entry| entry.id == model) {
        Some(entry) => Ok(ServedModel {
            name: entry.id.clone(),
            context_length: entry.max_model_len,
        }),
        None => {
            let served: Vec<&str> = list.data.iter().map(|e| e.id.as_str()).collect();
            Err(CheckError::WrongModel {
                url: base_url.to_string(),
                wanted: model.to_string(),
                served: if served.is_empty() {
                    "no model".to_string()
                } else {
                    served.join(", ")
                },
            })
        }
    }
}

/// The first 200 characters of a body, for error messages.
pub fn snippet(body: &str) -> String {
    let trimmed = body.trim();
    match trimmed.char_indices().nth(200) {
        Some((cut, _)) => format!("{}…", &trimmed[..cut]),
        None => trimmed.to_string(),
    }
}
