//! Canary health checks: an endpoint registered with a health-check payload
//! is sent that payload through the real request plane — first when it
//! starts, then whenever it has been idle for `DYN_CANARY_WAIT_TIME` — and
//! the **whole** response stream must end within
//! `DYN_HEALTH_CHECK_REQUEST_TIMEOUT`. Dynamo accepts the first chunk, so a
//! stream that stalls after one item stays ready there (dynamo#13675); here it
//! turns the endpoint notready. The next passing check turns it ready again.
//!
//! One task per canaried endpoint, ended when the endpoint drains; a check
//! that times out drops its stream, which kills the request on the worker.

use super::SystemHealth;
use crate::engine::{Context, Controller};
use crate::error::{Report, RequestError};
use crate::instance::Instance;
use crate::request_plane::RequestClient;
use crate::request_plane::handlers::{Activity, CANARY_REQUEST_PREFIX};
use bytes::Bytes;
use futures::StreamExt;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Everything one endpoint's canary needs.
pub(crate) struct Canary {
    pub(crate) instance: Instance,
    pub(crate) payload: Bytes,
    pub(crate) activity: Arc<Activity>,
    pub(crate) health: Arc<SystemHealth>,
    pub(crate) client: Arc<dyn RequestClient>,
    pub(crate) wait: Duration,
    pub(crate) timeout: Duration,
}

impl Canary {
    /// Checks the endpoint until `stop` is cancelled.
    pub(crate) async fn run(self, stop: CancellationToken) {
        let path = self.instance.target().endpoint;
        let mut ready = None;
        loop {
            let result = tokio::select! {
                _ = stop.cancelled() => return,
                result = self.check() => result,
            };
            let now_ready = result.is_ok();
            if ready != Some(now_ready) {
                match &result {
                    Ok(()) => tracing::info!(endpoint = %path, "canary passed: endpoint ready"),
                    Err(reason) => {
                        tracing::warn!(endpoint = %path, reason = %Report(reason), "canary failed: endpoint notready")
                    }
                }
            }
            ready = Some(now_ready);
            // Ignored once the endpoint drains, so a late result cannot turn it ready.
            self.health.canary_result(&path, now_ready);
            // Next check once the endpoint has had neither real traffic nor a
            // canary for `wait`.
            let checked = tokio::time::Instant::now();
            loop {
                let quiet = self.activity.idle_for().min(checked.elapsed());
                if quiet >= self.wait {
                    break;
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(self.wait - quiet) => {}
                }
            }
        }
    }

    /// Sends the payload and reads the whole response stream within the timeout.
    async fn check(&self) -> Result<(), CanaryFailure> {
        let controller = Controller::with_id(format!("{CANARY_REQUEST_PREFIX}{:016x}", rand::random::<u64>()));
        let request = Context::with_controller(self.payload.clone(), controller);
        let whole_stream = async {
            let mut stream = self
                .client
                .call(&self.instance.target(), request)
                .await
                .map_err(CanaryFailure::Request)?;
            while let Some(item) = stream.next().await {
                item.map_err(CanaryFailure::Request)?;
            }
            Ok(())
        };
        match tokio::time::timeout(self.timeout, whole_stream).await {
            Ok(result) => result,
            Err(_) => Err(CanaryFailure::Timeout(self.timeout)),
        }
    }
}

/// Why a canary check failed.
#[derive(Debug, thiserror::Error)]
enum CanaryFailure {
    #[error("the canary request failed")]
    Request(#[source] RequestError),
    #[error("the response stream did not end within {0:?}")]
    Timeout(Duration),
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The canary's idle time is read on tokio's clock, so tests can pause
    /// and advance time instead of sleeping.
    #[tokio::test(start_paused = true)]
    async fn idle_time_follows_the_tokio_clock() {
        let activity = Activity::new();
        tokio::time::advance(Duration::from_secs(30)).await;
        assert!(
            activity.idle_for() >= Duration::from_secs(30),
            "{:?}",
            activity.idle_for()
        );
        activity.touch();
        assert!(
            activity.idle_for() < Duration::from_secs(1),
            "{:?}",
            activity.idle_for()
        );
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(
            activity.idle_for() >= Duration::from_secs(5),
            "{:?}",
            activity.idle_for()
        );
    }
}
