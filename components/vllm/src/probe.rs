//! What an attached server offers, found out by asking it once before its
//! instance registers, not assumed from the flags: its liveness route, the
//! load gauges of its `/metrics`, whether it takes token-id prompts and
//! reports generated ids, and whether its chat continues an assistant
//! message. The answer goes into the model card ([`EngineFeatures`]), where
//! frontends read how an answer can move to another worker.
//!
//! Every question is bounded by the check timeout; a server that does not
//! answer one is taken not to offer it.

use serde_json::{Value, json};
use std::time::Duration;
use switchyard_llm::model_card::{EngineFeatures, Liveness, LoadGauges};
use switchyard_runtime::component::load::EngineLoad;

/// The token id the token-prompt question sends: any id is a valid prompt,
/// and 1 is within every vocabulary.
const PROBE_TOKEN: u32 = 1;

/// Asks the server at `base_url` what it offers for `model`.
pub async fn discover(http: &reqwest::Client, base_url: &str, model: &str, timeout: Duration) -> EngineFeatures {
    let liveness = match health_status(http, base_url, timeout).await {
        Some(status) if (200..300).contains(&status) => Liveness::Health,
        // No health route (llama-cpp-python answers 404). Its /v1/models
        // would do, but takes the model's lock: with llama-cpp-python's
        // default `interrupt_requests`, every probe that waits for the lock
        // cuts the running answer short. Any answer shows the server is up.
        _ => Liveness::AnyAnswer,
    };
    let metrics = read_metrics(http, base_url, timeout).await.unwrap_or_default();
    let load = gauges_in(&metrics);
    let llama_cpp_python = load == LoadGauges::InFlight && is_llama_cpp_python(http, base_url, timeout).await;
    let server = match load {
        LoadGauges::Vllm => "vllm",
        LoadGauges::Sglang => "sglang",
        LoadGauges::LlamaCpp => "llama.cpp",
        LoadGauges::InFlight if llama_cpp_python => "llama-cpp-python",
        LoadGauges::InFlight => "openai-compatible",
    };
    EngineFeatures {
        server: server.to_string(),
        liveness,
        one_at_a_time: llama_cpp_python,
        load,
        token_ids: takes_token_ids(http, base_url, model, timeout).await,
        // Asked, a server that ignores unknown fields answers 200 and starts
        // a new message: only a server known to implement
        // `continue_final_message` is believed.
        continues_message: matches!(load, LoadGauges::Vllm | LoadGauges::Sglang),
    }
}

/// The status `GET /health` answers with within `timeout`, if any.
async fn health_status(http: &reqwest::Client, base_url: &str, timeout: Duration) -> Option<u16> {
    match tokio::time::timeout(timeout, http.get(format!("{base_url}/health")).send()).await {
        Ok(Ok(response)) => Some(response.status().as_u16()),
        _ => None,
    }
}

/// The server is alive as `liveness` understands it, within `timeout`.
pub async fn alive(http: &reqwest::Client, base_url: &str, liveness: Liveness, timeout: Duration) -> bool {
    match (health_status(http, base_url, timeout).await, liveness) {
        (Some(status), Liveness::Health) => (200..300).contains(&status),
        (Some(status), Liveness::AnyAnswer) => status < 500,
        (None, _) => false,
    }
}

/// llama-cpp-python's server: its OpenAPI document (FastAPI's, which takes
/// no model lock) lists the `/extras/tokenize` route that only it has.
async fn is_llama_cpp_python(http: &reqwest::Client, base_url: &str, timeout: Duration) -> bool {
    let read = async {
        let response = http.get(format!("{base_url}/openapi.json")).send().await.ok()?;
        response.status().is_success().then_some(())?;
        response.text().await.ok()
    };
    tokio::time::timeout(timeout, read)
        .await
        .ok()
        .flatten()
        .is_some_and(|doc| doc.contains("\"/extras/tokenize\""))
}

/// The server's `/metrics` text, when it has one.
pub async fn read_metrics(http: &reqwest::Client, base_url: &str, timeout: Duration) -> Option<String> {
    let read = async {
        let response = http.get(format!("{base_url}/metrics")).send().await.ok()?;
        if !response.status().is_success() {
            return None;
        }
        response.text().await.ok()
    };
    tokio::time::timeout(timeout, read).await.ok().flatten()
}

/// Whose gauges a `/metrics` text carries.
pub fn gauges_in(metrics: &str) -> LoadGauges {
    let has = |prefix: &str| metrics.lines().any(|line| line.starts_with(prefix));
    if has("vllm:") {
        LoadGauges::Vllm
    } else if has("sglang:") {
        LoadGauges::Sglang
    } else if has("llamacpp:") {
        LoadGauges::LlamaCpp
    } else {
        LoadGauges::InFlight
    }
}

/// The gauges of `gauges` in a `/metrics` text, summed over their label
/// sets (one per engine or model), as an instance's load.
pub fn load_from(metrics: &str, gauges: LoadGauges) -> EngineLoad {
    let sum = |name: &str| -> Option<f64> {
        let values: Vec<f64> = metrics
            .lines()
            .filter(|line| !line.starts_with('#'))
            .filter(|line| line.starts_with(name) && matches!(line.as_bytes().get(name.len()), Some(b'{' | b' ')))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .collect();
        (!values.is_empty()).then(|| values.iter().sum())
    };
    let (queued, kv) = match gauges {
        LoadGauges::Vllm => (
            sum("vllm:num_requests_waiting"),
            // Versions before 0.10 name the KV gauge after the GPU.
            sum("vllm:kv_cache_usage_perc").or_else(|| sum("vllm:gpu_cache_usage_perc")),
        ),
        LoadGauges::Sglang => (sum("sglang:num_queue_reqs"), sum("sglang:token_usage")),
        LoadGauges::LlamaCpp => (sum("llamacpp:requests_deferred"), sum("llamacpp:kv_cache_usage_ratio")),
        LoadGauges::InFlight => (None, None),
    };
    EngineLoad {
        queued: queued.unwrap_or(0.0) as u64,
        kv_usage: kv.map(|v| v as f32),
        capacity: None,
    }
}

/// Whether `/v1/completions` takes a prompt of token ids and reports the
/// ids it generated (vLLM's `return_token_ids`): one token is generated.
async fn takes_token_ids(http: &reqwest::Client, base_url: &str, model: &str, timeout: Duration) -> bool {
    let body = json!({
        "model": model,
        "prompt": [PROBE_TOKEN],
        "max_tokens": 1,
        "temperature": 0,
        "return_token_ids": true,
    });
    let ask = async {
        let response = http
            .post(format!("{base_url}/v1/completions"))
            .json(&body)
            .send()
            .await
            .ok()?;
        if !response.status().is_success() {
            return None;
        }
        response.json::<Value>().await.ok()
    };
    match tokio::time::timeout(timeout, ask).await {
        Ok(Some(answer)) => reports_token_ids(&answer),
        _ => false,
    }
}

/// A completion answer that lists the generated tokens' ids.
fn reports_token_ids(answer: &Value) -> bool {
    answer["choices"][0]["token_ids"]
        .as_array()
        .is_some_and(|ids| !ids.is_empty() && ids.iter().all(Value::is_u64))
}

/// One line for the attach log: how an answer cut off on this engine can
/// continue elsewhere.
pub fn migration_summary(features: &EngineFeatures) -> &'static str {
    match (features.token_ids, features.continues_message) {
        (true, _) => "mid-answer migration continues from token ids",
        (false, true) => "mid-answer migration continues chats as an assistant message; completions end with an error",
        (false, false) => {
            "mid-answer migration is off (no token-id prompts, no assistant-message continuation): a request cut off mid-answer ends with an error"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_engines_gauges_are_recognised_and_summed_over_their_label_sets() {
        let vllm = "# HELP vllm:num_requests_waiting x\n\
                    vllm:num_requests_waiting{engine=\"0\",model_name=\"m\"} 3.0\n\
                    vllm:num_requests_waiting{engine=\"1\",model_name=\"m\"} 2\n\
                    vllm:num_requests_waiting_total 99\n\
                    vllm:kv_cache_usage_perc{model_name=\"m\"} 0.25\n";
        assert_eq!(gauges_in(vllm), LoadGauges::Vllm);
        let load = load_from(vllm, LoadGauges::Vllm);
        assert_eq!((load.queued, load.kv_usage), (5, Some(0.25)));

        let sglang = "sglang:num_queue_reqs{model_name=\"m\"} 4\nsglang:token_usage{model_name=\"m\"} 0.5\n";
        assert_eq!(gauges_in(sglang), LoadGauges::Sglang);
        let load = load_from(sglang, LoadGauges::Sglang);
        assert_eq!((load.queued, load.kv_usage), (4, Some(0.5)));

        let llama = "# TYPE llamacpp:requests_deferred gauge\nllamacpp:requests_deferred 1\nllamacpp:kv_cache_usage_ratio 0.125\n";
        assert_eq!(gauges_in(llama), LoadGauges::LlamaCpp);
        let load = load_from(llama, LoadGauges::LlamaCpp);
        assert_eq!((load.queued, load.kv_usage), (1, Some(0.125)));

        assert_eq!(gauges_in(""), LoadGauges::InFlight);
        assert_eq!(gauges_in("process_cpu_seconds_total 3\n"), LoadGauges::InFlight);
        assert_eq!(load_from(vllm, LoadGauges::InFlight), EngineLoad::default());
    }

    #[test]
    fn only_an_answer_listing_generated_ids_counts_as_taking_token_ids() {
        assert!(reports_token_ids(&json!({"choices":[{"text":" a","token_ids":[264]}]})));
        assert!(!reports_token_ids(&json!({"choices":[{"text":" a"}]})));
        assert!(!reports_token_ids(&json!({"choices":[{"token_ids":["a"]}]})));
        assert!(!reports_token_ids(
            &json!({"detail":"prompt: Input should be a valid string"})
        ));
    }
}
