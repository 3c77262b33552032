//! Load per worker over the last minutes, for the mesh page's chart: a task
//! samples every worker's load once a second into a fixed-size ring, so a
//! page opened now still sees the minutes before it.
//!
//! Bounded: [`SAMPLES`] samples of at most [`MAX_WORKERS`] workers each.

use crate::models::ModelManager;
use serde::Serialize;
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use switchyard_runtime::runtime::Runtime;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Time between two samples: the page polls at the same pace.
pub const STEP: Duration = Duration::from_secs(1);
/// Samples kept: five minutes at one a second.
pub const SAMPLES: usize = 300;
/// Workers recorded per sample; a larger fleet is cut (by id) so that a
/// sample stays small. A chart of more lines than this is unreadable anyway.
pub const MAX_WORKERS: usize = 256;

/// Every worker's load at one moment.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Sample {
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// Per worker id (hex): requests in flight from this frontend, or the
    /// worker's own fresh report when that is higher (the router's score).
    pub loads: BTreeMap<String, u64>,
}

/// The ring of samples. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct LoadHistory {
    /// Oldest first. Locked only to push one sample or copy some out.
    samples: Arc<Mutex<VecDeque<Sample>>>,
}

impl LoadHistory {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Sample>> {
        // A push cannot leave the ring half-updated.
        self.samples.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Samples taken after `since_ms` (all of them without it), oldest first.
    pub fn since(&self, since_ms: Option<u64>) -> Vec<Sample> {
        let samples = self.lock();
        let since = since_ms.unwrap_or(0);
        samples.iter().filter(|s| s.at_ms > since).cloned().collect()
    }

    /// Takes one sample of `models` now.
    pub fn sample(&self, models: &ModelManager) {
        let now = Instant::now();
        let mut loads = BTreeMap::new();
        for model in models.list() {
            let occupancy = model.router.occupancy();
            for id in model.router.client().instance_ids() {
                if loads.len() == MAX_WORKERS {
                    break;
                }
                let state = occupancy.state(id, now).unwrap_or_default();
                let load = state.inflight.max(state.reported.unwrap_or(0));
                let entry = loads.entry(format!("{id:x}")).or_insert(0);
                *entry = load.max(*entry);
            }
        }
        let at_ms = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let mut samples = self.lock();
        if samples.len() == SAMPLES {
            samples.pop_front();
        }
        samples.push_back(Sample { at_ms, loads });
    }

    /// Samples `models` every [`STEP`] on `runtime` until `stop`.
    pub fn follow(&self, models: ModelManager, runtime: &Runtime, stop: CancellationToken) {
        let history = self.clone();
        runtime.spawn(async move {
            let mut ticks = tokio::time::interval(STEP);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = ticks.tick() => history.sample(&models),
                }
            }
        });
    }
}
