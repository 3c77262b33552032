//! Load reports, the routing side: a router subscribes to its component's
//! `load` topic and folds the reports into its occupancy table. Workers
//! publish them from [`crate::component::load`].

use super::occupancy::Occupancy;
use crate::component::Component;
use crate::component::load::{LOAD_TOPIC, LoadReport, REPORT_REFRESH};
use crate::event_plane::EventError;
use tokio_util::sync::CancellationToken;

/// A report older than this many refresh periods is ignored.
const STALE_AFTER_REFRESHES: u32 = 3;

/// Feeds `component`'s load reports for `endpoint` into `occupancy` until `stop`.
pub(crate) async fn follow(
    component: &Component,
    endpoint: String,
    occupancy: Occupancy,
    stop: CancellationToken,
) -> Result<(), EventError> {
    let mut reports = component.event_subscriber(LOAD_TOPIC).await?;
    component.drt().runtime().spawn(async move {
        let lifetime = REPORT_REFRESH * STALE_AFTER_REFRESHES;
        // Reports also expire when none arrive at all (the event plane is
        // down): otherwise a stale one would keep its place in the index.
        let mut expiry = tokio::time::interval(REPORT_REFRESH);
        loop {
            let next = tokio::select! {
                _ = stop.cancelled() => return,
                _ = expiry.tick() => {
                    occupancy.expire_reports(tokio::time::Instant::now());
                    continue;
                }
                next = reports.next_typed::<LoadReport>() => next,
            };
            match next {
                None => return,
                Some(Ok((_, report))) if report.endpoint == endpoint => {
                    let now = tokio::time::Instant::now();
                    // `active` counts every request open on the endpoint, including
                    // those queued inside the engine: `queued` is already in it.
                    if !occupancy.report(report.instance_id, report.active, now + lifetime) {
                        tracing::trace!(
                            instance = format!("{:x}", report.instance_id),
                            "load report from an instance not in discovery; dropped"
                        );
                    }
                    occupancy.expire_reports(now);
                }
                Some(Ok(_)) => {}
                Some(Err(error)) => tracing::debug!(%error, "ignoring an unreadable load report"),
            }
        }
    });
    Ok(())
}
