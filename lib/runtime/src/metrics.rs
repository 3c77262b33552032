//! Prometheus metrics, in a hierarchy that mirrors the mesh: the process,
//! then namespace → component → endpoint. Each level adds its label
//! (`dynamo_namespace`, `dynamo_component`, `dynamo_endpoint`; `worker_id`
//! for everything below the process), so a metric created on an endpoint's
//! [`Metrics`] carries all four without the caller naming them.
//!
//! Names keep Dynamo's (`dynamo_component_*`) so existing dashboards work.
//! Each `DistributedRuntime` has its own registry, so tests stay isolated.

use crate::error::ErrorKind;
use prometheus::{Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Prefix of every metric created through the hierarchy (Dynamo's).
pub const COMPONENT_PREFIX: &str = "dynamo_component_";

/// Request durations, in seconds: 5 ms to 10 min, as Dynamo's work handler.
const DURATION_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

/// One level of the metrics hierarchy: a registry plus the labels of that level.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    labels: Vec<(String, String)>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("labels", &self.labels)
            .finish_non_exhaustive()
    }
}

impl Metrics {
    /// The process level (no labels) over `registry`; outside the runtime,
    /// a scope of its own for tests and tools.
    pub fn root(registry: Registry) -> Self {
        Self {
            registry,
            labels: Vec::new(),
        }
    }

    /// The level below this one, adding `label=value` to every metric
    /// created from it.
    pub fn child(&self, label: &str, value: &str) -> Self {
        let mut labels = self.labels.clone();
        labels.push((label.to_string(), value.to_string()));
        Self {
            registry: self.registry.clone(),
            labels,
        }
    }

    pub(crate) fn registry(&self) -> &Registry {
        &self.registry
    }

    /// A counter named `dynamo_component_{name}` with this level's labels.
    pub fn create_counter(&self, name: &str, help: &str) -> Result<IntCounter, MetricsError> {
        let counter = IntCounter::with_opts(self.opts(name, help)?)?;
        self.registry.register(Box::new(counter.clone()))?;
        Ok(counter)
    }

    /// A counter with extra variable labels.
    pub fn create_counter_vec(&self, name: &str, help: &str, labels: &[&str]) -> Result<IntCounterVec, MetricsError> {
        let counter = IntCounterVec::new(self.opts(name, help)?, labels)?;
        self.registry.register(Box::new(counter.clone()))?;
        Ok(counter)
    }

    /// A gauge. Its name must not end in `_total` (Prometheus reserves that for counters).
    pub fn create_gauge(&self, name: &str, help: &str) -> Result<IntGauge, MetricsError> {
        if name.ends_with("_total") {
            return Err(MetricsError::GaugeNamedTotal { name: name.to_string() });
        }
        let gauge = IntGauge::with_opts(self.opts(name, help)?)?;
        self.registry.register(Box::new(gauge.clone()))?;
        Ok(gauge)
    }

    /// Registers a metric built by the caller, for names outside the
    /// `dynamo_component_` family (`dynamo_frontend_*`, an engine's `vllm:*`)
    /// or types the helpers above do not make (vectors by label). This
    /// level's labels are not added.
    pub fn register(&self, collector: Box<dyn prometheus::core::Collector>) -> Result<(), MetricsError> {
        self.registry.register(collector)?;
        Ok(())
    }

    /// A histogram with the given bucket bounds.
    pub fn create_histogram(&self, name: &str, help: &str, buckets: &[f64]) -> Result<Histogram, MetricsError> {
        let opts: HistogramOpts = HistogramOpts::from(self.opts(name, help)?).buckets(buckets.to_vec());
        let histogram = Histogram::with_opts(opts)?;
        self.registry.register(Box::new(histogram.clone()))?;
        Ok(histogram)
    }

    fn opts(&self, name: &str, help: &str) -> Result<Opts, MetricsError> {
        let full = if name.starts_with("dynamo_") {
            name.to_string()
        } else {
            format!("{COMPONENT_PREFIX}{name}")
        };
        let mut opts = Opts::new(full, help);
        for (label, value) in &self.labels {
            opts = opts.const_label(label.clone(), value.clone());
        }
        Ok(opts)
    }
}

/// A metric could not be created.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("gauge {name:?} ends in _total, which Prometheus reserves for counters")]
    GaugeNamedTotal { name: String },
    #[error("invalid or duplicate metric")]
    Prometheus(#[from] prometheus::Error),
}

/// The standard metrics of one served endpoint (Dynamo's names).
#[derive(Debug, Clone)]
pub struct EndpointMetrics {
    pub(crate) requests: IntCounter,
    pub(crate) duration: Histogram,
    pub(crate) inflight: IntGauge,
    pub(crate) request_bytes: IntCounter,
    pub(crate) response_bytes: IntCounter,
    pub(crate) errors: IntCounterVec,
    pub(crate) cancellations: IntCounter,
}

impl EndpointMetrics {
    fn create(scope: &Metrics) -> Result<Self, MetricsError> {
        Ok(Self {
            requests: scope.create_counter("requests_total", "Requests received by this endpoint")?,
            duration: scope.create_histogram(
                "request_duration_seconds",
                "Time from receiving a request until its response stream ended",
                DURATION_BUCKETS,
            )?,
            inflight: scope.create_gauge("inflight_requests", "Requests whose response stream is still open")?,
            request_bytes: scope.create_counter("request_bytes_total", "Bytes of request bodies received")?,
            response_bytes: scope.create_counter("response_bytes_total", "Bytes of response items sent")?,
            errors: scope.create_counter_vec(
                "errors_total",
                "Requests that ended with an error, by error kind",
                &["error_type"],
            )?,
            cancellations: scope.create_counter(
                "cancellation_total",
                "Requests killed before their stream ended (caller kill or drop, or the worker stopping)",
            )?,
        })
    }

    /// Counts one request that ended with `kind`.
    pub(crate) fn error(&self, kind: ErrorKind) {
        self.errors.with_label_values(&[kind.label()]).inc();
    }

    /// Metrics that are not registered anywhere (for tests of the parts that record them).
    #[cfg(test)]
    pub(crate) fn unregistered() -> Self {
        Self::create(&Metrics::root(Registry::new())).expect("fresh registry")
    }
}

/// Counters of the request-plane transport (process level).
#[derive(Debug, Clone)]
pub struct TransportMetrics {
    pub connections: IntCounter,
    pub protocol_errors: IntCounter,
    /// Connections, streams or writes cut off by a limit, by `limit`:
    /// `connections`, `streams`, `send_queue`, `write_timeout`, `handshake`.
    pub limit_refusals: IntCounterVec,
}

impl TransportMetrics {
    /// Counts one refusal by `limit` (one of the labels above).
    pub fn refused(&self, limit: &str) {
        self.limit_refusals.with_label_values(&[limit]).inc();
    }
}

impl TransportMetrics {
    /// Counters registered nowhere, for a transport used on its own.
    pub fn unregistered() -> Self {
        Self {
            connections: IntCounter::new("connections", "unregistered").expect("valid name"),
            protocol_errors: IntCounter::new("protocol_errors", "unregistered").expect("valid name"),
            limit_refusals: IntCounterVec::new(Opts::new("limit_refusals", "unregistered"), &["limit"])
                .expect("valid name"),
        }
    }
}

/// The process's registry and the metric sets made from it, created once per
/// endpoint path so an endpoint served again reuses its series.
#[derive(Clone)]
pub(crate) struct ProcessMetrics {
    root: Metrics,
    worker_id: String,
    endpoints: Arc<Mutex<HashMap<String, EndpointMetrics>>>,
    pub(crate) uptime: Gauge,
    pub(crate) transport: TransportMetrics,
    pub(crate) event_gaps: IntCounter,
    /// ZMQ event-plane peer connections that ended (a peer left, or was cut
    /// off for breaking the protocol, e.g. declaring a frame over the cap).
    pub(crate) event_disconnects: IntCounter,
    /// Instances this process's routers ejected after transport failures.
    pub(crate) router_ejections: IntCounter,
    /// Requests this process's routers re-sent to another instance.
    pub(crate) router_retries: IntCounter,
}

impl std::fmt::Debug for ProcessMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessMetrics")
            .field("worker_id", &self.worker_id)
            .finish_non_exhaustive()
    }
}

impl ProcessMetrics {
    pub(crate) fn new(instance_id: u64) -> Self {
        let root = Metrics::root(Registry::new());
        let uptime = Gauge::new(
            "dynamo_component_uptime_seconds",
            "Seconds since this process's distributed runtime started",
        )
        .expect("valid name");
        root.registry
            .register(Box::new(uptime.clone()))
            .expect("fresh registry");
        let connections = root
            .create_counter(
                "dynamo_request_plane_connections_total",
                "Request-plane connections accepted by this process",
            )
            .expect("fresh registry");
        let protocol_errors = root
            .create_counter(
                "dynamo_request_plane_protocol_errors_total",
                "Request-plane connections closed because the peer broke the wire format",
            )
            .expect("fresh registry");
        let limit_refusals = root
            .create_counter_vec(
                "dynamo_request_plane_limit_refusals_total",
                "Request-plane connections, streams or writes cut off by a limit (label `limit`: connections, streams, send_queue, write_timeout, handshake)",
                &["limit"],
            )
            .expect("fresh registry");
        let event_gaps = root
            .create_counter(
                "dynamo_event_plane_gaps_total",
                "Events known lost: missing sequence numbers seen by this process's subscribers",
            )
            .expect("fresh registry");
        let event_disconnects = root
            .create_counter(
                "dynamo_event_plane_disconnects_total",
                "ZMQ event-plane connections that ended: the peer left, or was cut off for breaking the protocol (a frame over the size cap)",
            )
            .expect("fresh registry");
        let router_ejections = root
            .create_counter(
                "dynamo_router_ejections_total",
                "Instances ejected by this process's routers after a transport failure",
            )
            .expect("fresh registry");
        let router_retries = root
            .create_counter(
                "dynamo_router_retries_total",
                "Requests this process's routers re-sent to another instance before any response item",
            )
            .expect("fresh registry");
        Self {
            root,
            router_ejections,
            router_retries,
            event_gaps,
            event_disconnects,
            worker_id: format!("{instance_id:x}"),
            endpoints: Arc::default(),
            uptime,
            transport: TransportMetrics {
                connections,
                protocol_errors,
                limit_refusals,
            },
        }
    }

    pub(crate) fn root(&self) -> &Metrics {
        &self.root
    }

    /// The scope of one namespace; it and every level below carry `worker_id`.
    pub(crate) fn namespace(&self, namespace: &str) -> Metrics {
        self.root
            .child("dynamo_namespace", namespace)
            .child("worker_id", &self.worker_id)
    }

    /// The standard metrics of `namespace/component/endpoint`, created on first use.
    pub(crate) fn endpoint(&self, scope: &Metrics, path: &str) -> Result<EndpointMetrics, MetricsError> {
        let mut endpoints = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(existing) = endpoints.get(path) {
            return Ok(existing.clone());
        }
        let metrics = EndpointMetrics::create(scope)?;
        endpoints.insert(path.to_string(), metrics.clone());
        Ok(metrics)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::Encoder;

    fn text(registry: &Registry) -> String {
        let mut out = vec![];
        prometheus::TextEncoder::new()
            .encode(&registry.gather(), &mut out)
            .unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn each_level_adds_its_label() {
        let process = ProcessMetrics::new(0xab);
        let endpoint = process
            .namespace("ns")
            .child("dynamo_component", "backend")
            .child("dynamo_endpoint", "generate");
        endpoint.create_counter("tokens_total", "Tokens").unwrap().inc_by(3);
        let text = text(process.root().registry());
        assert!(
            text.contains(
                r#"dynamo_component_tokens_total{dynamo_component="backend",dynamo_endpoint="generate",dynamo_namespace="ns",worker_id="ab"} 3"#
            ),
            "{text}"
        );
    }

    #[test]
    fn gauges_may_not_end_in_total() {
        let root = Metrics::root(Registry::new());
        assert!(matches!(
            root.create_gauge("queue_total", "x"),
            Err(MetricsError::GaugeNamedTotal { .. })
        ));
    }

    #[test]
    fn an_endpoint_served_twice_reuses_its_series() {
        let process = ProcessMetrics::new(1);
        let scope = process.namespace("ns").child("dynamo_endpoint", "e");
        let first = process.endpoint(&scope, "ns/c/e").unwrap();
        first.requests.inc();
        let second = process.endpoint(&scope, "ns/c/e").unwrap();
        assert_eq!(second.requests.get(), 1);
    }
}
