//! Load reports, the publishing side: each served endpoint publishes how busy
//! it is on its component's `load` topic, so that every router sees the same
//! load instead of each only its own requests (which makes them herd onto the
//! same "least loaded" worker). Routers fold the reports into their occupancy
//! table in [`crate::routing::load`].

use super::Endpoint;
use crate::event_plane::EventError;
use serde::{Deserialize, Serialize};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The topic load reports travel on.
pub const LOAD_TOPIC: &str = "load";

/// A worker publishes at least this often, and within [`REPORT_DEBOUNCE`] of a change.
pub const REPORT_REFRESH: Duration = Duration::from_secs(1);
/// How soon after a change a new report goes out (changes in between are merged).
pub const REPORT_DEBOUNCE: Duration = Duration::from_millis(20);
/// How busy one endpoint of one worker is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoadReport {
    pub instance_id: u64,
    pub endpoint: String,
    /// Requests being worked on.
    pub active: u64,
    /// Of `active`, those waiting inside the engine (0 when the engine does not say).
    pub queued: u64,
    /// KV-cache usage 0–1, for engines that have one.
    pub kv_usage: Option<f32>,
    /// Requests the worker can run at once, when it knows.
    pub capacity: Option<u64>,
}

/// What an engine knows about its own load beyond the requests in flight,
/// given to [`super::endpoint::EndpointBuilder::publish_load_with`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EngineLoad {
    /// Requests waiting inside the engine (admitted by the runtime, not yet running).
    pub queued: u64,
    /// KV-cache usage 0–1.
    pub kv_usage: Option<f32>,
    /// Requests the engine can run at once.
    pub capacity: Option<u64>,
}

/// A cheap, non-blocking reader of an engine's [`EngineLoad`].
pub type LoadSource = std::sync::Arc<dyn Fn() -> EngineLoad + Send + Sync>;

/// Publishes `endpoint`'s load until `stop`: its in-flight count plus what
/// `source` adds, on change (debounced) and every [`REPORT_REFRESH`].
pub(crate) async fn publish(
    endpoint: Endpoint,
    source: Option<LoadSource>,
    stop: CancellationToken,
) -> Result<(), EventError> {
    let publisher = endpoint.parent().event_publisher(LOAD_TOPIC).await?;
    let drt = endpoint.drt().clone();
    let path = endpoint.path();
    drt.runtime().clone().spawn(async move {
        let mut last: Option<LoadReport> = None;
        let mut since_report = Duration::ZERO;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(REPORT_DEBOUNCE) => {}
            }
            since_report += REPORT_DEBOUNCE;
            let engine = source.as_ref().map(|read| read()).unwrap_or_default();
            let report = LoadReport {
                instance_id: drt.instance_id(),
                endpoint: endpoint.name().to_string(),
                active: drt.handlers().inflight(&path) as u64,
                queued: engine.queued,
                kv_usage: engine.kv_usage,
                capacity: engine.capacity,
            };
            if last.as_ref() == Some(&report) && since_report < REPORT_REFRESH {
                continue;
            }
            if let Err(error) = publisher.publish(&report).await {
                tracing::debug!(%error, "cannot publish a load report");
            }
            last = Some(report);
            since_report = Duration::ZERO;
        }
    });
    Ok(())
}
