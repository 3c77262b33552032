//! The last routing decisions, kept so that "which worker served my request,
//! and why?" can be answered after the fact by request id. A fixed-size ring:
//! memory stays bounded whatever the traffic, and old decisions fall out.

use serde::Serialize;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

/// Decisions kept. At 100 requests a second that is the last ten seconds;
/// enough for the page and for looking up a request a client just saw go
/// wrong, small enough (a few hundred bytes each) to never matter.
pub const CAPACITY: usize = 1024;

/// Why one request went to one worker.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    /// The `x-request-id` the response carried (the client's, or a new one).
    pub request_id: String,
    pub model: String,
    /// When it was routed, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// The router mode that chose (`kv`, `least_loaded`, ...).
    pub mode: &'static str,
    /// The chosen worker's instance id, hex (as in discovery keys).
    pub worker: String,
    /// 0 when the request was first routed; n when this choice moved it
    /// for the n-th time, after its worker failed mid-answer.
    #[serde(skip_serializing_if = "is_zero")]
    pub migration: u32,
    /// One line, `key=value;...`: in KV mode the `x-switchyard-route` header.
    pub explanation: String,
    /// KV mode: blocks of the prompt, and where the index came from
    /// (`events`, or `approximate` from what this router sent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blocks: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<&'static str>,
    /// KV mode: leading prompt blocks the chosen worker held, and its cost.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub overlap: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost: Option<f64>,
    /// Load-based modes: the chosen worker's load just after the choice
    /// (this request included).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load: Option<u64>,
    /// The best worker not chosen, when there was another.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runner_up: Option<RunnerUp>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// The best other worker of a decision, in the same terms as the chosen one.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunnerUp {
    pub worker: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub overlap: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load: Option<u64>,
}

/// The ring of recent decisions, shared by the handlers. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Decisions {
    /// Newest at the back. A plain mutex: each push or read holds it for a
    /// copy at most, never across an await.
    ring: Arc<Mutex<VecDeque<Decision>>>,
    capacity: usize,
}

impl Default for Decisions {
    fn default() -> Self {
        Self::with_capacity(CAPACITY)
    }
}

impl Decisions {
    /// A ring keeping the last `capacity` decisions; 0 keeps none (the
    /// page is off, so nobody could read them).
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            ring: Arc::new(Mutex::new(VecDeque::with_capacity(capacity))),
            capacity,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Decision>> {
        // A push or a read cannot leave the ring half-updated.
        self.ring.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// False when this ring keeps nothing, so callers can skip building
    /// decisions.
    pub fn is_kept(&self) -> bool {
        self.capacity > 0
    }

    /// Keeps `decision`, forgetting the oldest when full.
    pub fn record(&self, decision: Decision) {
        if !self.is_kept() {
            return;
        }
        let mut ring = self.lock();
        if ring.len() == self.capacity {
            ring.pop_front();
        }
        ring.push_back(decision);
    }

    /// The newest decision for `request_id`: after a migration, the choice
    /// that moved it. Clients choose their ids, so several requests may
    /// share one: the latest wins.
    pub fn find(&self, request_id: &str) -> Option<Decision> {
        self.lock().iter().rev().find(|d| d.request_id == request_id).cloned()
    }

    /// Up to `count` decisions, newest first.
    pub fn recent(&self, count: usize) -> Vec<Decision> {
        self.lock().iter().rev().take(count).cloned().collect()
    }

    /// Every decision kept, oldest first (for per-worker summaries).
    pub fn all(&self) -> Vec<Decision> {
        self.lock().iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decision(request_id: &str, worker: &str) -> Decision {
        Decision {
            request_id: request_id.into(),
            model: "m".into(),
            at_ms: 0,
            mode: "round_robin",
            worker: worker.into(),
            migration: 0,
            explanation: String::new(),
            blocks: None,
            index: None,
            overlap: None,
            cost: None,
            load: None,
            runner_up: None,
        }
    }

    #[test]
    fn the_ring_keeps_only_the_newest_and_finds_the_latest_of_a_shared_id() {
        let ring = Decisions::with_capacity(3);
        for (id, worker) in [("a", "1"), ("b", "2"), ("a", "3"), ("c", "4"), ("d", "5")] {
            ring.record(decision(id, worker));
        }
        let kept: Vec<String> = ring.all().into_iter().map(|d| d.worker).collect();
        assert_eq!(kept, ["3", "4", "5"], "the oldest two fell out");
        assert_eq!(ring.find("a").map(|d| d.worker).as_deref(), Some("3"));
        assert_eq!(ring.find("b"), None, "gone with the oldest");
        let newest: Vec<String> = ring.recent(2).into_iter().map(|d| d.request_id).collect();
        assert_eq!(newest, ["d", "c"]);

        let off = Decisions::with_capacity(0);
        off.record(decision("a", "1"));
        assert_eq!(off.find("a"), None, "a ring of 0 keeps nothing");
    }
}
