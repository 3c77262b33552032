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
        };
        scope.register(Box::new(metrics.running.clone()))?;
        scope.register(Box::new(metrics.waiting.clone()))?;
        scope.register(Box::new(metrics.kv_usage.clone()))?;
        scope.register(Box::new(metrics.cancelled.clone()))?;
        scope.register(Box::new(metrics.completed.clone()))?;
        Ok(metrics)
    }

    /// Keeps the metrics of `engine` (serving `model`) current until `stop`.
    pub async fn follow(self, engine: MockerEngine, model: String, stop: CancellationToken) {
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
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = engine.load_changed() => {}
                _ = tokio::time::sleep(REFRESH) => {}
            }
        }
    }
}
