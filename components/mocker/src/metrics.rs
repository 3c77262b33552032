//! vLLM's own gauge names, so dashboards and scrapers written for vLLM read
//! the mocker too, plus the engine's counters (which tests use to check that
//! a cancel reached the engine).

use prometheus::{IntCounterVec, IntGaugeVec, Opts};
use std::time::Duration;
use switchyard_mocker::engine::MockerEngine;
use switchyard_runtime::metrics::{Metrics, MetricsError};
use tokio_util::sync::CancellationToken;

/// How often the gauges are refreshed even when nothing signals a change.
const REFRESH: Duration = Duration::from_secs(1);

/// The engine's metrics, labelled by `model_name` as vLLM's are.
#[derive(Debug, Clone)]
pub struct EngineMetrics {
    running: IntGaugeVec,
    waiting: IntGaugeVec,
    /// Prometheus has no float gauge vector in `IntGaugeVec`; vLLM exports a fraction.
    kv_usage: prometheus::GaugeVec,
    cancelled: IntCounterVec,
    completed: IntCounterVec,
    /// vLLM's names and unit (tokens), so a benchmark reads the hit rate as it would from vLLM.
    prefix_queries: IntCounterVec,
    prefix_hits: IntCounterVec,
}

impl EngineMetrics {
    pub fn register(scope: &Metrics) -> Result<Self, MetricsError> {
        let labels = &["model_name"];
        let metrics = Self {
            running: IntGaugeVec::new(
                Opts::new("vllm:num_requests_running", "Requests running in the engine"),
                labels,
            )?,
            waiting: IntGaugeVec::new(
                Opts::new("vllm:num_requests_waiting", "Requests queued in the engine"),
                labels,
            )?,
            kv_usage: prometheus::GaugeVec::new(
                Opts::new("vllm:kv_cache_usage_perc", "KV-cache usage, 0 to 1"),
                labels,
            )?,
            cancelled: IntCounterVec::new(
                Opts::new(
                    "switchyard_mocker_cancelled_requests_total",
                    "Requests the engine dropped because their caller went away or stopped them",
                ),
                labels,
            )?,
            completed: IntCounterVec::new(
                Opts::new(
                    "switchyard_mocker_completed_requests_total",
                    "Requests the engine finished",
                ),
                labels,
            )?,
            prefix_queries: IntCounterVec::new(
                Opts::new(
                    "vllm:prefix_cache_queries_total",
                    "Tokens looked up in the prefix cache when a request was admitted",
                ),
                labels,
            )?,
            prefix_hits: IntCounterVec::new(
                Opts::new("vllm:prefix_cache_hits_total", "Tokens found in the prefix cache"),
                labels,
            )?,
        };
        scope.register(Box::new(metrics.running.clone()))?;
        scope.register(Box::new(metrics.waiting.clone()))?;
        scope.register(Box::new(metrics.kv_usage.clone()))?;
        scope.register(Box::new(metrics.cancelled.clone()))?;
        scope.register(Box::new(metrics.completed.clone()))?;
        scope.register(Box::new(metrics.prefix_queries.clone()))?;
        scope.register(Box::new(metrics.prefix_hits.clone()))?;
        Ok(metrics)
    }

    /// Keeps the metrics of `engine` (serving `model`) current until `stop`.
    pub async fn follow(self, engine: MockerEngine, model: String, stop: CancellationToken) {
        // One receiver for the whole loop: a change while the gauges are
        // being set wakes the next wait instead of waiting for REFRESH.
        let mut changes = engine.load_changes();
        loop {
            let load = engine.load();
            let stats = engine.stats();
            let labels = [model.as_str()];
            self.running.with_label_values(&labels).set(load.running as i64);
            self.waiting.with_label_values(&labels).set(load.waiting as i64);
            self.kv_usage.with_label_values(&labels).set(f64::from(load.kv_usage));
            let cancelled = self.cancelled.with_label_values(&labels);
            cancelled.inc_by(stats.cancelled.saturating_sub(cancelled.get()));
            let completed = self.completed.with_label_values(&labels);
            completed.inc_by(stats.completed.saturating_sub(completed.get()));
            let queries = self.prefix_queries.with_label_values(&labels);
            queries.inc_by(stats.prefix_query_tokens.saturating_sub(queries.get()));
            let hits = self.prefix_hits.with_label_values(&labels);
            hits.inc_by(stats.prefix_hit_tokens.saturating_sub(hits.get()));
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = changes.changed() => {}
                _ = tokio::time::sleep(REFRESH) => {}
            }
        }
    }
}
