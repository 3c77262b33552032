//! How loaded each instance is, as one router sees it: requests this router
//! has in flight there (counted by a guard that lives until the response
//! stream is dropped), the load the worker itself last reported (so several
//! routers agree), and whether the instance is ejected after transport
//! failures. No I/O; time is passed in, so tests can control it.
//!
//! An instance's score is `max(in_flight_here, reported)`: a report counts
//! every router's requests, this router's own count is never older than the
//! report. A report older than its expiry is ignored.
//!
//! A `BTreeSet` ordered by load keeps least-loaded selection O(log n).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// First ejection after a transport failure; doubles per consecutive
/// failure up to [`MAX_EJECTION`], and resets after a success.
const BASE_EJECTION: Duration = Duration::from_millis(500);
const MAX_EJECTION: Duration = Duration::from_secs(30);

/// Loads of the instances one router sends to. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Occupancy {
    state: Arc<Mutex<State>>,
    /// Woken when some load goes down (a request ends, a lower report
    /// arrives), for requests waiting until an instance is no longer busy.
    lighter: Arc<tokio::sync::Notify>,
}

#[derive(Debug, Default)]
struct State {
    instances: HashMap<u64, InstanceLoad>,
    /// `(score, instance_id)` of every instance, for least-loaded selection.
    by_load: BTreeSet<(u64, u64)>,
    /// The last least-loaded choice: ties go to the next id after it, so
    /// equally idle instances take turns instead of the lowest id taking all.
    last_choice: u64,
}

#[derive(Debug, Default, Clone)]
struct InstanceLoad {
    inflight: u64,
    /// The worker's own report (requests open on the endpoint) and when it expires.
    reported: Option<(u64, Instant)>,
    /// The score under which this instance sits in `by_load`.
    indexed: u64,
    ejected_until: Option<Instant>,
    consecutive_failures: u32,
    /// The last failure seen on it, for people (the mesh page); kept after
    /// the instance recovers, so "why was it ejected?" can still be read.
    last_error: Option<LastError>,
}

/// Longest error text kept per instance: bounds the table's memory
/// whatever a failing worker sends.
const MAX_ERROR_LEN: usize = 300;

/// A failure seen on an instance, and when (wall clock, for display).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastError {
    pub message: String,
    pub at: std::time::SystemTime,
}

/// What one router knows of one instance right now: a copy for display
/// (the mesh page), never used to route.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InstanceState {
    /// Requests this router has in flight there.
    pub inflight: u64,
    /// The worker's own last report, while it is fresh.
    pub reported: Option<u64>,
    /// How much longer it stays ejected, while it is.
    pub ejected_for: Option<Duration>,
    pub consecutive_failures: u32,
    pub last_error: Option<LastError>,
}

impl InstanceLoad {
    fn score(&self, now: Instant) -> u64 {
        let reported = self
            .reported
            .filter(|(_, expires)| *expires > now)
            .map_or(0, |(load, _)| load);
        self.inflight.max(reported)
    }

    /// The score now; reads the clock only when there is a report that
    /// could have expired.
    fn score_now(&self) -> u64 {
        match self.reported {
            None => self.inflight,
            Some(_) => self.score(Instant::now()),
        }
    }
}

impl State {
    /// The entry of `id`, tracked from now on if it was not.
    fn entry(&mut self, id: u64) -> &mut InstanceLoad {
        tracked(&mut self.instances, &mut self.by_load, id)
    }

    /// Re-files `id` in the index under its current score.
    fn reindex(&mut self, id: u64, now: Instant) {
        let entry = tracked(&mut self.instances, &mut self.by_load, id);
        let score = entry.score(now);
        refile(&mut self.by_load, id, entry, score);
    }

    /// Adds `change` to the requests in flight on `id` (tracking it if it was
    /// not, when the change is an increase) and re-files it: one lookup, as this
    /// runs twice per request.
    fn add_inflight(&mut self, id: u64, change: i64) {
        let entry = if change > 0 {
            tracked(&mut self.instances, &mut self.by_load, id)
        } else {
            match self.instances.get_mut(&id) {
                Some(entry) => entry,
                // Forgotten by `sync` while the request ran.
                None => return,
            }
        };
        entry.inflight = entry.inflight.saturating_add_signed(change);
        let score = entry.score_now();
        refile(&mut self.by_load, id, entry, score);
    }
}

/// The entry of `id` in `instances`, added (idle, and filed in `by_load`)
/// if it was not there.
fn tracked<'a>(
    instances: &'a mut HashMap<u64, InstanceLoad>,
    by_load: &mut BTreeSet<(u64, u64)>,
    id: u64,
) -> &'a mut InstanceLoad {
    instances.entry(id).or_insert_with(|| {
        by_load.insert((0, id));
        InstanceLoad::default()
    })
}

/// Moves `id` in the load index from the score it is filed under to `score`.
fn refile(by_load: &mut BTreeSet<(u64, u64)>, id: u64, entry: &mut InstanceLoad, score: u64) {
    if entry.indexed != score {
        by_load.remove(&(entry.indexed, id));
        by_load.insert((score, id));
        entry.indexed = score;
    }
}

impl Occupancy {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Each update keeps the map and the index consistent before it returns.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts one request in flight on `id` until the guard is dropped.
    pub fn acquire(&self, id: u64) -> InflightGuard {
        self.lock().add_inflight(id, 1);
        InflightGuard {
            occupancy: self.clone(),
            id,
        }
    }

    /// The score of `id`: requests in flight here, or the worker's fresh
    /// report when that is higher.
    pub fn load(&self, id: u64) -> u64 {
        let now = Instant::now();
        self.lock().instances.get(&id).map_or(0, |i| i.score(now))
    }

    /// The worker `id` reports `load` (requests open on its endpoint), valid
    /// until `expires`. Only instances this table already tracks (synced
    /// from discovery, or chosen from it) are taken: a report naming any
    /// other id — a worker not registered yet, or a forged one on the event
    /// plane — is dropped, so forged ids cannot pile up here. Returns
    /// whether the report was taken.
    pub fn report(&self, id: u64, load: u64, expires: Instant) -> bool {
        let mut state = self.lock();
        let Some(before) = state.instances.get(&id).map(|i| i.indexed) else {
            return false;
        };
        let before = Some(before);
        state.entry(id).reported = Some((load, expires));
        state.reindex(id, Instant::now());
        if before.is_some_and(|before| state.instances[&id].indexed < before) {
            self.lighter.notify_waiters();
        }
        true
    }

    /// A future that resolves at the next drop in some instance's load.
    /// Create it *before* checking the loads, so a drop in between is not missed.
    pub fn lighter(&self) -> tokio::sync::futures::OwnedNotified {
        self.lighter.clone().notified_owned()
    }

    /// Re-files instances whose report expired (call now and then; O(n)).
    pub fn expire_reports(&self, now: Instant) {
        let mut state = self.lock();
        let expired: Vec<u64> = state
            .instances
            .iter()
            .filter(|(_, i)| i.reported.is_some_and(|(_, expires)| expires <= now))
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            state.entry(id).reported = None;
            state.reindex(id, now);
        }
    }

    /// False while `id` is ejected.
    pub fn is_available(&self, id: u64, now: Instant) -> bool {
        self.lock()
            .instances
            .get(&id)
            .and_then(|i| i.ejected_until)
            .is_none_or(|until| until <= now)
    }

    /// A transport failure on `id`: eject it for a backoff that grows with
    /// consecutive failures. Returns how long.
    pub fn record_failure(&self, id: u64, now: Instant) -> Duration {
        let mut state = self.lock();
        let entry = state.entry(id);
        entry.consecutive_failures = entry.consecutive_failures.saturating_add(1);
        let backoff = BASE_EJECTION
            .saturating_mul(1 << (entry.consecutive_failures - 1).min(16))
            .min(MAX_EJECTION);
        entry.ejected_until = Some(now + backoff);
        backoff
    }

    /// Keeps `message` as the last failure seen on `id` (cut to a bounded
    /// length), for people to read; routing does not look at it.
    pub fn record_error(&self, id: u64, message: &str) {
        let mut cut = MAX_ERROR_LEN.min(message.len());
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        let mut state = self.lock();
        if let Some(entry) = state.instances.get_mut(&id) {
            entry.last_error = Some(LastError {
                message: message[..cut].to_string(),
                at: std::time::SystemTime::now(),
            });
        }
    }

    /// A copy of what this table holds for `id`, if it tracks it.
    pub fn state(&self, id: u64, now: Instant) -> Option<InstanceState> {
        let state = self.lock();
        let entry = state.instances.get(&id)?;
        Some(InstanceState {
            inflight: entry.inflight,
            reported: entry
                .reported
                .filter(|(_, expires)| *expires > now)
                .map(|(load, _)| load),
            ejected_for: entry
                .ejected_until
                .filter(|until| *until > now)
                .map(|until| until - now),
            consecutive_failures: entry.consecutive_failures,
            last_error: entry.last_error.clone(),
        })
    }

    /// A successful response from `id`: its failure streak ends.
    pub fn record_success(&self, id: u64) {
        let mut state = self.lock();
        if let Some(entry) = state.instances.get_mut(&id) {
            entry.consecutive_failures = 0;
            entry.ejected_until = None;
        }
    }

    /// The non-ejected instance with the fewest requests in flight among
    /// those `allowed(id, load)` accepts, walking the load index (O(log n)
    /// when few are skipped). `allowed` runs under this table's lock, so it
    /// must not call back into it.
    /// Among several with the same load, the next id after the previous
    /// choice wins (wrapping around).
    pub fn least_loaded(&self, allowed: impl Fn(u64, u64) -> bool, now: Instant) -> Option<u64> {
        let mut state = self.lock();
        let usable = |state: &State, load: u64, id: u64| {
            allowed(id, load) && state.instances[&id].ejected_until.is_none_or(|until| until <= now)
        };
        let &(least, first) = state.by_load.iter().find(|(load, id)| usable(&state, *load, *id))?;
        let after = state.last_choice.saturating_add(1);
        let next_in_turn = state
            .by_load
            .range((least, after)..=(least, u64::MAX))
            .find(|(load, id)| usable(&state, *load, *id))
            .map(|&(_, id)| id);
        let chosen = next_in_turn.unwrap_or(first);
        state.last_choice = chosen;
        Some(chosen)
    }

    /// Tracks exactly the instances in `ids` (sorted): new ones start idle,
    /// gone ones are forgotten.
    pub fn sync(&self, ids: &[u64]) {
        let mut state = self.lock();
        for &id in ids {
            state.entry(id);
        }
        drop(state);
        self.retain(|id| ids.binary_search(&id).is_ok());
    }

    /// Forgets instances not in `live` (they left discovery).
    pub fn retain(&self, live: impl Fn(u64) -> bool) {
        let mut state = self.lock();
        let gone: Vec<u64> = state.instances.keys().copied().filter(|id| !live(*id)).collect();
        for id in gone {
            if let Some(entry) = state.instances.remove(&id) {
                state.by_load.remove(&(entry.indexed, id));
            }
        }
    }

    fn release(&self, id: u64) {
        self.lock().add_inflight(id, -1);
        self.lighter.notify_waiters();
    }
}

/// One request in flight on an instance; released on drop.
#[derive(Debug)]
pub struct InflightGuard {
    occupancy: Occupancy,
    id: u64,
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.occupancy.release(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_shows_ejection_and_keeps_a_bounded_last_error() {
        let occupancy = Occupancy::new();
        let _guard = occupancy.acquire(7);
        let now = Instant::now();
        assert_eq!(occupancy.state(7, now).map(|s| s.inflight), Some(1));
        assert_eq!(occupancy.state(8, now), None, "an untracked instance has no state");
        occupancy.record_failure(7, now);
        occupancy.record_error(7, &"é".repeat(1000));
        let state = occupancy.state(7, now).unwrap();
        assert_eq!(state.ejected_for, Some(BASE_EJECTION));
        assert_eq!(state.consecutive_failures, 1);
        let message = state.last_error.unwrap().message;
        assert!(message.len() <= MAX_ERROR_LEN && message.starts_with('é'), "{message}");
        // Recovered: no longer ejected, but the last error is still there to read.
        occupancy.record_success(7);
        let state = occupancy.state(7, now).unwrap();
        assert_eq!(state.ejected_for, None);
        assert!(state.last_error.is_some());
    }

    #[test]
    fn guards_count_until_dropped() {
        let occupancy = Occupancy::new();
        let a = occupancy.acquire(1);
        let b = occupancy.acquire(1);
        assert_eq!(occupancy.load(1), 2);
        drop(a);
        assert_eq!(occupancy.load(1), 1);
        drop(b);
        assert_eq!(occupancy.load(1), 0);
    }

    #[test]
    fn least_loaded_skips_ejected_and_disallowed_instances() {
        let occupancy = Occupancy::new();
        let now = Instant::now();
        let _one = occupancy.acquire(1);
        let _two = (occupancy.acquire(2), occupancy.acquire(2));
        let _three = occupancy.acquire(3);
        occupancy.retain(|_| true);
        assert_eq!(occupancy.least_loaded(|_, _| true, now), Some(1));
        occupancy.record_failure(1, now);
        assert_eq!(occupancy.least_loaded(|_, _| true, now), Some(3));
        assert_eq!(occupancy.least_loaded(|id, _| id == 2, now), Some(2));
        assert_eq!(occupancy.least_loaded(|_, load| load < 1, now), None);
    }

    #[test]
    fn equally_loaded_instances_take_turns() {
        let occupancy = Occupancy::new();
        occupancy.sync(&[1, 2, 3]);
        let _busy = occupancy.acquire(2);
        let now = Instant::now();
        let picks: Vec<_> = (0..4)
            .map(|_| occupancy.least_loaded(|_, _| true, now).unwrap())
            .collect();
        assert_eq!(
            picks,
            [1, 3, 1, 3],
            "the busy instance is never chosen; the idle ones alternate"
        );
    }

    #[test]
    fn ejection_grows_with_failures_and_ends_on_success() {
        let occupancy = Occupancy::new();
        let now = Instant::now();
        let first = occupancy.record_failure(7, now);
        let second = occupancy.record_failure(7, now);
        assert_eq!(second, first * 2);
        assert!(!occupancy.is_available(7, now));
        assert!(occupancy.is_available(7, now + second));
        occupancy.record_success(7);
        assert!(occupancy.is_available(7, now));
        assert_eq!(occupancy.record_failure(7, now), first);
    }

    #[test]
    fn a_fresh_worker_report_outweighs_a_lower_local_count_until_it_expires() {
        let occupancy = Occupancy::new();
        occupancy.sync(&[1, 2]);
        let now = Instant::now();
        let _mine = occupancy.acquire(2);
        // Another router keeps worker 1 busy: its report says 5.
        occupancy.report(1, 5, now + Duration::from_secs(3));
        assert_eq!(occupancy.load(1), 5);
        assert_eq!(occupancy.least_loaded(|_, _| true, now), Some(2));
        // Once the report expires only the local count (0) is left.
        occupancy.expire_reports(now + Duration::from_secs(4));
        assert_eq!(occupancy.least_loaded(|_, _| true, now), Some(1));
        // Reports for instances not in discovery are not taken at all:
        // forged ids cannot grow the table.
        assert!(!occupancy.report(9, 1, now + Duration::from_secs(3)));
        assert_eq!(occupancy.load(9), 0);
        for forged in 100..10_100 {
            occupancy.report(forged, 1_000, now + Duration::from_secs(3));
        }
        assert_eq!(occupancy.lock().instances.len(), 2, "only the synced instances");
    }

    #[test]
    fn forgotten_instances_leave_the_index() {
        let occupancy = Occupancy::new();
        drop(occupancy.acquire(1));
        drop(occupancy.acquire(2));
        occupancy.retain(|id| id == 2);
        assert_eq!(occupancy.least_loaded(|_, _| true, Instant::now()), Some(2));
    }
}
