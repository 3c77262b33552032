//! The frontend's metrics, under Dynamo's `dynamo_frontend_*` names so
//! existing dashboards read them.

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts};
use switchyard_runtime::metrics::{Metrics, MetricsError};

/// Log-spaced buckets from `min` to `max`, `count` of them, rounded to two
/// significant figures (Dynamo's scheme, so quantiles compare).
fn log_buckets(min: f64, max: f64, count: usize) -> Vec<f64> {
    let step = (max / min).ln() / (count - 1) as f64;
    let mut buckets: Vec<f64> = (0..count)
        .map(|i| {
            let value = min * (step * i as f64).exp();
            let scale = 10f64.powf(value.log10().floor() - 1.0);
            (value / scale).round() * scale
        })
        .collect();
    buckets.dedup_by(|a, b| (*a - *b).abs() < f64::EPSILON);
    buckets
}

/// Everything the HTTP handlers record.
#[derive(Debug, Clone)]
pub struct FrontendMetrics {
    /// Labels: model, endpoint (chat_completions|completions), request_type (stream|unary), status (success|error).
    pub requests: IntCounterVec,
    pub inflight: IntGaugeVec,
    /// From handler entry until the first token (the "HTTP queue").
    pub queued: IntGaugeVec,
    pub ttft: HistogramVec,
    pub itl: HistogramVec,
    pub duration: HistogramVec,
    pub input_tokens: HistogramVec,
    pub output_tokens: HistogramVec,
    /// Labels: model, endpoint. Requests refused with 503 because every worker was busy.
    pub rejections: IntCounterVec,
    /// Labels: model, endpoint, request_type. Requests cancelled by their client.
    pub cancellations: IntCounterVec,
    /// Clients that went away before their response was complete (Dynamo's gauge, only ever rises).
    pub disconnected: IntGauge,
    /// Labels: model, migration_type (new_request|ongoing_request). Requests moved to another worker.
    pub migrations: IntCounterVec,
}

impl FrontendMetrics {
    pub fn register(scope: &Metrics) -> Result<Self, MetricsError> {
        let model = &["model"];
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), model)
        };
        let metrics = Self {
            requests: IntCounterVec::new(
                Opts::new("dynamo_frontend_requests_total", "Requests received, by outcome"),
                &["model", "endpoint", "request_type", "status"],
            )?,
            inflight: IntGaugeVec::new(
                Opts::new(
                    "dynamo_frontend_inflight_requests",
                    "Requests between arrival and the end of their response",
                ),
                model,
            )?,
            queued: IntGaugeVec::new(
                Opts::new(
                    "dynamo_frontend_queued_requests",
                    "Requests that have not produced their first token yet",
                ),
                model,
            )?,
            ttft: histogram(
                "dynamo_frontend_time_to_first_token_seconds",
                "Time from arrival to the first generated token",
                log_buckets(0.001, 480.0, 18),
            )?,
            itl: histogram(
                "dynamo_frontend_inter_token_latency_seconds",
                "Time between consecutive generated tokens",
                log_buckets(0.001, 2.0, 13),
            )?,
            duration: histogram(
                "dynamo_frontend_request_duration_seconds",
                "Time from arrival to the end of the response",
                log_buckets(1.0, 512.0, 10),
            )?,
            input_tokens: histogram(
                "dynamo_frontend_input_sequence_tokens",
                "Prompt length in tokens",
                log_buckets(50.0, 128_000.0, 12),
            )?,
            output_tokens: histogram(
                "dynamo_frontend_output_sequence_tokens",
                "Generated length in tokens",
                log_buckets(50.0, 32_000.0, 10),
            )?,
            rejections: IntCounterVec::new(
                Opts::new(
                    "dynamo_frontend_model_rejection_total",
                    "Requests refused because every worker was busy",
                ),
                &["model", "endpoint"],
            )?,
            cancellations: IntCounterVec::new(
                Opts::new(
                    "dynamo_frontend_model_cancellation_total",
                    "Requests cancelled by their client",
                ),
                &["model", "endpoint", "request_type"],
            )?,
            migrations: IntCounterVec::new(
                Opts::new(
                    "dynamo_frontend_model_migration_total",
                    "Requests moved to another worker after theirs died or left mid-answer",
                ),
                &["model", "migration_type"],
            )?,
            disconnected: IntGauge::new(
                "dynamo_frontend_disconnected_clients",
                "Clients that disconnected before their response was complete",
            )?,
        };
        scope.register(Box::new(metrics.requests.clone()))?;
        scope.register(Box::new(metrics.inflight.clone()))?;
        scope.register(Box::new(metrics.queued.clone()))?;
        scope.register(Box::new(metrics.ttft.clone()))?;
        scope.register(Box::new(metrics.itl.clone()))?;
        scope.register(Box::new(metrics.duration.clone()))?;
        scope.register(Box::new(metrics.input_tokens.clone()))?;
        scope.register(Box::new(metrics.output_tokens.clone()))?;
        scope.register(Box::new(metrics.rejections.clone()))?;
        scope.register(Box::new(metrics.cancellations.clone()))?;
        scope.register(Box::new(metrics.disconnected.clone()))?;
        scope.register(Box::new(metrics.migrations.clone()))?;
        Ok(metrics)
    }
}

#[cfg(test)]
mod tests {
    use super::log_buckets;

    #[test]
    fn buckets_are_log_spaced_and_rounded_to_two_figures() {
        let buckets = log_buckets(1.0, 512.0, 10);
        assert_eq!(buckets.first(), Some(&1.0));
        assert_eq!(buckets.last(), Some(&510.0));
        assert_eq!(buckets.len(), 10);
        assert!(buckets.windows(2).all(|w| w[0] < w[1]));
    }
}
