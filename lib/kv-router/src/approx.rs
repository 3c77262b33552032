//! What the router itself sent where, remembered for a while: the index of
//! engines that publish no KV events (entries live [`APPROXIMATE_TTL`]), and
//! the predict-on-route side index (entries live [`PREDICTED_TTL`]) that
//! covers the gap between routing a request and its engine's first
//! `BlockStored`, so sibling requests arriving in that gap still go to the
//! same worker. Score with `primary.max(&side)` (see [`Overlaps::max`]).
//!
//! Keyed by [`SequenceHash`] (position-aware), so a flat map answers prefix
//! questions. Time is passed in; this module must not read a clock.

use crate::hash::SequenceHash;
use crate::overlap::Overlaps;
use crate::worker::WorkerId;
use std::collections::{HashMap, VecDeque};
use std::time::Duration;
use tokio::time::Instant;

/// How long a routed prefix is assumed cached when the engine says nothing:
/// Dynamo's value, about how long a busy vLLM keeps an unused prefix.
pub const APPROXIMATE_TTL: Duration = Duration::from_secs(120);

/// How long a prediction stands in for the engine's events: long enough for
/// a prefill to finish and its `BlockStored` to arrive, short enough that a
/// wrong guess (the engine evicted or never stored) fades quickly.
pub const PREDICTED_TTL: Duration = Duration::from_secs(5);

/// Most (prefix block, worker) records an index keeps, expired or not: at
/// about 130 bytes each, 130 MB at worst. The routing rate times the TTL
/// stays far below it in normal use (48 requests/s of 116 blocks for 120 s
/// is 0.67 M); past it, the oldest records are forgotten early.
pub const MAX_RECORDS: usize = 1_000_000;

/// Prefixes routed to workers, each forgotten `ttl` after it was last recorded.
/// Memory is bounded by the routing rate times the TTL, and never above
/// [`MAX_RECORDS`] records; [`TtlIndex::record`] drops what expired.
#[derive(Debug)]
pub struct TtlIndex {
    ttl: Duration,
    max_records: usize,
    /// Per prefix, who was sent it and until when it counts.
    entries: HashMap<SequenceHash, Vec<(WorkerId, Instant)>>,
    /// Expiry times in recording order, which is expiry order because the
    /// TTL is fixed and time does not go backwards. An item whose entry was
    /// recorded again later is stale and skipped.
    expiries: VecDeque<(Instant, SequenceHash, WorkerId)>,
}

impl TtlIndex {
    pub fn new(ttl: Duration) -> Self {
        Self::with_max_records(ttl, MAX_RECORDS)
    }

    /// An index that keeps at most `max_records` records (at least one).
    pub fn with_max_records(ttl: Duration, max_records: usize) -> Self {
        TtlIndex {
            ttl,
            max_records: max_records.max(1),
            entries: HashMap::new(),
            expiries: VecDeque::new(),
        }
    }

    /// The index of engines without events ([`APPROXIMATE_TTL`]).
    pub fn approximate() -> Self {
        Self::new(APPROXIMATE_TTL)
    }

    /// The predict-on-route side index ([`PREDICTED_TTL`]).
    pub fn predicted() -> Self {
        Self::new(PREDICTED_TTL)
    }

    /// Records that the request with prefix `blocks` went to `worker` at
    /// `now`. `now` must not go backwards between calls.
    pub fn record(&mut self, worker: WorkerId, blocks: &[SequenceHash], now: Instant) {
        self.purge(now);
        let until = now + self.ttl;
        for block in blocks {
            let holders = self.entries.entry(*block).or_default();
            match holders.iter_mut().find(|(w, _)| *w == worker) {
                Some(entry) => entry.1 = until,
                None => holders.push((worker, until)),
            }
            self.expiries.push_back((until, *block, worker));
        }
        while self.expiries.len() > self.max_records {
            // The oldest record goes early, unless it was recorded again since.
            let Some((until, block, worker)) = self.expiries.pop_front() else {
                break;
            };
            self.forget(block, worker, |u| u == until);
        }
    }

    /// Removes `worker`'s entry for `block` when its expiry passes `matches`.
    fn forget(&mut self, block: SequenceHash, worker: WorkerId, matches: impl Fn(Instant) -> bool) {
        if let Some(holders) = self.entries.get_mut(&block) {
            holders.retain(|(w, u)| !(*w == worker && matches(*u)));
            if holders.is_empty() {
                self.entries.remove(&block);
            }
        }
    }

    /// Per worker, how many leading blocks of `request` it was sent within
    /// the TTL, contiguously from the first.
    pub fn find_matches(&self, request: &[SequenceHash], now: Instant) -> Overlaps {
        let live = |block: &SequenceHash| {
            self.entries
                .get(block)
                .into_iter()
                .flatten()
                .filter(move |(_, until)| *until > now)
                .map(|(w, _)| *w)
        };
        let Some(first) = request.first() else {
            return Overlaps::default();
        };
        let mut active: Vec<WorkerId> = live(first).collect();
        let mut scores = Vec::new();
        for (depth, block) in request.iter().enumerate().skip(1) {
            if active.is_empty() {
                break;
            }
            let holders: Vec<WorkerId> = live(block).collect();
            active.retain(|w| {
                let kept = holders.contains(w);
                if !kept {
                    scores.push((*w, depth as u32));
                }
                kept
            });
        }
        scores.extend(active.into_iter().map(|w| (w, request.len() as u32)));
        Overlaps::from_pairs(scores)
    }

    /// Drops what expired by `now`.
    pub fn purge(&mut self, now: Instant) {
        while let Some((until, block, worker)) = self.expiries.front().copied() {
            if until > now {
                break;
            }
            self.expiries.pop_front();
            self.forget(block, worker, |u| u <= now);
        }
    }

    /// Forgets `worker` (it left the fleet). O(entries).
    pub fn remove_worker(&mut self, worker: WorkerId) {
        self.entries.retain(|_, holders| {
            holders.retain(|(w, _)| *w != worker);
            !holders.is_empty()
        });
    }

    /// (prefix, worker) pairs held, expired ones not yet purged included.
    pub fn len(&self) -> usize {
        self.entries.values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::{BlockHasher, sequence_hashes};

    fn blocks(tokens: &[u32]) -> Vec<SequenceHash> {
        sequence_hashes(&BlockHasher::new(2, None).unwrap().local_hashes(tokens))
    }

    fn w(id: u64) -> WorkerId {
        WorkerId::from(id)
    }

    #[test]
    fn a_routed_prefix_matches_until_its_ttl_passes() {
        let t0 = Instant::now();
        let mut index = TtlIndex::approximate();
        index.record(w(1), &blocks(&[1, 2, 3, 4, 5, 6]), t0);
        let request = blocks(&[1, 2, 3, 4, 9, 9]);
        assert_eq!(index.find_matches(&request, t0 + Duration::from_secs(119)).get(w(1)), 2);
        assert_eq!(index.find_matches(&request, t0 + APPROXIMATE_TTL).get(w(1)), 0);
        index.purge(t0 + APPROXIMATE_TTL);
        assert!(index.is_empty());
    }

    #[test]
    fn recording_again_extends_the_ttl() {
        let t0 = Instant::now();
        let mut index = TtlIndex::predicted();
        let prefix = blocks(&[1, 2, 3, 4]);
        index.record(w(1), &prefix, t0);
        index.record(w(1), &prefix, t0 + Duration::from_secs(4));
        index.purge(t0 + Duration::from_secs(6));
        assert_eq!(index.find_matches(&prefix, t0 + Duration::from_secs(6)).get(w(1)), 2);
        assert_eq!(index.len(), 2);
    }

    #[test]
    fn the_same_tokens_at_another_position_do_not_match() {
        let t0 = Instant::now();
        let mut index = TtlIndex::approximate();
        index.record(w(1), &blocks(&[7, 7, 1, 2]), t0);
        assert_eq!(index.find_matches(&blocks(&[1, 2]), t0).get(w(1)), 0);
    }

    #[test]
    fn predictions_top_up_the_primary_index_per_worker() {
        let t0 = Instant::now();
        let mut primary = TtlIndex::approximate();
        let mut side = TtlIndex::predicted();
        let request = blocks(&[1, 2, 3, 4, 5, 6]);
        primary.record(w(1), &request[..1], t0);
        primary.record(w(2), &request, t0);
        side.record(w(1), &request, t0);
        let scored = primary.find_matches(&request, t0).max(&side.find_matches(&request, t0));
        assert_eq!((scored.get(w(1)), scored.get(w(2))), (3, 3));
        let later = t0 + Duration::from_secs(10);
        let scored = primary
            .find_matches(&request, later)
            .max(&side.find_matches(&request, later));
        assert_eq!(scored.get(w(1)), 1, "the prediction expired");
    }

    #[test]
    fn past_its_record_cap_the_index_forgets_the_oldest_first() {
        let t0 = Instant::now();
        let mut index = TtlIndex::with_max_records(APPROXIMATE_TTL, 4);
        let old = blocks(&[1, 2, 3, 4]);
        let new = blocks(&[5, 6, 7, 8]);
        index.record(w(1), &old, t0);
        index.record(w(2), &new, t0 + Duration::from_secs(1));
        let later = t0 + Duration::from_secs(2);
        assert_eq!(index.len(), 4);
        assert_eq!(index.find_matches(&new, later).get(w(2)), 2);
        index.record(w(3), &blocks(&[9, 9]), later);
        assert_eq!(index.len(), 4, "never above the cap");
        assert_eq!(index.find_matches(&old, later).get(w(1)), 0, "the oldest went first");
        assert_eq!(index.find_matches(&new, later).get(w(2)), 2);
    }

    #[test]
    fn removing_a_worker_forgets_only_it() {
        let t0 = Instant::now();
        let mut index = TtlIndex::approximate();
        let prefix = blocks(&[1, 2]);
        index.record(w(1), &prefix, t0);
        index.record(w(2), &prefix, t0);
        index.remove_worker(w(1));
        let overlaps = index.find_matches(&prefix, t0);
        assert_eq!((overlaps.get(w(1)), overlaps.get(w(2))), (0, 1));
    }
}
